//! The reader's side of the frame rules: what lies at a position of the ring.
//!
//! At a frame boundary there is either padding to the wrap (implicit when the gap is too short
//! for a header, else a PADDING control frame), or a frame. Which checks a reader then applies
//! is its own business: the sequencer distrusts its producers, a bus consumer under the
//! overwrite policy may have read a torn header and must settle that first.

use super::layout::RingData;
use crate::frame::{self, flags, FrameHeader, Kind, FRAME_HEADER_LEN};

/// What a reader finds at a frame boundary.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Found {
    /// The rest of the lap is padding: `skip` bytes to the wrap. `header` is the PADDING
    /// frame's header (not checked against `skip`), or `None` for the implicit gap.
    Padding {
        /// Bytes to the wrap.
        skip: u64,
        /// The padding frame's header, if the gap holds one.
        header: Option<FrameHeader>,
    },
    /// A frame header (not validated) at data offset `off`, with `contiguous` bytes from
    /// there to the wrap.
    Frame {
        /// The header as read.
        header: FrameHeader,
        /// Its data offset.
        off: usize,
        /// Bytes from `off` to the wrap.
        contiguous: usize,
    },
    /// Fewer than a header's bytes are readable at the position (and it is not the implicit
    /// gap): nothing was read.
    Short,
}

impl RingData {
    /// Reads what lies at position `pos`, of which `readable` bytes may be read.
    ///
    /// # Safety
    /// The `readable.min(contiguous)` bytes at `pos` lie in memory the reader may read: the
    /// published part of the ring, or (the bus's overwrite policy) bytes whose copy the caller
    /// checks against the writer's seqlock before trusting it. `pos` is 16-aligned.
    #[inline]
    pub(crate) unsafe fn scan(&self, pos: u64, readable: u64) -> Found {
        let contiguous = self.contiguous(pos);
        if frame::skip_to_wrap(contiguous as usize) {
            return Found::Padding {
                skip: contiguous,
                header: None,
            };
        }
        if readable < FRAME_HEADER_LEN as u64 {
            return Found::Short;
        }
        let off = self.offset(pos);
        // SAFETY: `off + FRAME_HEADER_LEN <= cap` (not skip_to_wrap), the bytes are readable
        // (checked above and the caller's promise), and `off` is 16-aligned.
        let header = unsafe { frame::read_header(self.at(off)) };
        if is_padding(&header) {
            return Found::Padding {
                skip: contiguous,
                header: Some(header),
            };
        }
        Found::Frame {
            header,
            off,
            contiguous: contiguous as usize,
        }
    }
}

/// Whether `h` is a PADDING frame (a control frame with the PADDING flag).
#[inline]
fn is_padding(h: &FrameHeader) -> bool {
    h.kind == Kind::Control as u8 && h.has(flags::PADDING)
}
