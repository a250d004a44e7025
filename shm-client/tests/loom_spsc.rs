//! Loom models of the SPSC source ring (`spsc::Producer` / `spsc::RingReader`).
//!
//! Run with:
//!
//! ```text
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p aegis-shm-client --release --test 'loom_*'
//! ```
//!
//! Loom explores the interleavings (and the weak-memory outcomes) of the ring's *atomics*; the
//! ring's data bytes are plain memory it does not see. Two things make up for that:
//!
//! - Every payload byte and header field of frame `i` is derived from `i`, so a frame read
//!   before it was written, or after it was overwritten, fails an assertion.
//! - `spsc_claim_commit_wraps_in_order` shadows each 16-byte unit of the data area with a
//!   `loom::cell::UnsafeCell`: the producer "writes" the units of a frame (and of a padding
//!   frame) between claiming and committing it, the consumer "reads" them while it holds the
//!   frame. Loom then checks that every write happens-before the reads of the same bytes and
//!   every read happens-before the next write, with happens-before created only by the ring's
//!   `tail` and `head` cursors. A cursor access with too weak an ordering, or a reuse of bytes
//!   the reader has not released, is reported as a causality violation.
#![cfg(loom)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use aegis_shm_client::event::{decode, Decimal, EventRef, Symbol, Trade};
use aegis_shm_client::frame::{self, flags, FrameHeader, Kind, FRAME_HEADER_LEN};
use aegis_shm_client::segment::{HeapRegion, Region};
use aegis_shm_client::spsc::{self, ClaimError, Producer, PushError, RingReader, MIN_CAPACITY};
use aegis_shm_client::wait::{BusySpin, Deadline};
use loom::cell::UnsafeCell;
use loom::thread;

const CAP: usize = MIN_CAPACITY;
const EPOCH: u64 = 0xA5;
const SOURCE_ID: u16 = 3;
/// Granularity of the shadow cells (= frame alignment).
const UNIT: usize = frame::FRAME_ALIGN;

/// Payload lengths of the frames of the claim model. Strides 64, 80, 64, 96, 64, 80, 64: frame
/// 3 does not fit the 48 bytes left before the end (explicit PADDING frame), frame 6 does not
/// fit the 16 bytes left (implicit padding); 576 bytes in all, the ring wraps twice.
const CLAIM_LENS: [usize; 7] = [8, 24, 8, 40, 8, 24, 8];

/// The frames of the push model: `None` is a `Trade` pushed with `try_push` (rkyv straight into
/// the ring, a 64-byte archive: stride 112), `Some(len)` a raw frame pushed with
/// `try_push_frame`. Three trades do not fit before the end (80, 64 and 48 bytes left: PADDING
/// frames), the EOF frame comes last; 928 bytes in all.
const PUSH_PLAN: [Option<usize>; 7] = [None, Some(8), None, Some(24), None, Some(40), None];

fn payload_byte(seq: u64) -> u8 {
    0xA0 ^ seq as u8
}

fn ts_of(seq: u64) -> u64 {
    1_000 + seq
}

fn topic_of(seq: u64) -> u32 {
    7 + seq as u32
}

