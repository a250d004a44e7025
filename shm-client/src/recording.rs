//! Recordings of a session's bus (SPEC section 11): the format, shared by the daemon's
//! recorder (the writer), `aegis-shmctl record verify`, `aegis-replay DIR` and
//! `aegis-tap --catch-up` (the readers).
//!
//! A recording is a directory:
//!
//! ```text
//! DIR/manifest.json   the session (name, mode, sources by rank with their kinds and topics,
//!                     topic table), the segments, the gaps, and the state:
//!                     recording | complete | incomplete (+ reason)
//! DIR/00000000.seg    segments: a journal header of kind RECORDING_KIND (crate::journal),
//! DIR/00000001.seg    then the bus frames, exactly as the bus carried them (bus seq, flags,
//! ...                 topic and source ids, payload), rolled at a configured size
//! DIR/index.bin       a sparse index: 32-byte entries (bus seq, the highest ts before it,
//!                     segment, offset), one per MiB of frames
//! ```
//!
//! Each recorded frame carries a CRC-32 of its header (with the CRC field zero) and payload
//! in the header's `reserved` word, which is zero on the bus; readers check it and hand the
//! frame out with `reserved` zero again, as it was on the bus. The CRC is what tells a
//! complete frame from a torn one after a crash: segments are reserved (fallocate) when
//! opened, so the unwritten rest of a segment reads as zeros, and a frame cut by a crash fails
//! its CRC. Everything up to the last complete frame stays readable.
//!
//! Besides bus frames, a segment may hold **gap records**: control frames flagged
//! [`flags::GAP`] with `bus_seq` = the first frame missed and `source_seq` = how many (a live
//! bus lapped the recorder). Bus seqs are contiguous through a recording, gaps included.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::frame::{flags, FrameHeader, Seq, FRAME_HEADER_LEN};
use crate::journal::{self, HeaderError, RecordingHeader, HEADER_LEN};
use crate::protocol::{Mode, SourceKind};
pub use crate::stats::RecordingState;

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The index's file name.
pub const INDEX_FILE: &str = "index.bin";
/// The manifest version this build reads and writes.
pub const MANIFEST_VERSION: u32 = 1;
/// Default segment size (`--record-segment-bytes`).
pub const DEFAULT_SEGMENT_BYTES: u64 = 256 << 20;
/// Smallest segment size.
pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;
/// Bytes of frames between two index entries.
pub const INDEX_EVERY_BYTES: u64 = 1 << 20;
/// Bytes of an index entry.
pub const INDEX_ENTRY_LEN: usize = 32;

/// The file name of segment `index`.
pub fn segment_file(index: u32) -> String {
    format!("{index:08}.seg")
}

/// A gap: the recorder missed the frames `from..=to` (bus seqs).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    /// First frame missed.
    pub from: Seq,
    /// Last frame missed.
    pub to: Seq,
}

/// A segment in the manifest (as of the manifest's last write: the segment being written
/// may hold more).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// File name in the recording's directory.
    pub file: String,
    /// Bus seq of its first frame.
    pub first_seq: Seq,
    /// Frames in it (gap records included).
    pub frames: u64,
    /// Bytes of frames in it.
    pub bytes: u64,
    /// Lowest and highest event ts in it (`None`: no event).
    pub ts_range: Option<(u64, u64)>,
    /// Whether the recorder closed it.
    pub complete: bool,
}

/// A recorded source's declaration, in [`Manifest::declared`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecordedSource {
    /// Its declared kind.
    pub kind: SourceKind,
    /// Its topic.
    pub topic: String,
}

/// `manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Session name.
    pub session: String,
    /// Session UUID.
    pub session_id: String,
    /// The recorded session's mode.
    pub mode: Mode,
    /// State; `recording` after a crash.
    pub state: RecordingState,
    /// Why it is incomplete.
    pub reason: Option<String>,
    /// Source names by rank (the `source_id` of the frames).
    pub sources: Vec<String>,
    /// Each source's declared kind and topic, by rank (what an importer of an exported
    /// replay registers). Empty in a recording made before the recorder wrote them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub declared: Vec<RecordedSource>,
    /// Topic table (name → the `topic_id` of the frames).
    pub topics: BTreeMap<String, u32>,
    /// The segment size.
    pub segment_bytes: u64,
    /// Segments, in order.
    pub segments: Vec<SegmentInfo>,
    /// Gaps (live: the bus lapped the recorder).
    pub gaps: Vec<Gap>,
    /// Frames recorded (gap records included).
    pub frames: u64,
    /// The bus seq after the last frame recorded.
    pub next_seq: Seq,
}

