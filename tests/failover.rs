//! Hot standby, failover and resume without duplicates (SPEC section 12), with real
//! processes, a private daemon and real /dev/shm: a producer group whose active member is
//! killed with `kill -9` mid-stream, a lone live producer killed and restarted on the same
//! file, a consumer group whose paused active member is fenced, and a split brain (a paused
//! active producer that resumes after its standby took over).
//!
//! Every check reads what a consumer saw: the tap's NDJSON, one trade per line, whose ids are
//! consecutive in the input. Equal count, no duplicate id and no gap mean exactly once.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bins, q, serial, tail, Bins, Harness};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The first trade id of the generated input.
const FIRST_ID: u64 = 7_000_000;
/// How long any one wait of these tests may take.
const WAIT: Duration = Duration::from_secs(60);

/// Writes `n` trades, `step_ms` apart, as a Binance spot trades CSV (ids consecutive).
fn trades_csv(dir: &Path, n: u64, step_ms: u64) -> PathBuf {
    let path = dir.join("BTCUSDT-trades-2024-01-01.csv");
    let mut w = std::io::BufWriter::new(fs::File::create(&path).expect("create the trades CSV"));
    let t0 = 1_704_067_200_000u64;
    for i in 0..n {
        writeln!(
            w,
            "{},42000.{:02},0.001,42.0,{},{}",
            FIRST_ID + i,
            i % 100,
            t0 + i * step_ms,
            if i % 2 == 0 { "true" } else { "false" }
        )
        .expect("write the trades CSV");
    }
    w.flush().expect("flush the trades CSV");
    path
}

/// One request on the control socket; returns the answer.
fn request(socket: &Path, v: &Value) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect to the daemon");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = serde_json::to_vec(v).unwrap();
    line.push(b'\n');
    s.write_all(&line).expect("send a request");
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .expect("read an answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
}

/// Creates live session `name` (starting once `expect` components are READY, if given);
/// returns its token.
fn create_live(socket: &Path, name: &str, expect: Option<u32>) -> String {
    let created = request(
        socket,
        &json!({"cmd": "SESSION_CREATE", "name": name, "mode": "live", "expect": expect}),
    );
    created["data"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token for session {name}: {created}"))
        .to_string()
}

fn inspect(socket: &Path, name: &str) -> Value {
    let a = request(socket, &json!({"cmd": "SESSION_INSPECT", "name": name}));
    a["data"].clone()
}

/// Polls `inspect` until `ok` holds; panics with the last answer after [`WAIT`].
fn wait_inspect(
    h: &Harness,
    socket: &Path,
    name: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let v = inspect(socket, name);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {WAIT:?}; last inspect: {v:#}\ndaemon log:\n{}",
            tail(&h.dir.join("daemon.log"), 3000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn merged(v: &Value) -> u64 {
    v["sequencer"]["events_merged"].as_u64().unwrap_or(0)
}

/// The group named `g` in an inspect answer.
fn group<'a>(v: &'a Value, g: &str) -> &'a Value {
    v["groups"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == g))
        .unwrap_or(&Value::Null)
}

/// The pid of the active member of group `g`.
fn active_pid(v: &Value, g: &str) -> u32 {
    let gr = group(v, g);
    let name = gr["active"].as_str().expect("an active member");
    gr["members"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["name"] == name))
        .and_then(|x| x["pid"].as_u64())
        .expect("the active member's pid") as u32
}

/// The trade ids of a tap's NDJSON output, in order.
fn tap_ids(path: &Path) -> Vec<u64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v["id"].as_u64().expect("a trade id")
        })
        .collect()
}

/// Exactly once: `n` ids, each of the input once, in input order (no gap, no duplicate).
fn assert_exactly_once(ids: &[u64], n: u64, what: &str) {
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    let dups = ids.len() - unique.len();
    let missing: Vec<u64> = (FIRST_ID..FIRST_ID + n)
        .filter(|i| !unique.contains(i))
        .take(10)
        .collect();
    assert!(
        ids.len() as u64 == n && dups == 0 && missing.is_empty(),
        "{what}: {} events for {n} input, {dups} duplicates, missing (first 10) {missing:?}",
        ids.len()
    );
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: events out of input order"
    );
}