fn trade_of(seq: u64) -> Trade {
    Trade {
        symbol: Symbol::new("LOOMUSDT").unwrap(),
        id: 10_000 + seq,
        // Odd mantissas: normalised decimals (no trailing zero).
        price: Decimal {
            mantissa: 6_320_101 + 2 * seq as i64,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 1 + 2 * seq as i64,
            scale: 1,
        },
        buyer_maker: seq.is_multiple_of(2),
    }
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

/// Where the ring puts successive frames: the same rule as the producer and the reader (a frame
/// never straddles the end; if it does not fit, the rest of the ring is a PADDING frame, or
/// implicit padding when fewer than a header's bytes remain).
struct Layout {
    pos: usize,
}

/// The placement of one frame: `(offset, bytes)` of the explicit padding written before it, if
/// any, and its own offset.
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

// SAFETY: the cells hold `()`; they exist only for loom's access tracking, which is the point.
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

/// A fresh ring: the region, the producer (batched commits, no clock reads) and the reader,
/// and the address of the data area.
fn ring(batch: u32) -> (Producer, RingReader, usize) {
    let region = Arc::new(HeapRegion::new(spsc::region_len(CAP)));
    let data = region.as_ptr() as usize + spsc::geometry(CAP).data_offset;
    let mut tx = Producer::create(region.clone(), CAP, EPOCH, SOURCE_ID).unwrap();
    tx.set_batch(batch);
    tx.set_stamp(false);
    let rx = RingReader::open(region, Some(EPOCH)).unwrap();
    (tx, rx, data)
}

/// Producer claims room, writes the payload in place and commits, batch of 2, then flushes;
/// the reader peeks, consumes and releases every other frame (and whenever the ring looks
/// empty). Checks every frame arrives once, in order, intact, at the offset the layout rule
/// predicts, and (shadow cells) that the cursors order every data access.
#[test]
fn spsc_claim_commit_wraps_in_order() {
    run_model("spsc_claim_commit_wraps_in_order", || {
        let (mut tx, mut rx, data) = ring(2);
        let shadow = Arc::new(Shadow::new());

        let sh = shadow.clone();
        let producer = thread::spawn(move || {
            let mut layout = Layout::new();
            for (i, &len) in CLAIM_LENS.iter().enumerate() {
                let seq = i as u64;
                loop {
                    match tx.try_claim(len) {
                        Ok(mut claim) => {
                            let place = layout.place(frame::stride(len));
                            let payload = claim.payload_mut();
                            assert_eq!(payload.len(), len);
                            assert_eq!(
                                payload.as_ptr() as usize,
                                data + place.off + FRAME_HEADER_LEN,
                                "frame {i} claimed at an unexpected offset"
                            );
                            if let Some((off, n)) = place.padding {
                                sh.write(off, n);
                            }
                            sh.write(place.off, frame::stride(len));
                            payload.fill(payload_byte(seq));
                            let got = claim.commit(FrameHeader::event(
                                Kind::Kline,
                                ts_of(seq),
                                topic_of(seq),
                                len,
                            ));
                            assert_eq!(got, seq);
                            break;
                        }
                        Err(ClaimError::Full) => {
                            hit("producer found the ring full");
                            thread::yield_now()
                        }
                        Err(e) => panic!("claim of frame {i}: {e}"),
                    }
                }
            }
            tx.flush();
        });

        let mut layout = Layout::new();
        let mut consumed_unreleased = 0;
        let mut next = 0usize;
        while next < CLAIM_LENS.len() {
            let seq = next as u64;
            let f = match rx.peek().expect("the ring stays valid") {
                Some(f) => f,
                None => {
                    hit("reader found the ring empty");
                    rx.release();
                    consumed_unreleased = 0;
                    thread::yield_now();
                    continue;
                }
            };
            let len = CLAIM_LENS[next];
            let place = layout.place(frame::stride(len));
            assert_eq!(
                f.payload.as_ptr() as usize,
                data + place.off + FRAME_HEADER_LEN,
                "frame {next} read at an unexpected offset"
            );
            if let Some((off, _)) = place.padding {
                // The reader read the PADDING header to skip it.
                hit("reader skipped a PADDING frame");
                shadow.read(off, FRAME_HEADER_LEN);
            }
            shadow.read(place.off, frame::stride(len));
            let h = f.header;
            assert_eq!(h.source_seq, seq, "frames out of order or lost");
            assert_eq!(h.source_id, SOURCE_ID);
            assert_eq!(h.kind, Kind::Kline as u8);
            assert_eq!(h.flags, 0);
            assert_eq!(h.len as usize, len);
            assert_eq!(h.ts, ts_of(seq));
            assert_eq!(h.topic_id, topic_of(seq));
            assert_eq!(h.publish_ns, 0);
            assert!(
                f.payload.iter().all(|&b| b == payload_byte(seq)),
                "torn or stale payload in frame {seq}: {:?}",
                f.payload
            );
            rx.consume();
            next += 1;
            consumed_unreleased += 1;
            if consumed_unreleased == 2 {
                rx.release();
                consumed_unreleased = 0;
            }
        }
        rx.release();
        assert!(rx.peek().unwrap().is_none(), "a frame too many");
        producer.join().unwrap();
        assert!(rx.peek().unwrap().is_none(), "a frame too many");
    });
}

/// Producer mixes `try_push` (a `Trade` serialised by rkyv in the ring) and `try_push_frame`
/// (raw frames), batch of 2, retrying on `Full`, then ends the stream with `finish` (an EOF
/// frame, then a flush). The reader decodes every trade with bytecheck, checks every raw payload
/// byte, releases every other frame (and a drained `peek` releases the rest), and stops at EOF,
/// which must come right after the last frame.
#[test]
fn spsc_push_and_finish_in_order() {
    run_model("spsc_push_and_finish_in_order", || {
        let (mut tx, mut rx, _) = ring(2);

        let producer = thread::spawn(move || {
            for (i, plan) in PUSH_PLAN.iter().enumerate() {
                let seq = i as u64;
                loop {
                    let full = match *plan {
                        None => match tx.try_push(ts_of(seq), topic_of(seq), trade_of(seq)) {
                            Ok(got) => {
                                assert_eq!(got, seq);
                                false
                            }
                            Err(PushError::Full(_)) => true,
                            Err(e) => panic!("push of frame {i}: {e}"),
                        },
                        Some(len) => {
                            let header =
                                FrameHeader::event(Kind::Book, ts_of(seq), topic_of(seq), 0);
                            let payload = vec![payload_byte(seq); len];
                            match tx.try_push_frame(&header, &payload) {
                                Ok(got) => {
                                    assert_eq!(got, seq);
                                    false
                                }
                                Err(ClaimError::Full) => true,
                                Err(e) => panic!("push of frame {i}: {e}"),
                            }
                        }
                    };
                    if !full {
                        break;
                    }
                    hit("producer found the ring full");
                    thread::yield_now();
                }
            }
            tx.finish(&mut BusySpin, Deadline::never()).unwrap();
            // The EOF frame carries the next event's seq without taking it (control frames
            // take no seq, so that a group's members number events alike).
            assert_eq!(tx.next_seq(), PUSH_PLAN.len() as u64);
        });

        let mut next = 0usize;
        loop {
            let f = match rx.peek().expect("the ring stays valid") {
                Some(f) => f,
                None => {
                    // No explicit release: a drained `peek` releases what was consumed.
                    hit("reader found the ring empty");
                    thread::yield_now();
                    continue;
                }
            };
            let seq = next as u64;
            let h = f.header;
            assert_eq!(h.source_seq, seq, "frames out of order or lost");
            assert_eq!(h.source_id, SOURCE_ID);
            if next == PUSH_PLAN.len() {
                assert_eq!(h.kind, Kind::Control as u8);
                assert!(h.has(flags::EOF), "the last frame must be EOF");
                assert_eq!(h.len, 0);
                rx.consume();
                rx.release();
                break;
            }
            assert_eq!(h.ts, ts_of(seq));
            assert_eq!(h.topic_id, topic_of(seq));
            assert_eq!(h.flags, 0);
            match PUSH_PLAN[next] {
                None => {
                    assert_eq!(f.kind(), Kind::Trade);
                    match decode(f.kind(), f.payload).expect("a valid trade archive") {
                        EventRef::Trade(t) => {
                            let want = trade_of(seq);
                            assert_eq!(t.id, want.id, "torn or stale trade in frame {seq}");
                            assert_eq!(t.price.get(), want.price);
                            assert_eq!(t.qty.get(), want.qty);
                            assert_eq!(t.buyer_maker, want.buyer_maker);
                            assert_eq!(t.symbol.as_str(), "LOOMUSDT");
                        }
                        other => panic!("frame {seq}: expected a trade, got {other:?}"),
                    }
                }
                Some(len) => {
                    assert_eq!(f.kind(), Kind::Book);
                    assert_eq!(f.payload.len(), len);
                    assert!(
                        f.payload.iter().all(|&b| b == payload_byte(seq)),
                        "torn or stale payload in frame {seq}: {:?}",
                        f.payload
                    );
                }
            }
            rx.consume();
            next += 1;
            if next.is_multiple_of(2) {
                rx.release();
            }
        }
        producer.join().unwrap();
        assert!(rx.peek().unwrap().is_none(), "a frame after EOF");
    });
}

/// The sequencer's idle wait: whenever the ring is empty the reader sleeps on the ring's
/// doorbell (`spsc::park_any`), while the producer pushes frame by frame (batch of 1) and ends
/// the stream. Under loom the futex has no timeout, so a skipped or lost wake is a deadlock,
/// which loom reports; every frame arrives, in order.
#[test]
fn spsc_parked_reader_is_always_woken() {
    run_model("spsc_parked_reader_is_always_woken", || {
        const FRAMES: u64 = 2;
        let (mut tx, mut rx, _) = ring(1);
        let producer = thread::spawn(move || {
            for seq in 0..FRAMES {
                tx.try_push(ts_of(seq), topic_of(seq), trade_of(seq))
                    .unwrap();
            }
            tx.finish(&mut BusySpin, Deadline::never()).unwrap();
        });
        let mut next = 0;
        loop {
            let h = match rx.peek_header().expect("the ring stays valid") {
                Some(h) => h,
                None => {
                    hit("reader parked");
                    spsc::park_any(&[&rx], std::time::Duration::from_secs(3600));
                    continue;
                }
            };
            assert_eq!(h.source_seq, next, "frames out of order or lost");
            rx.consume();
            rx.release();
            if next == FRAMES {
                assert!(h.has(flags::EOF), "the last frame must be EOF");
                break;
            }
            next += 1;
        }
        producer.join().unwrap();
    });
}