/// Why a recording cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No manifest: not a recording.
    #[error("{0}: no {MANIFEST_FILE}: not an Aegis recording")]
    NotARecording(PathBuf),
    /// The manifest is not valid.
    #[error("{path}: bad manifest: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A manifest from another version.
    #[error("{path}: manifest version {found}, this build reads version {MANIFEST_VERSION}")]
    Version {
        /// The manifest.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// A segment's header is refused.
    #[error("{path}: {error}")]
    Segment {
        /// The segment.
        path: PathBuf,
        /// Why.
        error: HeaderError,
    },
    /// A frame or the segment sequence is corrupt (not a torn tail: inside data that was
    /// complete).
    #[error("{path}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Offset in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordingError + '_ {
    move |source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, RecordingError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordingError::NotARecording(dir.to_path_buf()))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        // The version first, so that a future manifest says so rather than "unknown field".
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| RecordingError::Manifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == MANIFEST_VERSION as u64 => {}
            Some(v) => {
                return Err(RecordingError::Version {
                    path,
                    found: v.min(u32::MAX as u64) as u32,
                })
            }
            None => {
                return Err(RecordingError::Manifest {
                    path,
                    reason: "no version".into(),
                })
            }
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| RecordingError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !m.declared.is_empty() && m.declared.len() != m.sources.len() {
            return Err(RecordingError::Manifest {
                path,
                reason: format!(
                    "{} sources but {} declarations",
                    m.sources.len(),
                    m.declared.len()
                ),
            });
        }
        for (i, s) in m.segments.iter().enumerate() {
            if s.file != segment_file(i as u32) {
                return Err(RecordingError::Manifest {
                    path,
                    reason: format!("segment {i} is named {:?}", s.file),
                });
            }
        }
        Ok(m)
    }

    /// Writes the manifest atomically (a temporary file, fsync'd, renamed over it).
    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE))
    }
}

/// The CRC of a recorded frame: header (with `reserved` zero) and payload.
pub fn frame_crc(h: &FrameHeader, payload: &[u8]) -> u32 {
    let mut bare = *h;
    bare.reserved = 0;
    let mut c = crc32fast::Hasher::new();
    c.update(&bare.to_bytes());
    c.update(payload);
    c.finalize()
}

/// A gap record's header: `count` frames from `from` missed; `ts` is the highest event ts
/// recorded before it.
pub fn gap_header(from: Seq, count: u64, ts: u64) -> FrameHeader {
    FrameHeader {
        kind: crate::frame::Kind::Control as u8,
        flags: flags::GAP,
        ts,
        source_seq: count,
        bus_seq: from,
        ..FrameHeader::default()
    }
}

/// An entry of the sparse index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Bus seq of the frame the entry points at.
    pub seq: Seq,
    /// The highest event ts of every frame before it (0 if none): every frame before the
    /// entry has `ts <= max_ts_before`.
    pub max_ts_before: u64,
    /// Its segment.
    pub segment: u32,
    /// Its offset in the segment file.
    pub offset: u64,
}

impl IndexEntry {
    /// The entry's bytes.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.max_ts_before.to_le_bytes());
        b[16..20].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> IndexEntry {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        IndexEntry {
            seq: u64_at(0),
            max_ts_before: u64_at(8),
            segment: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            offset: u64_at(24),
        }
    }
}

