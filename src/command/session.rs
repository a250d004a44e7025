//! `aegis-shmctl session ...`: create, run, start, list, inspect, stop, destroy, evict.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{
    ComponentEvicted, Inspect, Launch, Request, SessionCreated, SessionDestroyed, SessionInfo,
    SessionSpec, SessionStarted, SessionState, SessionStopped,
};
use serde::Serialize;
use serde_json::Value;

use super::table::{Align::Left, Align::Right, TextTable};
use super::{print_json, request, CliError};
use crate::cli::{CreateArgs, RunArgs, SessionCommand};

/// Deadline of one request to the daemon.
const T: Duration = Duration::from_secs(10);
/// `session start --timeout S` waits up to S for the READYs, and this much more for the reply.
const START_REPLY_MARGIN: Duration = Duration::from_secs(5);
/// How long `session run` gives a session to notice its components are gone, and its
/// components to obey STOP, before it ends them.
const GRACE: Duration = Duration::from_secs(5);
/// How often `session run` looks at its components and the session.
const RUN_POLL: Duration = Duration::from_millis(50);

fn spec(a: &CreateArgs, expect: Option<u32>) -> SessionSpec {
    SessionSpec {
        name: a.name.clone(),
        mode: a.mode,
        expect: expect.or(a.expect),
        sequencer_core: a.sequencer_core,
        bus_bytes: a.bus_bytes,
        source_bytes: a.source_bytes,
        max_lateness_us: a.max_lateness_us,
        reconcile_s: a.reconcile_s,
        // The daemon's working directory is not ours: the path goes absolute.
        record: a
            .record
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or(d.clone())),
        record_segment_bytes: a.record_segment_bytes,
        // `session run --restart-killed` sets it.
        restart_killed: None,
    }
}

/// Prints `answer` as JSON with `--json`, else as the line `text` makes of it.
fn show<T: Serialize>(json_out: bool, answer: &T, text: impl Fn(&T)) {
    if json_out {
        print_json(answer);
    } else {
        text(answer);
    }
}

/// `null` or the value, as the JSON of old printed it.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".to_string(), |v| v.to_string())
}

/// Dispatches a `session` subcommand.
pub fn run(socket: &Path, json_out: bool, cmd: SessionCommand) -> Result<bool, CliError> {
    match cmd {
        SessionCommand::Create(a) => {
            let v: SessionCreated = request(socket, &Request::SessionCreate(spec(&a, None)), T)?;
            show(json_out, &v, |v| {
                println!("session {} created ({} mode, id {})", v.name, v.mode, v.id);
                println!("export AEGIS_SOCKET={}", socket.display());
                println!("export AEGIS_SESSION_TOKEN={}", v.token);
            });
        }
        SessionCommand::Run(a) => return run_session(socket, json_out, &a),
        SessionCommand::Start { name, timeout } => {
            let req = Request::SessionStart {
                name,
                timeout_ms: Some(timeout * 1000),
            };
            let wait = Duration::from_secs(timeout) + START_REPLY_MARGIN;
            let v: SessionStarted = request(socket, &req, wait)?;
            show(json_out, &v, |v| {
                println!(
                    "session {} started with {} components",
                    v.name, v.components
                )
            });
        }
        SessionCommand::List => {
            let v: Vec<SessionInfo> = request(socket, &Request::SessionList, T)?;
            show(json_out, &v, |v| print_list(v));
        }
        SessionCommand::Inspect { name } => {
            let v: Inspect = request(socket, &Request::SessionInspect { name }, T)?;
            show(json_out, &v, print_inspect);
        }
        SessionCommand::Stop { name } => {
            let v: SessionStopped = request(socket, &Request::SessionStop { name }, T)?;
            show(json_out, &v, |v| println!("session {} {}", v.name, v.state));
        }
        SessionCommand::Destroy { name } => {
            let v: SessionDestroyed = request(socket, &Request::SessionDestroy { name }, T)?;
            show(json_out, &v, |v| println!("session {} destroyed", v.name));
        }
        SessionCommand::Evict { name, component } => {
            let v: ComponentEvicted =
                request(socket, &Request::SessionEvict { name, component }, T)?;
            show(json_out, &v, |v| {
                println!(
                    "{} {} of session {} evicted; the session is {}",
                    v.role, v.component, v.name, v.state
                )
            });
        }
    }
    Ok(true)
}

