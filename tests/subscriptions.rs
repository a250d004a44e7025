//! Declarative subscriptions (SPEC section 14) with real processes on a private daemon and real
//! `/dev/shm`: a push reaches a running `aegis-tap` and a running `aegis-replay --symbols`;
//! a mask corrupted in shared memory is repaired by the next reconciliation and counted as
//! drift; the desired set survives a daemon restart; bad input is refused with a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::protocol::{Register, Role};
use aegis_shm_client::segment::ShmRegion;
use aegis_shm_client::spmc::{BusMonitor, TopicMask};
use aegis_shm_client::subscription::NameSet;
use common::*;
use serde_json::Value;

/// Rows per input file, and the time between two rows (ms): 6 s of feed at --speed 1.
const ROWS: u64 = 1500;
const STEP_MS: u64 = 4;
/// How long any one condition below may take to come true.
const WAIT: Duration = Duration::from_secs(30);

fn trades_csv(dir: &Path, symbol: &str, rows: u64) -> PathBuf {
    let path = dir.join(format!("{symbol}-trades-2024-09-21.csv"));
    let body: String = (0..rows)
        .map(|i| {
            format!(
                "{i},100.{:02},0.001,0.1,{},true,true\n",
                i % 100,
                1_726_876_800_000 + i * STEP_MS
            )
        })
        .collect();
    std::fs::write(&path, body).unwrap();
    path
}

/// Creates a live session; records its segments with the guard; returns its token.
fn create(h: &mut Harness, b: &Bins, socket: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["session", "create", name, "--mode", "live"];
    args.extend_from_slice(extra);
    let v = shmctl_json(b, socket, &args);
    let info = shmctl_json(b, socket, &["session", "inspect", name]);
    if let Some(sid) = info["segments"]["bus"]
        .as_str()
        .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
        .as_deref()
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }
    v["token"].as_str().expect("token").to_string()
}

/// Polls `f` every 50 ms until it returns `Some`, at most [`WAIT`]; panics with `what`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn consumer_read(b: &Bins, socket: &Path, session: &str, name: &str) -> u64 {
    let v = shmctl_json(b, socket, &["session", "inspect", session]);
    v["consumers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .and_then(|c| c["read"].as_u64())
        .unwrap_or(0)
}

