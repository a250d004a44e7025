//! `aegis-shmctl top [SESSION]`: a live view of the daemon (SPEC section 16), like `top` or
//! AeronStat: the sessions, and one of them in detail: its sources (rate, watermark,
//! rejected), its consumers by name (rate, lag, overruns, stalled), the sequencer (merged/s,
//! stalls) and its components. Refreshed every `--interval` (1 s); rates are computed from two
//! consecutive samples. `q`, Esc or Ctrl-C quits; Up/Down choose the session.
//!
//! `top --once` prints one snapshot instead (two samples one interval apart, for the rates)
//! and needs no terminal: text tables, or with `--json` the [`snapshot::Snapshot`] as JSON.
//!
//! Every figure comes from the daemon's `inspect` over the control socket, which reads the
//! ctl segment's counters and the bus slots with atomic loads: no lock that the sequencer
//! takes per event, so watching a session does not slow it down.

mod fmt;
mod snapshot;
mod terminal;
mod view;

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::table::{Align::Left, Align::Right, TextTable};
use super::{print_json, CliError};
use crate::cli::TopArgs;
use snapshot::{Focus, Sample, Snapshot};

/// The longest the view waits for a key before it looks at the signal flag again.
const KEY_WAIT: Duration = Duration::from_millis(100);

/// Runs `top`.
pub fn run(socket: &Path, json_out: bool, a: &TopArgs) -> Result<(), CliError> {
    let interval = Duration::from_millis(a.interval);
    if a.once {
        return once(socket, json_out, a.session.as_deref(), interval);
    }
    if json_out {
        return Err(CliError(
            "--json prints one snapshot: use `top --once --json`".into(),
        ));
    }
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(CliError(
            "top needs a terminal; for scripts use `top --once` (with --json for JSON)".into(),
        ));
    }
    live(socket, a.session.clone(), interval)
}

/// `--once`: two samples one interval apart, printed as text or JSON.
fn once(
    socket: &Path,
    json_out: bool,
    session: Option<&str>,
    interval: Duration,
) -> Result<(), CliError> {
    let focus = session.map_or(Focus::All, Focus::One);
    let first = Sample::take(socket, focus)?;
    std::thread::sleep(interval);
    let second = Sample::take(socket, focus)?;
    if let Some(e) = second.errors.first() {
        return Err(CliError(e.clone()));
    }
    let snap = Snapshot::of(Some(&first), &second);
    if json_out {
        print_json(&snap);
    } else {
        print_text(&snap);
    }
    Ok(())
}

