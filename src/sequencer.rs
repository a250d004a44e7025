//! The sequencer: merges a session's source rings into the bus, deterministically.
//!
//! Merge key, compared left to right (SPEC section 3): `ts`, kind priority (Trade < Book <
//! Kline < Custom), source rank (position of the source's name in the sorted list of names), source
//! sequence. The key is packed into a `u128` so one comparison decides.
//!
//! The heads of all sources are cached, and the minimum is found by a linear scan over them.
//! `benches/merge.rs` measures the scan against a binary heap: the scan wins up to about 8
//! sources (273 vs 227 M keys/s at k = 1, 47 vs 32 at k = 8), the heap from 32 (22 vs 15 at
//! k = 32). Sessions have a handful of sources in practice, so the scan stays; a heap for
//! k > 16 is a known improvement.
//!
//! - **Backtest (exact):** the minimum is emitted only when every source that has not ended has
//!   a head. The output therefore depends only on the input, never on timing. The bus uses the
//!   block policy: the sequencer waits for the slowest consumer.
//! - **Live (bounded lateness):** a source with nothing waiting holds the merge back only while
//!   the candidate is newer than its watermark and for at most `max_lateness` since it ran dry.
//!   An event older than one already emitted goes out flagged LATE and is counted. The bus
//!   uses the overwrite policy and never waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::doorbell::Bell;
use aegis_shm_client::frame::{flags, FrameHeader, Kind};
use aegis_shm_client::spmc::{BusWriter, WriteError};
use aegis_shm_client::spsc::RingReader;
use aegis_shm_client::stats::{SourceState, StatsWriter, MAX_SOURCES};
use aegis_shm_client::wait::{Deadline, WaitKind, WaitStrategy};

use crate::source::{SourceError, SourceReader};
use crate::takeover::{SeqTrack, Takeovers};

/// Session mode.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Exact merge, block policy.
    Backtest,
    /// Bounded lateness, overwrite policy.
    Live {
        /// How long an idle source may hold the merge back.
        max_lateness: Duration,
    },
}

/// Sequencer settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The session mode.
    pub mode: Mode,
    /// Frames moved per pass before the bus cursor is published.
    pub batch: usize,
    /// Core to pin the sequencer thread to (`None`: unpinned).
    pub core: Option<usize>,
    /// How to wait when starved (park by default; spin for pinned latency runs).
    pub wait: WaitKind,
    /// Stamp every frame's `publish_ns` with the sequencer's clock as it goes to the bus,
    /// instead of keeping the producer's: latency figures then measure the bus hop alone
    /// (sequencer → consumer). Off by default; the bench's hop-split row turns it on.
    pub stamp_at_merge: bool,
}

impl Config {
    /// Defaults for `mode`: batches of 256 frames, unpinned.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            batch: 256,
            core: None,
            wait: WaitKind::Park,
            stamp_at_merge: false,
        }
    }
}

/// One input of the merge.
pub struct Input {
    /// The source's name (its rank is its position among the sorted names).
    pub name: String,
    /// The topic id stamped on its frames on the bus (`None`: keep the producer's). The
    /// daemon numbers topics by sorted name, so ids never depend on connection order.
    pub topic_id: Option<u32>,
    /// Where its frames come from: a producer's ring, or a journal the daemon maps.
    pub reader: SourceReader,
}

/// Why the sequencer stopped without finishing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequencerError {
    /// Backtest: a source failed; determinism cannot hold without it.
    #[error("source {source_name} failed: {reason}")]
    SourceFailed {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// Asked to stop before the end.
    #[error("stopped before the end of the stream")]
    Stopped,
    /// Too many sources, or duplicate names.
    #[error("bad configuration: {0}")]
    Config(String),
}

/// What a finished run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events written to the bus (without END-OF-STREAM).
    pub merged: u64,
    /// Late events (live).
    pub late: u64,
    /// Refused events (ts backwards within a source).
    pub rejected: u64,
}

/// Packs the merge key into one `u128`: ts (64 bits) | priority (2) | rank (16) | seq (46).
#[inline]
pub fn merge_key(ts: u64, kind: Kind, rank: u16, seq: u64) -> u128 {
    ((ts as u128) << 64)
        | ((kind.priority() as u128 & 3) << 62)
        | ((rank as u128) << 46)
        | (seq as u128 & ((1 << 46) - 1))
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Active,
    Ended,
    Failed,
    Removed,
}

