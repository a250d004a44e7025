//! Requests between components (SPEC section 13) against a real daemon: a request and its
//! reply, the errors (`no_target`, `self_request`, `handler_error`), a timeout against a
//! SIGSTOPped `aegis-tap` within deadline + 50 ms, a circular A→B→A call that ends by its
//! deadline, and 10,000 concurrent requests from two callers with none lost.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::protocol::{Register, Role};
use aegis_shm_client::request::RequestError;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// How long a poll for a state may take.
const WAIT: Duration = Duration::from_secs(30);
/// The timeout of a request that should be answered (generous: the machine may be loaded).
const ANSWER: Duration = Duration::from_secs(10);

/// A private daemon and a live session; returns the harness, socket and token.
fn setup(tag: &str) -> (Harness, Bins, std::path::PathBuf, String) {
    let b = bins();
    let mut h = Harness::new(tag);
    let socket = h.start_daemon(&b);
    let v = shmctl_json(&b, &socket, &["session", "create", "s", "--mode", "live"]);
    let info = shmctl_json(&b, &socket, &["session", "inspect", "s"]);
    if let Some(sid) = info["segments"]["bus"]
        .as_str()
        .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
        .as_deref()
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }
    let token = v["token"].as_str().expect("token").to_string();
    (h, b, socket, token)
}

fn component(socket: &Path, token: &str, name: &str) -> Component {
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
    .unwrap_or_else(|e| panic!("register {name}: {e}"))
}

/// Polls `f` every 20 ms until it returns `Some`, at most [`WAIT`]; panics with `what`.
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `inspect --json` row of `target` and `request_type`.
fn request_row(b: &Bins, socket: &Path, target: &str, request_type: &str) -> Value {
    let info = shmctl_json(b, socket, &["session", "inspect", "s"]);
    info["requests"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["target"] == target && r["type"] == request_type)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no requests row {target}/{request_type} in {info}"))
}

/// Whether every thread of `pid` is stopped (state `T` in /proc/PID/task/*/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(|t| t.ok()).all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

fn echo(c: &Component) {
    c.serve("echo", |r| {
        Ok(json!({"from": r.from, "payload": r.payload.clone()}))
    });
}

#[test]
fn a_request_gets_its_reply() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-reply");
    let risk = component(&socket, &token, "risk");
    risk.serve("fits", |r| {
        let qty = r.payload["qty"].as_f64().ok_or("qty must be a number")?;
        Ok(json!({"fits": qty <= 5.0}))
    });
    echo(&risk);
    let strategy = component(&socket, &token, "strategy");
    let a = strategy
        .request("risk", "fits", json!({"qty": 2.5}), ANSWER)
        .expect("answer");
    assert_eq!(a, json!({"fits": true}));
    let a = strategy
        .request("risk", "echo", Value::Null, ANSWER)
        .expect("answer");
    assert_eq!(a, json!({"from": "strategy", "payload": null}));
}

