//! SPSC source ring benches (in process, on a `HeapRegion`).
//!
//! - `ring/hop/batch{1,64}`: a producer thread pushes 64-byte `Trade` archives through a ring
//!   to a reader on the bench thread; throughput in events/s. The clock starts when both sides
//!   are released from a barrier and stops when the reader has consumed every event.
//!   `publish_ns` stamping is off (it costs a clock read per frame); `batch64_stamped` shows it on.
//! - `ring/roundtrip`: one thread pushes one event, then peeks, consumes and releases it.
//!
//! A correctness check (sequence continuity and a validated decode of every frame, over
//! several laps of the ring) runs before anything is timed.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use aegis_shm_client::event::{decode, Decimal, Event, EventRef, Symbol, Trade};
use aegis_shm_client::frame::Kind;
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spsc::{self, Producer, PushError, RingReader};
use aegis_shm_client::wait::{SpinYield, WaitStrategy};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Ring data bytes: 585 frames of 112 bytes.
const RING_CAP: usize = 1 << 16;
const EPOCH: u64 = 0xA5;
/// The reader hands bytes back to the producer every this many frames (and when drained).
const RELEASE_EVERY: u32 = 32;
const TS0: u64 = 1_726_876_859_000_000_000;

fn trade(i: u64) -> Trade {
    Trade {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        id: i,
        price: Decimal {
            mantissa: 6_320_105 + (i % 100) as i64,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 5,
            scale: 1,
        },
        buyer_maker: i & 1 == 1,
    }
}

/// A fresh ring; both ends.
fn ring(batch: u32, stamp: bool) -> (Producer, RingReader) {
    let region = Arc::new(HeapRegion::new(spsc::region_len(RING_CAP)));
    let mut tx = Producer::create(region.clone(), RING_CAP, EPOCH, 3).expect("create ring");
    tx.set_batch(batch);
    tx.set_stamp(stamp);
    let rx = RingReader::open(region, Some(EPOCH)).expect("open ring");
    (tx, rx)
}

/// Pushes `n` trades (id = source_seq), waiting with spin-then-yield on a full ring.
fn produce(tx: &mut Producer, n: u64) {
    let mut wait = SpinYield::default();
    for _ in 0..n {
        let seq = tx.next_seq();
        let mut ev = trade(seq);
        loop {
            match tx.try_push(TS0 + seq, 0, ev) {
                Ok(_) => {
                    wait.reset();
                    break;
                }
                Err(PushError::Full(e)) => {
                    ev = e;
                    wait.wait();
                }
                Err(e) => panic!("push failed: {e}"),
            }
        }
    }
    tx.flush();
}

/// Consumes `n` frames, checking that `source_seq` continues from `*next`. With `validate`,
/// decodes every payload with bytecheck and checks its id, else only touches one byte of it.
fn consume(rx: &mut RingReader, n: u64, next: &mut u64, validate: bool) {
    let mut wait = SpinYield::default();
    let mut unreleased = 0u32;
    let mut got = 0u64;
    while got < n {
        let seq = match rx.peek().expect("ring corrupt") {
            Some(f) => {
                if validate {
                    assert_eq!(f.kind(), Kind::Trade);
                    assert_eq!(f.payload.len(), Trade::ARCHIVED_LEN);
                    assert_eq!(f.header.source_id, 3);
                    assert_eq!(f.header.ts, TS0 + f.header.source_seq);
                    match decode(f.kind(), f.payload).expect("valid archive") {
                        EventRef::Trade(t) => {
                            assert_eq!(t.id.to_native(), f.header.source_seq);
                            assert_eq!(t.symbol.as_str(), "BTCUSDT");
                            assert_eq!(t.price.get(), trade(f.header.source_seq).price);
                        }
                        other => panic!("unexpected event {other:?}"),
                    }
                } else {
                    black_box(f.payload[16]);
                }
                f.header.source_seq
            }
            None => {
                wait.wait();
                continue;
            }
        };
        assert_eq!(seq, *next, "source_seq gap");
        wait.reset();
        rx.consume();
        *next += 1;
        got += 1;
        unreleased += 1;
        if unreleased == RELEASE_EVERY {
            rx.release();
            unreleased = 0;
        }
    }
    rx.release();
}

/// Runs `n` events producer thread -> this thread; returns the time from the start barrier to
/// the last consume.
fn hop(tx: &mut Producer, rx: &mut RingReader, n: u64, next: &mut u64, validate: bool) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let bar = &barrier;
        s.spawn(move || {
            bar.wait();
            produce(tx, n);
        });
        barrier.wait();
        let t0 = Instant::now();
        consume(rx, n, next, validate);
        t0.elapsed()
    })
}

fn check() {
    assert_eq!(Trade::ARCHIVED_LEN, 64, "Trade archive is 64 bytes");
    for batch in [1, 64] {
        let (mut tx, mut rx) = ring(batch, true);
        let mut next = 0;
        // 100k frames of 112 bytes: ~170 laps of the 64 KiB ring, wraps included.
        hop(&mut tx, &mut rx, 100_000, &mut next, true);
        assert_eq!(next, 100_000);
        assert!(rx.peek().expect("ring").is_none(), "ring drained");
    }
    eprintln!("ring check: 2 x 100000 frames, seq continuous, every payload decodes (validated)");
}

fn bench_ring(c: &mut Criterion) {
    check();

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    for (name, batch, stamp) in [
        ("batch1", 1, false),
        ("batch64", 64, false),
        ("batch64_stamped", 64, true),
    ] {
        let (mut tx, mut rx) = ring(batch, stamp);
        let mut next = 0u64;
        g.bench_function(BenchmarkId::new("hop", name), |b| {
            b.iter_custom(|iters| hop(&mut tx, &mut rx, iters, &mut next, false))
        });
    }

    let (mut tx, mut rx) = ring(1, false);
    g.bench_function("roundtrip", |b| {
        b.iter(|| {
            let seq = tx.next_seq();
            tx.try_push(TS0 + seq, 0, black_box(trade(seq)))
                .expect("room in an empty ring");
            let f = rx.peek().expect("ring").expect("one frame");
            black_box(f.header.source_seq);
            black_box(f.payload[16]);
            rx.consume();
            rx.release();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_millis(2500));
    targets = bench_ring
}
criterion_main!(benches);