struct Source {
    name: String,
    rank: u16,
    topic_id: Option<u32>,
    reader: SourceReader,
    state: State,
    /// Merge key of the frame under the reader, if any.
    head: Option<u128>,
    last_ts: u64,
    watermark: u64,
    /// Live: when the source was first seen empty in its current dry spell.
    dry_since: Option<Instant>,
    events: u64,
    rejected: u64,
    /// Backtest: ring position up to which frames are known to be in merge-key order with
    /// their whole run of equal timestamps seen, so they can go out straight from the ring.
    sorted_until: u64,
    /// Backtest: a run of equal timestamps that arrived out of key order (say a kline, then a
    /// trade, at one ts), copied out of the ring and sorted. Served before the ring.
    staged: std::collections::VecDeque<Staged>,
    /// The ts of the run being copied into `staged`, while it may still grow.
    collecting: Option<u64>,
    /// Payload and header bytes held in `staged`. Bounded by the source ring's capacity:
    /// memory is bounded by ring sizes, never by the stream (SPEC section 9).
    staged_bytes: usize,
    /// Live: a backwards timestamp of this source has been logged (logged once per source).
    backwards_logged: bool,
    /// A pre-sequenced stream (a recording replayed, the session's only source): its frames
    /// go to the bus as they are, see [`SourceReader::presequenced`].
    presequenced: bool,
    /// Live: the last source seq accounted for, duplicates dropped, seqs skipped.
    seqs: SeqTrack,
}

/// The longest the sequencer sleeps on its sources' doorbells while bounded lateness holds a
/// head back (otherwise the strategy's own bound applies: [`Park`]'s is 100 ms, after which
/// the stop flag and removals are looked at again).
///
/// [`Park`]: aegis_shm_client::wait::Park
const IDLE_PARK: Duration = Duration::from_millis(20);

/// The sources a starved merge waits for: active, with no head.
struct Waited<'a>(&'a [Source]);

impl<'a> Waited<'a> {
    fn sources(&self) -> impl Iterator<Item = &'a Source> {
        self.0
            .iter()
            .filter(|s| s.state == State::Active && s.head.is_none())
    }

    fn rings(&self) -> impl Iterator<Item = &'a RingReader> {
        self.sources().filter_map(|s| s.reader.ring())
    }
}

impl Bell for Waited<'_> {
    fn park(&self, timeout: Duration) {
        let rings: Vec<&RingReader> = self.rings().collect();
        aegis_shm_client::spsc::park_any(&rings, timeout);
    }
}

/// While the bus is full (block policy), the sequencer waits for the slowest consumer in
/// slices this long, and between slices checks the stop flag and publishes its counters.
const CONSUMER_WAIT_SLICE: Duration = Duration::from_millis(50);

/// What a staged frame counts against the staging bound besides its payload: its header.
const STAGED_OVERHEAD: usize = aegis_shm_client::frame::FRAME_HEADER_LEN;
/// The staging bound of a source is its ring's capacity, but at least this much, so that
/// tiny rings (tests, latency runs) still reorder ordinary runs.
const MIN_STAGING_BYTES: usize = 1 << 20;

/// What the merge reads of a peeked frame's header.
#[derive(Copy, Clone)]
struct Head {
    kind: Kind,
    flags: u8,
    ts: u64,
    source_seq: u64,
}

