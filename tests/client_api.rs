//! The strategy author's API against a real daemon and a real `aegis-replay` process:
//! `Component::events` delivers the whole stream in bus order, ends at END-OF-STREAM, and
//! turns an eviction into an error instead of a hang.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use aegis_shm_client::client::Component;
use aegis_shm_client::consume::ConsumeError;
use aegis_shm_client::event::AnyEvent;
use aegis_shm_client::protocol::{Register, Role};
use common::*;
use serde_json::Value;

/// How long an iteration may stay idle before it fails.
const IDLE: Duration = Duration::from_secs(30);

/// Creates a backtest session that starts once `expect` components are READY; returns its
/// token.
fn create(h: &mut Harness, b: &Bins, socket: &Path, name: &str, expect: u32) -> String {
    let expect = expect.to_string();
    let out = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(socket)
        .args(["--json", "session", "create", name, "--mode", "backtest"])
        .args(["--expect", &expect])
        .output()
        .expect("session create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let info = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(socket)
        .args(["--json", "session", "inspect", name])
        .output()
        .expect("session inspect");
    let info: Value = serde_json::from_slice(&info.stdout).unwrap_or(Value::Null);
    if let Some(sid) = info["segments"]["bus"]
        .as_str()
        .and_then(|b| Path::new(b).file_name()?.to_str().map(str::to_string))
        .as_deref()
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }
    v["token"].as_str().expect("token").to_string()
}

/// Starts `aegis-replay CSV` as a producer of the session.
fn replay(h: &mut Harness, b: &Bins, socket: &Path, token: &str, csv: &Path) {
    h.spawn(
        Command::new(&b.replay)
            .arg(csv)
            .env("AEGIS_SOCKET", socket)
            .env("AEGIS_SESSION_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "aegis-replay",
    );
}

fn consumer(socket: &Path, token: &str, name: &str) -> Component {
    Component::connect(
        Some(socket),
        Register {
            component_name: name.into(),
            session_token: token.into(),
            role: Some(Role::Consumer),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register the consumer")
}

#[test]
fn events_iterates_the_whole_stream_and_ends_at_end_of_stream() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("events");
    let n = 20_000;
    let csv = trades_csv(&h.dir, n);
    let socket = h.start_daemon(&b);
    // Starts by itself once the replay and this consumer are READY (no race with a trigger).
    let token = create(&mut h, &b, &socket, "events", 2);
    let c = consumer(&socket, &token, "strategy");
    let events = c.events(IDLE).expect("attach");
    replay(&mut h, &b, &socket, &token, &csv);
    c.ready(Duration::from_secs(60)).expect("STARTED");
    let mut seen = 0u64;
    let mut notional = 0.0;
    for ev in events {
        let ev = ev.expect("an event");
        assert_eq!(ev.seq, seen, "bus order, nothing missed");
        assert_eq!(ev.event.symbol(), "BTCUSDT");
        match ev.event {
            AnyEvent::Trade(t) => {
                assert_eq!(t.id, seen);
                notional += t.price.to_f64() * t.qty.to_f64();
            }
            other => panic!("unexpected {other:?}"),
        }
        seen += 1;
    }
    assert_eq!(seen, n, "every event, then the end of the stream");
    assert!(notional > 0.0);
    c.finished().expect("FINISHED");
}

#[test]
fn events_reports_an_eviction_instead_of_hanging() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("events-evict");
    let socket = h.start_daemon(&b);
    let token = create(&mut h, &b, &socket, "evict", 3);
    let csv = trades_csv(&h.dir, 10);
    replay(&mut h, &b, &socket, &token, &csv);
    let c = consumer(&socket, &token, "victim");
    let mut events = c.events(IDLE).expect("attach");
    // Evicted before the start: the iteration must say so, not wait for the idle timeout.
    let out = Command::new(&b.shmctl)
        .arg("--socket")
        .arg(&socket)
        .args(["session", "evict", "evict", "victim"])
        .output()
        .expect("session evict");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match events.next() {
        Some(Err(ConsumeError::Evicted(_))) => {}
        other => panic!("expected an eviction, got {other:?}"),
    }
    assert!(events.next().is_none(), "an eviction is final");
}