/// The row of `component` (and `set`) in `subscriptions SESSION --json`.
fn sub_row(b: &Bins, socket: &Path, session: &str, component: &str, set: &str) -> Value {
    let v = shmctl_json(b, socket, &["subscriptions", session]);
    v["components"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|c| c["component"] == component && c["set"] == set)
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// Starts the live feed (`aegis-replay --speed 1` of a BTCUSDT and an ETHUSDT trades file,
/// component `feed`, with `extra` arguments) and `aegis-tap --format ndjson` (component
/// `tap`, with `tap_args`) writing to the returned file.
fn start_feed_and_tap(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    token: &str,
    extra: &[&str],
    tap_args: &[&str],
) -> (usize, usize, PathBuf) {
    let btc = trades_csv(&h.dir, "BTCUSDT", ROWS);
    let eth = trades_csv(&h.dir, "ETHUSDT", ROWS);
    let out = h.dir.join("tap.ndjson");
    let feed = h.spawn(
        Command::new(&b.replay)
            .args(["--speed", "1", "--name", "feed"])
            .args(extra)
            .arg(&btc)
            .arg(&eth)
            .env("AEGIS_SOCKET", socket)
            .env("AEGIS_SESSION_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(h.dir.join("feed.stderr")).unwrap()),
        "aegis-replay",
    );
    let tap = h.spawn(
        Command::new(&b.tap)
            .args([
                "--format",
                "ndjson",
                "--name",
                "tap",
                "--idle-timeout",
                "60",
            ])
            .args(tap_args)
            .arg("--out")
            .arg(&out)
            .env("AEGIS_SOCKET", socket)
            .env("AEGIS_SESSION_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(h.dir.join("tap.stderr")).unwrap()),
        "aegis-tap",
    );
    (feed, tap, out)
}

/// The topics of the tap's NDJSON lines, in bus order.
fn topics_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("an NDJSON line");
            v["topic"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

/// Asserts `topics` is some `before` lines, then only `after` lines (at least one of each).
fn assert_switch(h: &Harness, topics: &[String], before: &str, after: &str) {
    let first_after = topics.iter().position(|t| t == after);
    let ok = first_after.is_some_and(|i| {
        i > 0 && topics[..i].iter().all(|t| t == before) && topics[i..].iter().all(|t| t == after)
    });
    assert!(
        ok,
        "expected {before} lines, then only {after} lines; got {} lines: first {:?}, around the switch {:?}\ntap stderr:\n{}\nfeed stderr:\n{}",
        topics.len(),
        &topics[..topics.len().min(3)],
        first_after.map(|i| &topics[i.saturating_sub(3)..(i + 3).min(topics.len())]),
        tail(&h.dir.join("tap.stderr"), 2000),
        tail(&h.dir.join("feed.stderr"), 2000),
    );
}

#[test]
fn push_a_running_tap_outputs_only_the_new_topics_after_subscribe() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sub-push");
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "push", &["--expect", "2"]);
    let (feed, tap, out) = start_feed_and_tap(
        &mut h,
        &b,
        &socket,
        &token,
        &[],
        &["--topics", "trades.ETHUSDT"],
    );
    wait_for("the tap to read 50 ETHUSDT trades", || {
        (consumer_read(&b, &socket, "push", "tap") >= 50).then_some(())
    });
    let v = shmctl_json(
        &b,
        &socket,
        &["subscribe", "push", "tap", "--topics", "trades.BTCUSDT"],
    );
    assert_eq!(v["pushed"], true, "{v}");
    // The slot's mask (read by the daemon) follows the push.
    wait_for("the tap's mask to show the new set", || {
        let r = sub_row(&b, &socket, "push", "tap", "topics");
        (r["actual"] == serde_json::json!({"only": ["trades.BTCUSDT"]}) && r["in_sync"] == true)
            .then_some(())
    });
    let st = h.wait(tap, WAIT, "aegis-tap", || {});
    assert!(
        st.success(),
        "tap: {}",
        tail(&h.dir.join("tap.stderr"), 2000)
    );
    assert!(h.wait(feed, WAIT, "aegis-replay", || {}).success());
    assert_switch(&h, &topics_of(&out), "trades.ETHUSDT", "trades.BTCUSDT");
}

#[test]
fn replay_symbols_follow_the_desired_set_when_pushed() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sub-symbols");
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "syms", &["--expect", "2"]);
    let (feed, tap, out) =
        start_feed_and_tap(&mut h, &b, &socket, &token, &["--symbols", "BTCUSDT"], &[]);
    wait_for("the tap to read 50 BTCUSDT trades", || {
        (consumer_read(&b, &socket, "syms", "tap") >= 50).then_some(())
    });
    let r = sub_row(&b, &socket, "syms", "feed", "symbols");
    assert_eq!(
        r["desired"],
        serde_json::json!({"only": ["BTCUSDT"]}),
        "{r}"
    );
    let v = shmctl_json(
        &b,
        &socket,
        &["subscribe", "syms", "feed", "--symbols", "ETHUSDT"],
    );
    assert_eq!(v["pushed"], true, "{v}");
    wait_for("the feed to report the new symbol set", || {
        let r = sub_row(&b, &socket, "syms", "feed", "symbols");
        (r["actual"] == serde_json::json!({"only": ["ETHUSDT"]})).then_some(())
    });
    assert!(h.wait(feed, WAIT, "aegis-replay", || {}).success());
    let st = h.wait(tap, WAIT, "aegis-tap", || {});
    assert!(
        st.success(),
        "tap: {}",
        tail(&h.dir.join("tap.stderr"), 2000)
    );
    assert_switch(&h, &topics_of(&out), "trades.BTCUSDT", "trades.ETHUSDT");
}

