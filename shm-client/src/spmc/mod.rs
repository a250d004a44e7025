//! The broadcast bus: one writer (the sequencer), up to [`MAX_CONSUMERS`] readers, each with
//! its own cursor on its own cache line.
//!
//! Positions are monotonic byte counts as in the source rings. Two policies:
//!
//! - **`Block`** (backtest): the writer never overwrites bytes an attached consumer has not
//!   released. Before reusing bytes it loads every attached slot's `cursor` with Acquire
//!   (pairs with the consumer's Release store in `BusReader::publish_cursor`). Consumers read
//!   frames in place, zero-copy.
//! - **`Overwrite`** (live): the writer never waits. Before it overwrites bytes it announces how
//!   far it will write in `claim` (a seqlock: store `claim`, Release fence, write bytes, publish
//!   `tail`). A consumer copies the frame out, then (Acquire fence) reloads `claim`: if the
//!   writer may have overwritten the frame, the copy is discarded and the consumer is lapped.
//!   It resumes at the head and reports `Overrun { missed }`, where `missed` is the exact
//!   number of bus frames it skipped (computed from the bus sequence of the frame it resumes
//!   at).

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::event::{self, DecodeError, EventRef};
use crate::frame::{self, flags, FrameError, FrameHeader, Kind, Seq, FRAME_HEADER_LEN};
use crate::segment::{self, Geometry, OpenError, Region, SegmentKind};
use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};
use crate::wait::{Deadline, WaitStrategy};

/// Consumer slots per bus.
#[cfg(not(loom))]
pub const MAX_CONSUMERS: usize = 64;
/// Consumer slots per bus (kept small under loom).
#[cfg(loom)]
pub const MAX_CONSUMERS: usize = 3;

const SLOT_FREE: u32 = 0;
const SLOT_ATTACHED: u32 = 1;

/// What the writer does when the slowest consumer is a whole ring behind.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Wait for it (backtest: nothing is ever lost).
    Block = 0,
    /// Overwrite; the consumer detects it (live: the bus never waits).
    Overwrite = 1,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "block" => Ok(Policy::Block),
            "overwrite" => Ok(Policy::Overwrite),
            _ => Err(format!("unknown bus policy {s:?} (block, overwrite)")),
        }
    }
}

/// One consumer's slot. Written by the consumer (cursor, counters) and by the daemon (state,
/// when it releases a dead consumer's slot).
#[repr(C)]
pub struct Slot {
    /// [`SLOT_FREE`] or [`SLOT_ATTACHED`].
    state: AtomicU32,
    /// Pid of the attached consumer.
    pid: AtomicU32,
    /// Bytes the consumer is done with. Invariant while attached: `cursor <= tail`.
    cursor: AtomicU64,
    /// Frames delivered to the consumer.
    read: AtomicU64,
    /// Times the consumer was lapped (overwrite policy).
    overruns: AtomicU64,
    /// Frames the consumer missed in all.
    missed: AtomicU64,
    /// Bumped on every attach, so that a consumer whose slot was released and handed to
    /// someone else can no longer store its cursor there, nor free it.
    generation: AtomicU64,
}

/// A snapshot of one slot, for `inspect`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Slot index.
    pub slot: usize,
    /// Pid of the consumer.
    pub pid: u32,
    /// Its cursor (bytes).
    pub cursor: u64,
    /// Bytes between its cursor and the bus tail.
    pub lag_bytes: u64,
    /// Frames delivered.
    pub read: u64,
    /// Times lapped.
    pub overruns: u64,
    /// Frames missed.
    pub missed: u64,
}

/// The control block of the bus, after the segment header.
#[repr(C)]
pub struct BusControl {
    /// Bytes published by the writer (Release), read by consumers (Acquire). Always a frame
    /// boundary.
    tail: CachePadded<AtomicU64>,
    /// Overwrite policy: how far the writer may be writing (`>= tail`). Seqlock end.
    claim: CachePadded<AtomicU64>,
    /// The [`Policy`], fixed at creation.
    policy: CachePadded<AtomicU32>,
    slots: [CachePadded<Slot>; MAX_CONSUMERS],
}

