//! The shared-memory layout of the bus: its control block, consumer slots and segment.

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::doorbell::Doorbell;
use crate::frame;
use crate::ring::mapped::{self, ControlBlock};
use crate::segment::{self, Geometry, OpenError, Region, SegmentKind};
use crate::sync::{fence, spin_hint, AtomicU32, AtomicU64, Ordering};

/// Consumer slots per bus.
#[cfg(not(loom))]
pub const MAX_CONSUMERS: usize = 64;
/// Consumer slots per bus (kept small under loom).
#[cfg(loom)]
pub const MAX_CONSUMERS: usize = 3;

/// The attached bit of a slot's owner word ([`Slot::owner`]).
pub(super) const ATTACHED: u64 = 1;

/// The owner word of a slot attached in generation `generation`.
#[inline]
pub(super) fn owner_word(generation: u64) -> u64 {
    generation << 1 | ATTACHED
}

/// Whether an owner word says attached.
#[inline]
pub(super) fn is_attached(owner: u64) -> bool {
    owner & ATTACHED != 0
}

/// The low bits of a cursor word that carry (the low bits of) its writer's generation. Bus
/// positions are frame boundaries, multiples of [`frame::FRAME_ALIGN`], so these bits of a
/// position are always 0.
pub(super) const CURSOR_TAG: u64 = frame::FRAME_ALIGN as u64 - 1;
const _: () = assert!(frame::FRAME_ALIGN >= 16);

/// The cursor word of a consumer of owner word `owner` at position `pos`.
#[inline]
pub(super) fn cursor_word(pos: u64, owner: u64) -> u64 {
    debug_assert_eq!(pos & CURSOR_TAG, 0, "a cursor is a frame boundary");
    pos | (owner >> 1) & CURSOR_TAG
}

/// The position in a cursor word, if the word was stored by the consumer of owner word
/// `owner` (`None`: it is a previous occupant's, the new one has not stored its own yet).
#[inline]
pub(super) fn cursor_of(word: u64, owner: u64) -> Option<u64> {
    (word & CURSOR_TAG == (owner >> 1) & CURSOR_TAG).then_some(word & !CURSOR_TAG)
}

/// [`Fixed::eof_end`] before the writer has published END-OF-STREAM.
pub(super) const NO_EOF: u64 = 0;

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

/// One consumer's slot. Written by the consumer (cursor, counters) and by the daemon (the
/// owner word, when it releases a dead or evicted consumer's slot).
///
/// Ownership is decided by compare-and-swap on words that carry the generation, never by a
/// check followed by a store (issue 9, item 3): the owner word packs the generation with the
/// attached bit, and the cursor word carries the low bits of its writer's generation, so that
/// a stale consumer (its slot released, perhaps handed to another) can neither move its
/// successor's cursor nor free its successor's slot.
#[repr(C)]
pub struct Slot {
    /// `generation << 1 | ATTACHED` while attached, `generation << 1` when free. Attaching
    /// bumps the generation (CAS from a free word); releasing clears the attached bit (CAS from
    /// the owner's word).
    pub(super) owner: AtomicU64,
    /// Pid of the attached consumer.
    pub(super) pid: AtomicU32,
    /// [`cursor_word`]: bytes the consumer is done with, tagged with its generation. Stored
    /// by CAS from the consumer's previous word. Invariant while attached: `cursor <= tail`
    /// (the writer clamps it, it does not trust it).
    pub(super) cursor: AtomicU64,
    /// Frames delivered to the consumer.
    pub(super) read: AtomicU64,
    /// Times the consumer was lapped (overwrite policy).
    pub(super) overruns: AtomicU64,
    /// Frames the consumer missed in all.
    pub(super) missed: AtomicU64,
    /// The consumer's topic filter, a [`super::TopicMask`] (see `mask.rs`): set to
    /// [`super::TopicMask::ALL`] at attach, then written by the consumer's process (its
    /// subscription or its reconciliation), read by the consumer once per poll and by the
    /// daemon (`aegis-shmctl subscriptions`). Relaxed everywhere: it guards no other data.
    pub(super) topics: AtomicU64,
}

/// What the writer publishes: the tail, and the bus sequence that goes with it, under a
/// seqlock (`version` is odd while the two change), so that a consumer attaching knows the
/// bus sequence of the first frame it will read.
#[repr(C)]
pub struct Published {
    /// Bytes published by the writer (Release), read by consumers (Acquire). Always a frame
    /// boundary.
    pub(super) tail: AtomicU64,
    /// The bus sequence of the frame that will be written at `tail`.
    pub(super) seq: AtomicU64,
    /// Seqlock version of (`tail`, `seq`): odd while the writer changes them.
    pub(super) version: AtomicU64,
    /// Overwrite policy: how far the writer may be writing (`>= tail`); the end of the
    /// seqlock that guards the frames' bytes. On the tail's cache line: a consumer checks it
    /// right after reading a frame it found through the tail, and usually still holds the line.
    pub(super) claim: AtomicU64,
}

