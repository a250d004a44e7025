//! The session statistics, kept in the session's ctl segment (`aegis-<sid>-ctl`): sequencer
//! counters and per-source state, written by the sequencer thread through a [`StatsWriter`]
//! and read by `inspect` from any process (a [`StatsView`], or the writer itself).
//!
//! Every field is written by one thread (the sequencer) with Relaxed stores, once per batch;
//! readers take Relaxed snapshots. Counters are monotonic, so a snapshot may be slightly old
//! but is never inconsistent in a way that matters for monitoring. The one exception is a
//! source's name and failure reason: their bytes are written before the state is stored with
//! Release, and read after an Acquire load of the state.
//!
//! The segment is memory other processes can write, so every byte of it is an atomic: names
//! and reasons are arrays of `AtomicU8` (the same layout as `[u8; N]`), never `&[u8]`.

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::segment::{self, Geometry, OpenError, Region, SegmentKind};
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Sources per session.
pub const MAX_SOURCES: usize = 64;
/// Bytes of a source name (names are `[A-Za-z0-9._-]{1,64}`).
pub const NAME_LEN: usize = 64;
/// Bytes of a failure reason (truncated).
pub const REASON_LEN: usize = 192;

/// A source's state as the sequencer sees it.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Not used.
    Unused = 0,
    /// Being merged.
    Active = 1,
    /// Reached end-of-stream.
    Ended = 2,
    /// A corrupt frame or cursor: refused, with a reason.
    Failed = 3,
    /// Removed from a live merge (dead producer).
    Removed = 4,
}

impl SourceState {
    /// The state stored as `v`; `None` for a value no writer stores (corrupt memory).
    fn from_u32(v: u32) -> Option<SourceState> {
        Some(match v {
            0 => SourceState::Unused,
            1 => SourceState::Active,
            2 => SourceState::Ended,
            3 => SourceState::Failed,
            4 => SourceState::Removed,
            _ => return None,
        })
    }

    /// Lower-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            SourceState::Unused => "unused",
            SourceState::Active => "active",
            SourceState::Ended => "ended",
            SourceState::Failed => "failed",
            SourceState::Removed => "removed",
        }
    }
}

/// Per-source counters.
#[repr(C)]
pub struct SourceCounters {
    state: AtomicU32,
    name_len: AtomicU32,
    events: AtomicU64,
    rejected: AtomicU64,
    watermark: AtomicU64,
    name: [AtomicU8; NAME_LEN],
    reason: [AtomicU8; REASON_LEN],
}

/// Sequencer-wide counters.
#[repr(C)]
#[derive(Default)]
pub struct SequencerCounters {
    /// Events written to the bus.
    pub merged: AtomicU64,
    /// Events emitted flagged LATE (live).
    pub late: AtomicU64,
    /// Events refused (ts going backwards within a source).
    pub rejected: AtomicU64,
    /// Passes that stalled waiting on a source.
    pub source_stalls: AtomicU64,
    /// Nanoseconds spent waiting on sources.
    pub source_stall_ns: AtomicU64,
    /// Passes that stalled waiting on a consumer (bus full).
    pub consumer_stalls: AtomicU64,
    /// Nanoseconds spent waiting on consumers.
    pub consumer_stall_ns: AtomicU64,
    /// Bytes of the bus not yet released by the slowest consumer.
    pub bus_fill: AtomicU64,
    /// Bytes written to the bus.
    pub bus_bytes: AtomicU64,
}

/// The values of [`SequencerCounters`] at one moment (each loaded on its own).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Events written to the bus.
    pub merged: u64,
    /// Events emitted flagged LATE (live).
    pub late: u64,
    /// Events refused (ts going backwards within a source).
    pub rejected: u64,
    /// Passes that stalled waiting on a source.
    pub source_stalls: u64,
    /// Nanoseconds spent waiting on sources.
    pub source_stall_ns: u64,
    /// Passes that stalled waiting on a consumer (bus full).
    pub consumer_stalls: u64,
    /// Nanoseconds spent waiting on consumers.
    pub consumer_stall_ns: u64,
    /// Bytes of the bus not yet released by the slowest consumer.
    pub bus_fill: u64,
    /// Bytes written to the bus.
    pub bus_bytes: u64,
}

/// The recorder's position (SPEC section 11, Aeron's `RecordingPos`): written by the
/// recorder thread alone (never by the sequencer), on its own cache lines.
#[repr(C)]
pub struct RecordingCounters {
    /// A [`RecordingState`] as u32 (0: no recorder).
    state: AtomicU32,
    /// The segment being written.
    segment: AtomicU32,
    /// Frames written (events, END-OF-STREAM, gap records).
    frames: AtomicU64,
    /// Bytes of frames written, over every segment.
    bytes: AtomicU64,
    /// The bus seq after the last frame written (or skipped by a gap): the recorded position.
    next_seq: AtomicU64,
    /// Gap records written (live: the recorder was lapped).
    gaps: AtomicU64,
    /// Frames lost to those gaps.
    missed: AtomicU64,
    reason: [AtomicU8; REASON_LEN],
}

