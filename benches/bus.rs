//! Broadcast bus benches (in process, on a `HeapRegion`, block policy, 1 MiB bus).
//!
//! `bus/fanout/{1,2,4}`: the bench thread writes frames with a 64-byte payload (a `Trade`
//! archive) and publishes every [`PUBLISH_EVERY`] frames; 1, 2 or 4 consumer threads read
//! every frame in place. One element = one frame delivered to *every* consumer: the clock
//! starts at a barrier shared by writer and consumers and stops when the last consumer has
//! read the last frame. Aggregate deliveries per second = throughput x consumers.
//!
//! A correctness check (bus_seq continuity and a validated decode of every frame, per
//! consumer, over several laps of the bus) runs before anything is timed.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use aegis_shm_client::event::{decode, encode_into, Decimal, Event, EventRef, Symbol, Trade};
use aegis_shm_client::frame::{FrameHeader, Kind};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy, WriteError};
use aegis_shm_client::wait::{SpinYield, WaitStrategy};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BUS_CAP: usize = 1 << 20;
const EPOCH: u64 = 0xB5;
/// The writer publishes its tail once per this many frames (and when the bus is full).
const PUBLISH_EVERY: u64 = 64;
const TS0: u64 = 1_726_876_859_000_000_000;

#[repr(align(16))]
struct Aligned([u8; 128]);

fn trade(i: u64) -> Trade {
    Trade {
        symbol: Symbol(*b"ETHUSDT\0\0\0\0\0\0\0\0\0"),
        id: i,
        price: Decimal {
            mantissa: 245_617 + (i % 1000) as i64,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 125,
            scale: 3,
        },
        buyer_maker: i % 3 == 1,
    }
}

/// The 64-byte archive of `trade(i)`.
fn payload(i: u64, buf: &mut Aligned) -> &[u8] {
    let n = encode_into(&trade(i), &mut buf.0).expect("encode");
    &buf.0[..n]
}

/// A fresh bus with `consumers` readers attached.
fn bus(consumers: usize) -> (BusWriter, Vec<BusReader>) {
    let region = Arc::new(HeapRegion::new(spmc::region_len(BUS_CAP)));
    let w = BusWriter::create(region.clone(), BUS_CAP, EPOCH, Policy::Block).expect("create bus");
    let readers = (0..consumers)
        .map(|_| BusReader::attach(region.clone(), Some(EPOCH), None).expect("attach"))
        .collect();
    assert_eq!(w.consumers(), consumers);
    (w, readers)
}

/// Writes `n` frames. With `distinct`, frame `bus_seq` carries `trade(bus_seq)`; otherwise
/// every frame carries the same pre-encoded archive.
fn write_frames(w: &mut BusWriter, n: u64, distinct: bool) {
    let mut buf = Aligned([0; 128]);
    let fixed = payload(0, &mut buf).to_vec();
    let mut scratch = Aligned([0; 128]);
    let mut wait = SpinYield::default();
    let mut unpublished = 0u64;
    for _ in 0..n {
        let seq = w.next_seq();
        let p: &[u8] = if distinct {
            payload(seq, &mut scratch)
        } else {
            &fixed
        };
        let h = FrameHeader::event(Kind::Trade, TS0 + seq, 1, p.len());
        loop {
            match w.try_write(&h, p) {
                Ok(_) => {
                    wait.reset();
                    break;
                }
                Err(WriteError::Full) => wait.wait(),
                Err(e) => panic!("bus write failed: {e}"),
            }
        }
        unpublished += 1;
        if unpublished == PUBLISH_EVERY {
            w.publish();
            unpublished = 0;
        }
    }
    w.publish();
}

/// Reads `n` frames, checking that `bus_seq` continues from `*next`; with `validate`, decodes
/// every payload with bytecheck and checks it. Returns when the last frame was read.
fn read_frames(r: &mut BusReader, n: u64, next: &mut u64, validate: bool) -> Instant {
    let mut wait = SpinYield::default();
    let mut got = 0u64;
    while got < n {
        let Some(f) = r.try_next().expect("bus read") else {
            wait.wait();
            continue;
        };
        wait.reset();
        assert_eq!(f.header.bus_seq, *next, "bus_seq gap");
        if validate {
            assert_eq!(f.kind(), Kind::Trade);
            assert_eq!(f.payload.len(), Trade::ARCHIVED_LEN);
            assert_eq!(f.header.ts, TS0 + f.header.bus_seq);
            assert_eq!(f.header.topic_id, 1);
            match decode(f.kind(), f.payload).expect("valid archive") {
                EventRef::Trade(t) => {
                    assert_eq!(t.id.to_native(), f.header.bus_seq);
                    assert_eq!(t.symbol.as_str(), "ETHUSDT");
                    assert_eq!(t.price.get(), trade(f.header.bus_seq).price);
                }
                other => panic!("unexpected event {other:?}"),
            }
        } else {
            black_box(f.payload[16]);
        }
        *next += 1;
        got += 1;
    }
    Instant::now()
}

/// Writes `n` frames to every reader; returns the time from the start barrier until the
/// slowest reader has read them all.
fn fanout(
    w: &mut BusWriter,
    readers: &mut [BusReader],
    next: &mut [u64],
    n: u64,
    validate: bool,
) -> Duration {
    let barrier = Barrier::new(readers.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = readers
            .iter_mut()
            .zip(next.iter_mut())
            .map(|(r, next)| {
                let bar = &barrier;
                s.spawn(move || {
                    bar.wait();
                    read_frames(r, n, next, validate)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        write_frames(w, n, validate);
        let end = handles
            .into_iter()
            .map(|h| h.join().expect("consumer thread"))
            .max()
            .expect("at least one consumer");
        end.duration_since(t0)
    })
}

fn check() {
    assert_eq!(Trade::ARCHIVED_LEN, 64, "Trade archive is 64 bytes");
    for consumers in [1, 2, 4] {
        let (mut w, mut readers) = bus(consumers);
        let mut next = vec![0u64; consumers];
        // 50k frames of 112 bytes: ~5 laps of the 1 MiB bus, wraps included.
        fanout(&mut w, &mut readers, &mut next, 50_000, true);
        assert!(next.iter().all(|&n| n == 50_000));
        for r in &mut readers {
            assert!(r.try_next().expect("bus").is_none(), "bus drained");
        }
    }
    eprintln!(
        "bus check: 50000 frames to 1, 2, 4 consumers, seq continuous, every payload decodes"
    );
}

fn bench_bus(c: &mut Criterion) {
    check();

    let mut g = c.benchmark_group("bus");
    g.throughput(Throughput::Elements(1));
    for consumers in [1usize, 2, 4] {
        let (mut w, mut readers) = bus(consumers);
        let mut next = vec![0u64; consumers];
        g.bench_function(BenchmarkId::new("fanout", consumers), |b| {
            b.iter_custom(|iters| fanout(&mut w, &mut readers, &mut next, iters, false))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_millis(2500));
    targets = bench_bus
}
criterion_main!(benches);
