//! `aegis-shmctl chaos SESSION`: seeded fault injection into a running session (SPEC
//! section 12), then a check of the invariants the daemon can see.
//!
//! Targets are components of the session, by the pids the daemon reports for them (never a
//! process found by name), optionally narrowed with `--targets` (component or group names):
//! - `--kill` sends SIGKILL to a group member whose group has another live member to take
//!   over (a standby-protected member);
//! - `--pause MS` sends SIGSTOP to a group member, waits MS, and sends SIGCONT;
//! - `--restart` sends SIGKILL to a component that `session run --restart-killed N` will
//!   start again (`restartable` in `inspect`: its command has restarts left), then waits up
//!   to `--restart-timeout` for the restarted start (the same command, the next
//!   incarnation) to register, and reports the time from the kill to that registration.
//!
//! The plan (when each fault comes, which fault, and which of the eligible members it hits)
//! comes from one seeded generator, drawn before the run: the same seed gives the same plan,
//! and over the same session layout the same run.
//!
//! The invariants, from the daemon's counters at the end: no source seq skipped (`seq_gaps`
//! 0, per source as well), every source's seqs accounted for exactly once once the session
//! is over (events merged plus refused equal the last seq plus one, restarted sources
//! included), no consumer missed an event (`missed`/`overruns` 0), every producer group has
//! an active member or has finished its source, every restart came back in time. Duplicates
//! dropped by the sequencer (resends after a failover or a restart, never merged) are
//! reported.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{GroupRole, Inspect, Launch, Request, SessionState, SourceStatus};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::cli::ChaosArgs;
use crate::command::table::{Align, TextTable};
use crate::command::{print_json, request, CliError};

/// Deadline of each `inspect` request.
const T: Duration = Duration::from_secs(10);
/// How often `--wait-finished` looks at the session.
const POLL: Duration = Duration::from_millis(100);
/// How often a restart is looked for (the resolution of the restart times).
const RESTART_POLL: Duration = Duration::from_millis(5);

/// splitmix64: a small, seedable generator (the schedule needs repeatability, not quality).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What chaos does to a member.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Fault {
    /// SIGKILL of a standby-protected group member.
    Kill,
    /// SIGSTOP, then SIGCONT after the pause.
    Pause,
    /// SIGKILL of a member `session run` restarts, then a wait for the restart.
    Restart,
}

/// One step of the plan.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
struct Step {
    /// When it is due, in ms after the start.
    at_ms: u64,
    fault: Fault,
    /// Picks the target among the eligible members when it is due (modulo their number).
    pick: u64,
}

/// The plan of a run: a step every `every_ms` on average (each gap 0.5x to 1.5x of it) until
/// `duration_ms`, each with a fault among `faults` (in this order: kill, pause, restart) and
/// a pick. A function of its arguments only.
fn plan(seed: u64, faults: &[Fault], every_ms: u64, duration_ms: u64) -> Vec<Step> {
    let mut rng = Rng(seed);
    let mut at_ms = 0;
    let mut steps = Vec::new();
    loop {
        at_ms += every_ms / 2 + rng.below(every_ms + 1);
        let fault = match faults.len() {
            1 => faults[0],
            n => faults[rng.below(n as u64) as usize],
        };
        let pick = rng.next();
        if at_ms >= duration_ms {
            return steps;
        }
        steps.push(Step { at_ms, fault, pick });
    }
}

/// One action, as printed.
#[derive(Serialize, Debug)]
struct Action {
    /// Milliseconds since the start of the run.
    t_ms: u64,
    /// Wall-clock time (ms since the Unix epoch).
    unix_ms: u64,
    fault: Fault,
    /// The member's name and pid when it was hit.
    target: String,
    pid: u32,
    /// Its group and role, for a group member.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<GroupRole>,
    /// Pause length (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_ms: Option<u64>,
    /// Restart: the `session run` command and incarnation that was killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    launch: Option<Launch>,
    /// Restart: the pid of the restarted start, `null` if it did not register in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    new_pid: Option<u32>,
    /// Restart: ms from the kill to the registration of the restarted start.
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_ms: Option<u64>,
}

