//! The trustworthy core (issue 9), with real processes on real `/dev/shm`: nothing lost,
//! nothing wrong, nothing hangs when a process misbehaves.
//!
//! 1. Unsorted input: `aegis-replay` stops at the first backwards row and names `FILE:LINE`;
//!    `--sort` and `--convert --sort` replay it in time order, stably.
//! 2. A paused consumer (SIGSTOP for longer than the heartbeat timeout) in a backtest is shown
//!    as `stalled`, never evicted; the session waits for it and both digests are equal.
//! 3. `session evict` evicts on purpose: the evicted consumer's next read says so, and it exits
//!    non-zero; the other consumer still gets every event.
//! 4. A live consumer lapped before its first read and over the end of the stream sees
//!    END-OF-STREAM at once, with the exact number of events it missed.
//! 5. A backtest's daemon memory does not grow with the stream: one long run of equal
//!    timestamps (a whole file at one ts) is not copied into the daemon.
//!
//! Every wait has a deadline; no test asserts how long anything takes, except that a lapped
//! consumer ends well before its idle timeout (which it would otherwise wait for).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// First trade time of the generated files (2024-09-21 00:00 UTC), in ms.
const DAY_START_MS: u64 = 1_726_876_800_000;
/// How long a component may take to exit once it can.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the session may take to reach a state.
const STATE_DEADLINE: Duration = Duration::from_secs(60);
/// Heartbeat timeout of the daemon (protocol::HEARTBEAT_TIMEOUT_MS) plus a margin: a pause
/// longer than this would have evicted a consumer before.
const PAUSE: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Writes a Binance spot `trades` CSV (no header, 7 columns) with one row per timestamp in
/// `times_ms`; trade ids count from 1.
fn write_trades(path: &Path, times_ms: &[u64]) {
    let mut f = std::io::BufWriter::new(fs::File::create(path).expect("create trades CSV"));
    for (i, t) in times_ms.iter().enumerate() {
        let price = 63_000 + (i % 500) as u64;
        writeln!(
            f,
            "{},{price}.5,0.00{},1.0,{t},{},true",
            i + 1,
            1 + i % 9,
            i % 2 == 0
        )
        .expect("write trades CSV");
    }
    f.flush().expect("flush trades CSV");
}

/// `n` increasing trade times (some equal), 1 ms apart on average.
fn increasing_times(n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| DAY_START_MS + (i as u64) - (i as u64 % 3))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Driving a session step by step
// ---------------------------------------------------------------------------------------------

/// Runs `aegis-shmctl --socket S --json ARGS` and returns its JSON output (panics with the
/// output if it fails or prints no JSON).
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

/// Creates session `name` and returns its token.
fn create(h: &mut Harness, b: &Bins, socket: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["session", "create", name];
    args.extend_from_slice(extra);
    let v = ctl(b, socket, &args);
    let token = v["token"].as_str().expect("token").to_string();
    let info = ctl(b, socket, &["session", "inspect", name]);
    if let Some(bus) = info["segments"]["bus"].as_str() {
        let file = Path::new(bus).file_name().and_then(|n| n.to_str());
        if let Some(sid) = file.and_then(sid_of) {
            h.sids.insert(sid.to_string());
        }
    }
    token
}

