//! The SPSC source ring: one producer process writes frames, the sequencer is the only reader.
//!
//! Positions are monotonic byte counts (`u64`, never wrapping in practice); the ring offset of
//! position `p` is `p & (capacity - 1)`.
//!
//! ```text
//!   head (reader releases)        tail (producer publishes)
//!   v                             v
//! [ free | frames not yet consumed | free ... ]   tail - head <= capacity
//! ```
//!
//! Protocol:
//! - The producer writes frame bytes at `tail`, then publishes `tail` with a Release store —
//!   once per batch, not once per frame.
//! - The reader loads `tail` with Acquire, reads frames up to it, and publishes `head` with a
//!   Release store once it no longer needs the bytes.
//! - The producer reuses bytes only below `head + capacity`, with `head` loaded with Acquire.

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::event::Event;
use crate::frame::{
    self, flags, FrameError, FrameHeader, Kind, Seq, FRAME_ALIGN, FRAME_HEADER_LEN,
};
use crate::segment::{self, Geometry, OpenError, Region, SegmentKind};
use crate::sync::{AtomicU64, Ordering};
use crate::wait::{Deadline, WaitStrategy};

/// Smallest ring capacity in bytes.
pub const MIN_CAPACITY: usize = 256;

/// The control block of a source ring, in shared memory after the segment header.
#[repr(C)]
pub struct RingControl {
    /// Bytes published by the producer. Written only by the producer (Release), read by the
    /// sequencer (Acquire). Invariant: `head <= tail <= head + capacity`, a multiple of 16.
    tail: CachePadded<AtomicU64>,
    /// Bytes released by the sequencer. Written only by the sequencer (Release), read by the
    /// producer (Acquire).
    head: CachePadded<AtomicU64>,
}

impl RingControl {
    fn new() -> RingControl {
        RingControl {
            tail: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
        }
    }
}

/// The segment geometry of a ring with `capacity` data bytes.
pub fn geometry(capacity: usize) -> Geometry {
    Geometry::new(std::mem::size_of::<RingControl>(), capacity)
}

/// Total bytes of a ring segment with `capacity` data bytes.
pub fn region_len(capacity: usize) -> usize {
    geometry(capacity).total_len()
}

/// Checks a ring capacity: a power of two, at least [`MIN_CAPACITY`].
pub fn check_capacity(capacity: usize) -> Result<(), segment::CreateError> {
    if !capacity.is_power_of_two() || capacity < MIN_CAPACITY {
        return Err(segment::CreateError::BadCapacity {
            capacity,
            reason: "must be a power of two of at least 256 bytes",
        });
    }
    Ok(())
}

/// Initialises a fresh, zeroed region as a source ring and marks it initialised.
pub fn init_region(
    region: &dyn Region,
    capacity: usize,
    epoch: u64,
) -> Result<(), segment::CreateError> {
    check_capacity(capacity)?;
    let geo = geometry(capacity);
    assert!(
        region.len() >= geo.total_len(),
        "region too small for the ring"
    );
    // SAFETY: the region is large enough (asserted) and fresh, so nobody reads it yet.
    unsafe { segment::write_header(region, SegmentKind::SourceRing, epoch, geo) };
    // SAFETY: the control block sits at HEADER_LEN (128-aligned) inside the region; fresh.
    unsafe {
        (region.as_ptr().add(segment::HEADER_LEN) as *mut RingControl).write(RingControl::new())
    };
    segment::mark_initialized(region);
    Ok(())
}

/// Creates a source ring segment in `/dev/shm` at `path`.
pub fn create_shm(
    path: &std::path::Path,
    capacity: usize,
    epoch: u64,
) -> Result<segment::ShmRegion, segment::CreateError> {
    check_capacity(capacity)?;
    let region = segment::ShmRegion::create(path, region_len(capacity))?;
    init_region(&region, capacity, epoch)?;
    Ok(region)
}

/// The shared view of a mapped ring used by both ends.
struct Mapped {
    _region: Arc<dyn Region>,
    ctrl: *const RingControl,
    data: *mut u8,
    cap: u64,
    mask: u64,
}

