//! The live view's screen, drawn by ratatui from a [`Snapshot`]:
//!
//! ```text
//! aegis top · <socket> · 12:00:01 UTC · every 1 s                    q quit · ↑/↓ session
//! ┌sessions──────────────────────────────────────────────────────────────────────────────┐
//! │NAME  MODE  STATE    COMPONENTS  SOURCES  EVENTS  MERGED/S                            │
//! │lv    live  running           2        1    1234      412                             │
//! └──────────────────────────────────────────────────────────────────────────────────────┘
//! ┌session lv · live · running · up 3.0 s──────────────────────────────────────────────────┐
//! │sequencer  merged 1234 (412/s) · late 0 · rejected 0 · bus fill 64 B                   │
//! │           source stalls 12 (4/s, 1 ms) · consumer stalls 0 (0/s, 0 ms)                │
//! │─sources──────────────────────────────────────────────────────────────────────────────│
//! │NAME ...                                                                               │
//! │─consumers────────────────────────────────────────────────────────────────────────────│
//! │─components───────────────────────────────────────────────────────────────────────────│
//! └──────────────────────────────────────────────────────────────────────────────────────┘
//! <the last error, or how many sessions>
//! ```

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use super::fmt;
use super::snapshot::{SessionDetail, Snapshot};
use crate::command::table::Align;

/// What the screen shows besides the snapshot.
pub struct Shown<'a> {
    /// The latest snapshot, if any arrived.
    pub snapshot: Option<&'a Snapshot>,
    /// The session shown in detail.
    pub selected: Option<&'a str>,
    /// The daemon's socket.
    pub socket: &'a str,
    /// The refresh period, seconds.
    pub every_s: f64,
    /// The last error (the daemon did not answer, no such session).
    pub error: Option<&'a str>,
}

/// Spaces between two columns.
const GAP: u16 = 2;

/// A table of `columns` and `rows` (cells as text), columns as wide as their widest cell,
/// numbers right-aligned; the row `highlight` in reverse video. Returns it with the number
/// of lines it needs (header and rows, plus `extra` for its block).
fn table<'a>(
    columns: &[(&'a str, Align)],
    rows: Vec<Vec<String>>,
    highlight: Option<usize>,
    extra: u16,
) -> (Table<'a>, u16) {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let cell = |text: String, align: Align| match align {
        Align::Left => Cell::from(Line::from(text)),
        Align::Right => Cell::from(Line::from(text).right_aligned()),
    };
    let header = Row::new(
        columns
            .iter()
            .map(|(h, a)| cell(h.to_string(), *a))
            .collect::<Vec<_>>(),
    )
    .style(Style::new().add_modifier(Modifier::BOLD));
    let height = rows.len() as u16 + 1 + extra;
    let rows: Vec<Row> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let row = Row::new(
                r.into_iter()
                    .zip(columns)
                    .map(|(c, (_, a))| cell(c, *a))
                    .collect::<Vec<_>>(),
            );
            if Some(i) == highlight {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths: Vec<Constraint> = widths
        .into_iter()
        .map(|w| Constraint::Length(w as u16))
        .collect();
    (
        Table::new(rows, widths).header(header).column_spacing(GAP),
        height,
    )
}

/// A titled rule above a sub-table.
fn rule(title: &str) -> Block<'_> {
    Block::new()
        .borders(Borders::TOP)
        .title(Span::from(format!(" {title} ")).bold())
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, v: &Shown) {
    let sessions_rows = v.snapshot.map_or(0, |s| s.sessions.len()) as u16;
    let [top, sessions, detail, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(sessions_rows.clamp(1, 8) + 3),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_title(frame, top, v);
    draw_sessions(frame, sessions, v);
    let shown = v.snapshot.and_then(|s| {
        s.details
            .iter()
            .find(|d| Some(d.name.as_str()) == v.selected)
    });
    match shown {
        Some(d) => draw_detail(frame, detail, d),
        None => {
            let text = match (v.snapshot, v.selected) {
                (None, _) => "waiting for the daemon...".to_string(),
                (Some(s), _) if s.sessions.is_empty() => {
                    "no session: create one with `aegis-shmctl session create`".to_string()
                }
                (_, Some(name)) => format!("session {name}: no details"),
                (_, None) => "no session selected".to_string(),
            };
            frame.render_widget(Paragraph::new(text).block(Block::bordered()), detail);
        }
    }
    let status = match (v.error, v.snapshot) {
        (Some(e), _) => Line::from(e.to_string()).style(Style::new().fg(Color::Red)),
        (None, Some(s)) => Line::from(format!(
            "{} session(s); rates over the last {}",
            s.sessions.len(),
            fmt::secs(s.interval_s)
        )),
        (None, None) => Line::from(""),
    };
    frame.render_widget(Paragraph::new(status), bottom);
}

fn draw_title(frame: &mut Frame, area: Rect, v: &Shown) {
    let clock = v
        .snapshot
        .map_or_else(|| "--:--:--".to_string(), |s| fmt::clock_ms(s.unix_ms));
    let left = Line::from(vec![
        Span::from("aegis top").bold(),
        Span::from(format!(
            " · {} · {clock} UTC · every {} s",
            v.socket, v.every_s
        )),
    ]);
    let right = Line::from("q quit · ↑/↓ session").right_aligned();
    frame.render_widget(Paragraph::new(left), area);
    frame.render_widget(Paragraph::new(right), area);
}

fn draw_sessions(frame: &mut Frame, area: Rect, v: &Shown) {
    let sessions = v.snapshot.map(|s| s.sessions.as_slice()).unwrap_or(&[]);
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.mode.to_string(),
                s.state.to_string(),
                s.components.to_string(),
                s.sources.to_string(),
                s.events_merged.to_string(),
                fmt::rate(s.merged_per_s),
            ]
        })
        .collect();
    let selected = sessions
        .iter()
        .position(|s| Some(s.name.as_str()) == v.selected);
    let (t, _) = table(
        &[
            ("NAME", Align::Left),
            ("MODE", Align::Left),
            ("STATE", Align::Left),
            ("COMPONENTS", Align::Right),
            ("SOURCES", Align::Right),
            ("EVENTS", Align::Right),
            ("MERGED/S", Align::Right),
        ],
        rows,
        selected,
        0,
    );
    frame.render_widget(t.block(Block::bordered().title(" sessions ")), area);
}