impl BusControl {
    fn new(policy: Policy) -> BusControl {
        BusControl {
            tail: CachePadded::new(AtomicU64::new(0)),
            claim: CachePadded::new(AtomicU64::new(0)),
            policy: CachePadded::new(AtomicU32::new(policy as u32)),
            slots: std::array::from_fn(|_| {
                CachePadded::new(Slot {
                    state: AtomicU32::new(SLOT_FREE),
                    pid: AtomicU32::new(0),
                    cursor: AtomicU64::new(0),
                    read: AtomicU64::new(0),
                    overruns: AtomicU64::new(0),
                    missed: AtomicU64::new(0),
                    generation: AtomicU64::new(0),
                })
            }),
        }
    }
}

/// The segment geometry of a bus with `capacity` data bytes.
pub fn geometry(capacity: usize) -> Geometry {
    Geometry::new(std::mem::size_of::<BusControl>(), capacity)
}

/// Total bytes of a bus segment with `capacity` data bytes.
pub fn region_len(capacity: usize) -> usize {
    geometry(capacity).total_len()
}

/// Initialises a fresh, zeroed region as a bus and marks it initialised.
pub fn init_region(
    region: &dyn Region,
    capacity: usize,
    epoch: u64,
    policy: Policy,
) -> Result<(), segment::CreateError> {
    crate::spsc::check_capacity(capacity)?;
    let geo = geometry(capacity);
    assert!(
        region.len() >= geo.total_len(),
        "region too small for the bus"
    );
    // SAFETY: the region is large enough (asserted) and fresh.
    unsafe { segment::write_header(region, SegmentKind::Bus, epoch, geo) };
    // SAFETY: the control block sits at HEADER_LEN (128-aligned) inside the region; fresh.
    unsafe {
        (region.as_ptr().add(segment::HEADER_LEN) as *mut BusControl).write(BusControl::new(policy))
    };
    segment::mark_initialized(region);
    Ok(())
}

/// Creates a bus segment in `/dev/shm` at `path`.
pub fn create_shm(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
    policy: Policy,
) -> Result<segment::ShmRegion, segment::CreateError> {
    crate::spsc::check_capacity(capacity)?;
    let region = segment::ShmRegion::create(path, region_len(capacity))?;
    init_region(&region, capacity, epoch, policy)?;
    Ok(region)
}

struct Mapped {
    _region: Arc<dyn Region>,
    ctrl: *const BusControl,
    data: *mut u8,
    cap: u64,
    mask: u64,
    policy: Policy,
}

impl Mapped {
    fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<Mapped, OpenError> {
        let geo = segment::validate_header(
            &*region,
            SegmentKind::Bus,
            epoch,
            std::mem::size_of::<BusControl>(),
        )?;
        if !geo.capacity.is_power_of_two() || geo.capacity < crate::spsc::MIN_CAPACITY {
            return Err(OpenError::Corrupt("bus capacity is not a power of two"));
        }
        let base = region.as_ptr();
        // SAFETY: validate_header checked the region holds header, control block and data.
        let ctrl = unsafe { base.add(segment::HEADER_LEN) } as *const BusControl;
        // SAFETY: initialised before the segment was marked ready.
        let policy = match unsafe { &*ctrl }.policy.load(Ordering::Relaxed) {
            0 => Policy::Block,
            1 => Policy::Overwrite,
            _ => return Err(OpenError::Corrupt("unknown bus policy")),
        };
        Ok(Mapped {
            ctrl,
            // SAFETY: as above.
            data: unsafe { base.add(geo.data_offset) },
            cap: geo.capacity as u64,
            mask: geo.capacity as u64 - 1,
            policy,
            _region: region,
        })
    }

    #[inline]
    fn ctrl(&self) -> &BusControl {
        // SAFETY: points into the region we keep alive; initialised before marked ready.
        unsafe { &*self.ctrl }
    }
}

