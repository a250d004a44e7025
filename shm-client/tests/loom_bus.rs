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

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use aegis_shm_client::frame::{self, FrameHeader, Kind, FRAME_HEADER_LEN};
use aegis_shm_client::segment::{HeapRegion, Region};
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy, ReadError, WriteError};
use aegis_shm_client::spsc::MIN_CAPACITY;
use aegis_shm_client::wait::{Deadline, Park};
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicBool;
use loom::thread;

const CAP: usize = MIN_CAPACITY;
const EPOCH: u64 = 0xB5;
const UNIT: usize = frame::FRAME_ALIGN;

/// Payload lengths of bus frames, by bus sequence (cycled). Strides 64, 80, 64, 96, 64, 80, 64:
/// frame 3 does not fit the 48 bytes left before the end (explicit PADDING frame), frame 6 does
/// not fit the 16 bytes left (implicit padding).
const LENS: &[usize] = &[8, 24, 8, 40, 8, 24, 8];

/// Fewer, larger frames for the two-consumer model (its state space grows fastest): strides
/// 128, 128, 96, 128: frame 2 needs both consumers to have released frame 0, frame 3 frame 1.
const BIG_LENS: &[usize] = &[72, 72, 40];

fn len_of(lens: &[usize], seq: u64) -> usize {
    lens[seq as usize % lens.len()]
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

fn payload_of(lens: &[usize], seq: u64) -> Vec<u8> {
    vec![payload_byte(seq); len_of(lens, seq)]
}

/// Asserts that a delivered frame is exactly bus frame `h.bus_seq` as written.
fn assert_intact(lens: &[usize], h: &FrameHeader, payload: &[u8]) {
    let seq = h.bus_seq;
    assert_eq!(h.kind, Kind::Kline as u8, "frame {seq}: kind");
    assert_eq!(h.flags, 0, "frame {seq}: flags");
    assert_eq!(h.len as usize, len_of(lens, seq), "frame {seq}: len");
    assert_eq!(payload.len(), len_of(lens, seq), "frame {seq}: payload len");
    assert_eq!(h.ts, ts_of(seq), "frame {seq}: ts");
    assert_eq!(h.topic_id, topic_of(seq), "frame {seq}: topic");
    assert_eq!(h.source_id, 1, "frame {seq}: source id");
    assert_eq!(h.source_seq, 100 + seq, "frame {seq}: source seq");
    assert!(
        payload.iter().all(|&b| b == payload_byte(seq)),
        "torn or stale payload in frame {seq}: {payload:?}"
    );
}

thread_local! {
    /// How many iterations a model ran and how often each interesting path was taken in all of
    /// them: printed at the end, to show the model does reach those paths. Per test thread
    /// (loom runs a model's threads as coroutines on the thread that calls `loom::model`).
    static STATS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Counts one passage through an interesting path.
fn hit(what: &'static str) {
    STATS.with(|s| *s.borrow_mut().entry(what).or_default() += 1);
}

/// Checks a model under loom and prints what it explored.
fn run_model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    STATS.with(|s| s.borrow_mut().clear());
    let start = std::time::Instant::now();
    loom::model(move || {
        hit("iterations");
        f()
    });
    let stats = STATS.with(|s| s.take());
    eprintln!("{name}: {:.1?}, {stats:?}", start.elapsed());
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
/// every other frame (`try_write` publishes on `Full` itself) and the last one.
struct WriterSide {
    writer: BusWriter,
    lens: &'static [usize],
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
        let payload = payload_of(self.lens, seq);
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
            Err(WriteError::Full) => {
                hit("writer found the bus full");
                Step::Idle
            }
            Err(e) => panic!("write of frame {seq}: {e}"),
        }
    }
}

/// A consumer of a block-policy model: must get bus sequences `0..frames` in order, intact, at
/// the offsets the layout rule predicts, and "reads" their shadow while it holds them.
struct ReaderSide {
    reader: BusReader,
    lens: &'static [usize],
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
            None => {
                hit("reader found nothing new");
                return Step::Idle;
            }
        };
        let seq = self.next;
        assert_eq!(f.header.bus_seq, seq, "frames lost or out of order");
        assert_intact(self.lens, &f.header, f.payload);
        let place = self.layout.place(frame::stride(f.payload.len()));
        assert_eq!(
            f.payload.as_ptr() as usize,
            self.data + place.off + FRAME_HEADER_LEN,
            "frame {seq} read at an unexpected offset"
        );
        if let Some((off, _)) = place.padding {
            // The reader read the PADDING header to skip it.
            hit("reader skipped a PADDING frame");
            self.shadow.read(off, FRAME_HEADER_LEN);
        }
        self.shadow.read(place.off, frame::stride(f.payload.len()));
        self.next += 1;
        Step::Progress
    }
}

