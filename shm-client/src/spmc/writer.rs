//! The writing end of the bus (the sequencer).

use std::sync::Arc;

use super::layout::{self, cursor_of, init_region, is_attached, Mapped, Policy};
use super::monitor::{release_slot, slot_stats, SlotStats};
use crate::frame::{self, flags, FrameHeader, Kind, Seq, FRAME_HEADER_LEN, MAX_PAYLOAD_LEN};
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
    /// The frame is larger than half the bus, or its payload than [`MAX_PAYLOAD_LEN`].
    #[error("frame of {stride} bytes cannot fit a bus of {capacity} bytes")]
    TooLarge {
        /// Bytes needed.
        stride: usize,
        /// Bus capacity.
        capacity: usize,
    },
}

/// How far ahead of its tail the writer fetches the line it will write (see
/// `RingData::prefetch_write`): one line per frame, about ten frames ahead.
const PREFETCH_AHEAD: u64 = 1024;

/// The writing end of the bus (the sequencer). One per bus.
pub struct BusWriter {
    m: Mapped,
    policy: Policy,
    /// Local write position; `published <= tail`, and (overwrite policy) `tail - published <
    /// cap`: the writer never laps its own unpublished frames.
    tail: u64,
    /// Last value stored to `ctrl.published.tail`.
    published: u64,
    /// Block policy: the slowest attached consumer's cursor as last computed, `gate <=
    /// published`. May be stale (smaller than the truth), which only makes the bus look fuller.
    gate: u64,
    next_seq: Seq,
    /// The (even) seqlock version of the last publish.
    version: u64,
    /// Position of the END-OF-STREAM frame once written: nothing may be written after it.
    eof_at: Option<u64>,
    /// Whether `eof_at` has been stored in the control block.
    eof_published: bool,
}

// SAFETY: the writer is the only writer of the bus data and tail; moving it moves the role.
unsafe impl Send for BusWriter {}

