//! Recording (SPEC section 11) with real processes: `session run --record`, `record verify`,
//! live laps, a full disk (a real 1 MiB tmpfs), `kill -9` of the daemon mid-recording, and
//! recordings that are corrupt, truncated or from a future version.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const KLINES_1M: &str = "data/binance/BTCUSDT-1m-2024-09-21.csv";
const KLINES_1H: &str = "data/binance/BTCUSDT-1h-2024-08.csv";
/// Events in the two files.
const EVENTS: u64 = 1440 + 744;
const DEADLINE: Duration = Duration::from_secs(60);

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `aegis-shmctl ARGS` under the guard: (success, stdout, stderr).
fn shmctl(h: &mut Harness, b: &Bins, args: &[&str]) -> (bool, String, String) {
    let n = h.groups.len();
    let out = h.dir.join(format!("shmctl-{n}.out"));
    let err = h.dir.join(format!("shmctl-{n}.err"));
    let i = h.spawn(
        Command::new(&b.shmctl)
            .arg("--socket")
            .arg(h.socket())
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap()),
        "aegis-shmctl",
    );
    let st = h.wait(i, DEADLINE, &format!("aegis-shmctl {args:?}"), || {});
    (
        st.success(),
        fs::read_to_string(out).unwrap_or_default(),
        fs::read_to_string(err).unwrap_or_default(),
    )
}

/// `record verify DIR --json`: Ok(report) or Err(stderr).
fn verify(h: &mut Harness, b: &Bins, dir: &Path) -> Result<Value, String> {
    let (ok, out, err) = shmctl(h, b, &["--json", "record", "verify", dir.to_str().unwrap()]);
    if ok {
        Ok(serde_json::from_str(&out).unwrap_or_else(|e| panic!("verify --json: {e}: {out}")))
    } else {
        Err(err)
    }
}

fn replay_cmd(b: &Bins, extra: &str) -> String {
    format!(
        "{} {extra} {} {}",
        q(&b.replay),
        q(&data(KLINES_1M)),
        q(&data(KLINES_1H))
    )
}

/// A backtest of both kline files recorded into `rec` (small segments, so that it rolls).
fn record_backtest(h: &mut Harness, b: &Bins, socket: &Path, rec: &Path) -> RunOutput {
    let tap = format!("{} --format digest", q(&b.tap));
    let r = session_run(
        h,
        b,
        socket,
        "bt",
        "backtest",
        &[
            "--record",
            rec.to_str().unwrap(),
            "--record-segment-bytes",
            "65536",
        ],
        &[replay_cmd(b, ""), tap],
    );
    assert_run_ok(h, &r, EVENTS as usize);
    r
}

#[test]
fn backtest_recording_is_complete_and_verifies() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-bt");
    let socket = h.start_daemon(&b);
    let rec = h.dir.join("rec");
    let r = record_backtest(&mut h, &b, &socket, &rec);
    let inspect = &r.summary["session"]["recording"];
    assert_eq!(inspect["state"], "complete", "{inspect}");
    assert_eq!(inspect["frames"], EVENTS + 1, "{inspect}");
    assert_eq!(inspect["next_seq"], EVENTS + 1, "{inspect}");
    assert_eq!(inspect["gaps"], 0);
    let v = verify(&mut h, &b, &rec).expect("a complete recording verifies");
    assert_eq!(v["state"], "complete");
    assert_eq!(v["frames"], EVENTS + 1);
    assert_eq!(v["events"], EVENTS);
    assert_eq!(v["seq_range"], serde_json::json!([0, EVENTS]));
    assert_eq!(v["ended"], true);
    assert_eq!(v["aborted"], false);
    assert_eq!(v["gaps"], serde_json::json!([]));
    assert_eq!(v["torn_tail"], Value::Null);
    let segs = v["segments"].as_array().unwrap();
    assert!(segs.len() > 1, "64 KiB segments roll: {v}");
    assert!(segs.iter().all(|s| s["complete"] == true), "{v}");
    // A second recording into the same directory is refused, before anything runs.
    let (ok, _, err) = shmctl(
        &mut h,
        &b,
        &[
            "session",
            "create",
            "again",
            "--mode",
            "backtest",
            "--record",
            rec.to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("already holds a recording"), "{err}");
    // An unwritable directory is refused too.
    let (ok, _, err) = shmctl(
        &mut h,
        &b,
        &[
            "session",
            "create",
            "ro",
            "--mode",
            "live",
            "--record",
            "/proc/aegis-cannot-record-here",
        ],
    );
    assert!(!ok && err.contains("recording directory"), "{err}");
}

