//! Journal files: CSV converted once into frames in the bus format, replayed by
//! memory-mapping (SPEC section 8).
//!
//! The layout (a 64-byte header, then frames in the bus format) and the rules every frame
//! must follow are in [`aegis_shm_client::journal`], shared with the daemon.
//!
//! Every frame starts on a 16-byte boundary of the file, and the file is mapped at a page
//! boundary, so payloads can be decoded in place with [`aegis_shm_client::event::decode`].
//! Frames carry `source_seq` = their index, `topic_id` as given to the writer, and zero
//! `source_id`, `bus_seq` and `publish_ns`; a producer overwrites the per-source fields when it
//! pushes them (`Producer::try_push_frame`).
//!
//! [`JournalReader`] never reads the file into memory: it maps it, checks the header and the
//! file size up front, and validates each frame header as it goes (kind, flags, length within
//! the data, payload size of the kind, frame count). [`JournalReader::for_each`] also gives the
//! pages it has passed back to the kernel, so replaying a journal of any size keeps the
//! resident set small.
//!
//! A journal is written to completion or not at all: [`convert_csv`] writes to a temporary
//! file and renames it, and a journal whose writer did not [`finish`](JournalWriter::finish)
//! is refused as incomplete.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use aegis_shm_client::event::{self, AnyEvent, DecodeError, EventRef};
use aegis_shm_client::frame::{stride, FrameHeader, Kind, FRAME_ALIGN, FRAME_HEADER_LEN};
use aegis_shm_client::journal::{self, HeaderError, JournalHeader};
use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::csv::ParseError;
use crate::names::{FileInfo, FileKind};
use crate::sort::{CsvEvents, OrderCheck};

// The format (header layout, frame rules) is `aegis_shm_client::journal`, shared with the
// daemon, which maps a backtest's journals itself.
pub use aegis_shm_client::journal::{HEADER_LEN, MAGIC, VERSION};
/// [`JournalReader::for_each`] releases the pages behind it every this many bytes.
const RELEASE_EVERY: usize = 16 << 20;
/// Release boundaries are aligned to this (a multiple of any page size).
const RELEASE_ALIGN: usize = 1 << 20;

