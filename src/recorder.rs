//! The recorder (SPEC section 11): a thread of the daemon that reads a session's bus through
//! its own consumer slot and appends every frame, as the bus carried it, to the segment files
//! of a recording (format: `aegis_shm_client::recording`).
//!
//! - **Backtest:** the recorder is a consumer like any other: the bus waits for it. An error
//!   (disk full, I/O) ends the thread with the error, its slot is released, and the session
//!   fails with the error as its reason.
//! - **Live:** the bus never waits. A lapped recorder writes a gap record with the missed
//!   range, counted. An error ends the recording, marked `incomplete` with the reason in the
//!   manifest and the ctl segment; the bus goes on.
//!
//! Writes are `pwrite`s from a buffer (never a writable mapping: a full disk is an error,
//! never a SIGBUS), flushed when the buffer fills or the recorder has caught up with the bus.
//! Each segment is reserved with `fallocate` when it is opened, so a full disk shows up at
//! roll time. The manifest is rewritten (atomically) when a segment opens or closes and at
//! the end; the position is published in the ctl segment after every flush.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aegis_shm_client::frame::{self, flags, FrameHeader, Kind, Seq};
use aegis_shm_client::journal::{RecordingHeader, HEADER_LEN};
use aegis_shm_client::protocol::Mode;
use aegis_shm_client::recording::{
    frame_crc, gap_header, segment_file, Gap, IndexEntry, Manifest, RecordingState, SegmentInfo,
    DEFAULT_SEGMENT_BYTES, INDEX_EVERY_BYTES, INDEX_FILE, MANIFEST_FILE, MANIFEST_VERSION,
    MIN_SEGMENT_BYTES,
};
use aegis_shm_client::spmc::{BusReader, ReadError};
use aegis_shm_client::stats::{RecordingProgress, StatsWriter};
use aegis_shm_client::wait::{Deadline, Park};

/// Bytes buffered before a write.
const WRITE_BUF: usize = 256 << 10;
/// How long the recorder sleeps on the bus before it looks at its stop flag again.
const IDLE_SLICE: Duration = Duration::from_millis(50);
/// Live: how long the recorder sleeps when it has caught up with the bus.
const LIVE_POLL: Duration = Duration::from_millis(2);

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The directory cannot be used.
    #[error("recording directory {path}: {reason}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A write failed (disk full, I/O error).
    #[error("recording: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The bus could not be read.
    #[error("recording: reading the bus: {0}")]
    Bus(ReadError),
}

/// A recording set up at `session create`: the directory checked and its bus slot held.
pub struct Prepared {
    dir: PathBuf,
    segment_bytes: u64,
    reader: BusReader,
}

/// What the manifest says about the session, known at its start.
pub struct SessionFacts {
    /// Name.
    pub session: String,
    /// UUID.
    pub session_id: String,
    /// Mode.
    pub mode: Mode,
    /// Source names by rank.
    pub sources: Vec<String>,
    /// Their declared kinds and topics, by rank (empty: unknown, a replayed recording that
    /// lacks them).
    pub declared: Vec<aegis_shm_client::recording::RecordedSource>,
    /// Topic table.
    pub topics: std::collections::BTreeMap<String, u32>,
}

