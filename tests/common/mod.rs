//! What the multi-process integration tests share: the binaries, a private directory, a
//! guard that owns every process and segment a test starts, and `session run` with its JSON
//! summary. Each test file includes it with `mod common;` and uses what it needs.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aegis_shm_client::segment::{SegmentHeader, SEGMENT_MAGIC, SHM_DIR};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// How long `session run` may take (passed as its `--timeout`), and our own deadline on it.
pub const RUN_TIMEOUT_S: u64 = 300;
pub const RUN_DEADLINE: Duration = Duration::from_secs(RUN_TIMEOUT_S + 60);
/// How long a daemon may take to listen, and to exit after SIGTERM.
pub const DAEMON_START: Duration = Duration::from_secs(30);
pub const DAEMON_STOP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Binaries, serialisation, temporary directories
// ---------------------------------------------------------------------------------------------

pub struct Bins {
    pub shmctl: PathBuf,
    pub replay: PathBuf,
    pub tap: PathBuf,
}

pub fn bins() -> Bins {
    let shmctl = PathBuf::from(env!("CARGO_BIN_EXE_aegis-shmctl"));
    let find = |name: &str| {
        let p = shmctl.with_file_name(name);
        assert!(
            p.is_file(),
            "{name} not found at {}: build the whole workspace first \
             (`cargo build --release --workspace`, or without --release for a debug test run)",
            p.display()
        );
        p
    };
    let (replay, tap) = (find("aegis-replay"), find("aegis-tap"));
    Bins {
        shmctl,
        replay,
        tap,
    }
}

/// An example binary, built by `cargo test` next to the test binaries' profile directory.
pub fn example(b: &Bins, name: &str) -> PathBuf {
    let p = b
        .shmctl
        .parent()
        .expect("the profile directory")
        .join("examples")
        .join(name);
    assert!(
        p.is_file(),
        "example {name} not found at {}: `cargo test` builds the examples (or `cargo build --release --examples -p aegis-shm-client`)",
        p.display()
    );
    p
}

/// A Binance trades CSV `BTCUSDT-trades-2024-09-21.csv` in `dir`: `n` rows one ms apart, ids
/// from 0.
pub fn trades_csv(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("BTCUSDT-trades-2024-09-21.csv");
    let rows: String = (0..n)
        .map(|i| {
            format!(
                "{i},63201.{:02},0.001,63.2,{},true,true\n",
                i % 100,
                1_726_876_800_000 + i
            )
        })
        .collect();
    std::fs::write(&path, rows).unwrap();
    path
}

/// One test at a time (see the module docs). A failed test poisons the lock; the next one
/// goes on regardless.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new private (0700) directory under the system temporary directory.
pub fn unique_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "aegis-e2e-{}-{tag}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    dir
}

/// Quotes `p` for `sh -c`.
pub fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The last `n` bytes of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&s[s.len().saturating_sub(n)..]).into_owned()
}

pub fn pid_alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

// ---------------------------------------------------------------------------------------------
// /dev/shm
// ---------------------------------------------------------------------------------------------

/// An `aegis-*` file in /dev/shm, with the creator pid of its segment header (if it has one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShmFile {
    pub name: String,
    pub creator: Option<u32>,
}

pub fn shm_files() -> Vec<ShmFile> {
    let Ok(rd) = fs::read_dir(SHM_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<ShmFile> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            name.starts_with("aegis-").then(|| ShmFile {
                creator: creator_pid(&e.path()),
                name,
            })
        })
        .collect();
    out.sort();
    out
}

/// The creator pid recorded in a segment's header (public layout of `aegis-shm-client`).
pub fn creator_pid(path: &Path) -> Option<u32> {
    let at = std::mem::offset_of!(SegmentHeader, creator_pid);
    let mut buf = vec![0u8; at + 4];
    fs::File::open(path).ok()?.read_exact(&mut buf).ok()?;
    let magic = u64::from_ne_bytes(buf[..8].try_into().ok()?);
    (magic == SEGMENT_MAGIC).then(|| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()))
}

/// The session id in a segment name `aegis-<sid>-<suffix>`.
pub fn sid_of(name: &str) -> Option<&str> {
    name.strip_prefix("aegis-")?.split('-').next()
}

