//! The shared-memory layout of a source ring: its control block and segment.

use crossbeam_utils::CachePadded;

use crate::doorbell::Doorbell;
use crate::ring::mapped::{self, ControlBlock};
use crate::segment::{self, Geometry, Region, SegmentKind};
use crate::sync::AtomicU64;

/// The control block of a source ring, in shared memory after the segment header.
#[repr(C)]
pub struct RingControl {
    /// Bytes published by the producer. Written only by the producer (Release), read by the
    /// sequencer (Acquire). Invariant: `head <= tail <= head + capacity`, a multiple of 16.
    pub(super) tail: CachePadded<AtomicU64>,
    /// Bytes released by the sequencer. Written only by the sequencer (Release), read by the
    /// producer (Acquire).
    pub(super) head: CachePadded<AtomicU64>,
    /// Rung by the producer after every publish; the sequencer parks on it when idle.
    pub(super) bell: CachePadded<Doorbell>,
}

impl ControlBlock for RingControl {
    fn fresh() -> RingControl {
        RingControl {
            tail: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
            bell: CachePadded::new(Doorbell::fresh()),
        }
    }

    const KIND: SegmentKind = SegmentKind::SourceRing;
    const BAD_CAPACITY: &'static str = "ring capacity is not a power of two";
    const TOO_SMALL: &'static str = "region too small for the ring";
}

/// A mapped source ring.
pub(super) type Mapped = mapped::Mapped<RingControl>;

/// The segment geometry of a ring with `capacity` data bytes.
pub fn geometry(capacity: usize) -> Geometry {
    mapped::geometry::<RingControl>(capacity)
}

/// Total bytes of a ring segment with `capacity` data bytes.
pub fn region_len(capacity: usize) -> usize {
    geometry(capacity).total_len()
}

/// Initialises a fresh, zeroed region as a source ring and marks it initialised.
pub fn init_region(
    region: &dyn Region,
    capacity: usize,
    epoch: u64,
) -> Result<(), segment::CreateError> {
    mapped::init_region(region, capacity, epoch, |_: &RingControl| {})
}

/// Creates a source ring segment in `/dev/shm` at `path`.
pub fn create_shm(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
) -> Result<segment::ShmRegion, segment::CreateError> {
    mapped::create_shm(path, capacity, epoch, |_: &RingControl| {})
}
