//! Binance archives as downloaded (issue 17), with real processes on real `/dev/shm`:
//! `aegis-replay FILE.zip` and `--convert OUT FILE.zip`, checked against `FILE.zip.CHECKSUM`.
//!
//! 1. Zips made here from the bundled klines and a generated trades file, with their CHECKSUM
//!    files, replay to the same digest as the plain CSVs, convert to byte-identical journals,
//!    pass `--verify --json`, and the replay prints no progress bar when stderr is a file.
//! 2. Bad archives are refused before the session hears of the replay: a corrupted byte (a
//!    checksum mismatch naming both hashes and the file), a truncated archive, two entries,
//!    an entry of another name, an oversized declared entry (a zip bomb), a malformed
//!    CHECKSUM file, and a good archive given with a bad one. Afterwards the session has no
//!    component, no source and no event.
//! 3. A CSV error inside an archive names `ARCHIVE.zip/ENTRY.csv` and the line.
//!
//! The tools are found next to `aegis-shmctl`: build the workspace first
//! (`cargo build --release --workspace`). A [`Harness`] owns every process and segment a test
//! starts and removes them on drop, even on panic. Every wait has a deadline.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

/// The bundled real klines (1440 rows).
const KLINES: &str = "BTCUSDT-1m-2024-09-21";
const N_KLINES: usize = 1440;
/// A generated trades file.
const TRADES: &str = "BTCUSDT-trades-2024-09-21";
const N_TRADES: usize = 20_000;
/// How long a failing replay may take to exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

fn bundled_klines() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/binance/{KLINES}.csv"));
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Spot `trades` rows (7 columns, no header), times in ms, some equal.
fn trades_csv() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..N_TRADES as u64 {
        let ts = 1_726_876_800_000 + i - i % 3;
        let maker = if i % 2 == 0 { "True" } else { "False" };
        s.push_str(&format!(
            "{i},63201.{:02},0.00{},0.1,{ts},{maker},True\n",
            i % 100,
            1 + i % 9
        ));
    }
    s.into_bytes()
}

/// Writes a zip at `path` holding `entries` (name, bytes), deflated.
fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let file = fs::File::create(path).expect("create zip");
    let mut w = zip::ZipWriter::new(file);
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in entries {
        w.start_file(*name, opts).expect("zip entry");
        w.write_all(bytes).expect("zip data");
    }
    w.finish().expect("finish zip");
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `ZIP.CHECKSUM` beside `zip` as Binance publishes it.
fn write_checksum(zip: &Path) -> String {
    let hash = sha256_hex(&fs::read(zip).expect("read zip"));
    let name = zip.file_name().unwrap().to_str().unwrap();
    fs::write(checksum_of(zip), format!("{hash}  {name}\n")).expect("write CHECKSUM");
    hash
}

fn checksum_of(zip: &Path) -> PathBuf {
    PathBuf::from(format!("{}.CHECKSUM", zip.display()))
}

