//! The writing end of a source ring: claim, write, commit; one Release store per batch.

use super::layout::{init_region, Mapped};
use crate::event::Event;
use crate::frame::{self, flags, FrameHeader, Kind, Seq, FRAME_HEADER_LEN};
use crate::ring::claim::{self, TooLarge};
use crate::segment::{self, OpenError, Region};
use crate::sync::Ordering;
use crate::wait::{Deadline, WaitStrategy};
use std::sync::Arc;

/// Why a push failed. The event is handed back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError<T> {
    /// The ring has no room now (try again later).
    #[error("ring full")]
    Full(T),
    /// The deadline passed while the ring stayed full.
    #[error("timed out waiting for room in the ring")]
    Timeout(T),
    /// The frame can never fit: larger than the ring.
    #[error("frame of {stride} bytes cannot fit a ring of {capacity} bytes")]
    TooLarge {
        /// The value.
        value: T,
        /// Bytes the frame needs.
        stride: usize,
        /// The ring's capacity.
        capacity: usize,
    },
}

impl<T> PushError<T> {
    /// The value that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            PushError::Full(v) | PushError::Timeout(v) => v,
            PushError::TooLarge { value, .. } => value,
        }
    }
}

/// The writing end of a source ring. One per ring, in one process.
pub struct Producer {
    m: Mapped,
    /// Local write position. Invariant: `published <= tail <= cached_head + cap`.
    tail: u64,
    /// Last value stored to `ctrl.tail`.
    published: u64,
    /// The reader's `head` as last loaded. May be stale (smaller than the real head), which
    /// only makes the ring look fuller than it is; never larger.
    cached_head: u64,
    source_id: u16,
    next_seq: Seq,
    batch: u32,
    pending: u32,
    stamp: bool,
}

// SAFETY: the producer is the only writer of its ring's data and tail; moving it to another
// thread moves that role with it.
unsafe impl Send for Producer {}

/// Room claimed in the ring for one frame; write the payload, then [`Claim::commit`].
/// Dropping a claim without committing abandons it (nothing becomes visible).
pub struct Claim<'a> {
    producer: &'a mut Producer,
    ptr: *mut u8,
    max_len: usize,
}

impl Claim<'_> {
    /// The payload area (`max_len` bytes, 16-byte aligned), straight in ring memory.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr + FRAME_HEADER_LEN .. + max_len` lies in the claimed, unpublished part of
        // the ring, which only this producer touches until commit.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(FRAME_HEADER_LEN), self.max_len) }
    }

    /// Writes the frame header (its `len` must be `<= max_len`; `source_id`, `source_seq` and
    /// `publish_ns` are filled in) and makes the frame part of the current batch.
    ///
    /// # Panics
    /// If `header.len > max_len`: the frame would run past the claim, over bytes the reader may
    /// still be reading (this was a `debug_assert` only, and a release build overran the claim;
    /// `commit_longer_than_the_claim_panics`).
    pub fn commit(self, mut header: FrameHeader) -> Seq {
        assert!(
            header.len as usize <= self.max_len,
            "Claim::commit: a frame of {} bytes in a claim of {}",
            header.len,
            self.max_len
        );
        let p = self.producer;
        header.source_id = p.source_id;
        header.source_seq = p.next_seq;
        if p.stamp {
            header.publish_ns = frame::monotonic_ns();
        }
        // SAFETY: `ptr` is 16-aligned and `ptr .. ptr + stride(len)` lies inside the claim
        // (`len <= max_len`, asserted), which is unpublished and only this producer's.
        unsafe { claim::seal(self.ptr, &header) };
        p.tail += frame::stride(header.len as usize) as u64;
        // Control frames (heartbeats, EOF) carry the next event's seq without taking it: a
        // source's events are numbered 0, 1, 2, ... whatever its heartbeats, so two members of
        // a group replaying one input number every event alike (SPEC section 12: dedup by
        // source seq across a failover).
        if header.kind != crate::frame::Kind::Control as u8 {
            p.next_seq += 1;
        }
        p.pending += 1;
        if p.pending >= p.batch {
            p.flush();
        }
        header.source_seq
    }
}