/// Checks `dir` (absolute; created if missing; must hold no recording yet and be writable)
/// and keeps `reader`, attached to the bus before anything flows, for the recorder.
pub fn prepare(
    dir: &Path,
    segment_bytes: Option<u64>,
    reader: BusReader,
) -> Result<Prepared, RecordError> {
    let bad = |reason: String| RecordError::Dir {
        path: dir.to_path_buf(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    let segment_bytes = segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES);
    if segment_bytes < MIN_SEGMENT_BYTES || !segment_bytes.is_multiple_of(4096) {
        return Err(bad(format!(
            "--record-segment-bytes must be a multiple of 4096 of at least {MIN_SEGMENT_BYTES}, got {segment_bytes}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
    if dir.join(MANIFEST_FILE).exists() {
        return Err(bad(
            "already holds a recording; choose an empty directory".into()
        ));
    }
    // Writable? Probe with the file the recorder creates first.
    let probe = dir.join(INDEX_FILE);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| bad(format!("cannot write in it: {e}")))?;
    Ok(Prepared {
        dir: dir.to_path_buf(),
        segment_bytes,
        reader,
    })
}

impl Prepared {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bus slot the recorder holds.
    pub fn slot(&self) -> usize {
        self.reader.slot()
    }
}

/// How a recording ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Complete, or incomplete (gaps, stopped, a live error).
    pub state: RecordingState,
    /// Why incomplete.
    pub reason: Option<String>,
}

/// Starts the recorder thread. It ends at END-OF-STREAM, on `stop`, or on an error (backtest:
/// `Err`; live: `Ok` with an incomplete outcome, after marking the recording so).
pub fn spawn(
    prepared: Prepared,
    facts: SessionFacts,
    stats: Arc<StatsWriter>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<Result<Outcome, RecordError>>> {
    let name = format!("aegis-rec-{}", facts.session);
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            let Prepared {
                dir,
                segment_bytes,
                mut reader,
            } = prepared;
            let live = facts.mode == Mode::Live;
            let session = facts.session.clone();
            let mut w = Writer::new(dir, segment_bytes, facts, stats);
            let r = w.run(&mut reader, &stop);
            drop(reader); // release the bus slot before anything slow
            match r {
                Ok(outcome) => Ok(outcome),
                Err(e) => {
                    let reason = e.to_string();
                    eprintln!("aegis: session {session}: {reason}");
                    w.abandon(&reason);
                    if live {
                        Ok(Outcome {
                            state: RecordingState::Incomplete,
                            reason: Some(reason),
                        })
                    } else {
                        Err(e)
                    }
                }
            }
        })
}

/// The segment being written.
struct Segment {
    file: File,
    path: PathBuf,
    /// File offset where `buf` goes.
    written: u64,
    info: SegmentInfo,
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    manifest: Manifest,
    stats: Arc<StatsWriter>,
    seg: Option<Segment>,
    buf: Vec<u8>,
    index: Vec<u8>,
    index_file: Option<File>,
    /// Bytes of frames (all segments) at which the next index entry is due.
    next_index_at: u64,
    bytes: u64,
    gaps: u64,
    missed: u64,
    max_ts: u64,
}

impl Writer {
    fn new(dir: PathBuf, segment_bytes: u64, f: SessionFacts, stats: Arc<StatsWriter>) -> Writer {
        Writer {
            manifest: Manifest {
                version: MANIFEST_VERSION,
                session: f.session,
                session_id: f.session_id,
                mode: f.mode,
                state: RecordingState::Recording,
                reason: None,
                sources: f.sources,
                declared: f.declared,
                topics: f.topics,
                segment_bytes,
                segments: Vec::new(),
                gaps: Vec::new(),
                frames: 0,
                next_seq: 0,
            },
            dir,
            segment_bytes,
            stats,
            seg: None,
            buf: Vec::with_capacity(WRITE_BUF + (1 << 16)),
            index: Vec::new(),
            index_file: None,
            next_index_at: 0,
            bytes: 0,
            gaps: 0,
            missed: 0,
            max_ts: 0,
        }
    }

    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
        let path = path.to_path_buf();
        move |source| RecordError::Io { what, path, source }
    }

    fn store_manifest(&self) -> Result<(), RecordError> {
        self.manifest
            .store(&self.dir)
            .map_err(self.io("writing", &self.dir.join(MANIFEST_FILE)))
    }

    fn run(&mut self, reader: &mut BusReader, stop: &AtomicBool) -> Result<Outcome, RecordError> {
        let index_path = self.dir.join(INDEX_FILE);
        self.index_file = Some(
            OpenOptions::new()
                .append(true)
                .open(&index_path)
                .map_err(self.io("opening", &index_path))?,
        );
        self.store_manifest()?;
        self.publish(RecordingState::Recording, None);
        let mut wait = Park::default();
        let mut payload = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return self.finish(Some("the session stopped before END-OF-STREAM".into()));
            }
            let h = match reader.try_next() {
                Ok(Some(f)) => {
                    payload.clear();
                    payload.extend_from_slice(f.payload);
                    f.header
                }
                Ok(None) => {
                    // Caught up: what is buffered goes to the file now, and the position out.
                    self.flush()?;
                    if self.manifest.mode == Mode::Live {
                        // Live: a timed poll, not the bus doorbell. Woken with every frame,
                        // the recorder competed with the session's consumers for the CPU at
                        // each event (on 2 cores, `bench` live p50 at 1,000 events/s went from
                        // 13-16 µs to 41-46 µs); polling, it runs once per LIVE_POLL with
                        // what arrived meanwhile. The bus holds far more than LIVE_POLL of any
                        // feed (4 MiB by default), so this costs no laps.
                        std::thread::sleep(LIVE_POLL);
                    } else {
                        reader.idle(&mut wait, Deadline::after(IDLE_SLICE));
                    }
                    continue;
                }
                // Lapped (live): the next frame shows the range missed.
                Err(ReadError::Overrun { .. } | ReadError::Timeout) => continue,
                Err(e) => return Err(RecordError::Bus(e)),
            };
            self.record(h, &payload)?;
            if h.kind == Kind::Control as u8 && h.has(flags::EOF) {
                let reason = if h.has(flags::ABORT) {
                    Some("the session failed: its stream was aborted".to_string())
                } else {
                    None
                };
                return self.finish(reason);
            }
        }
    }

    /// Appends one bus frame, after a gap record if frames were missed before it.
    fn record(&mut self, h: &FrameHeader, payload: &[u8]) -> Result<(), RecordError> {
        let expected = self.manifest.next_seq;
        if h.bus_seq > expected {
            let count = h.bus_seq - expected;
            self.append(&gap_header(expected, count, self.max_ts), &[])?;
            self.gaps += 1;
            self.missed += count;
            self.manifest.gaps.push(Gap {
                from: expected,
                to: h.bus_seq - 1,
            });
            eprintln!(
                "aegis: session {}: recorder lapped: bus seqs {expected}..={} missed (gap recorded)",
                self.manifest.session,
                h.bus_seq - 1
            );
        } else if h.bus_seq < expected {
            // The bus never goes back; a bug, never silently recorded twice.
            return Err(RecordError::Bus(ReadError::Corrupt(
                frame::FrameError::BadCursor("bus seq went backwards under the recorder"),
            )));
        }
        self.append(h, payload)
    }

    fn append(&mut self, h: &FrameHeader, payload: &[u8]) -> Result<(), RecordError> {
        let stride = frame::stride(payload.len()) as u64;
        let room = self.segment_bytes - HEADER_LEN as u64;
        let seg_used = self.seg.as_ref().map(|s| s.info.bytes);
        if seg_used.is_none_or(|used| used + stride > room) {
            self.roll(h.bus_seq)?;
        }
        let seg = self.seg.as_mut().expect("a segment is open");
        let offset = HEADER_LEN as u64 + seg.info.bytes;
        if self.bytes >= self.next_index_at {
            let e = IndexEntry {
                seq: h.bus_seq,
                max_ts_before: self.max_ts,
                segment: self.manifest.segments.len() as u32 - 1,
                offset,
            };
            self.index.extend_from_slice(&e.encode());
            self.next_index_at = self.bytes + INDEX_EVERY_BYTES;
        }
        let mut sealed = *h;
        sealed.reserved = frame_crc(h, payload);
        self.buf.extend_from_slice(&sealed.to_bytes());
        self.buf.extend_from_slice(payload);
        let pad = stride as usize - frame::FRAME_HEADER_LEN - payload.len();
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        seg.info.frames += 1;
        seg.info.bytes += stride;
        if h.kind != Kind::Control as u8 {
            self.max_ts = self.max_ts.max(h.ts);
            seg.info.ts_range = Some(match seg.info.ts_range {
                None => (h.ts, h.ts),
                Some((a, b)) => (a.min(h.ts), b.max(h.ts)),
            });
        }
        self.bytes += stride;
        self.manifest.frames += 1;
        self.manifest.next_seq = if h.has(flags::GAP) {
            h.bus_seq + h.source_seq
        } else {
            h.bus_seq + 1
        };
        if self.buf.len() >= WRITE_BUF {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is buffered and publishes the position.
    fn flush(&mut self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let seg = self.seg.as_mut().expect("bytes are buffered in a segment");
        seg.file
            .write_all_at(&self.buf, seg.written)
            .map_err(|source| RecordError::Io {
                what: "writing",
                path: seg.path.clone(),
                source,
            })?;
        seg.written += self.buf.len() as u64;
        self.buf.clear();
        if !self.index.is_empty() {
            let path = self.dir.join(INDEX_FILE);
            let f = self.index_file.as_mut().expect("opened in run");
            std::io::Write::write_all(f, &self.index).map_err(|source| RecordError::Io {
                what: "writing",
                path,
                source,
            })?;
            self.index.clear();
        }
        self.publish(RecordingState::Recording, None);
        Ok(())
    }

    fn progress(&self) -> RecordingProgress {
        RecordingProgress {
            segment: self.manifest.segments.len().saturating_sub(1) as u32,
            frames: self.manifest.frames,
            bytes: self.bytes,
            next_seq: self.manifest.next_seq,
            gaps: self.gaps,
            missed: self.missed,
        }
    }

    fn publish(&self, state: RecordingState, reason: Option<&str>) {
        self.stats.set_recording(state, self.progress(), reason);
    }

    /// Closes the segment being written: header completed, reservation beyond the data
    /// given back.
    fn close_segment(&mut self) -> Result<(), RecordError> {
        self.flush()?;
        let Some(seg) = self.seg.take() else {
            return Ok(());
        };
        let header = RecordingHeader {
            complete: true,
            frame_count: seg.info.frames,
            data_len: seg.info.bytes,
            first_seq: seg.info.first_seq,
            index: self.manifest.segments.len() as u32 - 1,
        };
        let e = |what| {
            let path = seg.path.clone();
            move |source| RecordError::Io { what, path, source }
        };
        seg.file
            .set_len(HEADER_LEN as u64 + seg.info.bytes)
            .map_err(e("truncating"))?;
        seg.file
            .write_all_at(&header.encode(), 0)
            .map_err(e("closing"))?;
        seg.file.sync_data().map_err(e("syncing"))?;
        let last = self
            .manifest
            .segments
            .last_mut()
            .expect("listed when opened");
        *last = SegmentInfo {
            complete: true,
            ..seg.info
        };
        Ok(())
    }

    /// Closes the current segment and opens the next, reserving its space.
    fn roll(&mut self, first_seq: Seq) -> Result<(), RecordError> {
        self.close_segment()?;
        let index = self.manifest.segments.len() as u32;
        let name = segment_file(index);
        let path = self.dir.join(&name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(self.io("creating", &path))?;
        reserve(&file, self.segment_bytes).map_err(self.io("reserving space for", &path))?;
        let header = RecordingHeader {
            complete: false,
            frame_count: 0,
            data_len: 0,
            first_seq,
            index,
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(self.io("writing", &path))?;
        let info = SegmentInfo {
            file: name,
            first_seq,
            frames: 0,
            bytes: 0,
            ts_range: None,
            complete: false,
        };
        self.manifest.segments.push(info.clone());
        self.seg = Some(Segment {
            file,
            path,
            written: HEADER_LEN as u64,
            info,
        });
        self.store_manifest()
    }

    /// END-OF-STREAM (or a stop): everything written, the segment closed, the manifest final.
    fn finish(&mut self, reason: Option<String>) -> Result<Outcome, RecordError> {
        self.close_segment()?;
        let reason = reason.or_else(|| {
            (self.gaps > 0).then(|| {
                format!(
                    "{} frames missed in {} gaps: the live bus lapped the recorder",
                    self.missed, self.gaps
                )
            })
        });
        let state = if reason.is_some() {
            RecordingState::Incomplete
        } else {
            RecordingState::Complete
        };
        self.manifest.state = state;
        self.manifest.reason = reason.clone();
        self.store_manifest()?;
        self.publish(state, reason.as_deref());
        Ok(Outcome { state, reason })
    }

    /// After an error: mark the recording incomplete wherever that can still be written.
    fn abandon(&mut self, reason: &str) {
        self.buf.clear();
        self.index.clear();
        self.manifest.state = RecordingState::Incomplete;
        self.manifest.reason = Some(reason.to_string());
        if let Some(last) = self.manifest.segments.last_mut() {
            if let Some(seg) = &self.seg {
                last.frames = seg.info.frames;
            }
        }
        if let Err(e) = self.manifest.store(&self.dir) {
            eprintln!(
                "aegis: session {}: the manifest could not be marked incomplete either: {e}",
                self.manifest.session
            );
        }
        self.publish(RecordingState::Incomplete, Some(reason));
    }
}

/// Reserves `len` bytes for `file` (fallocate), so that a full disk is an error now rather
/// than later. A file system without fallocate is left unreserved (writes still report
/// ENOSPC: the recorder never writes through a mapping).
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: a valid open descriptor; fallocate touches no memory of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}
