//! `aegis-shmctl session ...`: create, run, start, list, inspect, stop, destroy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{Request, SessionSpec};
use serde_json::{json, Value};

use super::{print_json, request, CliError};
use crate::cli::{CreateArgs, RunArgs, SessionCommand};

const T: Duration = Duration::from_secs(10);

fn spec(a: &CreateArgs, expect: Option<u32>) -> SessionSpec {
    SessionSpec {
        name: a.name.clone(),
        mode: a.mode.clone(),
        expect: expect.or(a.expect),
        sequencer_core: a.sequencer_core,
        bus_bytes: a.bus_bytes,
        source_bytes: a.source_bytes,
        max_lateness_us: a.max_lateness_us,
    }
}

/// Dispatches a `session` subcommand.
pub fn run(socket: &Path, json_out: bool, cmd: SessionCommand) -> Result<bool, CliError> {
    match cmd {
        SessionCommand::Create(a) => {
            let v = request(socket, &Request::SessionCreate(spec(&a, None)), T)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "session {} created ({} mode, id {})",
                    v["name"].as_str().unwrap_or(""),
                    v["mode"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("")
                );
                println!("export AEGIS_SOCKET={}", socket.display());
                println!(
                    "export AEGIS_SESSION_TOKEN={}",
                    v["token"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        SessionCommand::Run(a) => run_session(socket, json_out, &a),
        SessionCommand::Start { name, timeout } => {
            let v = request(
                socket,
                &Request::SessionStart {
                    name,
                    timeout_ms: Some(timeout * 1000),
                },
                Duration::from_secs(timeout + 5),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "session {} started with {} components",
                    v["name"].as_str().unwrap_or(""),
                    v["components"]
                );
            }
            Ok(true)
        }
        SessionCommand::List => {
            let v = request(socket, &Request::SessionList, T)?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{:<24} {:<9} {:<9} {:>10} {:>7} {:>14}",
                    "NAME", "MODE", "STATE", "COMPONENTS", "SOURCES", "EVENTS"
                );
                for s in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<9} {:<9} {:>10} {:>7} {:>14}",
                        s["name"].as_str().unwrap_or(""),
                        s["mode"].as_str().unwrap_or(""),
                        s["state"].as_str().unwrap_or(""),
                        s["components"],
                        s["sources"],
                        s["events_merged"]
                    );
                }
            }
            Ok(true)
        }
        SessionCommand::Inspect { name } => {
            let v = request(socket, &Request::SessionInspect { name }, T)?;
            if json_out {
                print_json(&v);
            } else {
                print_inspect(&v);
            }
            Ok(true)
        }
        SessionCommand::Stop { name } => {
            let v = request(socket, &Request::SessionStop { name }, T)?;
            if json_out {
                print_json(&v)
            } else {
                println!(
                    "session {} {}",
                    v["name"].as_str().unwrap_or(""),
                    v["state"].as_str().unwrap_or("")
                )
            }
            Ok(true)
        }
        SessionCommand::Destroy { name } => {
            let v = request(socket, &Request::SessionDestroy { name }, T)?;
            if json_out {
                print_json(&v)
            } else {
                println!("session {} destroyed", v["name"].as_str().unwrap_or(""))
            }
            Ok(true)
        }
    }
}