#[test]
fn errors_no_target_self_request_and_handler_error() {
    let _s = serial();
    let (_h, b, socket, token) = setup("req-errors");
    let risk = component(&socket, &token, "risk");
    risk.serve("fail", |_| Err("the book is closed".into()));
    risk.serve("panic", |_| panic!("handler bug"));
    let strategy = component(&socket, &token, "strategy");
    let call = |target: &str, t: &str| strategy.request(target, t, json!({}), ANSWER);
    match call("nobody", "fits") {
        Err(RequestError::NoTarget(m)) => assert!(m.contains("nobody"), "{m}"),
        other => panic!("expected no_target, got {other:?}"),
    }
    match call("strategy", "fits") {
        Err(RequestError::SelfRequest(_)) => {}
        other => panic!("expected self_request, got {other:?}"),
    }
    match call("risk", "fail") {
        Err(RequestError::HandlerError(m)) => assert_eq!(m, "the book is closed"),
        other => panic!("expected handler_error, got {other:?}"),
    }
    match call("risk", "panic") {
        Err(RequestError::HandlerError(m)) => assert!(m.contains("panicked"), "{m}"),
        other => panic!("expected handler_error, got {other:?}"),
    }
    match call("risk", "unknown-type") {
        Err(RequestError::HandlerError(m)) => assert!(m.contains("no handler"), "{m}"),
        other => panic!("expected handler_error, got {other:?}"),
    }
    for (target, t, errors) in [
        ("nobody", "fits", 1),
        ("strategy", "fits", 1),
        ("risk", "fail", 1),
        ("risk", "panic", 1),
    ] {
        let row = request_row(&b, &socket, target, t);
        assert_eq!(row["requests"], json!(1), "{row}");
        assert_eq!(row["errors"], json!(errors), "{row}");
        assert_eq!(row["timeouts"], json!(0), "{row}");
    }
    // A target that leaves is no target any more.
    drop(risk);
    let gone = wait_for("risk to be gone", || match call("risk", "fail") {
        Err(RequestError::NoTarget(m)) => Some(m),
        _ => None,
    });
    assert!(gone.contains("risk"), "{gone}");
}

