//! A validated mapping of a ring segment: header, control block, data area.

use std::sync::Arc;

use super::layout::{capacity_ok, check_capacity, RingData};
use crate::segment::{self, CreateError, Geometry, OpenError, Region, SegmentKind};

/// A ring's control block type: which segment kind holds it.
///
/// Implementors are `#[repr(C)]` blocks of atomics (and padding): all-zero bytes are a valid
/// value, the state of a fresh ring before its `init` runs.
pub(crate) trait ControlBlock {
    /// The segment kind whose header precedes this block.
    const KIND: SegmentKind;
    /// The error text when the capacity in the header breaks the ring rule.
    const BAD_CAPACITY: &'static str;
    /// The assertion text when a region is too small for the segment.
    const TOO_SMALL: &'static str;
    /// The all-zero value, constructed (loom's atomics are objects, not bytes: under loom the
    /// block is written as a value; otherwise it is zeroed byte by byte, padding included).
    #[cfg_attr(not(loom), allow(dead_code))]
    fn fresh() -> Self;
}

/// The segment geometry of a ring with control block `C` and `capacity` data bytes.
pub(crate) fn geometry<C: ControlBlock>(capacity: usize) -> Geometry {
    Geometry::new(std::mem::size_of::<C>(), capacity)
}

/// Initialises a fresh region as a ring: zeroes the control block (padding included, so that a
/// segment's bytes depend on nothing but its parameters), runs `init` on it, then marks the
/// segment initialised (two phases: header and block first, the initialised flag last).
pub(crate) fn init_region<C: ControlBlock>(
    region: &dyn Region,
    capacity: usize,
    epoch: u64,
    init: impl FnOnce(&C),
) -> Result<(), CreateError> {
    check_capacity(capacity)?;
    let geo = geometry::<C>(capacity);
    assert!(region.len() >= geo.total_len(), "{}", C::TOO_SMALL);
    // SAFETY: the region is large enough (asserted) and fresh, so nobody reads it yet.
    unsafe { segment::write_header(region, C::KIND, epoch, geo) };
    // SAFETY: the control block sits at HEADER_LEN (128-aligned) inside the region; fresh, so
    // nobody else accesses it yet; all-zero bytes are a valid `C` (the trait's promise).
    let ctrl = unsafe {
        let p = region.as_ptr().add(segment::HEADER_LEN);
        #[cfg(not(loom))]
        p.write_bytes(0, std::mem::size_of::<C>());
        #[cfg(loom)]
        (p as *mut C).write(C::fresh());
        &*(p as *const C)
    };
    init(ctrl);
    segment::mark_initialized(region);
    Ok(())
}

/// Creates a ring segment in `/dev/shm` at `path` and initialises it with `ctrl`.
pub(crate) fn create_shm<C: ControlBlock>(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
    init: impl FnOnce(&C),
) -> Result<segment::ShmRegion, CreateError> {
    check_capacity(capacity)?;
    let region = segment::ShmRegion::create(path, geometry::<C>(capacity).total_len())?;
    init_region(&region, capacity, epoch, init)?;
    Ok(region)
}

/// The shared view of a mapped ring, used by every end of it (writer, readers, monitors).
///
/// Invariants: `ctrl` points at an initialised `C` inside `_region`, and `ring` describes the
/// data area of `_region`; both stay valid as long as this value keeps the region alive.
pub(crate) struct Mapped<C> {
    _region: Arc<dyn Region>,
    ctrl: *const C,
    /// The data area.
    pub(crate) ring: RingData,
}

impl<C: ControlBlock> Mapped<C> {
    /// Maps an initialised ring segment of kind `C::KIND`: checks the header (magic, version,
    /// epoch, initialisation, size) and the capacity.
    pub(crate) fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<Self, OpenError> {
        let geo = segment::validate_header(&*region, C::KIND, epoch, std::mem::size_of::<C>())?;
        if !capacity_ok(geo.capacity) {
            return Err(OpenError::Corrupt(C::BAD_CAPACITY));
        }
        let base = region.as_ptr();
        // SAFETY: validate_header checked that the region holds header, control block and
        // data; the offsets are inside it.
        let ctrl = unsafe { base.add(segment::HEADER_LEN) } as *const C;
        // SAFETY: as above; the data area of `geo.capacity` bytes lies inside the region,
        // which `_region` keeps mapped for as long as the `RingData` is used through `self`.
        let ring = unsafe { RingData::new(base.add(geo.data_offset), geo.capacity) };
        Ok(Mapped {
            _region: region,
            ctrl,
            ring,
        })
    }
}

impl<C> Mapped<C> {
    /// The region this view maps (to map it once more, for another handle).
    pub(crate) fn region(&self) -> Arc<dyn Region> {
        self._region.clone()
    }

    /// The control block.
    #[inline]
    pub(crate) fn ctrl(&self) -> &C {
        // SAFETY: `ctrl` points into the region we keep alive; the block was initialised
        // before the segment was marked ready (checked in `open`), and every field another
        // process writes is an atomic.
        unsafe { &*self.ctrl }
    }
}