#[test]
fn a_small_live_bus_that_laps_the_recorder_records_the_gap() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-lap");
    let socket = h.start_daemon(&b);
    let rec = h.dir.join("rec");
    // A 4 KiB bus holds about 17 klines; an unpaced replay laps every reader many times.
    let tap = format!("{} --format count --out /dev/null", q(&b.tap));
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "lap",
        "live",
        &["--bus-bytes", "4096", "--record", rec.to_str().unwrap()],
        &[replay_cmd(&b, ""), tap],
    );
    assert!(r.status.success(), "{}\n{}", r.summary, r.stderr);
    let inspect = r.summary["session"]["recording"].clone();
    let v = verify(&mut h, &b, &rec).expect("a recording with gaps verifies");
    let missed = v["missed"].as_u64().unwrap();
    let gaps = v["gaps"].as_array().unwrap();
    // Nothing hidden: recorded frames and missed frames add up to the whole bus.
    assert_eq!(v["frames"].as_u64().unwrap() + missed, EVENTS + 1, "{v}");
    assert_eq!(v["seq_range"], serde_json::json!([0, EVENTS]), "{v}");
    assert_eq!(inspect["missed"], missed, "{inspect}");
    assert_eq!(inspect["gaps"].as_u64().unwrap() as usize, gaps.len());
    assert!(
        missed > 0 && !gaps.is_empty(),
        "the recorder was never lapped on a 4 KiB bus: {v}"
    );
    assert_eq!(v["state"], "incomplete", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("lapped the recorder"),
        "{v}"
    );
    let sum: u64 = gaps
        .iter()
        .map(|g| g["to"].as_u64().unwrap() - g["from"].as_u64().unwrap() + 1)
        .sum();
    assert_eq!(sum, missed);
    // Replayed, it gives what it holds, renumbered, and says what is missing first.
    let events = v["events"].as_u64().unwrap();
    let (r, _, nd) = replay_recording(&mut h, &b, &socket, "replay-gaps", &rec, "");
    assert_run_ok(&h, &r, events as usize);
    let (seqs, _) = unseq(&read(&nd));
    assert_eq!(seqs, (0..events).collect::<Vec<_>>());
    let g0 = &gaps[0];
    let said = format!("missed bus seqs {}..={}", g0["from"], g0["to"]);
    assert!(r.stderr.contains(&said), "{said} not said: {}", r.stderr);
}