impl Producer {
    /// Opens the producer end of an initialised ring. Resumes at the published tail.
    pub fn open(
        region: Arc<dyn Region>,
        epoch: Option<u64>,
        source_id: u16,
    ) -> Result<Producer, OpenError> {
        let m = Mapped::open(region, epoch)?;
        // Acquire: pairs with the Release stores of a previous producer (none in practice).
        let tail = m.ctrl().tail.load(Ordering::Acquire);
        let head = m.ctrl().head.load(Ordering::Acquire);
        // Not trusted (issue 9, item 7): `head <= tail <= head + cap`, both frame boundaries.
        // A head above the tail used to underflow `has_room`.
        if head > tail {
            return Err(OpenError::Corrupt("ring head is past its tail"));
        }
        if tail - head > m.ring.cap() {
            return Err(OpenError::Corrupt(
                "ring tail is more than a ring past its head",
            ));
        }
        if (head | tail) % crate::frame::FRAME_ALIGN as u64 != 0 {
            return Err(OpenError::Corrupt("ring cursors are not 16-byte aligned"));
        }
        Ok(Producer {
            m,
            tail,
            published: tail,
            cached_head: head,
            source_id,
            next_seq: 0,
            batch: 1,
            pending: 0,
            stamp: true,
        })
    }

    /// Initialises `region` as a ring and opens its producer end (tests, in-process use).
    pub fn create(
        region: Arc<dyn Region>,
        capacity: usize,
        epoch: u64,
        source_id: u16,
    ) -> Result<Producer, segment::CreateError> {
        init_region(&*region, capacity, epoch)?;
        Ok(Producer::open(region, Some(epoch), source_id).expect("just initialised"))
    }

    /// Publish the tail once every `n` frames (1 = every frame, the lowest latency). Frames of
    /// an unfinished batch become visible on [`Producer::flush`] or when the ring fills.
    pub fn set_batch(&mut self, n: u32) {
        self.batch = n.max(1);
    }

    /// Whether to stamp `publish_ns` (a monotonic clock read per frame) for latency figures.
    pub fn set_stamp(&mut self, on: bool) {
        self.stamp = on;
    }

    /// Capacity of the ring in bytes.
    pub fn capacity(&self) -> usize {
        self.m.ring.cap() as usize
    }

    /// The sequence number the next event frame will get (control frames take none).
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Numbers the next event `seq` and the following ones on from it: a producer that
    /// resumes a source after a failover or a restart (`resume_after + 1`), so that its
    /// events keep the seqs the session knows them by.
    pub fn set_next_seq(&mut self, seq: Seq) {
        self.next_seq = seq;
    }

    /// Publishes every committed frame with one Release store.
    #[inline]
    pub fn flush(&mut self) {
        if self.published != self.tail {
            // Release: pairs with the Acquire load of `tail` in `RingReader::refresh`; the
            // frame bytes written before are visible before the cursor.
            self.m.ctrl().tail.store(self.tail, Ordering::Release);
            self.published = self.tail;
            // After the publish: wakes the sequencer if it parked on this ring.
            self.m.ctrl().bell.ring();
        }
        self.pending = 0;
    }

