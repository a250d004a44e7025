//! The journal file format (SPEC section 8): a 64-byte header, then frames in the bus format.
//! Shared by the tools that write and replay journals and by the daemon, which maps a
//! backtest's journals itself (a journal-backed source: no ring, no producer hop).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "AEGISJNL"
//!      8     4  version (u32 LE) = 1
//!     12     1  file kind (JournalKind: 1 kline, 2 trade, 3 aggtrade, 4 book)
//!     13     1  flags: bit 0 = complete (set by the writer last)
//!     14     2  reserved, zero
//!     16     8  frame count (u64 LE)
//!     24     8  data length: bytes of frames after the header (u64 LE, a multiple of 16)
//!     32    16  symbol, ASCII, zero-padded
//!     48    16  interval, ASCII, zero-padded (all zero unless kline)
//!     64     …  frames: FrameHeader (48 bytes, FrameHeader::to_bytes) + rkyv payload
//!               + zero padding to a multiple of 16 (frame::stride)
//! ```
//!
//! Every frame starts on a 16-byte boundary of the file; a file mapped at a page boundary can
//! be decoded in place. Frames carry `source_seq` = their index, and zero `source_id`,
//! `bus_seq` and `publish_ns`. A journal holds events of one kind only, every one of the fixed
//! payload size of that kind, and nothing else (no control frames). A journal is untrusted
//! input: [`JournalHeader::parse`] and [`check_frame`] are the checks every reader applies.
//!
//! A **recording segment** (SPEC section 11, [`crate::recording`]) is a journal of another
//! kind, [`RECORDING_KIND`]: the same magic, version, flags, frame count and data length, but
//! bytes 32..64 hold the segment's place in its recording instead of names, and its frames are
//! bus frames of any kind, as the bus carried them (see [`RecordingHeader`] and
//! [`check_recorded_frame`]).

use crate::frame::{flags, FrameHeader, Kind, FRAME_ALIGN, FRAME_HEADER_LEN};

/// The first 8 bytes of every journal.
pub const MAGIC: [u8; 8] = *b"AEGISJNL";
/// The layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the journal header; the first frame starts here.
pub const HEADER_LEN: usize = 64;
/// Header flag: the writer finished.
pub const FLAG_COMPLETE: u8 = 1;
/// Longest symbol and interval names (bytes of their zero-padded fields).
pub const NAME_LEN: usize = 16;

/// What a journal holds, as coded in its header.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum JournalKind {
    /// Klines.
    Kline = 1,
    /// Trades (`trades` files).
    Trade = 2,
    /// Aggregated trades (`aggTrades` files), carried as trades.
    AggTrade = 3,
    /// Best bid/ask updates (`bookTicker` files).
    Book = 4,
}

impl JournalKind {
    /// The kind coded as `code`, if any.
    pub fn from_u8(code: u8) -> Option<JournalKind> {
        Some(match code {
            1 => JournalKind::Kline,
            2 => JournalKind::Trade,
            3 => JournalKind::AggTrade,
            4 => JournalKind::Book,
            _ => return None,
        })
    }

    /// The event kind of its frames.
    pub fn event_kind(self) -> Kind {
        match self {
            JournalKind::Kline => Kind::Kline,
            JournalKind::Trade | JournalKind::AggTrade => Kind::Trade,
            JournalKind::Book => Kind::Book,
        }
    }
}

/// A journal header, as read from or written to a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// What the journal holds.
    pub kind: JournalKind,
    /// Whether the writer finished.
    pub complete: bool,
    /// Frames after the header.
    pub frame_count: u64,
    /// Bytes of frames after the header (a multiple of 16).
    pub data_len: u64,
    /// The symbol (ASCII, at most [`NAME_LEN`] bytes).
    pub symbol: String,
    /// The kline interval, if any.
    pub interval: Option<String>,
}

/// Why a journal header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than a header.
    #[error("shorter than a journal header ({HEADER_LEN} bytes)")]
    Short,
    /// Not a journal.
    #[error("not an Aegis journal (bad magic)")]
    BadMagic,
    /// Another layout version.
    #[error("journal layout version {0}, this build reads version {VERSION}")]
    Version(u32),
    /// The writer never finished.
    #[error("incomplete journal (its writer did not finish); convert it again")]
    Incomplete,
    /// A field is invalid.
    #[error("bad journal header: {0}")]
    Bad(String),
    /// A recording segment where an event journal was expected.
    #[error("a recording segment, not an event journal (replay the recording's directory)")]
    Recording,
}