#[test]
fn timeout_against_a_stopped_target_comes_at_the_deadline() {
    let _s = serial();
    let (mut h, b, socket, token) = setup("req-stopped");
    let tap = h.spawn(
        Command::new(&b.tap)
            .args(["--name", "tap", "--format", "count"])
            .arg("--socket")
            .arg(&socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "aegis-tap",
    );
    let caller = component(&socket, &token, "caller");
    // Registered, with its `stats` handler installed.
    wait_for("aegis-tap to answer stats", || {
        caller.request("tap", "stats", Value::Null, ANSWER).ok()
    });
    let pid = Pid::from_raw(h.pid(tap) as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP aegis-tap");
    // kill(2) returns before every thread has stopped: an answer could still leave.
    wait_for("every thread of aegis-tap to be stopped", || {
        all_threads_stopped(h.pid(tap)).then_some(())
    });
    let timeout = Duration::from_millis(300);
    for _ in 0..3 {
        let t0 = Instant::now();
        let r = caller.request("tap", "stats", Value::Null, timeout);
        let took = t0.elapsed();
        assert!(
            matches!(r, Err(RequestError::Timeout(_))),
            "expected timeout, got {r:?}"
        );
        assert!(took >= timeout, "returned before the deadline: {took:?}");
        assert!(
            took <= timeout + Duration::from_millis(50),
            "returned {took:?} after the call, deadline {timeout:?} + 50 ms"
        );
    }
    // The daemon counted the timeouts, per target and type, in `inspect` and its JSON.
    let row = request_row(&b, &socket, "tap", "stats");
    assert_eq!(row["timeouts"], json!(3), "{row}");
    let text = shmctl_output(&b, &socket, &["session", "inspect", "s"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("tap") && l.contains("stats")),
        "no requests row for tap/stats in:\n{text}"
    );
    kill(pid, Signal::SIGCONT).expect("SIGCONT aegis-tap");
    // Back: it answers again (the queued requests past their deadline are skipped).
    let r = caller
        .request("tap", "stats", Value::Null, ANSWER)
        .expect("stats after SIGCONT");
    assert_eq!(r["name"], json!("tap"), "{r}");
}

#[test]
fn circular_a_to_b_to_a_ends_by_the_deadline() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-circular");
    let a = Arc::new(component(&socket, &token, "a"));
    let b = Arc::new(component(&socket, &token, "b"));
    // a's ping asks b, b's ping asks a: each inner call may wait for what is left of the
    // outer deadline, never more.
    for (me, other) in [(&a, "b"), (&b, "a")] {
        let weak = Arc::downgrade(me);
        let other = other.to_string();
        me.serve("ping", move |r| {
            let me = weak.upgrade().ok_or("shutting down")?;
            me.request(
                &other,
                "ping",
                Value::Null,
                r.remaining().max(Duration::from_millis(1)),
            )
            .map_err(|e| e.to_string())
        });
        echo(me);
    }
    let c = component(&socket, &token, "c");
    let timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let r = c.request("a", "ping", Value::Null, timeout);
    let took = t0.elapsed();
    assert!(
        matches!(
            r,
            Err(RequestError::Timeout(_)) | Err(RequestError::HandlerError(_))
        ),
        "{r:?}"
    );
    assert!(
        took <= timeout + Duration::from_millis(50),
        "the circular call took {took:?}, deadline {timeout:?}"
    );
    // Nothing is stuck: both answer again once the chain has unwound.
    for name in ["a", "b"] {
        let r = wait_for("the chain to unwind", || {
            c.request(name, "echo", json!(1), ANSWER).ok()
        });
        assert_eq!(r["payload"], json!(1));
    }
    drop(c);
    // The handlers hold weak references: the components drop cleanly.
    drop(a);
    drop(b);
}

#[test]
fn ten_thousand_concurrent_requests_from_two_callers_none_lost() {
    const THREADS: usize = 25;
    const EACH: usize = 200;
    let _s = serial();
    let (_h, b, socket, token) = setup("req-10k");
    let target = component(&socket, &token, "target");
    target.serve("double", |r| {
        let n = r.payload["n"].as_u64().ok_or("n must be a number")?;
        Ok(json!({"caller": r.from, "n": n * 2}))
    });
    let callers: Vec<Arc<Component>> = ["c1", "c2"]
        .iter()
        .map(|n| Arc::new(component(&socket, &token, n)))
        .collect();
    let mut threads = Vec::new();
    for (ci, caller) in callers.iter().enumerate() {
        for t in 0..THREADS {
            let caller = caller.clone();
            threads.push(std::thread::spawn(move || {
                let mut ok = 0usize;
                for i in 0..EACH {
                    let n = (t * EACH + i) as u64;
                    let r = caller
                        .request("target", "double", json!({"n": n}), ANSWER)
                        .unwrap_or_else(|e| panic!("caller {ci} request {n}: {e}"));
                    assert_eq!(r["n"], json!(n * 2));
                    assert_eq!(r["caller"], json!(format!("c{}", ci + 1)));
                    ok += 1;
                }
                ok
            }));
        }
    }
    let answered: usize = threads
        .into_iter()
        .map(|t| t.join().expect("caller thread"))
        .sum();
    assert_eq!(answered, 2 * THREADS * EACH);
    // The daemon counted every one of them.
    let row = request_row(&b, &socket, "target", "double");
    assert_eq!(row["requests"], json!(10_000), "{row}");
    assert_eq!(row["replies"], json!(10_000), "{row}");
    assert_eq!(row["errors"], json!(0), "{row}");
    assert_eq!(row["timeouts"], json!(0), "{row}");
}

/// The measured round trip in the README: one caller, one echo target, requests one after
/// another. Prints the figures; asserts nothing about time. Run with `--ignored`.
#[test]
#[ignore]
fn measure_round_trip() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-measure");
    let target = component(&socket, &token, "target");
    echo(&target);
    let caller = component(&socket, &token, "caller");
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    for i in 0..22_000u64 {
        let t0 = Instant::now();
        caller
            .request("target", "echo", json!({"i": i}), ANSWER)
            .expect("answer");
        if i >= 2_000 {
            hist.record(t0.elapsed().as_micros() as u64).unwrap();
        }
    }
    println!(
        "request round trip over the control socket, {} requests: p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
}

#[test]
fn cli_call_prints_the_reply_or_the_error_and_aegis_tap_answers_stats() {
    let _s = serial();
    let (mut h, b, socket, token) = setup("req-cli");
    h.spawn(
        Command::new(&b.tap)
            .args(["--name", "tap", "--format", "count"])
            .arg("--socket")
            .arg(&socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "aegis-tap",
    );
    let call = |args: &[&str]| {
        let mut all = vec!["call", "s"];
        all.extend_from_slice(args);
        shmctl_output(&b, &socket, &all)
    };
    let out = wait_for("aegis-tap to answer stats", || {
        let out = call(&["tap", "stats", "--timeout-ms", "2000"]);
        out.status.success().then_some(out)
    });
    let stats: Value = serde_json::from_slice(&out.stdout).expect("the reply is JSON");
    assert_eq!(stats["name"], json!("tap"), "{stats}");
    assert_eq!(stats["events"], json!(0), "{stats}");
    assert_eq!(stats["started"], json!(false), "{stats}");
    for (args, code) in [
        (&["nobody", "stats"][..], "no_target"),
        (&["tap", "no-such-type", "{\"a\":1}"][..], "handler_error"),
    ] {
        let out = call(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(code), "{args:?}: expected {code} in {err}");
    }
    let out = call(&["tap", "stats", "not json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not JSON"));
    let out = call(&["tap", "stats", "--timeout-ms", "0"]);
    assert!(!out.status.success());
    // --json: the error as JSON on stdout too.
    let out = shmctl_output(&b, &socket, &["--json", "call", "s", "nobody", "stats"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON error");
    assert_eq!(v["error"]["code"], json!("no_target"), "{v}");
}

/// A handler holding the last reference to its component (through a `Weak` upgraded while it
/// runs) drops the component on the handler thread: it ends cleanly (the handler thread is
/// not joined by itself), and the caller gets `no_target` when the connection closes.
#[test]
fn a_handler_holding_the_last_reference_drops_its_component_cleanly() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-last-ref");
    let target = Arc::new(component(&socket, &token, "target"));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let weak = Arc::downgrade(&target);
    target.serve("slow", move |_| {
        let me = weak.upgrade().ok_or("gone")?;
        let _ = entered_tx.send(());
        std::thread::sleep(Duration::from_millis(300));
        drop(me);
        Ok(Value::Null)
    });
    let caller = Arc::new(component(&socket, &token, "caller"));
    let asking = {
        let caller = caller.clone();
        std::thread::spawn(move || caller.request("target", "slow", Value::Null, ANSWER))
    };
    entered_rx
        .recv_timeout(WAIT)
        .expect("the handler did not start");
    drop(target);
    let r = asking.join().expect("caller thread");
    assert!(
        matches!(r, Err(RequestError::NoTarget(_)) | Ok(Value::Null)),
        "{r:?}"
    );
    wait_for("target to be gone", || {
        matches!(
            caller.request("target", "slow", Value::Null, ANSWER),
            Err(RequestError::NoTarget(_))
        )
        .then_some(())
    });
}

/// A handler that blocks does not hold up the component's market data: the whole stream is
/// read to END-OF-STREAM while a `stats`-like handler is still blocked (it is released only
/// after the last event), and its caller (`aegis-shmctl call`) then gets the answer.
#[test]
fn a_blocked_handler_never_delays_the_bus() {
    let _s = serial();
    let b = bins();
    let mut h = Harness::new("req-data-path");
    let socket = h.start_daemon(&b);
    let n = 20_000u64;
    let csv = h.dir.join("BTCUSDT-trades-2024-09-21.csv");
    let rows: String = (0..n)
        .map(|i| {
            format!(
                "{i},63201.5,0.001,63.2,{},true,true\n",
                1_726_876_800_000 + i
            )
        })
        .collect();
    std::fs::write(&csv, rows).unwrap();
    // A backtest that starts once the replay and the consumer are READY.
    let v = shmctl_json(
        &b,
        &socket,
        &[
            "session", "create", "s", "--mode", "backtest", "--expect", "2",
        ],
    );
    let token = v["token"].as_str().expect("token").to_string();
    let info = shmctl_json(&b, &socket, &["session", "inspect", "s"]);
    if let Some(sid) = info["segments"]["bus"]
        .as_str()
        .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
        .as_deref()
        .and_then(sid_of)
    {
        h.sids.insert(sid.to_string());
    }
    let c = component(&socket, &token, "strategy");
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    c.serve("slow", move |_| {
        let _ = entered_tx.send(());
        let released = release_rx
            .lock()
            .map_err(|_| "poisoned")?
            .recv_timeout(Duration::from_secs(120))
            .is_ok();
        Ok(json!({"released": released}))
    });
    let out = h.dir.join("call.out");
    let call = h.spawn(
        Command::new(&b.shmctl)
            .arg("--socket")
            .arg(&socket)
            .args(["call", "s", "strategy", "slow", "--timeout-ms", "120000"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null()),
        "aegis-shmctl call",
    );
    entered_rx
        .recv_timeout(WAIT)
        .expect("the handler did not start");
    let events = c.events(WAIT).expect("attach");
    h.spawn(
        Command::new(&b.replay)
            .arg(&csv)
            .env("AEGIS_SOCKET", &socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "aegis-replay",
    );
    c.ready(WAIT).expect("STARTED");
    let mut seen = 0u64;
    for ev in events {
        ev.expect("an event");
        seen += 1;
    }
    assert_eq!(seen, n, "the whole stream while the handler is blocked");
    release_tx.send(()).expect("release the handler");
    let st = h.wait(call, WAIT, "aegis-shmctl call", || {});
    assert!(st.success(), "call: {st}");
    let reply: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).expect("JSON");
    assert_eq!(reply, json!({"released": true}));
    c.finished().expect("FINISHED");
}

/// A request to a group (SPEC 12) goes to its active member; after a failover, to the new
/// one; with no active member left, it is `not_active`.
#[test]
fn a_request_to_a_group_reaches_its_active_member() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-group");
    let member = |name: &str| {
        let c = Component::connect(
            Some(&socket),
            Register {
                component_name: name.into(),
                session_token: token.clone(),
                role: Some(Role::Consumer),
                group: Some("risk".into()),
                pid: Some(std::process::id()),
                ..Register::default()
            },
        )
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
        let me = name.to_string();
        c.serve("who", move |_| Ok(json!(me)));
        c
    };
    let a = member("risk-a");
    let b = member("risk-b");
    let caller = component(&socket, &token, "strategy");
    let who = || caller.request("risk", "who", Value::Null, ANSWER);
    assert_eq!(who(), Ok(json!("risk-a")));
    drop(a);
    wait_for("the failover to risk-b", || {
        (who() == Ok(json!("risk-b"))).then_some(())
    });
    drop(b);
    let r = wait_for("the group to have no active member", || match who() {
        Err(RequestError::NotActive(m)) => Some(m),
        _ => None,
    });
    assert!(r.contains("risk"), "{r}");
    // A name that is neither a component nor a group is still no_target.
    assert!(matches!(
        caller.request("nothing", "who", Value::Null, ANSWER),
        Err(RequestError::NoTarget(_))
    ));
}

/// A payload too large for one control line is refused by the caller's library, and an
/// answer too large becomes `handler_error`: neither reaches the daemon as an over-long line
/// (which the daemon would answer with an ERROR that stops the component).
#[test]
fn oversized_payloads_and_answers_are_refused_not_sent() {
    let _s = serial();
    let (_h, _b, socket, token) = setup("req-big");
    let target = component(&socket, &token, "target");
    target.serve("big", |_| Ok(json!("x".repeat(70_000))));
    echo(&target);
    let caller = component(&socket, &token, "caller");
    match caller.request("target", "echo", json!("y".repeat(70_000)), ANSWER) {
        Err(RequestError::Refused { code, message }) => {
            assert_eq!(code.name(), "bad_request");
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    match caller.request("target", "big", Value::Null, ANSWER) {
        Err(RequestError::HandlerError(m)) => assert!(m.contains("limit"), "{m}"),
        other => panic!("expected handler_error, got {other:?}"),
    }
    // Both components are still in the session and answer.
    assert_eq!(
        caller
            .request("target", "echo", json!(1), ANSWER)
            .expect("echo")["payload"],
        json!(1)
    );
    assert!(caller.stop_requested().is_none() && target.stop_requested().is_none());
}
