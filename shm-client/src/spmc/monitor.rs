//! Observing a bus from outside (the daemon's `inspect`): slot statistics, releasing the slot
//! of a dead consumer.

use std::sync::Arc;

use super::layout::{self, BusControl, Mapped, SLOT_ATTACHED, SLOT_FREE};
use crate::segment::{OpenError, Region};
use crate::sync::Ordering;

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

/// Statistics of every attached slot of `ctrl`, with lags against `tail`.
pub(super) fn slot_stats(ctrl: &BusControl, tail: u64) -> Vec<SlotStats> {
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

/// Frees slot `i` of `ctrl` (out-of-range indices are ignored).
pub(super) fn release_slot(ctrl: &BusControl, i: usize) {
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
            m: layout::open(region, epoch)?.0,
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