/// Runs `step` in a loom thread until it is done, yielding when idle. With `idle_limit`, gives
/// up after that many idle steps in a row (the model's main thread finishes the work): with two
/// spinning consumers, loom's scheduler may let them take turns forever while the writer they
/// wait for never runs, which exceeds its branch limit without telling anything about the bus.
fn spin<S: Send + 'static>(
    mut side: S,
    step: fn(&mut S) -> Step,
    idle_limit: Option<u32>,
    finished: &'static str,
) -> thread::JoinHandle<S> {
    thread::spawn(move || {
        let mut idle = 0;
        loop {
            match step(&mut side) {
                Step::Done => {
                    hit(finished);
                    return side;
                }
                Step::Progress => idle = 0,
                Step::Idle => {
                    idle += 1;
                    if idle_limit.is_some_and(|limit| idle >= limit) {
                        hit("a thread handed over to the main thread");
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
/// that the bus never gets stuck.
fn block_model(consumers: usize, lens: &'static [usize], frames: u64, idle_limit: Option<u32>) {
    let (writer, readers, data) = bus(Policy::Block, consumers);
    let shadow = Arc::new(Shadow::new());
    let w = spin(
        WriterSide {
            writer,
            lens,
            next: 0,
            frames,
            layout: Layout::new(),
            shadow: shadow.clone(),
        },
        WriterSide::step,
        idle_limit,
        "the writer finished in its thread",
    );
    let rs = readers
        .into_iter()
        .map(|reader| {
            spin(
                ReaderSide {
                    reader,
                    lens,
                    next: 0,
                    frames,
                    layout: Layout::new(),
                    shadow: shadow.clone(),
                    data,
                },
                ReaderSide::step,
                idle_limit,
                "a reader finished in its thread",
            )
        })
        .collect::<Vec<_>>();

    let mut w = w.join().unwrap();
    let mut rs = rs
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Vec<_>>();
    // An idle poll publishes the reader's cursor, which the writer sees on the next round: so
    // the bus is stuck only after two rounds in a row without progress.
    let mut idle_rounds = 0;
    loop {
        let mut steps = vec![w.step()];
        steps.extend(rs.iter_mut().map(ReaderSide::step));
        if steps.iter().all(|&s| s == Step::Done) {
            break;
        }
        if steps.contains(&Step::Progress) {
            idle_rounds = 0;
        } else {
            idle_rounds += 1;
        }
        assert!(
            idle_rounds < 2,
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

/// Block policy, one consumer, 7 frames (both kinds of padding, the writer waits for room
/// several times). Neither side ever gives up: this also shows that the writer and the consumer
/// always get each other going again.
#[test]
fn bus_block_one_consumer_loses_nothing() {
    run_model("bus_block_one_consumer_loses_nothing", || {
        block_model(1, LENS, LENS.len() as u64, None)
    });
}

/// Block policy, two consumers: the writer must wait for the slower of the two (4 frames of
/// 96 to 128 bytes: it waits for room twice). Threads idle for 4 polls in a row hand over to
/// the main thread (see `spin`); in nearly every iteration all three finish in their own thread.
#[test]
fn bus_block_two_consumers_lose_nothing() {
    run_model("bus_block_two_consumers_lose_nothing", || {
        block_model(2, BIG_LENS, 4, Some(4))
    });
}

/// What an overwrite-policy consumer has accounted for.
struct Tally {
    /// The bus sequence it must get next.
    expected: u64,
    delivered: u64,
    missed: u64,
    /// `missed` of an `Overrun` whose frame comes on the next call.
    overrun: Option<u64>,
}

/// One `try_next` of an overwrite-policy consumer, checked: every frame intact; without an
/// overrun, the next bus sequence; after `Overrun { missed }`, exactly `missed` further on.
/// Returns the bus sequence of the frame delivered, if any.
fn poll_overwrite(r: &mut BusReader, t: &mut Tally) -> Option<u64> {
    match r.try_next() {
        Ok(Some(f)) => {
            hit("consumer got a frame");
            if f.is_eof() {
                hit("consumer got END-OF-STREAM");
            } else {
                assert_intact(LENS, &f.header, f.payload);
            }
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
            hit("consumer overrun");
            assert!(missed > 0);
            assert!(t.overrun.is_none(), "two overruns in a row");
            t.overrun = Some(missed);
            t.missed += missed;
            None
        }
        Err(e) => panic!("consumer: {e}"),
    }
}

/// Overwrite policy: a consumer attached before anything is written; with `primed`, the
/// consumer first reads frame 0 (written before the threads start). Then a writer thread writes
/// the frames up to `frames`, publishing every `publish_every` frames (and the last), never
/// waiting, while the consumer reads concurrently (`poll_overwrite` checks every frame). Once the writer is done, one more frame
/// is written and read, so that a consumer lapped at the very end learns how much it missed:
/// then delivered + missed must be every frame written.
fn overwrite_model(frames: u64, primed: bool, publish_every: u64) {
    let (mut writer, mut readers, _) = bus(Policy::Overwrite, 1);
    let mut reader = readers.pop().unwrap();
    let mut t = Tally {
        expected: 0,
        delivered: 0,
        missed: 0,
        overrun: None,
    };
    let first = if primed {
        assert_eq!(writer.try_write(&header_of(0), &payload_of(LENS, 0)), Ok(0));
        writer.publish();
        assert_eq!(poll_overwrite(&mut reader, &mut t), Some(0));
        1
    } else {
        0
    };
    let done = Arc::new(AtomicBool::new(false));

    let d = done.clone();
    let w = thread::spawn(move || {
        for seq in first..frames {
            let got = writer
                .try_write(&header_of(seq), &payload_of(LENS, seq))
                .expect("the overwrite policy never refuses a frame");
            assert_eq!(got, seq);
            if (seq + 1) % publish_every == 0 {
                writer.publish();
            }
        }
        writer.publish();
        d.store(true, std::sync::atomic::Ordering::Release);
        writer
    });

    loop {
        // Acquire: pairs with the writer's Release store; a poll after seeing `done` sees the
        // final tail.
        let finished = done.load(std::sync::atomic::Ordering::Acquire);
        match poll_overwrite(&mut reader, &mut t) {
            Some(seq) if seq == frames - 1 => break,
            Some(_) => {}
            None if t.overrun.is_some() => {}
            None if finished => break,
            None => thread::yield_now(),
        }
    }

    if t.expected < frames {
        hit("consumer lapped over the last frame");
    }
    let mut writer = w.join().unwrap();
    assert_eq!(
        writer.try_write(&header_of(frames), &payload_of(LENS, frames)),
        Ok(frames)
    );
    writer.publish();
    loop {
        match poll_overwrite(&mut reader, &mut t) {
            Some(seq) if seq == frames => break,
            Some(seq) => assert!(seq < frames),
            None => assert!(t.overrun.is_some(), "the last frame never came"),
        }
    }
    assert_eq!(
        t.delivered + t.missed,
        frames + 1,
        "delivered {} + missed {} != written {}",
        t.delivered,
        t.missed,
        frames + 1
    );
    assert_eq!(reader.delivered(), t.delivered);
}

/// Overwrite policy, a consumer that has read a frame before the writer laps it, the writer
/// publishing every frame: every frame the consumer gets is intact and every frame is accounted
/// for (delivered, or counted in an `Overrun`).
#[test]
fn bus_overwrite_consumer_accounts_for_every_frame() {
    run_model("bus_overwrite_consumer_accounts_for_every_frame", || {
        overwrite_model(10, true, 1)
    });
}

/// As above, the writer publishing every other frame (the tail can jump past a whole ring).
#[test]
fn bus_overwrite_batched_publish_accounts_for_every_frame() {
    run_model(
        "bus_overwrite_batched_publish_accounts_for_every_frame",
        || overwrite_model(10, true, 2),
    );
}

/// As the first, but the writer may lap the consumer before it has read anything. Failed
/// before issue 9: the consumer had no bus sequence to count from, reported no `Overrun`, and
/// the frames it skipped vanished from the accounting. It now takes the bus sequence published
/// with the tail it starts at.
#[test]
fn bus_overwrite_lap_before_the_first_frame_is_counted() {
    run_model(
        "bus_overwrite_lap_before_the_first_frame_is_counted",
        || overwrite_model(10, false, 1),
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 9: the end of the stream, releases and re-attaches, attaching to a running bus
// ---------------------------------------------------------------------------------------------

fn eof_header() -> FrameHeader {
    FrameHeader {
        kind: Kind::Control as u8,
        flags: frame::flags::EOF,
        ts: u64::MAX,
        ..FrameHeader::default()
    }
}

/// Overwrite policy: a consumer attached before anything is written reads while the writer
/// writes `frames` frames (publishing each) and END-OF-STREAM. However far it is lapped, even
/// over the end and before its first read, it sees END-OF-STREAM, and every frame before it is
/// delivered or counted as missed. Failed before issue 9 (a consumer lapped over the end jumped
/// past the EOF frame and waited forever).
fn eof_model(frames: u64) {
    let (mut writer, mut readers, _) = bus(Policy::Overwrite, 1);
    let reader = readers.pop().unwrap();
    let w = thread::spawn(move || {
        for seq in 0..frames {
            assert_eq!(
                writer.try_write(&header_of(seq), &payload_of(LENS, seq)),
                Ok(seq)
            );
            writer.publish();
        }
        assert_eq!(writer.try_write(&eof_header(), &[]), Ok(frames));
        writer.publish();
    });
    consume_to_eof(reader, frames);
    w.join().unwrap();
}

#[test]
fn bus_overwrite_lap_over_the_eof_sees_it() {
    run_model("bus_overwrite_lap_over_the_eof_sees_it", || eof_model(6));
}

/// Block policy: a consumer reads while the daemon releases its slot, and another consumer
/// takes the slot (a new generation) and leaves again; the writer, no longer held by the
/// released consumer, laps it. The released consumer gets only intact frames, in order, until
/// its first `Detached`, and `Detached` from then on: never a frame of a later lap (issue 9,
/// item 2). Its stale cursor stores and its destructor never touch the new occupant's cursor
/// or slot (item 3: they used to check ownership, then store).
#[test]
fn bus_block_release_and_reattach_with_generation_check() {
    run_model(
        "bus_block_release_and_reattach_with_generation_check",
        || {
            const FRAMES: u64 = 4;
            let region = Arc::new(HeapRegion::new(spmc::region_len(CAP)));
            let mut writer = BusWriter::create(region.clone(), CAP, EPOCH, Policy::Block).unwrap();
            let mut reader = BusReader::attach(region.clone(), Some(EPOCH), None).unwrap();
            let mon = spmc::BusMonitor::open(region.clone(), Some(EPOCH)).unwrap();
            let w = thread::spawn(move || {
                let mut seq = 0;
                while seq < FRAMES {
                    match writer.try_write(&header_of(seq), &payload_of(BIG_LENS, seq)) {
                        Ok(got) => {
                            assert_eq!(got, seq);
                            writer.publish();
                            seq += 1;
                        }
                        Err(WriteError::Full) => {
                            hit("writer waited");
                            thread::yield_now()
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let d = thread::spawn(move || {
                mon.release_slot(0);
                let next = BusReader::attach(region.clone(), Some(EPOCH), Some(0)).unwrap();
                for _ in 0..2 {
                    let s = mon.slot_stats();
                    assert_eq!(s.len(), 1, "the new occupant's slot was freed");
                    assert_eq!(
                        s[0].cursor,
                        next.position(),
                        "the new occupant's cursor was moved: {:?}",
                        s[0]
                    );
                    thread::yield_now();
                }
                drop(next);
                assert!(mon.slot_stats().is_empty());
            });
            let mut next = 0;
            let mut detached = false;
            while next < FRAMES && !detached {
                match reader.try_next() {
                    Ok(Some(f)) => {
                        assert_eq!(f.header.bus_seq, next, "a frame of another lap");
                        assert_intact(BIG_LENS, &f.header, f.payload);
                        next += 1;
                    }
                    Ok(None) => thread::yield_now(),
                    Err(ReadError::Detached(0)) => {
                        hit("released consumer detached");
                        detached = true;
                    }
                    Err(e) => panic!("released consumer: {e}"),
                }
            }
            if detached {
                assert_eq!(reader.try_next().err(), Some(ReadError::Detached(0)));
            }
            drop(reader);
            w.join().unwrap();
            d.join().unwrap();
        },
    );
}

/// Block policy: a consumer attaches while the writer is writing (nobody attached before). It
/// must get a contiguous, intact run of frames ending with the last one: the writer never
/// overwrites frames from the consumer's starting tail on (Dekker pair between the attach and
/// the writer's slot scan, and the gate on the published tail).
#[test]
fn bus_block_attach_racing_a_running_writer() {
    run_model("bus_block_attach_racing_a_running_writer", || {
        const FRAMES: u64 = 5;
        let region = Arc::new(HeapRegion::new(spmc::region_len(CAP)));
        let writer = BusWriter::create(region.clone(), CAP, EPOCH, Policy::Block).unwrap();
        // Writes until every frame is written, or gives up after `idle_limit` Full in a row.
        fn write(mut writer: BusWriter, mut seq: u64, idle_limit: u32) -> (BusWriter, u64) {
            let mut idle = 0;
            while seq < FRAMES && idle < idle_limit {
                match writer.try_write(&header_of(seq), &payload_of(LENS, seq)) {
                    Ok(_) => {
                        if seq % 2 == 1 || seq == FRAMES - 1 {
                            writer.publish();
                        }
                        seq += 1;
                        idle = 0;
                    }
                    Err(WriteError::Full) => {
                        hit("writer waited for the new consumer");
                        idle += 1;
                        thread::yield_now()
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            (writer, seq)
        }
        let w = thread::spawn(move || write(writer, 0, 3));
        let mut reader = BusReader::attach(region, Some(EPOCH), None).unwrap();
        let mut next = None::<u64>;
        let read = |reader: &mut BusReader, next: &mut Option<u64>| match reader.try_next().unwrap()
        {
            Some(f) => {
                let seq = f.header.bus_seq;
                if let Some(n) = *next {
                    assert_eq!(seq, n, "frames lost or out of order");
                } else if seq > 0 {
                    hit("consumer started after frame 0");
                }
                assert_intact(LENS, &f.header, f.payload);
                *next = Some(seq + 1);
                true
            }
            None => false,
        };
        // Read while the writer writes, until idle three times in a row.
        let mut idle = 0;
        while idle < 3 && next != Some(FRAMES) {
            if read(&mut reader, &mut next) {
                idle = 0;
            } else {
                idle += 1;
                thread::yield_now();
            }
        }
        let (mut writer, mut seq) = w.join().unwrap();
        // Round-robin until every frame is written and the consumer has read up to the end (it
        // may have started at the end: attached after the last publish); stuck if neither
        // side moves three rounds in a row.
        let mut idle_rounds = 0;
        loop {
            let before = seq;
            (writer, seq) = write(writer, seq, 1);
            let got = read(&mut reader, &mut next);
            if seq == FRAMES && !got && next.is_none_or(|n| n == FRAMES) {
                break;
            }
            if got || seq != before {
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
                assert!(
                    idle_rounds < 3,
                    "stuck: writer at {seq}, consumer at {next:?}"
                );
            }
        }
        assert!(reader.try_next().unwrap().is_none());
    });
}

fn tally() -> Tally {
    Tally {
        expected: 0,
        delivered: 0,
        missed: 0,
        overrun: None,
    }
}

/// Reads with `poll_overwrite` until END-OF-STREAM (bus sequence `frames`). With
/// `idle_limit`, gives up after that many idle polls in a row and hands back what is left to do
/// (see `spin`: two spinning consumers can take turns forever in loom's scheduler).
fn read_to_eof(
    mut r: BusReader,
    mut t: Tally,
    frames: u64,
    idle_limit: Option<u32>,
) -> Option<(BusReader, Tally)> {
    let mut idle = 0;
    loop {
        match poll_overwrite(&mut r, &mut t) {
            Some(seq) if seq == frames => break,
            Some(_) => idle = 0,
            None if t.overrun.is_some() => idle = 0,
            None => {
                idle += 1;
                if idle_limit.is_some_and(|limit| idle >= limit) {
                    hit("a consumer handed over to the main thread");
                    return Some((r, t));
                }
                thread::yield_now()
            }
        }
    }
    assert_eq!(t.delivered + t.missed, frames + 1, "EOF included");
    None
}

/// [`read_to_eof`] without giving up.
fn consume_to_eof(r: BusReader, frames: u64) {
    assert!(read_to_eof(r, tally(), frames, None).is_none());
}

/// Overwrite policy, two consumers read while the writer laps them and ends the stream: each
/// accounts for every frame on its own and sees END-OF-STREAM (their cursors, counters and
/// lap state are independent).
#[test]
fn bus_overwrite_two_consumers_account_for_every_frame() {
    run_model(
        "bus_overwrite_two_consumers_account_for_every_frame",
        || {
            const FRAMES: u64 = 4;
            let (mut writer, mut readers, _) = bus(Policy::Overwrite, 2);
            let b = readers.pop().unwrap();
            let a = readers.pop().unwrap();
            let w = thread::spawn(move || {
                for seq in 0..FRAMES {
                    writer
                        .try_write(&header_of(seq), &payload_of(LENS, seq))
                        .unwrap();
                    writer.publish();
                }
                writer.try_write(&eof_header(), &[]).unwrap();
                writer.publish();
            });
            let ta = thread::spawn(move || read_to_eof(a, tally(), FRAMES, Some(3)));
            let left_b = read_to_eof(b, tally(), FRAMES, Some(3));
            let left_a = ta.join().unwrap();
            w.join().unwrap();
            // Everything is written: whoever gave up finishes without spinning.
            for (r, t) in left_a.into_iter().chain(left_b) {
                assert!(
                    read_to_eof(r, t, FRAMES, Some(1)).is_none(),
                    "EOF never came"
                );
            }
        },
    );
}

/// A consumer that parks at once whenever it finds nothing ([`Park`] with no spinning), so
/// that every wait goes through the doorbell. Under loom the futex has no timeout: a wake the
/// writer skipped, or one lost between the consumer's last look and its sleep, leaves the
/// consumer asleep forever, which loom reports as a deadlock.
fn parking() -> Park {
    Park::new(0, 0, std::time::Duration::from_secs(3600))
}

/// Block policy, a consumer that parks on the doorbell whenever it is caught up, against a
/// writer that publishes frame by frame, then END-OF-STREAM: every frame arrives, in order, and
/// the consumer is never left asleep.
#[test]
fn bus_parked_consumer_is_always_woken() {
    run_model("bus_parked_consumer_is_always_woken", || {
        const FRAMES: u64 = 2;
        let (mut writer, mut readers, _) = bus(Policy::Block, 1);
        let mut r = readers.pop().unwrap();
        let w = thread::spawn(move || {
            for seq in 0..FRAMES {
                writer
                    .try_write(&header_of(seq), &payload_of(LENS, seq))
                    .unwrap();
                writer.publish();
            }
            writer.try_write(&eof_header(), &[]).unwrap();
            writer.publish();
        });
        let mut wait = parking();
        for seq in 0..=FRAMES {
            let f = r.next(&mut wait, Deadline::never()).unwrap();
            assert_eq!(f.header.bus_seq, seq);
            if seq == FRAMES {
                assert!(f.is_eof());
            } else {
                assert_intact(LENS, &f.header, f.payload);
            }
        }
        w.join().unwrap();
    });
}

/// A consumer parked on an idle bus is woken when the daemon releases its slot (an eviction),
/// and learns it at once: no frame is ever published, so only the release can wake it.
#[test]
fn bus_parked_consumer_wakes_when_released() {
    run_model("bus_parked_consumer_wakes_when_released", || {
        let region = Arc::new(HeapRegion::new(spmc::region_len(CAP)));
        let writer = BusWriter::create(region.clone(), CAP, EPOCH, Policy::Block).unwrap();
        let mut r = BusReader::attach(region.clone(), Some(EPOCH), None).unwrap();
        let slot = r.slot();
        let daemon = thread::spawn(move || writer.release_slot(slot));
        let mut wait = parking();
        match r.next(&mut wait, Deadline::never()) {
            Err(ReadError::Detached(s)) => assert_eq!(s, slot),
            other => panic!("expected Detached, got {other:?}"),
        }
        daemon.join().unwrap();
    });
}