fn draw_detail(frame: &mut Frame, area: Rect, d: &SessionDetail) {
    let title = format!(
        " session {} · {} · {} · up {} ",
        d.name,
        d.mode,
        d.state,
        fmt::secs(d.elapsed_s)
    );
    let block = Block::bordered().title(Span::from(title).bold());
    let inner = block.inner(area);
    frame.render_widget(block, area);

    let q = &d.sequencer;
    let mut sequencer = vec![
        Line::from(vec![
            Span::from("sequencer  ").bold(),
            Span::from(format!(
                "merged {} ({}/s) · late {} · rejected {} · bus fill {}",
                q.events_merged,
                fmt::rate(q.merged_per_s),
                q.late_events,
                q.rejected_events,
                fmt::bytes(Some(q.bus_fill_bytes))
            )),
        ]),
        Line::from(format!(
            "           source stalls {} ({}/s, {} ms) · consumer stalls {} ({}/s, {} ms)",
            q.source_stalls,
            fmt::rate(q.source_stalls_per_s),
            q.source_stall_ms,
            q.consumer_stalls,
            fmt::rate(q.consumer_stalls_per_s),
            q.consumer_stall_ms
        )),
    ];
    if q.duplicates > 0 || q.seq_gaps > 0 {
        sequencer.push(Line::from(format!(
            "           duplicates dropped {} · source seqs skipped {}",
            q.duplicates, q.seq_gaps
        )));
    }
    if let Some(r) = &d.recording {
        let i = &r.info;
        sequencer.push(Line::from(vec![
            Span::from("recorder   ").bold(),
            Span::from(format!(
                "{} · {} frames ({}/s) · {} · up to bus seq {} · segment {} · gaps {} ({} missed) · {}",
                i.state.map_or("not started", |s| s.name()),
                i.frames,
                fmt::rate(r.frames_per_s),
                fmt::bytes(Some(i.bytes)),
                i.next_seq,
                i.segment,
                i.gaps,
                i.missed,
                i.dir.display()
            )),
        ]));
        if let Some(why) = &i.reason {
            sequencer
                .push(Line::from(format!("           {why}")).style(Style::new().fg(Color::Red)));
        }
    }
    for g in &d.groups {
        sequencer.push(Line::from(vec![
            Span::from("group      ").bold(),
            Span::from(format!(
                "{} ({}) · active {} · epoch {} · {} members · failovers {}",
                g.name,
                g.failover,
                g.active.as_deref().unwrap_or("none"),
                g.epoch,
                g.members.len(),
                g.failovers
            )),
        ]));
    }
    if let Some(r) = &d.reason {
        sequencer.push(Line::from(format!("reason: {r}")).style(Style::new().fg(Color::Red)));
    }
    let sequencer_height = sequencer.len() as u16;

    let (sources, sources_height) = table(
        &[
            ("SOURCE", Align::Left),
            ("STATE", Align::Left),
            ("EVENTS", Align::Right),
            ("EVENTS/S", Align::Right),
            ("WATERMARK (UTC)", Align::Left),
            ("REJECTED", Align::Right),
            ("COMPONENT", Align::Left),
        ],
        d.sources
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.state.to_string(),
                    s.events.to_string(),
                    fmt::rate(s.events_per_s),
                    fmt::utc_ns(s.watermark),
                    fmt::opt(s.rejected),
                    fmt::opt(s.component.clone()),
                ]
            })
            .collect(),
        None,
        1,
    );
    let (consumers, consumers_height) = table(
        &[
            ("CONSUMER", Align::Left),
            ("SLOT", Align::Right),
            ("STATE", Align::Left),
            ("READ", Align::Right),
            ("EVENTS/S", Align::Right),
            ("LAG", Align::Right),
            ("OVERRUNS", Align::Right),
            ("MISSED", Align::Right),
            ("STALLED", Align::Left),
        ],
        d.consumers
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    fmt::opt(c.slot),
                    c.state.to_string(),
                    fmt::opt(c.read),
                    fmt::rate(c.events_per_s),
                    fmt::bytes(c.lag_bytes),
                    fmt::opt(c.overruns),
                    fmt::opt(c.missed),
                    if c.stalled { "STALLED" } else { "no" }.to_string(),
                ]
            })
            .collect(),
        None,
        1,
    );
    let (components, _) = table(
        &[
            ("COMPONENT", Align::Left),
            ("ROLE", Align::Left),
            ("PID", Align::Right),
            ("STATE", Align::Left),
            ("REASON", Align::Left),
        ],
        d.components
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.role.to_string(),
                    c.pid.to_string(),
                    c.state.to_string(),
                    fmt::opt(c.reason.clone()),
                ]
            })
            .collect(),
        None,
        1,
    );
    let [seq_area, sources_area, consumers_area, components_area] = Layout::vertical([
        Constraint::Length(sequencer_height),
        Constraint::Length(sources_height),
        Constraint::Length(consumers_height),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(sequencer), seq_area);
    frame.render_widget(sources.block(rule("sources")), sources_area);
    frame.render_widget(consumers.block(rule("consumers")), consumers_area);
    frame.render_widget(components.block(rule("components")), components_area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::top::snapshot::{Sample, Snapshot};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(v: &Shown) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| draw(f, v)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn an_empty_daemon_says_how_to_start() {
        let sample = Sample {
            at: std::time::Instant::now(),
            unix_ms: 0,
            sessions: Vec::new(),
            inspected: Vec::new(),
            errors: Vec::new(),
        };
        let snap = Snapshot::of(None, &sample);
        let s = screen(&Shown {
            snapshot: Some(&snap),
            selected: None,
            socket: "/tmp/a.sock",
            every_s: 1.0,
            error: None,
        });
        assert!(s.contains("aegis top · /tmp/a.sock · 00:00:00 UTC"), "{s}");
        assert!(s.contains("no session: create one"), "{s}");
        let s = screen(&Shown {
            snapshot: None,
            selected: None,
            socket: "/tmp/a.sock",
            every_s: 1.0,
            error: Some("no daemon at /tmp/a.sock"),
        });
        assert!(s.contains("waiting for the daemon"), "{s}");
        assert!(s.contains("no daemon at /tmp/a.sock"), "{s}");
    }
}
