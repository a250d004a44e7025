//! The frame: one format for source rings, the bus and journal files.
//!
//! ```text
//! | FrameHeader (48 bytes) | rkyv payload (len bytes) | zero padding to a multiple of 16 |
//! ```
//!
//! Frames start on 16-byte boundaries, so the payload (at +48) is 16-byte aligned and the rkyv
//! archive can be accessed in place. A frame never straddles the end of a ring: when the space
//! left before the end is too small, the writer fills it with a PADDING frame, or leaves it
//! implicit when fewer than [`FRAME_HEADER_LEN`] bytes remain (both sides apply the same rule,
//! see [`skip_to_wrap`]).

/// Sequence numbers: a source's sequence and the bus sequence.
pub type Seq = u64;

/// Alignment of every frame, in bytes.
pub const FRAME_ALIGN: usize = 16;
/// Size of [`FrameHeader`].
pub const FRAME_HEADER_LEN: usize = 48;
/// Largest payload a frame may carry, whatever the ring size.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;

/// Frame flags (a bit set).
pub mod flags {
    /// End of stream: the source (or, on the bus, the whole session) has ended.
    pub const EOF: u8 = 1;
    /// Live mode: the event is older than one already emitted.
    pub const LATE: u8 = 2;
    /// A watermark: `ts` is a promise that the source will send nothing older.
    pub const HEARTBEAT: u8 = 4;
    /// Filler up to the end of the ring; skip it.
    pub const PADDING: u8 = 8;
    /// With EOF on the bus: the session failed; the stream is incomplete.
    pub const ABORT: u8 = 16;
    /// Recordings only: a control frame saying the recorder missed the frames with bus seqs
    /// `bus_seq .. bus_seq + source_seq` (see `crate::recording`). Not in [`KNOWN`]: a ring
    /// or bus frame carrying it is refused as any unknown flag is.
    pub const GAP: u8 = 32;
    /// Every flag this build knows on rings and the bus.
    pub const KNOWN: u8 = EOF | LATE | HEARTBEAT | PADDING | ABORT;
}

/// What a frame carries.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// No event: end of stream, heartbeat or padding (see the flags).
    Control = 0,
    /// A [`crate::event::Trade`].
    Trade = 1,
    /// A [`crate::event::Book`].
    Book = 2,
    /// A [`crate::event::Kline`].
    Kline = 3,
    /// A [`crate::event::Custom`]: an application event (a signal, an order, a fill).
    Custom = 4,
}

impl Kind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Control),
            1 => Some(Kind::Trade),
            2 => Some(Kind::Book),
            3 => Some(Kind::Kline),
            4 => Some(Kind::Custom),
            _ => None,
        }
    }

    /// Merge priority on equal timestamps: Trade (0) before Book (1) before Kline (2) before
    /// Custom (3). Control frames never take part in a merge; they share the last value, so
    /// that a priority always fits the merge key's two bits.
    pub fn priority(self) -> u8 {
        match self {
            Kind::Trade => 0,
            Kind::Book => 1,
            Kind::Kline => 2,
            Kind::Custom | Kind::Control => 3,
        }
    }

    /// The name used in NDJSON (`trade`, `book`, `kline`, `custom`, `control`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Control => "control",
            Kind::Trade => "trade",
            Kind::Book => "book",
            Kind::Kline => "kline",
            Kind::Custom => "custom",
        }
    }
}

/// The fixed header in front of every frame. Plain data: every bit pattern is a valid value,
/// which is why it may be read straight out of untrusted ring memory (then validated).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes (without header and padding).
    pub len: u32,
    /// A [`Kind`] as u8.
    pub kind: u8,
    /// A set of [`flags`].
    pub flags: u8,
    /// The source's id (its rank among the session's sorted source names).
    pub source_id: u16,
    /// The topic id, interned in the session's topic table.
    pub topic_id: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Event time, nanoseconds since the Unix epoch.
    pub ts: u64,
    /// The source's own sequence number, from 0.
    pub source_seq: Seq,
    /// The bus sequence number (0 outside the bus).
    pub bus_seq: Seq,
    /// Monotonic clock (ns) when the producer published the frame; for latency figures only.
    pub publish_ns: u64,
}