/// What the recorder is doing, as published in the ctl segment and the manifest.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingState {
    /// Writing.
    Recording = 1,
    /// Ended at END-OF-STREAM with every frame recorded.
    Complete = 2,
    /// Ended, but not every frame is in it (gaps, a stop before the end, an error in a live
    /// session): the reason says why.
    Incomplete = 3,
}

impl RecordingState {
    fn from_u32(v: u32) -> Option<RecordingState> {
        Some(match v {
            1 => RecordingState::Recording,
            2 => RecordingState::Complete,
            3 => RecordingState::Incomplete,
            _ => return None,
        })
    }

    /// Lower-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            RecordingState::Recording => "recording",
            RecordingState::Complete => "complete",
            RecordingState::Incomplete => "incomplete",
        }
    }
}

/// A snapshot of [`RecordingCounters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingSnapshot {
    /// State.
    pub state: RecordingState,
    /// The segment being written.
    pub segment: u32,
    /// Frames written.
    pub frames: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The recorded position: the bus seq after the last frame recorded.
    pub next_seq: u64,
    /// Gap records.
    pub gaps: u64,
    /// Frames missed.
    pub missed: u64,
    /// Why it is incomplete.
    pub reason: Option<String>,
}

/// The statistics block of the session ctl segment, after the segment header.
#[repr(C)]
pub struct StatsBlock {
    /// Sequencer counters, on their own cache lines.
    pub counters: CachePadded<SequencerCounters>,
    sources: [SourceCounters; MAX_SOURCES],
    recording: CachePadded<RecordingCounters>,
}

/// A snapshot of one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSnapshot {
    /// Source id (rank).
    pub id: usize,
    /// Name.
    pub name: String,
    /// State.
    pub state: SourceState,
    /// Events merged from it.
    pub events: u64,
    /// Events refused.
    pub rejected: u64,
    /// Latest watermark (ts of its latest event or heartbeat).
    pub watermark: u64,
    /// Why it failed, if it did.
    pub reason: Option<String>,
}

/// The segment geometry of a ctl segment.
pub fn geometry() -> Geometry {
    Geometry::new(std::mem::size_of::<StatsBlock>(), 0)
}

/// A read-only view of a mapped ctl segment (heap or `/dev/shm`), for any process. Cheap to
/// clone.
#[derive(Clone)]
pub struct StatsView {
    _region: Arc<dyn Region>,
    block: *const StatsBlock,
}

// SAFETY: every field of the block is an atomic; the view only loads them.
unsafe impl Send for StatsView {}
// SAFETY: as above.
unsafe impl Sync for StatsView {}

/// The writing end of a ctl segment: the sequencer's. Not `Clone`: one writer per segment
/// (share it behind an `Arc` when another thread needs to read through it).
pub struct StatsWriter {
    view: StatsView,
}

impl StatsView {
    /// Maps an initialised ctl segment.
    pub fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<StatsView, OpenError> {
        segment::validate_header(
            &*region,
            SegmentKind::Control,
            epoch,
            std::mem::size_of::<StatsBlock>(),
        )?;
        // SAFETY: validated: the block lies inside the region.
        let block = unsafe { region.as_ptr().add(segment::HEADER_LEN) } as *const StatsBlock;
        Ok(StatsView {
            _region: region,
            block,
        })
    }

    /// The block.
    pub fn block(&self) -> &StatsBlock {
        // SAFETY: points into the region we keep alive; zeroed or initialised memory is valid
        // (every field is an atomic), and other processes write it only through atomics.
        unsafe { &*self.block }
    }

