//! Loom models of the broadcast bus (`spmc::BusWriter` / `spmc::BusReader`), both policies.
//!
//! Run with:
//!
//! ```text
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p aegis-shm-client --release --test 'loom_*'
//! ```
//!
//! Loom explores the interleavings (and weak-memory outcomes) of the bus's atomics; the data
//! bytes are plain memory it does not see. So:
//!
//! - every payload byte and header field of bus frame `s` is derived from `s`: a frame read
//!   before it was written or after it was overwritten fails an assertion;
//! - under the block policy each 16-byte unit of the data area is shadowed by a
//!   `loom::cell::UnsafeCell`, "written" by the writer before it publishes a frame and "read" by
//!   each consumer while it holds the frame. Loom checks that the bus's `tail` and consumer
//!   `cursor`s order every write before the reads of the same bytes and every read before the
//!   next write (a causality violation otherwise);
//! - under the overwrite policy reading bytes being overwritten is by design (a seqlock), so
//!   there are no shadow cells: the consumer must detect every overwrite through `claim`.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aegis_shm_client::frame::{self, FrameHeader, Kind, FRAME_HEADER_LEN};
use aegis_shm_client::segment::{HeapRegion, Region};
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy, ReadError, WriteError};
use aegis_shm_client::spsc::MIN_CAPACITY;
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicBool;
use loom::thread;

const CAP: usize = MIN_CAPACITY;
const EPOCH: u64 = 0xB5;
const UNIT: usize = frame::FRAME_ALIGN;

/// Payload lengths of bus frames, by bus sequence. Strides 64, 80, 64, 96, 64, 80, 64, ...:
/// frame 3 does not fit the 48 bytes left before the end (explicit PADDING frame), frame 6 does
/// not fit the 16 bytes left (implicit padding).
const LENS: [usize; 8] = [8, 24, 8, 40, 8, 24, 8, 8];

fn len_of(seq: u64) -> usize {
    LENS[seq as usize % LENS.len()]
}

fn payload_byte(seq: u64) -> u8 {
    0xB0 ^ seq as u8
}

fn ts_of(seq: u64) -> u64 {
    2_000 + seq
}

fn topic_of(seq: u64) -> u32 {
    11 + seq as u32
}

fn header_of(seq: u64) -> FrameHeader {
    FrameHeader {
        source_id: 1,
        source_seq: 100 + seq,
        ..FrameHeader::event(Kind::Kline, ts_of(seq), topic_of(seq), 0)
    }
}

fn payload_of(seq: u64) -> Vec<u8> {
    vec![payload_byte(seq); len_of(seq)]
}

/// Asserts that a delivered frame is exactly bus frame `h.bus_seq` as written.
fn assert_intact(h: &FrameHeader, payload: &[u8]) {
    let seq = h.bus_seq;
    assert_eq!(h.kind, Kind::Kline as u8, "frame {seq}: kind");
    assert_eq!(h.flags, 0, "frame {seq}: flags");
    assert_eq!(h.len as usize, len_of(seq), "frame {seq}: len");
    assert_eq!(payload.len(), len_of(seq), "frame {seq}: payload len");
    assert_eq!(h.ts, ts_of(seq), "frame {seq}: ts");
    assert_eq!(h.topic_id, topic_of(seq), "frame {seq}: topic");
    assert_eq!(h.source_id, 1, "frame {seq}: source id");
    assert_eq!(h.source_seq, 100 + seq, "frame {seq}: source seq");
    assert!(
        payload.iter().all(|&b| b == payload_byte(seq)),
        "torn or stale payload in frame {seq}: {payload:?}"
    );
}

/// Counts model iterations, for the report printed at the end of each test.
fn run_model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    static ITERATIONS: AtomicUsize = AtomicUsize::new(0);
    ITERATIONS.store(0, Ordering::Relaxed);
    let start = std::time::Instant::now();
    loom::model(move || {
        ITERATIONS.fetch_add(1, Ordering::Relaxed);
        f()
    });
    eprintln!(
        "{name}: {} iterations in {:.1?}",
        ITERATIONS.load(Ordering::Relaxed),
        start.elapsed()
    );
}

