//! What the daemon and a live sequencer share so that a source can change hands without a
//! duplicate or a gap (SPEC section 12): the ring of a source's new producer (a promoted
//! group member, or a producer restarted under the same source name), the last source seq
//! merged from each source, and the sources whose merge must not end yet because a producer
//! may still take them over.
//!
//! The sequencer never reads two rings of one source: a hand-over replaces the reader, and
//! the old ring (a fenced member's, which may still be written to after a SIGCONT) is never
//! read again. Exactly-once rests on the sequencer alone: it drops every event whose source
//! seq is at or below the last one it merged from that source. The `resume_after` the daemon
//! tells a new producer is read from [`Takeovers::last_seq`], which may lag the sequencer by
//! a batch: the new producer then resends a few events, which are dropped and counted as
//! duplicates, never merged twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use aegis_shm_client::spsc::RingReader;
use aegis_shm_client::stats::MAX_SOURCES;

/// Hand-overs, per-source seq figures and the restart hold of one live merge.
pub struct Takeovers {
    /// Whether `queue` may hold something (read by the sequencer every pass without locking).
    pending: AtomicBool,
    /// New readers by source rank, oldest first.
    queue: Mutex<Vec<(usize, RingReader)>>,
    /// Bit `rank` set: the source was removed (its producer died) but a restarted producer
    /// may still take it over; the merge does not end while a removed source's bit is set.
    hold: AtomicU64,
    /// Per rank: 1 + the source seq of the last event merged (0: none yet).
    last: [AtomicU64; MAX_SOURCES],
    /// Per rank: events dropped as duplicates.
    duplicates: [AtomicU64; MAX_SOURCES],
    /// Per rank: source seqs skipped.
    gaps: [AtomicU64; MAX_SOURCES],
}

impl Default for Takeovers {
    fn default() -> Takeovers {
        Takeovers {
            pending: AtomicBool::new(false),
            queue: Mutex::new(Vec::new()),
            hold: AtomicU64::new(0),
            last: std::array::from_fn(|_| AtomicU64::new(0)),
            duplicates: std::array::from_fn(|_| AtomicU64::new(0)),
            gaps: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Takeovers {
    /// Daemon: from the sequencer's next pass on, source `rank` is read from `reader` only
    /// (a removed source becomes active again; an ended one stays ended).
    pub fn hand_over(&self, rank: usize, reader: RingReader) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((rank, reader));
        // Release: pairs with the Acquire load in `take`; the queued reader is visible to a
        // sequencer that sees the flag.
        self.pending.store(true, Ordering::Release);
    }

    /// Sequencer: the hand-overs queued since the last call (none without locking, in the
    /// common case).
    pub fn take(&self) -> Vec<(usize, RingReader)> {
        // Acquire: pairs with the Release store in `hand_over`.
        if !self.pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Relaxed);
        std::mem::take(&mut *q)
    }

    /// Whether a hand-over is queued and not yet taken.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Daemon: source `rank` may be taken over; its removal must not end the merge. Set
    /// before the removal is requested (the sequencer's Acquire of the removal bits then sees
    /// it).
    pub fn hold(&self, rank: usize) {
        self.hold.fetch_or(1 << rank, Ordering::Relaxed);
    }

    /// Daemon: source `rank` will not be taken over any more (its restart window passed).
    pub fn release(&self, rank: usize) {
        self.hold.fetch_and(!(1 << rank), Ordering::Relaxed);
    }

    /// Whether `rank` is held.
    pub fn held(&self, rank: usize) -> bool {
        self.hold.load(Ordering::Relaxed) & (1 << rank) != 0
    }

    /// The held ranks, as a bit mask.
    pub fn held_mask(&self) -> u64 {
        self.hold.load(Ordering::Relaxed)
    }

    /// The source seq of the last event merged from `rank` (as of the sequencer's last
    /// published batch: it may lag, never lead).
    pub fn last_seq(&self, rank: usize) -> Option<u64> {
        self.last
            .get(rank)
            .and_then(|a| a.load(Ordering::Relaxed).checked_sub(1))
    }

    /// Events of `rank` dropped as duplicates.
    pub fn duplicates(&self, rank: usize) -> u64 {
        self.duplicates
            .get(rank)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Source seqs of `rank` skipped.
    pub fn gaps(&self, rank: usize) -> u64 {
        self.gaps.get(rank).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Sequencer: publishes the figures of `rank`. Relaxed: they are figures for the daemon
    /// and for `inspect`; exactly-once never depends on them (see the module docs).
    pub fn publish(&self, rank: usize, last: Option<u64>, duplicates: u64, gaps: u64) {
        if rank >= MAX_SOURCES {
            return;
        }
        self.last[rank].store(last.map_or(0, |l| l + 1), Ordering::Relaxed);
        self.duplicates[rank].store(duplicates, Ordering::Relaxed);
        self.gaps[rank].store(gaps, Ordering::Relaxed);
    }
}

/// A live source's seq bookkeeping in the sequencer: the last seq merged, duplicates dropped
/// and seqs skipped.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqTrack {
    /// The source seq of the last event merged (or refused: a refused event is accounted
    /// for, and not a gap).
    pub last: Option<u64>,
    /// Events dropped as duplicates.
    pub duplicates: u64,
    /// Seqs skipped.
    pub gaps: u64,
}

impl SeqTrack {
    /// Whether an event with source seq `seq` was seen already (a resend after a failover
    /// or restart): count it and drop it.
    #[inline]
    pub fn duplicate(&mut self, seq: u64) -> bool {
        let dup = self.last.is_some_and(|l| seq <= l);
        self.duplicates += dup as u64;
        dup
    }

    /// An event with source seq `seq` is accounted for (merged or refused): counts the seqs
    /// skipped before it.
    #[inline]
    pub fn accept(&mut self, seq: u64) {
        let expected = self.last.map_or(0, |l| l + 1);
        self.gaps += seq.saturating_sub(expected);
        self.last = Some(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_track_drops_resends_and_counts_gaps() {
        let mut t = SeqTrack::default();
        for s in 0..5 {
            assert!(!t.duplicate(s));
            t.accept(s);
        }
        // A new active resumes from a stale resume_after (2): 3 and 4 are resent.
        assert!(t.duplicate(3));
        assert!(t.duplicate(4));
        assert!(!t.duplicate(5));
        t.accept(5);
        assert_eq!((t.duplicates, t.gaps), (2, 0));
        // A producer that skipped 6 and 7.
        t.accept(8);
        assert_eq!(t.gaps, 2);
    }

    #[test]
    fn a_stream_that_starts_late_is_a_gap() {
        let mut t = SeqTrack::default();
        t.accept(3);
        assert_eq!(t.gaps, 3);
    }

    #[test]
    fn last_seq_round_trips_through_publish() {
        let k = Takeovers::default();
        assert_eq!(k.last_seq(2), None);
        k.publish(2, Some(0), 1, 0);
        assert_eq!((k.last_seq(2), k.duplicates(2)), (Some(0), 1));
        k.hold(2);
        assert!(k.held(2));
        k.release(2);
        assert!(!k.held(2));
    }
}