const _: () = assert!(std::mem::size_of::<FrameHeader>() == FRAME_HEADER_LEN);

/// Why a frame header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The kind byte is not a known [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A flag bit this build does not know.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    /// The frame would run past the end of the ring or past the published data.
    #[error("frame of {stride} bytes does not fit in the {available} bytes available")]
    BadLength {
        /// Bytes the frame claims (header + payload + padding).
        stride: usize,
        /// Bytes available.
        available: usize,
    },
    /// A control frame without a control flag, or an event frame with no payload.
    #[error("inconsistent frame: {0}")]
    Inconsistent(&'static str),
    /// The producer's cursor is outside the ring or misaligned.
    #[error("bad cursor: {0}")]
    BadCursor(&'static str),
}

/// Bytes a frame with a payload of `len` bytes occupies.
#[inline]
pub const fn stride(len: usize) -> usize {
    // Saturating, so that an absurd length (`try_claim(usize::MAX)`) is refused as too large
    // instead of overflowing. Regression test: `regression_try_claim_huge_len_is_too_large`.
    len.saturating_add(FRAME_HEADER_LEN + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// Whether a reader at ring offset `off` must skip straight to the wrap: fewer than a header's
/// bytes remain before the end (`contiguous` bytes), so the writer left them implicit.
#[inline]
pub const fn skip_to_wrap(contiguous: usize) -> bool {
    contiguous < FRAME_HEADER_LEN
}

impl FrameHeader {
    /// A header for an event frame.
    pub fn event(kind: Kind, ts: u64, topic_id: u32, len: usize) -> FrameHeader {
        FrameHeader {
            len: len as u32,
            kind: kind as u8,
            ts,
            topic_id,
            ..FrameHeader::default()
        }
    }

    /// A padding frame filling exactly `total` bytes (`total >= FRAME_HEADER_LEN`).
    pub fn padding(total: usize) -> FrameHeader {
        FrameHeader {
            len: (total - FRAME_HEADER_LEN) as u32,
            flags: flags::PADDING,
            ..FrameHeader::default()
        }
    }

    /// The frame's kind, if known.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u8(self.kind)
    }

    /// Bytes the frame occupies.
    pub fn stride(&self) -> usize {
        stride(self.len as usize)
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A copy made of one load per field, each as wide as its field.
    ///
    /// For a header some of whose fields were stored a moment ago (a peek slot being filled,
    /// a header being adjusted field by field): a plain copy is made of 16-byte loads, and a
    /// load wider than the store that wrote its bytes waits for that store to reach the cache
    /// (a store-forwarding stall, about 15 cycles). Three such stalls per event were the
    /// largest cost of the merge and of a counting consumer. The loads are volatile so that
    /// the compiler cannot merge them back into wide ones; the copy itself then lives in
    /// registers.
    #[inline(always)]
    pub fn copy_by_fields(&self) -> FrameHeader {
        // SAFETY: each pointer comes from a reference to a field of `self`: valid, aligned and
        // initialised.
        unsafe {
            use std::ptr::read_volatile as load;
            FrameHeader {
                len: load(&self.len),
                kind: load(&self.kind),
                flags: load(&self.flags),
                source_id: load(&self.source_id),
                topic_id: load(&self.topic_id),
                reserved: load(&self.reserved),
                ts: load(&self.ts),
                source_seq: load(&self.source_seq),
                bus_seq: load(&self.bus_seq),
                publish_ns: load(&self.publish_ns),
            }
        }
    }

    /// Checks everything that can be checked from the header alone, given that at most
    /// `available` contiguous bytes may belong to it. Returns the frame's stride.
    pub fn validate(&self, available: usize) -> Result<usize, FrameError> {
        let kind = self.kind().ok_or(FrameError::UnknownKind(self.kind))?;
        if self.flags & !flags::KNOWN != 0 {
            return Err(FrameError::UnknownFlags(self.flags));
        }
        let len = self.len as usize;
        if len > MAX_PAYLOAD_LEN || stride(len) > available {
            return Err(FrameError::BadLength {
                stride: stride(len.min(MAX_PAYLOAD_LEN + 1)),
                available,
            });
        }
        let control = self.has(flags::EOF | flags::HEARTBEAT | flags::PADDING);
        match kind {
            Kind::Control if !control => {
                Err(FrameError::Inconsistent("control frame without flag"))
            }
            Kind::Control => Ok(stride(len)),
            _ if self.has(flags::PADDING) => Err(FrameError::Inconsistent("padding on an event")),
            _ if len == 0 => Err(FrameError::Inconsistent("event frame without payload")),
            _ => Ok(stride(len)),
        }
    }

    /// The header as bytes (for journals and hashing).
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4] = self.kind;
        out[5] = self.flags;
        out[6..8].copy_from_slice(&self.source_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.topic_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.reserved.to_le_bytes());
        out[16..24].copy_from_slice(&self.ts.to_le_bytes());
        out[24..32].copy_from_slice(&self.source_seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.bus_seq.to_le_bytes());
        out[40..48].copy_from_slice(&self.publish_ns.to_le_bytes());
        out
    }

    /// Parses a header from bytes (the inverse of [`FrameHeader::to_bytes`]).
    #[inline]
    pub fn from_bytes(b: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: `FrameHeader` is `repr(C)`, `FRAME_HEADER_LEN` bytes with no padding
            // (asserted above), made of integers only, so every bit pattern is a value; on a
            // little-endian target its memory layout is exactly the byte layout of `to_bytes`
            // (`header_round_trips_through_bytes`). One unaligned 48-byte load instead of ten
            // field reads: the daemon parses every journal frame with it.
            unsafe { std::ptr::read_unaligned(b.as_ptr() as *const FrameHeader) }
        }
        #[cfg(not(target_endian = "little"))]
        Self::from_bytes_portable(b)
    }

    /// [`FrameHeader::from_bytes`] field by field, for any byte order.
    #[cfg_attr(target_endian = "little", allow(dead_code))]
    fn from_bytes_portable(b: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        FrameHeader {
            len: u32_at(0),
            kind: b[4],
            flags: b[5],
            source_id: u16::from_le_bytes([b[6], b[7]]),
            topic_id: u32_at(8),
            reserved: u32_at(12),
            ts: u64_at(16),
            source_seq: u64_at(24),
            bus_seq: u64_at(32),
            publish_ns: u64_at(40),
        }
    }
}

