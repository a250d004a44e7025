//! `aegis-shmctl chaos SESSION`: seeded fault injection into a running session (SPEC
//! section 12), then a check of the invariants the daemon can see.
//!
//! Targets are the members of the session's groups, by the pids the daemon reports for
//! them (never a process found by name), optionally narrowed with `--targets` (component or
//! group names). `--kill` sends SIGKILL to a member whose group has another live member to
//! take over (a standby-protected member); `--pause MS` sends SIGSTOP, waits MS, and sends
//! SIGCONT. The schedule (delays, action, target) comes from one seeded generator: the same
//! seed over the same session layout repeats the same run.
//!
//! The invariants, from the daemon's counters at the end: no source seq skipped (`seq_gaps`
//! 0), no consumer missed an event (`missed`/`overruns` 0), every producer group has an
//! active member or has finished its source; duplicates dropped by the sequencer (resends
//! after a failover, never merged) are reported.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{GroupRole, Inspect, Request, SessionState};
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

/// What chaos did to a member.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Fault {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT after the pause.
    Pause,
}

/// One action, as printed.
#[derive(Serialize, Debug)]
struct Action {
    /// Milliseconds since the start of the run.
    t_ms: u64,
    /// Wall-clock time (ms since the Unix epoch).
    unix_ms: u64,
    fault: Fault,
    /// The member's name, pid, group and role when it was hit.
    target: String,
    pid: u32,
    group: String,
    role: GroupRole,
    /// Pause length (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_ms: Option<u64>,
}

/// One invariant checked at the end.
#[derive(Serialize, Debug)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

/// The `--json` report.
#[derive(Serialize, Debug)]
struct Report {
    session: String,
    seed: u64,
    actions: Vec<Action>,
    skipped: Vec<String>,
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
    group: String,
    role: GroupRole,
    /// Another live member of its group could take over.
    protected: bool,
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

/// The live members of the session's groups (active or standby, with a pid), in a stable
/// order (group, then registration), narrowed by `--targets`.
fn targets(v: &Inspect, only: &[String]) -> Vec<Target> {
    let mut out = Vec::new();
    for g in &v.groups {
        let live: Vec<_> = g
            .members
            .iter()
            .filter(|m| matches!(m.role, GroupRole::Active | GroupRole::Standby) && m.pid != 0)
            .collect();
        for m in &live {
            if !only.is_empty() && !only.iter().any(|t| *t == m.name || *t == g.name) {
                continue;
            }
            out.push(Target {
                name: m.name.clone(),
                pid: m.pid,
                group: g.name.clone(),
                role: m.role,
                protected: live.len() > 1,
            });
        }
    }
    out
}

/// Runs `chaos`. Returns whether every invariant held.
pub fn run(socket: &Path, json: bool, a: &ChaosArgs) -> Result<bool, CliError> {
    if !a.kill && a.pause.is_none() {
        return Err(CliError(
            "nothing to inject: give --kill, --pause MS, or both".into(),
        ));
    }
    if a.every_ms == 0 {
        return Err(CliError("--every-ms must be at least 1".into()));
    }
    let seed = a
        .seed
        .unwrap_or_else(|| unix_ms() ^ u64::from(std::process::id()));
    let mut rng = Rng(seed);
    let v = inspect(socket, &a.session)?;
    if v.state.is_final() {
        return Err(CliError(format!(
            "session {} is {}: nothing to inject into",
            a.session, v.state
        )));
    }
    if targets(&v, &a.targets).is_empty() {
        return Err(CliError(format!(
            "session {} has no live group member{}: chaos only hits members of groups (pids the daemon knows)",
            a.session,
            if a.targets.is_empty() { String::new() } else { format!(" among {}", a.targets.join(",")) }
        )));
    }
    if !json {
        println!(
            "chaos on session {} for {} s, seed {seed} (repeat with --seed {seed})",
            a.session, a.duration
        );
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(a.duration);
    let mut actions = Vec::new();
    let mut skipped = Vec::new();
    loop {
        // A delay around --every-ms: half of it to one and a half.
        let delay = Duration::from_millis(a.every_ms / 2 + rng.below(a.every_ms + 1));
        let fault = match (a.kill, a.pause) {
            (true, Some(_)) => {
                if rng.below(2) == 0 {
                    Fault::Kill
                } else {
                    Fault::Pause
                }
            }
            (true, None) => Fault::Kill,
            _ => Fault::Pause,
        };
        let pick = rng.next();
        if Instant::now() + delay >= end {
            break;
        }
        std::thread::sleep(delay);
        let v = inspect(socket, &a.session)?;
        if v.state.is_final() {
            break;
        }
        let all = targets(&v, &a.targets);
        let eligible: Vec<&Target> = all
            .iter()
            .filter(|t| fault == Fault::Pause || t.protected)
            .collect();
        let t_ms = start.elapsed().as_millis() as u64;
        if eligible.is_empty() {
            let why = format!(
                "[+{:.3}s] {fault:?}: no eligible member (a kill needs a live standby in the group)",
                t_ms as f64 / 1e3
            );
            if !json {
                println!("{why}");
            }
            skipped.push(why);
            continue;
        }
        let t = eligible[(pick % eligible.len() as u64) as usize];
        let pid = Pid::from_raw(t.pid as i32);
        let mut act = Action {
            t_ms,
            unix_ms: unix_ms(),
            fault,
            target: t.name.clone(),
            pid: t.pid,
            group: t.group.clone(),
            role: t.role,
            pause_ms: None,
        };
        match fault {
            Fault::Kill => {
                if !json {
                    println!(
                        "[+{:.3}s] kill -9 {} (pid {}, group {}, {})",
                        t_ms as f64 / 1e3,
                        t.name,
                        t.pid,
                        t.group,
                        t.role
                    );
                }
                kill(pid, Signal::SIGKILL)
                    .map_err(|e| CliError(format!("kill -9 {} (pid {}): {e}", t.name, t.pid)))?;
            }
            Fault::Pause => {
                let ms = a.pause.unwrap_or(0);
                act.pause_ms = Some(ms);
                if !json {
                    println!(
                        "[+{:.3}s] SIGSTOP {} (pid {}, group {}, {}) for {ms} ms",
                        t_ms as f64 / 1e3,
                        t.name,
                        t.pid,
                        t.group,
                        t.role
                    );
                }
                kill(pid, Signal::SIGSTOP)
                    .map_err(|e| CliError(format!("SIGSTOP {} (pid {}): {e}", t.name, t.pid)))?;
                std::thread::sleep(Duration::from_millis(ms));
                // The process may have been killed meanwhile (by an operator); SIGCONT to a
                // gone pid is not an error here.
                let _ = kill(pid, Signal::SIGCONT);
                if !json {
                    println!(
                        "[+{:.3}s] SIGCONT {} (pid {})",
                        start.elapsed().as_secs_f64(),
                        t.name,
                        t.pid
                    );
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
    let invariants = check(&v);
    let ok = invariants.iter().all(|c| c.ok);
    let report = Report {
        session: a.session.clone(),
        seed,
        actions,
        skipped,
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

/// The invariants the daemon's counters show.
fn check(v: &Inspect) -> Vec<Check> {
    let mut out = Vec::new();
    let gaps = v.sequencer.seq_gaps;
    out.push(Check {
        name: "no_gaps",
        ok: gaps == 0,
        detail: format!("{gaps} source seqs skipped"),
    });
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
            let ended = v.sources.iter().any(|s| {
                Some(&s.name) == g.source.as_ref()
                    && s.state == aegis_shm_client::protocol::SourceStatus::Ended
            });
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
}