/// One invariant checked at the end.
#[derive(Serialize, Debug)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// The restart times of a run.
#[derive(Serialize, Debug, Default)]
struct RestartTimes {
    /// Restarts asked for (kills of restartable members).
    kills: usize,
    /// Restarts that registered within `--restart-timeout`.
    restarted: usize,
    /// Their times, from the kill to the registration (ms).
    p50_ms: Option<u64>,
    max_ms: Option<u64>,
}

/// The `--json` report.
#[derive(Serialize, Debug)]
struct Report {
    session: String,
    seed: u64,
    plan: Vec<Step>,
    actions: Vec<Action>,
    skipped: Vec<String>,
    restarts: RestartTimes,
    state: SessionState,
    events_merged: u64,
    duplicates_dropped: u64,
    invariants: Vec<Check>,
    ok: bool,
}

/// A member chaos may hit.
struct Target {
    name: String,
    pid: u32,
    /// Its group and role in it, for a group member.
    group: Option<(String, GroupRole)>,
    /// A group member with another live member that could take over.
    protected: bool,
    /// `session run` will restart it (its launch, then).
    restartable: Option<Launch>,
}

impl Target {
    fn eligible(&self, fault: Fault) -> bool {
        match fault {
            Fault::Kill => self.protected,
            Fault::Pause => self.group.is_some(),
            Fault::Restart => self.restartable.is_some(),
        }
    }

    /// Sends `sig` to its pid (the daemon's word for it, never a name).
    fn signal(&self, sig: Signal) -> Result<(), CliError> {
        kill(Pid::from_raw(self.pid as i32), sig)
            .map_err(|e| CliError(format!("{sig} to {} (pid {}): {e}", self.name, self.pid)))
    }