impl BusWriter {
    /// Opens the writing end of an initialised bus.
    pub fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<BusWriter, OpenError> {
        let (m, policy) = layout::open(region, epoch)?;
        let p = &m.ctrl().published;
        // Only a writer stores these words; a previous writer may have died inside `publish`
        // (odd version): end its publish, so that attaching consumers do not wait for it.
        let version = p.version.load(Ordering::Relaxed);
        let version = version + (version & 1);
        p.version.store(version, Ordering::Release);
        let tail = p.tail.load(Ordering::Acquire);
        let next_seq = p.seq.load(Ordering::Relaxed);
        Ok(BusWriter {
            m,
            policy,
            tail,
            published: tail,
            gate: tail,
            next_seq,
            version,
            eof_at: None,
            eof_published: false,
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

    /// The slowest attached consumer's cursor (never above the published tail), or `None` if
    /// no consumer is attached. A slot whose new occupant has not stored its starting cursor
    /// yet counts as 0: the writer holds until it has.
    pub fn min_cursor(&self) -> Option<u64> {
        // SeqCst fence: pairs with the SeqCst fence in `BusReader::attach` (a Dekker pair):
        // either we see the new slot as attached, or the consumer sees a tail at least as new
        // as every tail we published before this scan, and starts there.
        fence(Ordering::SeqCst);
        let mut min = None::<u64>;
        for slot in self.m.ctrl().slots.iter() {
            // Acquire: pairs with the AcqRel CAS that attaches in `BusReader::attach`.
            let owner = slot.owner.load(Ordering::Acquire);
            if is_attached(owner) {
                // Acquire: pairs with the Release CAS of `cursor` in
                // `BusReader::publish_cursor`; the consumer's reads of the bytes below the
                // cursor are done before we overwrite them. A cursor is not trusted: one
                // above the published tail counts as the tail (issue 9, item 7).
                let c = cursor_of(slot.cursor.load(Ordering::Acquire), owner)
                    .map_or(0, |c| c.min(self.published));
                min = Some(min.map_or(c, |m| m.min(c)));
            }
        }
        // Release fence: pairs with the Acquire fence in `BusReader::check_header` (the
        // eviction check). Every byte we write after this scan is written after it; a
        // consumer whose header read returns such a byte then sees, in its slot's owner word,
        // the release this scan saw (or a later value), never its own generation: a
        // released consumer never takes a later lap's bytes for its frame.
        fence(Ordering::Release);
        min
    }

    /// Number of attached consumers.
    pub fn consumers(&self) -> usize {
        self.m
            .ctrl()
            .slots
            .iter()
            .filter(|s| is_attached(s.owner.load(Ordering::Acquire)))
            .count()
    }

    /// Copies a frame into the bus and assigns it the next bus sequence. The frame becomes
    /// visible on [`BusWriter::publish`] (the overwrite policy also publishes by itself once
    /// half a ring is unpublished). `Err(Full)` only under the block policy.
    ///
    /// # Panics
    /// After the END-OF-STREAM frame: nothing is written after it (a consumer lapped over
    /// the end relies on it staying in place).
    #[inline(always)]
    pub fn try_write(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Seq, WriteError> {
        assert!(
            self.eof_at.is_none(),
            "nothing may be written to the bus after END-OF-STREAM"
        );
        let ring = self.m.ring;
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(WriteError::TooLarge {
                stride: frame::stride(payload.len()),
                capacity: ring.cap() as usize,
            });
        }
        // The wrap and size rules are the ring's (`ring::claim`): at most half the bus, so
        // that a frame fits after padding at any offset.
        let at = ring.place(self.tail, payload.len())?;
        match self.policy {
            Policy::Block => {
                if self.tail + at.need() - self.gate > ring.cap() {
                    let mut gate = self.min_cursor();
                    if gate.is_none() && self.published != self.tail {
                        // No consumer: publish and scan again, so that one attaching now
                        // starts at our tail. Gating on the unpublished tail would let us
                        // overwrite frames a consumer starting at the published one will read
                        // (issue 9, item 6; `bus_block_without_consumers_gates_on_the_published_tail`).
                        self.publish();
                        gate = self.min_cursor();
                    }
                    self.gate = gate.unwrap_or(self.published);
                    if self.tail + at.need() - self.gate > ring.cap() {
                        self.publish();
                        return Err(WriteError::Full);
                    }
                }
            }
            Policy::Overwrite => {
                // Publish at half a ring: the unpublished frames plus this one stay under a
                // ring, so the writer never laps its own unpublished batch (a consumer would
                // find the published tail overwritten and be lapped again and again;
                // `bus_overwrite_long_batch_publishes_at_half_a_ring`).
                if self.tail - self.published >= ring.cap() / 2 {
                    self.publish();
                }
                // Seqlock: announce the bytes we are about to overwrite before touching them.
                // The Release fence orders this store before the data writes below; pairs with
                // the Acquire fence in `BusReader::poll_overwrite`.
                self.m
                    .ctrl()
                    .published
                    .claim
                    .store(self.tail + at.need(), Ordering::Relaxed);
                fence(Ordering::Release);
            }
        }
        // SAFETY: `at` was placed at `tail`; the bytes to the wrap are free (block) or
        // announced in `claim` (overwrite), and unpublished.
        self.tail = unsafe { ring.pad_to_frame(self.tail, at) };
        // Field by field: the caller has just adjusted some of its fields.
        let mut h = header.copy_by_fields();
        h.len = payload.len() as u32;
        h.bus_seq = self.next_seq;
        // SAFETY: `off + stride <= cap` (placed); the bytes are free or announced, and
        // unpublished.
        unsafe {
            let p = ring.at(ring.offset(self.tail));
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(FRAME_HEADER_LEN), payload.len());
            claim::seal(p, &h);
        }
        if h.kind == Kind::Control as u8 && h.has(flags::EOF) {
            self.eof_at = Some(self.tail);
        }
        self.tail += at.stride;
        self.next_seq += 1;
        ring.prefetch_write(self.tail + PREFETCH_AHEAD);
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

    /// Publishes every written frame: the tail and the bus sequence that goes with it, under
    /// a seqlock (four stores to the tail's cache line, per batch), then the position of the
    /// END-OF-STREAM frame if it is among them.
    #[inline]
    pub fn publish(&mut self) {
        if self.published == self.tail {
            return;
        }
        if let (Some(eof), false) = (self.eof_at, self.eof_published) {
            // Before the tail: a consumer that lapped reads the tail (Acquire) and then this
            // word, so if its tail is past the EOF frame it sees where that frame is (the
            // Release store of the tail below orders this store before it). Stored after the
            // tail, a consumer could read the new tail, then no EOF, and jump past the frame:
            // loom found it (`bus_overwrite_lap_over_the_eof_sees_it`).
            let end = eof + frame::stride(0) as u64;
            self.m.ctrl().fixed.eof_end.store(end, Ordering::Relaxed);
            self.eof_published = true;
        }
        let p = &self.m.ctrl().published;
        p.version.store(self.version + 1, Ordering::Relaxed);
        // Release fence: orders the odd version before the new seq and tail; pairs with the
        // Acquire fence in `BusControl::tail_and_seq`, which then sees the odd version if it
        // read either new value.
        fence(Ordering::Release);
        p.seq.store(self.next_seq, Ordering::Relaxed);
        // Release: pairs with the Acquire load of `tail` in `BusReader`; the frames (and the
        // EOF position) are written before they are visible.
        p.tail.store(self.tail, Ordering::Release);
        // Release: pairs with the Acquire load of the version in `BusControl::tail_and_seq`.
        p.version.store(self.version + 2, Ordering::Release);
        self.version += 2;
        self.published = self.tail;
        // After the publish: wakes the consumers that parked.
        self.m.ctrl().bell.ring();
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
        release_slot(self.m.ctrl(), i, None);
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
