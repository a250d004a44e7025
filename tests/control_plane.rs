//! The control plane against a real daemon (SPEC sections 6, 7 and 10): protocol refusals, a
//! fuzzed parser, the READY barrier, isolated sessions, `kill -9` of a consumer, of a producer
//! and of the daemon, the peer-uid check and the exit status of `session run`.
//!
//! Every test starts its own daemon (`aegis-shmctl serve`) as a child process on a private
//! socket, `/tmp/aegis-cp-<pid>-<n>/sock`. A [`Harness`] guard owns every child process it
//! started: its `Drop` (which also runs when a test panics) sends SIGTERM by pid, then SIGKILL,
//! removes the `/dev/shm/aegis-<sid>-*` segments of the sessions the test created and the temp
//! directory. Every wait has a deadline; no test asserts a maximum duration.
//!
//! The producer and consumer roles written against the client API are `#[test]` functions
//! that return at once unless `AEGIS_CP_ROLE` names them: the parent re-executes this test
//! binary with `--exact <role> --nocapture` and the session in environment variables. Children
//! report on stdout with lines containing `AEGIS-CP ` (libtest may print on the same line, so the
//! marker is searched, not anchored). Other tests use the real `aegis-replay` and `aegis-tap`
//! binaries, which `cargo build --release --workspace` puts next to `aegis-shmctl`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aegis_shm_client::client::Component;
use aegis_shm_client::event::{Decimal, EventRef, Symbol, Trade};
use aegis_shm_client::protocol::{self, Register, Reply, Request, Role, SourceDecl, SourceKind};
use aegis_shm_client::spmc::ReadError;
use aegis_shm_client::wait::{Backoff, Deadline};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Marker of every line a child role reports on stdout.
const MARK: &str = "AEGIS-CP ";
const ENV_ROLE: &str = "AEGIS_CP_ROLE";
const ENV_NAME: &str = "AEGIS_CP_NAME";
const ENV_EVENTS: &str = "AEGIS_CP_EVENTS";
const ENV_PAUSE_AT: &str = "AEGIS_CP_PAUSE_AT";
const ENV_STOP_AT: &str = "AEGIS_CP_STOP_AT";

/// How long the daemon may take to answer on its socket after it was spawned.
const DAEMON_UP: Duration = Duration::from_secs(15);
/// Deadline of one request / reply on the control socket.
const REPLY: Duration = Duration::from_secs(15);
/// Deadline of a whole data run (components exit) on a loaded 2-core machine.
const RUN: Duration = Duration::from_secs(90);
/// How long a child role blocks at most on anything (then it fails).
const CHILD_DEADLINE: Duration = Duration::from_secs(60);
/// How long a paused role stays paused before giving up (the parent kills it long before).
const PAUSE_LIMIT: Duration = Duration::from_secs(60);

/// The bundled Binance klines.
const KLINES_1M: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/binance/BTCUSDT-1m-2024-09-21.csv"
);
const KLINES_1M_EVENTS: u64 = 1440;
const KLINES_1H: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/binance/BTCUSDT-1h-2024-08.csv"
);
const KLINES_1H_EVENTS: u64 = 744;

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

fn shmctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_aegis-shmctl"))
}

/// `aegis-replay` / `aegis-tap`, next to `aegis-shmctl` (package aegis-tools, same target dir).
fn tool(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_aegis-shmctl")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first (the tests of the root \
         package do not build the aegis-tools binaries)",
        p.display()
    );
    p
}

// ---------------------------------------------------------------------------------------------
// A raw control-socket connection
// ---------------------------------------------------------------------------------------------

/// One connection to the daemon, speaking raw lines, every read bounded by a deadline.
struct Conn {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(sock: &Path) -> Conn {
        let s =
            UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the daemon");
    }

    fn send_json(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.send(&line);
    }

    /// The next line (without its newline), or `None` once the daemon closed the connection.
    /// Panics after `timeout`.
    fn read_line(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
                line.pop();
                return Some(line);
            }
            assert!(
                Instant::now() < end,
                "no line from the daemon within {timeout:?} (have {} bytes: {:?})",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            );
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next reply, as JSON.
    fn reply(&mut self) -> Value {
        let line = self
            .read_line(REPLY)
            .expect("the daemon closed the connection instead of answering");
        serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "the daemon sent a line that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&line)
            )
        })
    }

    fn call(&mut self, v: &Value) -> Value {
        self.send_json(v);
        self.reply()
    }
}

/// Asserts `v` is `ERROR` with `code` and returns its message.
#[track_caller]
fn expect_error(v: &Value, code: &str) -> String {
    assert_eq!(v["cmd"], "ERROR", "expected ERROR {code}, got {v}");
    assert_eq!(v["code"], code, "expected ERROR {code}, got {v}");
    let msg = v["message"].as_str().unwrap_or("").to_string();
    assert!(!msg.is_empty(), "an ERROR must say why: {v}");
    msg
}

/// Asserts `v` is an `ACK` and returns its `data`.
#[track_caller]
fn expect_data(v: &Value) -> Value {
    assert_eq!(v["cmd"], "ACK", "expected ACK, got {v}");
    v["data"].clone()
}

/// The other client is still served: SESSION_LIST on it gets a list.
#[track_caller]
fn still_served(other: &mut Conn, after: &str) {
    let v = other.call(&json!({"cmd": "SESSION_LIST"}));
    assert!(
        v["cmd"] == "ACK" && v["data"].is_array(),
        "after {after}, the other client got {v} instead of the session list"
    );
}

