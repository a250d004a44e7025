//! Observing a bus from outside (the daemon's `inspect`): slot statistics, releasing the slot
//! of a dead consumer.

use std::sync::Arc;

use super::layout::{self, cursor_of, is_attached, BusControl, Mapped, ATTACHED};
use super::mask::TopicMask;
use crate::segment::{OpenError, Region};
use crate::sync::Ordering;

/// A snapshot of one slot, for `inspect`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Slot index.
    pub slot: usize,
    /// Pid of the consumer.
    pub pid: u32,
    /// The slot's owner word (generation and attached bit) when the snapshot was taken: what
    /// [`BusMonitor::release_slot_owned`] compares.
    pub owner: u64,
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
    /// The consumer's topic filter.
    pub topics: TopicMask,
}

/// Statistics of every attached slot of `ctrl`, with lags against `tail`.
pub(super) fn slot_stats(ctrl: &BusControl, tail: u64) -> Vec<SlotStats> {
    ctrl.slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let owner = s.owner.load(Ordering::Acquire);
            if !is_attached(owner) {
                return None;
            }
            // A cursor of a previous occupant (the new one is attaching) reads as the tail.
            let cursor = cursor_of(s.cursor.load(Ordering::Acquire), owner).unwrap_or(tail);
            Some(SlotStats {
                slot: i,
                pid: s.pid.load(Ordering::Relaxed),
                owner,
                cursor,
                lag_bytes: tail.saturating_sub(cursor),
                read: s.read.load(Ordering::Relaxed),
                overruns: s.overruns.load(Ordering::Relaxed),
                missed: s.missed.load(Ordering::Relaxed),
                topics: TopicMask(s.topics.load(Ordering::Relaxed)),
            })
        })
        .collect()
}

/// Frees slot `i` of `ctrl` if it is attached and, with `owner`, only if it is still held in
/// that owner word (generation). Returns whether this call freed it. Out-of-range indices are
/// ignored.
pub(super) fn release_slot(ctrl: &BusControl, i: usize, owner: Option<u64>) -> bool {
    let Some(s) = ctrl.slots.get(i) else {
        return false;
    };
    let mut cur = s.owner.load(Ordering::Relaxed);
    loop {
        if !is_attached(cur) || owner.is_some_and(|o| o != cur) {
            return false;
        }
        // Release: pairs with the Acquire load of `owner` in `BusWriter::min_cursor`: a writer
        // that sees the slot free no longer waits for its cursor. The CAS compares the
        // generation: a release meant for one consumer never frees its successor.
        match s.owner.compare_exchange_weak(
            cur,
            cur & !ATTACHED,
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                // A consumer parked on the bus wakes and finds itself released.
                ctrl.bell.ring();
                return true;
            }
            Err(now) => cur = now,
        }
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
        slot_stats(self.m.ctrl(), self.m.ctrl().tail())
    }
    /// Frees slot `i` (a dead or evicted consumer), whoever holds it. The consumer's next read
    /// returns [`super::ReadError::Detached`].
    pub fn release_slot(&self, i: usize) {
        release_slot(self.m.ctrl(), i, None);
    }
    /// Frees slot `i` only if it is still held in the owner word `owner` (from
    /// [`SlotStats::owner`]), so that a decision taken about one consumer never frees a
    /// successor that took the slot since. Returns whether the slot was freed.
    pub fn release_slot_owned(&self, i: usize, owner: u64) -> bool {
        release_slot(self.m.ctrl(), i, Some(owner))
    }
    /// Overwrites slot `i`'s topic filter, whoever holds it, as a bug or a stray write
    /// would: for tests and tools that check the reconciliation repairs it. A consumer's
    /// client library sets its own filter; the daemon never calls this. Out-of-range slots
    /// are ignored.
    pub fn overwrite_topics(&self, i: usize, mask: TopicMask) {
        if let Some(s) = self.m.ctrl().slots.get(i) {
            // Relaxed: the mask guards no other data (`mask.rs`).
            s.topics.store(mask.0, Ordering::Relaxed);
        }
    }
    /// The published tail.
    pub fn tail(&self) -> u64 {
        self.m.ctrl().tail()
    }
}
