//! Operating Aegis from the command line (SPEC section 16), besides `top` (tests/top.rs):
//! aligned text tables, `bench --plot`, and the shell completions.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// How long one command may take (a tiny bench included).
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `aegis-shmctl ARGS` under the guard, with stdout and stderr in files.
fn shmctl(h: &mut Harness, b: &Bins, args: &[&str]) -> Output {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        h.dir.join(format!("shmctl-{n}.out")),
        h.dir.join(format!("shmctl-{n}.err")),
    );
    let i = h.spawn(
        Command::new(&b.shmctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap()),
        "aegis-shmctl",
    );
    let status = h.wait(i, DEADLINE, &format!("aegis-shmctl {args:?}"), || {});
    Output {
        status,
        stdout: fs::read(out).unwrap_or_default(),
        stderr: fs::read(err).unwrap_or_default(),
    }
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// The words of a line with their first and last column (in characters).
fn words(line: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let chars: Vec<char> = line.chars().collect();
    for (i, c) in chars.iter().chain(std::iter::once(&' ')).enumerate() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((chars[s..i].iter().collect(), s, i - 1));
                start = None;
            }
            _ => {}
        }
    }
    out
}

#[test]
fn session_list_columns_line_up_under_their_headers() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("tables");
    let socket = h.start_daemon(&b);
    let s = socket.to_str().unwrap();
    for (name, mode) in [("a", "live"), ("a-much-longer-session-name", "backtest")] {
        let o = shmctl(
            &mut h,
            &b,
            &["--socket", s, "session", "create", name, "--mode", mode],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let o = shmctl(&mut h, &b, &["--socket", s, "session", "list"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows:\n{out}");
    let header = words(lines[0]);
    let names: Vec<&str> = header.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        names,
        ["NAME", "MODE", "STATE", "COMPONENTS", "SOURCES", "EVENTS"],
        "{out}"
    );
    for row in &lines[1..] {
        let cells = words(row);
        assert_eq!(cells.len(), header.len(), "one cell per column:\n{out}");
        for ((h, h_start, h_end), (c, start, end)) in header.iter().zip(&cells) {
            if ["COMPONENTS", "SOURCES", "EVENTS"].contains(&h.as_str()) {
                assert_eq!(end, h_end, "{c:?} must end under {h}:\n{out}");
            } else {
                assert_eq!(start, h_start, "{c:?} must start under {h}:\n{out}");
            }
        }
    }
    assert!(lines[2].starts_with("a-much-longer-session-name  backtest  created"));
}

#[test]
fn bench_plot_is_an_svg_with_one_line_per_latency_row() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("plot");
    let before: BTreeSet<ShmFile> = shm_files().into_iter().collect();
    let svg = h.dir.join("latency.svg");
    let o = shmctl(
        &mut h,
        &b,
        &[
            "--json",
            "bench",
            "--events",
            "3000",
            "--samples",
            "400",
            "--rounds",
            "2",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "bench failed:\n{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    // The JSON rows keep the keys of SPEC section 9 (the plot's points are not among them).
    let v: Value = serde_json::from_slice(&o.stdout).expect("bench --json");
    let rows = v["latency"].as_array().expect("latency rows");
    assert!(rows.len() >= 3, "{v}");
    for r in rows {
        for k in ["name", "p50_ns", "p99_ns", "p999_ns", "max_ns"] {
            assert!(!r[k].is_null(), "row without {k}: {r}");
        }
        assert!(r.get("percentiles").is_none(), "{r}");
    }
    assert!(v["throughput"][0]["events_per_s"].is_f64(), "{v}");
    // Two alternated runs of the real path and of its baseline; each row is the lower middle
    // (with two runs, the slower) one.
    let runs = &v["throughput_runs"];
    assert_eq!(runs["rounds"], 2, "{v}");
    for (row, key) in [(0, "real_path_events_per_s"), (1, "inproc_events_per_s")] {
        let rates: Vec<f64> = runs[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {v}"))
            .iter()
            .map(|r| r.as_f64().expect("a rate"))
            .collect();
        assert_eq!(rates.len(), 2, "{key}: {v}");
        let shown = v["throughput"][row]["events_per_s"]
            .as_f64()
            .expect("a rate");
        assert_eq!(shown, rates[0].min(rates[1]), "{key}: {v}");
    }

    let file = fs::read_to_string(&svg).expect("the plot file");
    let doc = roxmltree::Document::parse(&file).expect("the plot is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    // Data lines are 2 px wide (axes and ticks 1 px): one per latency row, with a point at
    // p50 and more up to the max.
    let lines: Vec<roxmltree::Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2"))
        .collect();
    assert_eq!(lines.len(), rows.len(), "one line per latency row");
    for l in &lines {
        let points = l
            .attribute("points")
            .unwrap_or("")
            .split_whitespace()
            .count();
        assert!(points >= 2, "a line of {points} point(s)");
    }
    // The legend names every row; the x axis runs from p50.
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for r in rows {
        let name = r["name"].as_str().unwrap();
        assert!(texts.contains(&name), "no legend for {name}: {texts:?}");
    }
    assert!(
        texts.contains(&"p50") && texts.contains(&"p90"),
        "{texts:?}"
    );

    // The bench's private daemon removed its segments: nothing new whose creator is gone.
    let leaked: Vec<ShmFile> = shm_files()
        .into_iter()
        .filter(|f| !before.contains(f) && !f.creator.is_some_and(pid_alive))
        .collect();
    assert!(leaked.is_empty(), "segments left: {leaked:?}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("completions");
    for shell in ["bash", "zsh", "fish"] {
        let o = shmctl(&mut h, &b, &["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o.stderr));
        let script = text(&o.stdout);
        // Subcommands and options (fish names them without their dashes).
        for word in [
            "aegis-shmctl",
            "session",
            "top",
            "bench",
            "plot",
            "once",
            "discover",
            "restart-killed",
        ] {
            assert!(script.contains(word), "{shell}: no {word} in\n{script}");
        }
    }
    // The bash script is valid bash (when bash is there to say so).
    let o = shmctl(&mut h, &b, &["completions", "bash"]);
    let path = h.dir.join("aegis-shmctl.bash");
    fs::write(&path, &o.stdout).unwrap();
    if let Ok(st) = Command::new("bash").arg("-n").arg(&path).status() {
        assert!(st.success(), "bash -n rejects the completion script");
    }
    let o = shmctl(&mut h, &b, &["completions", "tcsh"]);
    assert!(!o.status.success(), "an unknown shell is refused");
}