/// The index's entries (a partial last entry, cut by a crash, is ignored). Entries are only
/// hints: the cursor placed by one checks the frame it finds there.
pub fn read_index(dir: &Path) -> Result<Vec<IndexEntry>, RecordingError> {
    let path = dir.join(INDEX_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    let entries: Vec<IndexEntry> = bytes
        .chunks_exact(INDEX_ENTRY_LEN)
        .map(IndexEntry::decode)
        .collect();
    let ordered = entries
        .windows(2)
        .all(|w| w[0].seq < w[1].seq && w[0].max_ts_before <= w[1].max_ts_before);
    if !ordered {
        return Err(RecordingError::Corrupt {
            path,
            offset: 0,
            reason: "index entries out of order".into(),
        });
    }
    Ok(entries)
}

/// One record read from a recording.
#[derive(Debug)]
pub enum Record<'a> {
    /// A bus frame (an event or END-OF-STREAM), its header as it was on the bus.
    Frame(FrameHeader, &'a [u8]),
    /// The recorder missed the frames `from .. from + count`.
    Gap {
        /// First frame missed.
        from: Seq,
        /// How many.
        count: u64,
    },
}

/// What [`Cursor::read`] found.
#[derive(Debug)]
pub enum Next<'a> {
    /// A record.
    Record(Record<'a>),
    /// Nothing complete beyond the cursor yet: the recorder has not written it (a live
    /// recording), or the recording stops there (a torn tail, or a recording that ended
    /// without END-OF-STREAM). Calling again looks again.
    Pending,
    /// END-OF-STREAM was read: nothing follows.
    End,
}

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 1 << 20;

/// A reader of a recording's records in bus order, from a segment offset on. It reads with
/// `pread` (never a mapping, so a file truncated under it is an error, not a SIGBUS) and
/// follows a recording that is still being written: [`Next::Pending`] at its end.
pub struct Cursor {
    dir: PathBuf,
    segment: u32,
    file: Option<(File, PathBuf, RecordingHeader)>,
    /// Offset of the next frame in the segment file.
    pos: u64,
    /// The bus seq the next record must carry (`None`: whatever the first is).
    next_seq: Option<Seq>,
    buf: Vec<u8>,
    buf_off: u64,
    buf_len: usize,
    ended: bool,
}

impl Cursor {
    /// A cursor at the first frame of the recording in `dir`.
    pub fn new(dir: &Path) -> Cursor {
        Cursor::at(dir, 0, HEADER_LEN as u64, None)
    }

    /// A cursor at `offset` of segment `segment` (an index entry's place), expecting bus seq
    /// `seq` there (if known).
    pub fn at(dir: &Path, segment: u32, offset: u64, seq: Option<Seq>) -> Cursor {
        Cursor {
            dir: dir.to_path_buf(),
            segment,
            file: None,
            pos: offset,
            next_seq: seq,
            buf: vec![0u8; READ_CHUNK],
            buf_off: 0,
            buf_len: 0,
            ended: false,
        }
    }

    /// The segment and offset of the next record.
    pub fn position(&self) -> (u32, u64) {
        (self.segment, self.pos)
    }

    /// The bus seq the next record carries, once known.
    pub fn next_seq(&self) -> Option<Seq> {
        self.next_seq
    }

    /// The bytes at `off..off + n` of the current segment, if the file has them.
    fn bytes(&mut self, off: u64, n: usize) -> Result<Option<&[u8]>, RecordingError> {
        let (file, path, _) = self.file.as_ref().expect("a segment is open");
        let end = self.buf_off + self.buf_len as u64;
        if off < self.buf_off || off + n as u64 > end {
            if n > self.buf.len() {
                self.buf.resize(n, 0);
            }
            let mut got = 0;
            loop {
                match file.read_at(&mut self.buf[got..], off + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(path)(e)),
                }
                if got >= n {
                    break;
                }
            }
            self.buf_off = off;
            self.buf_len = got;
            if got < n {
                return Ok(None);
            }
        }
        let at = (off - self.buf_off) as usize;
        Ok(Some(&self.buf[at..at + n]))
    }

    /// Opens segment `self.segment`; `false` if it does not exist (yet) or has no header yet.
    fn open_segment(&mut self) -> Result<bool, RecordingError> {
        let path = self.dir.join(segment_file(self.segment));
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut h = [0u8; HEADER_LEN];
        match file.read_exact_at(&mut h, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(io(&path)(e)),
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(false); // reserved, header not written yet
        }
        let header = RecordingHeader::parse(&h).map_err(|error| RecordingError::Segment {
            path: path.clone(),
            error,
        })?;
        if header.index != self.segment {
            return Err(RecordingError::Corrupt {
                path,
                offset: 40,
                reason: format!("segment header says index {}", header.index),
            });
        }
        if self.pos == HEADER_LEN as u64 {
            if let Some(want) = self.next_seq {
                if header.first_seq != want {
                    return Err(RecordingError::Corrupt {
                        path,
                        offset: 32,
                        reason: format!(
                            "segment starts at bus seq {}, the previous one ended before {want}",
                            header.first_seq
                        ),
                    });
                }
            }
        }
        self.file = Some((file, path, header));
        self.buf_len = 0;
        Ok(true)
    }

    /// The header of the open segment, read again (the recorder completes it on closing).
    fn reread_header(&mut self) -> Result<RecordingHeader, RecordingError> {
        let (file, path, _) = self.file.as_ref().expect("a segment is open");
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0).map_err(io(path))?;
        RecordingHeader::parse(&h).map_err(|error| RecordingError::Segment {
            path: path.clone(),
            error,
        })
    }

    fn corrupt(&self, reason: String) -> RecordingError {
        let path = self.file.as_ref().map(|f| f.1.clone()).unwrap_or_default();
        RecordingError::Corrupt {
            path,
            offset: self.pos,
            reason,
        }
    }

    /// The next record. Never skips: a bus seq out of sequence, or a bad frame inside a
    /// closed segment, is [`RecordingError::Corrupt`].
    pub fn read(&mut self) -> Result<Next<'_>, RecordingError> {
        loop {
            if self.ended {
                return Ok(Next::End);
            }
            if self.file.is_none() && !self.open_segment()? {
                return Ok(Next::Pending);
            }
            let pos = self.pos;
            let head = self.bytes(pos, FRAME_HEADER_LEN)?.map(|b| {
                let b: &[u8; FRAME_HEADER_LEN] = b.try_into().expect("a header's bytes");
                (FrameHeader::from_bytes(b), b.iter().all(|&x| x == 0))
            });
            let header = match head {
                Some((h, false)) => Some(h),
                _ => None,
            };
            let closed = self.file.as_ref().expect("open").2.complete;
            let Some(h) = header else {
                // The end of what is written. A closed segment must end exactly here; then
                // the next one follows.
                let hdr = if closed {
                    self.file.as_ref().expect("open").2.clone()
                } else {
                    self.reread_header()?
                };
                if !hdr.complete {
                    self.buf_len = 0;
                    return Ok(Next::Pending);
                }
                if !closed {
                    // The recorder closed the segment between our read of the frame bytes
                    // and of its header: the bytes may be stale (written since). Read them
                    // again; the segment is final now. Regression test:
                    // `a_catch_up_tap_lapped_by_the_live_bus_reads_the_recording_again_...`
                    // ("the segment's frames end at byte 65344, no frame here" at 48304).
                    self.file.as_mut().expect("open").2 = hdr;
                    self.buf_len = 0;
                    continue;
                }
                let end = HEADER_LEN as u64 + hdr.data_len;
                if pos != end {
                    return Err(self.corrupt(format!(
                        "the segment's frames end at byte {end}, no frame here"
                    )));
                }
                self.segment += 1;
                self.file = None;
                self.pos = HEADER_LEN as u64;
                continue;
            };
            let checked = journal::check_recorded_frame(&h, usize::MAX);
            let stride = match checked {
                Ok(s) => s,
                Err(reason) if closed => return Err(self.corrupt(reason)),
                Err(_) => {
                    // A torn frame header at the tail (or one being written).
                    self.buf_len = 0;
                    return Ok(Next::Pending);
                }
            };
            let Some(frame) = self.bytes(pos, stride)? else {
                if closed {
                    return Err(self.corrupt("frame cut short by the end of the file".into()));
                }
                self.buf_len = 0;
                return Ok(Next::Pending);
            };
            let payload_end = FRAME_HEADER_LEN + h.len as usize;
            if frame_crc(&h, &frame[FRAME_HEADER_LEN..payload_end]) != h.reserved {
                if closed {
                    return Err(RecordingError::Corrupt {
                        path: self.file.as_ref().expect("open").1.clone(),
                        offset: pos,
                        reason: "frame checksum mismatch".into(),
                    });
                }
                self.buf_len = 0;
                return Ok(Next::Pending);
            }
            if let Some(want) = self.next_seq {
                if h.bus_seq != want {
                    return Err(
                        self.corrupt(format!("bus seq {} where {want} was expected", h.bus_seq))
                    );
                }
            }
            self.pos += stride as u64;
            let mut bus = h;
            bus.reserved = 0;
            let record = if h.kind == crate::frame::Kind::Control as u8 && h.has(flags::GAP) {
                if h.source_seq == 0 {
                    return Err(self.corrupt("an empty gap record".into()));
                }
                self.next_seq = Some(h.bus_seq + h.source_seq);
                Record::Gap {
                    from: h.bus_seq,
                    count: h.source_seq,
                }
            } else {
                self.next_seq = Some(h.bus_seq + 1);
                self.ended = h.has(flags::EOF);
                let at = (pos - self.buf_off) as usize;
                Record::Frame(bus, &self.buf[at + FRAME_HEADER_LEN..at + payload_end])
            };
            return Ok(Next::Record(record));
        }
    }

    /// The payload of the frame the last [`Cursor::read`] returned (header `h`): still in
    /// the read buffer, which only the next read changes.
    fn last_payload(&self, h: &FrameHeader) -> &[u8] {
        let start = self.pos - h.stride() as u64;
        let at = (start - self.buf_off) as usize + FRAME_HEADER_LEN;
        &self.buf[at..at + h.len as usize]
    }

    /// After [`Next::Pending`]: the torn tail, if any: the offset of the first byte that is
    /// not a complete frame and the span up to the last non-zero byte of the segment file.
    fn torn_tail(&mut self) -> Result<Option<TornTail>, RecordingError> {
        let Some((file, path, _)) = &self.file else {
            return Ok(None);
        };
        let len = file.metadata().map_err(io(path))?.len();
        let mut last_nonzero = None;
        let mut off = self.pos;
        let mut chunk = vec![0u8; READ_CHUNK];
        while off < len {
            let n = file.read_at(&mut chunk, off).map_err(io(path))?;
            if n == 0 {
                break;
            }
            if let Some(i) = chunk[..n].iter().rposition(|&b| b != 0) {
                last_nonzero = Some(off + i as u64);
            }
            off += n as u64;
        }
        Ok(last_nonzero.map(|last| TornTail {
            file: segment_file(self.segment),
            offset: self.pos,
            bytes: last + 1 - self.pos,
        }))
    }
}

