//! The shared-memory layout of the bus: its control block, consumer slots and segment.

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::ring::mapped::{self, ControlBlock};
use crate::segment::{self, Geometry, OpenError, Region, SegmentKind};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Consumer slots per bus.
#[cfg(not(loom))]
pub const MAX_CONSUMERS: usize = 64;
/// Consumer slots per bus (kept small under loom).
#[cfg(loom)]
pub const MAX_CONSUMERS: usize = 3;

/// A slot nobody holds.
pub(super) const SLOT_FREE: u32 = 0;
/// A slot a consumer holds.
pub(super) const SLOT_ATTACHED: u32 = 1;

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
    pub(super) state: AtomicU32,
    /// Pid of the attached consumer.
    pub(super) pid: AtomicU32,
    /// Bytes the consumer is done with. Invariant while attached: `cursor <= tail`.
    pub(super) cursor: AtomicU64,
    /// Frames delivered to the consumer.
    pub(super) read: AtomicU64,
    /// Times the consumer was lapped (overwrite policy).
    pub(super) overruns: AtomicU64,
    /// Frames the consumer missed in all.
    pub(super) missed: AtomicU64,
    /// Bumped on every attach, so that a consumer whose slot was released and handed to
    /// someone else can no longer store its cursor there, nor free it.
    pub(super) generation: AtomicU64,
}

/// The control block of the bus, after the segment header.
#[repr(C)]
pub struct BusControl {
    /// Bytes published by the writer (Release), read by consumers (Acquire). Always a frame
    /// boundary.
    pub(super) tail: CachePadded<AtomicU64>,
    /// Overwrite policy: how far the writer may be writing (`>= tail`). Seqlock end.
    pub(super) claim: CachePadded<AtomicU64>,
    /// The [`Policy`], fixed at creation.
    pub(super) policy: CachePadded<AtomicU32>,
    pub(super) slots: [CachePadded<Slot>; MAX_CONSUMERS],
}

impl BusControl {
    pub(super) fn new(policy: Policy) -> BusControl {
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

impl ControlBlock for BusControl {
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
    let policy = match m.ctrl().policy.load(Ordering::Relaxed) {
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
    mapped::init_region(region, capacity, epoch, BusControl::new(policy))
}

/// Creates a bus segment in `/dev/shm` at `path`.
pub fn create_shm(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
    policy: Policy,
) -> Result<segment::ShmRegion, segment::CreateError> {
    mapped::create_shm(path, capacity, epoch, BusControl::new(policy))
}