/// Why a bus write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Block policy: the slowest consumer has not released enough room.
    #[error("bus full: waiting on the slowest consumer")]
    Full,
    /// The deadline passed while the bus stayed full.
    #[error("timed out waiting on the slowest consumer")]
    Timeout,
    /// The frame is larger than the bus.
    #[error("frame of {stride} bytes cannot fit a bus of {capacity} bytes")]
    TooLarge {
        /// Bytes needed.
        stride: usize,
        /// Bus capacity.
        capacity: usize,
    },
}

/// The writing end of the bus (the sequencer). One per bus.
pub struct BusWriter {
    m: Mapped,
    /// Local write position; `published <= tail`.
    tail: u64,
    /// Last value stored to `ctrl.tail`.
    published: u64,
    /// Block policy: the slowest attached consumer's cursor as last computed. May be stale
    /// (smaller than the truth), which only makes the bus look fuller.
    gate: u64,
    next_seq: Seq,
}

// SAFETY: the writer is the only writer of the bus data and tail; moving it moves the role.
unsafe impl Send for BusWriter {}

impl BusWriter {
    /// Opens the writing end of an initialised bus.
    pub fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<BusWriter, OpenError> {
        let m = Mapped::open(region, epoch)?;
        let tail = m.ctrl().tail.load(Ordering::Acquire);
        Ok(BusWriter {
            m,
            tail,
            published: tail,
            gate: tail,
            next_seq: 0,
        })
    }

    /// Initialises `region` as a bus and opens its writer (tests, in-process use).
    pub fn create(
        region: Arc<dyn Region>,
        capacity: usize,
        epoch: u64,
        policy: Policy,
    ) -> Result<BusWriter, segment::CreateError> {
        init_region(&*region, capacity, epoch, policy)?;
        Ok(BusWriter::open(region, Some(epoch)).expect("just initialised"))
    }

    /// The bus policy.
    pub fn policy(&self) -> Policy {
        self.m.policy
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.m.cap as usize
    }

    /// The bus sequence the next frame will get (= frames written so far).
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Bytes written and not yet released by the slowest consumer (as last computed).
    pub fn fill(&self) -> u64 {
        self.tail - self.gate.min(self.tail)
    }

    /// The slowest attached consumer's cursor, or `None` if no consumer is attached.
    pub fn min_cursor(&self) -> Option<u64> {
        // SeqCst fence: pairs with the SeqCst fence in `BusReader::attach` (a Dekker pair):
        // either we see the new slot as attached, or the consumer sees a tail at least as new
        // as every tail we published before this scan, and starts there.
        fence(Ordering::SeqCst);
        let mut min = None::<u64>;
        for slot in self.m.ctrl().slots.iter() {
            if slot.state.load(Ordering::Acquire) == SLOT_ATTACHED {
                // Acquire: pairs with the Release store of `cursor` by the consumer; its reads
                // of the bytes below the cursor are done before we overwrite them.
                let c = slot.cursor.load(Ordering::Acquire);
                min = Some(min.map_or(c, |m| m.min(c)));
            }
        }
        min
    }

