//! Merge benches.
//!
//! `merge/sequencer/{1,3,8,32}`: the real [`Sequencer`] (backtest mode, block bus of 1 MiB,
//! batches of 256) merging `k` sources of 64-byte `Trade` frames into the bus, with one
//! consumer (the bench thread) reading every frame in place until END-OF-STREAM. The source
//! rings (`HeapRegion`s) are filled before the clock starts — every ring holds its whole
//! stream and its EOF — so the figure is the merge (sequencer + bus + consumer), not the
//! scheduling of `k` producer threads on a small machine. One element = one event delivered.
//! Timestamps interleave irregularly across sources (each event goes to a pseudo-random
//! source) with ties, so the merge switches source at most events.
//!
//! `merge/journals/3`: the real [`Sequencer`] merging three trade journals that it maps itself
//! (as the daemon does in a backtest, [`JournalSource`]) into an overwrite bus with no
//! consumer, timed by the sequencer thread's own CPU clock: the merge's cost per event alone,
//! with nothing waited for and nothing of a busy machine's scheduling in it. This is the
//! stage that bounds the real path's throughput (`aegis-shmctl bench`).
//!
//! `merge/pick/{linear,linear-packed,heap}/{1,3,8,32,64}`: the data-structure choice behind
//! the sequencer. `k` sorted streams of `u128` merge keys are merged into an output vector by
//! a linear scan over the cached heads kept, as in the sequencer, inside a per-source state of
//! about the sequencer's `Source` size (320 bytes) (`linear`); by a linear scan over the heads
//! packed in one array of `u128` (`linear-packed`); or by a `std::collections::BinaryHeap` of
//! `Reverse((key, source))` (`heap`). One element = one key emitted.
//!
//! Every merge is checked (output in key order, exact count, same keys as a reference sort)
//! before anything is timed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis::sequencer::{merge_key, Config, Input, Mode, Sequencer};
use aegis::source::JournalSource;
use aegis_shm_client::event::{encode_into, AnyEvent, Decimal, Symbol, Trade};
use aegis_shm_client::frame::{FrameHeader, Kind};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy};
use aegis_shm_client::spsc::{self, Producer, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline, SpinYield, WaitStrategy};
use aegis_tools::journal::JournalWriter;
use aegis_tools::names::{FileInfo, FileKind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const EPOCH: u64 = 0x3E5;
const TS0: u64 = 1_726_876_859_000_000_000;
/// Events per sequencer run, whatever `k`.
const EVENTS: u64 = 1 << 17;
/// Keys per pick run, whatever `k`.
const KEYS: usize = 1 << 16;
const BUS_CAP: usize = 1 << 20;

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `total` events spread over `k` sources: each global event goes to a pseudo-random source;
/// the global ts advances by 0 or 1 µs (so ties across sources are frequent). Returns the
/// timestamps of each source, non-decreasing.
fn streams(k: usize, total: u64, seed: u64) -> Vec<Vec<u64>> {
    let mut rng = Rng(seed);
    let mut out = vec![Vec::new(); k];
    let mut ts = TS0;
    for _ in 0..total {
        let r = rng.next();
        ts += (r & 1) * 1_000;
        out[((r >> 8) % k as u64) as usize].push(ts);
    }
    out
}

#[repr(align(16))]
struct Aligned([u8; 128]);

/// The 64-byte archive of a trade (the same payload for every frame: the merge never reads
/// it, the consumer touches it).
fn trade_payload() -> Vec<u8> {
    let t = Trade {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        id: 7,
        price: Decimal {
            mantissa: 6_320_105,
            scale: 2,
        },
        qty: Decimal {
            mantissa: 5,
            scale: 1,
        },
        buyer_maker: false,
    };
    let mut buf = Aligned([0; 128]);
    let n = encode_into(&t, &mut buf.0).expect("encode");
    assert_eq!(n, 64);
    buf.0[..n].to_vec()
}

/// Source names whose sorted order is their index order: rank = index.
fn name(i: usize) -> String {
    format!("src-{i:02}")
}

/// A ready-to-run merge: every ring filled with its whole stream and its EOF.
struct Prepared {
    seq: Sequencer,
    reader: BusReader,
}

fn prepare(sources: &[Vec<u64>], payload: &[u8]) -> Prepared {
    let stride = aegis_shm_client::frame::stride(payload.len());
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(BUS_CAP)));
    let bus = BusWriter::create(bus_region.clone(), BUS_CAP, EPOCH, Policy::Block).unwrap();
    let reader = BusReader::attach(bus_region, Some(EPOCH), None).unwrap();
    let inputs = sources
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            // Room for every frame, the EOF and a wrap, as a power of two.
            let cap = ((ts.len() + 2) * stride + 64).next_power_of_two().max(4096);
            let region = Arc::new(HeapRegion::new(spsc::region_len(cap)));
            let mut p = Producer::create(region.clone(), cap, EPOCH, i as u16).unwrap();
            p.set_batch(256);
            p.set_stamp(false);
            for &t in ts {
                p.try_push_frame(&FrameHeader::event(Kind::Trade, t, 0, 64), payload)
                    .expect("the ring holds the whole stream");
            }
            p.finish(
                &mut Backoff::default(),
                Deadline::after(Duration::from_secs(1)),
            )
            .expect("room for the EOF");
            Input {
                name: name(i),
                topic_id: None,
                reader: RingReader::open(region, Some(EPOCH)).unwrap().into(),
            }
        })
        .collect();
    let seq = Sequencer::new(inputs, bus, Config::new(Mode::Backtest), None).unwrap();
    Prepared { seq, reader }
}