/// Human-readable `list`.
fn print_list(v: &[SessionInfo]) {
    let mut t = TextTable::new(&[
        ("NAME", Left),
        ("MODE", Left),
        ("STATE", Left),
        ("COMPONENTS", Right),
        ("SOURCES", Right),
        ("EVENTS", Right),
    ]);
    for s in v {
        t.row([
            s.name.clone(),
            s.mode.name().to_string(),
            s.state.name().to_string(),
            s.components.to_string(),
            s.sources.to_string(),
            s.events_merged.to_string(),
        ]);
    }
    t.print(0);
}

/// Human-readable `inspect`.
pub fn print_inspect(v: &Inspect) {
    let why = |r: &Option<String>| r.clone().unwrap_or_default();
    println!("session {} ({} mode): {}", v.name, v.mode, v.state);
    if let Some(r) = &v.reason {
        println!("  reason: {r}");
    }
    println!("components:");
    let mut t = TextTable::new(&[
        ("NAME", Left),
        ("ROLE", Left),
        ("PID", Right),
        ("STATE", Left),
        ("REASON", Left),
    ]);
    for c in &v.components {
        t.row([
            c.name.clone(),
            c.role.to_string(),
            c.pid.to_string(),
            c.state.to_string(),
            why(&c.reason),
        ]);
    }
    t.print(2);
    println!("sources:");
    let mut t = TextTable::new(&[
        ("NAME", Left),
        ("STATE", Left),
        ("EVENTS", Right),
        ("REJECTED", Right),
        ("WATERMARK", Right),
        ("REASON", Left),
    ]);
    for c in &v.sources {
        let p = c.progress.as_ref();
        t.row([
            c.name.clone(),
            c.state.name().to_string(),
            c.events.to_string(),
            opt(p.map(|p| p.rejected)),
            opt(p.map(|p| p.watermark)),
            why(&p.and_then(|p| p.reason.clone())),
        ]);
    }
    t.print(2);
    println!("consumers:");
    let mut t = TextTable::new(&[
        ("NAME", Left),
        ("SLOT", Right),
        ("STATE", Left),
        ("READ", Right),
        ("LAG_BYTES", Right),
        ("OVERRUNS", Right),
        ("MISSED", Right),
    ]);
    for c in &v.consumers {
        t.row([
            c.name.clone(),
            opt(c.slot),
            c.state.name().to_string(),
            opt(c.read),
            opt(c.lag_bytes),
            opt(c.overruns),
            opt(c.missed),
        ]);
    }
    t.print(2);
    let q = &v.sequencer;
    println!(
        "sequencer: {} events merged ({} /s), {} late, {} rejected, {} source stalls ({} ms), {} consumer stalls ({} ms), bus fill {} bytes",
        q.events_merged, opt(q.events_per_s), q.late_events, q.rejected_events, q.source_stalls, q.source_stall_ms,
        q.consumer_stalls, q.consumer_stall_ms, q.bus_fill_bytes
    );
    if let Some(r) = &v.recording {
        println!(
            "recording: {} into {}: {} frames, {} bytes, recorded up to bus seq {} (segment {}), {} gaps ({} frames missed){}",
            r.state.map_or("not started", |s| s.name()),
            r.dir.display(),
            r.frames,
            r.bytes,
            r.next_seq,
            r.segment,
            r.gaps,
            r.missed,
            r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default()
        );
    }
    if !v.requests.is_empty() {
        println!("requests:");
        let mut t = TextTable::new(&[
            ("TARGET", Left),
            ("TYPE", Left),
            ("REQUESTS", Right),
            ("REPLIES", Right),
            ("ERRORS", Right),
            ("TIMEOUTS", Right),
            ("P50_US", Right),
            ("P99_US", Right),
            ("MAX_US", Right),
        ]);
        for r in &v.requests {
            t.row([
                r.target.clone(),
                r.request_type.clone(),
                r.requests.to_string(),
                r.replies.to_string(),
                r.errors.to_string(),
                r.timeouts.to_string(),
                opt(r.p50_us),
                opt(r.p99_us),
                opt(r.max_us),
            ]);
        }
        t.print(2);
    }
    if q.duplicates > 0 || q.seq_gaps > 0 || !v.groups.is_empty() {
        println!(
            "resume: {} resent duplicates dropped, {} source seqs skipped",
            q.duplicates, q.seq_gaps
        );
    }
    print_takeovers(v);
    print_groups(v);
}