/// Why a journal could not be written or read.
#[derive(Debug)]
pub enum JournalError {
    /// A system call failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        error: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// A layout version this build does not read.
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The writer never finished (it crashed, or is still writing).
    Incomplete {
        /// The file.
        path: PathBuf,
    },
    /// A header field is invalid.
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file size does not match the header: truncated, or with trailing bytes.
    Size {
        /// The file.
        path: PathBuf,
        /// The size the header implies.
        expected: u64,
        /// The actual size.
        actual: u64,
    },
    /// A frame is invalid.
    BadFrame {
        /// The file.
        path: PathBuf,
        /// The frame's index (0-based).
        index: u64,
        /// The frame's offset in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The frames found do not match the header's count.
    Count {
        /// The file.
        path: PathBuf,
        /// The header's count.
        header: u64,
        /// Frames found.
        found: u64,
    },
    /// The CSV input is invalid.
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The cause.
        error: ParseError,
    },
    /// The CSV input is not sorted by event time.
    Order {
        /// The CSV file.
        path: PathBuf,
        /// The line.
        line: u64,
        /// The line's event time (ns).
        ts: u64,
        /// The previous event time (ns).
        prev: u64,
    },
    /// A journal's frames are not sorted by event time.
    FrameOrder {
        /// The journal.
        path: PathBuf,
        /// The frame's index (0-based).
        frame: u64,
        /// The frame's event time (ns).
        ts: u64,
        /// The previous frame's event time (ns).
        prev: u64,
    },
    /// An event or frame does not fit this journal (wrong kind, encoding failure, bad setup).
    Event {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Io { path, op, error } => {
                write!(f, "{}: cannot {op}: {error}", path.display())
            }
            JournalError::BadMagic { path } => {
                write!(f, "{}: not an Aegis journal (bad magic)", path.display())
            }
            JournalError::Version { path, found } => write!(
                f,
                "{}: journal layout version {found}, this build reads version {VERSION}",
                path.display()
            ),
            JournalError::Incomplete { path } => write!(
                f,
                "{}: incomplete journal (its writer did not finish); convert it again",
                path.display()
            ),
            JournalError::BadHeader { path, reason } => {
                write!(f, "{}: bad journal header: {reason}", path.display())
            }
            JournalError::Size {
                path,
                expected,
                actual,
            } => {
                let what = if actual < expected {
                    "truncated journal"
                } else {
                    "trailing bytes after the last frame"
                };
                write!(
                    f,
                    "{}: {what}: the header implies {expected} bytes, the file has {actual}",
                    path.display()
                )
            }
            JournalError::BadFrame {
                path,
                index,
                offset,
                reason,
            } => write!(
                f,
                "{}: bad frame #{index} at offset {offset}: {reason}",
                path.display()
            ),
            JournalError::Count {
                path,
                header,
                found,
            } => write!(
                f,
                "{}: the header counts {header} frames, the file holds {found}",
                path.display()
            ),
            JournalError::Csv { path, error } => write!(f, "{}: {error}", path.display()),
            JournalError::Order {
                path,
                line,
                ts,
                prev,
            } => write!(
                f,
                "{}:{line}: event time {ts} ns is before the previous row's {prev} ns \
                 (a source must be sorted by event time; `aegis-replay --sort` sorts a file)",
                path.display()
            ),
            JournalError::FrameOrder {
                path,
                frame,
                ts,
                prev,
            } => write!(
                f,
                "{}: frame {frame}: event time {ts} ns is before the previous frame's {prev} ns \
                 (a journal must be sorted by event time)",
                path.display()
            ),
            JournalError::Event { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JournalError::Io { error, .. } => Some(error),
            JournalError::Csv { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |error| JournalError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

/// Encodes the journal header.
fn encode_header(info: &FileInfo, count: u64, data_len: u64, complete: bool) -> [u8; HEADER_LEN] {
    JournalHeader {
        kind: info.kind.journal_kind(),
        complete,
        frame_count: count,
        data_len,
        symbol: info.symbol.clone(),
        interval: info.interval.clone(),
    }
    .encode()
}

/// A 16-byte aligned scratch buffer to serialise events into.
#[repr(C, align(16))]
struct AlignedBuf([u8; 1024]);

static ZEROS: [u8; FRAME_ALIGN] = [0; FRAME_ALIGN];

/// Writes a journal: create, append events, finish.
pub struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
    info: FileInfo,
    count: u64,
    data_len: u64,
    buf: Box<AlignedBuf>,
}

impl JournalWriter {
    /// Creates (or truncates) `path` and writes a provisional header, marked incomplete until
    /// [`JournalWriter::finish`].
    pub fn create(path: &Path, info: &FileInfo) -> Result<JournalWriter, JournalError> {
        // Revalidate: the fields are public and the header has fixed room for them.
        let info =
            FileInfo::new(info.kind, &info.symbol, info.interval.as_deref()).map_err(|e| {
                JournalError::Event {
                    path: path.to_path_buf(),
                    reason: e.0,
                }
            })?;
        let file = File::create(path).map_err(io_err(path, "create the journal"))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&encode_header(&info, 0, 0, false))
            .map_err(io_err(path, "write the journal"))?;
        Ok(JournalWriter {
            path: path.to_path_buf(),
            out,
            info,
            count: 0,
            data_len: 0,
            buf: Box::new(AlignedBuf([0; 1024])),
        })
    }

    /// What the journal holds.
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// Frames written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn event_err(&self, reason: String) -> JournalError {
        JournalError::Event {
            path: self.path.clone(),
            reason,
        }
    }

    /// Appends an event as one frame: `ts` (ns), `topic_id`, `source_seq` = its index. The
    /// event's kind must be the journal's.
    pub fn append(&mut self, ts: u64, topic_id: u32, ev: &AnyEvent) -> Result<(), JournalError> {
        let want = self.info.kind.event_kind();
        if ev.kind() != want {
            return Err(self.event_err(format!(
                "a {} event cannot go into a {} journal",
                ev.kind().name(),
                self.info.kind
            )));
        }
        let len = ev
            .encode_into(&mut self.buf.0)
            .map_err(|e| self.event_err(format!("cannot encode the event: {e}")))?;
        let mut header = FrameHeader::event(ev.kind(), ts, topic_id, len);
        header.source_seq = self.count;
        let res = write_frame(&mut self.out, &header, &self.buf.0[..len]);
        self.wrote(res, len)
    }

    /// Appends a ready-made frame as is (for instance one read from the bus). The header's
    /// `len` must be the payload's, the frame must be an event of the journal's kind, and its
    /// flags may only be [`aegis_shm_client::frame::flags::LATE`].
    pub fn append_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), JournalError> {
        if header.len as usize != payload.len() {
            return Err(self.event_err(format!(
                "frame header says {} payload bytes, the payload has {}",
                header.len,
                payload.len()
            )));
        }
        check_frame(header, stride(payload.len()), self.info.kind)
            .map_err(|r| self.event_err(r))?;
        let res = write_frame(&mut self.out, header, payload);
        self.wrote(res, payload.len())
    }

