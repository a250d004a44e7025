//! The reading end of a source ring (the sequencer): every cursor and header is untrusted.

use std::sync::Arc;

use super::layout::Mapped;
use crate::doorbell::Doorbell;
use crate::frame::{FrameError, FrameHeader, Kind, FRAME_ALIGN, FRAME_HEADER_LEN};
use crate::ring::scan::Found;
use crate::segment::{OpenError, Region};
use crate::sync::Ordering;

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

    /// Whether the producer published past what this reader has seen (one Acquire load; the
    /// new tail is checked when it is read).
    pub fn has_news(&self) -> bool {
        // Acquire: pairs with the Release store of `tail` in `Producer::flush`.
        self.m.ctrl().tail.load(Ordering::Acquire) != self.cached_tail
    }

    /// Loads the producer's tail and checks it.
    fn refresh(&mut self) -> Result<(), FrameError> {
        // Acquire: pairs with the Release store of `tail` in `Producer::flush`; the frames
        // below `tail` are fully written before we read them.
        let t = self.m.ctrl().tail.load(Ordering::Acquire);
        if t < self.head {
            return Err(FrameError::BadCursor("tail moved backwards"));
        }
        if t - self.head > self.m.ring.cap() {
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
            std::slice::from_raw_parts(self.m.ring.at(off + FRAME_HEADER_LEN), header.len as usize)
        };
        Ok(Some(FrameRef { header, payload }))
    }

    /// The header of the frame under the read position, by reference, once peeked
    /// ([`RingReader::peek_header`] or [`RingReader::peek`]); `None` before.
    #[inline]
    pub fn peeked_header(&self) -> Option<&FrameHeader> {
        self.peeked.as_ref().map(|p| &p.0)
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
            let published = self.cached_tail - pos;
            // SAFETY: `published` bytes from `pos` are published, and the producer does not
            // touch them until we release them; `pos` is a frame boundary, 16-aligned.
            match unsafe { self.m.ring.scan(pos, published) } {
                Found::Padding { skip, header } => {
                    // Padding must reach the wrap exactly and be published in full.
                    if let Some(h) = header {
                        if h.stride() as u64 != skip || published < skip {
                            return Err(FrameError::BadLength {
                                stride: h.stride(),
                                available: skip as usize,
                            });
                        }
                    } else if published < skip {
                        return Err(FrameError::BadCursor("tail inside the implicit padding"));
                    }
                    pos += skip;
                }
                Found::Short => return Err(FrameError::BadCursor("tail inside a frame header")),
                Found::Frame {
                    header, contiguous, ..
                } => {
                    let stride = header.validate(contiguous.min(published as usize))?;
                    return Ok((pos, Some((header, stride as u64))));
                }
            }
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
                self.peeked = Some((h, self.m.ring.offset(pos), stride));
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
        self.m.ring.cap() as usize
    }

    /// Rings this ring's doorbell, as a publish by its producer would: wakes a sequencer
    /// parked on it. The daemon does so when it hands the ring's source to another ring (a
    /// failover), so that the sequencer takes the new one at once rather than after its park
    /// bound (it was 100 ms of every failover).
    pub fn wake(&self) {
        self.m.ctrl().bell.ring();
    }

    /// Bytes published by the producer and not yet consumed (as last seen).
    pub fn backlog(&self) -> u64 {
        self.cached_tail - self.head
    }
}

/// Sleeps until the producer of one of `readers` publishes, or `timeout` passes, unless one
/// already has ([`RingReader::has_news`]): the sequencer, when every source it waits for is
/// empty. The caller looks at its rings again afterwards either way.
pub fn park_any(readers: &[&RingReader], timeout: std::time::Duration) {
    let bells: Vec<&Doorbell> = readers.iter().map(|r| &*r.m.ctrl().bell).collect();
    Doorbell::park_any(&bells, || readers.iter().any(|r| r.has_news()), timeout);
}