    /// Number of attached consumers.
    pub fn consumers(&self) -> usize {
        self.m
            .ctrl()
            .slots
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) == SLOT_ATTACHED)
            .count()
    }

    /// Copies a frame into the bus and assigns it the next bus sequence. The frame becomes
    /// visible on [`BusWriter::publish`]. `Err(Full)` only under the block policy.
    pub fn try_write(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Seq, WriteError> {
        let stride = frame::stride(payload.len()) as u64;
        // At most half the bus, so that it fits after padding at any offset (see
        // `Producer::try_claim`).
        if stride > self.m.cap / 2 {
            return Err(WriteError::TooLarge {
                stride: stride as usize,
                capacity: self.m.cap as usize,
            });
        }
        let off = self.tail & self.m.mask;
        let contiguous = self.m.cap - off;
        let need = if stride <= contiguous {
            stride
        } else {
            contiguous + stride
        };
        match self.m.policy {
            Policy::Block => {
                if self.tail + need - self.gate > self.m.cap {
                    self.gate = self.min_cursor().unwrap_or(self.tail);
                    if self.tail + need - self.gate > self.m.cap {
                        self.publish();
                        return Err(WriteError::Full);
                    }
                }
            }
            Policy::Overwrite => {
                // Seqlock: announce the bytes we are about to overwrite before touching them.
                // The Release fence orders this store before the data writes below; pairs with
                // the Acquire fence in `BusReader::poll_overwrite`.
                self.m
                    .ctrl()
                    .claim
                    .store(self.tail + need, Ordering::Relaxed);
                fence(Ordering::Release);
            }
        }
        if stride > contiguous {
            if !frame::skip_to_wrap(contiguous as usize) {
                // SAFETY: `off` is inside the data area and 16-aligned; the bytes to the end are
                // free (block) or announced in `claim` (overwrite).
                unsafe {
                    frame::write_header(
                        self.m.data.add(off as usize),
                        &FrameHeader::padding(contiguous as usize),
                    )
                };
            }
            self.tail += contiguous;
        }
        let off = (self.tail & self.m.mask) as usize;
        let mut h = *header;
        h.len = payload.len() as u32;
        h.bus_seq = self.next_seq;
        // SAFETY: `off + stride <= cap`; the bytes are free or announced, and unpublished.
        unsafe {
            let p = self.m.data.add(off);
            frame::write_header(p, &h);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(FRAME_HEADER_LEN), payload.len());
            // Zero the alignment padding, as the frame format promises (it holds an earlier
            // lap's bytes). Regression test: `regression_alignment_padding_is_zeroed`.
            p.add(FRAME_HEADER_LEN + payload.len())
                .write_bytes(0, stride as usize - FRAME_HEADER_LEN - payload.len());
        }
        self.tail += stride;
        self.next_seq += 1;
        Ok(h.bus_seq)
    }

    /// Like [`BusWriter::try_write`], waiting with `wait` until room appears or `deadline`.
    pub fn write(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, WriteError> {
        loop {
            match self.try_write(header, payload) {
                Err(WriteError::Full) => {
                    if deadline.expired() {
                        return Err(WriteError::Timeout);
                    }
                    wait.wait();
                }
                other => {
                    wait.reset();
                    return other;
                }
            }
        }
    }

    /// Publishes every written frame with one Release store.
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.tail {
            // Release: pairs with the Acquire load of `tail` in `BusReader`; the frames are
            // written before they are visible.
            self.m.ctrl().tail.store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// Writes the END-OF-STREAM frame and publishes.
    pub fn write_eof(
        &mut self,
        ts: u64,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, WriteError> {
        let h = FrameHeader {
            kind: Kind::Control as u8,
            flags: flags::EOF,
            ts,
            ..FrameHeader::default()
        };
        let seq = self.write(&h, &[], wait, deadline)?;
        self.publish();
        Ok(seq)
    }

    /// Statistics of every attached slot.
    pub fn slot_stats(&self) -> Vec<SlotStats> {
        slot_stats(self.m.ctrl(), self.published)
    }

    /// Frees slot `i` (the daemon, for a dead consumer). Its cursor no longer holds the writer.
    pub fn release_slot(&self, i: usize) {
        release_slot(self.m.ctrl(), i)
    }
}

fn slot_stats(ctrl: &BusControl, tail: u64) -> Vec<SlotStats> {
    ctrl.slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state.load(Ordering::Acquire) == SLOT_ATTACHED)
        .map(|(i, s)| {
            let cursor = s.cursor.load(Ordering::Acquire);
            SlotStats {
                slot: i,
                pid: s.pid.load(Ordering::Relaxed),
                cursor,
                lag_bytes: tail.saturating_sub(cursor),
                read: s.read.load(Ordering::Relaxed),
                overruns: s.overruns.load(Ordering::Relaxed),
                missed: s.missed.load(Ordering::Relaxed),
            }
        })
        .collect()
}

fn release_slot(ctrl: &BusControl, i: usize) {
    if let Some(s) = ctrl.slots.get(i) {
        // Release: a writer that sees the slot free no longer waits for its cursor.
        s.state.store(SLOT_FREE, Ordering::Release);
    }
}

/// An observer of a bus that is neither its writer nor a consumer (the daemon's `inspect`).
pub struct BusMonitor {
    m: Mapped,
}

// SAFETY: a monitor only reads atomics of the control block (and stores a slot's state
// atomically); it never touches ring data.
unsafe impl Send for BusMonitor {}
// SAFETY: as above.
unsafe impl Sync for BusMonitor {}

impl BusMonitor {
    /// Maps the bus for monitoring.
    pub fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<BusMonitor, OpenError> {
        Ok(BusMonitor {
            m: Mapped::open(region, epoch)?,
        })
    }
    /// Statistics of every attached slot.
    pub fn slot_stats(&self) -> Vec<SlotStats> {
        slot_stats(self.m.ctrl(), self.m.ctrl().tail.load(Ordering::Acquire))
    }
    /// Frees slot `i` (a dead consumer).
    pub fn release_slot(&self, i: usize) {
        release_slot(self.m.ctrl(), i)
    }
    /// The published tail.
    pub fn tail(&self) -> u64 {
        self.m.ctrl().tail.load(Ordering::Acquire)
    }
}

/// Why a consumer could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Overwrite policy: the writer lapped this consumer. It has resumed at the head and
    /// skipped exactly `missed` frames. The next call returns the frame it resumed at.
    #[error("consumer overrun: {missed} frames missed")]
    Overrun {
        /// Frames skipped.
        missed: u64,
    },
    /// A bus frame failed validation (a bug or memory corruption: the writer validates).
    #[error("corrupt bus frame: {0}")]
    Corrupt(FrameError),
    /// The deadline passed with nothing to read.
    #[error("timed out waiting for the bus")]
    Timeout,
    /// The slot was released under us (the daemon declared this consumer dead).
    #[error("consumer slot {0} was released by the daemon")]
    Detached(usize),
}