/// A directory `sub` of the harness's, holding `STEM.csv` or `STEM.zip` (+ CHECKSUM) for the
/// klines and the trades; returns the paths, klines first.
fn inputs(h: &Harness, sub: &str, zipped: bool) -> Vec<PathBuf> {
    let dir = h.dir.join(sub);
    fs::create_dir(&dir).expect("mkdir");
    [(KLINES, bundled_klines()), (TRADES, trades_csv())]
        .into_iter()
        .map(|(stem, csv)| {
            if zipped {
                let p = dir.join(format!("{stem}.zip"));
                write_zip(&p, &[(&format!("{stem}.csv"), &csv)]);
                write_checksum(&p);
                p
            } else {
                let p = dir.join(format!("{stem}.csv"));
                fs::write(&p, &csv).expect("write CSV");
                p
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running things
// ---------------------------------------------------------------------------------------------

/// Runs `aegis-replay ARGS` to completion with no session (conversion, verification).
fn replay_tool(b: &Bins, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(&b.replay)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run aegis-replay")
}

/// Replays `files` into a new backtest session next to one digest tap; returns the run and
/// the digest.
fn digest_run(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    files: &[PathBuf],
) -> (RunOutput, String) {
    let dg = h.dir.join(format!("{name}.digest"));
    let files: Vec<String> = files.iter().map(|p| q(p)).collect();
    let commands = [
        format!("exec {} --name replay {}", q(&b.replay), files.join(" ")),
        format!(
            "exec {} --name tap --format digest --out {}",
            q(&b.tap),
            q(&dg)
        ),
    ];
    let r = session_run(h, b, socket, name, "backtest", &[], &commands);
    let digest = fs::read_to_string(&dg)
        .unwrap_or_default()
        .trim()
        .to_string();
    (r, digest)
}

/// `aegis-shmctl --socket S --json ARGS`, parsed (panics with the output if it fails).
fn ctl(b: &Bins, socket: &Path, args: &[&str]) -> Value {
    let out = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run aegis-shmctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "aegis-shmctl {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("aegis-shmctl {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// Runs `aegis-replay --name NAME FILES` as a component of the session with `token`, to its
/// exit; returns whether it succeeded and its stderr.
fn replay_component(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    token: &str,
    name: &str,
    files: &[&Path],
) -> (bool, String) {
    let err_path = h.dir.join(format!("{name}.err"));
    let mut cmd = Command::new(&b.replay);
    cmd.arg("--name")
        .arg(name)
        .args(files)
        .env("AEGIS_SOCKET", socket)
        .env("AEGIS_SESSION_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).expect("stderr file"));
    let i = h.spawn(&mut cmd, name);
    let st = h.wait(i, EXIT_DEADLINE, name, || {});
    (
        st.success(),
        fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. The same stream as the plain CSV
// ---------------------------------------------------------------------------------------------

#[test]
fn zips_replay_and_convert_exactly_like_the_plain_csv() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("zip-same");
    let plain = inputs(&h, "plain", false);
    let zips = inputs(&h, "zips", true);
    let socket = h.start_daemon(&b);

    let (r, csv_digest) = digest_run(&mut h, &b, &socket, "zip-plain", &plain);
    assert_run_ok(&h, &r, N_KLINES + N_TRADES);
    let (r, zip_digest) = digest_run(&mut h, &b, &socket, "zip-zips", &zips);
    assert_run_ok(&h, &r, N_KLINES + N_TRADES);
    assert_segments_gone(&h);
    assert!(is_digest(&csv_digest), "not a digest: {csv_digest:?}");
    assert_eq!(
        zip_digest, csv_digest,
        "the zips gave another stream than the plain CSVs"
    );
    // Stderr is a file here: no progress bar, no carriage returns, no escape sequences.
    assert!(
        !r.stderr.contains('\r') && !r.stderr.contains('\u{1b}'),
        "progress drawn on a non-terminal stderr:\n{:?}",
        r.stderr
    );

    // --convert: the same journal, byte for byte.
    for (csv, zip) in plain.iter().zip(&zips) {
        let (from_csv, from_zip) = (
            csv.with_extension("from-csv.aegisj"),
            zip.with_extension("from-zip.aegisj"),
        );
        for (input, out) in [(csv, &from_csv), (zip, &from_zip)] {
            let o = replay_tool(&b, &["--convert".as_ref(), out.as_ref(), input.as_ref()]);
            assert!(
                o.status.success(),
                "--convert {} failed:\n{}",
                input.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(
            fs::read(&from_csv).unwrap() == fs::read(&from_zip).unwrap(),
            "{} and {} converted to different journals",
            csv.display(),
            zip.display()
        );
    }

    // --verify --json: every archive checked, with its hash.
    let mut args: Vec<&std::ffi::OsStr> = vec!["--verify".as_ref(), "--json".as_ref()];
    args.extend(zips.iter().map(|p| p.as_os_str()));
    let o = replay_tool(&b, &args);
    let v: Value = serde_json::from_slice(&o.stdout).expect("--verify --json prints JSON");
    assert!(o.status.success(), "--verify failed: {v}");
    assert_eq!(v["ok"], true, "{v}");
    for (f, zip) in v["files"].as_array().expect("files").iter().zip(&zips) {
        assert_eq!(f["ok"], true, "{v}");
        assert_eq!(
            f["sha256"].as_str(),
            Some(sha256_hex(&fs::read(zip).unwrap()).as_str()),
            "{v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Bad archives: refused before anything reaches the session
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_archives_are_refused_before_anything_reaches_the_session() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("zip-bad");
    let socket = h.start_daemon(&b);
    let token = ctl(
        &b,
        &socket,
        &["session", "create", "zip-bad", "--mode", "backtest"],
    )["token"]
        .as_str()
        .expect("token")
        .to_string();
    let info = ctl(&b, &socket, &["session", "inspect", "zip-bad"]);
    if let Some(sid) = info["segments"]["bus"]
        .as_str()
        .and_then(|bus| Path::new(bus).file_name()?.to_str())
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }

    let klines = bundled_klines();
    let entry = format!("{KLINES}.csv");
    let dir = h.dir.join("bad");
    fs::create_dir(&dir).expect("mkdir");
    let case = |name: &str| {
        let d = dir.join(name);
        fs::create_dir(&d).expect("mkdir");
        d.join(format!("{KLINES}.zip"))
    };

    // A good archive, with its CHECKSUM.
    let good = case("good");
    write_zip(&good, &[(&entry, &klines)]);
    write_checksum(&good);

    // One byte changed after the CHECKSUM was written.
    let corrupt = case("corrupt");
    write_zip(&corrupt, &[(&entry, &klines)]);
    let published = write_checksum(&corrupt);
    let mut bytes = fs::read(&corrupt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    fs::write(&corrupt, &bytes).unwrap();
    let actual = sha256_hex(&bytes);

    // Cut short (no CHECKSUM: the archive itself must say so).
    let truncated = case("truncated");
    write_zip(&truncated, &[(&entry, &klines)]);
    let whole = fs::read(&truncated).unwrap();
    fs::write(&truncated, &whole[..whole.len() * 2 / 3]).unwrap();

    let two = case("two");
    write_zip(&two, &[(&entry, &klines), ("notes.txt", b"two entries")]);

    let renamed = case("renamed");
    write_zip(&renamed, &[("BTCUSDT-1m-2024-09-22.csv", &klines)]);

    // 8 MiB of blank lines: it deflates about 1000 times.
    let bomb = case("bomb");
    write_zip(&bomb, &[(&entry, &vec![b'\n'; 8 << 20])]);

    let malformed = case("malformed");
    write_zip(&malformed, &[(&entry, &klines)]);
    fs::write(checksum_of(&malformed), "not a checksum\n").unwrap();

    let cases: [(&str, Vec<&Path>, Vec<String>); 7] = [
        (
            "corrupt",
            vec![&corrupt],
            vec![
                "checksum mismatch".into(),
                published.clone(),
                actual.clone(),
                corrupt.display().to_string(),
            ],
        ),
        (
            "truncated",
            vec![&truncated],
            vec!["truncated or damaged".into()],
        ),
        (
            "two",
            vec![&two],
            vec!["2 entries".into(), "notes.txt".into()],
        ),
        (
            "renamed",
            vec![&renamed],
            vec!["BTCUSDT-1m-2024-09-22.csv".into(), entry.clone()],
        ),
        ("bomb", vec![&bomb], vec!["zip bomb".into()]),
        (
            "malformed",
            vec![&malformed],
            vec!["malformed CHECKSUM".into()],
        ),
        // The good archive is not replayed while the other is refused.
        (
            "good-then-bad",
            vec![&good, &corrupt],
            vec!["checksum mismatch".into()],
        ),
    ];
    for (name, files, want) in &cases {
        let (ok, err) = replay_component(&mut h, &b, &socket, &token, name, files);
        assert!(!ok, "{name}: aegis-replay succeeded; stderr:\n{err}");
        for w in want {
            assert!(
                err.contains(w.as_str()),
                "{name}: the error should contain {w:?}; stderr:\n{err}"
            );
        }
        assert!(
            !err.contains("panicked"),
            "{name}: a panic, not an error:\n{err}"
        );
    }

    // None of them registered: no component, no source, no event.
    let info = ctl(&b, &socket, &["session", "inspect", "zip-bad"]);
    assert_eq!(info["state"], "created", "{info:#}");
    assert_eq!(info["components"], serde_json::json!([]), "{info:#}");
    assert_eq!(info["sources"], serde_json::json!([]), "{info:#}");
    assert_eq!(info["sequencer"]["events_merged"], 0, "{info:#}");

    // The good archive alone is accepted (so the refusals above were the archives' doing),
    // and --no-verify replays past a bad CHECKSUM file.
    for (name, args) in [
        ("good", vec![good.as_os_str()]),
        (
            "no-verify",
            vec!["--no-verify".as_ref(), malformed.as_os_str()],
        ),
    ] {
        let out = replay_tool(
            &b,
            &[
                &[
                    "--convert".as_ref(),
                    dir.join(format!("{name}.aegisj")).as_os_str(),
                ][..],
                &args[..],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{name}: --convert failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // --verify reports each archive and fails if any fails.
    let o = replay_tool(
        &b,
        &[
            "--verify".as_ref(),
            "--json".as_ref(),
            good.as_os_str(),
            corrupt.as_os_str(),
            two.as_os_str(),
        ],
    );
    assert!(!o.status.success(), "--verify of a corrupt archive passed");
    let v: Value = serde_json::from_slice(&o.stdout).expect("--verify --json prints JSON");
    let oks: Vec<&Value> = v["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| &f["ok"])
        .collect();
    assert_eq!(
        oks,
        [&Value::Bool(true), &Value::Bool(false), &Value::Bool(false)],
        "{v}"
    );
    let e = v["files"][1]["error"].as_str().unwrap_or_default();
    assert!(e.contains(&published) && e.contains(&actual), "{v}");
    // An archive without a CHECKSUM file has nothing to be verified against.
    let o = replay_tool(&b, &["--verify".as_ref(), two.as_os_str()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nothing to verify against"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 3. A CSV error inside an archive
// ---------------------------------------------------------------------------------------------

#[test]
fn a_csv_error_inside_an_archive_names_the_entry_and_the_line() {
    let _g = serial();
    let b = bins();
    let h = Harness::new("zip-csv");
    let text = String::from_utf8(bundled_klines()).expect("UTF-8");
    let mut lines: Vec<&str> = text.lines().collect();
    // Line 7, column 2 (open).
    let mut cols: Vec<&str> = lines[6].split(',').collect();
    cols[1] = "abc";
    let bad_line = cols.join(",");
    lines[6] = &bad_line;
    let csv = lines.join("\n") + "\n";
    let zip = h.dir.join(format!("{KLINES}.zip"));
    write_zip(&zip, &[(&format!("{KLINES}.csv"), csv.as_bytes())]);
    write_checksum(&zip);
    let journal = h.dir.join("bad.aegisj");
    let o = replay_tool(&b, &["--convert".as_ref(), journal.as_ref(), zip.as_ref()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a bad line converted:\n{err}");
    let want = format!(
        "{}: line 7, column 2 (open): \"abc\"",
        zip.join(format!("{KLINES}.csv")).display()
    );
    assert!(err.contains(&want), "want {want:?} in:\n{err}");
    assert!(!journal.exists(), "a failed --convert left a journal");
}