/// Reads a header out of ring memory.
///
/// # Safety
/// `ptr` must be valid for reads of [`FRAME_HEADER_LEN`] bytes and 8-byte aligned.
///
/// The bytes may be written concurrently by another process (a misbehaving producer, the bus
/// writer lapping a consumer): they are read as volatile 8-byte words ([`copy_racy`]), never
/// as plain memory, and the result is validated (or, on the bus, checked against a seqlock)
/// before it is trusted.
#[inline]
pub(crate) unsafe fn read_header(ptr: *const u8) -> FrameHeader {
    const WORDS: usize = FRAME_HEADER_LEN / 8;
    let mut w = [0u64; WORDS];
    // SAFETY: the caller's promise: `FRAME_HEADER_LEN` readable bytes, 8-byte aligned.
    unsafe { copy_racy(ptr, w.as_mut_ptr() as *mut u8, FRAME_HEADER_LEN) };
    // SAFETY: `w` holds FRAME_HEADER_LEN initialised bytes, 8-aligned (FrameHeader's
    // alignment); every bit pattern is a valid FrameHeader.
    unsafe { std::ptr::read(w.as_ptr() as *const FrameHeader) }
}

/// Copies `len` bytes (rounded up to whole 8-byte words) from memory another process may be
/// writing, as volatile aligned 8-byte reads: the compiler neither elides, merges, re-reads nor
/// splits them, so a racing write gives at worst a copy torn at word boundaries, which the
/// caller detects (seqlock, validation) before trusting it. This is the seqlock read of
/// crossbeam's `AtomicCell` and of the Linux kernel's `READ_ONCE`; in Rust's abstract machine a
/// volatile read racing a write is still a data race, as it is there.
///
/// Why not relaxed `AtomicU64` loads, which the abstract machine blesses: one run each in one
/// session gave `ring/hop/batch1` 34 ns with plain reads, 44 ns with volatile words and 159 ns
/// with relaxed atomic words. That bench is bimodal on the shared 2-core machine (the unchanged
/// code measured 35 ns and 103 ns in two runs of the same session), so the atomic figure is not
/// conclusive; switching is a one-line change here if a quieter machine shows no cost.
///
/// # Safety
/// `src` and `dst` are 8-byte aligned; `src .. src + len.next_multiple_of(8)` is mapped and
/// readable, and `dst .. dst + len.next_multiple_of(8)` is writable and not aliased.
#[inline]
pub(crate) unsafe fn copy_racy(src: *const u8, dst: *mut u8, len: usize) {
    debug_assert_eq!(src as usize % 8, 0);
    debug_assert_eq!(dst as usize % 8, 0);
    let src = src as *const u64;
    let dst = dst as *mut u64;
    for i in 0..len.div_ceil(8) {
        // SAFETY: the caller's promise: word `i` is inside both ranges, 8-aligned, and `dst`
        // is ours alone.
        unsafe { dst.add(i).write(src.add(i).read_volatile()) };
    }
}

