//! What `top` shows: a [`Sample`] of the daemon's answers (`SESSION_LIST`, and
//! `SESSION_INSPECT` of the sessions looked at), and the [`Snapshot`] made of two consecutive
//! samples, whose rates are the counters' differences over the time between them.
//!
//! Everything comes from the control socket. The daemon builds `inspect` from the ctl
//! segment's counters and the bus slots (atomic loads, no lock the sequencer takes), so
//! sampling once a second does not touch the data path.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{
    ComponentInfo, ComponentState, Inspect, Mode, Request, SessionInfo, SessionState, SourceKind,
    SourceStatus,
};
use serde::Serialize;

use super::super::{request, CliError};

/// Deadline of one request: short, so that a stuck daemon freezes the view only briefly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Which sessions a sample inspects.
#[derive(Clone, Copy, Debug)]
pub enum Focus<'a> {
    /// Every listed session.
    All,
    /// This one.
    One(&'a str),
    /// None: the list only.
    Nothing,
}

/// The daemon's answers at one moment.
pub struct Sample {
    /// When the answers arrived.
    pub at: Instant,
    /// The same moment as Unix time, ms.
    pub unix_ms: u64,
    /// Every session.
    pub sessions: Vec<SessionInfo>,
    /// The inspected sessions.
    pub inspected: Vec<Inspect>,
    /// The inspections that failed (no such session, say), as messages.
    pub errors: Vec<String>,
}

impl Sample {
    /// Asks the daemon at `socket` for its sessions and inspects those of `focus`. Fails if
    /// the daemon does not answer the list (within 2 s); a failed inspection is recorded in
    /// [`Sample::errors`] (with [`Focus::All`], a session destroyed between the list and its
    /// inspection is left out silently).
    pub fn take(socket: &Path, focus: Focus) -> Result<Sample, CliError> {
        let sessions: Vec<SessionInfo> = request(socket, &Request::SessionList, REQUEST_TIMEOUT)?;
        let names: Vec<&str> = match focus {
            Focus::All => sessions.iter().map(|s| s.name.as_str()).collect(),
            Focus::One(name) => vec![name],
            Focus::Nothing => Vec::new(),
        };
        let mut inspected = Vec::with_capacity(names.len());
        let mut errors = Vec::new();
        for name in names {
            let req = Request::SessionInspect {
                name: name.to_string(),
            };
            match request::<Inspect>(socket, &req, REQUEST_TIMEOUT) {
                Ok(v) => inspected.push(v),
                Err(_) if matches!(focus, Focus::All) => {}
                Err(e) => errors.push(format!("session {name}: {}", e.0)),
            }
        }
        Ok(Sample {
            at: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            sessions,
            inspected,
            errors,
        })
    }
}

/// One view of the daemon (the `--once --json` output): the sessions, and the inspected
/// ones in detail, with per-second rates over the last interval.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When the sample was taken, Unix time in ms.
    pub unix_ms: u64,
    /// Seconds between the two samples the rates come from; `null` (and every rate `null`)
    /// for a first sample.
    pub interval_s: Option<f64>,
    /// Every session.
    pub sessions: Vec<SessionRow>,
    /// The inspected sessions.
    pub details: Vec<SessionDetail>,
}

/// A session in the list.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SessionRow {
    /// Name.
    pub name: String,
    /// UUID.
    pub id: String,
    /// Live or backtest.
    pub mode: Mode,
    /// State.
    pub state: SessionState,
    /// Components registered.
    pub components: usize,
    /// Sources registered.
    pub sources: usize,
    /// Events merged so far.
    pub events_merged: u64,
    /// Events merged per second over the interval.
    pub merged_per_s: Option<f64>,
}

/// A session in detail.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SessionDetail {
    /// Name.
    pub name: String,
    /// UUID.
    pub id: String,
    /// Live or backtest.
    pub mode: Mode,
    /// State.
    pub state: SessionState,
    /// Why it failed.
    pub reason: Option<String>,
    /// Seconds since the start, once started.
    pub elapsed_s: Option<f64>,
    /// Every component.
    pub components: Vec<ComponentInfo>,
    /// Every source.
    pub sources: Vec<SourceRow>,
    /// Every consumer.
    pub consumers: Vec<ConsumerRow>,
    /// The sequencer.
    pub sequencer: SequencerRow,
    /// The recorder (`--record`), with its recorded rate.
    pub recording: Option<RecordingRow>,
    /// Hot-standby groups.
    pub groups: Vec<aegis_shm_client::protocol::GroupInfo>,
}

/// The recorder.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RecordingRow {
    /// What the daemon reports.
    #[serde(flatten)]
    pub info: aegis_shm_client::protocol::RecordingInfo,
    /// Frames recorded per second over the interval.
    pub frames_per_s: Option<f64>,
}

