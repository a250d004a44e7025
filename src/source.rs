//! What the sequencer reads a source from: a producer's ring in shared memory, or, in a
//! backtest, a journal file the daemon maps itself (SPEC section 8: a journal is already
//! frames in the bus format, so a journal-backed source skips the copy into a ring and the
//! hop through a producer process). Both are untrusted input, checked frame by frame.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aegis_shm_client::frame::{flags, stride, FrameError, FrameHeader, Kind, FRAME_HEADER_LEN};
use aegis_shm_client::journal::{
    archived_len, check_frame, HeaderError, JournalHeader, JournalKind, HEADER_LEN,
};
use aegis_shm_client::recording::{RecordingError, Replay, ReplayNext};
use aegis_shm_client::spsc::{FrameRef, RingReader};
use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::pager::{self, Pager};

/// Why a frame could not be read from a source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// A ring frame or cursor is invalid.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A journal frame is invalid, or the journal ends early.
    #[error("{path}: bad frame #{index} at offset {offset}: {reason}")]
    Journal {
        /// The journal.
        path: PathBuf,
        /// The frame's index.
        index: u64,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A recording cannot be read on (corrupt, cut short, an I/O error).
    #[error("recording {dir}: {reason}")]
    Recording {
        /// The recording's directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A source's frames, for the sequencer.
pub enum SourceReader {
    /// A producer's ring.
    Ring(RingReader),
    /// A journal mapped by the daemon.
    Journal(JournalSource),
    /// A recording read by the daemon: one pre-sequenced stream (`aegis-replay DIR`).
    Recording(Box<RecordingSource>),
}

impl From<Box<RecordingSource>> for SourceReader {
    fn from(r: Box<RecordingSource>) -> SourceReader {
        SourceReader::Recording(r)
    }
}

impl From<RingReader> for SourceReader {
    fn from(r: RingReader) -> SourceReader {
        SourceReader::Ring(r)
    }
}

impl From<JournalSource> for SourceReader {
    fn from(j: JournalSource) -> SourceReader {
        SourceReader::Journal(j)
    }
}

impl SourceReader {
    /// The producer's ring, for a ring-backed source.
    pub fn ring(&self) -> Option<&RingReader> {
        match self {
            SourceReader::Ring(r) => Some(r),
            SourceReader::Journal(_) | SourceReader::Recording(_) => None,
        }
    }

    /// The next frame without consuming it, or `None` when nothing is waiting.
    #[inline]
    pub fn peek(&mut self) -> Result<Option<FrameRef<'_>>, SourceError> {
        match self {
            SourceReader::Ring(r) => Ok(r.peek()?),
            SourceReader::Journal(j) => j.peek(),
            SourceReader::Recording(r) => r.peek(),
        }
    }

    /// The header of the next frame, if any, by reference: where the reader keeps it, for a
    /// caller that reads a few fields (a whole-header copy right after the reader stored it
    /// field by field waits for those stores: a store-forwarding stall).
    #[inline]
    pub fn peek_header_ref(&mut self) -> Result<Option<&FrameHeader>, SourceError> {
        match self {
            SourceReader::Ring(r) => {
                if r.peek_header()?.is_none() {
                    return Ok(None);
                }
                Ok(r.peeked_header())
            }
            SourceReader::Journal(j) => j.peek_ref(),
            SourceReader::Recording(r) => {
                if r.peek_header()?.is_none() {
                    return Ok(None);
                }
                Ok(Some(r.head.as_ref().unwrap_or(&RECORDING_EOF)))
            }
        }
    }

    /// The header of the frame under the read position, by reference, once peeked
    /// ([`Self::peek_header_ref`]); `None` before (and at a recording's end).
    #[inline]
    pub fn peeked_header(&self) -> Option<&FrameHeader> {
        match self {
            SourceReader::Ring(r) => r.peeked_header(),
            SourceReader::Journal(j) => j.peeked_stride.map(|_| &j.peeked_header),
            SourceReader::Recording(r) => r.head.as_ref(),
        }
    }

    /// The payload of the frame under the read position, once peeked ([`Self::peek_header_ref`]):
    /// [`Self::peek`] without a second copy of the header.
    #[inline]
    pub fn peeked_payload(&mut self) -> Result<Option<&[u8]>, SourceError> {
        match self {
            SourceReader::Ring(r) => Ok(r.peek()?.map(|f| f.payload)),
            SourceReader::Journal(j) => Ok(j.peeked_payload()),
            SourceReader::Recording(r) => Ok(r.peek()?.map(|f| f.payload)),
        }
    }

    /// Looks ahead without consuming: the first frame at or after `pos` and the position
    /// after it; `None` at the end of what is available now.
    pub fn header_at(&mut self, pos: u64) -> Result<Option<(FrameHeader, u64)>, SourceError> {
        match self {
            SourceReader::Ring(r) => Ok(r.header_at(pos)?),
            SourceReader::Journal(j) => j.header_at(pos),
            // Never asked: a pre-sequenced stream is not reordered.
            SourceReader::Recording(_) => Ok(None),
        }
    }

    /// The position right after the frame under the read position (once peeked).
    #[inline]
    pub fn peeked_end(&self) -> Option<u64> {
        match self {
            SourceReader::Ring(r) => r.peeked_end(),
            SourceReader::Journal(j) => j.peeked_stride.map(|stride| j.head + stride),
            SourceReader::Recording(_) => None,
        }
    }

    /// Consumes the frame returned by the last peek.
    #[inline]
    pub fn consume(&mut self) {
        match self {
            SourceReader::Ring(r) => r.consume(),
            SourceReader::Journal(j) => j.consume(),
            SourceReader::Recording(r) => r.consume(),
        }
    }

    /// Hands consumed bytes back: to the producer (a ring), or to the kernel (a journal's
    /// pages, every [`RELEASE_EVERY`] bytes, so the daemon's resident set stays small).
    #[inline]
    pub fn release(&mut self) {
        match self {
            SourceReader::Ring(r) => r.release(),
            SourceReader::Journal(j) => j.release(),
            SourceReader::Recording(_) => {}
        }
    }

    /// Whether the reader has consumed every frame it knows of (a ring: everything published
    /// as last seen): its next peek looks at the producer's cursor again and, finding
    /// nothing, hands the consumed bytes back. Never for a journal or a recording, which are
    /// read whole.
    #[inline]
    pub fn drained(&self) -> bool {
        match self {
            SourceReader::Ring(r) => r.backlog() == 0,
            SourceReader::Journal(_) | SourceReader::Recording(_) => false,
        }
    }

    /// Whether every frame of the source has one kind (a journal: checked frame by frame).
    /// Then a run of equal timestamps is always in merge-key order, and the sequencer need
    /// not look ahead.
    #[inline]
    pub fn single_kind(&self) -> bool {
        matches!(self, SourceReader::Journal(_))
    }

    /// Whether the source is a pre-sequenced stream (a recording): the sequencer passes its
    /// frames through as they are (source and topic ids, LATE flags), without the
    /// backwards-ts check or the reordering of runs of equal timestamps.
    pub fn presequenced(&self) -> bool {
        matches!(self, SourceReader::Recording(_))
    }

    /// Ring capacity in bytes (0 for a journal, which is not a ring).
    pub fn capacity(&self) -> usize {
        match self {
            SourceReader::Ring(r) => r.capacity(),
            SourceReader::Journal(_) | SourceReader::Recording(_) => 0,
        }
    }
}

/// How far ahead of the frame being read the journal is prefetched, in bytes.
const PREFETCH_AHEAD: usize = 1024;

/// A journal's pages behind the read position go back to the kernel every this many bytes.
pub const RELEASE_EVERY: u64 = 16 << 20;
/// Release boundaries are aligned to this (a multiple of any page size).
const RELEASE_ALIGN: u64 = 1 << 20;

/// A journal mapped read-only, read frame by frame with the journal's rules
/// ([`check_frame`]). Positions are byte offsets into the frame data (after the header). At
/// the end of the data it yields one END-OF-STREAM control frame, as a producer's ring would.
/// Frames get `source_seq` = their index, as a producer pushing them would give them.
pub struct JournalSource {
    path: PathBuf,
    map: Arc<Mmap>,
    /// Pages the mapping in ahead of the read position and out behind it, on a thread of its
    /// own (a journal larger than the pager's window); without one, `release` drops pages.
    pager: Option<Pager>,
    kind: JournalKind,
    frame_count: u64,
    data_len: u64,
    /// Read position in the data. Invariant: `head <= data_len`.
    head: u64,
    /// Index of the frame at `head` (`head / stride`, kept as a counter: no division per
    /// frame). `open` checked `frame_count * stride == data_len`, and `check_frame` holds
    /// every frame to that stride, so the count needs no check of its own while reading.
    index: u64,
    /// The frame at `head`, once checked: its header, valid while `peeked_stride` is set.
    /// Written whole, straight from the mapping, and never through a temporary: the merge
    /// then reads it with loads as wide as the stores that wrote it (a header returned
    /// through a `Result`, stored field by field and copied back whole, was a
    /// store-forwarding stall, the largest single cost of the merge).
    peeked_header: FrameHeader,
    /// The stride of the frame in `peeked_header` (0: END-OF-STREAM); `None`: not peeked.
    peeked_stride: Option<u64>,
    /// The END-OF-STREAM frame was consumed.
    ended: bool,
    /// Data bytes already given back to the kernel.
    released: u64,
    /// The stride of every frame (one kind, fixed payload size).
    stride: u64,
    /// The payload length of every frame.
    event_len: u32,
}

/// Why a journal cannot back a source.
#[derive(Debug, thiserror::Error)]
pub enum JournalOpenError {
    /// The file cannot be read or mapped.
    #[error("{path}: cannot {op}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        error: std::io::Error,
    },
    /// The header is refused.
    #[error("{path}: {error}")]
    Header {
        /// The file.
        path: PathBuf,
        /// Why.
        error: HeaderError,
    },
    /// The file's size does not match its header.
    #[error("{path}: the header implies {expected} bytes, the file has {actual} (truncated, or trailing bytes)")]
    Size {
        /// The file.
        path: PathBuf,
        /// From the header.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// The journal holds another kind than the source declares.
    #[error("{path}: a {found} journal, but the source is declared {declared}")]
    Kind {
        /// The file.
        path: PathBuf,
        /// What the journal holds.
        found: &'static str,
        /// What the REGISTER said.
        declared: &'static str,
    },
}

impl JournalSource {
    /// Maps `path` read-only and checks its header and size. `kind`: the event kind the
    /// source was declared with; the journal must hold that kind.
    pub fn open(path: &Path, kind: Kind) -> Result<JournalSource, JournalOpenError> {
        let io = |op| {
            move |error| JournalOpenError::Io {
                path: path.to_path_buf(),
                op,
                error,
            }
        };
        // Non-blocking, so that a FIFO given as a journal cannot hang the daemon in `open`;
        // and only a regular file may be mapped.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("open the journal"))?;
        let meta = file.metadata().map_err(io("stat the journal"))?;
        if !meta.is_file() {
            return Err(JournalOpenError::Io {
                path: path.to_path_buf(),
                op: "use the journal",
                error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        // SAFETY: a read-only map of a file. Journals are written once (to a temporary name,
        // then renamed) and never modified in place. A process that truncates a journal while
        // it is mapped makes reads past the new end fault (SIGBUS), the documented limit of
        // every mapped file (README, "Security").
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io("map the journal"))?);
        let header = JournalHeader::parse(&map).map_err(|error| JournalOpenError::Header {
            path: path.to_path_buf(),
            error,
        })?;
        let expected = header.file_len().unwrap_or(u64::MAX);
        if expected != map.len() as u64 {
            return Err(JournalOpenError::Size {
                path: path.to_path_buf(),
                expected,
                actual: map.len() as u64,
            });
        }
        if header.kind.event_kind() != kind {
            return Err(JournalOpenError::Kind {
                path: path.to_path_buf(),
                found: header.kind.event_kind().name(),
                declared: kind.name(),
            });
        }
        let event_len = archived_len(kind).unwrap_or(0);
        let stride = stride(event_len) as u64;
        if header.frame_count.checked_mul(stride) != Some(header.data_len) {
            return Err(JournalOpenError::Header {
                path: path.to_path_buf(),
                error: HeaderError::Bad(format!(
                    "{} frames of {stride} bytes do not make the data length {}",
                    header.frame_count, header.data_len
                )),
            });
        }
        // A hint only: the merge reads the file front to back.
        let _ = map.advise(Advice::Sequential);
        // The first window now, the rest on a thread of its own if there is more than another
        // window of it: for less, a thread costs the merge more than the faults it would save
        // (`merge/journals`, whose largest journal is 8.8 MiB: 30.6 M events/s with a pager
        // for it, 32.2 without). Without a thread, the merge takes its own page faults.
        // A kernel without `MADV_POPULATE_READ` (before 5.14) gets no pager either.
        let pager = pager::prime(&map)
            .filter(|&primed| map.len() as u64 > primed + pager::AHEAD)
            .and_then(|primed| Pager::start(map.clone(), "aegis-pager".into(), primed).ok());
        Ok(JournalSource {
            path: path.to_path_buf(),
            pager,
            kind: header.kind,
            frame_count: header.frame_count,
            data_len: header.data_len,
            map,
            head: 0,
            index: 0,
            peeked_header: FrameHeader::default(),
            peeked_stride: None,
            ended: false,
            released: 0,
            stride,
            event_len: event_len as u32,
        })
    }

    /// The kind of the journal, its events' payload length, and their stride.
    #[inline(always)]
    fn shape(&self) -> (JournalKind, u32, u64) {
        (self.kind, self.event_len, self.stride)
    }

    /// Events in the journal, as its header says.
    pub fn frame_count(&self) -> u64 {
        self.frame_count
    }

    fn bad(&self, index: u64, pos: u64, reason: String) -> SourceError {
        SourceError::Journal {
            path: self.path.clone(),
            index,
            offset: HEADER_LEN as u64 + pos,
            reason,
        }
    }

    /// The frame at data position `pos` (the `index`-th), checked; END-OF-STREAM (stride 0)
    /// at the end of the data; `None` once that was consumed. For look-aheads: the merge's
    /// own peek reads into the peek slot ([`JournalSource::peek_ref`]).
    fn frame_at(&self, pos: u64, index: u64) -> Result<Option<(FrameHeader, u64)>, SourceError> {
        if pos == self.data_len && self.ended {
            return Ok(None);
        }
        let mut h = FrameHeader::default();
        let stride = read_frame(&self.map, self.data_len, self.shape(), (pos, index), &mut h)
            .map_err(|r| self.bad(index, pos, r))?;
        Ok(Some((h, stride)))
    }

    /// The next frame's header, in the peek slot (checked and stored there on the first look).
    #[inline(always)]
    fn peek_ref(&mut self) -> Result<Option<&FrameHeader>, SourceError> {
        if self.peeked_stride.is_none() {
            if self.head == self.data_len && self.ended {
                return Ok(None);
            }
            let at = (self.head, self.index);
            match read_frame(
                &self.map,
                self.data_len,
                self.shape(),
                at,
                &mut self.peeked_header,
            ) {
                Ok(stride) => self.peeked_stride = Some(stride),
                Err(r) => return Err(self.bad(at.1, at.0, r)),
            }
        }
        Ok(Some(&self.peeked_header))
    }

    /// The payload of the peeked frame (reading only its length from the peeked header).
    #[inline]
    fn peeked_payload(&self) -> Option<&[u8]> {
        self.peeked_stride?;
        let len = self.peeked_header.len as usize;
        // Checked by `read_frame`: the payload lies inside the data. END-OF-STREAM has none.
        Some(if len == 0 {
            &[][..]
        } else {
            let at = HEADER_LEN + self.head as usize + FRAME_HEADER_LEN;
            &self.map[at..at + len]
        })
    }

    fn peek(&mut self) -> Result<Option<FrameRef<'_>>, SourceError> {
        let Some(&header) = self.peek_ref()? else {
            return Ok(None);
        };
        let payload = self.peeked_payload().expect("just peeked");
        Ok(Some(FrameRef { header, payload }))
    }

    fn header_at(&mut self, pos: u64) -> Result<Option<(FrameHeader, u64)>, SourceError> {
        // Every frame of a journal has the same stride (one kind, a fixed payload size), so a
        // position names its frame's index. `pos` comes from an earlier look-ahead: check it
        // like a cursor anyway.
        if pos < self.head || pos > self.data_len || !pos.is_multiple_of(self.stride) {
            return Err(SourceError::Frame(FrameError::BadCursor(
                "look-ahead position outside the journal or inside a frame",
            )));
        }
        Ok(self
            .frame_at(pos, pos / self.stride)?
            .map(|(h, stride)| (h, pos + stride)))
    }

    fn consume(&mut self) {
        if let Some(stride) = self.peeked_stride.take() {
            if self.peeked_header.kind == Kind::Control as u8 {
                self.ended = true;
            } else {
                self.head += stride;
                self.index += 1;
            }
        }
    }

    fn release(&mut self) {
        // Only what is consumed and not under a peek: the frame under the read position may
        // still be borrowed by the caller.
        if let Some(p) = &self.pager {
            p.advance(HEADER_LEN as u64 + self.head);
            return;
        }
        let upto = (HEADER_LEN as u64 + self.head) & !(RELEASE_ALIGN - 1);
        if upto >= self.released + RELEASE_EVERY {
            // SAFETY: the map is a read-only file mapping, so MADV_DONTNEED only drops this
            // process's page-table entries (a later access would re-read the file), and no
            // reference into [released, upto) is alive: the sequencer consumed those frames
            // and holds no borrow across `release`.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    self.released as usize,
                    (upto - self.released) as usize,
                )
            };
            self.released = upto;
        }
    }
}

