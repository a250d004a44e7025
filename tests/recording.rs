//! Recording (SPEC section 11) with real processes: `session run --record`, `record verify`,
//! live laps, a full disk (a real 1 MiB tmpfs), `kill -9` of the daemon mid-recording, and
//! recordings that are corrupt, truncated or from a future version.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
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