/// `aegis-shmctl --json session run NAME --mode live ... -c ...` started in the background.
fn start_run(h: &mut Harness, b: &Bins, socket: &Path, name: &str, commands: &[String]) -> usize {
    start_run_with(h, b, socket, name, &[], commands)
}

fn start_run_with(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    extra: &[&str],
    commands: &[String],
) -> usize {
    let mut cmd = Command::new(&b.shmctl);
    cmd.arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(["session", "run", name, "--mode", "live", "--timeout", "120"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(fs::File::create(h.dir.join(format!("{name}.stdout"))).unwrap())
        .stderr(fs::File::create(h.dir.join(format!("{name}.stderr"))).unwrap());
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    h.spawn(&mut cmd, "aegis-shmctl session run")
}

/// Waits for the background `session run` `i`; returns its JSON summary.
fn finish_run(h: &mut Harness, i: usize, name: &str) -> Value {
    h.wait(
        i,
        Duration::from_secs(180),
        &format!("session run {name}"),
        || {},
    );
    let out = fs::read_to_string(h.dir.join(format!("{name}.stdout"))).unwrap_or_default();
    let at = out.rfind("\n{\n").map(|p| p + 1).unwrap_or(0);
    let v: Value = serde_json::from_str(&out[at..]).unwrap_or_else(|e| {
        panic!(
            "no summary from session run {name} ({e}):\n{out}\nstderr:\n{}",
            tail(&h.dir.join(format!("{name}.stderr")), 3000)
        )
    });
    if let Some(bus) = v["session"]["segments"]["bus"].as_str() {
        if let Some(sid) = Path::new(bus)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(common::sid_of)
        {
            h.sids.insert(sid.to_string());
        }
    }
    v
}

/// The exit status `session run` reported for the component whose command contains `needle`.
fn exit_of(summary: &Value, needle: &str) -> Option<i64> {
    summary["components"]
        .as_array()?
        .iter()
        .find(|c| c["command"].as_str().is_some_and(|s| s.contains(needle)))?["exit"]
        .as_i64()
}

fn replay_cmd(b: &Bins, csv: &Path, name: &str, extra: &str) -> String {
    format!(
        "exec {} --name {name} --speed 1 {extra} {} 2>{}",
        q(&b.replay),
        q(csv),
        q(&csv.with_file_name(format!("{name}.err")))
    )
}

fn tap_cmd(b: &Bins, out: &Path, name: &str, extra: &str) -> String {
    format!(
        "exec {} --name {name} --format ndjson --out {} {extra} 2>{}",
        q(&b.tap),
        q(out),
        q(&out.with_file_name(format!("{name}.err")))
    )
}

/// `session run` of a producer group `feed` (two replays of one paced `n`-trade file, the
/// aggressive policy) and one NDJSON tap; returns the run and the tap's output file.
fn start_feed_group(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    session: &str,
    n: u64,
) -> (usize, PathBuf) {
    let csv = trades_csv(&h.dir, n, 5);
    let out = h.dir.join("tap.ndjson");
    let grp = "--group feed --failover aggressive";
    let run = start_run(
        h,
        b,
        socket,
        session,
        &[
            replay_cmd(b, &csv, "feed-a", grp),
            replay_cmd(b, &csv, "feed-b", grp),
            tap_cmd(b, &out, "tap", ""),
        ],
    );
    (run, out)
}

#[test]
fn replay_group_failover_after_kill9_is_exactly_once() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("failover-kill");
    let socket = h.start_daemon(&b);
    const N: u64 = 600;
    let (run, out) = start_feed_group(&mut h, &b, &socket, "fo", N);
    let v = wait_inspect(&h, &socket, "fo", "a third of the stream merged", |v| {
        merged(v) >= N / 3
    });
    let victim = active_pid(&v, "feed");
    let first = group(&v, "feed")["active"].clone();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill -9 the active member");
    let v = wait_inspect(&h, &socket, "fo", "the standby promoted", |v| {
        group(v, "feed")["epoch"] == 2
    });
    assert_ne!(group(&v, "feed")["active"], first);
    let summary = finish_run(&mut h, run, "fo");
    let s = &summary["session"];
    assert_eq!(s["state"], "finished", "{summary:#}");
    assert_eq!(exit_of(&summary, "--name tap"), Some(0), "{summary:#}");
    assert_exactly_once(&tap_ids(&out), N, "tap after a kill -9 failover");
    let g = group(s, "feed");
    assert_eq!(
        (g["epoch"].as_u64(), g["failovers"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(g["last_failover_unix_ms"].as_u64().is_some());
    assert_eq!(s["sequencer"]["seq_gaps"], 0);
    assert_eq!(merged(s), N);
}

#[test]
fn restarted_live_producer_resumes_exactly_once() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("restart");
    let socket = h.start_daemon(&b);
    const N: u64 = 600;
    let csv = trades_csv(&h.dir, N, 5);
    let out = h.dir.join("tap.ndjson");
    let token = create_live(&socket, "rs", Some(2));
    let env = |c: &mut Command| {
        c.env("AEGIS_SOCKET", &socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .stdin(Stdio::null());
    };
    let replay = |h: &mut Harness, tag: &str| {
        let mut c = Command::new(&b.replay);
        env(&mut c);
        c.args(["--name", "feed", "--speed", "1", "--json"])
            .arg(&csv)
            .stdout(fs::File::create(h.dir.join(format!("{tag}.out"))).unwrap())
            .stderr(fs::File::create(h.dir.join(format!("{tag}.err"))).unwrap());
        h.spawn(&mut c, "aegis-replay")
    };
    let first = replay(&mut h, "first");
    let mut t = Command::new(&b.tap);
    env(&mut t);
    t.args(["--name", "tap", "--format", "ndjson", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(fs::File::create(h.dir.join("tap.err")).unwrap());
    let tap = h.spawn(&mut t, "aegis-tap");
    let v = wait_inspect(&h, &socket, "rs", "a third merged", |v| merged(v) >= N / 3);
    if let Some(bus) = v["segments"]["bus"].as_str() {
        if let Some(sid) = Path::new(bus)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(common::sid_of)
        {
            h.sids.insert(sid.to_string());
        }
    }
    h.kill_group(first);
    wait_inspect(&h, &socket, "rs", "the producer seen dead", |v| {
        v["components"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == "feed"))
            .is_some_and(|c| c["state"] == "dead")
    });
    let second = replay(&mut h, "second");
    let st = h.wait(second, WAIT * 2, "the restarted replay", || {});
    assert!(
        st.success(),
        "restarted replay: {st}\n{}",
        tail(&h.dir.join("second.err"), 2000)
    );
    let summary: Value =
        serde_json::from_str(&fs::read_to_string(h.dir.join("second.out")).unwrap()).unwrap();
    let st = h.wait(tap, WAIT, "the tap", || {});
    assert!(
        st.success(),
        "tap: {st}\n{}",
        tail(&h.dir.join("tap.err"), 2000)
    );
    assert_exactly_once(&tap_ids(&out), N, "tap across a producer restart");
    let skipped = summary["skipped"].as_u64().unwrap();
    assert!(skipped >= N / 3, "the restart skipped only {skipped}");
    assert_eq!(summary["events"].as_u64().unwrap() + skipped, N);
    let v = inspect(&socket, "rs");
    assert_eq!(v["sequencer"]["seq_gaps"], 0, "{v:#}");
    assert_eq!(merged(&v), N);
    request(&socket, &json!({"cmd": "SESSION_DESTROY", "name": "rs"}));
}

#[test]
fn consumer_group_standby_is_promoted_and_the_paused_active_fenced() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("cgroup");
    let socket = h.start_daemon(&b);
    const N: u64 = 800;
    let csv = trades_csv(&h.dir, N, 5);
    let (out_a, out_b) = (h.dir.join("risk-a.ndjson"), h.dir.join("risk-b.ndjson"));
    let grp = "--group risk --failover aggressive";
    let run = start_run(
        &mut h,
        &b,
        &socket,
        "cg",
        &[
            replay_cmd(&b, &csv, "feed", ""),
            tap_cmd(&b, &out_a, "risk-a", grp),
            tap_cmd(&b, &out_b, "risk-b", grp),
        ],
    );
    let v = wait_inspect(&h, &socket, "cg", "a quarter merged", |v| {
        merged(v) >= N / 4
    });
    let g = group(&v, "risk");
    assert_eq!(g["epoch"], 1);
    let first = g["active"].as_str().unwrap().to_string();
    let victim = active_pid(&v, "risk");
    // DISCOVER from outside the session: both members live, the first active.
    let d = request(
        &socket,
        &json!({"cmd": "DISCOVER", "session": "cg", "group": "risk"}),
    )["data"]
        .clone();
    assert_eq!(d["active"], first.as_str(), "{d:#}");
    assert_eq!(d["members"].as_array().map(Vec::len), Some(2), "{d:#}");
    kill(Pid::from_raw(victim as i32), Signal::SIGSTOP).expect("SIGSTOP the active tap");
    let v = wait_inspect(&h, &socket, "cg", "the standby promoted", |v| {
        group(v, "risk")["epoch"] == 2
    });
    let g = group(&v, "risk");
    assert_ne!(g["active"], first.as_str());
    let old = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == first.as_str())
        .unwrap();
    assert_eq!(old["role"], "fenced", "{g:#}");
    let d = request(
        &socket,
        &json!({"cmd": "DISCOVER", "session": "cg", "component": first}),
    )["data"]
        .clone();
    assert_eq!(d["members"].as_array().map(Vec::len), Some(1), "{d:#}");
    kill(Pid::from_raw(victim as i32), Signal::SIGCONT).expect("SIGCONT the old active");
    let summary = finish_run(&mut h, run, "cg");
    let (old_cmd, new_out) = if first == "risk-a" {
        ("--name risk-a", &out_b)
    } else {
        ("--name risk-b", &out_a)
    };
    let old_exit = exit_of(&summary, old_cmd);
    assert!(
        old_exit.is_some_and(|e| e != 0),
        "the fenced tap must fail: {summary:#}"
    );
    let err = fs::read_to_string(h.dir.join(format!("{first}.err"))).unwrap_or_default();
    assert!(
        err.contains("fenced") || err.contains("not_active"),
        "the fenced tap says why: {err}"
    );
    assert_exactly_once(&tap_ids(new_out), N, "the promoted tap");
    assert_eq!(summary["session"]["state"], "finished", "{summary:#}");
}

#[test]
fn split_brain_paused_active_producer_is_fenced_and_never_merged() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("split");
    let socket = h.start_daemon(&b);
    const N: u64 = 800;
    let (run, out) = start_feed_group(&mut h, &b, &socket, "sb", N);
    let v = wait_inspect(&h, &socket, "sb", "a quarter merged", |v| {
        merged(v) >= N / 4
    });
    let victim = active_pid(&v, "feed");
    let first = group(&v, "feed")["active"].as_str().unwrap().to_string();
    kill(Pid::from_raw(victim as i32), Signal::SIGSTOP).expect("SIGSTOP the active replay");
    wait_inspect(
        &h,
        &socket,
        "sb",
        "the standby promoted past the bound",
        |v| group(v, "feed")["epoch"] == 2,
    );
    // Let the new active run a while, then wake the old one: its pacer is late, so it
    // pushes a burst of events into its ring at once; none may reach the bus.
    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(victim as i32), Signal::SIGCONT).expect("SIGCONT the old active");
    let summary = finish_run(&mut h, run, "sb");
    let old_exit = exit_of(&summary, &format!("--name {first}"));
    assert!(
        old_exit.is_some_and(|e| e != 0),
        "the fenced replay must fail: {summary:#}"
    );
    let err = fs::read_to_string(h.dir.join(format!("{first}.err"))).unwrap_or_default();
    assert!(err.contains("fenced"), "the fenced replay says so: {err}");
    assert_exactly_once(&tap_ids(&out), N, "tap through a split brain");
    let s = &summary["session"];
    assert_eq!(s["state"], "finished", "{summary:#}");
    assert_eq!(s["sequencer"]["seq_gaps"], 0);
    assert_eq!(merged(s), N);
    let g = group(s, "feed");
    let old = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == first.as_str())
        .unwrap();
    assert_eq!(old["role"], "fenced", "{g:#}");
}