/// Unmounts the tmpfs (and removes its mount point) even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_a_backtest_and_marks_a_live_recording_incomplete() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-full");
    let Some(disk) = Tmpfs::mount(h.dir.join("small"), "640k") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let socket = h.start_daemon(&b);
    // 256 KiB segments on a 640 KiB file system: two fit, the reservation of the third
    // does not (the recording is 524,208 bytes of frames, a little more than two segments).
    let bt_dir = disk.0.join("bt");
    let tap = format!("{} --format digest", q(&b.tap));
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "full-bt",
        "backtest",
        &[
            "--record",
            bt_dir.to_str().unwrap(),
            "--record-segment-bytes",
            "262144",
        ],
        &[replay_cmd(&b, ""), tap.clone()],
    );
    let s = &r.summary["session"];
    assert!(
        !r.status.success(),
        "a backtest whose recording fails must fail: {}\n{}",
        r.summary,
        tail(&h.dir.join("daemon.log"), 2000)
    );
    assert_eq!(s["state"], "failed", "{s}");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("No space left on device") && reason.contains("00000002.seg"),
        "{reason}"
    );
    fs::remove_dir_all(&bt_dir).unwrap();
    // Live: the bus goes on, every component succeeds, the recording says it is incomplete.
    let live_dir = disk.0.join("live");
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "full-live",
        "live",
        &[
            "--record",
            live_dir.to_str().unwrap(),
            "--record-segment-bytes",
            "262144",
        ],
        &[replay_cmd(&b, "--speed 200000"), tap],
    );
    assert!(r.status.success(), "{}\n{}", r.summary, r.stderr);
    let rec = &r.summary["session"]["recording"];
    assert_eq!(rec["state"], "incomplete", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device"),
        "{rec}"
    );
    let m: Value = serde_json::from_slice(&fs::read(live_dir.join("manifest.json")).unwrap())
        .expect("the manifest is still written");
    assert_eq!(m["state"], "incomplete", "{m}");
    let v = verify(&mut h, &b, &live_dir).expect("what was written verifies");
    assert_eq!(v["ended"], false, "{v}");
    assert!(v["frames"].as_u64().unwrap() > 0, "{v}");
}