/// The sources that changed hands (a promoted standby, a restarted producer): how often,
/// and their seq figures.
fn print_takeovers(v: &Inspect) {
    let moved: Vec<_> = v.sources.iter().filter(|s| s.takeovers > 0).collect();
    if moved.is_empty() {
        return;
    }
    println!("takeovers:");
    let mut t = TextTable::new(&[
        ("SOURCE", Left),
        ("TAKEOVERS", Right),
        ("PRODUCER", Left),
        ("LAST_SEQ", Right),
        ("DUPLICATES", Right),
        ("SEQ_GAPS", Right),
    ]);
    for s in moved {
        let p = s.progress.as_ref();
        t.row([
            s.name.clone(),
            s.takeovers.to_string(),
            s.component.clone().unwrap_or_default(),
            opt(p.and_then(|p| p.last_seq)),
            opt(p.map(|p| p.duplicates)),
            opt(p.map(|p| p.seq_gaps)),
        ]);
    }
    t.print(2);
}

/// The groups of `inspect` (hot standby), one row per member.
fn print_groups(v: &Inspect) {
    if v.groups.is_empty() {
        return;
    }
    println!("groups:");
    let mut t = TextTable::new(&[
        ("GROUP", Left),
        ("POLICY", Left),
        ("EPOCH", Right),
        ("FAILOVERS", Right),
        ("LAST_FAILOVER_MS", Right),
        ("MEMBER", Left),
        ("PID", Right),
        ("ROLE", Left),
    ]);
    for g in &v.groups {
        for m in &g.members {
            t.row([
                g.name.clone(),
                g.failover.to_string(),
                g.epoch.to_string(),
                g.failovers.to_string(),
                opt(g.last_failover_unix_ms),
                m.name.clone(),
                m.pid.to_string(),
                m.role.to_string(),
            ]);
        }
    }
    t.print(2);
}