/// Words the writer stores once (or never) after creation.
#[repr(C)]
pub struct Fixed {
    /// The position just past the END-OF-STREAM frame once it is published (never 0), else
    /// [`NO_EOF`]. Nothing is written after that frame, so it is never overwritten: a
    /// consumer lapped over the end jumps there and still sees it.
    pub(super) eof_end: AtomicU64,
    /// The [`Policy`], fixed at creation.
    pub(super) policy: AtomicU32,
}

/// The control block of the bus, after the segment header.
#[repr(C)]
pub struct BusControl {
    /// The published tail and its bus sequence.
    pub(super) published: CachePadded<Published>,
    /// Policy and end of stream.
    pub(super) fixed: CachePadded<Fixed>,
    /// Rung by the writer after every publish (and by the daemon when it releases a slot);
    /// parked consumers sleep on it.
    pub(super) bell: CachePadded<Doorbell>,
    pub(super) slots: [CachePadded<Slot>; MAX_CONSUMERS],
}

impl BusControl {
    /// Sets up a zeroed block (every word 0: no tail, no EOF, every slot free) for `policy`.
    fn init(&self, policy: Policy) {
        self.fixed.policy.store(policy as u32, Ordering::Relaxed);
    }

    /// The published tail and the bus sequence of the frame at it, read consistently
    /// (seqlock). Spins only while the writer is inside `BusWriter::publish` (a few stores).
    pub(super) fn tail_and_seq(&self) -> (u64, u64) {
        let p = &self.published;
        loop {
            // Acquire: pairs with the Release store of the even version at the end of
            // `BusWriter::publish`: the tail and seq of that publish (or later) are visible.
            let v1 = p.version.load(Ordering::Acquire);
            if v1 & 1 == 0 {
                // Acquire: pairs with the Release store of `tail` in `BusWriter::publish`.
                let tail = p.tail.load(Ordering::Acquire);
                let seq = p.seq.load(Ordering::Relaxed);
                // Acquire fence: pairs with the Release fence after the odd version store in
                // `BusWriter::publish`: if either load above read a value of a publish that
                // started after `v1`, the reload below sees its odd (or a later) version.
                fence(Ordering::Acquire);
                if p.version.load(Ordering::Relaxed) == v1 {
                    return (tail, seq);
                }
            }
            spin_hint();
        }
    }

    /// The published tail (Acquire: pairs with the Release store in `BusWriter::publish`; the
    /// frames below it are written before they are read).
    #[inline]
    pub(super) fn tail(&self) -> u64 {
        self.published.tail.load(Ordering::Acquire)
    }
}

impl ControlBlock for BusControl {
    fn fresh() -> BusControl {
        BusControl {
            published: CachePadded::new(Published {
                tail: AtomicU64::new(0),
                seq: AtomicU64::new(0),
                version: AtomicU64::new(0),
                claim: AtomicU64::new(0),
            }),
            fixed: CachePadded::new(Fixed {
                eof_end: AtomicU64::new(NO_EOF),
                policy: AtomicU32::new(0),
            }),
            bell: CachePadded::new(Doorbell::fresh()),
            slots: std::array::from_fn(|_| {
                CachePadded::new(Slot {
                    owner: AtomicU64::new(0),
                    pid: AtomicU32::new(0),
                    cursor: AtomicU64::new(0),
                    read: AtomicU64::new(0),
                    overruns: AtomicU64::new(0),
                    missed: AtomicU64::new(0),
                    topics: AtomicU64::new(0),
                })
            }),
        }
    }
    const KIND: SegmentKind = SegmentKind::Bus;
    const BAD_CAPACITY: &'static str = "bus capacity is not a power of two";
    const TOO_SMALL: &'static str = "region too small for the bus";
}

/// A mapped bus.
pub(super) type Mapped = mapped::Mapped<BusControl>;

/// Maps an initialised bus and reads its policy.
pub(super) fn open(
    region: Arc<dyn Region>,
    epoch: Option<u64>,
) -> Result<(Mapped, Policy), OpenError> {
    let m = Mapped::open(region, epoch)?;
    let policy = match m.ctrl().fixed.policy.load(Ordering::Relaxed) {
        0 => Policy::Block,
        1 => Policy::Overwrite,
        _ => return Err(OpenError::Corrupt("unknown bus policy")),
    };
    Ok((m, policy))
}

/// The segment geometry of a bus with `capacity` data bytes.
pub fn geometry(capacity: usize) -> Geometry {
    mapped::geometry::<BusControl>(capacity)
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
    mapped::init_region(region, capacity, epoch, |c: &BusControl| c.init(policy))
}

/// Creates a bus segment in `/dev/shm` at `path`.
pub fn create_shm(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
    policy: Policy,
) -> Result<segment::ShmRegion, segment::CreateError> {
    mapped::create_shm(path, capacity, epoch, |c: &BusControl| c.init(policy))
}