/// Where the bus puts successive frames (the writer's and readers' shared rule: a frame never
/// straddles the end; the rest of the ring is a PADDING frame, or implicit padding when fewer
/// than a header's bytes remain).
struct Layout {
    pos: usize,
}

/// `(offset, bytes)` of the explicit padding written before a frame, if any, and its offset.
struct Place {
    padding: Option<(usize, usize)>,
    off: usize,
}

impl Layout {
    fn new() -> Layout {
        Layout { pos: 0 }
    }

    fn place(&mut self, stride: usize) -> Place {
        let off = self.pos % CAP;
        let contiguous = CAP - off;
        let mut padding = None;
        if stride > contiguous {
            if !frame::skip_to_wrap(contiguous) {
                padding = Some((off, contiguous));
            }
            self.pos += contiguous;
        }
        let off = self.pos % CAP;
        self.pos += stride;
        Place { padding, off }
    }
}

/// One loom cell per 16-byte unit of the data area: a stand-in for the bytes loom cannot see.
struct Shadow {
    units: Vec<UnsafeCell<()>>,
}

// SAFETY: the cells hold `()`; they exist only for loom's access tracking.
unsafe impl Sync for Shadow {}
// SAFETY: as above.
unsafe impl Send for Shadow {}

impl Shadow {
    fn new() -> Shadow {
        Shadow {
            units: (0..CAP / UNIT).map(|_| UnsafeCell::new(())).collect(),
        }
    }

    fn write(&self, off: usize, len: usize) {
        for u in &self.units[off / UNIT..(off + len).div_ceil(UNIT)] {
            u.with_mut(|_| ());
        }
    }

    fn read(&self, off: usize, len: usize) {
        for u in &self.units[off / UNIT..(off + len).div_ceil(UNIT)] {
            u.with(|_| ());
        }
    }
}

/// A fresh bus with `consumers` readers attached before anything is written, and the address
/// of its data area.
fn bus(policy: Policy, consumers: usize) -> (BusWriter, Vec<BusReader>, usize) {
    let region = Arc::new(HeapRegion::new(spmc::region_len(CAP)));
    let data = region.as_ptr() as usize + spmc::geometry(CAP).data_offset;
    let writer = BusWriter::create(region.clone(), CAP, EPOCH, policy).unwrap();
    let readers = (0..consumers)
        .map(|_| BusReader::attach(region.clone(), Some(EPOCH), None).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(writer.consumers(), consumers);
    (writer, readers, data)
}

/// What one step of a side of a model did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Step {
    /// Wrote or read a frame.
    Progress,
    /// Could not (bus full, or nothing new).
    Idle,
    /// Has written or read every frame.
    Done,
}

/// The writer of a block-policy model: writes frames `0..frames` with `try_write`, publishing
/// every other frame (`try_write` publishes on `Full` itself) and once more at the end.
struct WriterSide {
    writer: BusWriter,
    next: u64,
    frames: u64,
    layout: Layout,
    shadow: Arc<Shadow>,
}

impl WriterSide {
    fn step(&mut self) -> Step {
        if self.next == self.frames {
            return Step::Done;
        }
        let seq = self.next;
        let payload = payload_of(seq);
        match self.writer.try_write(&header_of(seq), &payload) {
            Ok(got) => {
                assert_eq!(got, seq);
                // The bytes are written and no publish covers them yet: "write" their shadow.
                let place = self.layout.place(frame::stride(payload.len()));
                if let Some((off, n)) = place.padding {
                    self.shadow.write(off, n);
                }
                self.shadow.write(place.off, frame::stride(payload.len()));
                self.next += 1;
                if seq % 2 == 1 || self.next == self.frames {
                    self.writer.publish();
                }
                Step::Progress
            }
            Err(WriteError::Full) => Step::Idle,
            Err(e) => panic!("write of frame {seq}: {e}"),
        }
    }
}