/// A live session recorded while its replay is paced; the daemon is killed with SIGKILL
/// once some frames are recorded. Returns the recording's directory.
fn crash_mid_recording(h: &mut Harness, b: &Bins) -> PathBuf {
    let socket = h.start_daemon(b);
    let rec = h.dir.join("rec-crash");
    let (ok, out, err) = shmctl(
        h,
        b,
        &[
            "--json",
            "session",
            "create",
            "crash",
            "--mode",
            "live",
            "--expect",
            "2",
            "--record",
            rec.to_str().unwrap(),
            "--record-segment-bytes",
            "65536",
        ],
    );
    assert!(ok, "{out}{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    for (program, args, name) in [
        (&b.replay, vec!["--speed", "20000"], "feed"),
        (
            &b.tap,
            vec!["--format", "count", "--out", "/dev/null"],
            "tap",
        ),
    ] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        if name == "feed" {
            args.push(data(KLINES_1M).to_str().unwrap().to_string());
        }
        let log = fs::File::create(h.dir.join(format!("{name}.log"))).unwrap();
        h.spawn(
            Command::new(program)
                .args(&args)
                .env("AEGIS_SOCKET", &socket)
                .env("AEGIS_SESSION_TOKEN", &token)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
            name,
        );
    }
    let end = Instant::now() + DEADLINE;
    loop {
        let (_, out, _) = shmctl(h, b, &["--json", "session", "inspect", "crash"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if let Some(sid) = v["segments"]["bus"]
            .as_str()
            .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
            .as_deref()
            .and_then(sid_of)
        {
            h.sids.insert(sid.to_string());
        }
        if v["recording"]["frames"].as_u64().unwrap_or(0) > 300 {
            break;
        }
        assert!(
            Instant::now() < end,
            "nothing recorded within {DEADLINE:?}: {out}\n{}",
            tail(&h.dir.join("daemon.log"), 2000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = h.daemon.as_mut().expect("the daemon runs");
    d.kill().expect("SIGKILL the daemon");
    let _ = d.wait();
    h.daemon = None;
    rec
}

#[test]
fn kill_9_of_the_daemon_leaves_a_recording_readable_to_its_last_complete_frame() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-crash");
    let rec = crash_mid_recording(&mut h, &b);
    let v = verify(&mut h, &b, &rec).expect("a crashed recording verifies");
    assert_eq!(v["state"], "recording", "{v}");
    assert_eq!(v["ended"], false, "{v}");
    let frames = v["frames"].as_u64().unwrap();
    assert!((300..=1440).contains(&frames), "{v}");
    assert_eq!(v["seq_range"], serde_json::json!([0, frames - 1]), "{v}");
    // A torn tail made by hand: half a frame after the last complete one.
    let segs = v["segments"].as_array().unwrap();
    let last = segs.last().unwrap();
    let path = rec.join(last["file"].as_str().unwrap());
    let at = 64 + last["bytes"].as_u64().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x30, 0, 0, 0, 1, 0, 0, 0, 7, 7, 7], at)
        .unwrap();
    let v = verify(&mut h, &b, &rec).expect("a torn tail is reported, not an error");
    assert_eq!(v["frames"], frames, "{v}");
    assert_eq!(v["torn_tail"]["offset"], at, "{v}");
    assert_eq!(v["torn_tail"]["bytes"], 11, "{v}");
    // What was complete replays (a new daemon: the old one is gone), torn tail ignored.
    let socket = h.start_daemon(&b);
    let (r, _, nd) = replay_recording(&mut h, &b, &socket, "after-crash", &rec, "");
    assert_run_ok(&h, &r, frames as usize);
    let (seqs, _) = unseq(&read(&nd));
    assert_eq!(seqs, (0..frames).collect::<Vec<_>>());
    assert!(
        r.stderr.contains("the recording was not closed"),
        "no warning: {}",
        r.stderr
    );
}

#[test]
fn corrupt_truncated_and_future_recordings_are_refused_clearly() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-bad");
    let socket = h.start_daemon(&b);
    let good = h.dir.join("good");
    record_backtest(&mut h, &b, &socket, &good);
    let variant = |h: &Harness, name: &str| {
        let d = h.dir.join(name);
        fs::create_dir(&d).unwrap();
        for e in fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "no-manifest",
            Box::new(|d| fs::remove_file(d.join("manifest.json")).unwrap()),
            "not an Aegis recording",
        ),
        (
            "garbage-manifest",
            Box::new(|d| fs::write(d.join("manifest.json"), b"{\"version\":1,").unwrap()),
            "bad manifest",
        ),
        (
            "future-manifest",
            Box::new(|d| {
                let m = fs::read_to_string(d.join("manifest.json")).unwrap();
                fs::write(
                    d.join("manifest.json"),
                    m.replace("\"version\": 1", "\"version\": 7"),
                )
                .unwrap()
            }),
            "manifest version 7",
        ),
        (
            "declarations-short",
            Box::new(|d| {
                let p = d.join("manifest.json");
                let mut m: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
                m["declared"].as_array_mut().expect("declared").pop();
                fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap()
            }),
            "sources but",
        ),
        (
            "future-segment",
            Box::new(|d| patch(&d.join("00000000.seg"), 8, &[9])),
            "journal layout version 9",
        ),
        (
            "not-a-segment",
            Box::new(|d| patch(&d.join("00000001.seg"), 0, b"XX")),
            "bad magic",
        ),
        (
            "flipped-payload",
            Box::new(|d| patch(&d.join("00000000.seg"), 64 + 48 + 20, &[0xff])),
            "checksum mismatch",
        ),
        (
            "truncated-segment",
            Box::new(|d| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("00000002.seg"))
                    .unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 100).unwrap();
            }),
            "00000002.seg: corrupt",
        ),
        (
            "missing-segment",
            Box::new(|d| fs::remove_file(d.join("00000003.seg")).unwrap()),
            "00000003.seg: corrupt at byte 0: listed in the manifest, but missing",
        ),
    ];
    for (name, damage, want) in cases {
        let d = variant(&h, name);
        damage(&d);
        match verify(&mut h, &b, &d) {
            Err(err) => assert!(err.contains(want), "{name}: {err}"),
            Ok(v) => panic!("{name}: verified: {v}"),
        }
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
}