/// Reads the frame at data position `at.0` (the `at.1`-th) of a journal's mapping `map` into
/// `out` and checks it; returns its stride. At the end of the data (`data_len`), the
/// END-OF-STREAM header, stride 0. `Err`: why the frame is refused.
// Inlined into the merge, and writing into the caller's slot: returned through memory, a
// large `Result` was copied back with wide loads over the narrower stores that wrote it, and
// that stall alone was a third of `refill` in a profile.
#[inline(always)]
fn read_frame(
    map: &[u8],
    data_len: u64,
    (kind, event_len, stride): (JournalKind, u32, u64),
    (pos, index): (u64, u64),
    out: &mut FrameHeader,
) -> Result<u64, String> {
    if pos == data_len {
        *out = FrameHeader {
            kind: Kind::Control as u8,
            flags: flags::EOF,
            ..FrameHeader::default()
        };
        return Ok(0);
    }
    let at = HEADER_LEN + pos as usize;
    prefetch(map, at + PREFETCH_AHEAD);
    let available = (data_len - pos) as usize;
    let Some(bytes) = map
        .get(at..at + FRAME_HEADER_LEN)
        .and_then(|b| <&[u8; FRAME_HEADER_LEN]>::try_from(b).ok())
    else {
        return Err(format!("truncated frame header: {available} bytes left"));
    };
    *out = FrameHeader::from_bytes(bytes);
    // The frame every journal of this kind holds, in three compares: its event kind, its
    // fixed payload length (so its stride is the journal's), no flag but LATE, and room for
    // it. What `check_frame` would accept with no more work; anything else gets its full
    // rules and its message.
    let stride = if out.kind == kind.event_kind() as u8
        && out.len == event_len
        && out.flags & !flags::LATE == 0
        && stride <= available as u64
    {
        stride as usize
    } else {
        check_frame(out, available, kind)?
    };
    // Our journal writer stores the index already: no store into the header then, which
    // later whole-header copies would have to wait for (a store-forwarding stall).
    if out.source_seq != index {
        out.source_seq = index;
    }
    Ok(stride as u64)
}