/// A source.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SourceRow {
    /// Name.
    pub name: String,
    /// The component that writes it.
    pub component: Option<String>,
    /// Declared kind.
    pub kind: Option<SourceKind>,
    /// State.
    pub state: SourceStatus,
    /// Events merged from it.
    pub events: u64,
    /// Of those, per second over the interval.
    pub events_per_s: Option<f64>,
    /// Highest timestamp merged (ns), once the sequencer runs.
    pub watermark: Option<u64>,
    /// Events refused, once the sequencer runs.
    pub rejected: Option<u64>,
    /// Why it failed or was removed.
    pub reason: Option<String>,
}

/// A consumer.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ConsumerRow {
    /// Component name.
    pub name: String,
    /// Bus slot.
    pub slot: Option<usize>,
    /// Component state.
    pub state: ComponentState,
    /// Silent while its pid lives (backtest): the session waits for it.
    pub stalled: bool,
    /// Frames read.
    pub read: Option<u64>,
    /// Frames read per second over the interval.
    pub events_per_s: Option<f64>,
    /// Bytes behind the bus tail.
    pub lag_bytes: Option<u64>,
    /// Times the writer lapped it (live).
    pub overruns: Option<u64>,
    /// Frames lost to overruns.
    pub missed: Option<u64>,
}

/// The sequencer.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SequencerRow {
    /// Events written to the bus.
    pub events_merged: u64,
    /// Of those, per second over the interval.
    pub merged_per_s: Option<f64>,
    /// Live: events older than the merge point.
    pub late_events: u64,
    /// Events refused.
    pub rejected_events: u64,
    /// Times the merge waited for a source.
    pub source_stalls: u64,
    /// Of those, per second over the interval.
    pub source_stalls_per_s: Option<f64>,
    /// Total of those waits (ms).
    pub source_stall_ms: u64,
    /// Times the merge waited for a consumer.
    pub consumer_stalls: u64,
    /// Of those, per second over the interval.
    pub consumer_stalls_per_s: Option<f64>,
    /// Total of those waits (ms).
    pub consumer_stall_ms: u64,
    /// Bytes on the bus not yet read by the slowest consumer.
    pub bus_fill_bytes: u64,
    /// Resent events dropped as duplicates (a restarted or promoted producer).
    pub duplicates: u64,
    /// Source seqs skipped.
    pub seq_gaps: u64,
}

/// `(now - before) / secs`, or `None` without a previous value, without time between them,
/// or when the counter went back (the session was replaced).
fn rate(before: Option<u64>, now: Option<u64>, secs: Option<f64>) -> Option<f64> {
    let (b, n, s) = (before?, now?, secs?);
    (n >= b && s > 0.0).then(|| (n - b) as f64 / s)
}