    /// Accounts for a frame with a payload of `len` bytes, once written.
    fn wrote(&mut self, res: io::Result<()>, len: usize) -> Result<(), JournalError> {
        res.map_err(io_err(&self.path, "write the journal"))?;
        self.count += 1;
        self.data_len += stride(len) as u64;
        Ok(())
    }

    /// Flushes, writes the final header (count, data length, complete) and syncs the file to
    /// disk. Returns the number of frames.
    pub fn finish(self) -> Result<u64, JournalError> {
        let path = self.path;
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| io_err(&path, "write the journal")(e.into_error()))?;
        let header = encode_header(&self.info, self.count, self.data_len, true);
        (|| {
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header)?;
            file.sync_all()
        })()
        .map_err(io_err(&path, "finish the journal"))?;
        Ok(self.count)
    }
}

/// Writes one frame: header, payload, zero padding to the stride.
fn write_frame(out: &mut impl Write, header: &FrameHeader, payload: &[u8]) -> io::Result<()> {
    let pad = stride(payload.len()) - FRAME_HEADER_LEN - payload.len();
    out.write_all(&header.to_bytes())?;
    out.write_all(payload)?;
    out.write_all(&ZEROS[..pad])
}

/// Checks a frame header against the journal's rules ([`journal::check_frame`]).
fn check_frame(h: &FrameHeader, available: usize, kind: FileKind) -> Result<usize, String> {
    journal::check_frame(h, available, kind.journal_kind())
}

/// One frame of a journal, read in place.
#[derive(Copy, Clone, Debug)]
pub struct JournalFrame<'a> {
    /// The frame header.
    pub header: FrameHeader,
    /// The rkyv payload (16-byte aligned, exactly `header.len` bytes).
    pub payload: &'a [u8],
    /// The frame's index (0-based).
    pub index: u64,
    /// The frame's offset in the file.
    pub offset: u64,
}

impl<'a> JournalFrame<'a> {
    /// The event, validated with bytecheck ([`event::decode`]).
    pub fn decode(&self) -> Result<EventRef<'a>, DecodeError> {
        event::decode(self.kind(), self.payload)
    }

    /// The frame's kind (always an event kind: the reader refuses the others).
    pub fn kind(&self) -> Kind {
        self.header.kind().unwrap_or(Kind::Control)
    }
}

/// Where the next frame is.
#[derive(Copy, Clone, Debug)]
struct Cursor {
    offset: usize,
    index: u64,
}

/// A journal, memory-mapped.
pub struct JournalReader {
    path: PathBuf,
    map: Mmap,
    info: FileInfo,
    frame_count: u64,
    data_len: u64,
}

impl fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalReader")
            .field("path", &self.path)
            .field("info", &self.info)
            .field("frame_count", &self.frame_count)
            .field("data_len", &self.data_len)
            .finish()
    }
}