/// Bytes after the last complete frame that are not zero: what a crash cut short.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub file: String,
    /// Where the first incomplete frame starts.
    pub offset: u64,
    /// Bytes from there to the last non-zero byte.
    pub bytes: u64,
}

/// A segment in a [`Verified`] report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SegmentReport {
    /// File name.
    pub file: String,
    /// Closed by the recorder.
    pub complete: bool,
    /// Frames read from it (gap records included).
    pub frames: u64,
    /// Bytes of complete frames.
    pub bytes: u64,
}

/// What `aegis-shmctl record verify` reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The directory.
    pub dir: PathBuf,
    /// The recorded session.
    pub session: String,
    /// The manifest's state (`recording` after a crash).
    pub state: RecordingState,
    /// The manifest's reason.
    pub reason: Option<String>,
    /// Bus frames readable (events and END-OF-STREAM; gap records not counted).
    pub frames: u64,
    /// Events among them.
    pub events: u64,
    /// Bus seqs covered, first and last (gaps included).
    pub seq_range: Option<(Seq, Seq)>,
    /// Lowest and highest event ts.
    pub ts_range: Option<(u64, u64)>,
    /// Segments.
    pub segments: Vec<SegmentReport>,
    /// Gaps.
    pub gaps: Vec<Gap>,
    /// Frames lost to gaps.
    pub missed: u64,
    /// END-OF-STREAM is recorded.
    pub ended: bool,
    /// ... flagged ABORT (the session failed).
    pub aborted: bool,
    /// What a crash left after the last complete frame.
    pub torn_tail: Option<TornTail>,
    /// The sparse index's entries.
    pub index_entries: usize,
}