#[test]
fn drift_a_mask_corrupted_in_shared_memory_is_repaired_and_counted_once() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sub-drift");
    let socket = h.start_daemon(&b);
    let token = create(
        &mut h,
        &b,
        &socket,
        "drift",
        &["--expect", "2", "--reconcile-s", "1"],
    );
    let (_feed, _tap, _out) = start_feed_and_tap(
        &mut h,
        &b,
        &socket,
        &token,
        &[],
        &["--topics", "trades.ETHUSDT"],
    );
    wait_for("the tap's first reconciliation", || {
        let r = sub_row(&b, &socket, "drift", "tap", "topics");
        (r["in_sync"] == true && r["reconciles"].as_u64() >= Some(1)).then_some(())
    });
    let info = shmctl_json(&b, &socket, &["session", "inspect", "drift"]);
    let bus = info["segments"]["bus"]
        .as_str()
        .expect("bus path")
        .to_string();
    let slot = info["consumers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "tap"))
        .and_then(|c| c["slot"].as_u64())
        .expect("the tap's slot") as usize;
    // As a bug would: every topic, straight into the slot in /dev/shm.
    let region = Arc::new(ShmRegion::open(Path::new(&bus)).expect("map the bus"));
    let mon = BusMonitor::open(region, None).expect("open the bus");
    mon.overwrite_topics(slot, TopicMask::ALL);
    let r = wait_for("the next reconciliation to repair the mask", || {
        let r = sub_row(&b, &socket, "drift", "tap", "topics");
        (r["drift"] == 1 && r["in_sync"] == true).then_some(r)
    });
    assert_eq!(
        r["actual"],
        serde_json::json!({"only": ["trades.ETHUSDT"]}),
        "{r}"
    );
    let first = r["reconciles"].as_u64().unwrap();
    // Idempotent: later reconciliations find nothing to repair.
    wait_for("two more reconciliations", || {
        let r = sub_row(&b, &socket, "drift", "tap", "topics");
        (r["reconciles"].as_u64() >= Some(first + 2)).then_some(())
    });
    let r = sub_row(&b, &socket, "drift", "tap", "topics");
    assert_eq!(r["drift"], 1, "{r}");
    assert_eq!(r["in_sync"], true, "{r}");
    let text = shmctl_output(&b, &socket, &["subscriptions", "drift"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("DRIFT") && text.contains("trades.ETHUSDT"),
        "{text}"
    );
}

fn register(socket: &Path, token: &str, topics: &[&str]) -> Component {
    Component::connect(
        Some(socket),
        Register {
            component_name: "strategy".into(),
            session_token: token.into(),
            role: Some(Role::Consumer),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register")
}

fn stop_daemon(h: &mut Harness) {
    let mut d = h.daemon.take().expect("a daemon");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let end = Instant::now() + DAEMON_STOP;
    while matches!(d.try_wait(), Ok(None)) {
        assert!(Instant::now() < end, "the daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn restart_a_re_registered_component_gets_its_desired_set_back() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sub-restart");
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "restart", &[]);
    let c = register(&socket, &token, &["trades.ETHUSDT"]);
    let only = |t: &str| NameSet::only([t.to_string()]);
    assert_eq!(c.ack().desired.topics, only("trades.ETHUSDT"));
    shmctl_json(
        &b,
        &socket,
        &[
            "subscribe",
            "restart",
            "strategy",
            "--topics",
            "trades.BTCUSDT",
        ],
    );
    wait_for("the push to reach the component", || {
        (c.subscriptions().desired.topics == only("trades.BTCUSDT")).then_some(())
    });
    drop(c);
    stop_daemon(&mut h);
    let state = PathBuf::from(format!("{}.state", socket.display())).join("subscriptions.json");
    assert!(state.is_file(), "{} was not written", state.display());

    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "restart", &[]);
    let r = sub_row(&b, &socket, "restart", "strategy", "topics");
    assert_eq!(
        r["desired"],
        serde_json::json!({"only": ["trades.BTCUSDT"]}),
        "{r}"
    );
    assert_eq!(r["state"], Value::Null, "not registered yet: {r}");
    // Re-registered (declaring another set, which only seeds a new entry): the store's set.
    let c = register(&socket, &token, &["trades.ETHUSDT"]);
    assert_eq!(c.ack().desired.topics, only("trades.BTCUSDT"));
    drop(c);

    // A corrupt state file stops `serve` with a clear error; it is never ignored.
    stop_daemon(&mut h);
    std::fs::write(&state, b"{\"format\":1,\"sessions\":").unwrap();
    let log = h.dir.join("serve-corrupt.log");
    let i = h.spawn(
        Command::new(&b.shmctl)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
        "aegis-shmctl serve",
    );
    let st = h.wait(i, WAIT, "serve over a corrupt state file", || {});
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!st.success(), "serve started over a corrupt state file");
    assert!(
        err.contains("is corrupt") && err.contains("subscriptions.json"),
        "{err}"
    );
}

#[test]
fn bad_input_unknown_topic_malformed_list_and_long_name_are_refused_clearly() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("sub-bad");
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "bad", &["--expect", "2"]);
    let (_feed, _tap, _out) = start_feed_and_tap(&mut h, &b, &socket, &token, &[], &[]);
    wait_for("the session to run", || {
        (consumer_read(&b, &socket, "bad", "tap") >= 1).then_some(())
    });
    let refused = |args: &[&str], wants: &[&str]| {
        let out = shmctl_output(&b, &socket, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        for w in wants {
            assert!(err.contains(w), "{args:?}: {w:?} not in: {err}");
        }
    };
    refused(
        &["subscribe", "bad", "tap", "--topics", "trades.NOPE"],
        &[
            "unknown topic trades.NOPE",
            "unknown_topic",
            "trades.BTCUSDT",
        ],
    );
    refused(
        &[
            "subscribe",
            "bad",
            "tap",
            "--topics",
            "trades.BTCUSDT,,trades.ETHUSDT",
        ],
        &["malformed topic list", "entry 2 is empty"],
    );
    refused(
        &["subscribe", "bad", "tap", "--topics", ""],
        &["malformed topic list"],
    );
    let long = "c".repeat(65);
    refused(
        &["subscribe", "bad", &long, "--topics", "trades.BTCUSDT"],
        &["component name", "[A-Za-z0-9._-]{1,64}", "bad_name"],
    );
    refused(
        &["subscribe", "bad", "feed", "--symbols", &"S".repeat(17)],
        &["1 to 16"],
    );
    refused(
        &["subscribe", "bad", "feed", "--symbols", "BTCUSDT"],
        &["does not accept a symbol set"],
    );
    refused(
        &["subscribe", "bad", "tap", "--topics", "a", "--symbols", "B"],
        &["cannot be used with"],
    );
    // Nothing changed.
    let r = sub_row(&b, &socket, "bad", "tap", "topics");
    assert_eq!(r["desired"], "all", "{r}");
}