/// Runs a prepared merge: the sequencer on its own thread, the calling thread consumes every
/// frame. Returns the time from start to END-OF-STREAM and the merge keys read, if asked.
fn run(p: Prepared, keep: bool) -> (Duration, u64, Vec<u128>) {
    let Prepared { seq, mut reader } = p;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handle = aegis::sequencer::spawn("bench", seq, stop).unwrap();
    let mut keys = Vec::new();
    let mut count = 0u64;
    let mut sum = 0u64;
    let mut wait = SpinYield::default();
    // The deadline is checked only while waiting (no clock read per frame).
    let mut idle = 0u64;
    let mut deadline = None;
    loop {
        let f = match reader.try_next().expect("a valid bus") {
            Some(f) => f,
            None => {
                idle += 1;
                if idle.is_multiple_of(1024) {
                    let d =
                        *deadline.get_or_insert_with(|| Deadline::after(Duration::from_secs(30)));
                    assert!(!d.expired(), "no bus frame for 30 s");
                }
                wait.wait();
                continue;
            }
        };
        if idle != 0 {
            idle = 0;
            deadline = None;
            wait.reset();
        }
        if f.is_eof() {
            break;
        }
        let h = f.header;
        sum = sum.wrapping_add(u64::from_le_bytes(f.payload[..8].try_into().unwrap()));
        if keep {
            keys.push(merge_key(h.ts, Kind::Trade, h.source_id, h.source_seq));
        }
        count += 1;
    }
    let elapsed = t0.elapsed();
    black_box(sum);
    let summary = handle.join().unwrap().expect("merge succeeds");
    assert_eq!(summary.merged, count);
    (elapsed, count, keys)
}

fn reference(sources: &[Vec<u64>]) -> Vec<u128> {
    let mut all: Vec<u128> = sources
        .iter()
        .enumerate()
        .flat_map(|(i, ts)| {
            ts.iter()
                .enumerate()
                .map(move |(j, &t)| merge_key(t, Kind::Trade, i as u16, j as u64))
        })
        .collect();
    all.sort_unstable();
    all
}

fn check_sequencer(k: usize, payload: &[u8]) {
    let sources = streams(k, EVENTS, k as u64);
    let (_, count, keys) = run(prepare(&sources, payload), true);
    assert_eq!(count, EVENTS, "k = {k}: every event delivered");
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "k = {k}: key order");
    assert_eq!(keys, reference(&sources), "k = {k}: the reference merge");
}

/// The sequencer thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Three trade journals of `EVENTS` events in all, in `dir`: the bench's interleaving (two
/// events per timestamp, sources 60/30/10 %), written as `aegis-replay --convert` does.
fn write_journals(dir: &Path) -> Vec<PathBuf> {
    let pattern = [0usize, 1, 0, 2, 0, 1, 0, 1, 0, 0];
    let paths: Vec<PathBuf> = (0..3).map(|k| dir.join(format!("s{k}.aegisj"))).collect();
    let info = FileInfo::new(FileKind::Trade, "BTCUSDT", None).unwrap();
    let mut ws: Vec<JournalWriter> = paths
        .iter()
        .map(|p| JournalWriter::create(p, &info).unwrap())
        .collect();
    for i in 0..EVENTS {
        let t = Trade {
            symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
            id: i,
            price: Decimal {
                mantissa: 6_320_105 + (i % 1000) as i64,
                scale: 2,
            },
            qty: Decimal {
                mantissa: 5 + (i % 7) as i64,
                scale: 1,
            },
            buyer_maker: i.is_multiple_of(3),
        };
        ws[pattern[(i % 10) as usize]]
            .append(TS0 + (i / 2) * 1_000, 0, &AnyEvent::Trade(t))
            .unwrap();
    }
    for w in ws {
        w.finish().unwrap();
    }
    paths
}

/// One merge of the journals; the sequencer thread's CPU time and the events merged.
fn run_journals(paths: &[PathBuf]) -> (Duration, u64) {
    let inputs = paths
        .iter()
        .enumerate()
        .map(|(k, p)| Input {
            name: name(k),
            topic_id: None,
            reader: JournalSource::open(p, Kind::Trade).unwrap().into(),
        })
        .collect();
    let region = Arc::new(HeapRegion::new(spmc::region_len(BUS_CAP)));
    let bus = BusWriter::create(region, BUS_CAP, EPOCH, Policy::Overwrite).unwrap();
    let seq = Sequencer::new(inputs, bus, Config::new(Mode::Backtest), None).unwrap();
    let stop = AtomicBool::new(false);
    let t0 = thread_cpu();
    let summary = seq.run(&stop, &mut SpinYield::default()).unwrap();
    (thread_cpu() - t0, summary.merged)
}