/// Starts a component (`exe ARGS`) of a session, stdout and stderr to files named after it.
fn component(
    h: &mut Harness,
    socket: &Path,
    token: &str,
    exe: &Path,
    name: &str,
    args: &[&str],
) -> usize {
    let out = fs::File::create(h.dir.join(format!("{name}.out"))).expect("stdout file");
    let err = fs::File::create(h.dir.join(format!("{name}.err"))).expect("stderr file");
    let mut cmd = Command::new(exe);
    cmd.arg("--name")
        .arg(name)
        .args(args)
        .env("AEGIS_SOCKET", socket)
        .env("AEGIS_SESSION_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    h.spawn(&mut cmd, name)
}

fn read_out(h: &Harness, name: &str, ext: &str) -> String {
    fs::read_to_string(h.dir.join(format!("{name}.{ext}"))).unwrap_or_default()
}

/// The component named `name` in an inspect snapshot.
fn comp<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["components"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Polls `inspect` until `ok` holds, up to [`STATE_DEADLINE`]; returns the last snapshot.
fn wait_inspect(
    b: &Bins,
    socket: &Path,
    name: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + STATE_DEADLINE;
    loop {
        let v = ctl(b, socket, &["session", "inspect", name]);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "session {name}: {what} did not happen within {STATE_DEADLINE:?}; last inspect:\n{v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for session `name` to finish, and checks it merged `n` events.
fn assert_finished(b: &Bins, socket: &Path, name: &str, n: u64) {
    let info = wait_inspect(b, socket, name, "finished", |v| v["state"] == "finished");
    assert_eq!(info["sequencer"]["events_merged"], n, "{info:#}");
}

fn signal(h: &Harness, i: usize, sig: Signal) {
    kill(Pid::from_raw(h.pid(i) as i32), sig).expect("signal a component");
}

/// Waits for component `i` to exit; returns whether it succeeded.
fn exits(h: &mut Harness, i: usize, name: &str, deadline: Duration) -> bool {
    let dir = h.dir.clone();
    let st = h.wait(i, deadline, name, || {});
    if !st.success() {
        eprintln!(
            "{name} exited with {st}; stderr:\n{}",
            fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
        );
    }
    st.success()
}

/// The last JSON object printed on stderr by `aegis-tap --json`.
fn tap_stats(h: &Harness, name: &str) -> Value {
    let err = read_out(h, name, "err");
    err.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .unwrap_or_else(|| panic!("{name} printed no JSON stats; stderr:\n{err}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Unsorted input
// ---------------------------------------------------------------------------------------------

/// 6440 trades whose time steps back on 3 rows (0-based rows 1000, 3000 and 5000).
fn unsorted_times() -> Vec<u64> {
    let mut t = increasing_times(6440);
    for &row in &[1000usize, 3000, 5000] {
        t[row] = t[row - 1] - 7;
    }
    t
}

/// Replays `file` (with `replay_args`) into a new backtest session next to one digest tap;
/// returns (the run's summary, the digest).
fn digest_run(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    replay_args: &[String],
) -> (RunOutput, String) {
    let dg = h.dir.join(format!("{name}.digest"));
    let commands = [
        format!(
            "exec {} --name replay {}",
            q(&b.replay),
            replay_args.join(" ")
        ),
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

#[test]
fn unsorted_input_stops_replay_at_file_and_line() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("unsorted");
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    write_trades(&csv, &unsorted_times());
    let socket = h.start_daemon(&b);

    let (r, _) = digest_run(&mut h, &b, &socket, "unsorted", &[q(&csv)]);
    assert!(
        !r.status.success() && r.summary["ok"] != true,
        "a backtest over unsorted input must fail, got {}:\n{:#}",
        r.status,
        r.summary
    );
    let want = format!("{}:1001", csv.display());
    assert!(
        r.stderr.contains(&want),
        "aegis-replay must name the first backwards row as {want}; stderr:\n{}",
        r.stderr
    );
    assert_ne!(
        r.summary["session"]["state"], "finished",
        "the session must not finish cleanly: {:#}",
        r.summary
    );

    // --convert refuses it too, naming the same line, and leaves no journal behind.
    let journal = h.dir.join("unsorted.aegisj");
    let out = Command::new(&b.replay)
        .arg("--convert")
        .arg(&journal)
        .arg(&csv)
        .output()
        .expect("run aegis-replay --convert");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--convert of unsorted input must fail"
    );
    assert!(
        err.contains(&want),
        "--convert must name {want}; stderr:\n{err}"
    );
    assert!(
        !journal.exists(),
        "a failed --convert must not leave {}",
        journal.display()
    );
}

#[test]
fn sort_replays_unsorted_input_in_time_order() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sort");
    let unsorted_dir = h.dir.join("unsorted");
    let sorted_dir = h.dir.join("sorted");
    fs::create_dir(&unsorted_dir).unwrap();
    fs::create_dir(&sorted_dir).unwrap();
    // The same file name (the source name) in both directories.
    let file = "BTCUSDT-trades-2024-09-21.csv";
    let times = unsorted_times();
    write_trades(&unsorted_dir.join(file), &times);
    // The reference: rows sorted stably by time, each keeping its own trade id.
    let mut rows: Vec<(u64, usize)> = times.iter().copied().zip(0..).collect();
    rows.sort_by_key(|&(t, _)| t);
    {
        let all = fs::read_to_string(unsorted_dir.join(file)).unwrap();
        let lines: Vec<&str> = all.lines().collect();
        let sorted: Vec<&str> = rows.iter().map(|&(_, i)| lines[i]).collect();
        fs::write(sorted_dir.join(file), sorted.join("\n") + "\n").unwrap();
    }
    let socket = h.start_daemon(&b);

    let (r, want) = digest_run(&mut h, &b, &socket, "sorted", &[q(&sorted_dir.join(file))]);
    assert_run_ok(&h, &r, times.len());
    let (r, got) = digest_run(
        &mut h,
        &b,
        &socket,
        "sort-flag",
        &["--sort".into(), q(&unsorted_dir.join(file))],
    );
    assert_run_ok(&h, &r, times.len());
    assert_eq!(got, want, "--sort must give the stream of the sorted file");

    let journal = h.dir.join("sorted.aegisj");
    let out = Command::new(&b.replay)
        .arg("--convert")
        .arg(&journal)
        .arg("--sort")
        .arg(unsorted_dir.join(file))
        .output()
        .expect("run aegis-replay --convert --sort");
    assert!(
        out.status.success(),
        "--convert --sort failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, got) = digest_run(&mut h, &b, &socket, "sorted-journal", &[q(&journal)]);
    assert_run_ok(&h, &r, times.len());
    assert_eq!(
        got, want,
        "--convert --sort must give the stream of the sorted file"
    );
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. A paused consumer in a backtest
// ---------------------------------------------------------------------------------------------

/// A backtest with a 64 KiB bus, one replay of `n` trades and two digest taps, started.
/// Returns (socket, replay, tap-a, tap-b).
fn paused_setup(h: &mut Harness, b: &Bins, name: &str, n: usize) -> (PathBuf, usize, usize, usize) {
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    write_trades(&csv, &increasing_times(n));
    let socket = h.start_daemon(b);
    let token = create(
        h,
        b,
        &socket,
        name,
        &["--mode", "backtest", "--bus-bytes", "65536"],
    );
    let csv_arg = csv.display().to_string();
    let replay = component(h, &socket, &token, &b.replay, "replay", &[&csv_arg]);
    let a_out = h.dir.join("tap-a.digest").display().to_string();
    let b_out = h.dir.join("tap-b.digest").display().to_string();
    let tap_a = component(
        h,
        &socket,
        &token,
        &b.tap,
        "tap-a",
        &["--format", "digest", "--out", &a_out],
    );
    let tap_b = component(
        h,
        &socket,
        &token,
        &b.tap,
        "tap-b",
        &["--format", "digest", "--out", &b_out],
    );
    // Every component READY first: a trigger that came before a component registered would
    // start the backtest without it.
    wait_inspect(b, &socket, name, "all three READY", |v| {
        ["replay", "tap-a", "tap-b"]
            .iter()
            .all(|c| comp(v, c)["state"] == "ready")
    });
    ctl(b, &socket, &["session", "start", name, "--timeout", "60"]);
    (socket, replay, tap_a, tap_b)
}

#[test]
fn paused_consumer_is_stalled_not_evicted_in_backtest() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("paused");
    let n = 200_000;
    let (socket, replay, tap_a, tap_b) = paused_setup(&mut h, &b, "paused", n);
    signal(&h, tap_b, Signal::SIGSTOP);
    // Longer than the heartbeat timeout: the daemon sees no heartbeat from tap-b.
    let end = Instant::now() + PAUSE;
    let mut stalled_seen = false;
    while Instant::now() < end {
        let info = ctl(&b, &socket, &["session", "inspect", "paused"]);
        let state = comp(&info, "tap-b")["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert_ne!(
            state, "dead",
            "a paused consumer must not be evicted in a backtest:\n{info:#}"
        );
        stalled_seen |= state == "stalled";
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        stalled_seen,
        "inspect never showed the paused tap-b as stalled"
    );
    signal(&h, tap_b, Signal::SIGCONT);
    assert!(
        exits(&mut h, replay, "replay", EXIT_DEADLINE),
        "replay failed"
    );
    assert!(exits(&mut h, tap_a, "tap-a", EXIT_DEADLINE), "tap-a failed");
    assert!(
        exits(&mut h, tap_b, "tap-b", EXIT_DEADLINE),
        "tap-b failed after its pause"
    );
    let (da, db) = (
        read_out(&h, "tap-a", "digest"),
        read_out(&h, "tap-b", "digest"),
    );
    assert!(is_digest(da.trim()), "tap-a wrote no digest: {da:?}");
    assert_eq!(da, db, "both consumers must see the same stream");
    assert_finished(&b, &socket, "paused", n as u64);
}

#[test]
fn evicted_consumer_exits_saying_so() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("evict");
    let n = 200_000;
    let (socket, replay, tap_a, tap_b) = paused_setup(&mut h, &b, "evict", n);
    signal(&h, tap_b, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    ctl(&b, &socket, &["session", "evict", "evict", "tap-b"]);
    wait_inspect(&b, &socket, "evict", "tap-b dead", |v| {
        comp(v, "tap-b")["state"] == "dead"
    });
    // The others go on without it.
    assert!(
        exits(&mut h, replay, "replay", EXIT_DEADLINE),
        "replay failed"
    );
    assert!(exits(&mut h, tap_a, "tap-a", EXIT_DEADLINE), "tap-a failed");
    signal(&h, tap_b, Signal::SIGCONT);
    assert!(
        !exits(&mut h, tap_b, "tap-b", EXIT_DEADLINE),
        "an evicted consumer must exit non-zero"
    );
    let err = read_out(&h, "tap-b", "err");
    assert!(
        err.contains("evicted"),
        "tap-b must say it was evicted; stderr:\n{err}"
    );
    assert!(
        !err.contains("corrupt"),
        "an evicted consumer must never read a frame from a later lap; stderr:\n{err}"
    );
    assert_finished(&b, &socket, "evict", n as u64);
}

// ---------------------------------------------------------------------------------------------
// 4. A live consumer lapped before its first read and over the end
// ---------------------------------------------------------------------------------------------

#[test]
fn live_consumer_lapped_over_the_end_sees_eos_with_exact_missed_count() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("lapped");
    let n = 100_000u64;
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    write_trades(&csv, &increasing_times(n as usize));
    let socket = h.start_daemon(&b);
    let token = create(
        &mut h,
        &b,
        &socket,
        "lapped",
        &["--mode", "live", "--bus-bytes", "65536"],
    );
    let tap = component(
        &mut h,
        &socket,
        &token,
        &b.tap,
        "tap",
        &["--format", "count", "--json"],
    );
    wait_inspect(&b, &socket, "lapped", "tap READY", |v| {
        comp(v, "tap")["state"] == "ready"
    });
    // Paused before it reads anything; the whole stream (far more than the bus) goes by.
    signal(&h, tap, Signal::SIGSTOP);
    let csv_arg = csv.display().to_string();
    let replay = component(&mut h, &socket, &token, &b.replay, "replay", &[&csv_arg]);
    wait_inspect(&b, &socket, "lapped", "replay READY", |v| {
        comp(v, "replay")["state"] == "ready"
    });
    ctl(
        &b,
        &socket,
        &["session", "start", "lapped", "--timeout", "60"],
    );
    assert!(
        exits(&mut h, replay, "replay", EXIT_DEADLINE),
        "replay failed"
    );
    wait_inspect(&b, &socket, "lapped", "every event merged", |v| {
        v["sequencer"]["events_merged"] == n
    });
    signal(&h, tap, Signal::SIGCONT);
    // Its idle timeout is 120 s: ending within 60 s means it saw END-OF-STREAM.
    let st = h.wait(
        tap,
        Duration::from_secs(60),
        "the lapped tap (END-OF-STREAM not seen?)",
        || {},
    );
    let stats = tap_stats(&h, "tap");
    let (events, missed) = (
        stats["events"].as_u64().unwrap_or(0),
        stats["missed"].as_u64().unwrap_or(0),
    );
    assert!(
        missed > 0,
        "the tap was lapped but reports nothing missed: {stats}"
    );
    assert_eq!(
        events + missed,
        n,
        "events read plus events missed must be the whole stream ({st}): {stats}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Memory
// ---------------------------------------------------------------------------------------------

/// A `/proc/PID/status` field in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn backtest_memory_does_not_grow_with_a_run_of_equal_timestamps() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("memory");
    // One million trades at a single timestamp: one run of equal timestamps, about 110 MB of
    // frames, far larger than the 1 MiB source ring.
    let n = 1_000_000usize;
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    write_trades(&csv, &vec![DAY_START_MS; n]);
    let journal = h.dir.join("trades.aegisj");
    let out = Command::new(&b.replay)
        .arg("--convert")
        .arg(&journal)
        .arg(&csv)
        .output()
        .expect("run aegis-replay --convert");
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_file(&csv).ok();
    let socket = h.start_daemon(&b);
    let daemon = h.daemon_pid.expect("daemon pid");
    let before = status_kb(daemon, "VmHWM:");
    let commands = [
        format!(
            "exec {} --source BTCUSDT-trades-2024-09-21 {}",
            q(&b.replay),
            q(&journal)
        ),
        format!("exec {} --format count", q(&b.tap)),
    ];
    let r = session_run(
        &mut h,
        &b,
        &socket,
        "memory",
        "backtest",
        &["--source-bytes", "1048576"],
        &commands,
    );
    assert_run_ok(&h, &r, n);
    let peak = status_kb(daemon, "VmHWM:");
    eprintln!("daemon VmHWM: {before} kB before, {peak} kB after {n} events at one timestamp");
    // Bounded by the ring sizes (1 MiB source ring, the default bus) plus the daemon itself:
    // far below the ~100 MB of frames in the run.
    assert!(
        peak < 64 * 1024,
        "the daemon peaked at {peak} kB: it copied the run of equal timestamps into memory"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A truncated segment: the documented limit (README, "Security")
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_segment_ends_the_daemon_with_a_clear_message_and_gc_cleans_up() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("truncate");
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    write_trades(&csv, &increasing_times(10_000));
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "trunc", &["--mode", "backtest"]);
    let csv_arg = csv.display().to_string();
    component(&mut h, &socket, &token, &b.replay, "replay", &[&csv_arg]);
    component(
        &mut h,
        &socket,
        &token,
        &b.tap,
        "tap",
        &["--format", "count"],
    );
    let info = wait_inspect(&b, &socket, "trunc", "both READY", |v| {
        comp(v, "replay")["state"] == "ready" && comp(v, "tap")["state"] == "ready"
    });
    let ring = info["segments"]["sources"][0]
        .as_str()
        .expect("a source ring segment")
        .to_string();
    // A same-uid process truncates the ring under the daemon's mapping.
    fs::OpenOptions::new()
        .write(true)
        .open(&ring)
        .and_then(|f| f.set_len(0))
        .expect("truncate the source ring");
    // The trigger: the sequencer's first look at the ring faults. The CLI may or may not get
    // an answer before the daemon is gone.
    let _ = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(&socket)
        .args(["session", "start", "trunc", "--timeout", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let daemon = h.daemon.as_mut().expect("the daemon");
    let end = Instant::now() + STATE_DEADLINE;
    let status = loop {
        if let Some(st) = daemon.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < end,
            "the daemon survived a truncated segment"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = fs::read_to_string(h.dir.join("daemon.log")).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(70),
        "daemon exit: {status}; log:\n{log}"
    );
    assert!(
        log.contains("SIGBUS") && log.contains("truncated") && log.contains("aegis-shmctl gc"),
        "the daemon must say why it stopped; log:\n{log}"
    );
    // `gc` removes what the dead daemon left.
    let out = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(&socket)
        .arg("gc")
        .output()
        .expect("run gc");
    assert!(
        out.status.success(),
        "gc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = shm_files()
        .into_iter()
        .map(|f| f.name)
        .filter(|n| sid_of(n).is_some_and(|s| h.sids.contains(s)))
        .collect();
    assert!(left.is_empty(), "gc left {left:?}");
}
