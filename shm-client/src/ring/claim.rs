//! The writer's side of the frame rules: where the next frame goes, and the padding that
//! keeps a frame from straddling the wrap.
//!
//! A frame of `stride` bytes written at position `tail`:
//! - fits before the wrap (`stride <= contiguous`): it goes at `tail`;
//! - does not: the gap to the wrap is padding, and the frame goes at the start of the next
//!   lap. The padding is a PADDING frame when the gap can hold a header, and implicit (the
//!   reader skips it by the same rule, [`frame::skip_to_wrap`]) when it cannot.
//!
//! A frame may take at most half the ring: then it fits after the padding at any offset
//! (padding < stride, so padding + stride <= cap). A larger frame could wait forever on an
//! empty ring whose free space is split by the wrap.

use super::layout::RingData;
use crate::frame::{self, FrameHeader, FRAME_HEADER_LEN};

/// Where the next frame goes: `pad` bytes of padding to the wrap (0 when it fits), then the
/// frame's `stride` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Bytes of padding before the frame: 0, or every byte from the tail to the wrap.
    pub(crate) pad: u64,
    /// The frame's stride.
    pub(crate) stride: u64,
}

impl Placement {
    /// Bytes the writer needs free from its tail: the padding and the frame.
    #[inline]
    pub(crate) fn need(&self) -> u64 {
        self.pad + self.stride
    }
}

/// The frame cannot fit the ring however empty it is (more than half of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooLarge {
    /// Bytes the frame needs.
    pub(crate) stride: usize,
    /// The ring's capacity.
    pub(crate) capacity: usize,
}

impl RingData {
    /// Places a frame with a payload of `len` bytes at the writer's `tail`.
    #[inline]
    pub(crate) fn place(&self, tail: u64, len: usize) -> Result<Placement, TooLarge> {
        let stride = frame::stride(len) as u64;
        if stride > self.cap() / 2 {
            return Err(TooLarge {
                stride: stride as usize,
                capacity: self.cap() as usize,
            });
        }
        let contiguous = self.contiguous(tail);
        let pad = if stride <= contiguous { 0 } else { contiguous };
        Ok(Placement { pad, stride })
    }

    /// Writes the padding of `at` (if any) at `tail` and returns the frame's position
    /// (`tail + at.pad`).
    ///
    /// # Safety
    /// `at` came from [`RingData::place`] for this `tail`, and the bytes from `tail` to the
    /// wrap are the writer's to write: free, or announced to readers that may still copy them
    /// (the bus's overwrite seqlock), and unpublished.
    #[inline]
    pub(crate) unsafe fn pad_to_frame(&self, tail: u64, at: Placement) -> u64 {
        if at.pad != 0 && !frame::skip_to_wrap(at.pad as usize) {
            // SAFETY: `tail`'s offset is inside the data area and 16-aligned; the header
            // fits before the wrap (not skip_to_wrap), in bytes that are the writer's (the
            // caller's promise).
            unsafe {
                frame::write_header(
                    self.at(self.offset(tail)),
                    &FrameHeader::padding(at.pad as usize),
                )
            };
        }
        tail + at.pad
    }
}

/// Writes a frame's header at `ptr` and zeroes the alignment padding after its payload, as
/// the frame format promises (the bytes still hold an earlier lap's). Regression test:
/// `regression_alignment_padding_is_zeroed`.
///
/// # Safety
/// `ptr` is 16-aligned and `ptr .. ptr + stride(header.len)` lies inside the data area, in
/// bytes the writer owns and has not published.
#[inline]
pub(crate) unsafe fn seal(ptr: *mut u8, header: &FrameHeader) {
    let len = header.len as usize;
    let pad = frame::stride(len) - FRAME_HEADER_LEN - len;
    // SAFETY: the caller's promise: the whole frame is the writer's to write.
    unsafe {
        frame::write_header(ptr, header);
        if pad != 0 {
            // (Most events are a multiple of 16 bytes: no call to `memset` for nothing.)
            ptr.add(FRAME_HEADER_LEN + len).write_bytes(0, pad);
        }
    }
}