/// The kind byte of a recording segment (no [`JournalKind`]: its frames are of every kind).
pub const RECORDING_KIND: u8 = 0x52;

/// Checks magic and version, and returns the header's bytes.
fn header_bytes(bytes: &[u8]) -> Result<&[u8; HEADER_LEN], HeaderError> {
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let h: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(HeaderError::Short)?;
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    Ok(h)
}

fn u64_at(h: &[u8; HEADER_LEN], o: usize) -> u64 {
    u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"))
}

/// The header of a recording segment.
///
/// ```text
/// offset  size  field
///      0    16  as a journal: magic, version, kind = RECORDING_KIND, flags (bit 0 complete), 0
///     16     8  frame count (u64 LE; written when the segment is closed)
///     24     8  data length (u64 LE; written when the segment is closed)
///     32     8  bus seq of the segment's first frame (u64 LE)
///     40     4  the segment's index in its recording (u32 LE)
///     44    20  reserved, zero
/// ```
///
/// A segment whose writer did not finish (a crash) has `complete == false` and zero counts:
/// its frames are found by scanning (see [`crate::recording`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingHeader {
    /// Whether the recorder closed the segment.
    pub complete: bool,
    /// Frames after the header (0 until closed).
    pub frame_count: u64,
    /// Bytes of frames after the header (0 until closed).
    pub data_len: u64,
    /// Bus seq of the first frame.
    pub first_seq: u64,
    /// The segment's index.
    pub index: u32,
}

impl RecordingHeader {
    /// Parses and checks a recording segment's header (magic, version, kind, flags, reserved
    /// bytes, alignment). An incomplete segment is not an error here.
    pub fn parse(bytes: &[u8]) -> Result<RecordingHeader, HeaderError> {
        let h = header_bytes(bytes)?;
        if h[12] != RECORDING_KIND {
            return Err(HeaderError::Bad(format!(
                "kind {} is not a recording segment",
                h[12]
            )));
        }
        if h[13] & !FLAG_COMPLETE != 0
            || h[14] != 0
            || h[15] != 0
            || h[44..].iter().any(|&b| b != 0)
        {
            return Err(HeaderError::Bad(format!(
                "unknown flags {:#04x} or reserved bytes set",
                h[13]
            )));
        }
        let data_len = u64_at(h, 24);
        if !data_len.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(HeaderError::Bad(format!(
                "data length {data_len} is not a multiple of {FRAME_ALIGN}"
            )));
        }
        Ok(RecordingHeader {
            complete: h[13] & FLAG_COMPLETE != 0,
            frame_count: u64_at(h, 16),
            data_len,
            first_seq: u64_at(h, 32),
            index: u32::from_le_bytes(h[40..44].try_into().expect("4 bytes")),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12] = RECORDING_KIND;
        h[13] = if self.complete { FLAG_COMPLETE } else { 0 };
        h[16..24].copy_from_slice(&self.frame_count.to_le_bytes());
        h[24..32].copy_from_slice(&self.data_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        h[40..44].copy_from_slice(&self.index.to_le_bytes());
        h
    }
}

/// Checks a recorded bus frame, given that at most `available` bytes (from the frame's start)
/// may belong to it: a valid frame header, and either an event of its kind's fixed payload
/// size with no flag but LATE, END-OF-STREAM (EOF, maybe ABORT) or a gap record (GAP), both
/// without payload. Returns its stride.
pub fn check_recorded_frame(h: &FrameHeader, available: usize) -> Result<usize, String> {
    if h.kind == Kind::Control as u8 && h.flags == flags::GAP && h.len == 0 {
        // A gap record: a recording's own frame, which `validate` (ring and bus rules)
        // refuses.
        return if available >= FRAME_HEADER_LEN {
            Ok(FRAME_HEADER_LEN)
        } else {
            Err(format!("gap record cut short ({available} bytes)"))
        };
    }
    let stride = h.validate(available).map_err(|e| e.to_string())?;
    match h.kind() {
        Some(Kind::Control) => {
            let ok = h.len == 0 && (h.flags == flags::EOF || h.flags == flags::EOF | flags::ABORT);
            if !ok {
                return Err(format!(
                    "control frame with flags {:#04x} and {} payload bytes in a recording",
                    h.flags, h.len
                ));
            }
        }
        Some(k) => {
            if h.flags & !flags::LATE != 0 {
                return Err(format!("unexpected flags {:#04x} on an event", h.flags));
            }
            let len = archived_len(k).expect("an event kind");
            if h.len as usize != len {
                return Err(format!(
                    "payload of {} bytes, a {} is {len} bytes",
                    h.len,
                    k.name()
                ));
            }
        }
        None => unreachable!("validate checked the kind"),
    }
    Ok(stride)
}

impl JournalHeader {
    /// Parses and checks a header: magic, version, completeness, flags and reserved bytes,
    /// kind, names, and the data length's alignment. The file size is the caller's to check
    /// against [`JournalHeader::file_len`].
    pub fn parse(bytes: &[u8]) -> Result<JournalHeader, HeaderError> {
        let h = header_bytes(bytes)?;
        let u64_at = |o: usize| u64_at(h, o);
        if h[12] == RECORDING_KIND {
            return Err(HeaderError::Recording);
        }
        if h[13] & FLAG_COMPLETE == 0 {
            return Err(HeaderError::Incomplete);
        }
        if h[13] & !FLAG_COMPLETE != 0 || h[14] != 0 || h[15] != 0 {
            return Err(HeaderError::Bad(format!(
                "unknown flags {:#04x} or reserved bytes set",
                h[13]
            )));
        }
        let kind = JournalKind::from_u8(h[12])
            .ok_or_else(|| HeaderError::Bad(format!("unknown kind {}", h[12])))?;
        let name = |b: &[u8], what: &str| {
            padded_str(b).map_err(|e| HeaderError::Bad(format!("{what}: {e}")))
        };
        let symbol = name(&h[32..48], "symbol")?.unwrap_or_default();
        let interval = name(&h[48..64], "interval")?;
        let data_len = u64_at(24);
        if !data_len.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(HeaderError::Bad(format!(
                "data length {data_len} is not a multiple of {FRAME_ALIGN}"
            )));
        }
        Ok(JournalHeader {
            kind,
            complete: true,
            frame_count: u64_at(16),
            data_len,
            symbol,
            interval,
        })
    }