/// Human-readable `inspect`.
pub fn print_inspect(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    println!("session {} ({} mode): {}", s("name"), s("mode"), s("state"));
    if let Some(r) = v["reason"].as_str() {
        println!("  reason: {r}");
    }
    println!("components:");
    for c in v["components"].as_array().into_iter().flatten() {
        println!(
            "  {:<28} {:<9} pid {:<8} {}{}",
            c["name"].as_str().unwrap_or(""),
            c["role"].as_str().unwrap_or(""),
            c["pid"],
            c["state"].as_str().unwrap_or(""),
            c["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    println!("sources:");
    for c in v["sources"].as_array().into_iter().flatten() {
        println!(
            "  {:<28} {:<8} events {:<10} rejected {:<6} watermark {}{}",
            c["name"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            c["events"],
            c["rejected"],
            c["watermark"],
            c["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    println!("consumers:");
    for c in v["consumers"].as_array().into_iter().flatten() {
        println!(
            "  {:<28} slot {:<3} {:<9} read {:<10} lag {} bytes, overruns {}, missed {}",
            c["name"].as_str().unwrap_or(""),
            c["slot"],
            c["state"].as_str().unwrap_or(""),
            c["read"],
            c["lag_bytes"],
            c["overruns"],
            c["missed"]
        );
    }
    let q = &v["sequencer"];
    println!(
        "sequencer: {} events merged ({} /s), {} late, {} rejected, {} source stalls ({} ms), {} consumer stalls ({} ms), bus fill {} bytes",
        q["events_merged"], q["events_per_s"], q["late_events"], q["rejected_events"], q["source_stalls"], q["source_stall_ms"],
        q["consumer_stalls"], q["consumer_stall_ms"], q["bus_fill_bytes"]
    );
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
    if json_out {
        print_json(&outcome.summary);
    } else {
        println!(
            "session {}: {}",
            a.create.name,
            outcome.summary["session"]["state"].as_str().unwrap_or("?")
        );
        for c in outcome.summary["components"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "  exit {:<4} {}",
                c["exit"],
                c["command"].as_str().unwrap_or("")
            );
        }
        let q = &outcome.summary["session"]["sequencer"];
        println!(
            "  {} events merged in {:.3} s",
            q["events_merged"],
            outcome.summary["session"]["elapsed_s"]
                .as_f64()
                .unwrap_or(0.0)
        );
        if let Some(r) = outcome.summary["session"]["reason"].as_str() {
            println!("  reason: {r}");
        }
        if let Some(r) = outcome.summary["reason"].as_str() {
            println!("  run: {r}");
        }
    }
    Ok(outcome.ok)
}

/// What a run produced.
pub struct Outcome {
    /// All components exited 0 and the session finished.
    pub ok: bool,
    /// Summary JSON: `{"session": inspect, "components": [{command, exit}]}`.
    pub summary: Value,
}

/// Creates the session, starts the components (`sh -c`), waits for them and the session.
/// `configure(index, cmd)` may adjust each child (stdout redirection, say).
pub fn run_components(
    socket: &Path,
    a: &RunArgs,
    configure: impl Fn(usize, &mut Command),
) -> Result<Outcome, CliError> {
    let created = request(
        socket,
        &Request::SessionCreate(spec(&a.create, Some(a.commands.len() as u32))),
        T,
    )?;
    let token = created["token"].as_str().unwrap_or("").to_string();
    let name = a.create.name.clone();
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let abs_socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let mut children: Vec<(String, Child)> = Vec::new();
    let mut exits: Vec<Option<i32>> = Vec::new();
    for (i, cmd) in a.commands.iter().enumerate() {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("AEGIS_SOCKET", &abs_socket)
            .env("AEGIS_SESSION_TOKEN", &token)
            .env("AEGIS_SESSION", &name)
            .stdin(Stdio::null());
        configure(i, &mut c);
        match c.spawn() {
            Ok(child) => {
                children.push((cmd.clone(), child));
                exits.push(None);
            }
            Err(e) => {
                for (_, ch) in &mut children {
                    kill(ch);
                }
                let _ = request(socket, &Request::SessionDestroy { name: name.clone() }, T);
                return Err(CliError(format!("cannot start {cmd:?}: {e}")));
            }
        }
    }
    let mut last: Value = Value::Null;
    let mut failed_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut reason: Option<String> = None;
    loop {
        for (i, (_, ch)) in children.iter_mut().enumerate() {
            if exits[i].is_none() {
                if let Ok(Some(st)) = ch.try_wait() {
                    exits[i] = Some(st.code().unwrap_or(-1));
                }
            }
        }
        if let Ok(v) = request(socket, &Request::SessionInspect { name: name.clone() }, T) {
            last = v;
        }
        let state = last["state"].as_str().unwrap_or("");
        // A component that exited while the session has not started yet (inspected after the
        // exit was seen) means the barrier (one READY per -c) can never be met. Stop the
        // session now: its components get STOP and exit. This used to wait for --timeout
        // (default one hour).
        if state == "created" && reason.is_none() {
            if let Some(i) = exits.iter().position(|e| e.is_some()) {
                reason = Some(format!(
                    "component {:?} exited with status {} before the session started",
                    children[i].0,
                    exits[i].unwrap_or(-1)
                ));
                let _ = request(socket, &Request::SessionStop { name: name.clone() }, T);
                continue;
            }
        }
        let all_exited = exits.iter().all(|e| e.is_some());
        if all_exited && matches!(state, "finished" | "failed" | "stopped") {
            break;
        }
        if all_exited {
            // Give the session a moment to notice the components are gone.
            let t = failed_at.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        if matches!(state, "failed" | "stopped") && !all_exited {
            // The components were sent STOP; give them a moment, then end them.
            let t = failed_at.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                for (i, (_, ch)) in children.iter_mut().enumerate() {
                    if exits[i].is_none() {
                        kill(ch);
                        exits[i] = Some(-9);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            timed_out = true;
            for (i, (_, ch)) in children.iter_mut().enumerate() {
                if exits[i].is_none() {
                    kill(ch);
                    exits[i] = Some(-9);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !a.keep {
        let _ = request(socket, &Request::SessionDestroy { name: name.clone() }, T);
    }
    let finished = last["state"].as_str() == Some("finished");
    let ok = finished && !timed_out && exits.iter().all(|e| *e == Some(0));
    if timed_out && reason.is_none() {
        reason = Some(format!("timed out after {} s", a.timeout));
    }
    let summary = json!({
        "session": last,
        "timed_out": timed_out,
        "reason": reason,
        "components": children.iter().zip(&exits).map(|((cmd, ch), e)| json!({"command": cmd, "pid": ch.id(), "exit": e})).collect::<Vec<_>>(),
        "ok": ok,
    });
    Ok(Outcome { ok, summary })
}