    /// A snapshot of the sequencer counters (values, not the atomics: a view only reads).
    pub fn counters(&self) -> CountersSnapshot {
        let k = &self.block().counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            merged: ld(&k.merged),
            late: ld(&k.late),
            rejected: ld(&k.rejected),
            source_stalls: ld(&k.source_stalls),
            source_stall_ns: ld(&k.source_stall_ns),
            consumer_stalls: ld(&k.consumer_stalls),
            consumer_stall_ns: ld(&k.consumer_stall_ns),
            bus_fill: ld(&k.bus_fill),
            bus_bytes: ld(&k.bus_bytes),
        }
    }

    /// Snapshots of every registered source.
    pub fn sources(&self) -> Vec<SourceSnapshot> {
        let mut out = Vec::new();
        for (id, s) in self.block().sources.iter().enumerate() {
            // Acquire: pairs with the Release stores in `set_source` / `set_state`.
            let raw = s.state.load(Ordering::Acquire);
            // An unknown value is shown as a failure that says so, not as an unused slot.
            let (state, unknown) = match SourceState::from_u32(raw) {
                Some(SourceState::Unused) => continue,
                Some(state) => (state, None),
                None => (
                    SourceState::Failed,
                    Some(format!("corrupt statistics: unknown source state {raw}")),
                ),
            };
            let n = (s.name_len.load(Ordering::Relaxed) as usize).min(NAME_LEN);
            let reason = unknown.or_else(|| {
                (state == SourceState::Failed || state == SourceState::Removed).then(|| {
                    let text = load_bytes(&s.reason);
                    let end = text.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
                    String::from_utf8_lossy(&text[..end]).into_owned()
                })
            });
            out.push(SourceSnapshot {
                id,
                name: String::from_utf8_lossy(&load_bytes(&s.name[..n])).into_owned(),
                state,
                events: s.events.load(Ordering::Relaxed),
                rejected: s.rejected.load(Ordering::Relaxed),
                watermark: s.watermark.load(Ordering::Relaxed),
                reason,
            });
        }
        out
    }

    /// The recorder's position, if the session records.
    pub fn recording(&self) -> Option<RecordingSnapshot> {
        let r = &self.block().recording;
        // Acquire: pairs with the Release store of the state in `StatsWriter::set_recording`;
        // the counters and reason stored before it are visible.
        let raw = r.state.load(Ordering::Acquire);
        let state = match RecordingState::from_u32(raw) {
            Some(s) => s,
            None if raw == 0 => return None,
            None => {
                return Some(RecordingSnapshot {
                    state: RecordingState::Incomplete,
                    segment: 0,
                    frames: 0,
                    bytes: 0,
                    next_seq: 0,
                    gaps: 0,
                    missed: 0,
                    reason: Some(format!("corrupt statistics: unknown recording state {raw}")),
                })
            }
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let reason = (state == RecordingState::Incomplete).then(|| {
            let text = load_bytes(&r.reason);
            let end = text.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
            String::from_utf8_lossy(&text[..end]).into_owned()
        });
        Some(RecordingSnapshot {
            state,
            segment: r.segment.load(Ordering::Relaxed),
            frames: ld(&r.frames),
            bytes: ld(&r.bytes),
            next_seq: ld(&r.next_seq),
            gaps: ld(&r.gaps),
            missed: ld(&r.missed),
            reason,
        })
    }
}
impl StatsWriter {
    /// Initialises a fresh, zeroed region as a ctl segment.
    pub fn create(region: Arc<dyn Region>, epoch: u64) -> StatsWriter {
        let geo = geometry();
        assert!(
            region.len() >= geo.total_len(),
            "region too small for the statistics block"
        );
        // SAFETY: the region is large enough and fresh; zeroed memory is a valid StatsBlock
        // (atomics only), so nothing else needs writing.
        unsafe { segment::write_header(&*region, SegmentKind::Control, epoch, geo) };
        segment::mark_initialized(&*region);
        // SAFETY: HEADER_LEN is inside the region and 128-aligned.
        let block = unsafe { region.as_ptr().add(segment::HEADER_LEN) } as *const StatsBlock;
        StatsWriter {
            view: StatsView {
                _region: region,
                block,
            },
        }
    }

    /// Creates a ctl segment in `/dev/shm`.
    pub fn create_shm(
        path: &std::path::Path,
        epoch: u64,
    ) -> Result<(StatsWriter, Arc<segment::ShmRegion>), segment::CreateError> {
        let region = Arc::new(segment::ShmRegion::create(path, geometry().total_len())?);
        Ok((StatsWriter::create(region.clone(), epoch), region))
    }

    /// A read-only view of the same segment.
    pub fn view(&self) -> StatsView {
        self.view.clone()
    }

    /// The sequencer counters (the writer stores into them).
    pub fn counters(&self) -> &SequencerCounters {
        &self.view.block().counters
    }

    /// Snapshots of every registered source (see [`StatsView::sources`]).
    pub fn sources(&self) -> Vec<SourceSnapshot> {
        self.view.sources()
    }

    /// The counters of source `id`; `None` beyond [`MAX_SOURCES`] (such a source is merged
    /// but has no statistics).
    fn source(&self, id: usize) -> Option<&SourceCounters> {
        self.view.block().sources.get(id)
    }