    /// The header's bytes. Names longer than [`NAME_LEN`] are cut (writers check them first).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12] = self.kind as u8;
        h[13] = if self.complete { FLAG_COMPLETE } else { 0 };
        h[16..24].copy_from_slice(&self.frame_count.to_le_bytes());
        h[24..32].copy_from_slice(&self.data_len.to_le_bytes());
        let sym = &self.symbol.as_bytes()[..self.symbol.len().min(NAME_LEN)];
        h[32..32 + sym.len()].copy_from_slice(sym);
        if let Some(i) = &self.interval {
            let i = &i.as_bytes()[..i.len().min(NAME_LEN)];
            h[48..48 + i.len()].copy_from_slice(i);
        }
        h
    }

    /// The size of the file this header describes, if it fits a `u64`.
    pub fn file_len(&self) -> Option<u64> {
        (HEADER_LEN as u64).checked_add(self.data_len)
    }
}

/// A zero-padded ASCII field of the header; `None` when all zero.
fn padded_str(b: &[u8]) -> Result<Option<String>, String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if b[end..].iter().any(|&c| c != 0) {
        return Err("name field not zero-padded".to_string());
    }
    if end == 0 {
        return Ok(None);
    }
    std::str::from_utf8(&b[..end])
        .map(|s| Some(s.to_string()))
        .map_err(|_| "name field is not UTF-8".to_string())
}

pub use crate::event::archived_len;