/// Two taps for a run: a digest and NDJSON, each to a file under the harness named after
/// `tag`. Returns the commands and the two paths.
fn taps(h: &Harness, b: &Bins, tag: &str) -> (Vec<String>, PathBuf, PathBuf) {
    let (dg, nd) = (
        h.dir.join(format!("{tag}.digest")),
        h.dir.join(format!("{tag}.ndjson")),
    );
    let cmds = vec![
        format!(
            "exec {} --name {tag}-digest --format digest --out {}",
            q(&b.tap),
            q(&dg)
        ),
        format!(
            "exec {} --name {tag}-ndjson --format ndjson --out {}",
            q(&b.tap),
            q(&nd)
        ),
    ];
    (cmds, dg, nd)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The NDJSON lines of a tap without their `"seq":N,` prefix, and the seqs.
fn unseq(ndjson: &str) -> (Vec<u64>, Vec<String>) {
    ndjson
        .lines()
        .map(|l| {
            let rest = l.strip_prefix("{\"seq\":").expect("a line starts with seq");
            let comma = rest.find(',').expect("seq is followed by a field");
            (
                rest[..comma].parse::<u64>().expect("seq is a number"),
                rest[comma + 1..].to_string(),
            )
        })
        .unzip()
}

/// `aegis-replay DIR [EXTRA]` into a backtest session with the two taps of [`taps`]:
/// (the run, the digest file, the NDJSON file).
fn replay_recording(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    rec: &Path,
    extra: &str,
) -> (RunOutput, PathBuf, PathBuf) {
    let (mut cmds, dg, nd) = taps(h, b, name);
    cmds.insert(0, format!("exec {} {extra} {}", q(&b.replay), q(rec)));
    let r = session_run(h, b, socket, name, "backtest", &[], &cmds);
    (r, dg, nd)
}

#[test]
fn replay_of_a_recording_equals_the_recorded_bus_and_windows_slice_it() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-replay");
    let socket = h.start_daemon(&b);
    let rec = h.dir.join("rec");
    // Four sources (the 1m file three times under other names), so that the recording
    // spans several index entries (one per MiB).
    let (mut cmds, dg, nd) = taps(&h, &b, "orig");
    for s in ["a", "b", "c"] {
        cmds.push(format!(
            "exec {} --source {s} {}",
            q(&b.replay),
            q(&data(KLINES_1M))
        ));
    }
    cmds.push(format!("exec {} {}", q(&b.replay), q(&data(KLINES_1H))));
    let events = 3 * 1440 + 744;
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "orig",
        "backtest",
        &[
            "--record",
            rec.to_str().unwrap(),
            "--record-segment-bytes",
            "262144",
        ],
        &cmds,
    );
    assert_run_ok(&h, &r, events);
    let v = verify(&mut h, &b, &rec).expect("verifies");
    assert!(v["index_entries"].as_u64().unwrap() >= 2, "{v}");
    let (orig_digest, orig_nd) = (read(&dg), read(&nd));
    assert!(is_digest(orig_digest.trim()), "{orig_digest}");
    assert_eq!(orig_nd.lines().count(), events);

    // The whole recording, replayed: the same bus.
    let (r, dg, nd) = replay_recording(&mut h, &b, &socket, "whole", &rec, "");
    assert_run_ok(&h, &r, events);
    assert_eq!(read(&dg), orig_digest, "the replay's digest differs");
    assert!(read(&nd) == orig_nd, "the replay's NDJSON differs");
    // The session has the recorded names and topics.
    let s = &r.summary["session"];
    assert_eq!(
        s["topics"],
        serde_json::json!({"klines.BTCUSDT.1h": 0, "klines.BTCUSDT.1m": 1}),
        "{s}"
    );

    // A window: from the ts of one event to the ts of a later one. The replay is the slice
    // of the recorded bus from the first event at or after FROM to the last before the
    // first event after TO, with bus seqs from 0.
    let (seqs, lines) = unseq(&orig_nd);
    assert_eq!(seqs, (0..events as u64).collect::<Vec<_>>());
    let ts = |l: &str| -> u64 {
        let v: Value = serde_json::from_str(&format!("{{{l}")).unwrap();
        v["ts"].as_u64().unwrap()
    };
    let (from, to) = (ts(&lines[1000]), ts(&lines[4000]));
    let start = lines.iter().position(|l| ts(l) >= from).unwrap();
    let end = lines.iter().position(|l| ts(l) > to).unwrap_or(lines.len());
    let want = &lines[start..end];
    assert!(want.len() > 2000, "a window of {} events", want.len());
    let extra = format!("--from {from} --to {to}");
    let (r, _, nd) = replay_recording(&mut h, &b, &socket, "window", &rec, &extra);
    assert_run_ok(&h, &r, want.len());
    let (seqs, got) = unseq(&read(&nd));
    assert_eq!(seqs, (0..want.len() as u64).collect::<Vec<_>>());
    assert!(
        got == want,
        "the window is not the slice of the recorded bus"
    );

    // A recording replays into a backtest only, alone, and a bad one is refused up front.
    let (ok, out, err) = shmctl(
        &mut h,
        &b,
        &["--json", "session", "create", "lv", "--mode", "live"],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let log = h.dir.join("replay-live.log");
    let i = h.spawn(
        Command::new(&b.replay)
            .arg(&rec)
            .env("AEGIS_SOCKET", &socket)
            .env("AEGIS_SESSION_TOKEN", created["token"].as_str().unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap()),
        "aegis-replay into a live session",
    );
    let st = h.wait(i, DEADLINE, "aegis-replay into a live session", || {});
    assert!(!st.success());
    let err = read(&log);
    assert!(
        err.contains("into a backtest session, not a live one"),
        "{err}"
    );
    let mut cmds = vec![
        format!("exec {} {}", q(&b.replay), q(&rec)),
        format!("exec {} {}", q(&b.replay), q(&data(KLINES_1H))),
    ];
    cmds.extend(taps(&h, &b, "mixed").0);
    let r = session_run(&mut h, &b, &socket, "mixed", "backtest", &[], &cmds);
    assert!(!r.status.success());
    assert!(r.stderr.contains("only source"), "{}", r.stderr);
    let bad = h.dir.join("not-a-recording");
    fs::create_dir(&bad).unwrap();
    let (r, _, _) = replay_recording(&mut h, &b, &socket, "bad", &bad, "");
    assert!(!r.status.success());
    assert!(
        r.stderr.contains("not an Aegis recording")
            || r.summary.to_string().contains("not an Aegis recording"),
        "{}\n{}",
        r.summary,
        r.stderr
    );
}