impl Mapped {
    fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<Mapped, OpenError> {
        let geo = segment::validate_header(
            &*region,
            SegmentKind::SourceRing,
            epoch,
            std::mem::size_of::<RingControl>(),
        )?;
        if !geo.capacity.is_power_of_two() || geo.capacity < MIN_CAPACITY {
            return Err(OpenError::Corrupt("ring capacity is not a power of two"));
        }
        let base = region.as_ptr();
        Ok(Mapped {
            // SAFETY: validate_header checked that the region holds header, control block and
            // data; the offsets are inside it.
            ctrl: unsafe { base.add(segment::HEADER_LEN) } as *const RingControl,
            // SAFETY: as above.
            data: unsafe { base.add(geo.data_offset) },
            cap: geo.capacity as u64,
            mask: geo.capacity as u64 - 1,
            _region: region,
        })
    }

    #[inline]
    fn ctrl(&self) -> &RingControl {
        // SAFETY: `ctrl` points into `region`, which we keep alive; the block was initialised
        // before the segment was marked ready.
        unsafe { &*self.ctrl }
    }
}

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
    pub fn commit(self, mut header: FrameHeader) -> Seq {
        debug_assert!(header.len as usize <= self.max_len);
        let p = self.producer;
        header.source_id = p.source_id;
        header.source_seq = p.next_seq;
        if p.stamp {
            header.publish_ns = frame::monotonic_ns();
        }
        // SAFETY: `ptr` is 16-aligned, inside the claimed region, and unpublished.
        unsafe { frame::write_header(self.ptr, &header) };
        let len = header.len as usize;
        if len <= self.max_len {
            // Zero the alignment padding after the payload, as the frame format promises: the
            // bytes still hold whatever an earlier lap left there. Regression test:
            // `regression_alignment_padding_is_zeroed`.
            // SAFETY: `48 + len .. stride(len)` lies inside the claim (`len <= max_len`).
            unsafe {
                self.ptr
                    .add(FRAME_HEADER_LEN + len)
                    .write_bytes(0, frame::stride(len) - FRAME_HEADER_LEN - len)
            };
        }
        p.tail += frame::stride(header.len as usize) as u64;
        p.next_seq += 1;
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
        self.m.cap as usize
    }

    /// The sequence number the next frame will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Publishes every committed frame with one Release store.
    #[inline]
    pub fn flush(&mut self) {
        if self.published != self.tail {
            // Release: pairs with the Acquire load of `tail` in `RingReader::refresh`; the
            // frame bytes written before are visible before the cursor.
            self.m.ctrl().tail.store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
        self.pending = 0;
    }

    /// Claims room for a frame with a payload of up to `max_len` bytes. On `Err(Full)` the ring
    /// is full (the pending batch has been flushed so the reader can make room).
    pub fn try_claim(&mut self, max_len: usize) -> Result<Claim<'_>, ClaimError> {
        let stride = frame::stride(max_len) as u64;
        // A frame may take at most half the ring: then it fits after the padding at any offset
        // (padding < stride, so padding + stride <= cap). A larger frame could wait forever on
        // an empty ring whose free space is split by the wrap.
        if stride > self.m.cap / 2 || max_len > frame::MAX_PAYLOAD_LEN {
            return Err(ClaimError::TooLarge {
                stride: stride as usize,
                capacity: self.m.cap as usize,
            });
        }
        let off = self.tail & self.m.mask;
        let contiguous = self.m.cap - off;
        let need = if stride <= contiguous {
            stride
        } else {
            contiguous + stride
        };
        if !self.has_room(need) {
            self.flush();
            return Err(ClaimError::Full);
        }
        if stride > contiguous {
            if !frame::skip_to_wrap(contiguous as usize) {
                // SAFETY: `off` is inside the ring and 16-aligned; the bytes up to the end are
                // free (checked above) and unpublished.
                unsafe {
                    frame::write_header(
                        self.m.data.add(off as usize),
                        &FrameHeader::padding(contiguous as usize),
                    )
                };
            }
            self.tail += contiguous;
        }
        let off = (self.tail & self.m.mask) as usize;
        Ok(Claim {
            // SAFETY: `off + stride <= cap`, so the claim lies inside the data area.
            ptr: unsafe { self.m.data.add(off) },
            max_len,
            producer: self,
        })
    }

    /// Whether `n` bytes from `tail` are free, reloading the reader's head if they look taken.
    #[inline]
    fn has_room(&mut self, n: u64) -> bool {
        if self.tail + n - self.cached_head > self.m.cap {
            // Acquire: pairs with the Release store of `head` in `RingReader::release`; the
            // reader is done with the bytes below `head` before we overwrite them.
            self.cached_head = self.m.ctrl().head.load(Ordering::Acquire);
            if self.tail + n - self.cached_head > self.m.cap {
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
    /// passes.
    pub fn push<E: Event>(
        &mut self,
        ts: u64,
        topic_id: u32,
        mut event: E,
        wait: &mut impl WaitStrategy,
        deadline: Deadline,
    ) -> Result<Seq, PushError<E>> {
        loop {
            match self.try_push(ts, topic_id, event) {
                Err(PushError::Full(e)) => {
                    if deadline.expired() {
                        return Err(PushError::Timeout(e));
                    }
                    event = e;
                    wait.wait();
                }
                other => {
                    wait.reset();
                    return other;
                }
            }
        }
    }

    /// Copies a ready-made frame (header + payload) into the ring: the relay and journal path.
    /// `source_id`, `source_seq` and `publish_ns` are overwritten as in [`Claim::commit`].
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
        loop {
            match self.try_push_frame(&header, &[]) {
                Ok(_) => {
                    self.flush();
                    return Ok(());
                }
                Err(ClaimError::Full) if !deadline.expired() => wait.wait(),
                Err(ClaimError::Full) => return Err(PushError::Timeout(())),
                Err(ClaimError::TooLarge { .. }) => unreachable!("a control frame fits any ring"),
            }
        }
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

/// A frame read in place from a ring.
#[derive(Clone, Copy, Debug)]
pub struct FrameRef<'a> {
    /// A copy of the validated header.
    pub header: FrameHeader,
    /// The payload, in ring memory.
    pub payload: &'a [u8],
}

impl FrameRef<'_> {
    /// The frame's kind (headers handed out are validated, so this never fails).
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.header.kind).unwrap_or(Kind::Control)
    }
}