/// Writes a header into ring memory.
///
/// # Safety
/// `ptr` must be valid for writes of [`FRAME_HEADER_LEN`] bytes and 8-byte aligned, and no
/// reader may be reading those bytes.
#[inline]
pub(crate) unsafe fn write_header(ptr: *mut u8, h: &FrameHeader) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write(ptr as *mut FrameHeader, *h) }
}

/// A monotonic clock in nanoseconds, comparable across processes on one host
/// (`CLOCK_MONOTONIC`).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_bytes() {
        let h = FrameHeader {
            len: 77,
            kind: 3,
            flags: flags::LATE,
            source_id: 9,
            topic_id: 12,
            reserved: 0,
            ts: 1_726_876_859_999_000_000,
            source_seq: 42,
            bus_seq: 7,
            publish_ns: 5,
        };
        assert_eq!(FrameHeader::from_bytes(&h.to_bytes()), h);
        assert_eq!(FrameHeader::from_bytes_portable(&h.to_bytes()), h);
    }

    #[test]
    fn validate_refuses_garbage() {
        let mut h = FrameHeader::event(Kind::Trade, 1, 0, 64);
        assert_eq!(h.validate(4096), Ok(112));
        assert!(matches!(h.validate(100), Err(FrameError::BadLength { .. })));
        h.kind = 9;
        assert_eq!(h.validate(4096), Err(FrameError::UnknownKind(9)));
        h.kind = 1;
        h.flags = 0x80;
        assert_eq!(h.validate(4096), Err(FrameError::UnknownFlags(0x80)));
        let c = FrameHeader {
            kind: 0,
            ..FrameHeader::default()
        };
        assert!(matches!(c.validate(4096), Err(FrameError::Inconsistent(_))));
        let e = FrameHeader::event(Kind::Kline, 1, 0, 0);
        assert!(matches!(e.validate(4096), Err(FrameError::Inconsistent(_))));
        let huge = FrameHeader::event(Kind::Book, 1, 0, u32::MAX as usize);
        assert!(matches!(
            huge.validate(usize::MAX),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn stride_is_aligned() {
        for len in 0..300 {
            let s = stride(len);
            assert_eq!(s % FRAME_ALIGN, 0);
            assert!(s >= FRAME_HEADER_LEN + len && s < FRAME_HEADER_LEN + len + FRAME_ALIGN);
        }
    }
}