/// The text form of `--once`: the same figures as the live view, as tables.
fn print_text(s: &Snapshot) {
    let mut t = TextTable::new(&[
        ("NAME", Left),
        ("MODE", Left),
        ("STATE", Left),
        ("COMPONENTS", Right),
        ("SOURCES", Right),
        ("EVENTS", Right),
        ("MERGED/S", Right),
    ]);
    for r in &s.sessions {
        t.row([
            r.name.clone(),
            r.mode.to_string(),
            r.state.to_string(),
            r.components.to_string(),
            r.sources.to_string(),
            r.events_merged.to_string(),
            fmt::rate(r.merged_per_s),
        ]);
    }
    t.print(0);
    for d in &s.details {
        let q = &d.sequencer;
        println!();
        println!(
            "session {} · {} · {} · up {}",
            d.name,
            d.mode,
            d.state,
            fmt::secs(d.elapsed_s)
        );
        if let Some(r) = &d.reason {
            println!("  reason: {r}");
        }
        println!(
            "  sequencer: merged {} ({}/s) · late {} · rejected {} · bus fill {} · source stalls {} ({}/s, {} ms) · consumer stalls {} ({}/s, {} ms)",
            q.events_merged,
            fmt::rate(q.merged_per_s),
            q.late_events,
            q.rejected_events,
            fmt::bytes(Some(q.bus_fill_bytes)),
            q.source_stalls,
            fmt::rate(q.source_stalls_per_s),
            q.source_stall_ms,
            q.consumer_stalls,
            fmt::rate(q.consumer_stalls_per_s),
            q.consumer_stall_ms
        );
        if q.duplicates > 0 || q.seq_gaps > 0 {
            println!(
                "  duplicates dropped {} · source seqs skipped {}",
                q.duplicates, q.seq_gaps
            );
        }
        if let Some(r) = &d.recording {
            let i = &r.info;
            println!(
                "  recorder: {} · {} frames ({}/s) · {} · up to bus seq {} · gaps {} ({} missed) · {}{}",
                i.state.map_or("not started", |s| s.name()),
                i.frames,
                fmt::rate(r.frames_per_s),
                fmt::bytes(Some(i.bytes)),
                i.next_seq,
                i.gaps,
                i.missed,
                i.dir.display(),
                i.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default()
            );
        }
        for g in &d.groups {
            println!(
                "  group {} ({}): active {} · epoch {} · {} members · failovers {}",
                g.name,
                g.failover,
                g.active.as_deref().unwrap_or("none"),
                g.epoch,
                g.members.len(),
                g.failovers
            );
        }
        let mut t = TextTable::new(&[
            ("SOURCE", Left),
            ("STATE", Left),
            ("EVENTS", Right),
            ("EVENTS/S", Right),
            ("WATERMARK (UTC)", Left),
            ("REJECTED", Right),
            ("COMPONENT", Left),
        ]);
        for r in &d.sources {
            t.row([
                r.name.clone(),
                r.state.to_string(),
                r.events.to_string(),
                fmt::rate(r.events_per_s),
                fmt::utc_ns(r.watermark),
                fmt::opt(r.rejected),
                fmt::opt(r.component.clone()),
            ]);
        }
        t.print(2);
        let mut t = TextTable::new(&[
            ("CONSUMER", Left),
            ("SLOT", Right),
            ("STATE", Left),
            ("READ", Right),
            ("EVENTS/S", Right),
            ("LAG", Right),
            ("OVERRUNS", Right),
            ("MISSED", Right),
            ("STALLED", Left),
        ]);
        for c in &d.consumers {
            t.row([
                c.name.clone(),
                fmt::opt(c.slot),
                c.state.to_string(),
                fmt::opt(c.read),
                fmt::rate(c.events_per_s),
                fmt::bytes(c.lag_bytes),
                fmt::opt(c.overruns),
                fmt::opt(c.missed),
                if c.stalled { "STALLED" } else { "no" }.to_string(),
            ]);
        }
        t.print(2);
        let mut t = TextTable::new(&[
            ("COMPONENT", Left),
            ("ROLE", Left),
            ("PID", Right),
            ("STATE", Left),
            ("REASON", Left),
        ]);
        for c in &d.components {
            t.row([
                c.name.clone(),
                c.role.to_string(),
                c.pid.to_string(),
                c.state.to_string(),
                fmt::opt(c.reason.clone()),
            ]);
        }
        t.print(2);
    }
}

/// What a key asks for.
enum Key {
    Quit,
    Previous,
    Next,
    Other,
}

fn key(k: KeyEvent) -> Key {
    match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Key::Quit,
        KeyCode::Up | KeyCode::Char('k') => Key::Previous,
        KeyCode::Down | KeyCode::Char('j') => Key::Next,
        _ => Key::Other,
    }
}

/// The live view's state between two frames.
struct App {
    /// The session named on the command line: it stays chosen even while it does not exist.
    pinned: Option<String>,
    /// The session shown in detail.
    selected: Option<String>,
    /// The last sample (the rates of the next snapshot are taken against it).
    previous: Option<Sample>,
    /// What the screen shows.
    snapshot: Option<Snapshot>,
    /// The last error (no daemon, no such session).
    error: Option<String>,
}

impl App {
    fn new(session: Option<String>) -> App {
        App {
            pinned: session.clone(),
            selected: session,
            previous: None,
            snapshot: None,
            error: None,
        }
    }

    /// Takes a sample. Returns whether to take the next one at once: a session was just
    /// chosen (none was, or the chosen one is gone and was not named on the command line:
    /// then the first one listed) and its details are still to come.
    fn refresh(&mut self, socket: &Path) -> bool {
        let focus = self.selected.as_deref().map_or(Focus::Nothing, Focus::One);
        let s = match Sample::take(socket, focus) {
            Ok(s) => s,
            Err(e) => {
                self.error = Some(e.0);
                return false;
            }
        };
        self.error = s.errors.first().cloned();
        let first = s.sessions.first().map(|x| x.name.clone());
        let gone = self.selected.as_deref().is_some_and(|n| {
            Some(n) != self.pinned.as_deref() && !s.sessions.iter().any(|x| x.name == n)
        });
        self.snapshot = Some(Snapshot::of(self.previous.as_ref(), &s));
        self.previous = Some(s);
        if gone || self.selected.is_none() {
            if gone {
                self.error = None;
            }
            self.selected = first;
            return self.selected.is_some();
        }
        false
    }