/// Kills a child we started, by pid, and reaps it. The child is `sh -c CMD`, and a shell may
/// fork CMD rather than exec it (dash does for `sh -c '/path/aegis-tap ...'`): killing only the
/// shell used to leave the component itself running, orphaned. So every process descended
/// from the child is killed as well (found in /proc, before any of them is killed).
fn kill(child: &mut Child) {
    for pid in descendants(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The pids of every process descended from `root` (children, grandchildren, ...).
fn descendants(root: u32) -> Vec<u32> {
    descendants_in(&process_parents(), root)
}

/// Every process as (pid, ppid), read from `/proc` once.
fn process_parents() -> Vec<(u32, u32)> {
    let mut parents: Vec<(u32, u32)> = Vec::new(); // (pid, ppid)
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // `/proc/<pid>/stat` is "pid (comm) state ppid ...", and comm may hold spaces or ')'.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    parents
}

/// The descendants of `root` in a (pid, ppid) table.
fn descendants_in(parents: &[(u32, u32)], root: u32) -> Vec<u32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// `session run`: returns Ok(true) when every component exited 0 and the session finished.
pub fn run_session(socket: &Path, json_out: bool, a: &RunArgs) -> Result<bool, CliError> {
    let outcome = run_components(socket, a, |_, _| {})?;
    show(json_out, &outcome.run, |r| {
        let state = r.session.as_ref().map(|s| s.state);
        println!(
            "session {}: {}",
            a.create.name,
            state.map_or("?", SessionState::name)
        );
        // The restarts column only when restarts were asked for: the table stays as it was.
        let mut cols = vec![("EXIT", Right)];
        if a.restart_killed.is_some() {
            cols.push(("RESTARTS", Right));
        }
        cols.push(("COMMAND", Left));
        let mut t = TextTable::new(&cols);
        for c in &r.components {
            let mut row = vec![opt(c.exit)];
            if a.restart_killed.is_some() {
                row.push(c.restarts.to_string());
            }
            row.push(c.command.clone());
            t.row(row);
        }
        t.print(2);
        for c in r.components.iter().filter(|c| !c.restarted.is_empty()) {
            let mut signals: Vec<i32> = c.restarted.iter().map(|x| x.signal).collect();
            signals.sort_unstable();
            signals.dedup();
            let pids: Vec<String> = c
                .restarted
                .iter()
                .map(|x| x.pid.to_string())
                .chain(std::iter::once(c.pid.to_string()))
                .collect();
            println!(
                "  restarted {} time{} after signal {}: pid {}  ({})",
                c.restarts,
                if c.restarts == 1 { "" } else { "s" },
                signals
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                pids.join(" -> "),
                c.command
            );
        }
        for c in r.components.iter() {
            if let Some(e) = &c.restart_error {
                println!("  {e}");
            }
        }
        println!(
            "  {} events merged in {:.3} s",
            opt(r.session.as_ref().map(|s| s.sequencer.events_merged)),
            r.session.as_ref().and_then(|s| s.elapsed_s).unwrap_or(0.0)
        );
        if let Some(r) = r.session.as_ref().and_then(|s| s.reason.as_ref()) {
            println!("  reason: {r}");
        }
        if let Some(r) = &r.reason {
            println!("  run: {r}");
        }
    });
    Ok(outcome.ok)
}

/// What a run produced.
pub struct Outcome {
    /// All components exited 0 and the session finished.
    pub ok: bool,
    /// The run, typed.
    pub run: RunSummary,
}

/// The summary of `session run` (its `--json` output).
#[derive(Serialize, Debug)]
pub struct RunSummary {
    /// The last `inspect` of the session (`null` if none answered).
    pub session: Option<Inspect>,
    /// Whether `--timeout` ended the run.
    pub timed_out: bool,
    /// Why the run ended early, if it did.
    pub reason: Option<String>,
    /// Every component started.
    pub components: Vec<ComponentRun>,
    /// Every component exited 0 and the session finished.
    pub ok: bool,
}

/// One component of a run.
#[derive(Serialize, Debug)]
pub struct ComponentRun {
    /// The command (run with `sh -c`).
    pub command: String,
    /// Its pid (the last start's, after restarts).
    pub pid: u32,
    /// Its exit status (-9 if we killed it, -1 for a signal), `null` if unknown. After
    /// restarts, the last start's.
    pub exit: Option<i32>,
    /// The signal that ended the last start, if one did.
    pub signal: Option<i32>,
    /// Times `--restart-killed` restarted it.
    pub restarts: u32,
    /// Each restart: the start that died, the signal, the new start.
    pub restarted: Vec<Restart>,
    /// Why a restart was due but did not happen (the command could not be started again).
    pub restart_error: Option<String>,
    /// Its peak resident set in kB: the largest `VmHWM` of it and its descendants, sampled
    /// while it ran (a lower bound, close to the peak for a process whose memory does not
    /// shrink).
    pub max_rss_kb: Option<u64>,
}

/// A restart under `--restart-killed`.
#[derive(Serialize, Debug, Clone)]
pub struct Restart {
    /// The pid of the start that died.
    pub pid: u32,
    /// The signal that killed it.
    pub signal: i32,
    /// The pid of the new start.
    pub new_pid: u32,
    /// When the new start was spawned (ms since the Unix epoch).
    pub unix_ms: u64,
}

/// Whether a component died by a signal, and by which: its process was signalled, or
/// `sh -c` reported status 128+N, the shell's word for a command it forked (rather than
/// exec'd) being killed by signal N.
fn killed_by(st: ExitStatus) -> Option<i32> {
    st.signal().or_else(|| {
        st.code()
            .filter(|c| (129..=128 + 64).contains(c))
            .map(|c| c - 128)
    })
}

/// Starts the commands of a run, the first time and on every restart, the same way: `sh -c
/// CMD` with the session, the command's index and its incarnation in the environment.
struct Launcher<'a> {
    socket: PathBuf,
    token: String,
    session: String,
    configure: &'a dyn Fn(usize, &mut Command),
}

impl Launcher<'_> {
    /// Spawns command `i` for its `incarnation`-th time (1 for the first).
    fn spawn(&self, i: usize, cmd: &str, incarnation: u32) -> std::io::Result<Child> {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("AEGIS_SOCKET", &self.socket)
            .env("AEGIS_SESSION_TOKEN", &self.token)
            .env("AEGIS_SESSION", &self.session)
            .env(Launch::COMMAND_ENV, i.to_string())
            .env(Launch::INCARNATION_ENV, incarnation.to_string())
            .stdin(Stdio::null());
        (self.configure)(i, &mut c);
        c.spawn()
    }
}

/// One component of a run: its command, its current process and what became of it.
struct Comp {
    command: String,
    child: Child,
    exit: Option<i32>,
    signal: Option<i32>,
    max_rss_kb: Option<u64>,
    restarted: Vec<Restart>,
    restart_error: Option<String>,
}

/// The components of a run.
struct Children {
    comps: Vec<Comp>,
}