#[test]
fn chaos_seeded_run_over_a_producer_group_ends_with_exact_counts() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("chaos");
    let socket = h.start_daemon(&b);
    const N: u64 = 1200;
    let csv = trades_csv(&h.dir, N, 5);
    let (out1, out2) = (h.dir.join("tap1.ndjson"), h.dir.join("tap2.ndjson"));
    let grp = "--group feed --failover aggressive";
    let run = start_run_with(
        &mut h,
        &b,
        &socket,
        "ch",
        &["--keep"],
        &[
            replay_cmd(&b, &csv, "feed-a", grp),
            replay_cmd(&b, &csv, "feed-b", grp),
            replay_cmd(&b, &csv, "feed-c", grp),
            tap_cmd(&b, &out1, "tap1", ""),
            tap_cmd(&b, &out2, "tap2", ""),
        ],
    );
    wait_inspect(&h, &socket, "ch", "the stream flowing", |v| merged(v) >= 50);
    // Pauses shorter than the aggressive bound (1 s) fence nobody; kills need a standby, so
    // one member of three always survives.
    let report = chaos(
        &b,
        &socket,
        &[
            "ch",
            "--seed",
            "7",
            "--duration",
            "4",
            "--kill",
            "--pause",
            "300",
            "--every-ms",
            "700",
        ],
    );
    assert_eq!(report["seed"], 7);
    let actions = report["actions"].as_array().expect("actions");
    let kills = actions.iter().filter(|a| a["fault"] == "kill").count();
    // A kill of the active member is a failover; a kill of a standby is not.
    let active_kills = actions
        .iter()
        .filter(|a| a["fault"] == "kill" && a["role"] == "active")
        .count();
    assert!(!actions.is_empty() && kills <= 2, "{report:#}");
    assert!(report["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["ok"] == true));
    let summary = finish_run(&mut h, run, "ch");
    assert_eq!(summary["session"]["state"], "finished", "{summary:#}");
    assert_exactly_once(&tap_ids(&out1), N, "tap1 through chaos");
    assert_exactly_once(&tap_ids(&out2), N, "tap2 through chaos");
    let v = inspect(&socket, "ch");
    assert_eq!(
        group(&v, "feed")["failovers"].as_u64(),
        Some(active_kills as u64),
        "{v:#}"
    );
    assert_eq!(v["sequencer"]["seq_gaps"], 0);
    request(&socket, &json!({"cmd": "SESSION_DESTROY", "name": "ch"}));
}

/// `aegis-shmctl --json chaos ARGS... --wait-finished --timeout 120`, which must find every
/// invariant held; its report.
fn chaos(b: &Bins, socket: &Path, args: &[&str]) -> Value {
    let out = common::shmctl_output(
        b,
        socket,
        &[
            &["--json", "chaos"],
            args,
            &["--wait-finished", "--timeout", "120"],
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "chaos printed no report ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "chaos found a broken invariant: {report:#}"
    );
    report
}

/// `session run --restart-killed` restarts the paced producer each time `chaos --restart`
/// kills it (seeded), with the same command line: the restarted replay resumes after the
/// last seq merged, so the tap sees every event exactly once, the source's seqs stay
/// contiguous, and the run ends well, its summary counting the restarts.
#[test]
fn chaos_restart_kills_a_producer_that_session_run_restarts_exactly_once() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("chaos-restart");
    let socket = h.start_daemon(&b);
    const N: u64 = 1000;
    let csv = trades_csv(&h.dir, N, 5);
    let out = h.dir.join("tap.ndjson");
    let run = start_run_with(
        &mut h,
        &b,
        &socket,
        "cr",
        &["--keep", "--restart-killed", "10"],
        &[
            replay_cmd(&b, &csv, "feed", ""),
            tap_cmd(&b, &out, "tap", ""),
        ],
    );
    let v = wait_inspect(&h, &socket, "cr", "the stream flowing", |v| merged(v) >= 50);
    let feed = v["components"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "feed"))
        .cloned()
        .expect("the producer in inspect");
    assert_eq!(
        feed["launch"],
        json!({"command": 0, "incarnation": 1}),
        "{v:#}"
    );
    assert_eq!(feed["restartable"], true, "{v:#}");
    // Only the producer: a restarted tap would start at the head.
    let report = chaos(
        &b,
        &socket,
        &[
            "cr",
            "--seed",
            "11",
            "--duration",
            "3",
            "--restart",
            "--targets",
            "feed",
            "--every-ms",
            "900",
        ],
    );
    let actions = report["actions"].as_array().expect("actions");
    let kills = actions.len() as u64;
    assert!(kills >= 1, "the plan hit nothing: {report:#}");
    for a in actions {
        assert_eq!(
            (&a["fault"], &a["target"]),
            (&json!("restart"), &json!("feed"))
        );
        assert!(
            a["restart_ms"].as_u64().is_some(),
            "not restarted: {report:#}"
        );
        assert_ne!(a["new_pid"], a["pid"]);
    }
    assert_eq!(report["restarts"]["restarted"].as_u64(), Some(kills));
    let names: Vec<&str> = report["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"restarted") && names.contains(&"sources_contiguous"),
        "{report:#}"
    );
    // Every planned step found its target: the producer stays restartable (a budget of 10,
    // more steps than 3 s at 450 ms or more apart can hold).
    assert_eq!(report["plan"].as_array().map(Vec::len), Some(actions.len()));
    let summary = finish_run(&mut h, run, "cr");
    assert_eq!(summary["ok"], true, "{summary:#}");
    let feed_run = summary["components"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["command"].as_str().unwrap().contains("--name feed"))
        })
        .expect("the producer's row");
    assert_eq!(feed_run["restarts"].as_u64(), Some(kills), "{summary:#}");
    assert_eq!(feed_run["exit"], 0, "{summary:#}");
    assert!(feed_run["restarted"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["signal"] == 9));
    assert_exactly_once(&tap_ids(&out), N, "tap through restarts");
    let v = inspect(&socket, "cr");
    assert_eq!(v["sources"].as_array().map(Vec::len), Some(1), "{v:#}");
    let src = &v["sources"][0];
    assert_eq!(
        (
            src["events"].as_u64(),
            src["last_seq"].as_u64(),
            src["seq_gaps"].as_u64()
        ),
        (Some(N), Some(N - 1), Some(0)),
        "{v:#}"
    );
    assert_eq!(src["takeovers"].as_u64(), Some(kills), "{v:#}");
    let text = common::shmctl_output(&b, &socket, &["session", "inspect", "cr"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    let row: Vec<String> = vec![
        src["name"].as_str().unwrap().to_string(),
        kills.to_string(),
        "feed".into(),
        (N - 1).to_string(),
        src["duplicates"].to_string(),
        "0".into(),
    ];
    let after = text.split("takeovers:\n").nth(1).unwrap_or_default();
    let found = after
        .lines()
        .nth(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    assert_eq!(found.as_ref(), Some(&row), "inspect text:\n{text}");
    request(&socket, &json!({"cmd": "SESSION_DESTROY", "name": "cr"}));
}

/// `aegis-shmctl discover`: a consumer group of two (registered from this process) and a
/// component in no group, as a table and as JSON; an unknown session, group or component is
/// an error (exit 1), and so is asking for neither or both.
#[test]
fn discover_lists_live_members_and_the_active_one() {
    use aegis_shm_client::client::Component;
    use aegis_shm_client::protocol::{Register, Role};
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("discover");
    let socket = h.start_daemon(&b);
    let token = create_live(&socket, "dv", None);
    let token = token.as_str();
    let join = |name: &str, group: Option<&str>| {
        Component::connect(
            Some(&socket),
            Register {
                component_name: name.into(),
                session_token: token.into(),
                role: Some(Role::Consumer),
                pid: Some(std::process::id()),
                group: group.map(str::to_string),
                ..Register::default()
            },
        )
        .unwrap_or_else(|e| panic!("register {name}: {e}"))
    };
    let _members = [
        join("risk-a", Some("risk")),
        join("risk-b", Some("risk")),
        join("solo", None),
    ];
    let d = common::shmctl_json(&b, &socket, &["discover", "dv", "--group", "risk"]);
    assert_eq!(
        (&d["session"], &d["group"], &d["active"], &d["epoch"]),
        (&json!("dv"), &json!("risk"), &json!("risk-a"), &json!(1)),
        "{d:#}"
    );
    let roles: Vec<(&str, &str)> = d["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [("risk-a", "active"), ("risk-b", "standby")],
        "{d:#}"
    );
    assert_eq!(d["members"][0]["pid"], std::process::id());
    let by_member = common::shmctl_json(&b, &socket, &["discover", "dv", "--component", "risk-b"]);
    assert_eq!(by_member, d, "a member's group is its group");
    let text = common::shmctl_output(&b, &socket, &["discover", "dv", "--group", "risk"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("group risk of session dv: epoch 1, active: risk-a, 2 live members"),
        "{text}"
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let pid = std::process::id().to_string();
    assert_eq!(
        rows,
        [
            vec!["MEMBER", "PID", "ROLE", "STATE"],
            vec!["risk-a", pid.as_str(), "active", "registered"],
            vec!["risk-b", pid.as_str(), "standby", "registered"],
        ],
        "{text}"
    );
    let solo = common::shmctl_json(&b, &socket, &["discover", "dv", "--component", "solo"]);
    assert_eq!(
        (
            &solo["group"],
            &solo["active"],
            solo["members"].as_array().map(Vec::len)
        ),
        (&Value::Null, &json!("solo"), Some(1)),
        "{solo:#}"
    );
    let text = common::shmctl_output(&b, &socket, &["discover", "dv", "--component", "solo"]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("component solo of session dv: in no group, alive"),
        "{text:?}"
    );
    for (args, says) in [
        (&["discover", "nope", "--group", "risk"][..], "no_session"),
        (&["discover", "dv", "--group", "nope"][..], "no_group"),
        (
            &["discover", "dv", "--component", "nope"][..],
            "no_component",
        ),
        (&["discover", "dv"][..], "--group"),
        (
            &["discover", "dv", "--group", "risk", "--component", "solo"][..],
            "cannot be used",
        ),
    ] {
        let out = common::shmctl_output(&b, &socket, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.stdout.is_empty() && err.contains(says),
            "{args:?}: {} {err}",
            out.status
        );
    }
}

/// `session run --restart-killed 2` restarts a command that a signal killed, twice, with
/// the same command line, its index and the next incarnation in the environment, then gives
/// up (the run fails, saying so); a command that exits with a status is never restarted.
#[test]
fn session_run_restarts_only_what_a_signal_killed_and_at_most_n_times() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("restart-budget");
    let socket = h.start_daemon(&b);
    let log = h.dir.join("starts.log");
    let killed = format!(
        "echo \"$AEGIS_COMMAND_INDEX $AEGIS_INCARNATION ${{AEGIS_SESSION_TOKEN:+token}}\" >> {}; kill -9 $$",
        q(&log)
    );
    let r = common::session_run(
        &mut h,
        &b,
        &socket,
        "kb",
        "live",
        &["--restart-killed", "2"],
        &[killed],
    );
    assert!(!r.status.success(), "{:#}", r.summary);
    let c = &r.summary["components"][0];
    assert_eq!(
        (&c["restarts"], &c["signal"], &c["exit"]),
        (&json!(2), &json!(9), &json!(-1)),
        "{:#}",
        r.summary
    );
    let pids: Vec<&Value> = c["restarted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["new_pid"])
        .collect();
    assert_eq!(pids.len(), 2);
    assert_eq!(pids[1], &c["pid"], "the last restart is the last start");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "0 1 token\n0 2 token\n0 3 token\n",
        "three starts of command 0, each with the session's environment"
    );
    assert!(
        r.stderr.contains("killed by signal 9; restarted"),
        "{}",
        r.stderr
    );
    let exited = common::session_run(
        &mut h,
        &b,
        &socket,
        "ke",
        "live",
        &["--restart-killed", "2"],
        &["exit 3".to_string()],
    );
    let c = &exited.summary["components"][0];
    assert_eq!(
        (&c["restarts"], &c["signal"], &c["exit"]),
        (&json!(0), &Value::Null, &json!(3)),
        "{:#}",
        exited.summary
    );
}

/// `--restart-killed` is for live sessions: a backtest refuses it before anything starts.
#[test]
fn restart_killed_needs_a_live_session() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("restart-backtest");
    let socket = h.start_daemon(&b);
    let out = common::shmctl_output(
        &b,
        &socket,
        &[
            "session",
            "run",
            "rb",
            "--mode",
            "backtest",
            "--restart-killed",
            "1",
            "-c",
            "true",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--restart-killed needs a live session"),
        "{}: {err}",
        out.status
    );
    let list = common::shmctl_json(&b, &socket, &["session", "list"]);
    assert_eq!(list, json!([]), "nothing was created");
}

/// One failover trial: a live session with two paced replays in group `feed` under
/// `policy`, and this process as a consumer. Once 100 events are read, the active member
/// gets `fault` (SIGKILL, or SIGSTOP to hang it); returns the time from the signal to the
/// first event read from the new active (the first source seq above every one read before
/// the signal). The active replay writes one event every 5 ms and the sequencer merges each
/// within microseconds, so its ring is empty when the signal lands: an event read after it
/// comes from the new active.
fn failover_trial(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    csv: &Path,
    trial: &str,
    policy: &str,
    fault: Signal,
) -> Duration {
    use aegis_shm_client::client::Component;
    use aegis_shm_client::protocol::{Register, Role};
    use std::sync::{Arc, Mutex};
    let token = create_live(socket, trial, Some(3));
    let mut pids = Vec::new();
    for m in ["a", "b"] {
        let mut c = Command::new(&b.replay);
        c.env("AEGIS_SOCKET", socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .args([
                "--name",
                m,
                "--speed",
                "1",
                "--group",
                "feed",
                "--failover",
                policy,
            ])
            .arg(csv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        pids.push(h.spawn(&mut c, "aegis-replay"));
    }
    let comp = Component::connect(
        Some(socket),
        Register {
            component_name: "meter".into(),
            session_token: token,
            role: Some(Role::Consumer),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register the meter");
    let mut bus = comp.consumer().expect("attach the bus");
    comp.ready(WAIT).expect("the session starts");
    let seen: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut wait = aegis_shm_client::wait::Park::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match bus.next(
                    &mut wait,
                    aegis_shm_client::wait::Deadline::after(Duration::from_millis(50)),
                ) {
                    Ok(f) if f.is_eof() => break,
                    Ok(f) => seen
                        .lock()
                        .unwrap()
                        .push((Instant::now(), f.header.source_seq)),
                    Err(_) => {}
                }
            }
        })
    };
    let end = Instant::now() + WAIT;
    while seen.lock().unwrap().len() < 100 {
        assert!(
            Instant::now() < end,
            "{trial}: 100 events not read within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let v = inspect(socket, trial);
    let victim = active_pid(&v, "feed");
    let before = seen.lock().unwrap().iter().map(|x| x.1).max().unwrap();
    let t0 = Instant::now();
    kill(Pid::from_raw(victim as i32), fault).expect("signal the active member");
    let took = loop {
        if let Some(t) = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(t, s)| *t > t0 && *s > before)
            .map(|(t, _)| t.duration_since(t0))
        {
            break t;
        }
        assert!(
            t0.elapsed() < WAIT,
            "{trial}: no event from a new active within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    drop(comp);
    request(socket, &json!({"cmd": "SESSION_DESTROY", "name": trial}));
    for i in pids {
        let _ = kill(Pid::from_raw(h.pid(i) as i32), Signal::SIGCONT);
        h.kill_group(i);
    }
    took
}

/// The failover figures of the README: `cargo test --release --test failover -- --ignored
/// measure_failover --nocapture`. Per policy: 20 trials of kill -9 of the active replay,
/// and trials of a hung active (SIGSTOP, detected by missed heartbeats).
#[test]
#[ignore = "a measurement (several minutes), not a check"]
fn measure_failover() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("measure");
    let socket = h.start_daemon(&b);
    let csv = trades_csv(&h.dir, 4000, 5);
    let trials = |fault| match fault {
        Signal::SIGKILL => [20, 20, 20],
        _ => [20, 5, 5],
    };
    for fault in [Signal::SIGKILL, Signal::SIGSTOP] {
        for (p, n) in ["aggressive", "balanced", "conservative"]
            .into_iter()
            .zip(trials(fault))
        {
            let mut ms: Vec<f64> = (0..n)
                .map(|i| {
                    let name = format!("m-{fault:?}-{p}-{i}");
                    failover_trial(&mut h, &b, &socket, &csv, &name, p, fault).as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "failover {fault:?} {p}: {n} trials, p50 {:.1} ms, max {:.1} ms",
                ms[ms.len() / 2],
                ms[ms.len() - 1]
            );
        }
    }
}