/// Why attaching to the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The segment could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Every slot is taken, or the requested one is.
    #[error("no free consumer slot ({0})")]
    NoSlot(String),
}

/// A frame handed to a consumer.
#[derive(Clone, Copy, Debug)]
pub struct BusFrame<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The payload: in bus memory (block policy) or in the consumer's scratch copy (overwrite).
    pub payload: &'a [u8],
    checked: bool,
}

impl<'a> BusFrame<'a> {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.header.kind).unwrap_or(Kind::Control)
    }
    /// Whether this is the END-OF-STREAM frame.
    pub fn is_eof(&self) -> bool {
        self.header.kind == Kind::Control as u8 && self.header.has(flags::EOF)
    }
    /// The event, read in place; validated unless the reader opted into the unchecked path.
    pub fn event(&self) -> Result<EventRef<'a>, DecodeError> {
        if self.checked {
            event::decode(self.kind(), self.payload)
        } else {
            // SAFETY: the consumer opted in with `BusReader::set_unchecked`, promising the bus
            // carries archives written by Aegis producers (and the sequencer validated every
            // frame header).
            unsafe { event::decode_unchecked(self.kind(), self.payload) }
        }
    }
}

/// Where a polled frame's payload is.
#[derive(Clone, Copy)]
enum At {
    InPlace(usize),
    Scratch,
}

/// Frames between two stores of the consumer cursor.
const CURSOR_BATCH: u32 = 64;

/// A consumer's end of the bus.
pub struct BusReader {
    m: Mapped,
    slot: usize,
    /// The slot's generation when we attached: the slot is ours while it is unchanged.
    generation: u64,
    /// Next byte to read. Invariant: `published_cursor <= pos`.
    pos: u64,
    published_cursor: u64,
    unpublished: u32,
    cached_tail: u64,
    checked: bool,
    topics: Option<Vec<u64>>,
    /// Overwrite policy: the bus sequence expected next, once known.
    expected: Option<Seq>,
    /// Overwrite policy: lapped; the next frame tells how many were missed.
    lapped: bool,
    /// Overwrite policy: a frame in `scratch` to hand out on the next call.
    pending: Option<FrameHeader>,
    scratch: Vec<u128>,
    read: u64,
}

// SAFETY: the reader is the only writer of its slot's cursor; moving it moves that role.
unsafe impl Send for BusReader {}