impl Children {
    /// Reaps whichever exited. Samples the peak resident set of those still running (the
    /// last sample before the exit; `wait4`'s `ru_maxrss` would include the memory of the
    /// process that forked them).
    fn poll(&mut self) {
        // One look at /proc per poll, whatever the number of components.
        let parents = process_parents();
        for c in self.comps.iter_mut().filter(|c| c.exit.is_none()) {
            // The component and whatever it started (`sh -c` may fork it): the largest.
            let id = c.child.id();
            let tree = std::iter::once(id).chain(descendants_in(&parents, id));
            if let Some(kb) = tree.filter_map(peak_rss_kb).max() {
                c.max_rss_kb = Some(kb.max(c.max_rss_kb.unwrap_or(0)));
            }
            if let Ok(Some(st)) = c.child.try_wait() {
                c.exit = Some(st.code().unwrap_or(-1));
                c.signal = killed_by(st);
            }
        }
    }

    fn all_exited(&self) -> bool {
        self.comps.iter().all(|c| c.exit.is_some())
    }

    /// The first component that exited, with its status.
    fn first_exit(&self) -> Option<(&str, i32)> {
        self.comps
            .iter()
            .find_map(|c| c.exit.map(|e| (c.command.as_str(), e)))
    }

    /// `--restart-killed N`: starts again, with the same command line and environment (but
    /// the next incarnation), every component that died by a signal and was restarted
    /// fewer than `budget` times.
    fn restart_killed(&mut self, launcher: &Launcher<'_>, budget: u32) {
        for (i, c) in self.comps.iter_mut().enumerate() {
            let Some(signal) = c.signal.filter(|_| c.exit.is_some()) else {
                continue;
            };
            if c.restarted.len() as u32 >= budget || c.restart_error.is_some() {
                continue;
            }
            let incarnation = c.restarted.len() as u32 + 2;
            let pid = c.child.id();
            match launcher.spawn(i, &c.command, incarnation) {
                Ok(child) => {
                    eprintln!(
                        "session run: {:?} (pid {pid}) was killed by signal {signal}; restarted as pid {} ({} of {budget})",
                        c.command,
                        child.id(),
                        incarnation - 1
                    );
                    c.restarted.push(Restart {
                        pid,
                        signal,
                        new_pid: child.id(),
                        unix_ms: unix_ms(),
                    });
                    c.child = child;
                    c.exit = None;
                    c.signal = None;
                }
                Err(e) => {
                    let why = format!("cannot restart {:?}: {e}", c.command);
                    eprintln!("session run: {why}");
                    c.restart_error = Some(why);
                }
            }
        }
    }

    /// Kills every component still running (recorded as exit -9).
    fn kill_rest(&mut self) {
        for c in self.comps.iter_mut().filter(|c| c.exit.is_none()) {
            kill(&mut c.child);
            c.exit = Some(-9);
        }
    }