/// Reads a whole recording and reports on it (`record verify`). Errors: a missing, corrupt or
/// future manifest or segment; a corrupt frame inside a closed segment. A torn tail is
/// reported, not an error.
pub fn verify(dir: &Path) -> Result<Verified, RecordingError> {
    let manifest = Manifest::load(dir)?;
    let index_entries = read_index(dir)?.len();
    let mut c = Cursor::new(dir);
    let mut v = Verified {
        dir: dir.to_path_buf(),
        session: manifest.session.clone(),
        state: manifest.state,
        reason: manifest.reason.clone(),
        frames: 0,
        events: 0,
        seq_range: None,
        ts_range: None,
        segments: Vec::new(),
        gaps: Vec::new(),
        missed: 0,
        ended: false,
        aborted: false,
        torn_tail: None,
        index_entries,
    };
    let mut first = None;
    loop {
        let (seg, before) = c.position();
        enum Seen {
            End,
            Pending,
            Gap(Seq, u64),
            Frame(FrameHeader),
        }
        let next = match c.read()? {
            Next::End => Seen::End,
            Next::Pending => Seen::Pending,
            Next::Record(Record::Gap { from, count }) => Seen::Gap(from, count),
            Next::Record(Record::Frame(h, _)) => Seen::Frame(h),
        };
        let (seg_now, after) = c.position();
        let closed = c.file.as_ref().map(|f| f.2.complete).unwrap_or(false);
        match next {
            Seen::End => break,
            Seen::Pending => {
                if c.file.is_none() && (c.segment as usize) < manifest.segments.len() {
                    return Err(RecordingError::Corrupt {
                        path: dir.join(segment_file(c.segment)),
                        offset: 0,
                        reason: "listed in the manifest, but missing or without a header".into(),
                    });
                }
                v.torn_tail = c.torn_tail()?;
                if c.file.is_some() {
                    let s = seg_report(&mut v.segments, c.segment);
                    s.complete = closed;
                }
                break;
            }
            r => {
                let s = seg_report(&mut v.segments, seg_now);
                s.frames += 1;
                s.bytes += after
                    - if seg_now == seg {
                        before
                    } else {
                        HEADER_LEN as u64
                    };
                s.complete = closed;
                let (lo, hi) = match r {
                    Seen::Gap(from, count) => {
                        v.gaps.push(Gap {
                            from,
                            to: from + count - 1,
                        });
                        v.missed += count;
                        (from, from + count - 1)
                    }
                    Seen::Frame(h) => {
                        v.frames += 1;
                        if h.kind == crate::frame::Kind::Control as u8 {
                            v.ended = true;
                            v.aborted = h.has(flags::ABORT);
                        } else {
                            v.events += 1;
                            v.ts_range = Some(match v.ts_range {
                                None => (h.ts, h.ts),
                                Some((a, b)) => (a.min(h.ts), b.max(h.ts)),
                            });
                        }
                        (h.bus_seq, h.bus_seq)
                    }
                    Seen::End | Seen::Pending => unreachable!("matched above"),
                };
                let f = *first.get_or_insert(lo);
                v.seq_range = Some((f, hi));
            }
        }
    }
    Ok(v)
}