impl Snapshot {
    /// The view of `now`, with rates against `before` (the previous sample, if any).
    pub fn of(before: Option<&Sample>, now: &Sample) -> Snapshot {
        let secs = before
            .map(|b| now.at.saturating_duration_since(b.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let sessions = now
            .sessions
            .iter()
            .map(|s| {
                let prev = before.and_then(|b| b.sessions.iter().find(|p| p.id == s.id));
                SessionRow {
                    name: s.name.clone(),
                    id: s.id.clone(),
                    mode: s.mode,
                    state: s.state,
                    components: s.components,
                    sources: s.sources,
                    events_merged: s.events_merged,
                    merged_per_s: rate(prev.map(|p| p.events_merged), Some(s.events_merged), secs),
                }
            })
            .collect();
        let details = now
            .inspected
            .iter()
            .map(|v| {
                let prev = before.and_then(|b| b.inspected.iter().find(|p| p.id == v.id));
                detail(prev, v, secs)
            })
            .collect();
        Snapshot {
            unix_ms: now.unix_ms,
            interval_s: secs,
            sessions,
            details,
        }
    }
}

/// One session in detail, with rates against its previous `inspect`.
fn detail(prev: Option<&Inspect>, v: &Inspect, secs: Option<f64>) -> SessionDetail {
    let sources = v
        .sources
        .iter()
        .map(|s| {
            let p = prev.and_then(|p| p.sources.iter().find(|x| x.name == s.name));
            SourceRow {
                name: s.name.clone(),
                component: s.component.clone(),
                kind: s.kind,
                state: s.state,
                events: s.events,
                events_per_s: rate(p.map(|p| p.events), Some(s.events), secs),
                watermark: s.progress.as_ref().map(|g| g.watermark),
                rejected: s.progress.as_ref().map(|g| g.rejected),
                reason: s.progress.as_ref().and_then(|g| g.reason.clone()),
            }
        })
        .collect();
    let consumers = v
        .consumers
        .iter()
        .map(|c| {
            let p = prev.and_then(|p| p.consumers.iter().find(|x| x.name == c.name));
            ConsumerRow {
                name: c.name.clone(),
                slot: c.slot,
                state: c.state,
                stalled: c.state == ComponentState::Stalled,
                read: c.read,
                events_per_s: rate(p.and_then(|p| p.read), c.read, secs),
                lag_bytes: c.lag_bytes,
                overruns: c.overruns,
                missed: c.missed,
            }
        })
        .collect();
    let q = &v.sequencer;
    let pq = prev.map(|p| &p.sequencer);
    SessionDetail {
        name: v.name.clone(),
        id: v.id.clone(),
        mode: v.mode,
        state: v.state,
        reason: v.reason.clone(),
        elapsed_s: v.elapsed_s,
        components: v.components.clone(),
        sources,
        consumers,
        sequencer: SequencerRow {
            events_merged: q.events_merged,
            merged_per_s: rate(pq.map(|p| p.events_merged), Some(q.events_merged), secs),
            late_events: q.late_events,
            rejected_events: q.rejected_events,
            source_stalls: q.source_stalls,
            source_stalls_per_s: rate(pq.map(|p| p.source_stalls), Some(q.source_stalls), secs),
            source_stall_ms: q.source_stall_ms,
            consumer_stalls: q.consumer_stalls,
            consumer_stalls_per_s: rate(
                pq.map(|p| p.consumer_stalls),
                Some(q.consumer_stalls),
                secs,
            ),
            consumer_stall_ms: q.consumer_stall_ms,
            bus_fill_bytes: q.bus_fill_bytes,
            duplicates: q.duplicates,
            seq_gaps: q.seq_gaps,
        },
        recording: v.recording.as_ref().map(|r| RecordingRow {
            info: r.clone(),
            frames_per_s: rate(
                prev.and_then(|p| p.recording.as_ref()).map(|p| p.frames),
                Some(r.frames),
                secs,
            ),
        }),
        groups: v.groups.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An `inspect` answer of session `lv` with one source and one consumer at these counts.
    fn inspect(id: &str, events: u64, read: u64, stalls: u64, consumer: &str) -> Inspect {
        serde_json::from_value(json!({
            "name": "lv", "id": id, "mode": "live", "state": "running", "reason": null,
            "created_unix_s": 0, "elapsed_s": 3.0,
            "components": [
                {"name": "feed", "role": "producer", "pid": 10, "state": "ready", "reason": null},
                {"name": "tap", "role": "consumer", "pid": 11, "state": consumer, "reason": null}
            ],
            "sources": [{"name": "btc", "state": "active", "events": events, "rejected": 1,
                         "watermark": 77, "reason": null, "kind": "trade", "topic": "t",
                         "component": "feed"}],
            "consumers": [{"name": "tap", "slot": 0, "state": consumer, "cursor": 0,
                           "lag_bytes": 64, "read": read, "overruns": 0, "missed": 0}],
            "topics": {},
            "sequencer": {"events_merged": events, "late_events": 0, "rejected_events": 1,
                          "source_stalls": stalls, "source_stall_ms": 0, "consumer_stalls": 0,
                          "consumer_stall_ms": 0, "bus_fill_bytes": 64, "events_per_s": null},
            "segments": {"bus": "/dev/shm/x", "control": "/dev/shm/y", "sources": []}
        }))
        .expect("an inspect answer")
    }

    fn sample(at: Instant, v: Inspect) -> Sample {
        let info: SessionInfo = serde_json::from_value(json!({
            "name": v.name, "id": v.id, "sid": "s", "mode": "live", "state": "running",
            "components": 2, "sources": 1, "events_merged": v.sequencer.events_merged
        }))
        .expect("a list entry");
        Sample {
            at,
            unix_ms: 0,
            sessions: vec![info],
            inspected: vec![v],
            errors: Vec::new(),
        }
    }

    #[test]
    fn rates_are_differences_over_the_interval() {
        let t0 = Instant::now();
        let a = sample(t0, inspect("id1", 1000, 900, 5, "ready"));
        let b = sample(
            t0 + Duration::from_millis(500),
            inspect("id1", 3000, 2900, 6, "stalled"),
        );
        let first = Snapshot::of(None, &a);
        assert_eq!(first.interval_s, None);
        assert_eq!(first.details[0].sequencer.merged_per_s, None);
        let s = Snapshot::of(Some(&a), &b);
        assert_eq!(s.interval_s, Some(0.5));
        assert_eq!(s.sessions[0].merged_per_s, Some(4000.0));
        let d = &s.details[0];
        assert_eq!(d.sources[0].events_per_s, Some(4000.0));
        assert_eq!(d.sources[0].watermark, Some(77));
        assert_eq!(d.sources[0].rejected, Some(1));
        assert_eq!(d.consumers[0].events_per_s, Some(4000.0));
        assert!(d.consumers[0].stalled);
        assert_eq!(d.sequencer.merged_per_s, Some(4000.0));
        assert_eq!(d.sequencer.source_stalls_per_s, Some(2.0));
    }

    #[test]
    fn a_replaced_session_has_no_rates() {
        let t0 = Instant::now();
        let a = sample(t0, inspect("id1", 1000, 900, 5, "ready"));
        let b = sample(
            t0 + Duration::from_secs(1),
            inspect("id2", 10, 9, 0, "ready"),
        );
        let s = Snapshot::of(Some(&a), &b);
        assert_eq!(s.sessions[0].merged_per_s, None);
        assert_eq!(s.details[0].sources[0].events_per_s, None);
        assert_eq!(s.details[0].sequencer.merged_per_s, None);
    }
}