/// Checks a frame header against the journal's rules, given that at most `available` bytes
/// (from the frame's start) may belong to the frame: a valid frame header, an event of the
/// journal's kind with no flag but LATE, and the fixed payload size of that kind. Returns its
/// stride; `Err` says what is wrong.
pub fn check_frame(h: &FrameHeader, available: usize, kind: JournalKind) -> Result<usize, String> {
    let stride = h.validate(available).map_err(|e| e.to_string())?;
    let Some((k, len)) = h.kind().and_then(|k| archived_len(k).map(|n| (k, n))) else {
        return Err(format!(
            "control frame (flags {:#04x}) where an event was expected",
            h.flags
        ));
    };
    if h.flags & !flags::LATE != 0 {
        return Err(format!("unexpected flags {:#04x} on an event", h.flags));
    }
    if k != kind.event_kind() {
        return Err(format!(
            "a {} frame in a {} journal",
            k.name(),
            kind.event_kind().name()
        ));
    }
    if h.len as usize != len {
        return Err(format!(
            "payload of {} bytes, a {} is {len} bytes",
            h.len,
            k.name()
        ));
    }
    Ok(stride)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Trade};

    fn header() -> JournalHeader {
        JournalHeader {
            kind: JournalKind::Kline,
            complete: true,
            frame_count: 3,
            data_len: 48 * 3,
            symbol: "BTCUSDT".into(),
            interval: Some("1m".into()),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(JournalHeader::parse(&h.encode()), Ok(h));
    }

    #[test]
    fn header_refusals() {
        let good = header().encode();
        let mut b = good;
        b[0] = b'X';
        assert_eq!(JournalHeader::parse(&b), Err(HeaderError::BadMagic));
        assert_eq!(JournalHeader::parse(&good[..40]), Err(HeaderError::Short));
        let mut b = good;
        b[8] = 9;
        assert_eq!(JournalHeader::parse(&b), Err(HeaderError::Version(9)));
        let mut b = good;
        b[13] = 0;
        assert_eq!(JournalHeader::parse(&b), Err(HeaderError::Incomplete));
        let mut b = good;
        b[12] = 7;
        assert!(matches!(JournalHeader::parse(&b), Err(HeaderError::Bad(m)) if m.contains("kind")));
        let mut b = good;
        b[24] = 7;
        assert!(
            matches!(JournalHeader::parse(&b), Err(HeaderError::Bad(m)) if m.contains("multiple"))
        );
        let mut b = good;
        b[40] = b'x'; // after the symbol's zero padding began
        assert!(
            matches!(JournalHeader::parse(&b), Err(HeaderError::Bad(m)) if m.contains("symbol"))
        );
    }

    #[test]
    fn frame_rules() {
        let len = Trade::ARCHIVED_LEN;
        let ok = FrameHeader::event(Kind::Trade, 10, 0, len);
        let stride = crate::frame::stride(len);
        assert_eq!(check_frame(&ok, stride, JournalKind::AggTrade), Ok(stride));
        assert!(check_frame(&ok, stride, JournalKind::Book).is_err());
        assert!(check_frame(&ok, stride - 16, JournalKind::Trade).is_err());
        let mut eof = ok;
        eof.kind = Kind::Control as u8;
        eof.flags = flags::EOF;
        eof.len = 0;
        assert!(check_frame(&eof, stride, JournalKind::Trade).is_err());
        let mut short = ok;
        short.len = 16;
        assert!(check_frame(&short, stride, JournalKind::Trade).is_err());
        let mut flagged = ok;
        flagged.flags = flags::HEARTBEAT;
        assert!(check_frame(&flagged, stride, JournalKind::Trade).is_err());
    }

    #[test]
    fn recording_header_round_trips_and_is_no_event_journal() {
        let h = RecordingHeader {
            complete: false,
            frame_count: 0,
            data_len: 0,
            first_seq: 42,
            index: 3,
        };
        let b = h.encode();
        assert_eq!(RecordingHeader::parse(&b), Ok(h));
        assert_eq!(JournalHeader::parse(&b), Err(HeaderError::Recording));
        assert!(RecordingHeader::parse(&header().encode()).is_err());
        let mut future = b;
        future[8] = 2;
        assert_eq!(
            RecordingHeader::parse(&future),
            Err(HeaderError::Version(2))
        );
    }

    #[test]
    fn recorded_frame_rules() {
        let len = Trade::ARCHIVED_LEN;
        let stride = crate::frame::stride(len);
        let mut late = FrameHeader::event(Kind::Trade, 10, 0, len);
        late.flags = flags::LATE;
        assert_eq!(check_recorded_frame(&late, stride), Ok(stride));
        let gap = FrameHeader {
            kind: Kind::Control as u8,
            flags: flags::GAP,
            ..FrameHeader::default()
        };
        assert_eq!(check_recorded_frame(&gap, 48), Ok(48));
        let hb = FrameHeader {
            flags: flags::HEARTBEAT,
            ..gap
        };
        assert!(check_recorded_frame(&hb, 48).is_err());
        let mut short = late;
        short.len = 16;
        assert!(check_recorded_frame(&short, stride).is_err());
    }
}