/// A consumer of a block-policy model: must get bus sequences `0..frames` in order, intact, at
/// the offsets the layout rule predicts, and "reads" their shadow while it holds them.
struct ReaderSide {
    reader: BusReader,
    next: u64,
    frames: u64,
    layout: Layout,
    shadow: Arc<Shadow>,
    data: usize,
}

impl ReaderSide {
    fn step(&mut self) -> Step {
        if self.next == self.frames {
            assert!(
                self.reader.try_next().unwrap().is_none(),
                "a frame too many"
            );
            return Step::Done;
        }
        let f = match self
            .reader
            .try_next()
            .expect("no error under the block policy")
        {
            Some(f) => f,
            None => return Step::Idle,
        };
        let seq = self.next;
        assert_eq!(f.header.bus_seq, seq, "frames lost or out of order");
        assert_intact(&f.header, f.payload);
        let place = self.layout.place(frame::stride(f.payload.len()));
        assert_eq!(
            f.payload.as_ptr() as usize,
            self.data + place.off + FRAME_HEADER_LEN,
            "frame {seq} read at an unexpected offset"
        );
        if let Some((off, _)) = place.padding {
            // The reader read the PADDING header to skip it.
            self.shadow.read(off, FRAME_HEADER_LEN);
        }
        self.shadow.read(place.off, frame::stride(f.payload.len()));
        self.next += 1;
        Step::Progress
    }
}

/// Runs `step` in a loom thread until it is done, yielding when idle. With `idle_limit`, gives
/// up after that many idle steps in a row (the model's main thread finishes the work): loom's
/// scheduler may otherwise let two spinning threads take turns forever while the thread they
/// wait for never runs, which exceeds its branch limit without telling anything about the bus.
fn spin<S: Send + 'static>(
    mut side: S,
    step: fn(&mut S) -> Step,
    idle_limit: Option<u32>,
) -> thread::JoinHandle<S> {
    thread::spawn(move || {
        let mut idle = 0;
        loop {
            match step(&mut side) {
                Step::Done => return side,
                Step::Progress => idle = 0,
                Step::Idle => {
                    idle += 1;
                    if idle_limit.is_some_and(|limit| idle >= limit) {
                        return side;
                    }
                    thread::yield_now();
                }
            }
        }
    })
}

/// Block policy: one writer and `consumers` consumers (attached before anything is written) run
/// concurrently; every consumer must get every frame, in order, intact, and the cursors must
/// order every data access (shadow cells). With `idle_limit`, threads that stay idle that long
/// hand over to the main thread, which finishes writing and reading round-robin and asserts
/// that every round makes progress (the bus never deadlocks).
fn block_model(consumers: usize, frames: u64, idle_limit: Option<u32>) {
    let (writer, readers, data) = bus(Policy::Block, consumers);
    let shadow = Arc::new(Shadow::new());
    let w = spin(
        WriterSide {
            writer,
            next: 0,
            frames,
            layout: Layout::new(),
            shadow: shadow.clone(),
        },
        WriterSide::step,
        idle_limit,
    );
    let rs = readers
        .into_iter()
        .map(|reader| {
            spin(
                ReaderSide {
                    reader,
                    next: 0,
                    frames,
                    layout: Layout::new(),
                    shadow: shadow.clone(),
                    data,
                },
                ReaderSide::step,
                idle_limit,
            )
        })
        .collect::<Vec<_>>();

    let mut w = w.join().unwrap();
    let mut rs = rs
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Vec<_>>();
    loop {
        let mut steps = vec![w.step()];
        steps.extend(rs.iter_mut().map(ReaderSide::step));
        if steps.iter().all(|&s| s == Step::Done) {
            break;
        }
        assert!(
            steps.contains(&Step::Progress),
            "the bus is stuck: writer at {}, readers at {:?}",
            w.next,
            rs.iter().map(|r| r.next).collect::<Vec<_>>()
        );
    }
    assert_eq!(w.writer.next_seq(), frames);
    for r in &rs {
        assert_eq!(r.reader.delivered(), frames);
    }
}

#[test]
fn bus_block_one_consumer_loses_nothing() {
    run_model("bus_block_one_consumer_loses_nothing", || {
        block_model(1, 8, None)
    });
}