impl BusReader {
    /// Attaches to the bus in slot `slot` (as assigned by the daemon) or in the first free
    /// slot. Starts at the head: frames already published are not delivered.
    pub fn attach(
        region: Arc<dyn Region>,
        epoch: Option<u64>,
        slot: Option<usize>,
    ) -> Result<BusReader, AttachError> {
        let m = Mapped::open(region, epoch)?;
        let ctrl = m.ctrl();
        let candidates: Vec<usize> = match slot {
            Some(s) if s < MAX_CONSUMERS => vec![s],
            Some(s) => return Err(AttachError::NoSlot(format!("slot {s} is out of range"))),
            None => (0..MAX_CONSUMERS).collect(),
        };
        let mut chosen = None;
        for i in candidates {
            let s = &ctrl.slots[i];
            // Nothing is stored into a slot before we own it: the cursor of a slot another
            // consumer holds must not be touched (it used to be reset to 0 here, and a caught-up
            // consumer never stores its cursor again, so a block-policy writer waited forever;
            // regression test: `regression_attach_does_not_clobber_an_attached_slot_cursor`).
            // Until we store our starting point below, a writer that sees the slot attached
            // reads the previous occupant's cursor (or 0): never ahead of the tail we start
            // at, so it holds the writer back and never lets it run past us.
            if s.state
                .compare_exchange(
                    SLOT_FREE,
                    SLOT_ATTACHED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                chosen = Some(i);
                break;
            }
        }
        let slot_i = chosen.ok_or_else(|| {
            AttachError::NoSlot(match slot {
                Some(s) => format!("slot {s} is taken"),
                None => format!("all {MAX_CONSUMERS} slots are taken"),
            })
        })?;
        // SeqCst fence: pairs with the one in `BusWriter::min_cursor` (Dekker): either the
        // writer sees our slot attached, or we see every tail it published before its scan.
        fence(Ordering::SeqCst);
        let tail = ctrl.tail.load(Ordering::Acquire);
        let s = &ctrl.slots[slot_i];
        let generation = s.generation.fetch_add(1, Ordering::AcqRel) + 1;
        s.pid.store(std::process::id(), Ordering::Relaxed);
        s.read.store(0, Ordering::Relaxed);
        s.overruns.store(0, Ordering::Relaxed);
        s.missed.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `BusWriter::min_cursor`.
        s.cursor.store(tail, Ordering::Release);
        let scratch_words = (m.cap as usize).div_ceil(16);
        Ok(BusReader {
            slot: slot_i,
            generation,
            pos: tail,
            published_cursor: tail,
            unpublished: 0,
            cached_tail: tail,
            checked: true,
            topics: None,
            expected: None,
            lapped: false,
            pending: None,
            scratch: if m.policy == Policy::Overwrite {
                vec![0u128; scratch_words]
            } else {
                Vec::new()
            },
            read: 0,
            m,
        })
    }

    /// The slot this reader holds.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The bus policy.
    pub fn policy(&self) -> Policy {
        self.m.policy
    }

    /// Opt into reading payloads without bytecheck validation.
    ///
    /// # Safety
    /// Only sound if every producer of the session writes archives with this crate, since
    /// [`BusFrame::event`] then trusts the payload bytes.
    pub unsafe fn set_unchecked(&mut self) {
        self.checked = false;
    }

    /// Deliver only these topics (plus control frames). `None` delivers everything. Skipping a
    /// frame reads only its header.
    pub fn subscribe(&mut self, topics: Option<&[u32]>) {
        self.topics = topics.map(|ts| {
            let max = ts.iter().copied().max().unwrap_or(0) as usize;
            let mut bits = vec![0u64; max / 64 + 1];
            for &t in ts {
                bits[t as usize / 64] |= 1 << (t % 64);
            }
            bits
        });
    }

    #[inline]
    fn wanted(&self, h: &FrameHeader) -> bool {
        match &self.topics {
            None => true,
            Some(bits) => {
                h.kind == Kind::Control as u8
                    || bits
                        .get(h.topic_id as usize / 64)
                        .is_some_and(|w| w & (1 << (h.topic_id % 64)) != 0)
            }
        }
    }