    /// "NAME (pid P, group G, ROLE)" or "NAME (pid P, command I)".
    fn describe(&self) -> String {
        match (&self.group, self.restartable) {
            (Some((g, role)), _) => format!("{} (pid {}, group {g}, {role})", self.name, self.pid),
            (None, Some(l)) => format!(
                "{} (pid {}, command {}, start {})",
                self.name, self.pid, l.command, l.incarnation
            ),
            (None, None) => format!("{} (pid {})", self.name, self.pid),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn inspect(socket: &Path, name: &str) -> Result<Inspect, CliError> {
    request(
        socket,
        &Request::SessionInspect {
            name: name.to_string(),
        },
        T,
    )
}

/// The members chaos may hit, in a stable order, narrowed by `--targets`: the live members
/// of the session's groups (group, then registration), then the other restartable
/// components (registration order).
fn targets(v: &Inspect, only: &[String]) -> Vec<Target> {
    let wanted = |name: &str, group: Option<&str>| {
        only.is_empty() || only.iter().any(|t| t == name || Some(t.as_str()) == group)
    };
    let restartable = |pid: u32| {
        v.components
            .iter()
            .find(|c| c.pid == pid && c.restartable)
            .and_then(|c| c.launch)
    };
    let mut out = Vec::new();
    for g in &v.groups {
        let live: Vec<_> = g
            .members
            .iter()
            .filter(|m| matches!(m.role, GroupRole::Active | GroupRole::Standby) && m.pid != 0)
            .collect();
        for m in live.iter().filter(|m| wanted(&m.name, Some(&g.name))) {
            out.push(Target {
                name: m.name.clone(),
                pid: m.pid,
                group: Some((g.name.clone(), m.role)),
                protected: live.len() > 1,
                restartable: restartable(m.pid),
            });
        }
    }
    for c in &v.components {
        let listed = out.iter().any(|t| t.pid == c.pid);
        if c.restartable && c.pid != 0 && !listed && wanted(&c.name, None) {
            out.push(Target {
                name: c.name.clone(),
                pid: c.pid,
                group: None,
                protected: false,
                restartable: c.launch,
            });
        }
    }
    out
}

/// Prints a line of the run (text mode only).
fn say(json: bool, start: Instant, what: &str) {
    if !json {
        println!("[+{:.3}s] {what}", start.elapsed().as_secs_f64());
    }
}

/// Runs `chaos`. Returns whether every invariant held.
pub fn run(socket: &Path, json: bool, a: &ChaosArgs) -> Result<bool, CliError> {
    let faults: Vec<Fault> = [
        (a.kill, Fault::Kill),
        (a.pause.is_some(), Fault::Pause),
        (a.restart, Fault::Restart),
    ]
    .into_iter()
    .filter_map(|(on, f)| on.then_some(f))
    .collect();
    if faults.is_empty() {
        return Err(CliError(
            "nothing to inject: give --kill, --pause MS, --restart, or several".into(),
        ));
    }
    if a.every_ms == 0 {
        return Err(CliError("--every-ms must be at least 1".into()));
    }
    let seed = a
        .seed
        .unwrap_or_else(|| unix_ms() ^ u64::from(std::process::id()));
    let v = inspect(socket, &a.session)?;
    if v.state.is_final() {
        return Err(CliError(format!(
            "session {} is {}: nothing to inject into",
            a.session, v.state
        )));
    }
    if targets(&v, &a.targets).is_empty() {
        return Err(CliError(format!(
            "session {} has no live group member and no component `session run --restart-killed` restarts{}: chaos only hits those (pids the daemon knows)",
            a.session,
            if a.targets.is_empty() { String::new() } else { format!(" among {}", a.targets.join(",")) }
        )));
    }
    let steps = plan(seed, &faults, a.every_ms, a.duration.saturating_mul(1000));
    if !json {
        println!(
            "chaos on session {} for {} s, seed {seed} (repeat with --seed {seed}): {} faults planned",
            a.session,
            a.duration,
            steps.len()
        );
    }
    let start = Instant::now();
    let mut actions = Vec::new();
    let mut skipped = Vec::new();
    for step in &steps {
        // A step is due at its offset; one that comes after a long pause or restart wait
        // runs at once.
        let due = start + Duration::from_millis(step.at_ms);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let v = inspect(socket, &a.session)?;
        if v.state.is_final() {
            break;
        }
        let all = targets(&v, &a.targets);
        let eligible: Vec<&Target> = all.iter().filter(|t| t.eligible(step.fault)).collect();
        let t_ms = start.elapsed().as_millis() as u64;
        let Some(t) = eligible
            .get((step.pick % eligible.len().max(1) as u64) as usize)
            .copied()
        else {
            let why = format!(
                "[+{:.3}s] {:?}: no eligible member ({})",
                t_ms as f64 / 1e3,
                step.fault,
                match step.fault {
                    Fault::Kill => "a kill needs a live standby in the group",
                    Fault::Pause => "a pause needs a live group member",
                    Fault::Restart => "a restart needs a component session run restarts",
                }
            );
            if !json {
                println!("{why}");
            }
            skipped.push(why);
            continue;
        };
        let mut act = Action {
            t_ms,
            unix_ms: unix_ms(),
            fault: step.fault,
            target: t.name.clone(),
            pid: t.pid,
            group: t.group.as_ref().map(|g| g.0.clone()),
            role: t.group.as_ref().map(|g| g.1),
            pause_ms: None,
            launch: None,
            new_pid: None,
            restart_ms: None,
        };
        match step.fault {
            Fault::Kill => {
                say(json, start, &format!("kill -9 {}", t.describe()));
                t.signal(Signal::SIGKILL)?;
            }
            Fault::Pause => {
                let ms = a.pause.unwrap_or(0);
                act.pause_ms = Some(ms);
                say(
                    json,
                    start,
                    &format!("SIGSTOP {} for {ms} ms", t.describe()),
                );
                t.signal(Signal::SIGSTOP)?;
                std::thread::sleep(Duration::from_millis(ms));
                // The process may have been killed meanwhile (by an operator); SIGCONT to a
                // gone pid is not an error here.
                let _ = t.signal(Signal::SIGCONT);
                say(json, start, &format!("SIGCONT {} (pid {})", t.name, t.pid));
            }
            Fault::Restart => {
                let launch = t.restartable.expect("eligible for a restart");
                act.launch = Some(launch);
                say(
                    json,
                    start,
                    &format!("kill -9 {}, which session run restarts", t.describe()),
                );
                t.signal(Signal::SIGKILL)?;
                let killed = Instant::now();
                let deadline = Duration::from_secs(a.restart_timeout);
                match wait_restart(socket, &a.session, launch, t.pid, deadline)? {
                    Some((new_pid, name)) => {
                        let ms = killed.elapsed().as_millis() as u64;
                        act.new_pid = Some(new_pid);
                        act.restart_ms = Some(ms);
                        say(
                            json,
                            start,
                            &format!("{name} restarted as pid {new_pid}: registered {ms} ms after the kill"),
                        );
                    }
                    None => say(
                        json,
                        start,
                        &format!(
                            "{} was not restarted within {} s",
                            t.name, a.restart_timeout
                        ),
                    ),
                }
            }
        }
        actions.push(act);
    }
    let mut v = inspect(socket, &a.session)?;
    if a.wait_finished {
        let deadline = Instant::now() + Duration::from_secs(a.timeout);
        while !v.state.is_final() {
            if Instant::now() >= deadline {
                return Err(CliError(format!(
                    "session {} did not end within {} s after the chaos run",
                    a.session, a.timeout
                )));
            }
            std::thread::sleep(POLL);
            v = inspect(socket, &a.session)?;
        }
    }
    let restarts = restart_times(&actions);
    let mut invariants = check(&v);
    if restarts.kills > 0 {
        invariants.push(Check {
            name: "restarted",
            ok: restarts.restarted == restarts.kills,
            detail: format!(
                "{} of {} killed components restarted through session run within {} s (p50 {} ms, max {} ms)",
                restarts.restarted,
                restarts.kills,
                a.restart_timeout,
                restarts.p50_ms.map_or("-".into(), |x| x.to_string()),
                restarts.max_ms.map_or("-".into(), |x| x.to_string())
            ),
        });
    }
    let ok = invariants.iter().all(|c| c.ok);
    let report = Report {
        session: a.session.clone(),
        seed,
        plan: steps,
        actions,
        skipped,
        restarts,
        state: v.state,
        events_merged: v.sequencer.events_merged,
        duplicates_dropped: v.sequencer.duplicates,
        invariants,
        ok,
    };
    if json {
        print_json(&report);
    } else {
        println!(
            "\nsession {} is {}: {} events merged, {} resent duplicates dropped (never merged), {} actions",
            report.session,
            report.state,
            report.events_merged,
            report.duplicates_dropped,
            report.actions.len()
        );
        let mut t = TextTable::new(&[
            ("invariant", Align::Left),
            ("ok", Align::Left),
            ("detail", Align::Left),
        ]);
        for c in &report.invariants {
            t.row([
                c.name.to_string(),
                if c.ok { "yes" } else { "NO" }.to_string(),
                c.detail.clone(),
            ]);
        }
        t.print(0);
    }
    Ok(ok)
}

/// Waits up to `deadline` for the restart of a killed component: a live component started
/// by the same `session run` command at a later incarnation, with a pid other than `old`.
/// Returns its pid and name, or `None` at the deadline (or if the session ended first).
fn wait_restart(
    socket: &Path,
    session: &str,
    killed: Launch,
    old: u32,
    deadline: Duration,
) -> Result<Option<(u32, String)>, CliError> {
    let end = Instant::now() + deadline;
    loop {
        let v = inspect(socket, session)?;
        let found = v.components.iter().find(|c| {
            c.launch
                .is_some_and(|l| l.command == killed.command && l.incarnation > killed.incarnation)
                && c.pid != 0
                && c.pid != old
        });
        if let Some(c) = found {
            return Ok(Some((c.pid, c.name.clone())));
        }
        if v.state.is_final() || Instant::now() >= end {
            return Ok(None);
        }
        std::thread::sleep(RESTART_POLL);
    }
}

/// The restart figures of the actions.
fn restart_times(actions: &[Action]) -> RestartTimes {
    let kills = actions.iter().filter(|a| a.fault == Fault::Restart).count();
    let mut ms: Vec<u64> = actions.iter().filter_map(|a| a.restart_ms).collect();
    ms.sort_unstable();
    RestartTimes {
        kills,
        restarted: ms.len(),
        p50_ms: ms.get(ms.len() / 2).copied(),
        max_ms: ms.last().copied(),
    }
}

/// The invariants the daemon's counters show.
fn check(v: &Inspect) -> Vec<Check> {
    let mut out = Vec::new();
    let gaps = v.sequencer.seq_gaps;
    out.push(Check {
        name: "no_gaps",
        ok: gaps == 0,
        detail: format!("{gaps} source seqs skipped"),
    });
    out.push(sources_contiguous(v));
    let per_source: Vec<String> = v
        .sources
        .iter()
        .map(|s| format!("{} {} ({})", s.name, s.events, s.state))
        .collect();
    out.push(Check {
        name: "counts",
        ok: true,
        detail: format!(
            "{} merged: {}; {} duplicates dropped",
            v.sequencer.events_merged,
            per_source.join(", "),
            v.sequencer.duplicates
        ),
    });
    let lossy: Vec<String> = v
        .consumers
        .iter()
        .filter(|c| c.missed.unwrap_or(0) > 0 || c.overruns.unwrap_or(0) > 0)
        .map(|c| {
            format!(
                "{} missed {} ({} overruns)",
                c.name,
                c.missed.unwrap_or(0),
                c.overruns.unwrap_or(0)
            )
        })
        .collect();
    out.push(Check {
        name: "no_consumer_missed",
        ok: lossy.is_empty(),
        detail: if lossy.is_empty() {
            format!("{} consumers, none missed an event", v.consumers.len())
        } else {
            lossy.join("; ")
        },
    });
    let headless: Vec<String> = v
        .groups
        .iter()
        .filter(|g| g.source.is_some() && g.active.is_none())
        .filter(|g| {
            let ended = v
                .sources
                .iter()
                .any(|s| Some(&s.name) == g.source.as_ref() && s.state == SourceStatus::Ended);
            !ended
        })
        .map(|g| g.name.clone())
        .collect();
    out.push(Check {
        name: "groups_led",
        ok: headless.is_empty(),
        detail: if headless.is_empty() {
            v.groups
                .iter()
                .map(|g| format!("{} epoch {} ({} failovers)", g.name, g.epoch, g.failovers))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            format!(
                "no active member, source not ended: {}",
                headless.join(", ")
            )
        },
    });
    out
}

/// Per source: no seq skipped and, once the session is over (the counters no longer move),
/// every seq from 0 to the last accounted for exactly once: events merged plus refused
/// equal the last seq plus one. Sources that changed hands (a failover, a restart) are the
/// point; their takeovers and the duplicates dropped are in the detail.
fn sources_contiguous(v: &Inspect) -> Check {
    let over = v.state.is_final();
    let mut bad = Vec::new();
    let mut seen = Vec::new();
    for s in &v.sources {
        let Some(p) = &s.progress else { continue };
        let Some(last) = p.last_seq else { continue };
        let accounted = s.events + p.rejected;
        if p.seq_gaps > 0 || (over && accounted != last + 1) {
            bad.push(format!(
                "{}: {} seqs skipped, {accounted} accounted for up to seq {last}",
                s.name, p.seq_gaps
            ));
        }
        seen.push(format!(
            "{} 0..={last} ({} takeovers, {} duplicates dropped)",
            s.name, s.takeovers, p.duplicates
        ));
    }
    Check {
        name: "sources_contiguous",
        ok: bad.is_empty(),
        detail: if bad.is_empty() {
            format!(
                "{}{}",
                seen.join(", "),
                if over {
                    ""
                } else {
                    " (counts checked once the session is over)"
                }
            )
        } else {
            bad.join("; ")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_repeats_with_the_seed() {
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..8).map(|_| r.below(1000)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn the_plan_is_a_function_of_the_seed() {
        let all = [Fault::Kill, Fault::Pause, Fault::Restart];
        let p = plan(42, &all, 500, 20_000);
        assert_eq!(p, plan(42, &all, 500, 20_000));
        assert_ne!(p, plan(43, &all, 500, 20_000));
        // Steps come every 250..=750 ms, in order, before the end; every fault is drawn.
        assert!(p
            .windows(2)
            .all(|w| (250..=750).contains(&(w[1].at_ms - w[0].at_ms))));
        assert!(p.last().is_some_and(|s| s.at_ms < 20_000));
        assert!(p.len() >= 20_000 / 750);
        for f in all {
            assert!(p.iter().any(|s| s.fault == f), "{f:?} never drawn");
        }
        // One fault: every step is it.
        assert!(plan(42, &[Fault::Restart], 500, 5_000)
            .iter()
            .all(|s| s.fault == Fault::Restart));
        assert!(plan(42, &all, 500, 0).is_empty());
    }
}