#[test]
fn bus_block_two_consumers_lose_nothing() {
    run_model("bus_block_two_consumers_lose_nothing", || {
        block_model(2, 5, Some(3))
    });
}

/// Overwrite policy: the writer writes `frames` frames and publishes each, never waiting; one
/// consumer reads concurrently. Every frame it gets must be intact (bytes consistent with its
/// bus sequence); without an overrun it must be the next bus sequence; after `Overrun { missed }`
/// it must be exactly `missed` further on. Once the writer is done, one more frame is written
/// and read, so the consumer learns the size of a final lap: then delivered + missed must be
/// every frame written.
#[test]
fn bus_overwrite_consumer_accounts_for_every_frame() {
    const FRAMES: u64 = 7;
    run_model("bus_overwrite_consumer_accounts_for_every_frame", || {
        let (mut writer, mut readers, _) = bus(Policy::Overwrite, 1);
        let mut reader = readers.pop().unwrap();
        let done = Arc::new(AtomicBool::new(false));

        let d = done.clone();
        let w = thread::spawn(move || {
            for seq in 0..FRAMES {
                let got = writer
                    .try_write(&header_of(seq), &payload_of(seq))
                    .expect("the overwrite policy never refuses a frame");
                assert_eq!(got, seq);
                writer.publish();
            }
            d.store(true, std::sync::atomic::Ordering::Release);
            writer
        });

        /// What the consumer has accounted for.
        #[derive(Default)]
        struct Tally {
            /// The bus sequence it must get next (0: attached before the first frame).
            expected: u64,
            delivered: u64,
            missed: u64,
            /// `missed` of an `Overrun` whose frame comes on the next call.
            overrun: Option<u64>,
        }

        fn poll(r: &mut BusReader, t: &mut Tally) -> Option<u64> {
            match r.try_next() {
                Ok(Some(f)) => {
                    assert_intact(&f.header, f.payload);
                    let seq = f.header.bus_seq;
                    let skipped = t.overrun.take().unwrap_or(0);
                    assert_eq!(
                        seq,
                        t.expected + skipped,
                        "got frame {seq}, expected {} after an overrun of {skipped}",
                        t.expected
                    );
                    t.expected = seq + 1;
                    t.delivered += 1;
                    Some(seq)
                }
                Ok(None) => {
                    assert!(t.overrun.is_none(), "an overrun without its frame");
                    None
                }
                Err(ReadError::Overrun { missed }) => {
                    assert!(missed > 0);
                    assert!(t.overrun.is_none(), "two overruns in a row");
                    t.overrun = Some(missed);
                    t.missed += missed;
                    None
                }
                Err(e) => panic!("consumer: {e}"),
            }
        }

        let mut t = Tally::default();
        loop {
            // Acquire: pairs with the writer's Release store; a poll after seeing `done` sees
            // the final tail.
            let finished = done.load(std::sync::atomic::Ordering::Acquire);
            match poll(&mut reader, &mut t) {
                Some(seq) if seq == FRAMES - 1 => break,
                Some(_) => {}
                None if t.overrun.is_some() => {}
                None if finished => break,
                None => thread::yield_now(),
            }
        }

        // One more frame, written after the consumer stopped: it tells the size of any final
        // lap, so the accounting is exact.
        let mut writer = w.join().unwrap();
        assert_eq!(
            writer.try_write(&header_of(FRAMES), &payload_of(FRAMES)),
            Ok(FRAMES)
        );
        writer.publish();
        loop {
            match poll(&mut reader, &mut t) {
                Some(seq) if seq == FRAMES => break,
                Some(seq) => assert!(seq < FRAMES),
                None => assert!(t.overrun.is_some(), "the last frame never came"),
            }
        }
        assert_eq!(
            t.delivered + t.missed,
            FRAMES + 1,
            "delivered {} + missed {} != written {}",
            t.delivered,
            t.missed,
            FRAMES + 1
        );
        assert_eq!(reader.delivered(), t.delivered);
    });
}