    fn publish_cursor(&mut self) {
        if self.published_cursor != self.pos && self.owns_slot() {
            let s = &self.m.ctrl().slots[self.slot];
            // Release: pairs with the Acquire load in `BusWriter::min_cursor`; we are done
            // reading the bytes below `pos` before the writer may reuse them.
            s.cursor.store(self.pos, Ordering::Release);
            s.read.store(self.read, Ordering::Relaxed);
            self.published_cursor = self.pos;
        }
        self.unpublished = 0;
    }

    /// Whether the slot is still ours: attached, and not re-attached by another consumer
    /// since (the daemon may release the slot of a consumer it believes dead).
    fn owns_slot(&self) -> bool {
        let s = &self.m.ctrl().slots[self.slot];
        s.state.load(Ordering::Acquire) == SLOT_ATTACHED
            && s.generation.load(Ordering::Acquire) == self.generation
    }

    fn check_attached(&self) -> Result<(), ReadError> {
        if !self.owns_slot() {
            return Err(ReadError::Detached(self.slot));
        }
        Ok(())
    }

    /// Returns the next frame, or `None` if there is nothing new. The frame stays valid until
    /// the next call.
    pub fn try_next(&mut self) -> Result<Option<BusFrame<'_>>, ReadError> {
        Ok(self.poll()?.map(|(h, at)| self.frame(h, at)))
    }

    /// Waits for the next frame with `wait` until `deadline`.
    pub fn next(
        &mut self,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<BusFrame<'_>, ReadError> {
        loop {
            if let Some((h, at)) = self.poll()? {
                wait.reset();
                return Ok(self.frame(h, at));
            }
            if deadline.expired() {
                return Err(ReadError::Timeout);
            }
            self.check_attached()?;
            wait.wait();
        }
    }

    fn poll(&mut self) -> Result<Option<(FrameHeader, At)>, ReadError> {
        match self.m.policy {
            Policy::Block => self.poll_block(),
            Policy::Overwrite => self.poll_overwrite(),
        }
    }

    fn frame(&self, header: FrameHeader, at: At) -> BusFrame<'_> {
        let ptr = match at {
            // SAFETY: validated to lie inside the data area; untouched until our cursor moves
            // past it, which happens on a later call (block policy).
            At::InPlace(off) => unsafe { self.m.data.add(off + FRAME_HEADER_LEN) as *const u8 },
            At::Scratch => self.scratch.as_ptr() as *const u8,
        };
        BusFrame {
            header,
            // SAFETY: `ptr` holds `header.len` valid bytes (in the bus, or copied to scratch,
            // which holds `cap` bytes), 16-aligned.
            payload: unsafe { std::slice::from_raw_parts(ptr, header.len as usize) },
            checked: self.checked,
        }
    }

    fn poll_block(&mut self) -> Result<Option<(FrameHeader, At)>, ReadError> {
        if self.unpublished >= CURSOR_BATCH {
            self.publish_cursor();
        }
        loop {
            if self.pos == self.cached_tail {
                // Everything before `pos` is done with: release it before looking for more, so a
                // writer blocked on us can go on.
                self.publish_cursor();
                // Acquire: pairs with the Release store in `BusWriter::publish`.
                self.cached_tail = self.m.ctrl().tail.load(Ordering::Acquire);
                if self.pos == self.cached_tail {
                    return Ok(None);
                }
            }
            let off = (self.pos & self.m.mask) as usize;
            let contiguous = self.m.cap as usize - off;
            if frame::skip_to_wrap(contiguous) {
                self.pos += contiguous as u64;
                continue;
            }
            // SAFETY: the header lies inside the data area, in the published region, which the
            // writer does not overwrite before our cursor passes it (block policy).
            let h = unsafe { frame::read_header(self.m.data.add(off)) };
            if h.kind == Kind::Control as u8 && h.has(flags::PADDING) {
                self.pos += contiguous as u64;
                continue;
            }
            let stride = h.validate(contiguous).map_err(ReadError::Corrupt)?;
            self.pos += stride as u64;
            self.unpublished += 1;
            if !self.wanted(&h) {
                continue;
            }
            self.read += 1;
            return Ok(Some((h, At::InPlace(off))));
        }
    }

    fn poll_overwrite(&mut self) -> Result<Option<(FrameHeader, At)>, ReadError> {
        if let Some(h) = self.pending.take() {
            return Ok(Some((h, At::Scratch)));
        }
        if self.unpublished >= CURSOR_BATCH {
            self.publish_cursor();
        }
        loop {
            if self.pos == self.cached_tail {
                self.publish_cursor();
                // Acquire: pairs with the Release store in `BusWriter::publish`.
                self.cached_tail = self.m.ctrl().tail.load(Ordering::Acquire);
                if self.pos == self.cached_tail {
                    return Ok(None);
                }
            }
            if self.cached_tail - self.pos > self.m.cap {
                self.lap();
                continue;
            }
            let off = (self.pos & self.m.mask) as usize;
            let contiguous = self.m.cap as usize - off;
            if frame::skip_to_wrap(contiguous) {
                self.pos += contiguous as u64;
                continue;
            }
            // SAFETY: inside the data area. The writer may be overwriting these bytes right now;
            // the copy is validated by the seqlock check below before anything trusts it.
            let h = unsafe { frame::read_header(self.m.data.add(off)) };
            let stride = if h.kind == Kind::Control as u8 && h.has(flags::PADDING) {
                None
            } else {
                match h.validate(contiguous) {
                    Ok(s) => {
                        // SAFETY: `off + s <= cap`; scratch holds `cap` bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.m.data.add(off + FRAME_HEADER_LEN),
                                self.scratch.as_mut_ptr() as *mut u8,
                                h.len as usize,
                            )
                        };
                        Some(Ok(s))
                    }
                    Err(e) => Some(Err(e)),
                }
            };
            // Acquire fence: pairs with the Release fence after the `claim` store in
            // `BusWriter::try_write`; if the writer overwrote any byte we copied, we see its
            // claim reach past our frame.
            fence(Ordering::Acquire);
            let claim = self.m.ctrl().claim.load(Ordering::Relaxed);
            if claim > self.pos + self.m.cap {
                self.lap();
                continue;
            }
            let stride = match stride {
                None => {
                    self.pos += contiguous as u64;
                    continue;
                }
                Some(Err(e)) => return Err(ReadError::Corrupt(e)),
                Some(Ok(s)) => s,
            };
            self.pos += stride as u64;
            self.unpublished += 1;
            let missed = match (self.lapped, self.expected) {
                (true, Some(exp)) => h.bus_seq.saturating_sub(exp),
                _ => 0,
            };
            self.lapped = false;
            self.expected = Some(h.bus_seq + 1);
            if missed > 0 {
                let s = &self.m.ctrl().slots[self.slot];
                s.overruns.fetch_add(1, Ordering::Relaxed);
                s.missed.fetch_add(missed, Ordering::Relaxed);
                if self.wanted(&h) {
                    self.read += 1;
                    self.pending = Some(h);
                }
                return Err(ReadError::Overrun { missed });
            }
            if !self.wanted(&h) {
                continue;
            }
            self.read += 1;
            return Ok(Some((h, At::Scratch)));
        }
    }

    /// Lapped: jump to the head. The exact count is known when the next frame arrives.
    fn lap(&mut self) {
        self.lapped = true;
        // Acquire: pairs with the Release store in `BusWriter::publish`.
        self.cached_tail = self.m.ctrl().tail.load(Ordering::Acquire);
        self.pos = self.cached_tail;
    }

    /// Frames delivered so far.
    pub fn delivered(&self) -> u64 {
        self.read
    }
}

impl Drop for BusReader {
    fn drop(&mut self) {
        // Only free a slot that is still ours: a consumer declared dead whose slot went to
        // another consumer must not free its successor's slot.
        if self.owns_slot() {
            self.publish_cursor();
            release_slot(self.m.ctrl(), self.slot);
        }
    }
}