impl JournalReader {
    /// Maps `path` and checks its header: magic, version, completeness, kind, symbol,
    /// interval, and that the file size is exactly the header's plus its data length.
    pub fn open(path: &Path) -> Result<JournalReader, JournalError> {
        let p = || path.to_path_buf();
        let file = File::open(path).map_err(io_err(path, "open the journal"))?;
        let actual = file
            .metadata()
            .map_err(io_err(path, "stat the journal"))?
            .len();
        if actual < HEADER_LEN as u64 {
            let mut head = Vec::new();
            (&file)
                .take(MAGIC.len() as u64)
                .read_to_end(&mut head)
                .map_err(io_err(path, "read the journal"))?;
            if head.len() < MAGIC.len() || head[..] != MAGIC[..] {
                return Err(JournalError::BadMagic { path: p() });
            }
            return Err(JournalError::Size {
                path: p(),
                expected: HEADER_LEN as u64,
                actual,
            });
        }
        // SAFETY: the map is read-only and private to this reader. Journals are written once
        // (to a temporary name, then renamed) and never modified in place; if another process
        // truncated the file while it is mapped, reads past the new end would fault (SIGBUS),
        // the usual caveat of file mappings, which no safe API can rule out.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path, "map the journal"))?;
        let header = JournalHeader::parse(&map).map_err(|e| match e {
            HeaderError::Short | HeaderError::BadMagic => JournalError::BadMagic { path: p() },
            HeaderError::Version(found) => JournalError::Version { path: p(), found },
            HeaderError::Incomplete => JournalError::Incomplete { path: p() },
            HeaderError::Bad(reason) => JournalError::BadHeader { path: p(), reason },
            e @ HeaderError::Recording => JournalError::BadHeader {
                path: p(),
                reason: e.to_string(),
            },
        })?;
        let bad = |reason: String| JournalError::BadHeader { path: p(), reason };
        let kind = FileKind::from_u8(header.kind as u8).expect("every journal kind is a file kind");
        let info = FileInfo::new(kind, &header.symbol, header.interval.as_deref())
            .map_err(|e| bad(e.0))?;
        let (frame_count, data_len) = (header.frame_count, header.data_len);
        let expected = (HEADER_LEN as u64).saturating_add(data_len);
        if expected != actual || usize::try_from(actual).is_err() {
            return Err(JournalError::Size {
                path: p(),
                expected,
                actual,
            });
        }
        if map.len() as u64 != actual {
            // The file changed size between stat and map.
            return Err(JournalError::Size {
                path: p(),
                expected,
                actual: map.len() as u64,
            });
        }
        // A hint only: reading ahead helps the sequential replay; failure changes nothing.
        let _ = map.advise(Advice::Sequential);
        Ok(JournalReader {
            path: path.to_path_buf(),
            map,
            info,
            frame_count,
            data_len,
        })
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the journal holds (kind, symbol, interval).
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// Frames, as the header says.
    pub fn frame_count(&self) -> u64 {
        self.frame_count
    }

    /// Bytes of frames after the header.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Iterates over the frames, validating each header. Ends after the first error. Touched
    /// pages stay resident until the reader is dropped; prefer [`JournalReader::for_each`] for
    /// large journals.
    pub fn frames(&self) -> Frames<'_> {
        Frames {
            reader: self,
            cursor: Cursor {
                offset: HEADER_LEN,
                index: 0,
            },
            failed: false,
        }
    }

    /// Calls `f` on every frame in order, stopping at the first error (a bad frame, or an error
    /// `f` returns), and returns the number of frames. Every 16 MiB it gives the pages already
    /// passed back to the kernel, so the resident set stays small whatever the journal's size
    /// (a frame handed to `f` cannot outlive the call, which is what makes this sound).
    pub fn for_each<E, F>(&mut self, mut f: F) -> Result<u64, E>
    where
        E: From<JournalError>,
        F: FnMut(JournalFrame<'_>) -> Result<(), E>,
    {
        let mut cursor = Cursor {
            offset: HEADER_LEN,
            index: 0,
        };
        let mut released = 0usize;
        while let Some(frame) = self.next_at(&mut cursor) {
            f(frame?)?;
            if cursor.offset - released >= RELEASE_EVERY {
                let upto = cursor.offset & !(RELEASE_ALIGN - 1);
                // SAFETY: the map is a read-only shared file mapping, so MADV_DONTNEED only
                // drops this process's page-table entries: a later access re-reads the same
                // bytes from the file. And no reference into the range is alive: `&mut self`
                // excludes borrows held by the caller, and the frames given to `f` cannot
                // outlive each call (`f` is generic over the frame's lifetime).
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        released,
                        upto - released,
                    )
                };
                released = upto;
            }
        }
        Ok(cursor.index)
    }

    /// Reads every frame and validates every payload with bytecheck; returns the frame count.
    pub fn verify(&self) -> Result<u64, JournalError> {
        let mut n = 0;
        for frame in self.frames() {
            let frame = frame?;
            frame
                .decode()
                .map_err(|e| self.bad_frame(&Cursor::from(&frame), e.to_string()))?;
            n += 1;
        }
        Ok(n)
    }

    fn bad_frame(&self, at: &Cursor, reason: String) -> JournalError {
        JournalError::BadFrame {
            path: self.path.clone(),
            index: at.index,
            offset: at.offset as u64,
            reason,
        }
    }

    /// The frame at `cursor`, advancing it; `None` at the end.
    fn next_at(&self, cursor: &mut Cursor) -> Option<Result<JournalFrame<'_>, JournalError>> {
        let end = self.map.len();
        let count_err = |found| JournalError::Count {
            path: self.path.clone(),
            header: self.frame_count,
            found,
        };
        if cursor.offset >= end {
            return (cursor.index != self.frame_count).then(|| Err(count_err(cursor.index)));
        }
        let at = *cursor;
        if cursor.index == self.frame_count {
            let reason = format!(
                "more frames than the header's count of {}",
                self.frame_count
            );
            return Some(Err(self.bad_frame(&at, reason)));
        }
        let remaining = end - at.offset;
        let Some(bytes) = self
            .map
            .get(at.offset..at.offset + FRAME_HEADER_LEN)
            .and_then(|b| <&[u8; FRAME_HEADER_LEN]>::try_from(b).ok())
        else {
            return Some(Err(self.bad_frame(
                &at,
                format!("truncated frame header: {remaining} bytes left"),
            )));
        };
        let header = FrameHeader::from_bytes(bytes);
        let stride = match check_frame(&header, remaining, self.info.kind) {
            Ok(s) => s,
            Err(reason) => return Some(Err(self.bad_frame(&at, reason))),
        };
        let start = at.offset + FRAME_HEADER_LEN;
        let Some(payload) = self.map.get(start..start + header.len as usize) else {
            return Some(Err(self.bad_frame(&at, "payload past the end".to_string())));
        };
        cursor.offset += stride;
        cursor.index += 1;
        Some(Ok(JournalFrame {
            header,
            payload,
            index: at.index,
            offset: at.offset as u64,
        }))
    }
}