    /// Moves the choice `step` sessions down the list (up if negative). Returns whether
    /// another session is chosen.
    fn choose(&mut self, step: isize) -> bool {
        let names: Vec<&str> = self
            .previous
            .as_ref()
            .map(|p| p.sessions.iter().map(|s| s.name.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return false;
        }
        let at = self
            .selected
            .as_deref()
            .and_then(|n| names.iter().position(|x| *x == n))
            .map_or(0, |i| i as isize + step)
            .clamp(0, names.len() as isize - 1) as usize;
        if self.selected.as_deref() == Some(names[at]) {
            return false;
        }
        self.selected = Some(names[at].to_string());
        true
    }
}

/// The live view, until `q`, Ctrl-C or a termination signal.
fn live(socket: &Path, session: Option<String>, interval: Duration) -> Result<(), CliError> {
    let mut screen = terminal::Screen::enter()
        .map_err(|e| CliError(format!("cannot set up the terminal: {e}")))?;
    let socket_text = socket.display().to_string();
    let mut app = App::new(session);
    let mut due = Instant::now();
    let mut redraw = true;
    while !terminal::stop_requested() {
        if Instant::now() >= due {
            due = if app.refresh(socket) {
                Instant::now()
            } else {
                Instant::now() + interval
            };
            redraw = true;
        }
        if redraw {
            let shown = view::Shown {
                snapshot: app.snapshot.as_ref(),
                selected: app.selected.as_deref(),
                socket: &socket_text,
                every_s: interval.as_secs_f64(),
                error: app.error.as_deref(),
            };
            screen.terminal.draw(|f| view::draw(f, &shown))?;
            redraw = false;
        }
        let wait = due.saturating_duration_since(Instant::now()).min(KEY_WAIT);
        if !event::poll(wait)? {
            continue;
        }
        match event::read()? {
            Event::Key(k) if k.kind == KeyEventKind::Press => {
                let step = match key(k) {
                    Key::Quit => break,
                    Key::Previous => -1,
                    Key::Next => 1,
                    Key::Other => continue,
                };
                if app.choose(step) {
                    // Inspect the newly chosen session now.
                    due = Instant::now();
                }
            }
            Event::Resize(..) => redraw = true,
            _ => {}
        }
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_shm_client::protocol::SessionInfo;

    fn listed(names: &[&str]) -> Sample {
        Sample {
            at: Instant::now(),
            unix_ms: 0,
            sessions: names
                .iter()
                .map(|n| {
                    serde_json::from_value::<SessionInfo>(serde_json::json!({
                        "name": n, "id": n, "sid": "s", "mode": "live", "state": "running",
                        "components": 0, "sources": 0, "events_merged": 0
                    }))
                    .unwrap()
                })
                .collect(),
            inspected: Vec::new(),
            errors: Vec::new(),
        }
    }

    #[test]
    fn up_and_down_choose_among_the_listed_sessions() {
        let mut app = App::new(None);
        assert!(!app.choose(1), "nothing listed yet");
        app.previous = Some(listed(&["a", "b", "c"]));
        app.selected = Some("a".into());
        assert!(!app.choose(-1), "already the first");
        assert!(app.choose(1));
        assert_eq!(app.selected.as_deref(), Some("b"));
        assert!(app.choose(1));
        assert!(!app.choose(1), "already the last");
        assert_eq!(app.selected.as_deref(), Some("c"));
        // A chosen session that is not listed: the first one.
        app.selected = Some("gone".into());
        assert!(app.choose(1));
        assert_eq!(app.selected.as_deref(), Some("a"));
    }

    #[test]
    fn keys() {
        let k = |code, modifiers| key(KeyEvent::new(code, modifiers));
        assert!(matches!(
            k(KeyCode::Char('q'), KeyModifiers::NONE),
            Key::Quit
        ));
        assert!(matches!(k(KeyCode::Esc, KeyModifiers::NONE), Key::Quit));
        assert!(matches!(
            k(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Key::Quit
        ));
        assert!(matches!(
            k(KeyCode::Char('c'), KeyModifiers::NONE),
            Key::Other
        ));
        assert!(matches!(k(KeyCode::Up, KeyModifiers::NONE), Key::Previous));
        assert!(matches!(
            k(KeyCode::Char('j'), KeyModifiers::NONE),
            Key::Next
        ));
    }
}
