//! The writing end of the bus (the sequencer).

use std::sync::Arc;

use super::layout::{self, init_region, Mapped, Policy, SLOT_ATTACHED};
use super::monitor::{release_slot, slot_stats, SlotStats};
use crate::frame::{flags, FrameHeader, Kind, Seq, FRAME_HEADER_LEN};
use crate::ring::claim::{self, TooLarge};
use crate::segment::{self, OpenError, Region};
use crate::sync::{fence, Ordering};
use crate::wait::{Deadline, WaitStrategy};

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
    policy: Policy,
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
        let (m, policy) = layout::open(region, epoch)?;
        let tail = m.ctrl().tail.load(Ordering::Acquire);
        Ok(BusWriter {
            m,
            policy,
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
        self.policy
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.m.ring.cap() as usize
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
        // The wrap and size rules are the ring's (`ring::claim`): at most half the bus, so
        // that a frame fits after padding at any offset.
        let ring = self.m.ring;
        let at = ring.place(self.tail, payload.len())?;
        match self.policy {
            Policy::Block => {
                if self.tail + at.need() - self.gate > ring.cap() {
                    self.gate = self.min_cursor().unwrap_or(self.tail);
                    if self.tail + at.need() - self.gate > ring.cap() {
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
                    .store(self.tail + at.need(), Ordering::Relaxed);
                fence(Ordering::Release);
            }
        }
        // SAFETY: `at` was placed at `tail`; the bytes to the wrap are free (block) or
        // announced in `claim` (overwrite), and unpublished.
        self.tail = unsafe { ring.pad_to_frame(self.tail, at) };
        let mut h = *header;
        h.len = payload.len() as u32;
        h.bus_seq = self.next_seq;
        // SAFETY: `off + stride <= cap` (placed); the bytes are free or announced, and
        // unpublished.
        unsafe {
            let p = ring.at(ring.offset(self.tail));
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(FRAME_HEADER_LEN), payload.len());
            claim::seal(p, &h);
        }
        self.tail += at.stride;
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

impl From<TooLarge> for WriteError {
    #[inline]
    fn from(e: TooLarge) -> WriteError {
        WriteError::TooLarge {
            stride: e.stride,
            capacity: e.capacity,
        }
    }
}