/// A tap process under the guard, its output in a file: (guard index, output path).
fn spawn_tap(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    token: &str,
    name: &str,
    format: &str,
    extra: &[&str],
) -> (usize, PathBuf) {
    let out = h.dir.join(format!("{name}.{format}"));
    let log = fs::File::create(h.dir.join(format!("{name}.log"))).unwrap();
    let i = h.spawn(
        Command::new(&b.tap)
            .args(["--name", name, "--format", format, "--out"])
            .arg(&out)
            .args(extra)
            .env("AEGIS_SOCKET", socket)
            .env("AEGIS_SESSION_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
        name,
    );
    (i, out)
}

/// `session inspect NAME --json`, and the session's segments taken into the guard's care.
fn inspect(h: &mut Harness, b: &Bins, name: &str) -> Value {
    let (_, out, _) = shmctl(h, b, &["--json", "session", "inspect", name]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    if let Some(sid) = v["segments"]["bus"]
        .as_str()
        .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
        .as_deref()
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }
    v
}

/// What a recorded live run left: the recording, the early taps' digest and NDJSON, and
/// those of the late taps (with `--catch-up`), if any.
struct LiveRun {
    rec: PathBuf,
    digest: String,
    ndjson: String,
    late: Option<(String, String, Value)>,
}

/// A live session recorded into DIR/rec-live: three producers paced with `--speed` (two
/// files of different months, so that bounded lateness lets LATE events through), two taps
/// from the start (digest, NDJSON). With `catch_up`, two `--catch-up` taps start once a
/// third of the stream is recorded. With `lap`, the bus is 64 KiB (about 300 klines) and the
/// catch-up taps are stopped (SIGSTOP) for 1.5 s soon after they start, so that the live bus
/// laps them (about 1400 events go by).
fn live_recorded(h: &mut Harness, b: &Bins, catch_up: bool, lap: bool) -> LiveRun {
    let socket = h.start_daemon(b);
    let rec = h.dir.join("rec-live");
    let (ok, out, err) = shmctl(
        h,
        b,
        &[
            "--json",
            "session",
            "create",
            "live",
            "--mode",
            "live",
            "--expect",
            "5",
            "--record",
            rec.to_str().unwrap(),
            "--record-segment-bytes",
            "65536",
            "--bus-bytes",
            if lap { "65536" } else { "4194304" },
        ],
    );
    assert!(ok, "{out}{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    inspect(h, b, "live");
    let mut producers = Vec::new();
    // About 4 s each.
    for (name, speed, file) in [
        ("a", "20000", KLINES_1M),
        ("b", "25000", KLINES_1M),
        ("c", "600000", KLINES_1H),
    ] {
        let log = fs::File::create(h.dir.join(format!("feed-{name}.log"))).unwrap();
        producers.push(
            h.spawn(
                Command::new(&b.replay)
                    .args(["--source", name, "--name", &format!("feed-{name}")])
                    .args(["--speed", speed])
                    .arg(data(file))
                    .env("AEGIS_SOCKET", &socket)
                    .env("AEGIS_SESSION_TOKEN", &token)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log),
                name,
            ),
        );
    }
    let (t1, digest) = spawn_tap(h, b, &socket, &token, "early-d", "digest", &[]);
    let (t2, ndjson) = spawn_tap(h, b, &socket, &token, "early-n", "ndjson", &[]);
    let total = 2 * 1440 + 744;
    let mut late = Vec::new();
    if catch_up {
        let end = Instant::now() + DEADLINE;
        loop {
            let v = inspect(h, b, "live");
            if v["recording"]["frames"].as_u64().unwrap_or(0) > total / 3 {
                break;
            }
            assert!(Instant::now() < end, "nothing recorded: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        late.push(spawn_tap(
            h,
            b,
            &socket,
            &token,
            "late-d",
            "digest",
            &["--catch-up", "--json"],
        ));
        late.push(spawn_tap(
            h,
            b,
            &socket,
            &token,
            "late-n",
            "ndjson",
            &["--catch-up"],
        ));
        if lap {
            // Stopped once both are registered (attached to the bus right after their ACK).
            let end = Instant::now() + DEADLINE;
            loop {
                let v = inspect(h, b, "live");
                let names: Vec<&str> = v["consumers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
                    .unwrap_or_default();
                if names.contains(&"late-d") && names.contains(&"late-n") {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "the catch-up taps did not register: {v}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            let pids: Vec<_> = late
                .iter()
                .map(|l| Pid::from_raw(h.pid(l.0) as i32))
                .collect();
            for p in &pids {
                kill(*p, Signal::SIGSTOP).unwrap();
            }
            std::thread::sleep(Duration::from_millis(1500));
            for p in &pids {
                kill(*p, Signal::SIGCONT).unwrap();
            }
        }
    }
    for i in producers
        .into_iter()
        .chain([t1, t2])
        .chain(late.iter().map(|l| l.0))
    {
        let st = h.wait(i, DEADLINE, "a component of the live session", || {});
        if !st.success() {
            let logs: Vec<String> = ["late-d", "late-n", "early-d", "early-n", "feed-a", "daemon"]
                .iter()
                .map(|n| format!("{n}.log:\n{}", tail(&h.dir.join(format!("{n}.log")), 1500)))
                .collect();
            panic!("a component failed ({st}):\n{}", logs.join("\n"));
        }
    }
    let v = inspect(h, b, "live");
    assert_eq!(v["state"], "finished", "{v}");
    assert_eq!(v["recording"]["state"], "complete", "{v}");
    assert_eq!(v["recording"]["missed"], 0, "{v}");
    let late = match late.as_slice() {
        [(_, d), (_, n)] => Some((
            read(d),
            read(n),
            serde_json::from_str(
                tail(&h.dir.join("late-d.log"), 4000)
                    .lines()
                    .rfind(|l| l.starts_with('{'))
                    .unwrap_or("null"),
            )
            .unwrap_or(Value::Null),
        )),
        _ => None,
    };
    LiveRun {
        rec,
        digest: read(&digest),
        ndjson: read(&ndjson),
        late,
    }
}

#[test]
fn replay_of_a_live_recording_equals_the_live_bus_late_flags_included() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-live");
    let run = live_recorded(&mut h, &b, false, false);
    assert!(run.late.is_none());
    let total = 2 * 1440 + 744;
    assert_eq!(run.ndjson.lines().count(), total);
    let late = run.ndjson.matches("\"late\":true").count();
    assert!(
        late > 0,
        "no LATE event in the live run: the test shows nothing"
    );
    let socket = h.socket();
    let (r, dg, nd) = replay_recording(&mut h, &b, &socket, "replay", &run.rec, "");
    assert_run_ok(&h, &r, total);
    assert_eq!(
        read(&dg),
        run.digest,
        "the replay's digest differs from the live tap's"
    );
    assert!(
        read(&nd) == run.ndjson,
        "the replay's NDJSON differs from the live tap's"
    );
    assert_eq!(
        r.summary["session"]["sequencer"]["late_events"], late as u64,
        "{}",
        r.summary
    );
}

#[test]
fn a_catch_up_tap_started_mid_way_equals_an_early_tap_and_the_replay() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-catch-up");
    let run = live_recorded(&mut h, &b, true, false);
    let total = 2 * 1440 + 744;
    assert_eq!(run.ndjson.lines().count(), total);
    let (late_digest, late_ndjson, stats) = run.late.expect("late taps ran");
    assert_eq!(
        late_digest, run.digest,
        "the catch-up tap's digest differs: {stats}"
    );
    assert!(
        late_ndjson == run.ndjson,
        "the catch-up tap's NDJSON differs"
    );
    let recorded = stats["catch_up"]["recorded_events"].as_u64().unwrap_or(0);
    assert!(
        recorded > 0 && recorded < total as u64,
        "the catch-up tap read {recorded} events from the recording: {stats}"
    );
    eprintln!("catch-up tap: {stats}");
    let socket = h.socket();
    let (r, dg, nd) = replay_recording(&mut h, &b, &socket, "replay", &run.rec, "");
    assert_run_ok(&h, &r, total);
    assert_eq!(read(&dg), run.digest);
    assert!(read(&nd) == run.ndjson);
}

#[test]
fn a_catch_up_tap_lapped_by_the_live_bus_reads_the_recording_again_and_misses_nothing() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("rec-catch-up-lap");
    let run = live_recorded(&mut h, &b, true, true);
    let total = 2 * 1440 + 744;
    assert_eq!(
        run.ndjson.lines().count(),
        total,
        "the early tap was lapped too"
    );
    let (late_digest, late_ndjson, stats) = run.late.expect("late taps ran");
    let log = read(&h.dir.join("late-d.log"));
    assert!(
        log.contains("lapped by the live bus"),
        "the catch-up tap was not lapped: {log}"
    );
    assert_eq!(stats["missed"], 0, "{stats}");
    assert_eq!(late_digest, run.digest, "{log}");
    assert!(
        late_ndjson == run.ndjson,
        "the lapped catch-up tap's NDJSON differs"
    );
}