fn seg_report(list: &mut Vec<SegmentReport>, index: u32) -> &mut SegmentReport {
    while list.len() <= index as usize {
        list.push(SegmentReport {
            file: segment_file(list.len() as u32),
            complete: false,
            frames: 0,
            bytes: 0,
        });
    }
    &mut list[index as usize]
}

/// What [`Replay::read`] found.
#[derive(Debug)]
pub enum ReplayNext<'a> {
    /// The next bus frame of the window (an event; the recorded END-OF-STREAM is not handed
    /// out), its header as it was on the bus.
    Frame(FrameHeader, &'a [u8]),
    /// The window is over: END-OF-STREAM, the `--to` bound, or the end of what is complete
    /// (a crash, or a recording still being written).
    End,
}

/// A recording read for a replay (`aegis-replay DIR`): the bus frames of a time window, in
/// bus order, with gap records skipped and counted.
///
/// The window is a contiguous run of the recorded bus: it starts at the first event whose
/// `ts` is at least `from` (placed through the sparse index, then read forward) and ends
/// before the first event whose `ts` is greater than `to`. Events inside it keep their
/// headers, LATE ones included, even when their `ts` lies outside the bounds: the replay is
/// a slice of the recorded bus, never a re-filtered stream.
///
/// Where the complete frames stop short of END-OF-STREAM (a crash, a recording still being
/// written), the window ends there. A segment that the manifest lists but that is missing
/// or has no header before the last listed one is an error, as in [`verify`].
pub struct Replay {
    manifest: Manifest,
    cursor: Cursor,
    from: Option<u64>,
    to: Option<u64>,
    /// The window's first event was reached.
    started: bool,
    done: bool,
    gaps: Vec<Gap>,
    ended: bool,
    aborted: bool,
}