/// Removes every `/dev/shm/aegis-<sid>-*`.
pub fn remove_session_segments(sid: &str) {
    let prefix = format!("aegis-{sid}-");
    for f in shm_files() {
        if f.name.starts_with(&prefix) {
            let _ = fs::remove_file(Path::new(SHM_DIR).join(&f.name));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

/// Owns a test's directory, daemon and child process groups. Drop (also on panic) kills the
/// groups (SIGKILL), stops the daemon (SIGTERM, then SIGKILL), removes the segments of that
/// daemon's sessions and the directory.
pub struct Harness {
    pub dir: PathBuf,
    pub daemon: Option<Child>,
    pub daemon_pid: Option<u32>,
    /// Children started in their own process group (pgid = pid).
    pub groups: Vec<Child>,
    /// Session ids seen in this test (their segments are removed at the end).
    pub sids: BTreeSet<String>,
    /// Other directories to remove at the end.
    pub dirs: Vec<PathBuf>,
}

impl Harness {
    pub fn new(tag: &str) -> Harness {
        Harness {
            dir: unique_dir(tag),
            daemon: None,
            daemon_pid: None,
            groups: Vec::new(),
            sids: BTreeSet::new(),
            dirs: Vec::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("aegis.sock")
    }

    /// Starts `aegis-shmctl serve` on the private socket and waits until it accepts.
    pub fn start_daemon(&mut self, b: &Bins) -> PathBuf {
        let socket = self.socket();
        let log = fs::File::create(self.dir.join("daemon.log")).expect("daemon log");
        let child = Command::new(&b.shmctl)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn aegis-shmctl serve");
        self.daemon_pid = Some(child.id());
        self.daemon = Some(child);
        let end = Instant::now() + DAEMON_START;
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return socket;
            }
            if let Some(st) = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                panic!(
                    "the daemon exited ({st}) before listening:\n{}",
                    tail(&self.dir.join("daemon.log"), 4000)
                );
            }
            assert!(
                Instant::now() < end,
                "the daemon did not listen on {} within {DAEMON_START:?}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns `cmd` in a new process group owned by the guard; returns its index.
    pub fn spawn(&mut self, cmd: &mut Command, what: &str) -> usize {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        self.groups.push(child);
        self.groups.len() - 1
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.groups[i].id()
    }

    /// Waits for child `i` to exit, up to `deadline`; calls `tick` every 50 ms meanwhile.
    pub fn wait(
        &mut self,
        i: usize,
        deadline: Duration,
        what: &str,
        mut tick: impl FnMut(),
    ) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.groups[i].try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= end {
                let pid = self.groups[i].id();
                panic!(
                    "{what} did not finish within {deadline:?}; where it is:\n{}",
                    where_is(pid)
                );
            }
            tick();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the whole process group of child `i`, then reaps the child.
    pub fn kill_group(&mut self, i: usize) {
        let c = &mut self.groups[i];
        let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
        let _ = c.wait();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for i in 0..self.groups.len() {
            self.kill_group(i);
        }
        if let Some(mut d) = self.daemon.take() {
            // SIGTERM first: the daemon removes its segments and its socket.
            let _ = kill(Pid::from_raw(d.id() as i32), Signal::SIGTERM);
            let end = Instant::now() + DAEMON_STOP;
            while Instant::now() < end && matches!(d.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = killpg(Pid::from_raw(d.id() as i32), Signal::SIGKILL);
            let _ = d.wait();
        }
        // Whatever the daemon left: the segments it created, and those of the sessions seen.
        if let Some(dpid) = self.daemon_pid {
            for f in shm_files() {
                if f.creator == Some(dpid) {
                    if let Some(sid) = sid_of(&f.name) {
                        self.sids.insert(sid.to_string());
                    }
                }
            }
        }
        for sid in &self.sids {
            remove_session_segments(sid);
        }
        for d in self.dirs.iter().chain([&self.dir]) {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// What a stuck process is doing, for a failure message: its state and, per thread, the
/// kernel wait channel, then every thread's stack from gdb (if the machine has it).
pub fn where_is(pid: u32) -> String {
    let mut out = String::new();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for l in status.lines().filter(|l| l.starts_with("State:")) {
        out.push_str(l);
        out.push('\n');
    }
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
            out.push_str(&format!(
                "thread {} {}: wchan {}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan").trim()
            ));
        }
    }
    let gdb = Command::new("timeout")
        .args(["30", "gdb", "-batch", "-p", &pid.to_string()])
        .args(["-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output();
    match gdb {
        Ok(o) if o.status.success() => out.push_str(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => out.push_str(&format!(
            "(gdb: {}) {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => out.push_str(&format!("(no gdb: {e})")),
    }
    out
}

/// Spawns a process that spins on a CPU until killed (by the guard, by pid).
pub fn busy_loop(h: &mut Harness) -> usize {
    h.spawn(
        Command::new("sh")
            .arg("-c")
            .arg("while :; do :; done")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "a busy loop",
    )
}

// ---------------------------------------------------------------------------------------------
// Input files
// Runs
// ---------------------------------------------------------------------------------------------

/// What `session run --json` produced.
pub struct RunOutput {
    pub status: ExitStatus,
    /// Everything before the summary (components that print on stdout).
    pub stdout_head: String,
    pub summary: Value,
    pub stderr: String,
}

/// Runs `aegis-shmctl --json session run NAME --mode MODE EXTRA -c CMD...` under the guard,
/// with stdout and stderr in files.
pub fn session_run(
    h: &mut Harness,
    b: &Bins,
    socket: &Path,
    name: &str,
    mode: &str,
    extra: &[&str],
    commands: &[String],
) -> RunOutput {
    let out_path = h.dir.join(format!("{name}.stdout"));
    let err_path = h.dir.join(format!("{name}.stderr"));
    let mut cmd = Command::new(&b.shmctl);
    cmd.arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(["session", "run", name, "--mode", mode, "--timeout"])
        .arg(RUN_TIMEOUT_S.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"));
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let i = h.spawn(&mut cmd, "aegis-shmctl session run");
    let status = h.wait(i, RUN_DEADLINE, &format!("session run {name}"), || {});
    let stdout = fs::read_to_string(&out_path).expect("read session run stdout");
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    // The pretty summary is printed last; it is the only line that is exactly "{".
    let at = if stdout.starts_with("{\n") {
        Some(0)
    } else {
        stdout.rfind("\n{\n").map(|p| p + 1)
    };
    let summary = at
        .and_then(|p| serde_json::from_str::<Value>(&stdout[p..]).ok())
        .unwrap_or_else(|| {
            panic!(
                "session run {name} ({status}) printed no JSON summary\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log:\n{}",
                tail(&h.dir.join("daemon.log"), 4000)
            )
        });
    if let Some(bus) = summary["session"]["segments"]["bus"].as_str() {
        if let Some(sid) = Path::new(bus)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(sid_of)
        {
            h.sids.insert(sid.to_string());
        }
    }
    RunOutput {
        status,
        stdout_head: stdout[..at.unwrap_or(0)].to_string(),
        summary,
        stderr,
    }
}

/// Panics unless the run succeeded: exit 0, every component exited 0, session finished,
/// `events` merged, every source ended.
pub fn assert_run_ok(h: &Harness, r: &RunOutput, events: usize) {
    let s = &r.summary["session"];
    let ok = r.status.success()
        && r.summary["ok"] == true
        && s["state"] == "finished"
        && s["sequencer"]["events_merged"] == json!(events)
        && s["sources"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["state"] == "ended"));
    assert!(
        ok,
        "session run failed ({}): state {}, reason {}, merged {} of {events}\ncomponents: {}\nsources: {}\nconsumers: {}\nstderr:\n{}\ndaemon log:\n{}",
        r.status,
        s["state"],
        s["reason"],
        s["sequencer"]["events_merged"],
        r.summary["components"],
        s["sources"],
        s["consumers"],
        r.stderr,
        tail(&h.dir.join("daemon.log"), 4000)
    );
}

/// Waits until no `/dev/shm/aegis-<sid>-*` is left (the run destroyed its session).
pub fn assert_segments_gone(h: &Harness) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = shm_files()
            .into_iter()
            .map(|f| f.name)
            .filter(|n| sid_of(n).is_some_and(|s| h.sids.contains(s)))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "segments left after session run destroyed its session: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Runs `aegis-shmctl --socket SOCKET ARGS...` to the end and returns its output.
pub fn shmctl_output(b: &Bins, socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(&b.shmctl)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run aegis-shmctl")
}

/// `aegis-shmctl --json ARGS...`, which must succeed; its JSON output.
pub fn shmctl_json(b: &Bins, socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = shmctl_output(b, socket, &all);
    assert!(
        out.status.success(),
        "aegis-shmctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}