/// Asks the CPU to start loading the journal bytes at file offset `at` (a hint: nothing
/// happens past the end, or off x86-64). The merge reads a journal front to back, one frame
/// per event, and the first touch of each line was its largest cost.
#[inline]
fn prefetch(map: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < map.len() {
        // SAFETY: `at` is inside the mapping; a prefetch never faults and reads nothing the
        // program can observe.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                map.as_ptr().add(at).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (map, at);
}

/// The END-OF-STREAM header a recording source hands out after its last frame.
const RECORDING_EOF: FrameHeader = FrameHeader {
    len: 0,
    kind: Kind::Control as u8,
    flags: flags::EOF,
    source_id: 0,
    topic_id: 0,
    reserved: 0,
    ts: 0,
    source_seq: 0,
    bus_seq: 0,
    publish_ns: 0,
};

/// A recording replayed by the daemon (`aegis-replay DIR`, SPEC section 11): the bus frames
/// of a window of it ([`Replay`]), read with `pread` (a file truncated under it is an error,
/// never a SIGBUS), handed to the sequencer one at a time and then END-OF-STREAM. Headers
/// keep what the recorded bus carried (source and topic ids, source seq, LATE); only
/// `publish_ns`, a clock reading of the recording run, is cleared, so that the sequencer
/// stamps its own.
pub struct RecordingSource {
    dir: PathBuf,
    replay: Replay,
    /// The frame under the read position: header and payload, copied out of the reader's
    /// buffer (the sequencer peeks, then consumes).
    head: Option<FrameHeader>,
    payload: Vec<u8>,
    /// END-OF-STREAM was handed out (peeked); `ended` once consumed.
    at_end: bool,
    ended: bool,
}

impl RecordingSource {
    /// Opens the recording in `dir` for the window `from..=to` of event times.
    pub fn open(
        dir: &Path,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<RecordingSource, RecordingError> {
        Ok(RecordingSource {
            dir: dir.to_path_buf(),
            replay: Replay::open(dir, from, to)?,
            head: None,
            payload: Vec::new(),
            at_end: false,
            ended: false,
        })
    }

    /// The recording's manifest.
    pub fn manifest(&self) -> &aegis_shm_client::recording::Manifest {
        self.replay.manifest()
    }

    fn peek_header(&mut self) -> Result<Option<FrameHeader>, SourceError> {
        if self.ended {
            return Ok(None);
        }
        if self.head.is_none() && !self.at_end {
            match self.replay.read() {
                Ok(ReplayNext::Frame(h, payload)) => {
                    let mut h = h;
                    h.publish_ns = 0;
                    self.payload.clear();
                    self.payload.extend_from_slice(payload);
                    self.head = Some(h);
                }
                Ok(ReplayNext::End) => self.at_end = true,
                Err(e) => {
                    return Err(SourceError::Recording {
                        dir: self.dir.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        if self.at_end {
            return Ok(Some(FrameHeader {
                kind: Kind::Control as u8,
                flags: flags::EOF,
                ..FrameHeader::default()
            }));
        }
        Ok(self.head)
    }

    fn peek(&mut self) -> Result<Option<FrameRef<'_>>, SourceError> {
        let Some(header) = self.peek_header()? else {
            return Ok(None);
        };
        let payload = if self.at_end {
            &[][..]
        } else {
            &self.payload[..]
        };
        Ok(Some(FrameRef { header, payload }))
    }

    fn consume(&mut self) {
        if self.head.take().is_none() && self.at_end {
            self.ended = true;
        }
    }
}