fn register(name: &str, token: &str, role: &str) -> Value {
    json!({"cmd": "REGISTER", "component_name": name, "session_token": token, "role": role})
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

/// A child process with its output collected by two threads.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

/// What a finished command printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A private daemon and everything a test started. `Drop` cleans up, also on panic.
struct Harness {
    dir: PathBuf,
    sock: PathBuf,
    procs: Mutex<Vec<Proc>>,
    sids: Mutex<BTreeSet<String>>,
}

/// Index of the daemon in `procs`.
const DAEMON: usize = 0;

impl Harness {
    /// A temp dir (0700) and a daemon serving on `<dir>/sock`.
    fn new() -> Harness {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/aegis-cp-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let h = Harness {
            sock: dir.join("sock"),
            dir,
            procs: Mutex::new(Vec::new()),
            sids: Mutex::new(BTreeSet::new()),
        };
        let mut cmd = Command::new(shmctl_bin());
        cmd.arg("serve").arg("--socket").arg(&h.sock);
        let d = h.spawn("daemon", cmd);
        assert_eq!(d, DAEMON);
        let end = Instant::now() + DAEMON_UP;
        loop {
            if let Ok(s) = UnixStream::connect(&h.sock) {
                drop(s);
                let mut c = Conn::open(&h.sock);
                if c.call(&json!({"cmd": "SESSION_LIST"}))["cmd"] == "ACK" {
                    break;
                }
            }
            if let Some(st) = h.try_status(DAEMON) {
                panic!("the daemon exited ({st}): {}", h.stderr(DAEMON));
            }
            assert!(
                Instant::now() < end,
                "the daemon did not answer within {DAEMON_UP:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    /// Starts `cmd` with stdout / stderr collected; returns its index.
    fn spawn(&self, name: &str, mut cmd: Command) -> usize {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let drain = |mut r: Box<dyn Read + Send>, into: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = r.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    into.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&b[..n]));
                }
            });
        };
        drain(Box::new(child.stdout.take().unwrap()), out.clone());
        drain(Box::new(child.stderr.take().unwrap()), err.clone());
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        procs.push(Proc {
            name: name.to_string(),
            child,
            status: None,
            out,
            err,
        });
        procs.len() - 1
    }

    /// Starts a role of this test binary with the session's socket and token.
    fn role(&self, role: &str, name: &str, token: &str, env: &[(&str, String)]) -> usize {
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            &format!("role_{role}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_ROLE, role)
        .env(ENV_NAME, name)
        .env("AEGIS_SOCKET", &self.sock)
        .env("AEGIS_SESSION_TOKEN", token);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.spawn(name, cmd)
    }

    fn pid(&self, i: usize) -> u32 {
        self.procs.lock().unwrap()[i].child.id()
    }

    fn stdout(&self, i: usize) -> String {
        self.procs.lock().unwrap()[i].out.lock().unwrap().clone()
    }

    fn stderr(&self, i: usize) -> String {
        self.procs.lock().unwrap()[i].err.lock().unwrap().clone()
    }

    fn try_status(&self, i: usize) -> Option<ExitStatus> {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut procs[i];
        if p.status.is_none() {
            p.status = p.child.try_wait().ok().flatten();
        }
        p.status
    }

    /// Waits for child `i` to exit (panics after `timeout`; the guard then kills it).
    fn wait(&self, i: usize, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status(i) {
                // Let the drain threads catch the last output.
                std::thread::sleep(Duration::from_millis(50));
                return st;
            }
            if Instant::now() >= end {
                let name = self.procs.lock().unwrap()[i].name.clone();
                panic!(
                    "{name} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(i),
                    self.stderr(i)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for child `i` and asserts it exited 0.
    #[track_caller]
    fn wait_ok(&self, i: usize, timeout: Duration) {
        let st = self.wait(i, timeout);
        let name = self.procs.lock().unwrap()[i].name.clone();
        assert!(
            st.success(),
            "{name} failed ({st})\nstdout:\n{}\nstderr:\n{}",
            self.stdout(i),
            self.stderr(i)
        );
    }

    /// Waits until child `i` printed `needle` on stdout.
    fn wait_stdout(&self, i: usize, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let out = self.stdout(i);
            if out.contains(needle) {
                return out;
            }
            let name = self.procs.lock().unwrap()[i].name.clone();
            if let Some(st) = self.try_status(i) {
                std::thread::sleep(Duration::from_millis(50));
                let out = self.stdout(i);
                if out.contains(needle) {
                    return out;
                }
                panic!(
                    "{name} exited ({st}) without printing {needle:?}\nstdout:\n{out}\nstderr:\n{}",
                    self.stderr(i)
                );
            }
            assert!(
                Instant::now() < end,
                "{name} did not print {needle:?} within {timeout:?}\nstdout:\n{out}\nstderr:\n{}",
                self.stderr(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` by pid, then reaps (a zombie would still look alive to `kill(pid, 0)`).
    fn kill9(&self, i: usize) {
        let mut procs = self.procs.lock().unwrap();
        let p = &mut procs[i];
        kill(Pid::from_raw(p.child.id() as i32), Signal::SIGKILL).expect("kill -9");
        p.status = Some(p.child.wait().expect("reap"));
    }

    /// Runs `aegis-shmctl --socket <sock> ARGS` to the end.
    fn shmctl(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(shmctl_bin());
        cmd.arg("--socket").arg(&self.sock).args(args);
        let i = self.spawn(&format!("aegis-shmctl {}", args.join(" ")), cmd);
        let status = self.wait(i, timeout);
        Output {
            status,
            stdout: self.stdout(i),
            stderr: self.stderr(i),
        }
    }

    /// One request on a fresh connection: the reply.
    fn request(&self, v: &Value) -> Value {
        Conn::open(&self.sock).call(v)
    }

    /// Records the sid of every session of this (private) daemon, for the cleanup.
    fn track_sessions(&self) {
        let v = self.request(&json!({"cmd": "SESSION_LIST"}));
        let mut sids = self.sids.lock().unwrap();
        for s in v["data"].as_array().into_iter().flatten() {
            if let Some(sid) = s["sid"].as_str() {
                sids.insert(sid.to_string());
            }
        }
    }

    /// Creates a session; returns its token. `extra`: more SESSION_CREATE fields.
    fn create(&self, name: &str, mode: &str, extra: Value) -> String {
        let mut req = json!({"cmd": "SESSION_CREATE", "name": name, "mode": mode});
        for (k, v) in extra.as_object().into_iter().flatten() {
            req[k] = v.clone();
        }
        let data = expect_data(&self.request(&req));
        self.track_sessions();
        data["token"].as_str().expect("a token").to_string()
    }

    fn inspect(&self, name: &str) -> Value {
        expect_data(&self.request(&json!({"cmd": "SESSION_INSPECT", "name": name})))
    }

    /// Polls `inspect` until `pred` holds; returns that view.
    fn wait_inspect(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let v = self.inspect(name);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "session {name}: not {what} within {timeout:?}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Segments of the tracked sessions that exist now.
    fn segments(&self) -> Vec<PathBuf> {
        let sids = self.sids.lock().unwrap().clone();
        segments_of(&sids)
    }
}

fn segments_of(sids: &BTreeSet<String>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/dev/shm") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if sids
                .iter()
                .any(|sid| name.starts_with(&format!("aegis-{sid}-")))
            {
                found.push(e.path());
            }
        }
    }
    found
}

/// SESSION_LIST for the guard's `Drop`: errors give `None`, nothing panics, 5 s at most.
fn list_without_panic(sock: &Path) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"{\"cmd\":\"SESSION_LIST\"}\n").ok()?;
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.contains(&b'\n') {
        if Instant::now() >= end {
            return None;
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return None,
        }
    }
    let nl = buf.iter().position(|&b| b == b'\n')?;
    serde_json::from_slice(&buf[..nl]).ok()
}

/// Ends a child: SIGTERM by pid, up to `grace` to exit, then SIGKILL; always reaped.
fn terminate(p: &mut Proc, grace: Duration) {
    if p.status.is_some() || matches!(p.child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = Pid::from_raw(p.child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(st)) = p.child.try_wait() {
            p.status = Some(st);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(pid, Signal::SIGKILL);
    p.status = p.child.wait().ok();
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Nothing here may panic: this also runs while a failed test unwinds.
        let daemon_alive = {
            let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
            procs
                .get_mut(DAEMON)
                .is_some_and(|d| d.status.is_none() && matches!(d.child.try_wait(), Ok(None)))
        };
        if daemon_alive {
            // Sessions created by `session run` and the like: learn their sids.
            if let Some(v) = list_without_panic(&self.sock) {
                let mut sids = self.sids.lock().unwrap_or_else(|e| e.into_inner());
                for s in v["data"].as_array().into_iter().flatten() {
                    if let Some(sid) = s["sid"].as_str() {
                        sids.insert(sid.to_string());
                    }
                }
            }
        }
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        // Components first, the daemon last (its SIGTERM removes its segments itself).
        for p in procs.iter_mut().skip(1).rev() {
            terminate(p, Duration::from_secs(2));
        }
        if let Some(d) = procs.get_mut(DAEMON) {
            terminate(d, Duration::from_secs(5));
        }
        let sids = self.sids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for seg in segments_of(&sids) {
            let _ = std::fs::remove_file(seg);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a panicking test left for [`harness_cleans_up_after_a_panic`] to check.
struct Left {
    dir: PathBuf,
    pids: Vec<u32>,
    segments: Vec<PathBuf>,
}

/// The guard works when a test panics: children killed and reaped, segments and temp dir gone.
#[test]
fn harness_cleans_up_after_a_panic() {
    let payload = std::thread::spawn(|| {
        let h = Harness::new();
        let token = h.create("doomed", "backtest", json!({"expect": 2}));
        let p = h.role("producer", "prod", &token, &[(ENV_EVENTS, "10".into())]);
        h.wait_inspect("doomed", "registered", Duration::from_secs(30), |v| {
            v["components"].as_array().is_some_and(|c| c.len() == 1)
        });
        let left = Left {
            dir: h.dir.clone(),
            pids: vec![h.pid(DAEMON), h.pid(p)],
            segments: h.segments(),
        };
        assert_eq!(left.segments.len(), 3, "{:?}", left.segments);
        std::panic::panic_any(left); // a deliberate panic: the guard unwinds
    })
    .join()
    .expect_err("the thread panics");
    let left = payload.downcast::<Left>().expect("our payload");
    assert!(!left.dir.exists(), "{} is left", left.dir.display());
    for seg in &left.segments {
        assert!(!seg.exists(), "{} is left", seg.display());
    }
    for pid in &left.pids {
        // Killed and reaped: the pid no longer exists (it could only be reused much later).
        assert!(
            kill(Pid::from_raw(*pid as i32), None).is_err(),
            "process {pid} is still there"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Child roles (run only when re-executed with AEGIS_CP_ROLE)
// ---------------------------------------------------------------------------------------------

fn role_env(var: &str) -> Option<u64> {
    std::env::var(var).ok().map(|v| v.parse().expect(var))
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARK}{msg}");
    let _ = out.flush();
}

/// The trade number `i` of the test stream: id `i`, ts one µs apart.
fn trade(i: u64) -> (u64, Trade) {
    let t = Trade {
        symbol: Symbol::new("BTCUSDT").unwrap(),
        id: i,
        price: Decimal {
            mantissa: 6_320_105 + (i % 1000) as i64,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 1 + (i % 7) as i64,
            scale: 3,
        },
        buyer_maker: i.is_multiple_of(2),
    };
    (1_726_876_800_000_000_000 + i * 1_000, t)
}

/// Producer role: source `<name>-src`, `AEGIS_CP_EVENTS` trades. With `AEGIS_CP_PAUSE_AT=K` it
/// pushes K trades, flushes, says `paused` and waits to be killed. With `AEGIS_CP_STOP_AT=K` it
/// pushes K trades, flushes, says `stopping` and stops itself (SIGSTOP: every thread, the
/// heartbeat thread too, as a debugger would); after SIGCONT it goes on to the end.
#[test]
fn role_producer() {
    if std::env::var(ENV_ROLE).as_deref() != Ok("producer") {
        return;
    }
    let name = std::env::var(ENV_NAME).unwrap();
    let events = role_env(ENV_EVENTS).unwrap();
    let pause_at = role_env(ENV_PAUSE_AT);
    let stop_at = role_env(ENV_STOP_AT);
    let source = format!("{name}-src");
    let comp = Component::from_env(
        &name,
        Role::Producer,
        vec![SourceDecl {
            name: source.clone(),
            kind: SourceKind::Trade,
            topic: "trades.BTCUSDT".into(),
            journal: None,
            recording: None,
        }],
    )
    .expect("register");
    let (mut p, topic) = comp.producer(&source).expect("map the source ring");
    p.set_batch(32);
    comp.ready(CHILD_DEADLINE).expect("STARTED");
    say("started");
    let mut wait = Backoff::default();
    for i in 0..events {
        if Some(i) == pause_at {
            p.flush();
            say(&format!("paused at {i}"));
            std::thread::sleep(PAUSE_LIMIT);
            panic!("paused producer was not killed within {PAUSE_LIMIT:?}");
        }
        if Some(i) == stop_at {
            p.flush();
            say(&format!("stopping at {i}"));
            // To this thread (tgkill), not the process: a process-directed SIGSTOP may be
            // taken by another thread while this one pushes thousands more events.
            nix::sys::signal::raise(Signal::SIGSTOP).expect("SIGSTOP myself");
            say(&format!("continued at {i}"));
        }
        let (ts, t) = trade(i);
        if p.push(ts, topic, t, &mut wait, Deadline::after(CHILD_DEADLINE))
            .is_err()
        {
            panic!("push {i}: the ring stayed full for {CHILD_DEADLINE:?}");
        }
    }
    p.finish(&mut wait, Deadline::after(CHILD_DEADLINE))
        .expect("end of stream");
    comp.finished().expect("FINISHED");
    say(&format!("producer done n={events}"));
}

/// Consumer role: reads the bus to END-OF-STREAM, checking every trade arrives, in order, once.
/// With `AEGIS_CP_PAUSE_AT=K` it stops reading after K events, says `paused` and waits to be
/// killed.
#[test]
fn role_consumer() {
    if std::env::var(ENV_ROLE).as_deref() != Ok("consumer") {
        return;
    }
    let name = std::env::var(ENV_NAME).unwrap();
    let pause_at = role_env(ENV_PAUSE_AT);
    let comp = Component::from_env(&name, Role::Consumer, vec![]).expect("register");
    let mut bus = comp.consumer().expect("attach the bus");
    comp.ready(CHILD_DEADLINE).expect("STARTED");
    say("started");
    let mut wait = Backoff::default();
    let mut n = 0u64;
    loop {
        if Some(n) == pause_at {
            say(&format!("paused at {n}"));
            std::thread::sleep(PAUSE_LIMIT);
            panic!("paused consumer was not killed within {PAUSE_LIMIT:?}");
        }
        let f = match bus.next(&mut wait, Deadline::after(CHILD_DEADLINE)) {
            Ok(f) => f,
            Err(ReadError::Timeout) => panic!("nothing on the bus for {CHILD_DEADLINE:?}"),
            Err(e) => panic!("bus: {e}"),
        };
        if f.is_eof() {
            break;
        }
        match f.event().expect("a valid event") {
            EventRef::Trade(t) => {
                let id = t.id.to_native();
                assert_eq!(id, n, "{name}: trade {id} arrived where {n} was due");
            }
            _ => panic!("{name}: only trades were produced"),
        }
        n += 1;
    }
    comp.finished().expect("FINISHED");
    say(&format!("consumer done count={n} in-order"));
}

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes a Binance spot `trades` CSV (7 columns, no header, ms timestamps) of `n` trades.
fn write_trades_csv(path: &Path, n: u64, start_ms: u64, max_step_ms: u64, seed: u64) {
    let mut s = seed;
    let mut t = start_ms;
    let mut out = String::with_capacity(n as usize * 64);
    for i in 0..n {
        let r = splitmix(&mut s);
        t += r % max_step_ms;
        let price = 6_000_000 + (r >> 20) % 500_000;
        let qty = 1 + (r >> 40) % 100_000;
        out.push_str(&format!(
            "{},{}.{:02},0.{:05},{}.{:07},{},{},True\n",
            1_000_000 + i,
            price / 100,
            price % 100,
            qty,
            price * qty / 100_000,
            (price * qty) % 10_000_000,
            t,
            if r & 1 == 0 { "True" } else { "False" }
        ));
    }
    std::fs::write(path, out).expect("write the trades CSV");
}

// ---------------------------------------------------------------------------------------------
// 1. Protocol refusals
// ---------------------------------------------------------------------------------------------

/// Every hostile or wrong request gets an ERROR, while another connected client keeps being
/// served; a half line is answered with ERROR "incomplete line" and dropped after ~5 s.
#[test]
fn protocol_refusals_keep_the_daemon_serving() {
    let h = Harness::new();
    let mut other = Conn::open(&h.sock);
    still_served(&mut other, "connecting");
    let mut a = Conn::open(&h.sock);

    // The stalled half line runs in the background for ~5 s while everything else goes on.
    let stall = {
        let sock = h.sock.clone();
        std::thread::spawn(move || {
            let mut c = Conn::open(&sock);
            let t0 = Instant::now();
            c.send(br#"{"cmd":"SESSION_LI"#);
            let line = c
                .read_line(Duration::from_secs(30))
                .expect("an ERROR before the disconnect");
            let v: Value = serde_json::from_slice(&line).unwrap();
            let msg = expect_error(&v, "timeout");
            assert!(msg.contains("incomplete line"), "{msg}");
            let waited = t0.elapsed();
            assert!(
                c.read_line(Duration::from_secs(10)).is_none(),
                "the stalled client must be disconnected after its ERROR"
            );
            waited
        })
    };
    // A connection that sends an over-long line and then stays idle for longer than the
    // partial-line timeout must stay usable (regression: it used to be dropped 5 s later).
    let mut long_then_idle = Conn::open(&h.sock);
    let mut huge = vec![b'x'; 1 << 20];
    huge.push(b'\n');
    long_then_idle.send(&huge);
    expect_error(&long_then_idle.reply(), "line_too_long");
    still_served(&mut other, "a 1 MiB line on another connection");

    // Malformed JSON, unknown cmd, a 1 MiB line: each refused, and the connection lives on.
    expect_error(&a.call(&json!("not an object")), "missing_cmd");
    a.send(b"{nope\n");
    expect_error(&a.reply(), "malformed_json");
    still_served(&mut other, "malformed JSON");
    expect_error(&a.call(&json!({"cmd": "FLY"})), "unknown_cmd");
    still_served(&mut other, "an unknown cmd");
    a.send(&huge);
    let msg = expect_error(&a.reply(), "line_too_long");
    assert!(msg.contains(&protocol::MAX_LINE.to_string()), "{msg}");
    still_served(
        &mut a,
        "its own 1 MiB line (the rest of the line is skipped)",
    );
    still_served(&mut other, "a 1 MiB line");

    // A wrong token.
    expect_error(
        &a.call(&register(
            "tap",
            "0123456789abcdef0123456789abcdef",
            "consumer",
        )),
        "bad_token",
    );
    expect_error(&a.call(&register("tap", "", "consumer")), "bad_token");
    // A known cmd with an unknown enum value is `bad_request` (it used to be `unknown_cmd`).
    expect_error(&a.call(&register("tap", "", "admin")), "bad_request");
    still_served(&mut other, "a wrong token");

    // Names with `/` or `..`: sessions, components, sources.
    for bad in ["a/b", "..", "../etc", "x y", ""] {
        let v = a.call(&json!({"cmd": "SESSION_CREATE", "name": bad, "mode": "backtest"}));
        expect_error(&v, "bad_name");
        still_served(&mut other, &format!("session create {bad:?}"));
    }
    let long = "x".repeat(65);
    expect_error(
        &a.call(&json!({"cmd": "SESSION_CREATE", "name": long, "mode": "live"})),
        "bad_name",
    );
    assert!(
        h.request(&json!({"cmd": "SESSION_LIST"}))["data"]
            .as_array()
            .unwrap()
            .is_empty(),
        "refused sessions must not exist"
    );
    let tok_a = h.create("cp-a", "backtest", json!({}));
    let tok_b = h.create("cp-b", "live", json!({}));
    for bad in ["a/b", "..", "../../tmp/x"] {
        let mut c = Conn::open(&h.sock);
        expect_error(&c.call(&register(bad, &tok_a, "consumer")), "bad_name");
        still_served(&mut other, &format!("component name {bad:?}"));
    }
    let mut c = Conn::open(&h.sock);
    let v = c.call(&json!({"cmd": "REGISTER", "component_name": "p", "session_token": tok_a,
        "role": "producer", "sources": [{"name": "../evil", "kind": "trade", "topic": "trades.X"}]}));
    expect_error(&v, "bad_name");
    assert!(
        h.segments()
            .iter()
            .all(|p| !p.to_string_lossy().contains("evil")),
        "no segment may be created for a refused source name"
    );
    still_served(&mut other, "a source name with ..");

    // A token registers into its own session only.
    let mut in_a = Conn::open(&h.sock);
    let ack = in_a.call(&register("comp-a", &tok_a, "consumer"));
    assert_eq!(ack["cmd"], "ACK", "{ack}");
    assert_eq!(ack["ack"]["session"], "cp-a", "{ack}");
    assert_eq!(ack["ack"]["mode"], "backtest", "{ack}");
    let mut in_b = Conn::open(&h.sock);
    let ack = in_b.call(&register("comp-b", &tok_b, "consumer"));
    assert_eq!(ack["ack"]["session"], "cp-b", "{ack}");
    assert_eq!(ack["ack"]["mode"], "live", "{ack}");
    let names = |s: &str| -> Vec<String> {
        h.inspect(s)["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("cp-a"), ["comp-a"]);
    assert_eq!(names("cp-b"), ["comp-b"]);
    // A registered connection cannot register again (into another session, say).
    expect_error(
        &in_a.call(&register("again", &tok_b, "consumer")),
        "already_registered",
    );
    still_served(&mut other, "registrations");

    // After a backtest session STARTED, REGISTER is refused with `session_started`.
    let tok_s = h.create("cp-started", "backtest", json!({}));
    let producer = Component::connect(
        Some(&h.sock),
        Register {
            component_name: "prod".into(),
            session_token: tok_s.clone(),
            role: Some(Role::Producer),
            sources: vec![SourceDecl {
                name: "src1".into(),
                kind: SourceKind::Trade,
                topic: "trades.BTCUSDT".into(),
                journal: None,
                recording: None,
            }],
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register the producer");
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = std::thread::spawn(move || {
        let r = producer.ready(Duration::from_secs(30)).map(|_| ());
        let _ = tx.send(r.map_err(|e| e.to_string()));
        producer // kept alive until joined
    });
    h.wait_inspect("cp-started", "READY", REPLY, |v| {
        v["components"][0]["state"] == "ready"
    });
    let started =
        h.request(&json!({"cmd": "SESSION_START", "name": "cp-started", "timeout_ms": 10000}));
    assert_eq!(expect_data(&started)["state"], "running", "{started}");
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the producer got no STARTED in time")
        .expect("STARTED");
    for role in ["consumer", "producer"] {
        let mut late = Conn::open(&h.sock);
        let msg = expect_error(
            &late.call(&register(&format!("late-{role}"), &tok_s, role)),
            "session_started",
        );
        assert!(msg.contains("already started"), "{msg}");
        still_served(&mut other, "a late REGISTER");
    }
    expect_error(
        &h.request(&json!({"cmd": "SESSION_START", "name": "cp-started"})),
        "session_started",
    );

    // The half line: ERROR "incomplete line" after ~5 s, then disconnected. The other client
    // was served all along (every 200 ms).
    while !stall.is_finished() {
        still_served(&mut other, "a stalled half line");
        std::thread::sleep(Duration::from_millis(200));
    }
    let waited = stall.join().expect("the stalled client's checks");
    assert!(
        waited >= Duration::from_millis(4500),
        "a half line was cut after {waited:?}, before the 5 s partial-line timeout"
    );
    still_served(
        &mut long_then_idle,
        "an over-long line followed by more than 5 s of silence",
    );
    still_served(&mut other, "everything");
    drop(ready.join());
}

// ---------------------------------------------------------------------------------------------
// 2. Fuzzing the parser and the daemon
// ---------------------------------------------------------------------------------------------

/// Every command name the daemon knows.
fn known_cmds() -> Vec<&'static str> {
    protocol::Cmd::ALL.iter().map(|c| c.name()).collect()
}

const ERROR_CODES: &[&str] = &[
    "malformed_json",
    "missing_cmd",
    "unknown_cmd",
    "bad_request",
    "line_too_long",
];

/// `parse_request`'s contract: a request that survives a round trip, or an ERROR reply with a
/// known code and a message.
fn check_parse(line: &[u8]) -> Result<Request, (String, String)> {
    match protocol::parse_request(line) {
        Ok(req) => {
            let enc = protocol::encode(&req);
            let again = protocol::parse_request(&enc[..enc.len() - 1]);
            assert_eq!(again.as_ref(), Ok(&req), "round trip of {req:?}");
            Ok(req)
        }
        Err(Reply::Error { code, message }) => {
            let code = code.name().to_string();
            assert!(
                ERROR_CODES.contains(&code.as_str()),
                "unexpected code {code}"
            );
            assert!(!message.is_empty());
            Err((code, message))
        }
        Err(other) => panic!("parse_request answered {other:?}, not an ERROR"),
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(json!("producer")),
        Just(json!("backtest")),
        Just(json!("0123456789abcdef0123456789abcdef")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "name",
            "component_name",
            "session_token",
            "role",
            "sources",
            "mode",
            "expect",
            "timeout_ms",
            "code",
            "message",
            "reason",
            "bus_bytes",
        ])
        .prop_map(String::from),
        "[a-z_]{1,10}",
    ]
}

fn cmd_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(known_cmds()).prop_map(String::from),
        "[A-Z_]{0,16}",
        "\\PC{0,8}",
    ]
}

/// A JSON object with a `cmd` and random fields, as text.
fn message() -> impl Strategy<Value = (String, String)> {
    (
        cmd_name(),
        prop::collection::vec((field_name(), json_value()), 0..5),
    )
        .prop_map(|(cmd, fields)| {
            let mut m: serde_json::Map<String, Value> = fields.into_iter().collect();
            m.insert("cmd".into(), Value::String(cmd.clone()));
            (cmd, Value::Object(m).to_string())
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes never panic the parser, and anything that is not a request is an ERROR.
    #[test]
    fn parse_request_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = check_parse(&bytes);
    }

    /// JSON-ish messages: unknown commands are `unknown_cmd`; known ones parse or are refused.
    #[test]
    fn parse_request_jsonish((cmd, text) in message()) {
        match check_parse(text.as_bytes()) {
            Ok(req) => prop_assert!(known_cmds().contains(&cmd.as_str()), "{cmd} parsed as {req:?}"),
            Err((code, msg)) => {
                if known_cmds().contains(&cmd.as_str()) {
                    // A known command with bad fields, an unknown enum value among them
                    // (`"role":"admin"`), which used to come back as `unknown_cmd`.
                    prop_assert_eq!(code.as_str(), "bad_request", "{}", msg);
                } else {
                    prop_assert_eq!(code.as_str(), "unknown_cmd", "{}", msg);
                }
            }
        }
    }

    /// Damaged messages (cut short, or a byte changed) never panic the parser.
    #[test]
    fn parse_request_damaged((_, text) in message(), at in any::<prop::sample::Index>(), b in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = text.into_bytes();
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = b }
        let _ = check_parse(&bytes);
    }
}

#[test]
fn parse_request_edge_cases() {
    let code = |l: &[u8]| check_parse(l).map(|r| format!("{r:?}")).unwrap_err().0;
    assert_eq!(code(b""), "malformed_json");
    assert_eq!(code(b"\xff\xfe"), "malformed_json");
    assert_eq!(code(b"[]"), "missing_cmd");
    assert_eq!(code(b"null"), "missing_cmd");
    assert_eq!(code(br#"{"cmd":5}"#), "missing_cmd");
    assert_eq!(code(br#"{"cmd":"register"}"#), "unknown_cmd");
    assert_eq!(code(br#"{"cmd":"SESSION_START"}"#), "bad_request");
    // Regression: a known cmd with an unknown enum value was `unknown_cmd`.
    assert_eq!(
        code(br#"{"cmd":"REGISTER","component_name":"c","session_token":"00","role":"admin"}"#),
        "bad_request"
    );
    assert_eq!(
        code(br#"{"cmd":"SESSION_CREATE","name":"s","mode":"paper"}"#),
        "bad_request"
    );
    assert_eq!(code(&vec![b'{'; protocol::MAX_LINE]), "line_too_long");
    let deep = "[".repeat(protocol::MAX_LINE - 1);
    assert_eq!(code(deep.as_bytes()), "malformed_json");
    assert!(check_parse(br#"{"cmd":"SESSION_LIST"}"#).is_ok());
}

/// Random byte lines to a real daemon: one ERROR each, and it keeps serving.
#[test]
fn daemon_survives_random_lines() {
    let h = Harness::new();
    let mut c = Conn::open(&h.sock);
    let mut other = Conn::open(&h.sock);
    let mut s = 0xC0FF_EE00_D15E_A5E5u64;
    let lines = 64;
    for i in 0..lines {
        let len = (splitmix(&mut s) % 3000) as usize;
        let mut line: Vec<u8> = (0..len)
            .map(|_| splitmix(&mut s) as u8)
            .filter(|&b| b != b'\n')
            .collect();
        if i % 4 == 0 {
            // JSON-looking garbage as well.
            line = format!(r#"{{"cmd":"{}","x":{}}}"#, i, splitmix(&mut s)).into_bytes();
        }
        line.push(b'\n');
        c.send(&line);
        let v = c.reply();
        assert_eq!(v["cmd"], "ERROR", "line {i} got {v}");
        if i % 16 == 0 {
            still_served(&mut other, "random lines");
        }
    }
    still_served(&mut c, "random lines on the same connection");
    still_served(&mut Conn::open(&h.sock), "random lines (a new connection)");
    assert!(h.try_status(DAEMON).is_none(), "the daemon died");
}

// ---------------------------------------------------------------------------------------------
// 3. The READY barrier
// ---------------------------------------------------------------------------------------------

/// Nothing flows before the trigger; a trigger with a component not READY fails within its
/// timeout and names it; once all are READY the trigger starts the session and the data flows
/// to the end.
#[test]
fn ready_barrier_holds_until_the_trigger() {
    let h = Harness::new();
    let token = h.create("barrier", "backtest", json!({}));
    let out = h.dir.join("tap.ndjson");
    let mut tap = Command::new(tool("aegis-tap"));
    tap.args([
        "--name",
        "tap",
        "--format",
        "ndjson",
        "--start-timeout",
        "60",
        "--out",
    ])
    .arg(&out)
    .arg("--socket")
    .arg(&h.sock)
    .env("AEGIS_SESSION_TOKEN", &token);
    let tap = h.spawn("aegis-tap", tap);
    let mut replay = Command::new(tool("aegis-replay"));
    replay
        .args(["--name", "replay", "--start-timeout", "60", "--socket"])
        .arg(&h.sock)
        .arg(KLINES_1M)
        .env("AEGIS_SESSION_TOKEN", &token);
    let replay = h.spawn("aegis-replay", replay);
    // A third component that registers (and heartbeats) but is not READY yet.
    let laggard = Component::connect(
        Some(&h.sock),
        Register {
            component_name: "laggard".into(),
            session_token: token.clone(),
            role: Some(Role::Consumer),
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register the laggard");
    let state_of = |v: &Value, name: &str| -> String {
        v["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    h.wait_inspect(
        "barrier",
        "READY (tap, replay)",
        Duration::from_secs(30),
        |v| state_of(v, "tap") == "ready" && state_of(v, "replay") == "ready",
    );
    // Give a would-be early flow a chance to show.
    std::thread::sleep(Duration::from_millis(500));
    let nothing_flowed = |when: &str, laggard_state: &str| {
        let v = h.inspect("barrier");
        assert_eq!(v["state"], "created", "{when}: {v:#}");
        assert_eq!(v["sequencer"]["events_merged"], 0, "{when}: {v:#}");
        for s in v["sources"].as_array().unwrap() {
            assert_eq!(s["events"], 0, "{when}: source {s}");
        }
        for c in v["consumers"].as_array().unwrap() {
            assert!(c["read"].as_u64().unwrap_or(0) == 0, "{when}: consumer {c}");
        }
        assert_eq!(state_of(&v, "laggard"), laggard_state, "{when}: {v:#}");
        let written = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        assert_eq!(written, 0, "{when}: the tap wrote output before STARTED");
        assert!(h.try_status(tap).is_none() && h.try_status(replay).is_none());
    };
    nothing_flowed("all READY but laggard, before any trigger", "registered");

    // The trigger with the laggard not READY: refused within its timeout, naming it.
    let r = h.shmctl(
        &["session", "start", "barrier", "--timeout", "1"],
        Duration::from_secs(30),
    );
    assert!(!r.status.success(), "start must fail: {}", r.stdout);
    assert!(
        r.stderr.contains("not READY: laggard") && r.stderr.contains("not_ready"),
        "the refusal must name the missing component: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("tap,") && !r.stderr.contains("replay"),
        "only the missing component is named: {}",
        r.stderr
    );
    nothing_flowed("after a refused trigger", "registered");

    // The laggard gets READY (and reads the bus to the end in a thread).
    let mut bus = laggard.consumer().expect("attach the bus");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> Result<u64, String> {
            laggard
                .ready(Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            let mut wait = Backoff::default();
            let mut n = 0;
            loop {
                let f = bus
                    .next(&mut wait, Deadline::after(CHILD_DEADLINE))
                    .map_err(|e| e.to_string())?;
                if f.is_eof() {
                    break;
                }
                f.event().map_err(|e| e.to_string())?;
                n += 1;
            }
            laggard.finished().map_err(|e| e.to_string())?;
            Ok(n)
        };
        let _ = tx.send(run());
    });
    h.wait_inspect("barrier", "READY (laggard)", Duration::from_secs(30), |v| {
        state_of(v, "laggard") == "ready"
    });
    nothing_flowed("all READY, before the trigger", "ready");

    let r = h.shmctl(
        &["session", "start", "barrier", "--timeout", "10"],
        Duration::from_secs(30),
    );
    assert!(r.status.success(), "start failed: {}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("started with 3 components"),
        "{}",
        r.stdout
    );
    h.wait_ok(replay, RUN);
    h.wait_ok(tap, RUN);
    let n = rx
        .recv_timeout(RUN)
        .expect("the laggard did not finish in time")
        .expect("the laggard's run");
    assert_eq!(n, KLINES_1M_EVENTS);
    let ndjson = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = ndjson.lines().collect();
    assert_eq!(lines.len() as u64, KLINES_1M_EVENTS);
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["seq"], 0);
    assert_eq!(first["kind"], "kline");
    let v = h.wait_inspect("barrier", "finished", Duration::from_secs(20), |v| {
        v["state"] == "finished"
    });
    assert_eq!(v["sequencer"]["events_merged"], KLINES_1M_EVENTS);
}

// ---------------------------------------------------------------------------------------------
// 4. Two sessions at once are isolated
// ---------------------------------------------------------------------------------------------

/// Runs `replay FILES` and `tap --format digest` in session `name` (auto-start, expect 2);
/// returns the index of both children and the digest file.
fn start_digest_run(h: &Harness, name: &str, files: &[&Path]) -> (usize, usize, PathBuf) {
    let token = h.create(
        name,
        "backtest",
        json!({"expect": 2, "bus_bytes": 65536, "source_bytes": 65536}),
    );
    let digest = h.dir.join(format!("{name}.digest"));
    let mut tap = Command::new(tool("aegis-tap"));
    tap.args([
        "--name",
        "tap",
        "--format",
        "digest",
        "--start-timeout",
        "60",
    ])
    .arg("--out")
    .arg(&digest)
    .arg("--socket")
    .arg(&h.sock)
    .env("AEGIS_SESSION_TOKEN", &token);
    let tap = h.spawn(&format!("{name}: aegis-tap"), tap);
    let mut replay = Command::new(tool("aegis-replay"));
    replay
        .args(["--name", "replay", "--start-timeout", "60", "--socket"])
        .arg(&h.sock)
        .args(files)
        .env("AEGIS_SESSION_TOKEN", &token);
    let replay = h.spawn(&format!("{name}: aegis-replay"), replay);
    (replay, tap, digest)
}

fn finish_digest_run(h: &Harness, name: &str, run: (usize, usize, PathBuf), events: u64) -> String {
    let (replay, tap, digest) = run;
    h.wait_ok(replay, RUN);
    h.wait_ok(tap, RUN);
    let v = h.wait_inspect(name, "finished", Duration::from_secs(20), |v| {
        v["state"] == "finished"
    });
    assert_eq!(v["sequencer"]["events_merged"], events, "{v:#}");
    let d = std::fs::read_to_string(digest).unwrap().trim().to_string();
    assert_eq!(d.len(), 64, "a hex digest: {d:?}");
    d
}

#[test]
fn concurrent_sessions_are_isolated() {
    let h = Harness::new();
    let (da, db) = (h.dir.join("a"), h.dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let trades_a = da.join("BTCUSDT-trades-2024-09-21.csv");
    let trades_b = db.join("ETHUSDT-trades-2024-08-01.csv");
    let n = 60_000;
    write_trades_csv(&trades_a, n, 1_726_876_800_000, 2_000, 1);
    write_trades_csv(&trades_b, n, 1_722_470_400_000, 90_000, 2);
    let files_a = [Path::new(KLINES_1M), trades_a.as_path()];
    let files_b = [Path::new(KLINES_1H), trades_b.as_path()];

    // Both at once.
    let a = start_digest_run(&h, "iso-a", &files_a);
    let b = start_digest_run(&h, "iso-b", &files_b);
    let both_a = finish_digest_run(&h, "iso-a", a, KLINES_1M_EVENTS + n);
    let both_b = finish_digest_run(&h, "iso-b", b, KLINES_1H_EVENTS + n);
    for (s, other_src) in [("iso-a", "ETHUSDT"), ("iso-b", "BTCUSDT-1m")] {
        let v = h.inspect(s);
        assert_eq!(v["sources"].as_array().unwrap().len(), 2, "{v:#}");
        assert!(
            !v["sources"].to_string().contains(other_src),
            "session {s} sees the other session's source: {v:#}"
        );
    }
    // Each alone.
    let a = start_digest_run(&h, "ref-a", &files_a);
    let alone_a = finish_digest_run(&h, "ref-a", a, KLINES_1M_EVENTS + n);
    let b = start_digest_run(&h, "ref-b", &files_b);
    let alone_b = finish_digest_run(&h, "ref-b", b, KLINES_1H_EVENTS + n);

    assert_ne!(
        alone_a, alone_b,
        "different data must give different digests"
    );
    assert_eq!(both_a, alone_a, "session A's stream depends on session B");
    assert_eq!(both_b, alone_b, "session B's stream depends on session A");
}

// ---------------------------------------------------------------------------------------------
// 4b. A stuck component does not stall the control plane
// ---------------------------------------------------------------------------------------------

/// Heartbeats the stuck component sends without reading a single reply: far more reply bytes
/// (with the kernel's per-message overhead) than a Unix socket buffers.
const FLOOD_HEARTBEATS: usize = 20_000;
/// The bound on one control request of another session while a component is stuck. The old
/// daemon wrote to components under its global lock, with a 2 s write timeout per message, so
/// every request of every session waited at least ~2 s behind one stuck component. 1 s is far
/// below that and far above a healthy reply (~1 ms), so a loaded 2-core CI machine does not
/// make this flaky.
const UNSTUCK_BOUND: Duration = Duration::from_secs(1);

/// Writes as many of `lines` as the socket takes without blocking for long; returns how many.
fn flood(s: &UnixStream, line: &[u8], lines: usize) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let mut pending: &[u8] = &[];
    let mut stalled_since: Option<Instant> = None;
    let mut w = s;
    while sent < lines {
        if pending.is_empty() {
            pending = line;
        }
        match w.write(pending) {
            Ok(n) => {
                pending = &pending[n..];
                if pending.is_empty() {
                    sent += 1;
                }
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The daemon stopped reading us (the old one blocks in a write to us).
                let t = stalled_since.get_or_insert_with(Instant::now);
                if t.elapsed() > Duration::from_millis(500) && pending.len() == line.len() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("flood: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    sent
}

/// Runs `req` on a fresh connection; returns the reply and how long it took.
fn timed(h: &Harness, req: &Value) -> (Value, Duration) {
    let t = Instant::now();
    let v = h.request(req);
    (v, t.elapsed())
}

/// A component that never reads its socket (its receive side full of unread replies) must not
/// delay the control traffic of another session: writes to components happen outside the
/// daemon's global lock, on the component's own writer.
#[test]
fn stuck_component_does_not_stall_other_sessions() {
    let h = Harness::new();
    let token_a = h.create("stuck-a", "backtest", json!({}));
    let mut producer = Conn::open(&h.sock);
    let mut reg = register("prod-a", &token_a, "producer");
    reg["sources"] = json!([{"name": "src-a", "kind": "trade", "topic": "trades.A"}]);
    expect_data(&producer.call(&reg));
    assert_eq!(producer.call(&json!({"cmd": "READY"}))["cmd"], "WAIT");
    let mut stuck = Conn::open(&h.sock);
    assert_eq!(
        stuck.call(&register("stuck", &token_a, "consumer"))["cmd"],
        "ACK"
    );
    stuck.send_json(&json!({"cmd": "READY"}));
    // Never read `stuck` again: flood it with heartbeats whose replies fill its socket.
    let mut hb = serde_json::to_vec(&json!({"cmd": "HEARTBEAT"})).unwrap();
    hb.push(b'\n');
    let sent = flood(&stuck.s, &hb, FLOOD_HEARTBEATS);
    eprintln!("stuck component: {sent} heartbeats sent, none of the replies read");
    std::thread::sleep(Duration::from_millis(300));

    // Each step: a request on session A that writes to the stuck component runs in the
    // background, and a request of session B is timed meanwhile.
    let mut times = Vec::new();
    let mut step = |what: &str, a_req: Value, b_req: Value| -> Value {
        let sock = h.sock.clone();
        let bg = std::thread::spawn(move || Conn::open(&sock).call(&a_req));
        std::thread::sleep(Duration::from_millis(200));
        let (v, took) = timed(&h, &b_req);
        eprintln!("{what}: {took:?} while session A writes to its stuck component");
        times.push((what.to_string(), took));
        let _ = bg.join();
        v
    };
    let start_a = json!({"cmd": "SESSION_START", "name": "stuck-a", "timeout_ms": 5000});
    let stop_a = json!({"cmd": "SESSION_STOP", "name": "stuck-a"});
    let v = step(
        "create B",
        start_a,
        json!({"cmd": "SESSION_CREATE", "name": "stuck-b", "mode": "backtest"}),
    );
    let token_b = expect_data(&v)["token"].as_str().unwrap().to_string();
    h.track_sessions();
    let mut producer_b = Conn::open(&h.sock);
    let mut reg = register("prod-b", &token_b, "producer");
    reg["sources"] = json!([{"name": "src-b", "kind": "trade", "topic": "trades.B"}]);
    expect_data(&producer_b.call(&reg));
    assert_eq!(producer_b.call(&json!({"cmd": "READY"}))["cmd"], "WAIT");
    let v = step(
        "start B",
        stop_a.clone(),
        json!({"cmd": "SESSION_START", "name": "stuck-b", "timeout_ms": 5000}),
    );
    expect_data(&v);
    let v = step(
        "inspect B",
        stop_a,
        json!({"cmd": "SESSION_INSPECT", "name": "stuck-b"}),
    );
    expect_data(&v);
    for (what, took) in &times {
        assert!(
            *took < UNSTUCK_BOUND,
            "{what} took {took:?} (bound {UNSTUCK_BOUND:?}): a stuck component stalls other \
             sessions; all: {times:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. kill -9 of a consumer mid-stream
// ---------------------------------------------------------------------------------------------

#[test]
fn killed_consumer_does_not_hold_back_the_other() {
    const EVENTS: u64 = 300_000;
    const PAUSE_AT: u64 = 20_000;
    let h = Harness::new();
    let token = h.create(
        "kill-consumer",
        "backtest",
        json!({"expect": 3, "bus_bytes": 65536, "source_bytes": 65536}),
    );
    let prod = h.role(
        "producer",
        "prod",
        &token,
        &[(ENV_EVENTS, EVENTS.to_string())],
    );
    let victim = h.role(
        "consumer",
        "victim",
        &token,
        &[(ENV_PAUSE_AT, PAUSE_AT.to_string())],
    );
    let survivor = h.role("consumer", "survivor", &token, &[]);
    h.wait_stdout(victim, &format!("{MARK}paused at {PAUSE_AT}"), RUN);
    // The victim holds the bus back (backtest never drops): the stream is stuck mid-way.
    std::thread::sleep(Duration::from_millis(300));
    let v = h.inspect("kill-consumer");
    assert_eq!(v["state"], "running", "{v:#}");
    let merged = v["sequencer"]["events_merged"].as_u64().unwrap();
    assert!(
        (PAUSE_AT..EVENTS).contains(&merged),
        "the kill must happen mid-stream: {merged} of {EVENTS} merged"
    );
    assert!(!h.stdout(survivor).contains("consumer done"));

    h.kill9(victim);
    h.wait_ok(prod, RUN);
    h.wait_ok(survivor, RUN);
    let out = h.stdout(survivor);
    assert!(
        out.contains(&format!("consumer done count={EVENTS} in-order")),
        "the survivor must get every event: {out}"
    );
    let v = h.wait_inspect("kill-consumer", "finished", Duration::from_secs(20), |v| {
        v["state"] == "finished"
    });
    assert_eq!(v["sequencer"]["events_merged"], EVENTS);
    let comp = |name: &str| {
        v["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(comp("victim")["state"], "dead", "{v:#}");
    assert!(comp("victim")["reason"].is_string(), "{v:#}");
    assert_eq!(comp("survivor")["state"], "finished", "{v:#}");
    let victim_slot = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "victim")
        .cloned()
        .unwrap();
    assert_eq!(victim_slot["state"], "dead", "{v:#}");
}

// ---------------------------------------------------------------------------------------------
// 6. kill -9 of a producer mid-stream
// ---------------------------------------------------------------------------------------------

#[test]
fn killed_producer_fails_the_backtest() {
    const EVENTS: u64 = 300_000;
    const PAUSE_AT: u64 = 50_000;
    let h = Harness::new();
    let token = h.create(
        "kill-producer",
        "backtest",
        json!({"expect": 2, "bus_bytes": 65536, "source_bytes": 65536}),
    );
    let prod = h.role(
        "producer",
        "doomed-feed",
        &token,
        &[
            (ENV_EVENTS, EVENTS.to_string()),
            (ENV_PAUSE_AT, PAUSE_AT.to_string()),
        ],
    );
    let mut tap = Command::new(tool("aegis-tap"));
    tap.args([
        "--name",
        "tap",
        "--format",
        "count",
        "--start-timeout",
        "60",
        "--socket",
    ])
    .arg(&h.sock)
    .env("AEGIS_SESSION_TOKEN", &token);
    let tap = h.spawn("aegis-tap", tap);
    h.wait_stdout(prod, &format!("{MARK}paused at {PAUSE_AT}"), RUN);
    h.wait_inspect("kill-producer", "merging", Duration::from_secs(20), |v| {
        // The sequencer may hold the last frame back until it sees what follows it (an
        // equal-ts frame of a higher-priority kind could come next).
        v["state"] == "running" && v["sequencer"]["events_merged"].as_u64() >= Some(PAUSE_AT - 1)
    });

    h.kill9(prod);
    let v = h.wait_inspect("kill-producer", "failed", Duration::from_secs(20), |v| {
        v["state"] == "failed"
    });
    let reason = v["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("doomed-feed"),
        "the reason must name the producer: {v:#}"
    );
    let c = &v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "doomed-feed")
        .cloned()
        .unwrap();
    assert_eq!(c["state"], "dead", "{v:#}");
    // The consumer sees the aborted stream (or the STOP naming the producer) and does not
    // pretend the stream was complete.
    let st = h.wait(tap, Duration::from_secs(30));
    let err = h.stderr(tap);
    assert!(!st.success(), "the tap must fail: {err}");
    assert!(
        err.contains("stream is incomplete") || err.contains("doomed-feed"),
        "the tap must say why: {err}"
    );
    // And the session refuses to restart.
    expect_error(
        &h.request(&json!({"cmd": "SESSION_START", "name": "kill-producer"})),
        "session_started",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. kill -9 of the daemon, then gc
// ---------------------------------------------------------------------------------------------

#[test]
fn gc_cleans_up_after_a_killed_daemon() {
    let h = Harness::new();
    let token = h.create("orphan", "backtest", json!({}));
    let producer = Component::connect(
        Some(&h.sock),
        Register {
            component_name: "prod".into(),
            session_token: token,
            role: Some(Role::Producer),
            sources: vec![SourceDecl {
                name: "feed".into(),
                kind: SourceKind::Book,
                topic: "book.BTCUSDT".into(),
                journal: None,
                recording: None,
            }],
            pid: Some(std::process::id()),
            ..Register::default()
        },
    )
    .expect("register");
    let segs = h.segments();
    assert_eq!(segs.len(), 3, "bus, ctl and one source ring: {segs:?}");
    assert!(segs
        .iter()
        .any(|p| p.to_string_lossy().ends_with("-src-feed")));

    h.kill9(DAEMON);
    drop(producer);
    // SIGKILL leaves the segments behind. (A `gc` run by another test process on this
    // machine may legitimately remove them first: their creator is dead.)
    let before = h.segments().len();
    if before != 3 {
        eprintln!(
            "note: {} of 3 segments were already collected by another gc",
            3 - before
        );
    }
    assert!(h.sock.exists(), "SIGKILL leaves the socket file behind");

    let r = h.shmctl(&["gc"], Duration::from_secs(30));
    assert!(r.status.success(), "gc failed: {}{}", r.stdout, r.stderr);
    let left = h.segments();
    assert!(left.is_empty(), "gc left {left:?}\n{}", r.stdout);
    assert!(!h.sock.exists(), "gc left the stale socket\n{}", r.stdout);
    assert!(
        r.stdout.contains("removed stale socket"),
        "gc says what it did: {}",
        r.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// 8. The peer-uid check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_peer_rules() {
    use aegis::daemon::check_peer;
    assert!(check_peer(1000, 1000).is_ok());
    assert!(check_peer(0, 1000).is_ok(), "root may always connect");
    assert!(check_peer(0, 0).is_ok());
    let e = check_peer(1001, 1000).unwrap_err();
    assert!(e.contains("1001") && e.contains("1000"), "{e}");
    assert!(check_peer(65534, 0).is_err());
    assert!(
        check_peer(u32::MAX, 1000).is_err(),
        "unknown peer credentials"
    );
}

/// A copy of `aegis-shmctl` that any uid can execute, in a fresh `/tmp` directory (mode 0755)
/// removed on drop.
struct ExeCopy {
    dir: PathBuf,
    path: PathBuf,
}

impl ExeCopy {
    /// The copy, or `None` (with the reason printed) when it cannot be made.
    fn new() -> Option<ExeCopy> {
        let dir = PathBuf::from(format!("/tmp/aegis-cp-exe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let copy = ExeCopy {
            path: dir.join("aegis-shmctl"),
            dir,
        };
        let made = std::fs::create_dir(&copy.dir)
            .and_then(|()| {
                std::fs::set_permissions(&copy.dir, std::fs::Permissions::from_mode(0o755))
            })
            .and_then(|()| std::fs::copy(shmctl_bin(), &copy.path).map(|_| ()))
            .and_then(|()| {
                std::fs::set_permissions(&copy.path, std::fs::Permissions::from_mode(0o755))
            });
        match made {
            Ok(()) => Some(copy),
            Err(e) => {
                eprintln!(
                    "skipped: cannot copy aegis-shmctl to {} for another uid: {e}",
                    copy.dir.display()
                );
                None
            }
        }
    }
}

impl Drop for ExeCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// As root: a client running as uid 65534 reaches the socket (permissions relaxed for this
/// test only) and is refused by SO_PEERCRED; the daemon keeps serving.
#[test]
fn other_uid_is_refused() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("not root: only `check_peer_rules` covers the peer-uid check here");
        return;
    }
    // The clone (and so the binary) may sit in a directory uid 65534 cannot enter (a 0700
    // home, say): the other uid runs a copy in a world-readable temp directory.
    let Some(exe) = ExeCopy::new() else {
        return;
    };
    let h = Harness::new();
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&h.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cmd = Command::new(&exe.path);
    cmd.arg("--socket")
        .arg(&h.sock)
        .args(["session", "list"])
        .uid(65534)
        .gid(65534);
    let i = h.spawn("aegis-shmctl as uid 65534", cmd);
    let st = h.wait(i, Duration::from_secs(30));
    let err = h.stderr(i);
    assert!(!st.success(), "uid 65534 must be refused: {}", h.stdout(i));
    assert!(
        err.contains("permission_denied") && err.contains("peer uid 65534"),
        "the refusal must come from the peer check: {err}"
    );
    still_served(&mut Conn::open(&h.sock), "a refused uid");
}

// ---------------------------------------------------------------------------------------------
// 9. `session run` exit status
// ---------------------------------------------------------------------------------------------

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn session_run_exit_status() {
    let h = Harness::new();
    let replay = tool("aegis-replay");
    let tap = tool("aegis-tap");
    let run = |name: &str, commands: &[String], timeout: u64| -> Output {
        let mut args = vec![
            "session".to_string(),
            "run".into(),
            name.into(),
            "--mode".into(),
            "backtest".into(),
            "--timeout".into(),
            timeout.to_string(),
        ];
        for c in commands {
            args.push("-c".into());
            args.push(c.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.shmctl(&args, Duration::from_secs(timeout + 30))
    };
    let producer = format!("{} --start-timeout 60 {KLINES_1M}", replay.display());
    let consumer = format!("{} --start-timeout 60 --format count", tap.display());

    // Every component exits 0 and the session finishes: exit 0.
    let r = run("run-ok", &[producer.clone(), consumer.clone()], 60);
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("session run-ok: finished"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("{KLINES_1M_EVENTS} events merged")),
        "{}",
        r.stdout
    );

    // The session finishes but one component exits 3: non-zero, and the summary says which.
    let r = run(
        "run-exit3",
        &[producer.clone(), format!("{consumer} >/dev/null; exit 3")],
        60,
    );
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("session run-exit3: finished"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("exit 3"), "{}", r.stdout);

    // A component exits 3 before registering: the session (expect = 3) can never start. The
    // run ends well before its --timeout, non-zero, says why, and leaves no component behind.
    let tag = format!("cp-leak-{}", std::process::id());
    let r = run(
        "run-early-exit",
        &[
            format!(
                "{} --name {tag}-replay --start-timeout 60 {KLINES_1M}",
                replay.display()
            ),
            format!(
                "{} --name {tag}-tap --start-timeout 60 --format count",
                tap.display()
            ),
            "exit 3".into(),
        ],
        60,
    );
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("exit 3"), "{}", r.stdout);
    assert!(
        r.stdout.contains("before the session started"),
        "the summary must say why the session never ran: {}",
        r.stdout
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_with(&tag);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "session run left its components running: pids {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A component that never registers nor exits: the run ends at its --timeout, non-zero,
    // and kills every component with everything they started (a shell may fork the command
    // rather than exec it: killing only the `sh -c` used to leave the component running).
    let sleep_arg = format!("120.{}", std::process::id());
    let script = h.dir.join(format!("{tag}-sleeper.sh"));
    std::fs::write(&script, format!("sleep {sleep_arg}\n")).unwrap();
    let r = run(
        "run-timeout",
        &[
            format!(
                "{} --name {tag}-replay2 --start-timeout 60 {KLINES_1M}",
                replay.display()
            ),
            format!("sh {}", script.display()),
        ],
        3,
    );
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("timed out after 3 s"), "{}", r.stdout);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = processes_with(&tag);
        left.extend(processes_with(&sleep_arg));
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "session run left processes behind after its timeout: pids {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `session run` destroys its sessions.
    let list = h.request(&json!({"cmd": "SESSION_LIST"}));
    assert_eq!(expect_data(&list), json!([]), "{list}");
}

// ---------------------------------------------------------------------------------------------
// 8. Stalled, not dead: a paused producer in a backtest
// ---------------------------------------------------------------------------------------------

/// Longer than the daemon's heartbeat timeout (protocol::HEARTBEAT_TIMEOUT_MS) with a margin:
/// a component paused this long used to be declared dead.
const LONGER_THAN_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(8);

/// The entry of component `name` in an inspect view.
fn component_of<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["components"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

/// A backtest producer stopped (SIGSTOP: no heartbeats) for longer than the heartbeat
/// timeout is `stalled`, never dead, and the session does not fail: it waits. After SIGCONT
/// the session finishes and the consumer has every event, in order.
#[test]
fn paused_producer_is_stalled_not_dead_in_backtest() {
    const EVENTS: u64 = 100_000;
    const STOP_AT: u64 = 30_000;
    let h = Harness::new();
    let token = h.create(
        "paused-producer",
        "backtest",
        json!({"expect": 2, "bus_bytes": 65536, "source_bytes": 65536}),
    );
    let prod = h.role(
        "producer",
        "feed",
        &token,
        &[
            (ENV_EVENTS, EVENTS.to_string()),
            (ENV_STOP_AT, STOP_AT.to_string()),
        ],
    );
    let cons = h.role("consumer", "reader", &token, &[]);
    h.wait_stdout(prod, &format!("{MARK}stopping at {STOP_AT}"), RUN);
    let end = Instant::now() + LONGER_THAN_HEARTBEAT_TIMEOUT;
    let mut stalled = None;
    while Instant::now() < end {
        let v = h.inspect("paused-producer");
        let feed = component_of(&v, "feed");
        assert_ne!(
            feed["state"], "dead",
            "a paused producer is not dead: {v:#}"
        );
        assert_eq!(
            v["state"], "running",
            "the backtest must wait for it: {v:#}"
        );
        if feed["state"] == "stalled" {
            stalled = Some(v.clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = stalled.expect("inspect never showed the paused producer as stalled");
    let reason = component_of(&v, "feed")["reason"].as_str().unwrap_or("");
    assert!(reason.contains("heartbeat"), "say why it is stalled: {v:#}");
    // The text view shows it too.
    let text = h.shmctl(&["session", "inspect", "paused-producer"], REPLY);
    assert!(text.status.success(), "inspect failed: {}", text.stderr);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.contains("feed") && l.contains("stalled")),
        "the text inspect must show the producer stalled:\n{}",
        text.stdout
    );

    kill(Pid::from_raw(h.pid(prod) as i32), Signal::SIGCONT).expect("SIGCONT");
    h.wait_ok(prod, RUN);
    h.wait_ok(cons, RUN);
    let out = h.stdout(cons);
    assert!(
        out.contains(&format!("consumer done count={EVENTS} in-order")),
        "the consumer must get every event: {out}"
    );
    let v = h.wait_inspect(
        "paused-producer",
        "finished",
        Duration::from_secs(20),
        |v| v["state"] == "finished",
    );
    assert_eq!(v["sequencer"]["events_merged"], EVENTS, "{v:#}");
    assert_eq!(component_of(&v, "feed")["state"], "finished", "{v:#}");
}

/// Registers a consumer named `name` from this process.
fn consumer_here(h: &Harness, name: &str, token: &str) -> Component {
    Component::connect(
        Some(&h.sock),
        Register {
            component_name: name.into(),
            session_token: token.into(),
            role: Some(Role::Consumer),
            ..Register::default()
        },
    )
    .unwrap_or_else(|e| panic!("register {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 9. session evict
// ---------------------------------------------------------------------------------------------

/// A consumer that attached the bus and never reads holds a backtest back; `session evict`
/// marks it dead with the reason, tells it (ERROR evicted, seen by the client library), and
/// releases its slot: the other consumer gets every event and the session finishes. Evicting
/// it again, or a name the session does not know, is a clear error.
#[test]
fn evicted_consumer_is_dead_and_the_other_gets_every_event() {
    const EVENTS: u64 = 200_000;
    let h = Harness::new();
    let token = h.create(
        "evict",
        "backtest",
        json!({"expect": 3, "bus_bytes": 65536, "source_bytes": 65536}),
    );
    let prod = h.role(
        "producer",
        "prod",
        &token,
        &[(ENV_EVENTS, EVENTS.to_string())],
    );
    let survivor = h.role("consumer", "survivor", &token, &[]);
    // The victim, in this process: attached, READY, never reading.
    let victim = consumer_here(&h, "victim", &token);
    let _bus = victim.consumer().expect("attach the bus");
    victim.ready(RUN).expect("STARTED");
    h.wait_inspect("evict", "held back by the victim", RUN, |v| {
        v["state"] == "running" && v["sequencer"]["consumer_stalls"].as_u64() > Some(0)
    });
    assert!(victim.evicted().is_none());

    let out = h.shmctl(&["--json", "session", "evict", "evict", "victim"], REPLY);
    assert!(out.status.success(), "session evict failed: {}", out.stderr);
    let answer: Value = serde_json::from_str(&out.stdout).expect("evict --json prints JSON");
    assert_eq!(answer["component"], "victim", "{answer}");
    assert_eq!(answer["role"], "consumer", "{answer}");

    // The victim is told.
    let end = Instant::now() + REPLY;
    let told = loop {
        if let Some(m) = victim.evicted() {
            break m;
        }
        assert!(
            Instant::now() < end,
            "the victim was not told it was evicted"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(told.contains("evict"), "{told}");
    assert!(
        victim
            .stop_requested()
            .is_some_and(|r| r.starts_with("evicted")),
        "{:?}",
        victim.stop_requested()
    );

    // The others go on without it.
    h.wait_ok(prod, RUN);
    h.wait_ok(survivor, RUN);
    let out = h.stdout(survivor);
    assert!(
        out.contains(&format!("consumer done count={EVENTS} in-order")),
        "the survivor must get every event: {out}"
    );
    let v = h.wait_inspect("evict", "finished", Duration::from_secs(20), |v| {
        v["state"] == "finished"
    });
    assert_eq!(v["sequencer"]["events_merged"], EVENTS, "{v:#}");
    let c = component_of(&v, "victim");
    assert_eq!(c["state"], "dead", "{v:#}");
    assert!(
        c["reason"].as_str().is_some_and(|r| r.contains("evicted")),
        "the reason must say it was evicted: {v:#}"
    );

    // Clear errors.
    let evict = |session: &str, component: &str| {
        h.request(&json!({"cmd": "SESSION_EVICT", "name": session, "component": component}))
    };
    let msg = expect_error(&evict("evict", "victim"), "component_gone");
    assert!(msg.contains("victim"), "{msg}");
    let msg = expect_error(&evict("evict", "nobody"), "no_component");
    assert!(msg.contains("nobody"), "{msg}");
    expect_error(&evict("no-such-session", "victim"), "no_session");
    let out = h.shmctl(&["session", "evict", "evict", "nobody"], REPLY);
    assert!(
        !out.status.success(),
        "evict of an unknown component must fail"
    );
    assert!(
        out.stderr.contains("nobody") && out.stderr.contains("no_component"),
        "the CLI must say why: {}",
        out.stderr
    );
    drop(victim);
}

// ---------------------------------------------------------------------------------------------
// 10. A late consumer in a live session
// ---------------------------------------------------------------------------------------------

/// A consumer that registers after a live session started is accepted, gets STARTED at once,
/// and reads from the head: not one event merged before it attached, every one after.
#[test]
fn late_live_consumer_starts_at_the_head() {
    const EVENTS: u64 = 20_000;
    const STOP_AT: u64 = 5_000;
    let h = Harness::new();
    let token = h.create("late", "live", json!({"expect": 1}));
    let prod = h.role(
        "producer",
        "feed",
        &token,
        &[
            (ENV_EVENTS, EVENTS.to_string()),
            (ENV_STOP_AT, STOP_AT.to_string()),
        ],
    );
    h.wait_stdout(prod, &format!("{MARK}stopping at {STOP_AT}"), RUN);
    // The producer is stopped: once the first STOP_AT events are merged, nothing moves.
    h.wait_inspect("late", "merged the first events", RUN, |v| {
        v["state"] == "running" && v["sequencer"]["events_merged"] == STOP_AT
    });
    let late = consumer_here(&h, "late", &token);
    let mut bus = late.consumer().expect("attach the bus");
    late.ready(REPLY)
        .expect("STARTED at once for a late consumer");
    kill(Pid::from_raw(h.pid(prod) as i32), Signal::SIGCONT).expect("SIGCONT");

    let mut wait = Backoff::default();
    let mut ids = Vec::new();
    loop {
        let f = bus
            .next(&mut wait, Deadline::after(RUN))
            .unwrap_or_else(|e| panic!("late consumer, after {} events: {e}", ids.len()));
        if f.is_eof() {
            break;
        }
        match f.event().expect("a valid event") {
            EventRef::Trade(t) => ids.push(t.id.to_native()),
            _ => panic!("only trades were produced"),
        }
    }
    let expected: Vec<u64> = (STOP_AT..EVENTS).collect();
    assert!(
        ids == expected,
        "the late consumer must read from the head (trade {STOP_AT}) to the end, in order: \
         got {} events, first {:?}, last {:?}",
        ids.len(),
        ids.first(),
        ids.last()
    );
    late.finished().expect("FINISHED");
    h.wait_ok(prod, RUN);
    let v = h.wait_inspect("late", "finished", Duration::from_secs(20), |v| {
        v["state"] == "finished"
    });
    assert_eq!(component_of(&v, "late")["state"], "finished", "{v:#}");
}