impl From<&JournalFrame<'_>> for Cursor {
    fn from(f: &JournalFrame<'_>) -> Cursor {
        Cursor {
            offset: f.offset as usize,
            index: f.index,
        }
    }
}

/// The iterator of [`JournalReader::frames`].
pub struct Frames<'a> {
    reader: &'a JournalReader,
    cursor: Cursor,
    failed: bool,
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<JournalFrame<'a>, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.reader.next_at(&mut self.cursor);
        self.failed = matches!(item, Some(Err(_)));
        item
    }
}

/// Whether `path` starts with the journal magic (`false` for shorter files).
pub fn is_journal(path: &Path) -> io::Result<bool> {
    let mut head = Vec::with_capacity(MAGIC.len());
    File::open(path)?
        .take(MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    Ok(head == MAGIC)
}

/// Converts a Binance CSV file into a journal; returns the number of events. See
/// [`convert_csv_with_progress`].
pub fn convert_csv(
    input: &Path,
    output: &Path,
    kind: FileKind,
    symbol: &str,
    interval: Option<&str>,
    topic_id: u32,
) -> Result<u64, JournalError> {
    let info = FileInfo::new(kind, symbol, interval).map_err(|e| JournalError::Event {
        path: input.to_path_buf(),
        reason: e.0,
    })?;
    convert_csv_with_progress(input, output, &info, topic_id, false, |_, _| {})
}

/// Converts a Binance CSV file into a journal, streaming (one line in memory at a time), and
/// returns the number of events. Every event gets `topic_id`. The input must be sorted by
/// event time (equal times are fine), as a source must be: the first row that goes back is
/// refused, naming `FILE:LINE`; with `sort`, the rows are sorted by event time first, stably,
/// reading the file twice ([`crate::sort::SortedCsv`]). The journal is written under a
/// temporary name in the same directory and renamed onto `output` only when complete, so a
/// failed conversion leaves no journal (and leaves an existing `output` untouched).
/// `progress(bytes_read, events)` is called every 65,536 events and at the end.
pub fn convert_csv_with_progress(
    input: &Path,
    output: &Path,
    info: &FileInfo,
    topic_id: u32,
    sort: bool,
    progress: impl FnMut(u64, u64),
) -> Result<u64, JournalError> {
    let reader = CsvEvents::open(input, info, sort).map_err(|error| JournalError::Csv {
        path: input.to_path_buf(),
        error,
    })?;
    convert_events(reader, input, output, info, topic_id, progress)
}

/// [`convert_csv_with_progress`] over events already opened: from a file, or streamed out of
/// a zip archive ([`crate::archive::CsvArchive::events`]). `input` names them in errors
/// (`FILE:LINE`; for an archive, `ARCHIVE.zip/ENTRY.csv`).
pub fn convert_events<R: BufRead>(
    mut reader: CsvEvents<R>,
    input: &Path,
    output: &Path,
    info: &FileInfo,
    topic_id: u32,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, JournalError> {
    let csv_err = |error| JournalError::Csv {
        path: input.to_path_buf(),
        error,
    };
    let order_err = |line, ts, prev| JournalError::Order {
        path: input.to_path_buf(),
        line,
        ts,
        prev,
    };
    let mut tmp_name = output
        .file_name()
        .ok_or_else(|| JournalError::Event {
            path: output.to_path_buf(),
            reason: "the output has no file name".to_string(),
        })?
        .to_os_string();
    tmp_name.push(format!(".partial-{}", std::process::id()));
    let tmp = output.with_file_name(tmp_name);
    let result = (|| {
        let mut writer = JournalWriter::create(&tmp, info)?;
        let mut order = OrderCheck::default();
        while let Some(item) = reader.next() {
            let (ts, ev) = item.map_err(csv_err)?;
            order
                .next(ts)
                .map_err(|prev| order_err(reader.line(), ts, prev))?;
            writer.append(ts, topic_id, &ev)?;
            if writer.count() & 0xffff == 0 {
                progress(reader.bytes_read(), writer.count());
            }
        }
        let n = writer.finish()?;
        progress(reader.bytes_read(), n);
        fs::rename(&tmp, output).map_err(io_err(output, "rename the journal into place"))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{data, TempPath};
    use aegis_shm_client::event::{Book, Event, Kline, Trade};
    use aegis_shm_client::event::{Decimal, Symbol};
    use aegis_shm_client::frame::flags;

    fn trade(id: u64) -> AnyEvent {
        AnyEvent::Trade(Trade {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            id,
            price: Decimal::parse("63201.05").unwrap(),
            qty: Decimal::parse("0.001").unwrap(),
            buyer_maker: id & 1 == 0,
        })
    }

    fn trade_info() -> FileInfo {
        FileInfo::new(FileKind::Trade, "BTCUSDT", None).unwrap()
    }

    fn write_trades(path: &Path, n: u64) {
        let mut w = JournalWriter::create(path, &trade_info()).unwrap();
        for i in 0..n {
            w.append(1_000 + i, 3, &trade(i)).unwrap();
        }
        assert_eq!(w.finish().unwrap(), n);
    }

    #[test]
    fn converts_the_1m_file_and_replays_it_in_place() {
        let out = TempPath::new("1m.jnl");
        let input = data("BTCUSDT-1m-2024-09-21.csv");
        let n = convert_csv(
            &input,
            out.path(),
            FileKind::Kline,
            "BTCUSDT",
            Some("1m"),
            7,
        )
        .unwrap();
        assert_eq!(n, 1440);

        let rd = JournalReader::open(out.path()).unwrap();
        assert_eq!(rd.frame_count(), 1440);
        assert_eq!(rd.info().topic(), "klines.BTCUSDT.1m");
        assert_eq!(
            rd.data_len(),
            1440 * stride(Kline::ARCHIVED_LEN) as u64,
            "frames are back to back"
        );
        assert_eq!(rd.verify().unwrap(), 1440);

        // The same events, in the same order, as parsing the CSV.
        let csv = crate::csv::CsvReader::open(&input, rd.info()).unwrap();
        let mut n = 0;
        for (frame, item) in rd.frames().zip(csv) {
            let frame = frame.unwrap();
            let (ts, ev) = item.unwrap();
            assert_eq!(frame.header.ts, ts);
            assert_eq!(frame.header.topic_id, 7);
            assert_eq!(frame.header.source_seq, n);
            assert_eq!(frame.payload.as_ptr() as usize % 16, 0);
            let AnyEvent::Kline(k) = ev else { panic!() };
            match frame.decode().unwrap() {
                EventRef::Kline(a) => {
                    assert_eq!(a.close_time.to_native(), k.close_time);
                    assert_eq!(a.open.get(), k.open);
                    assert_eq!(a.taker_buy_quote.get(), k.taker_buy_quote);
                    assert_eq!(a.interval.as_str(), "1m");
                }
                other => panic!("{other:?}"),
            }
            n += 1;
        }
        assert_eq!(n, 1440);
    }

    #[test]
    fn for_each_visits_every_frame_and_stops_on_request() {
        let p = TempPath::new("each.jnl");
        write_trades(p.path(), 100);
        let mut rd = JournalReader::open(p.path()).unwrap();
        let mut ids = Vec::new();
        let n = rd
            .for_each(|f| -> Result<(), JournalError> {
                match f.decode() {
                    Ok(EventRef::Trade(t)) => ids.push(t.id.to_native()),
                    other => panic!("{other:?}"),
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 100);
        assert_eq!(ids, (0..100).collect::<Vec<_>>());

        #[derive(Debug)]
        enum Stop {
            Here,
            Journal,
        }
        impl From<JournalError> for Stop {
            fn from(_: JournalError) -> Stop {
                Stop::Journal
            }
        }
        let r = rd.for_each(|f| {
            if f.index == 5 {
                Err(Stop::Here)
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(Stop::Here)), "{r:?}");
        // A boxed error works too.
        let r: Result<u64, Box<dyn std::error::Error>> = rd.for_each(|_| Ok(()));
        assert_eq!(r.unwrap(), 100);
    }

    #[test]
    fn for_each_releases_pages_and_stays_correct() {
        // 200,000 trades of 112 bytes: 22 MB, past the 16 MiB release threshold.
        let p = TempPath::new("big.jnl");
        let n = 200_000;
        write_trades(p.path(), n);
        let mut rd = JournalReader::open(p.path()).unwrap();
        assert!(rd.data_len() as usize > RELEASE_EVERY);
        let mut sum = 0u64;
        let mut ts_ok = true;
        let count = rd
            .for_each(|f| -> Result<(), JournalError> {
                ts_ok &= f.header.ts == 1_000 + f.index;
                if let Ok(EventRef::Trade(t)) = f.decode() {
                    sum += t.id.to_native();
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(count, n);
        assert!(ts_ok);
        assert_eq!(sum, n * (n - 1) / 2);
        // Released pages come back from the file, unchanged.
        assert_eq!(rd.verify().unwrap(), n);
    }

    #[test]
    fn empty_journal() {
        let p = TempPath::new("empty.jnl");
        write_trades(p.path(), 0);
        let rd = JournalReader::open(p.path()).unwrap();
        assert_eq!(rd.frame_count(), 0);
        assert_eq!(rd.frames().count(), 0);
        assert!(is_journal(p.path()).unwrap());
        assert!(!is_journal(&data("BTCUSDT-1h-2024-08.csv")).unwrap());
    }

    fn corrupt(p: &Path, at: usize, bytes: &[u8]) {
        let mut b = fs::read(p).unwrap();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        fs::write(p, b).unwrap();
    }

    fn open_err(p: &Path) -> String {
        JournalReader::open(p).unwrap_err().to_string()
    }

    fn frames_err(p: &Path) -> String {
        let rd = JournalReader::open(p).unwrap();
        let mut it = rd.frames();
        let e = it.find_map(Result::err).expect("an error");
        assert!(it.next().is_none(), "the iterator ends after an error");
        e.to_string()
    }

    #[test]
    fn header_damage_is_refused_clearly() {
        let p = TempPath::new("hdr.jnl");
        write_trades(p.path(), 3);
        let good = fs::read(p.path()).unwrap();
        let reset = || fs::write(p.path(), &good).unwrap();

        corrupt(p.path(), 0, b"NOTAJRNL");
        assert!(open_err(p.path()).contains("bad magic"));
        reset();
        corrupt(p.path(), 8, &9u32.to_le_bytes());
        assert!(open_err(p.path()).contains("version 9"));
        reset();
        corrupt(p.path(), 13, &[0]);
        assert!(open_err(p.path()).contains("incomplete"));
        reset();
        corrupt(p.path(), 12, &[42]);
        assert!(open_err(p.path()).contains("unknown kind 42"));
        reset();
        corrupt(p.path(), 48, b"1m");
        assert!(open_err(p.path()).contains("interval"));
        reset();
        corrupt(p.path(), 32, b"BTC USDT");
        assert!(open_err(p.path()).contains("symbol"));

        // Truncation anywhere, and trailing bytes.
        for len in [0, 5, 63, 64, 100, good.len() - 1] {
            fs::write(p.path(), &good[..len]).unwrap();
            let e = open_err(p.path());
            let want = if len < 8 { "bad magic" } else { "truncated" };
            assert!(e.contains(want), "{len}: {e}");
        }
        let mut long = good.clone();
        long.extend_from_slice(&[0; 16]);
        fs::write(p.path(), &long).unwrap();
        assert!(open_err(p.path()).contains("trailing bytes"));

        assert!(open_err(Path::new("/nonexistent/x.jnl")).contains("cannot open"));
    }

    #[test]
    fn frame_damage_is_refused_clearly() {
        let p = TempPath::new("frames.jnl");
        write_trades(p.path(), 3);
        let good = fs::read(p.path()).unwrap();
        let second = HEADER_LEN + stride(Trade::ARCHIVED_LEN);
        let reset = || fs::write(p.path(), &good).unwrap();

        corrupt(p.path(), second + 4, &[9]);
        let e = frames_err(p.path());
        assert!(
            e.contains("bad frame #1") && e.contains("unknown frame kind 9"),
            "{e}"
        );
        reset();
        corrupt(p.path(), second + 4, &[Kind::Book as u8]);
        assert!(frames_err(p.path()).contains("a book frame in a trade journal"));
        reset();
        corrupt(p.path(), second, &1_000u32.to_le_bytes());
        assert!(frames_err(p.path()).contains("does not fit"));
        reset();
        corrupt(p.path(), second, &8u32.to_le_bytes());
        assert!(frames_err(p.path()).contains("payload of 8 bytes"));
        reset();
        corrupt(p.path(), second + 5, &[flags::EOF]);
        assert!(frames_err(p.path()).contains("unexpected flags"));
        reset();
        corrupt(p.path(), second + 4, &[0, flags::HEARTBEAT]);
        assert!(frames_err(p.path()).contains("control frame"));
        reset();
        // The header's count disagrees with the frames.
        corrupt(p.path(), 16, &4u64.to_le_bytes());
        assert!(frames_err(p.path()).contains("counts 4 frames, the file holds 3"));
        reset();
        corrupt(p.path(), 16, &2u64.to_le_bytes());
        let e = frames_err(p.path());
        assert!(
            e.contains("bad frame #2") && e.contains("header's count of 2"),
            "{e}"
        );
        reset();
        // A payload that passes the header checks but not bytecheck (a bool byte of 7).
        corrupt(p.path(), second + FRAME_HEADER_LEN + 56, &[7]);
        assert_eq!(JournalReader::open(p.path()).unwrap().frames().count(), 3);
        let e = JournalReader::open(p.path()).unwrap().verify().unwrap_err();
        assert!(e.to_string().contains("bad frame #1"), "{e}");
    }

    #[test]
    fn writer_refuses_foreign_events_and_frames() {
        let p = TempPath::new("w.jnl");
        let mut w = JournalWriter::create(p.path(), &trade_info()).unwrap();
        let book = AnyEvent::Book(Book {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            update_id: 1,
            bid_price: Decimal::default(),
            bid_qty: Decimal::default(),
            ask_price: Decimal::default(),
            ask_qty: Decimal::default(),
        });
        let e = w.append(1, 0, &book).unwrap_err();
        assert!(e
            .to_string()
            .contains("a book event cannot go into a trade journal"));

        // A frame read from another journal goes in as is, LATE flag included.
        let src = TempPath::new("src.jnl");
        write_trades(src.path(), 2);
        let rd = JournalReader::open(src.path()).unwrap();
        for f in rd.frames() {
            let f = f.unwrap();
            let mut h = f.header;
            h.flags = flags::LATE;
            h.bus_seq = 40 + f.index;
            w.append_frame(&h, f.payload).unwrap();
        }
        let bad = FrameHeader::event(Kind::Trade, 1, 0, 3);
        assert!(w.append_frame(&bad, &[0; 3]).is_err());
        assert_eq!(w.finish().unwrap(), 2);
        let rd2 = JournalReader::open(p.path()).unwrap();
        let hs: Vec<_> = rd2.frames().map(|f| f.unwrap().header).collect();
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[1].bus_seq, 41);
        assert!(hs[1].has(flags::LATE));
        assert_eq!(rd2.verify().unwrap(), 2);
    }

    #[test]
    fn failed_conversions_leave_nothing_behind() {
        let dir = std::env::temp_dir();
        let csv = TempPath::new("bad.csv");
        let out = TempPath::new("bad.jnl");
        let partials = || {
            let prefix = out
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    let n = e
                        .as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .into_owned();
                    n.starts_with(&prefix)
                })
                .count()
        };
        fs::write(
            csv.path(),
            "1,1,1,1,1704067200000,True\n2,x,1,1,1704067200000,True\n",
        )
        .unwrap();
        let e =
            convert_csv(csv.path(), out.path(), FileKind::Trade, "BTCUSDT", None, 0).unwrap_err();
        assert!(e.to_string().contains("line 2, column 2 (price)"), "{e}");
        assert_eq!(partials(), 0);

        // Out of order.
        fs::write(
            csv.path(),
            "1,1,1,1,1704067200001,True\n2,1,1,1,1704067200000,True\n",
        )
        .unwrap();
        let e =
            convert_csv(csv.path(), out.path(), FileKind::Trade, "BTCUSDT", None, 0).unwrap_err();
        assert!(e.to_string().contains("bad.csv:2: event time"), "{e}");
        assert_eq!(partials(), 0);

        // A good conversion, then a failed one: the good journal survives.
        fs::write(csv.path(), "1,1,1,1,1704067200000,True\n").unwrap();
        let info = trade_info();
        let mut calls = 0;
        let n =
            convert_csv_with_progress(csv.path(), out.path(), &info, 0, false, |_, _| calls += 1)
                .unwrap();
        assert_eq!((n, calls), (1, 1));
        fs::write(csv.path(), "garbage\n1,x\n").unwrap();
        assert!(convert_csv(csv.path(), out.path(), FileKind::Trade, "BTCUSDT", None, 0).is_err());
        assert_eq!(JournalReader::open(out.path()).unwrap().frame_count(), 1);
        assert_eq!(partials(), 1);
    }
}