/// The reading end of a source ring (the sequencer). Treats everything in the ring as
/// untrusted: every cursor and header is checked before use.
pub struct RingReader {
    m: Mapped,
    /// Local read position. Invariant: `released <= head <= cached_tail`.
    head: u64,
    /// Last value stored to `ctrl.head`.
    released: u64,
    /// The producer's tail as last loaded; may be stale (smaller), never larger.
    cached_tail: u64,
    /// The frame under the read position, once validated: (header, offset, stride).
    peeked: Option<(FrameHeader, usize, u64)>,
}

// SAFETY: the reader is the only writer of `head`; moving it moves that role.
unsafe impl Send for RingReader {}

impl RingReader {
    /// Opens the reading end of an initialised ring.
    pub fn open(region: Arc<dyn Region>, epoch: Option<u64>) -> Result<RingReader, OpenError> {
        let m = Mapped::open(region, epoch)?;
        let head = m.ctrl().head.load(Ordering::Acquire);
        // The head sits in memory the producer can write: a misaligned one would make `peek`
        // read a header through a misaligned pointer. Regression test:
        // `regression_reader_open_refuses_misaligned_head`.
        if !head.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(OpenError::Corrupt("ring head is not 16-byte aligned"));
        }
        Ok(RingReader {
            m,
            head,
            released: head,
            cached_tail: head,
            peeked: None,
        })
    }

    /// Loads the producer's tail and checks it.
    fn refresh(&mut self) -> Result<(), FrameError> {
        // Acquire: pairs with the Release store of `tail` in `Producer::flush`; the frames
        // below `tail` are fully written before we read them.
        let t = self.m.ctrl().tail.load(Ordering::Acquire);
        if t < self.head {
            return Err(FrameError::BadCursor("tail moved backwards"));
        }
        if t - self.head > self.m.cap {
            return Err(FrameError::BadCursor("tail is more than a ring ahead"));
        }
        if !t.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(FrameError::BadCursor("tail is not 16-byte aligned"));
        }
        self.cached_tail = t;
        Ok(())
    }

    /// Returns the next frame without consuming it, or `None` when the ring is empty (after
    /// releasing every consumed byte). Padding is skipped. A malformed cursor or header is an
    /// error: the ring is then unusable.
    pub fn peek(&mut self) -> Result<Option<FrameRef<'_>>, FrameError> {
        if self.peeked.is_none() && !self.peek_inner()? {
            return Ok(None);
        }
        let (header, off, _) = self.peeked.expect("peeked");
        // SAFETY: the frame at `off` was validated to lie inside the published part of the
        // ring, which the producer does not touch until we release it.
        let payload = unsafe {
            std::slice::from_raw_parts(self.m.data.add(off + FRAME_HEADER_LEN), header.len as usize)
        };
        Ok(Some(FrameRef { header, payload }))
    }

    /// The header of the next frame, if any (cheap once peeked).
    pub fn peek_header(&mut self) -> Result<Option<FrameHeader>, FrameError> {
        if self.peeked.is_none() && !self.peek_inner()? {
            return Ok(None);
        }
        Ok(self.peeked.map(|p| p.0))
    }

    /// Finds the first frame at or after position `pos` (skipping padding) in the published
    /// data, validated. Returns the position reached (the frame's, or the end of the
    /// published data after skipping padding) and the frame's header and stride, if any.
    fn locate(&mut self, mut pos: u64) -> Result<(u64, Option<(FrameHeader, u64)>), FrameError> {
        loop {
            if pos == self.cached_tail {
                self.refresh()?;
                if pos == self.cached_tail {
                    return Ok((pos, None));
                }
            }
            let off = (pos & self.m.mask) as usize;
            let contiguous = self.m.cap as usize - off;
            let published = (self.cached_tail - pos) as usize;
            if frame::skip_to_wrap(contiguous) {
                if published < contiguous {
                    return Err(FrameError::BadCursor("tail inside the implicit padding"));
                }
                pos += contiguous as u64;
                continue;
            }
            if published < FRAME_HEADER_LEN {
                return Err(FrameError::BadCursor("tail inside a frame header"));
            }
            // SAFETY: `off + FRAME_HEADER_LEN <= cap` (not skip_to_wrap) and the header bytes
            // are published; `off` is 16-aligned.
            let h = unsafe { frame::read_header(self.m.data.add(off)) };
            if h.has(flags::PADDING) && h.kind == Kind::Control as u8 {
                if h.stride() != contiguous || published < contiguous {
                    return Err(FrameError::BadLength {
                        stride: h.stride(),
                        available: contiguous,
                    });
                }
                pos += contiguous as u64;
                continue;
            }
            let stride = h.validate(contiguous.min(published))?;
            return Ok((pos, Some((h, stride as u64))));
        }
    }

    fn peek_inner(&mut self) -> Result<bool, FrameError> {
        let (pos, found) = self.locate(self.head)?;
        self.head = pos;
        match found {
            None => {
                // Drained: hand back everything consumed (control frames, skipped padding).
                // A caller that releases only after it moved frames (the sequencer) would
                // otherwise never release a ring that carries nothing but heartbeats, and its
                // producer would wait for room forever. No frame from an earlier peek can
                // still be borrowed here. Regression test:
                // `regression_drained_reader_releases_consumed_frames`.
                self.release();
                Ok(false)
            }
            Some((h, stride)) => {
                self.peeked = Some((h, (pos & self.m.mask) as usize, stride));
                Ok(true)
            }
        }
    }

    /// Looks ahead without consuming: the header of the first frame at or after position
    /// `pos` (which must be at or after the read position, on a frame boundary), and the
    /// position after it. `None` when `pos` is at the end of the published data. Used by the
    /// sequencer to see a whole run of equal timestamps before it orders it.
    pub fn header_at(&mut self, pos: u64) -> Result<Option<(FrameHeader, u64)>, FrameError> {
        // `pos` comes from the caller: check it like a cursor. A misaligned one made `locate`
        // read a header through a misaligned pointer, one past the published data underflowed
        // or read bytes the producer may be writing. Regression test:
        // `regression_header_at_refuses_bad_positions`.
        if pos < self.head || pos > self.cached_tail || !pos.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(FrameError::BadCursor(
                "look-ahead position outside the published data",
            ));
        }
        let (p, found) = self.locate(pos)?;
        Ok(found.map(|(h, stride)| (h, p + stride)))
    }

    /// The position right after the frame under the read position (once peeked).
    pub fn peeked_end(&self) -> Option<u64> {
        self.peeked.map(|(_, _, stride)| self.head + stride)
    }

    /// Consumes the frame returned by the last `peek`. Its bytes stay valid until
    /// [`RingReader::release`], or until a `peek` finds the ring drained (which releases).
    pub fn consume(&mut self) {
        if let Some((_, _, stride)) = self.peeked.take() {
            self.head += stride;
        }
    }

    /// Hands every consumed byte back to the producer with one Release store.
    #[inline]
    pub fn release(&mut self) {
        if self.released != self.head {
            // Release: pairs with the Acquire load of `head` in `Producer::try_claim`; our reads
            // of the frames below `head` happen before the producer overwrites them.
            self.m.ctrl().head.store(self.head, Ordering::Release);
            self.released = self.head;
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.m.cap as usize
    }

    /// Bytes published by the producer and not yet consumed (as last seen).
    pub fn backlog(&self) -> u64 {
        self.cached_tail - self.head
    }
}