impl Replay {
    /// Opens the recording in `dir` (its manifest and index checked) for the window
    /// `from..=to` of event times (`None`: unbounded). The first segment is read at the
    /// first [`Replay::read`].
    pub fn open(dir: &Path, from: Option<u64>, to: Option<u64>) -> Result<Replay, RecordingError> {
        let manifest = Manifest::load(dir)?;
        let index = read_index(dir)?;
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(RecordingError::Manifest {
                    path: dir.to_path_buf(),
                    reason: format!("an empty window: from {f} is after to {t}"),
                });
            }
        }
        // The last entry before which every frame is older than `from`: the window's first
        // event lies at or after it.
        let entry = from.and_then(|f| index.iter().rev().find(|e| e.max_ts_before < f));
        let cursor = match entry {
            Some(e) => Cursor::at(dir, e.segment, e.offset, Some(e.seq)),
            None => Cursor::new(dir),
        };
        Ok(Replay {
            manifest,
            cursor,
            from,
            to,
            started: from.is_none(),
            done: false,
            gaps: Vec::new(),
            ended: false,
            aborted: false,
        })
    }

    /// The recording's manifest, as it was when opened.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Gaps met inside the window so far (frames the recorder missed).
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Whether the recorded END-OF-STREAM was reached, and whether it was flagged ABORT.
    pub fn end_of_stream(&self) -> Option<bool> {
        self.ended.then_some(self.aborted)
    }

    /// The next frame of the window. A corrupt frame inside a closed segment, or a bus seq
    /// out of sequence, is an error (never skipped).
    pub fn read(&mut self) -> Result<ReplayNext<'_>, RecordingError> {
        loop {
            if self.done {
                return Ok(ReplayNext::End);
            }
            // The borrow checker cannot see that the `Frame` arm below returns the cursor's
            // borrow only on its own path, so the header is checked first and the frame read
            // again through `last_payload`.
            let header = match self.cursor.read()? {
                Next::End => {
                    self.done = true;
                    continue;
                }
                Next::Pending => {
                    let seg = self.cursor.segment as usize;
                    let listed = self.manifest.segments.len();
                    let missing = self.cursor.file.is_none() && seg < listed;
                    if missing || seg + 1 < listed {
                        return Err(RecordingError::Corrupt {
                            path: self.cursor.dir.join(segment_file(seg as u32)),
                            offset: self.cursor.pos,
                            reason: format!(
                                "the recording stops here, but its manifest lists {listed} segments"
                            ),
                        });
                    }
                    self.done = true;
                    continue;
                }
                Next::Record(Record::Gap { from, count }) => {
                    if self.started {
                        self.gaps.push(Gap {
                            from,
                            to: from + count - 1,
                        });
                    }
                    continue;
                }
                Next::Record(Record::Frame(h, _)) => h,
            };
            if header.kind == crate::frame::Kind::Control as u8 {
                // The recorded END-OF-STREAM: the session's own ends the replay's bus.
                self.ended = true;
                self.aborted = header.has(flags::ABORT);
                self.done = true;
                continue;
            }
            if !self.started {
                if self.from.is_some_and(|f| header.ts < f) {
                    continue;
                }
                self.started = true;
            }
            if self.to.is_some_and(|t| header.ts > t) {
                self.done = true;
                continue;
            }
            return Ok(ReplayNext::Frame(header, self.cursor.last_payload(&header)));
        }
    }
}