    /// The summary rows.
    fn runs(&self) -> Vec<ComponentRun> {
        self.comps
            .iter()
            .map(|c| ComponentRun {
                command: c.command.clone(),
                pid: c.child.id(),
                exit: c.exit,
                signal: c.signal,
                restarts: c.restarted.len() as u32,
                restarted: c.restarted.clone(),
                restart_error: c.restart_error.clone(),
                max_rss_kb: c.max_rss_kb,
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates the session, starts the components (`sh -c`), waits for them and the session.
/// `configure(index, cmd)` may adjust each child (stdout redirection, say), on every start.
pub fn run_components(
    socket: &Path,
    a: &RunArgs,
    configure: impl Fn(usize, &mut Command),
) -> Result<Outcome, CliError> {
    let expect = Some(a.commands.len() as u32);
    let mut spec = spec(&a.create, expect);
    spec.restart_killed = a.restart_killed;
    let created: SessionCreated = request(socket, &Request::SessionCreate(spec), T)?;
    let name = a.create.name.clone();
    let launcher = Launcher {
        // The components' working directory need not be ours: the path goes absolute.
        socket: std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf()),
        token: created.token.clone(),
        session: name.clone(),
        configure: &configure,
    };
    let mut children = spawn_components(socket, a, &launcher)?;
    let (last, timed_out, mut reason) = supervise(socket, a, &mut children, &launcher);
    if !a.keep {
        let _ = request::<Value>(socket, &Request::SessionDestroy { name }, T);
    }
    let finished = last.as_ref().map(|s| s.state) == Some(SessionState::Finished);
    let ok = finished && !timed_out && children.comps.iter().all(|c| c.exit == Some(0));
    if timed_out && reason.is_none() {
        reason = Some(format!("timed out after {} s", a.timeout));
    }
    let run = RunSummary {
        session: last,
        timed_out,
        reason,
        components: children.runs(),
        ok,
    };
    Ok(Outcome { ok, run })
}

/// The peak resident set of process `pid` so far (`VmHWM`), in kB, if readable.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// Starts one `sh -c CMD` per component with the session in its environment. If one cannot
/// start, the others are killed and the session destroyed.
fn spawn_components(
    socket: &Path,
    a: &RunArgs,
    launcher: &Launcher<'_>,
) -> Result<Children, CliError> {
    let mut children = Children { comps: Vec::new() };
    for (i, cmd) in a.commands.iter().enumerate() {
        match launcher.spawn(i, cmd, 1) {
            Ok(child) => children.comps.push(Comp {
                command: cmd.clone(),
                child,
                exit: None,
                signal: None,
                max_rss_kb: None,
                restarted: Vec::new(),
                restart_error: None,
            }),
            Err(e) => {
                children.kill_rest();
                let destroy = Request::SessionDestroy {
                    name: a.create.name.clone(),
                };
                let _ = request::<Value>(socket, &destroy, T);
                return Err(CliError(format!("cannot start {cmd:?}: {e}")));
            }
        }
    }
    Ok(children)
}

/// Waits for the components and the session, restarting killed components under
/// `--restart-killed` while the session goes on: returns the last `inspect`, whether
/// `--timeout` ran out, and why the run ended early.
fn supervise(
    socket: &Path,
    a: &RunArgs,
    children: &mut Children,
    launcher: &Launcher<'_>,
) -> (Option<Inspect>, bool, Option<String>) {
    let name = &a.create.name;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last: Option<Inspect> = None;
    let mut grace_since: Option<Instant> = None;
    let mut reason: Option<String> = None;
    loop {
        children.poll();
        let inspect = Request::SessionInspect { name: name.clone() };
        if let Ok(v) = request::<Inspect>(socket, &inspect, T) {
            last = Some(v);
        }
        let state = last.as_ref().map(|s| s.state);
        // A restart only makes sense while the session takes components and data flows: not
        // once it drains (a consumer started then would wait at the bus head for an end it
        // never sees) or is over. The daemon refuses `--restart-killed` for a backtest.
        if let Some(budget) = a.restart_killed {
            let goes_on = matches!(state, Some(SessionState::Created | SessionState::Running));
            if goes_on && Instant::now() < deadline {
                children.restart_killed(launcher, budget);
            }
        }
        // A component that exited while the session has not started yet (inspected after the
        // exit was seen) means the barrier (one READY per -c) can never be met. Stop the
        // session now: its components get STOP and exit. This used to wait for --timeout
        // (default one hour).
        if state == Some(SessionState::Created) && reason.is_none() {
            if let Some((cmd, exit)) = children.first_exit() {
                reason = Some(format!(
                    "component {cmd:?} exited with status {exit} before the session started"
                ));
                let stop = Request::SessionStop { name: name.clone() };
                let _ = request::<Value>(socket, &stop, T);
                continue;
            }
        }
        let all_exited = children.all_exited();
        if all_exited && state.is_some_and(SessionState::is_final) {
            return (last, false, reason);
        }
        let given_up = matches!(state, Some(SessionState::Failed | SessionState::Stopped));
        if all_exited || given_up {
            // Give the session a moment to notice the components are gone, or the
            // components a moment to obey STOP; then end them.
            let t = grace_since.get_or_insert_with(Instant::now);
            if t.elapsed() > GRACE {
                if all_exited {
                    return (last, false, reason);
                }
                children.kill_rest();
            }
        }
        if Instant::now() >= deadline {
            children.kill_rest();
            return (last, true, reason);
        }
        std::thread::sleep(RUN_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killed_by_reads_the_signal_or_the_shells_128_plus_n() {
        // Raw wait statuses: a signal in the low 7 bits, an exit code in the next byte.
        assert_eq!(killed_by(ExitStatus::from_raw(9)), Some(9));
        assert_eq!(killed_by(ExitStatus::from_raw(15)), Some(15));
        // `sh -c` that forked its command reports "killed by 9" as 137.
        assert_eq!(killed_by(ExitStatus::from_raw(137 << 8)), Some(9));
        // Ordinary exits are no signal: they are never restarted.
        assert_eq!(killed_by(ExitStatus::from_raw(0)), None);
        assert_eq!(killed_by(ExitStatus::from_raw(1 << 8)), None);
        assert_eq!(killed_by(ExitStatus::from_raw(128 << 8)), None);
        assert_eq!(killed_by(ExitStatus::from_raw(255 << 8)), None);
    }
}