    /// Claims room for a frame with a payload of up to `max_len` bytes. On `Err(Full)` the ring
    /// is full (the pending batch has been flushed so the reader can make room).
    pub fn try_claim(&mut self, max_len: usize) -> Result<Claim<'_>, ClaimError> {
        // The wrap and size rules are the ring's (`ring::claim`); a source frame must also
        // keep within the frame format's payload limit.
        let at = self.m.ring.place(self.tail, max_len)?;
        if max_len > frame::MAX_PAYLOAD_LEN {
            return Err(ClaimError::TooLarge {
                stride: at.stride as usize,
                capacity: self.m.ring.cap() as usize,
            });
        }
        if !self.has_room(at.need()) {
            self.flush();
            return Err(ClaimError::Full);
        }
        // SAFETY: `at` was placed at `tail`; the bytes up to the wrap are free (checked
        // above) and unpublished.
        self.tail = unsafe { self.m.ring.pad_to_frame(self.tail, at) };
        let off = self.m.ring.offset(self.tail);
        Ok(Claim {
            // SAFETY: `off + stride <= cap`, so the claim lies inside the data area.
            ptr: unsafe { self.m.ring.at(off) },
            max_len,
            producer: self,
        })
    }

    /// Whether `n` bytes from `tail` are free, reloading the reader's head if they look taken.
    #[inline]
    fn has_room(&mut self, n: u64) -> bool {
        if self.tail + n - self.cached_head > self.m.ring.cap() {
            // Acquire: pairs with the Release store of `head` in `RingReader::release`; the
            // reader is done with the bytes below `head` before we overwrite them.
            let head = self.m.ctrl().head.load(Ordering::Acquire);
            // Not trusted: a head that went back or past our tail counts as no room (the push
            // times out with an error), never as an underflow. Invariant kept:
            // `cached_head <= tail`.
            if head < self.cached_head || head > self.tail {
                return false;
            }
            self.cached_head = head;
            if self.tail + n - self.cached_head > self.m.ring.cap() {
                return false;
            }
        }
        true
    }

    /// Serialises `event` with rkyv straight into ring memory and commits it. On a full ring
    /// the event is handed back in [`PushError::Full`].
    #[inline]
    pub fn try_push<E: Event>(
        &mut self,
        ts: u64,
        topic_id: u32,
        event: E,
    ) -> Result<Seq, PushError<E>> {
        let len = E::ARCHIVED_LEN;
        let mut claim = match self.try_claim(len) {
            Ok(c) => c,
            Err(ClaimError::Full) => return Err(PushError::Full(event)),
            Err(ClaimError::TooLarge { stride, capacity }) => {
                return Err(PushError::TooLarge {
                    value: event,
                    stride,
                    capacity,
                })
            }
        };
        let n = crate::event::encode_into(&event, claim.payload_mut())
            .expect("the archive of a fixed-size event fits its claimed size");
        debug_assert_eq!(n, len);
        Ok(claim.commit(FrameHeader::event(E::KIND, ts, topic_id, n)))
    }

    /// Like [`Producer::try_push`], but waits with `wait` until room appears or `deadline`
    /// passes ([`PushError::Timeout`] hands the event back).
    pub fn push<E: Event>(
        &mut self,
        ts: u64,
        topic_id: u32,
        event: E,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, PushError<E>> {
        self.retry(event, wait, deadline, |p, e| p.try_push(ts, topic_id, e))
    }

    /// Copies a ready-made frame (header + payload) into the ring: the relay and journal path.
    /// `source_id`, `source_seq` and `publish_ns` are overwritten as in [`Claim::commit`].
    /// Returns the frame's source sequence; `Err(Full)` if there is no room now.
    pub fn try_push_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<Seq, ClaimError> {
        let mut claim = self.try_claim(payload.len())?;
        claim.payload_mut().copy_from_slice(payload);
        let mut h = *header;
        h.len = payload.len() as u32;
        Ok(claim.commit(h))
    }

    /// Like [`Producer::try_push_frame`], but waits with `wait` until room appears or
    /// `deadline` passes. Fails with [`PushError::Timeout`] or [`PushError::TooLarge`] (the
    /// frame is borrowed, so there is nothing to hand back).
    #[inline]
    pub fn push_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, PushError<()>> {
        self.retry((), wait, deadline, |p, ()| {
            p.try_push_frame(header, payload).map_err(|e| match e {
                ClaimError::Full => PushError::Full(()),
                ClaimError::TooLarge { stride, capacity } => PushError::TooLarge {
                    value: (),
                    stride,
                    capacity,
                },
            })
        })
    }

    /// The one waiting loop of every blocking push: tries `attempt` until it does not fail
    /// with [`PushError::Full`], waiting with `wait` in between, or until `deadline` passes
    /// (then [`PushError::Timeout`] hands the value back). The first attempt reads no clock.
    #[inline]
    fn retry<T, R>(
        &mut self,
        mut value: T,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
        mut attempt: impl FnMut(&mut Producer, T) -> Result<R, PushError<T>>,
    ) -> Result<R, PushError<T>> {
        loop {
            match attempt(self, value) {
                Err(PushError::Full(v)) => {
                    if deadline.expired() {
                        return Err(PushError::Timeout(v));
                    }
                    value = v;
                    wait.wait();
                }
                other => {
                    wait.reset();
                    return other;
                }
            }
        }
    }

    /// Pushes a control frame (EOF or HEARTBEAT) and flushes, waiting for room.
    fn push_control(
        &mut self,
        ts: u64,
        flag: u8,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<(), PushError<()>> {
        let header = FrameHeader {
            kind: Kind::Control as u8,
            flags: flag,
            ts,
            ..FrameHeader::default()
        };
        self.push_frame(&header, &[], wait, deadline)?;
        self.flush();
        Ok(())
    }

    /// Advances the watermark: a promise that nothing older than `ts` will follow (live mode).
    pub fn heartbeat(
        &mut self,
        ts: u64,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<(), PushError<()>> {
        self.push_control(ts, flags::HEARTBEAT, wait, deadline)
    }

    /// Ends the stream: writes the EOF frame and flushes.
    pub fn finish(
        &mut self,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<(), PushError<()>> {
        self.push_control(u64::MAX, flags::EOF, wait, deadline)
    }
}

/// Why a claim failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No room now.
    #[error("ring full")]
    Full,
    /// Never any room: the frame is larger than the ring.
    #[error("frame of {stride} bytes cannot fit a ring of {capacity} bytes")]
    TooLarge {
        /// Bytes needed.
        stride: usize,
        /// Ring capacity.
        capacity: usize,
    },
}

impl From<TooLarge> for ClaimError {
    #[inline]
    fn from(e: TooLarge) -> ClaimError {
        ClaimError::TooLarge {
            stride: e.stride,
            capacity: e.capacity,
        }
    }
}