    /// Registers source `id` under `name` (the sequencer, at start). Ids from [`MAX_SOURCES`]
    /// on are not recorded (they used to panic).
    pub fn set_source(&self, id: usize, name: &str) {
        let Some(s) = self.source(id) else { return };
        let n = name.len().min(NAME_LEN);
        store_text(&s.name, &name.as_bytes()[..n]);
        s.name_len.store(n as u32, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `StatsView::sources`; the name is written
        // first.
        s.state.store(SourceState::Active as u32, Ordering::Release);
    }

    /// Updates a source's counters (the sequencer, once per batch).
    pub fn update_source(&self, id: usize, events: u64, rejected: u64, watermark: u64) {
        let Some(s) = self.source(id) else { return };
        s.events.store(events, Ordering::Relaxed);
        s.rejected.store(rejected, Ordering::Relaxed);
        s.watermark.store(watermark, Ordering::Relaxed);
    }

    /// Sets a source's state, with a reason for failures (truncated, NUL-terminated).
    pub fn set_state(&self, id: usize, state: SourceState, reason: Option<&str>) {
        let Some(s) = self.source(id) else { return };
        if let Some(r) = reason {
            let n = r.len().min(REASON_LEN - 1);
            store_text(&s.reason, &r.as_bytes()[..n]);
            s.reason[n].store(0, Ordering::Relaxed);
        }
        // Release: pairs with the Acquire load in `StatsView::sources`; the reason is written
        // first.
        s.state.store(state as u32, Ordering::Release);
    }
}

/// The recorder's progress, as [`StatsWriter::set_recording`] publishes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordingProgress {
    /// The segment being written.
    pub segment: u32,
    /// Frames written.
    pub frames: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The bus seq after the last frame recorded.
    pub next_seq: u64,
    /// Gap records.
    pub gaps: u64,
    /// Frames missed.
    pub missed: u64,
}

impl StatsWriter {
    /// Publishes the recorder's position (the recorder thread only: it is the one writer of
    /// these fields, the sequencer never touches them), with a reason once incomplete.
    pub fn set_recording(&self, state: RecordingState, p: RecordingProgress, reason: Option<&str>) {
        let r = &self.view.block().recording;
        r.segment.store(p.segment, Ordering::Relaxed);
        r.frames.store(p.frames, Ordering::Relaxed);
        r.bytes.store(p.bytes, Ordering::Relaxed);
        r.next_seq.store(p.next_seq, Ordering::Relaxed);
        r.gaps.store(p.gaps, Ordering::Relaxed);
        r.missed.store(p.missed, Ordering::Relaxed);
        if let Some(text) = reason {
            let n = text.len().min(REASON_LEN - 1);
            store_text(&r.reason, &text.as_bytes()[..n]);
            r.reason[n].store(0, Ordering::Relaxed);
        }
        // Release: pairs with the Acquire load in `StatsView::recording`; the counters and
        // the reason are stored first.
        r.state.store(state as u32, Ordering::Release);
    }
}

/// Stores `text` into the first bytes of `dst` (Relaxed: published by a later Release store
/// of the source's state).
fn store_text(dst: &[AtomicU8], text: &[u8]) {
    for (d, &b) in dst.iter().zip(text) {
        d.store(b, Ordering::Relaxed);
    }
}

/// Loads the bytes of `src` (Relaxed: after an Acquire load of the source's state).
fn load_bytes(src: &[AtomicU8]) -> Vec<u8> {
    src.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::segment::HeapRegion;

    fn writer() -> StatsWriter {
        StatsWriter::create(Arc::new(HeapRegion::new(geometry().total_len())), 7)
    }

    /// Ids beyond the table used to panic (`sources[id]`).
    #[test]
    fn source_ids_beyond_the_table_are_ignored() {
        let w = writer();
        w.set_source(MAX_SOURCES, "x");
        w.update_source(MAX_SOURCES + 5, 1, 2, 3);
        w.set_state(usize::MAX, SourceState::Failed, Some("r"));
        assert!(w.sources().is_empty());
    }

    /// An unknown state in shared memory was silently shown as `Unused` (hidden).
    #[test]
    fn an_unknown_state_is_reported_not_hidden() {
        let w = writer();
        w.set_source(3, "btc");
        w.view.block().sources[3].state.store(99, Ordering::Release);
        let s = w.sources();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].state, SourceState::Failed);
        assert!(s[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("unknown source state 99"));
    }

    #[test]
    fn recording_position_round_trips() {
        let w = writer();
        assert_eq!(w.view().recording(), None);
        let p = RecordingProgress {
            segment: 2,
            frames: 10,
            bytes: 1280,
            next_seq: 12,
            gaps: 1,
            missed: 2,
        };
        w.set_recording(RecordingState::Incomplete, p, Some("disk full"));
        let r = w.view().recording().unwrap();
        assert_eq!(r.state, RecordingState::Incomplete);
        assert_eq!((r.segment, r.frames, r.next_seq, r.missed), (2, 10, 12, 2));
        assert_eq!(r.reason.as_deref(), Some("disk full"));
    }

    /// A view hands out values, not atomics it could store into.
    #[test]
    fn a_view_reads_counter_values() {
        let w = writer();
        w.counters().merged.store(42, Ordering::Relaxed);
        assert_eq!(w.view().counters().merged, 42);
    }
}