impl Head {
    #[inline(always)]
    fn of(h: &FrameHeader) -> Head {
        Head {
            kind: h.kind().unwrap_or(Kind::Control),
            flags: h.flags,
            ts: h.ts,
            source_seq: h.source_seq,
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A frame copied out of its ring to be reordered within its run.
struct Staged {
    key: u128,
    header: FrameHeader,
    payload: Vec<u8>,
}

// `removals` below is a `u64` bitmask with one bit per source rank.
const _: () = assert!(MAX_SOURCES <= 64);

/// The merge, ready to run on its own thread.
pub struct Sequencer {
    sources: Vec<Source>,
    bus: BusWriter,
    config: Config,
    control: Option<Arc<StatsWriter>>,
    /// Highest ts emitted (live: LATE detection).
    emitted_ts: u64,
    merged: u64,
    late: u64,
    source_stalls: u64,
    source_stall_ns: u64,
    consumer_stalls: u64,
    consumer_stall_ns: u64,
    scratch: Vec<u8>,
    /// The clock read of the current pass (0: not read yet), stamped as `publish_ns` on
    /// frames that come without a stamp (journal-backed sources, unstamped producers): one
    /// clock read per pass, not per frame.
    pass_ns: u64,
    /// Bit i set: remove source i from a live merge (set from another thread).
    removals: Arc<std::sync::atomic::AtomicU64>,
    /// Live: new rings of sources that changed hands, and the seq figures (`takeover.rs`).
    takeovers: Arc<Takeovers>,
}

/// What a look at a run of equal timestamps found.
enum Run {
    /// Complete and in key order: the head may go.
    Ordered,
    /// Out of key order, or not complete yet: copy it out (sorted once complete).
    Unordered,
}

/// What one pass achieved.
enum Pass {
    /// Frames moved or state changed.
    Progress,
    /// Nothing to do: waiting on a source.
    Starved,
    /// Every source ended and the rings are drained.
    Done,
}

impl Sequencer {
    /// Builds a sequencer. Sources are ranked by name; connection order never matters.
    pub fn new(
        mut inputs: Vec<Input>,
        bus: BusWriter,
        config: Config,
        control: Option<Arc<StatsWriter>>,
    ) -> Result<Sequencer, SequencerError> {
        if inputs.len() > MAX_SOURCES {
            return Err(SequencerError::Config(format!(
                "{} sources, at most 64",
                inputs.len()
            )));
        }
        if inputs.len() > 1 && inputs.iter().any(|i| i.reader.presequenced()) {
            return Err(SequencerError::Config(
                "a pre-sequenced stream (a recording) must be the only source".into(),
            ));
        }
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = inputs.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(SequencerError::Config(format!(
                "duplicate source name {}",
                w[0].name
            )));
        }
        let sources: Vec<Source> = inputs
            .into_iter()
            .enumerate()
            .map(|(rank, input)| Source {
                presequenced: input.reader.presequenced(),
                name: input.name,
                rank: rank as u16,
                topic_id: input.topic_id,
                reader: input.reader,
                state: State::Active,
                head: None,
                last_ts: 0,
                watermark: 0,
                dry_since: None,
                events: 0,
                rejected: 0,
                sorted_until: 0,
                staged: std::collections::VecDeque::new(),
                collecting: None,
                staged_bytes: 0,
                backwards_logged: false,
                seqs: SeqTrack::default(),
            })
            .collect();
        if let Some(c) = &control {
            for s in &sources {
                c.set_source(s.rank as usize, &s.name);
            }
        }
        Ok(Sequencer {
            sources,
            bus,
            config,
            control,
            emitted_ts: 0,
            merged: 0,
            late: 0,
            source_stalls: 0,
            source_stall_ns: 0,
            consumer_stalls: 0,
            consumer_stall_ns: 0,
            scratch: Vec::new(),
            pass_ns: 0,
            removals: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            takeovers: Arc::new(Takeovers::default()),
        })
    }

    /// A handle another thread uses to remove sources from a live merge (a dead producer):
    /// set bit `rank`. The sequencer applies it at its next pass.
    pub fn removals(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.removals.clone()
    }

    /// The handle the daemon uses to give a source's merge to a new ring (a promoted group
    /// member, a restarted producer), to read the last seq merged per source, and to hold a
    /// removed source open for a restart (live).
    pub fn takeovers(&self) -> Arc<Takeovers> {
        self.takeovers.clone()
    }

    /// The rank of each source, by name.
    pub fn ranks(&self) -> Vec<(String, u16)> {
        self.sources
            .iter()
            .map(|s| (s.name.clone(), s.rank))
            .collect()
    }

    /// Runs the merge to the end: every source ended (or, live, removed) and drained, then
    /// END-OF-STREAM on the bus. Checks `stop` between passes; waits with `wait`.
    pub fn run(
        mut self,
        stop: &AtomicBool,
        wait: &mut impl WaitStrategy,
    ) -> Result<Summary, SequencerError> {
        if let Some(core) = self.config.core {
            core_affinity::set_for_current(core_affinity::CoreId { id: core });
        }
        let mut stalled_since: Option<Instant> = None;
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Err(SequencerError::Stopped);
            }
            match self.pass(stop) {
                Ok(Pass::Progress) => {
                    if let Some(t) = stalled_since.take() {
                        self.source_stall_ns += t.elapsed().as_nanos() as u64;
                    }
                    wait.reset();
                }
                Ok(Pass::Starved) => {
                    if stalled_since.is_none() {
                        stalled_since = Some(Instant::now());
                        self.source_stalls += 1;
                    }
                    self.idle(wait);
                }
                Ok(Pass::Done) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.publish_counters();
        let abort = result.is_err();
        let eof = FrameHeader {
            kind: Kind::Control as u8,
            flags: flags::EOF | if abort { flags::ABORT } else { 0 },
            ts: self.emitted_ts,
            ..FrameHeader::default()
        };
        // The END-OF-STREAM frame is written even after a failure (flagged ABORT) so that
        // consumers stop; under the block policy it waits for room, bounded by `stop`.
        self.write_frame(&eof, &[], stop).ok();
        self.bus.publish();
        result.map(|()| Summary {
            merged: self.merged,
            late: self.late,
            rejected: self.sources.iter().map(|s| s.rejected).sum(),
        })
    }

    /// One wait after a pass that moved nothing. The merge waits for the active sources that
    /// have no head: a parking strategy sleeps on their rings' doorbells until one of their
    /// producers publishes, for at most its own bound (the stop flag and removals are looked
    /// at between parks), and in live mode no later than the moment bounded lateness lets a
    /// held head go (and at most [`IDLE_PARK`] then).
    fn idle(&self, wait: &mut impl WaitStrategy) {
        let waited = Waited(&self.sources);
        if waited.rings().next().is_none() {
            // Nothing to sleep on (journal-backed sources never starve the merge).
            wait.wait();
            return;
        }
        // The clock is read only when bounded lateness holds a head back: a spinning
        // sequencer calls this between every two polls.
        let mut deadline = Deadline::never();
        if let Mode::Live { max_lateness } = self.config.mode {
            if self.sources.iter().any(|s| s.head.is_some()) {
                let now = Instant::now();
                let mut until = now + IDLE_PARK;
                for s in waited.sources() {
                    until = until.min(s.dry_since.unwrap_or(now) + max_lateness);
                }
                deadline = Deadline::at(until);
            }
        }
        wait.wait_on(&waited, deadline);
    }

    /// Writes one frame to the bus, waiting on consumers under the block policy.
    fn write_frame(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        stop: &AtomicBool,
    ) -> Result<(), SequencerError> {
        match self.bus.try_write(h, payload) {
            Ok(_) => return Ok(()),
            Err(WriteError::TooLarge { stride, capacity }) => {
                unreachable!("frames ({stride} bytes) are checked against the bus ({capacity} bytes) in emit")
            }
            Err(_) => {}
        }
        let start = Instant::now();
        self.consumer_stalls += 1;
        let mut wait = aegis_shm_client::wait::Backoff::default();
        let r = loop {
            if stop.load(Ordering::Relaxed) {
                break Err(SequencerError::Stopped);
            }
            match self
                .bus
                .write(h, payload, &mut wait, Deadline::after(CONSUMER_WAIT_SLICE))
            {
                Ok(_) => break Ok(()),
                Err(WriteError::Timeout | WriteError::Full) => {
                    self.publish_counters();
                }
                Err(WriteError::TooLarge { .. }) => unreachable!("checked above"),
            }
        };
        self.consumer_stall_ns += start.elapsed().as_nanos() as u64;
        // The pass's clock read is stale after a wait: the next unstamped frame reads anew.
        self.pass_ns = 0;
        r
    }

    /// Gives source `i` a head if it has a frame waiting. Handles control frames, backwards
    /// timestamps and corrupt frames. Returns whether its state changed.
    fn refill(&mut self, i: usize) -> Result<bool, SequencerError> {
        let live = matches!(self.config.mode, Mode::Live { .. });
        let mut changed = false;
        loop {
            let s = &mut self.sources[i];
            if s.head.is_some() {
                return Ok(changed);
            }
            if s.collecting.is_none() {
                if let Some(f) = s.staged.front() {
                    s.head = Some(f.key);
                    return Ok(changed);
                }
            }
            if s.state != State::Active {
                return Ok(changed);
            }
            // The four fields the merge needs, not the whole header: the header is copied
            // once per event, into the bus (`emit`).
            let h = match s.reader.peek_header_ref() {
                Ok(Some(p)) => Head::of(p),
                Ok(None) => {
                    if live && s.dry_since.is_none() {
                        s.dry_since = Some(Instant::now());
                    }
                    return Ok(changed);
                }
                Err(e) => return self.fail(i, e.to_string()).map(|()| true),
            };
            changed = true;
            let kind = h.kind;
            if live && kind != Kind::Control && s.seqs.duplicate(h.source_seq) {
                // Resent after a failover or a restart (SPEC section 12): merged once
                // already. Checked before the time order: a resend is older by nature.
                s.reader.consume();
                continue;
            }
            if let Some(run_ts) = s.collecting {
                // Copying a run of equal timestamps out of key order: it ends at the first
                // frame with another ts, or at end-of-stream.
                if kind != Kind::Control && h.ts == run_ts {
                    if let Err(reason) = self.stage(i) {
                        return self.fail(i, reason).map(|()| true);
                    }
                    continue;
                }
                if !(kind == Kind::Control && h.has(flags::HEARTBEAT)) {
                    s.collecting = None;
                    s.staged.make_contiguous().sort_by_key(|f| f.key);
                    continue;
                }
            }
            if kind == Kind::Control {
                // A heartbeat advances the watermark but is not an event: it does not end a
                // dry spell, so stale heartbeats sent more often than `max_lateness` cannot
                // hold a live merge back for ever.
                s.reader.consume();
                if h.has(flags::EOF) {
                    s.state = State::Ended;
                    s.collecting = None;
                    s.staged.make_contiguous().sort_by_key(|f| f.key);
                    if let Some(c) = &self.control {
                        // The final count first: the Release store of the state publishes it
                        // to whoever sees `Ended` (a replay following its journal).
                        c.update_source(i, s.events, s.rejected, s.watermark);
                        c.set_state(i, SourceState::Ended, None);
                    }
                } else if h.has(flags::HEARTBEAT) && h.ts >= s.watermark {
                    s.watermark = h.ts;
                }
                continue;
            }
            s.dry_since = None;
            if h.ts < s.last_ts && !s.presequenced {
                // A producer bug. Backtest: exactness cannot hold, the session fails. Live: the
                // event is refused, counted and logged once per source; the stream stays in
                // order.
                s.rejected += 1;
                let what = format!(
                    "event time went backwards: seq {} has ts {} after ts {}",
                    h.source_seq, h.ts, s.last_ts
                );
                if !live {
                    let reason =
                        format!("{what} (sort the input first, e.g. `aegis-replay --sort`)");
                    return self.fail(i, reason).map(|()| true);
                }
                if !s.backwards_logged {
                    s.backwards_logged = true;
                    let thread = std::thread::current();
                    eprintln!(
                        "{}: source {}: {what}: refused and counted (logged once per source)",
                        thread.name().unwrap_or("aegis-seq"),
                        s.name
                    );
                }
                s.seqs.accept(h.source_seq);
                s.reader.consume();
                continue;
            }
            s.last_ts = h.ts;
            s.watermark = s.watermark.max(h.ts);
            if !live && !s.presequenced {
                match self.check_run(i, kind, h.ts) {
                    Ok(Run::Ordered) => {}
                    Ok(Run::Unordered) => {
                        self.sources[i].collecting = Some(h.ts);
                        continue;
                    }
                    Err(e) => return self.fail(i, e.to_string()).map(|()| true),
                }
            }
            let s = &mut self.sources[i];
            s.head = Some(merge_key(h.ts, kind, s.rank, h.source_seq));
            return Ok(changed);
        }
    }

    /// Copies the frame under source `i`'s reader into its staging queue and
    /// consumes it. Staging holds at most the source ring's capacity (and at least
    /// [`MIN_STAGING_BYTES`]): a longer run of equal timestamps out of kind order is refused
    /// with the reason, so memory stays bounded by the ring sizes, never by the stream.
    fn stage(&mut self, i: usize) -> Result<(), String> {
        let s = &mut self.sources[i];
        let cap = s.reader.capacity().max(MIN_STAGING_BYTES);
        let f = s.reader.peek().ok().flatten().expect("peeked");
        let h = f.header;
        let need = STAGED_OVERHEAD + h.len as usize;
        if s.staged_bytes + need > cap {
            return Err(format!(
                "a run of events at one timestamp ({}) out of kind order (trade, book, kline, custom) \
                 is longer than the staging bound ({cap} bytes, the source ring's size): it cannot be ordered in bounded \
                 memory; give its kinds separate sources, or a larger --source-bytes",
                h.ts
            ));
        }
        let kind = h.kind().unwrap_or(Kind::Control);
        let staged = Staged {
            key: merge_key(h.ts, kind, s.rank, h.source_seq),
            header: h,
            payload: f.payload.to_vec(),
        };
        s.reader.consume();
        s.staged.push_back(staged);
        s.staged_bytes += need;
        Ok(())
    }

    /// Backtest: whether the run of frames with the head's ts is complete and in key order.
    /// Looks ahead in the ring without consuming; a run already checked is not rescanned.
    fn check_run(&mut self, i: usize, kind: Kind, ts: u64) -> Result<Run, SourceError> {
        let mut prio = kind.priority();
        if prio == Kind::Trade.priority() || self.sources[i].reader.single_kind() {
            // Nothing later in the source can sort before a trade at this ts (later frames
            // have a ts at least as large, and a trade has the lowest priority), nor before
            // any frame of a single-kind source (same priority, larger seq): it may go
            // without looking ahead, however long its run is.
            return Ok(Run::Ordered);
        }
        let s = &mut self.sources[i];
        let end = s.reader.peeked_end().expect("peeked");
        if end <= s.sorted_until {
            return Ok(Run::Ordered);
        }
        let mut pos = end;
        loop {
            match s.reader.header_at(pos)? {
                None => {
                    // The run may still grow, and its end may never fit in the ring beside it:
                    // the producer can be blocked by the very frames we hold (a frame needs
                    // contiguous room, so one pending frame can be enough). Copy the run out
                    // instead of waiting for it in the ring. This happens when the sequencer
                    // has caught up with the producer, so the copy costs no throughput.
                    // Regression test: `tiny_rings_with_runs_out_of_order`.
                    return Ok(Run::Unordered);
                }
                Some((g, next)) => {
                    let kind = g.kind().unwrap_or(Kind::Control);
                    if kind == Kind::Control {
                        if g.has(flags::EOF) {
                            break;
                        }
                        pos = next;
                        continue;
                    }
                    if g.ts != ts {
                        break;
                    }
                    if kind.priority() < prio {
                        return Ok(Run::Unordered);
                    }
                    prio = kind.priority();
                    pos = next;
                }
            }
        }
        s.sorted_until = pos;
        Ok(Run::Ordered)
    }

    /// Marks source `i` failed. Backtest: the whole merge fails. Live: the others go on.
    fn fail(&mut self, i: usize, reason: String) -> Result<(), SequencerError> {
        let s = &mut self.sources[i];
        s.state = State::Failed;
        s.head = None;
        s.collecting = None;
        s.staged.clear();
        s.staged_bytes = 0;
        if let Some(c) = &self.control {
            c.set_state(i, SourceState::Failed, Some(&reason));
        }
        match self.config.mode {
            Mode::Live { .. } => Ok(()),
            Mode::Backtest => Err(SequencerError::SourceFailed {
                source_name: s.name.clone(),
                reason,
            }),
        }
    }

    /// Moves up to `batch` frames. Publishes the bus and releases the rings once.
    fn pass(&mut self, stop: &AtomicBool) -> Result<Pass, SequencerError> {
        let live = matches!(self.config.mode, Mode::Live { .. });
        let mut progress = false;
        self.pass_ns = 0;
        // A load first: the swap (a locked instruction) only when there is something to take.
        let removals = match self.removals.load(Ordering::Relaxed) {
            0 => 0,
            // Acquire: pairs with the daemon's `Takeovers::hold` before it set the bit (a
            // Release RMW on `removals`): a removal that may be undone is seen held.
            _ => self.removals.swap(0, Ordering::Acquire),
        };
        if removals != 0 {
            for rank in (0..self.sources.len()).filter(|r| removals & (1 << r) != 0) {
                self.remove_source(rank);
                progress = true;
            }
        }
        for (rank, reader) in self.takeovers.take() {
            self.take_over(rank, reader);
            progress = true;
        }
        for i in 0..self.sources.len() {
            if self.sources[i].head.is_none() {
                progress |= self.refill(i)?;
            }
        }
        let mut moved = 0;
        while moved < self.config.batch {
            let Some(i) = self.pick() else { break };
            self.emit(i, stop)?;
            moved += 1;
            if live && self.sources[i].reader.drained() {
                // The refill below finds this source empty and hands its bytes back to the
                // producer: a store to a line of the producer's core. Stores become visible in
                // program order, so the bus tail published after it would wait for that line
                // too, a round trip to the producer's core. Publish first. The bench's bus
                // hop went from ~380 to ~260 ns, end to end from ~640 to ~535 ns (4
                // alternating runs each). A source with frames already seen stays batched.
                self.bus.publish();
            }
            progress |= self.refill(i)?;
        }
        if moved > 0 {
            self.bus.publish();
            self.publish_counters();
        } else if progress {
            // Duplicates dropped, a hand-over: the daemon's figures follow.
            self.publish_seqs();
        }
        // Hand every consumed byte back, even when nothing moved to the bus: frames copied
        // into a staging queue, heartbeats and refused events are consumed too, and a producer
        // blocked on a full ring would otherwise wait for a release that never comes while we
        // wait for the rest of its run. Regression test: `tiny_rings_with_runs_out_of_order`.
        for s in &mut self.sources {
            s.reader.release();
        }
        if self.ended() {
            return Ok(Pass::Done);
        }
        Ok(if progress || moved > 0 {
            Pass::Progress
        } else {
            Pass::Starved
        })
    }

    /// The source whose head goes next, if the rules allow emitting now.
    fn pick(&mut self) -> Option<usize> {
        let mut best: Option<(u128, usize)> = None;
        let mut missing = false;
        for (i, s) in self.sources.iter().enumerate() {
            match s.head {
                Some(k) => {
                    if best.is_none_or(|(b, _)| k < b) {
                        best = Some((k, i));
                    }
                }
                None => missing |= s.state == State::Active,
            }
        }
        let (key, i) = best?;
        if !missing {
            return Some(i);
        }
        match self.config.mode {
            Mode::Backtest => None,
            Mode::Live { max_lateness } => {
                let ts = (key >> 64) as u64;
                let now = Instant::now();
                let held = self.sources.iter().any(|s| {
                    s.state == State::Active
                        && s.head.is_none()
                        && s.watermark < ts
                        && s.dry_since
                            .is_none_or(|t| now.duration_since(t) < max_lateness)
                });
                (!held).then_some(i)
            }
        }
    }

    /// Copies the head of source `i` to the bus.
    fn emit(&mut self, i: usize, stop: &AtomicBool) -> Result<(), SequencerError> {
        let bus_cap = self.bus.capacity();
        let s = &mut self.sources[i];
        s.head = None;
        let staged = s.staged.pop_front();
        if let Some(f) = &staged {
            s.staged_bytes -= STAGED_OVERHEAD + f.payload.len();
        }
        let mut h = match &staged {
            Some(f) => f.header,
            None => s
                .reader
                .peeked_header()
                .expect("a head was peeked")
                .copy_by_fields(),
        };
        if aegis_shm_client::frame::stride(h.len as usize) > bus_cap / 2 {
            let reason = format!(
                "frame of {} bytes is larger than half the bus ({bus_cap} bytes)",
                h.len
            );
            return self.fail(i, reason);
        }
        s.events += 1;
        if matches!(self.config.mode, Mode::Live { .. }) {
            s.seqs.accept(h.source_seq);
        }
        let recorded_late = if s.presequenced {
            // A recorded bus frame: source id, topic id, source seq and LATE stay as the
            // recorded bus had them (the recording's own ranks and topic table are the
            // session's); any other flag is dropped as below.
            h.flags & flags::LATE != 0
        } else {
            h.source_id = s.rank;
            if let Some(t) = s.topic_id {
                h.topic_id = t;
            }
            false
        };
        // Flags on the bus are the sequencer's: whatever a producer set on an event frame
        // (EOF, HEARTBEAT, ABORT, PADDING, LATE) never reaches a consumer.
        h.flags = 0;
        if self.config.stamp_at_merge {
            h.publish_ns = aegis_shm_client::frame::monotonic_ns();
        } else if h.publish_ns == 0 {
            if self.pass_ns == 0 {
                self.pass_ns = aegis_shm_client::frame::monotonic_ns();
            }
            h.publish_ns = self.pass_ns;
        }
        if recorded_late || (h.ts < self.emitted_ts && !self.sources[i].presequenced) {
            h.flags |= flags::LATE;
            self.late += 1;
        }
        self.emitted_ts = self.emitted_ts.max(h.ts);
        if let Some(f) = staged {
            self.write_frame(&h, &f.payload, stop)?;
            self.merged += 1;
            return Ok(());
        }
        // Fast path: one copy, ring to bus. The ring and the bus are distinct fields, so
        // both can be borrowed at once.
        let Sequencer {
            sources,
            bus,
            scratch,
            ..
        } = self;
        let reader = &mut sources[i].reader;
        let payload = reader
            .peeked_payload()
            .ok()
            .flatten()
            .expect("a head was peeked");
        match bus.try_write(&h, payload) {
            Ok(_) => {
                reader.consume();
                self.merged += 1;
                Ok(())
            }
            Err(_) => {
                // The bus is full (block policy): copy the frame out, hand the ring its bytes
                // back, and wait for the slowest consumer.
                scratch.clear();
                scratch.extend_from_slice(payload);
                reader.consume();
                let payload = std::mem::take(scratch);
                let r = self.write_frame(&h, &payload, stop);
                self.scratch = payload;
                r?;
                self.merged += 1;
                Ok(())
            }
        }
    }

    fn publish_counters(&self) {
        self.publish_seqs();
        let Some(c) = &self.control else { return };
        let k = c.counters();
        k.merged.store(self.merged, Ordering::Relaxed);
        k.late.store(self.late, Ordering::Relaxed);
        k.rejected.store(
            self.sources.iter().map(|s| s.rejected).sum(),
            Ordering::Relaxed,
        );
        k.source_stalls.store(self.source_stalls, Ordering::Relaxed);
        k.source_stall_ns
            .store(self.source_stall_ns, Ordering::Relaxed);
        k.consumer_stalls
            .store(self.consumer_stalls, Ordering::Relaxed);
        k.consumer_stall_ns
            .store(self.consumer_stall_ns, Ordering::Relaxed);
        k.bus_fill.store(self.bus.fill(), Ordering::Relaxed);
        for s in &self.sources {
            c.update_source(s.rank as usize, s.events, s.rejected, s.watermark);
        }
    }

    /// The seq figures of every source, for the daemon (`resume_after`) and `inspect`.
    fn publish_seqs(&self) {
        for s in &self.sources {
            let t = &s.seqs;
            self.takeovers
                .publish(s.rank as usize, t.last, t.duplicates, t.gaps);
        }
    }

    /// Whether the merge is over: no source is active or has a head left, and none of the
    /// removed ones is held open for a restart.
    fn ended(&self) -> bool {
        let held = self.takeovers.held_mask();
        self.sources.iter().all(|s| {
            s.state != State::Active
                && s.head.is_none()
                && !(s.state == State::Removed && held & (1 << s.rank) != 0)
        }) && !self.takeovers.pending()
    }

    /// Source `rank` is read from `reader` from now on (a promoted group member's ring, or a
    /// restarted producer's). The old ring is never read again: a fenced member that writes
    /// to it after a pause is never merged. An ended source stays ended.
    fn take_over(&mut self, rank: usize, reader: RingReader) {
        let Some(s) = self.sources.get_mut(rank) else {
            return;
        };
        if s.state == State::Ended {
            return;
        }
        s.reader = reader.into();
        s.state = State::Active;
        s.head = None;
        s.dry_since = None;
        s.collecting = None;
        s.staged.clear();
        s.staged_bytes = 0;
        s.sorted_until = 0;
        if let Some(c) = &self.control {
            c.set_state(rank, SourceState::Active, Some(""));
        }
    }

    /// Removes a source from the merge (its producer died): whatever it had not yet
    /// delivered is dropped.
    fn remove_source(&mut self, rank: usize) {
        let s = &mut self.sources[rank];
        if s.state == State::Active {
            s.state = State::Removed;
            s.head = None;
            if let Some(c) = &self.control {
                c.set_state(rank, SourceState::Removed, Some("producer is gone"));
            }
        }
    }
}

/// Runs a sequencer on a new thread named `aegis-seq-<session>`.
pub fn spawn(
    session: &str,
    seq: Sequencer,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<Result<Summary, SequencerError>>> {
    std::thread::Builder::new()
        .name(format!("aegis-seq-{session}"))
        .spawn(move || {
            let mut wait = aegis_shm_client::wait::strategy(seq.config.wait);
            seq.run(&stop, &mut wait)
        })
}