fn bench_journals(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("aegis-bench-journals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let paths = write_journals(&dir);
    let mut g = c.benchmark_group("merge/journals");
    g.throughput(Throughput::Elements(EVENTS));
    g.bench_function("3", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (t, n) = run_journals(&paths);
                assert_eq!(n, EVENTS, "every event merged");
                total += t;
            }
            total
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_sequencer(c: &mut Criterion) {
    let payload = trade_payload();
    let mut g = c.benchmark_group("merge/sequencer");
    g.throughput(Throughput::Elements(EVENTS));
    for k in [1usize, 3, 8, 32] {
        check_sequencer(k, &payload);
        let sources = streams(k, EVENTS, k as u64);
        g.bench_with_input(BenchmarkId::from_parameter(k), &k, |b, _| {
            b.iter_custom(|iters| {
                // Each iteration merges EVENTS events; filling the rings is not timed.
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, n, _) = run(prepare(&sources, &payload), false);
                    assert_eq!(n, EVENTS);
                    total += t;
                }
                total
            })
        });
    }
    g.finish();
}

/// Per-source state of the linear merge: the cached head inside a struct about the size of the
/// sequencer's `Source` (so a scan strides over memory as the sequencer's does).
#[repr(C, align(16))]
struct Slot {
    head: Option<u128>,
    pos: usize,
    _rest: [u8; 280],
}

fn linear_merge(streams: &[Vec<u128>], out: &mut Vec<u128>) {
    let mut slots: Vec<Slot> = streams
        .iter()
        .map(|s| Slot {
            head: s.first().copied(),
            pos: 0,
            _rest: [0; 280],
        })
        .collect();
    loop {
        let mut best: Option<(u128, usize)> = None;
        for (i, s) in slots.iter().enumerate() {
            if let Some(k) = s.head {
                if best.is_none_or(|(b, _)| k < b) {
                    best = Some((k, i));
                }
            }
        }
        let Some((key, i)) = best else { break };
        out.push(key);
        let s = &mut slots[i];
        s.pos += 1;
        s.head = streams[i].get(s.pos).copied();
    }
}

/// The linear scan over heads packed in a contiguous array (16 bytes per source), for
/// comparison with the scan over per-source states.
fn packed_merge(streams: &[Vec<u128>], out: &mut Vec<u128>) {
    const DONE: u128 = u128::MAX;
    let mut heads: Vec<u128> = streams
        .iter()
        .map(|s| s.first().copied().unwrap_or(DONE))
        .collect();
    let mut pos = vec![0usize; streams.len()];
    loop {
        let (mut best, mut i) = (DONE, usize::MAX);
        for (j, &k) in heads.iter().enumerate() {
            if k < best {
                best = k;
                i = j;
            }
        }
        if i == usize::MAX {
            break;
        }
        out.push(best);
        pos[i] += 1;
        heads[i] = streams[i].get(pos[i]).copied().unwrap_or(DONE);
    }
}

fn heap_merge(streams: &[Vec<u128>], out: &mut Vec<u128>) {
    let mut pos = vec![0usize; streams.len()];
    let mut heap: BinaryHeap<Reverse<(u128, usize)>> = streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.first().map(|&k| Reverse((k, i))))
        .collect();
    while let Some(Reverse((key, i))) = heap.pop() {
        out.push(key);
        pos[i] += 1;
        if let Some(&k) = streams[i].get(pos[i]) {
            heap.push(Reverse((k, i)));
        }
    }
}

fn key_streams(k: usize) -> Vec<Vec<u128>> {
    streams(k, KEYS as u64, 0xC0FFEE + k as u64)
        .into_iter()
        .enumerate()
        .map(|(i, ts)| {
            ts.into_iter()
                .enumerate()
                .map(|(j, t)| merge_key(t, Kind::Trade, i as u16, j as u64))
                .collect()
        })
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge/pick");
    g.throughput(Throughput::Elements(KEYS as u64));
    for k in [1usize, 3, 8, 32, 64] {
        let s = key_streams(k);
        let mut expect: Vec<u128> = s.iter().flatten().copied().collect();
        expect.sort_unstable();
        let mut out = Vec::with_capacity(KEYS);
        linear_merge(&s, &mut out);
        assert_eq!(out, expect, "linear, k = {k}");
        out.clear();
        packed_merge(&s, &mut out);
        assert_eq!(out, expect, "linear-packed, k = {k}");
        out.clear();
        heap_merge(&s, &mut out);
        assert_eq!(out, expect, "heap, k = {k}");
        g.bench_with_input(BenchmarkId::new("linear", k), &s, |b, s| {
            b.iter(|| {
                out.clear();
                linear_merge(black_box(s), &mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("linear-packed", k), &s, |b, s| {
            b.iter(|| {
                out.clear();
                packed_merge(black_box(s), &mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("heap", k), &s, |b, s| {
            b.iter(|| {
                out.clear();
                heap_merge(black_box(s), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_sequencer, bench_journals, bench_pick
}
criterion_main!(benches);
