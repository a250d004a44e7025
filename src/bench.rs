//! The measurements behind `aegis-shmctl bench` (SPEC section 9): Aegis next to its baselines,
//! on the same machine, in one run. Every function returns plain data ([`LatencyRow`],
//! [`ThroughputRow`]); the command prints them as one table or as JSON.
//!
//! # Latency: what is measured
//!
//! Every latency figure is a **one-way delivery time**: from the moment the sender hands a
//! message over to the moment the receiver holds it, in nanoseconds of `CLOCK_MONOTONIC`
//! ([`monotonic_ns`]), recorded in an HDR histogram (3 significant digits) after a warm-up.
//!
//! - [`pingpong`] — the floor. Two threads pinned to the first two allowed cores bounce one
//!   cache line; one round trip crosses between the cores twice, so one-way = round trip / 2.
//! - [`aegis_latency`] — one thread pinned to the first core is both the producer and the
//!   consumer; the sequencer is pinned to the second core. The thread pushes one 64-byte
//!   `Trade` (the ring stamps `publish_ns` at commit), waits for it on the bus, decodes it
//!   (validated), and records `now - publish_ns`. That is the event's true producer → consumer
//!   latency, **not halved**: the event itself crosses between the cores twice (producer →
//!   sequencer → consumer), which is exactly one ping-pong round trip. The physical floor of
//!   this figure is therefore 2x the ping-pong figure; the ratio against the ping-pong
//!   round trip is `aegis / (2 * pingpong)`.
//!
//!   The session runs in **live** mode with one source: a live merge emits a head as soon as
//!   every source has one (with one source: at once), so the figure is one true hop through
//!   the sequencer. A backtest merge would not do: it holds the last frame of a run of equal
//!   timestamps until it sees the next frame (or EOF), so a lone event would wait for the
//!   next push. `max_lateness` plays no role with one source that always has a head.
//!   With `spin` the sequencer and the consumer busy-spin (the pinned low-latency setup) and
//!   events go back to back; without, both use [`Backoff`], the daemon's default, and each
//!   event follows [`BACKOFF_GAP`] of silence, so the sequencer has backed off to sleeping.
//! - [`socket_json_latency`] — the design Aegis replaces: a Unix socket carrying one JSON line
//!   per event. The producer (first core) stamps the message, serialises it and writes it;
//!   the consumer (second core, blocked in `read`) reads the line, parses it, and records
//!   `now - stamp`. One event is in flight at a time (the producer waits for the consumer to
//!   be done), as in the two rows above.
//!
//! On a virtual machine the cost of one cross-core hop moves (25 to 175 ns were seen on one
//! 2-vCPU machine within minutes) as the hypervisor places the virtual cores; compare Aegis
//! with the ping-pong through [`latency_interleaved`], which alternates short runs of both.
//!
//! Rings live in [`HeapRegion`]s: in-process memory with the same cache-coherence behaviour as
//! a `/dev/shm` mapping (both are ordinary shared pages to the CPU), and nothing to clean up
//! if a run fails.
//!
//! # Throughput
//!
//! The three-source stream (trades, book, klines, about 60/30/10 %) of
//! [`synthetic_sources`]: global event `i` goes to source `PATTERN[i % 10]`, at
//! `ts = TS0 + (i / 2) µs`, so consecutive events tie on ts across sources and kinds.
//! Payloads are real rkyv archives (a `Trade` is 64 bytes), taken from a small pool.
//!
//! - [`inproc_merge_throughput`] — the baseline: the same k-way merge by [`merge_key`] in one
//!   thread over in-memory vectors, copying each frame (header + payload) into a 1 MiB output
//!   buffer and touching the payload.
//! - [`aegis_throughput`] / [`aegis_throughput_feeds`] — one producer thread per source pushes
//!   pre-encoded frames (batches of 64, no stamping) into its ring; the sequencer (backtest,
//!   block bus) merges; one consumer reads every frame in place, touches the payload and
//!   checks merge-key order, until END-OF-STREAM. Timed from the start signal that releases
//!   the producers to the consumer's END-OF-STREAM.
//! - [`socket_json_throughput`] — one Unix socket per topic carrying JSON lines, one consumer
//!   thread that `poll`s the three sockets and parses every line.
//!
//! Every wait is bounded ([`STEP_TIMEOUT`] without progress ends the run with
//! [`BenchError::Timeout`]) and yields the CPU, except the explicit spins of [`pingpong`] and
//! `aegis_latency(_, true)`, which fall back to yielding after a long fruitless spin.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aegis_shm_client::event::{encode_into, Book, Decimal, Event, EventRef, Kline, Symbol, Trade};
use aegis_shm_client::frame::{self, flags, monotonic_ns, FrameHeader, Kind, FRAME_HEADER_LEN};
use aegis_shm_client::segment::HeapRegion;
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy};
use aegis_shm_client::spsc::{self, ClaimError, Producer, PushError, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline, SpinYield, WaitKind, WaitStrategy};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::sequencer::{self, merge_key, Config, Input, Mode, Sequencer};

/// How long any wait may go without progress before the run gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Epoch of the bench's segments.
const EPOCH: u64 = 0xBE7C;
/// First event time: 2024-09-21T00:00:59Z in ns.
const TS0: u64 = 1_726_876_859_000_000_000;
/// Source of global event `i` (0 trades, 1 book, 2 klines): 6/3/1 in every 10.
const PATTERN: [usize; 10] = [0, 1, 0, 0, 1, 0, 2, 0, 1, 0];
/// Distinct pre-encoded payloads per kind.
const POOL: usize = 256;
/// Waits between two checks of the deadline and the abort flag.
const CHECK_EVERY: u64 = 256;
/// Spins before a spinning wait starts yielding (a peer that was preempted).
const SPINS_BEFORE_YIELD: u32 = 1 << 16;

/// One latency measurement: a row of the latency table.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct LatencyRow {
    /// What was measured.
    pub name: String,
    /// Median one-way latency, ns.
    pub p50_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Largest sample, ns.
    pub max_ns: u64,
    /// Samples recorded (after the warm-up).
    pub samples: u64,
}

/// One throughput measurement: a row of the throughput table.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ThroughputRow {
    /// What was measured.
    pub name: String,
    /// Events delivered to the consumer.
    pub events: u64,
    /// Wall-clock seconds from start to the last event.
    pub seconds: f64,
    /// `events / seconds`.
    pub events_per_s: f64,
}

impl ThroughputRow {
    fn new(name: &str, events: u64, elapsed: Duration) -> ThroughputRow {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        ThroughputRow {
            name: name.to_string(),
            events,
            seconds,
            events_per_s: events as f64 / seconds,
        }
    }
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up segments, the sequencer, sockets or threads failed.
    #[error("bench setup failed: {0}")]
    Setup(String),
    /// A wait saw no progress for [`STEP_TIMEOUT`].
    #[error("bench timed out: {0} made no progress for {STEP_TIMEOUT:?}")]
    Timeout(&'static str),
    /// Another thread of the same run failed first.
    #[error("bench aborted: another thread of the run failed")]
    Aborted,
    /// The run finished but delivered something wrong.
    #[error("bench failed: {0}")]
    Failed(String),
    /// An I/O error on a socket.
    #[error("bench I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn setup_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BenchError {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// The more telling of two errors (a real cause beats `Aborted`).
fn first_error(a: Result<(), BenchError>, b: Result<(), BenchError>) -> Result<(), BenchError> {
    match (a, b) {
        (Err(BenchError::Aborted), Err(e)) | (Err(e), _) => Err(e),
        (Ok(()), r) => r,
    }
}

fn join<T>(h: JoinHandle<Result<T, BenchError>>, what: &str) -> Result<T, BenchError> {
    h.join()
        .unwrap_or_else(|_| Err(BenchError::Failed(format!("{what} thread panicked"))))
}

/// Sets the flags when dropped: whatever way the measuring thread leaves (error or panic),
/// the other threads of the run stop.
struct StopOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// A wait strategy with a deadline measured from the first fruitless wait, checked (with the
/// abort flag) only every [`CHECK_EVERY`] waits so the fast path reads no clock.
struct Waiter<W> {
    strategy: W,
    idle: u64,
    deadline: Option<Instant>,
    what: &'static str,
}

impl<W: WaitStrategy> Waiter<W> {
    fn new(strategy: W, what: &'static str) -> Waiter<W> {
        Waiter {
            strategy,
            idle: 0,
            deadline: None,
            what,
        }
    }

    #[inline]
    fn progress(&mut self) {
        if self.idle != 0 {
            self.idle = 0;
            self.deadline = None;
            self.strategy.reset();
        }
    }

    #[inline]
    fn idle(&mut self, abort: &AtomicBool) -> Result<(), BenchError> {
        self.idle += 1;
        if self.idle.is_multiple_of(CHECK_EVERY) {
            if abort.load(Ordering::Relaxed) {
                return Err(BenchError::Aborted);
            }
            let now = Instant::now();
            if now >= *self.deadline.get_or_insert(now + STEP_TIMEOUT) {
                abort.store(true, Ordering::Relaxed);
                return Err(BenchError::Timeout(self.what));
            }
        }
        self.strategy.wait();
        Ok(())
    }
}

/// Waits (yielding) until `go` is set: the start line of a throughput run. Unlike a barrier
/// it can be called off (`abort`), should a later thread fail to spawn.
fn wait_for_start(go: &AtomicBool, abort: &AtomicBool) -> Result<(), BenchError> {
    let mut w = Waiter::new(SpinYield::default(), "start of the run");
    while !go.load(Ordering::Acquire) {
        w.idle(abort)?;
    }
    Ok(())
}

/// A spinning wait that yields once a spin has lasted long (the peer was preempted).
fn spinning() -> SpinYield {
    SpinYield::new(SPINS_BEFORE_YIELD)
}

/// The first two cores this process may run on, if there are two.
fn two_cores() -> Option<(core_affinity::CoreId, core_affinity::CoreId)> {
    let ids = core_affinity::get_core_ids()?;
    (ids.len() >= 2).then(|| (ids[0], ids[1]))
}

fn pin(core: Option<core_affinity::CoreId>) {
    if let Some(c) = core {
        core_affinity::set_for_current(c);
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

fn latency_row(name: &str, h: &Histogram<u64>) -> LatencyRow {
    LatencyRow {
        name: name.to_string(),
        p50_ns: h.value_at_quantile(0.50),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        max_ns: h.max(),
        samples: h.len(),
    }
}

/// Round trips discarded before recording (caches, branch predictors, page faults).
fn warmup(samples: u64) -> u64 {
    (samples / 10).clamp(16, 20_000)
}

// ------------------------------------------------------------------------------------------
// Latency
// ------------------------------------------------------------------------------------------

/// One cache line, alone on its 128-byte pair of lines (no false sharing with anything).
#[repr(align(128))]
struct Line(AtomicU64);

/// Raw cache-line ping-pong between the first two cores: the floor of any cross-core hand-off.
/// One-way latency = round trip / 2.
pub fn pingpong(samples: u64) -> Result<LatencyRow, BenchError> {
    Ok(latency_row(PINGPONG, &pingpong_histogram(samples)?))
}

const PINGPONG: &str = "ping-pong (raw cache line)";

fn aegis_latency_name(spin: bool) -> &'static str {
    if spin {
        "aegis (spin, pinned)"
    } else {
        "aegis (backoff, pinned)"
    }
}

/// [`pingpong`] and [`aegis_latency`] interleaved: `rounds` alternating runs of
/// `samples / rounds` samples each, merged into one row per measurement. On a virtual
/// machine the hypervisor moves virtual cores between physical cores (same core, sibling,
/// another complex) from one second to the next, and a cross-core hop then costs anywhere
/// between 25 and 175 ns; interleaving makes both rows sample the same placements, so their
/// ratio is meaningful. Returns `[ping-pong, aegis]`.
pub fn latency_interleaved(
    samples: u64,
    rounds: u64,
    spin: bool,
) -> Result<[LatencyRow; 2], BenchError> {
    let rounds = rounds.clamp(1, samples.max(1));
    let per = samples / rounds;
    let (mut pp, mut ae) = (histogram(), histogram());
    for r in 0..rounds {
        // The last round takes the remainder, so the rows hold exactly `samples` each.
        let n = if r + 1 == rounds {
            samples - per * (rounds - 1)
        } else {
            per
        };
        pp.add(pingpong_histogram(n)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        ae.add(aegis_latency_histogram(n, spin)?)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
    }
    Ok([
        latency_row(PINGPONG, &pp),
        latency_row(aegis_latency_name(spin), &ae),
    ])
}

fn pingpong_histogram(samples: u64) -> Result<Histogram<u64>, BenchError> {
    let total = warmup(samples) + samples;
    let skip = warmup(samples);
    let cores = two_cores();
    let line = Arc::new(Line(AtomicU64::new(0)));
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);

    let (l, a) = (line.clone(), abort.clone());
    let ponger = std::thread::Builder::new()
        .name("aegis-bench-pong".into())
        .spawn(move || -> Result<(), BenchError> {
            pin(cores.map(|c| c.1));
            let mut w = Waiter::new(spinning(), "ping-pong responder");
            for k in 0..total {
                while l.0.load(Ordering::Acquire) != 2 * k + 1 {
                    w.idle(&a)?;
                }
                w.progress();
                l.0.store(2 * k + 2, Ordering::Release);
            }
            Ok(())
        })
        .map_err(setup_err("spawn"))?;
    let (l, a) = (line, abort.clone());
    let pinger = std::thread::Builder::new()
        .name("aegis-bench-ping".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.0));
            let mut h = histogram();
            let mut w = Waiter::new(spinning(), "ping-pong initiator");
            for k in 0..total {
                let t0 = monotonic_ns();
                l.0.store(2 * k + 1, Ordering::Release);
                while l.0.load(Ordering::Acquire) != 2 * k + 2 {
                    w.idle(&a)?;
                }
                let t1 = monotonic_ns();
                w.progress();
                if k >= skip {
                    h.saturating_record((t1 - t0) / 2);
                }
            }
            Ok(h)
        })
        .map_err(setup_err("spawn"))?;
    let h = join(pinger, "ping-pong initiator");
    if h.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let p = join(ponger, "ping-pong responder");
    let h = match (h, p) {
        (Ok(h), Ok(())) => h,
        (h, p) => {
            first_error(h.map(drop), p)?;
            unreachable!("one of them failed")
        }
    };
    Ok(h)
}

fn sample_trade(i: u64) -> Trade {
    Trade {
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
    }
}

/// Idle time before each event of `aegis_latency(_, false)`.
pub const BACKOFF_GAP: Duration = Duration::from_micros(100);

/// Producer → sequencer → consumer latency of one 64-byte `Trade`, the producer and the
/// consumer being one thread on the first core and the sequencer pinned to the second (see the
/// module docs). `spin`: sequencer and consumer busy-spin, events back to back. Otherwise
/// both use [`Backoff`] and every event follows [`BACKOFF_GAP`] of silence (the thread
/// sleeps), so the figure shows what backing off costs on a sparse stream (back to back, a
/// backoff never gets past its spinning phase and the figure would equal the spinning one).
pub fn aegis_latency(samples: u64, spin: bool) -> Result<LatencyRow, BenchError> {
    Ok(latency_row(
        aegis_latency_name(spin),
        &aegis_latency_histogram(samples, spin)?,
    ))
}

fn aegis_latency_histogram(samples: u64, spin: bool) -> Result<Histogram<u64>, BenchError> {
    const RING: usize = 1 << 16;
    const BUS: usize = 1 << 16;
    let skip = warmup(samples);
    let total = skip + samples;
    let cores = two_cores();

    let ring_region = Arc::new(HeapRegion::new(spsc::region_len(RING)));
    let mut producer =
        Producer::create(ring_region.clone(), RING, EPOCH, 0).map_err(setup_err("ring"))?;
    producer.set_batch(1);
    producer.set_stamp(true);
    let reader = RingReader::open(ring_region, Some(EPOCH)).map_err(setup_err("ring reader"))?;
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(BUS)));
    let bus = BusWriter::create(bus_region.clone(), BUS, EPOCH, Policy::Overwrite)
        .map_err(setup_err("bus"))?;
    let mut consumer =
        BusReader::attach(bus_region, Some(EPOCH), None).map_err(setup_err("bus reader"))?;

    let mut config = Config::new(Mode::Live {
        max_lateness: Duration::from_micros(1),
    });
    config.core = cores.map(|c| c.1.id);
    config.wait = if spin {
        WaitKind::Spin
    } else {
        WaitKind::Backoff
    };
    let input = Input {
        name: "trades".into(),
        topic_id: Some(0),
        reader,
    };
    let seq = Sequencer::new(vec![input], bus, config, None).map_err(setup_err("sequencer"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(vec![stop.clone(), abort.clone()]);
    let seq_handle =
        sequencer::spawn("bench-latency", seq, stop.clone()).map_err(setup_err("spawn"))?;

    let a = abort.clone();
    let worker = std::thread::Builder::new()
        .name("aegis-bench-pc".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.0));
            fn run<W: WaitStrategy>(
                producer: &mut Producer,
                consumer: &mut BusReader,
                mut w: Waiter<W>,
                total: u64,
                skip: u64,
                gap: Option<Duration>,
                abort: &AtomicBool,
            ) -> Result<Histogram<u64>, BenchError> {
                let mut h = histogram();
                for i in 0..total {
                    if let Some(gap) = gap {
                        std::thread::sleep(gap);
                    }
                    let ts = TS0 + i;
                    let mut ev = sample_trade(i);
                    loop {
                        match producer.try_push(ts, 0, ev) {
                            Ok(_) => break,
                            Err(PushError::Full(e)) => {
                                ev = e;
                                w.idle(abort)?;
                            }
                            Err(e) => return Err(BenchError::Failed(e.to_string())),
                        }
                    }
                    w.progress();
                    let lat = loop {
                        match consumer.try_next() {
                            Ok(Some(f)) => {
                                if f.is_eof() {
                                    return Err(BenchError::Failed(
                                        "END-OF-STREAM before the last event".into(),
                                    ));
                                }
                                let id = match f.event() {
                                    Ok(EventRef::Trade(t)) => t.id.to_native(),
                                    other => {
                                        return Err(BenchError::Failed(format!(
                                            "unexpected bus frame: {other:?}"
                                        )))
                                    }
                                };
                                let now = monotonic_ns();
                                if id != i || f.header.ts != ts {
                                    return Err(BenchError::Failed(format!(
                                        "expected trade {i}, got {id}"
                                    )));
                                }
                                break now.saturating_sub(f.header.publish_ns);
                            }
                            Ok(None) => w.idle(abort)?,
                            Err(e) => return Err(BenchError::Failed(e.to_string())),
                        }
                    };
                    w.progress();
                    if i >= skip {
                        h.saturating_record(lat);
                    }
                }
                producer
                    .finish(&mut Backoff::default(), Deadline::after(STEP_TIMEOUT))
                    .map_err(|_| BenchError::Timeout("producer EOF"))?;
                loop {
                    match consumer.try_next() {
                        Ok(Some(f)) if f.is_eof() => return Ok(h),
                        Ok(Some(_)) => {
                            return Err(BenchError::Failed("an extra frame on the bus".into()))
                        }
                        Ok(None) => w.idle(abort)?,
                        Err(e) => return Err(BenchError::Failed(e.to_string())),
                    }
                }
            }
            let what = "latency producer/consumer";
            let r = if spin {
                run(
                    &mut producer,
                    &mut consumer,
                    Waiter::new(spinning(), what),
                    total,
                    skip,
                    None,
                    &a,
                )
            } else {
                run(
                    &mut producer,
                    &mut consumer,
                    Waiter::new(Backoff::default(), what),
                    total,
                    skip,
                    Some(BACKOFF_GAP),
                    &a,
                )
            };
            if r.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            r
        })
        .map_err(setup_err("spawn"))?;
    let h = join(worker, "latency producer/consumer");
    if h.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let s = seq_handle
        .join()
        .map_err(|_| BenchError::Failed("sequencer panicked".into()))?;
    drop(guard);
    let h = h?;
    let summary = s.map_err(|e| BenchError::Failed(format!("sequencer: {e}")))?;
    if summary.merged != total {
        return Err(BenchError::Failed(format!(
            "sequencer merged {} events, expected {total}",
            summary.merged
        )));
    }
    Ok(h)
}

/// A trade as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
struct JsonTrade {
    symbol: String,
    id: u64,
    price: String,
    qty: String,
    buyer_maker: bool,
    ts: u64,
    publish_ns: u64,
}

/// Best bid and ask as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
struct JsonBook {
    symbol: String,
    update_id: u64,
    bid_price: String,
    bid_qty: String,
    ask_price: String,
    ask_qty: String,
    ts: u64,
}

/// A kline as the JSON design carried it.
#[derive(Serialize, Deserialize, Debug)]
struct JsonKline {
    symbol: String,
    interval: String,
    open_time: u64,
    close_time: u64,
    open: String,
    high: String,
    low: String,
    close: String,
    volume: String,
    quote_volume: String,
    trades: u64,
    taker_buy_base: String,
    taker_buy_quote: String,
    ts: u64,
}

fn json_trade(i: u64, ts: u64, publish_ns: u64) -> JsonTrade {
    let t = sample_trade(i);
    JsonTrade {
        symbol: "BTCUSDT".into(),
        id: i,
        price: t.price.to_string(),
        qty: t.qty.to_string(),
        buyer_maker: t.buyer_maker,
        ts,
        publish_ns,
    }
}

/// One-way latency of the socket + JSON design: the producer (first core) stamps, serialises
/// and writes one line; the consumer (second core, blocked in `read`) reads and parses it and
/// records `now - stamp`. One event in flight at a time.
pub fn socket_json_latency(samples: u64) -> Result<LatencyRow, BenchError> {
    let skip = warmup(samples);
    let total = skip + samples;
    let cores = two_cores();
    let (mut tx, rx) = UnixStream::pair().map_err(setup_err("socketpair"))?;
    tx.set_write_timeout(Some(STEP_TIMEOUT))?;
    rx.set_read_timeout(Some(STEP_TIMEOUT))?;
    let received = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);

    let (r, a) = (received.clone(), abort.clone());
    let consumer = std::thread::Builder::new()
        .name("aegis-bench-json-rx".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.1));
            let run = || -> Result<Histogram<u64>, BenchError> {
                let mut h = histogram();
                let mut rx = BufReader::new(rx);
                let mut line = String::new();
                for i in 0..total {
                    line.clear();
                    let n = rx.read_line(&mut line).map_err(|e| match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                            BenchError::Timeout("JSON consumer")
                        }
                        _ => BenchError::Io(e),
                    })?;
                    if n == 0 {
                        return Err(BenchError::Aborted);
                    }
                    let t: JsonTrade = serde_json::from_str(&line)
                        .map_err(|e| BenchError::Failed(format!("bad JSON line: {e}")))?;
                    let now = monotonic_ns();
                    if t.id != i {
                        return Err(BenchError::Failed(format!("expected {i}, got {}", t.id)));
                    }
                    if i >= skip {
                        h.saturating_record(now.saturating_sub(t.publish_ns));
                    }
                    r.store(i + 1, Ordering::Release);
                }
                Ok(h)
            };
            let res = run();
            if res.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            res
        })
        .map_err(setup_err("spawn"))?;

    let a = abort.clone();
    let producer = std::thread::Builder::new()
        .name("aegis-bench-json-tx".into())
        .spawn(move || -> Result<(), BenchError> {
            pin(cores.map(|c| c.0));
            let mut buf = Vec::with_capacity(256);
            let mut w = Waiter::new(SpinYield::default(), "JSON producer");
            let res = (|| {
                for i in 0..total {
                    while received.load(Ordering::Acquire) != i {
                        w.idle(&a)?;
                    }
                    w.progress();
                    buf.clear();
                    let msg = json_trade(i, TS0 + i, monotonic_ns());
                    serde_json::to_writer(&mut buf, &msg)
                        .map_err(|e| BenchError::Failed(e.to_string()))?;
                    buf.push(b'\n');
                    tx.write_all(&buf)?;
                }
                Ok(())
            })();
            if res.is_err() {
                a.store(true, Ordering::Relaxed);
            }
            res
        })
        .map_err(setup_err("spawn"))?;
    let p = join(producer, "JSON producer");
    let h = join(consumer, "JSON consumer");
    let h = match (h, p) {
        (Ok(h), Ok(())) => h,
        (h, p) => {
            first_error(h.map(drop), p)?;
            unreachable!("one of them failed")
        }
    };
    Ok(latency_row("socket + JSON (Unix socket)", &h))
}

// ------------------------------------------------------------------------------------------
// Throughput
// ------------------------------------------------------------------------------------------

/// One source of the synthetic three-source stream, in memory: its timestamps, and a pool of
/// pre-encoded payloads that its `j`-th event takes `j % POOL` from.
pub struct SyntheticSource {
    /// The source's name (`book`, `klines` or `trades`).
    pub name: &'static str,
    /// Its rank: its position among the sorted names, as the sequencer assigns it.
    pub rank: u16,
    /// The kind of its events.
    pub kind: Kind,
    /// The event times, non-decreasing.
    pub ts: Vec<u64>,
    payloads: Vec<Vec<u8>>,
}

impl SyntheticSource {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether the source has no events.
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// The `j`-th frame: its header (as a producer hands it over) and its payload.
    #[inline]
    pub fn frame(&self, j: usize) -> (FrameHeader, &[u8]) {
        let p = &self.payloads[j % POOL];
        (
            FrameHeader::event(self.kind, self.ts[j], self.rank as u32, p.len()),
            p,
        )
    }

    /// The merge key of the `j`-th event (its source sequence is `j`).
    #[inline]
    fn key(&self, j: usize) -> Option<u128> {
        self.ts
            .get(j)
            .map(|&ts| merge_key(ts, self.kind, self.rank, j as u64))
    }
}

#[repr(align(16))]
struct Aligned([u8; 512]);

fn encode<E: Event>(ev: &E) -> Vec<u8> {
    let mut buf = Aligned([0; 512]);
    let n = encode_into(ev, &mut buf.0).expect("a fixed-size event fits 512 bytes");
    buf.0[..n].to_vec()
}

fn dec(mantissa: i64, scale: u8) -> Decimal {
    Decimal { mantissa, scale }
}

fn sample_book(i: u64) -> Book {
    Book {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        update_id: i,
        bid_price: dec(6_320_100 + (i % 100) as i64, 2),
        bid_qty: dec(12 + (i % 5) as i64, 1),
        ask_price: dec(6_320_101 + (i % 100) as i64, 2),
        ask_qty: dec(3 + (i % 9) as i64, 1),
    }
}

fn sample_kline(i: u64) -> Kline {
    let p = |d: i64| dec(6_320_000 + d + (i % 50) as i64, 2);
    Kline {
        symbol: Symbol(*b"BTCUSDT\0\0\0\0\0\0\0\0\0"),
        interval: Symbol(*b"1m\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
        open_time: TS0 / 1_000_000 + i * 60_000,
        close_time: TS0 / 1_000_000 + i * 60_000 + 59_999,
        open: p(0),
        high: p(90),
        low: p(-40),
        close: p(17),
        volume: dec(1_234_567, 3),
        quote_volume: dec(78_020_111_233, 2),
        trades: 1000 + i,
        taker_buy_base: dec(612_345, 3),
        taker_buy_quote: dec(38_701_234_567, 2),
    }
}

/// Which of the three sources (0 trades, 1 book, 2 klines) each of the first `events`
/// global events belongs to, with its ts.
fn global_stream(events: u64) -> impl Iterator<Item = (usize, u64)> {
    (0..events).map(|i| (PATTERN[(i % 10) as usize], TS0 + (i / 2) * 1_000))
}

/// The three-source synthetic stream of `events` events (trades, book, klines ~ 60/30/10 %),
/// sorted by name (so `rank` is the index): `book`, `klines`, `trades`.
pub fn synthetic_sources(events: u64) -> Vec<SyntheticSource> {
    // (name, kind, pattern index) sorted by name.
    let spec: [(&'static str, Kind, usize); 3] = [
        ("book", Kind::Book, 1),
        ("klines", Kind::Kline, 2),
        ("trades", Kind::Trade, 0),
    ];
    let mut ts: [Vec<u64>; 3] = Default::default();
    for (src, t) in global_stream(events) {
        ts[src].push(t);
    }
    spec.iter()
        .enumerate()
        .map(|(rank, &(name, kind, src))| SyntheticSource {
            name,
            rank: rank as u16,
            kind,
            ts: std::mem::take(&mut ts[src]),
            payloads: (0..POOL as u64)
                .map(|i| match kind {
                    Kind::Trade => encode(&sample_trade(i)),
                    Kind::Book => encode(&sample_book(i)),
                    _ => encode(&sample_kline(i)),
                })
                .collect(),
        })
        .collect()
}

/// The in-process baseline merge: a linear scan over the cached heads of the sources (as the
/// sequencer does), copying each frame (header + payload) into a 1 MiB output buffer used as
/// a ring, and touching the payload there. Returns (events, checksum).
fn inproc_merge(sources: &[SyntheticSource]) -> Result<(u64, u64), BenchError> {
    const OUT: usize = 1 << 20;
    let mut out = vec![0u8; OUT];
    let mut off = 0usize;
    let mut pos = vec![0usize; sources.len()];
    let mut heads: Vec<Option<u128>> = sources.iter().map(|s| s.key(0)).collect();
    let (mut count, mut sum, mut prev) = (0u64, 0u64, 0u128);
    loop {
        let mut best: Option<(u128, usize)> = None;
        for (i, h) in heads.iter().enumerate() {
            if let Some(k) = *h {
                if best.is_none_or(|(b, _)| k < b) {
                    best = Some((k, i));
                }
            }
        }
        let Some((key, i)) = best else { break };
        if key < prev {
            return Err(BenchError::Failed("in-process merge out of order".into()));
        }
        prev = key;
        let s = &sources[i];
        let j = pos[i];
        let (mut h, payload) = s.frame(j);
        h.source_id = s.rank;
        h.source_seq = j as u64;
        h.bus_seq = count;
        let stride = frame::stride(payload.len());
        if off + stride > OUT {
            off = 0;
        }
        out[off..off + FRAME_HEADER_LEN].copy_from_slice(&h.to_bytes());
        let p = off + FRAME_HEADER_LEN;
        out[p..p + payload.len()].copy_from_slice(payload);
        sum = sum.wrapping_add(u64::from_le_bytes(
            out[p..p + 8].try_into().expect("8 bytes"),
        ));
        off += stride;
        pos[i] = j + 1;
        heads[i] = s.key(j + 1);
        count += 1;
    }
    Ok((count, std::hint::black_box(sum)))
}

/// Baseline: the three-source merge of `events` events done in one thread over in-memory
/// vectors (building the vectors is not timed).
pub fn inproc_merge_throughput(events: u64) -> Result<ThroughputRow, BenchError> {
    let sources = synthetic_sources(events);
    let t0 = Instant::now();
    let (count, _) = inproc_merge(&sources)?;
    let elapsed = t0.elapsed();
    if count != events {
        return Err(BenchError::Failed(format!(
            "in-process merge produced {count} events, expected {events}"
        )));
    }
    Ok(ThroughputRow::new(
        "in-process merge (3 sources)",
        count,
        elapsed,
    ))
}

/// The producer end handed to a [`Feed`]: pushes frames, waiting (yielding, bounded) while the
/// ring is full.
pub struct FramePusher {
    producer: Producer,
    abort: Arc<AtomicBool>,
    waiter: Waiter<Backoff>,
    pushed: u64,
}

impl FramePusher {
    /// Copies a ready-made frame into the ring (its `len`, `source_id`, `source_seq` and
    /// `publish_ns` are filled in), waiting while the ring is full.
    #[inline]
    pub fn push(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), BenchError> {
        loop {
            match self.producer.try_push_frame(header, payload) {
                Ok(_) => {
                    self.waiter.progress();
                    self.pushed += 1;
                    return Ok(());
                }
                Err(ClaimError::Full) => self.waiter.idle(&self.abort)?,
                Err(e) => return Err(BenchError::Failed(e.to_string())),
            }
        }
    }

    /// Frames pushed so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }
}

/// A function that pushes one source's whole stream (without ending it: the runner writes the
/// EOF) through a [`FramePusher`].
pub type FeedFn = Box<dyn FnOnce(&mut FramePusher) -> Result<(), BenchError> + Send>;

/// One source of an Aegis throughput run: a name (its rank is its position among the sorted
/// names) and the function that feeds it, run on a producer thread of its own.
pub struct Feed {
    /// The source's name.
    pub name: String,
    /// Pushes the source's frames.
    pub push: FeedFn,
}

/// Aegis throughput on the synthetic three-source stream of `events` events: in-memory
/// feeds → rings of `ring_bytes` → sequencer (backtest, block bus of `bus_bytes`) → one
/// consumer.
pub fn aegis_throughput(
    events: u64,
    ring_bytes: usize,
    bus_bytes: usize,
) -> Result<ThroughputRow, BenchError> {
    let sources = Arc::new(synthetic_sources(events));
    let feeds = (0..sources.len())
        .map(|i| {
            let sources = sources.clone();
            Feed {
                name: sources[i].name.to_string(),
                push: Box::new(move |p: &mut FramePusher| {
                    let s = &sources[i];
                    for j in 0..s.len() {
                        let (h, payload) = s.frame(j);
                        p.push(&h, payload)?;
                    }
                    Ok(())
                }),
            }
        })
        .collect();
    aegis_throughput_feeds(
        "aegis (3 sources, in-memory feeds)",
        feeds,
        ring_bytes,
        bus_bytes,
    )
}

/// Aegis end-to-end throughput for any feeds (the synthetic stream, journal replays, ...):
/// one producer thread per feed (batches of 64 frames, no stamping), the sequencer in backtest
/// mode with a block bus, and one consumer (the calling thread) that reads every frame in
/// place, touches its payload and checks merge-key order, until END-OF-STREAM. Timed from the
/// start signal that releases the producers to END-OF-STREAM.
///
/// Waiting: producers with a full ring back off to short sleeps (see `producer_backoff`), the
/// sequencer yields when starved ([`WaitKind::Yield`]), the consumer spins then yields. Rings
/// of 1 MiB or more keep the sequencer fed across a producer's sleep; smaller rings work but
/// measure the scheduler more than Aegis.
pub fn aegis_throughput_feeds(
    name: &str,
    feeds: Vec<Feed>,
    ring_bytes: usize,
    bus_bytes: usize,
) -> Result<ThroughputRow, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(vec![stop.clone(), abort.clone()]);
    let bus_region = Arc::new(HeapRegion::new(spmc::region_len(bus_bytes)));
    let bus = BusWriter::create(bus_region.clone(), bus_bytes, EPOCH, Policy::Block)
        .map_err(setup_err("bus"))?;
    let mut consumer =
        BusReader::attach(bus_region, Some(EPOCH), None).map_err(setup_err("bus reader"))?;
    let go = Arc::new(AtomicBool::new(false));
    let mut inputs = Vec::new();
    let mut pushers = Vec::new();
    for (i, feed) in feeds.into_iter().enumerate() {
        let region = Arc::new(HeapRegion::new(spsc::region_len(ring_bytes)));
        let mut producer = Producer::create(region.clone(), ring_bytes, EPOCH, i as u16)
            .map_err(setup_err("ring"))?;
        producer.set_batch(64);
        producer.set_stamp(false);
        inputs.push(Input {
            name: feed.name.clone(),
            topic_id: None,
            reader: RingReader::open(region, Some(EPOCH)).map_err(setup_err("ring reader"))?,
        });
        pushers.push((
            feed,
            FramePusher {
                producer,
                abort: abort.clone(),
                waiter: Waiter::new(producer_backoff(), "producer (ring full)"),
                pushed: 0,
            },
        ));
    }
    let mut config = Config::new(Mode::Backtest);
    config.wait = WaitKind::Yield;
    let seq = Sequencer::new(inputs, bus, config, None).map_err(setup_err("sequencer"))?;
    let seq_handle =
        sequencer::spawn("bench-throughput", seq, stop.clone()).map_err(setup_err("spawn"))?;
    let mut producers = Vec::new();
    for (feed, mut pusher) in pushers {
        let go = go.clone();
        let a = abort.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("aegis-bench-{}", feed.name))
            .spawn(move || -> Result<u64, BenchError> {
                wait_for_start(&go, &a)?;
                let r = (feed.push)(&mut pusher).and_then(|()| {
                    pusher.producer.flush();
                    pusher
                        .producer
                        .finish(&mut Backoff::default(), Deadline::after(STEP_TIMEOUT))
                        .map_err(|_| BenchError::Timeout("producer EOF"))
                });
                if r.is_err() {
                    a.store(true, Ordering::Relaxed);
                }
                r.map(|()| pusher.pushed)
            });
        match spawned {
            Ok(h) => producers.push(h),
            Err(e) => {
                // The guard calls off the threads already waiting for the start.
                return Err(BenchError::Setup(format!("spawn: {e}")));
            }
        }
    }

    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    let consumed = (|| -> Result<(u64, u64), BenchError> {
        let mut w = Waiter::new(SpinYield::default(), "consumer");
        let (mut count, mut sum, mut prev) = (0u64, 0u64, 0u128);
        loop {
            match consumer.try_next() {
                Ok(Some(f)) => {
                    w.progress();
                    let h = f.header;
                    if f.is_eof() {
                        if h.has(flags::ABORT) {
                            return Err(BenchError::Failed("the session aborted".into()));
                        }
                        return Ok((count, sum));
                    }
                    let key = merge_key(
                        h.ts,
                        h.kind().unwrap_or(Kind::Control),
                        h.source_id,
                        h.source_seq,
                    );
                    if key < prev {
                        return Err(BenchError::Failed(format!(
                            "bus out of merge-key order at bus seq {}",
                            h.bus_seq
                        )));
                    }
                    prev = key;
                    let p = f.payload;
                    if p.len() >= 8 {
                        sum = sum
                            .wrapping_add(u64::from_le_bytes(p[..8].try_into().expect("8 bytes")));
                    }
                    count += 1;
                }
                Ok(None) => w.idle(&abort)?,
                Err(e) => return Err(BenchError::Failed(e.to_string())),
            }
        }
    })();
    let elapsed = t0.elapsed();
    if consumed.is_err() {
        abort.store(true, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
    }
    let mut pushed = 0u64;
    let mut result = consumed.as_ref().map(drop).map_err(clone_err);
    for p in producers {
        let r = join(p, "producer");
        if let Ok(n) = r {
            pushed += n;
        }
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result = first_error(result, r.map(drop));
    }
    let summary = seq_handle
        .join()
        .map_err(|_| BenchError::Failed("sequencer panicked".into()))?;
    drop(guard);
    result?;
    let (count, _) = consumed?;
    let summary = summary.map_err(|e| BenchError::Failed(format!("sequencer: {e}")))?;
    if count != pushed || summary.merged != pushed {
        return Err(BenchError::Failed(format!(
            "pushed {pushed} events, sequencer merged {}, consumer read {count}",
            summary.merged
        )));
    }
    Ok(ThroughputRow::new(name, count, elapsed))
}

/// How a throughput producer waits for room: it spins and yields briefly, then sleeps in
/// steps of at most 50 µs. Sleeping producers leave the (few) cores to the sequencer and the
/// consumer — on a 2-core machine the five threads of a run cannot all spin — and 50 µs is
/// far less than a ring of 1 MiB or more takes to drain, so the sequencer is not starved.
fn producer_backoff() -> Backoff {
    Backoff::new(64, 8, Duration::from_micros(50))
}

/// A copy of an error for reporting (I/O errors keep their kind and message).
fn clone_err(e: &BenchError) -> BenchError {
    match e {
        BenchError::Setup(s) => BenchError::Setup(s.clone()),
        BenchError::Timeout(w) => BenchError::Timeout(w),
        BenchError::Aborted => BenchError::Aborted,
        BenchError::Failed(s) => BenchError::Failed(s.clone()),
        BenchError::Io(io) => BenchError::Io(std::io::Error::new(io.kind(), io.to_string())),
    }
}

/// JSON lines of one topic, pre-serialised (as the Aegis feeds push pre-encoded frames).
fn json_pool(src: usize) -> Vec<Vec<u8>> {
    (0..POOL as u64)
        .map(|i| {
            let ts = TS0 + i * 1_000;
            let mut line = match src {
                0 => serde_json::to_vec(&json_trade(i, ts, 0)),
                1 => {
                    let b = sample_book(i);
                    serde_json::to_vec(&JsonBook {
                        symbol: "BTCUSDT".into(),
                        update_id: i,
                        bid_price: b.bid_price.to_string(),
                        bid_qty: b.bid_qty.to_string(),
                        ask_price: b.ask_price.to_string(),
                        ask_qty: b.ask_qty.to_string(),
                        ts,
                    })
                }
                _ => {
                    let k = sample_kline(i);
                    serde_json::to_vec(&JsonKline {
                        symbol: "BTCUSDT".into(),
                        interval: "1m".into(),
                        open_time: k.open_time,
                        close_time: k.close_time,
                        open: k.open.to_string(),
                        high: k.high.to_string(),
                        low: k.low.to_string(),
                        close: k.close.to_string(),
                        volume: k.volume.to_string(),
                        quote_volume: k.quote_volume.to_string(),
                        trades: k.trades,
                        taker_buy_base: k.taker_buy_base.to_string(),
                        taker_buy_quote: k.taker_buy_quote.to_string(),
                        ts,
                    })
                }
            }
            .expect("serialisable");
            line.push(b'\n');
            line
        })
        .collect()
}

/// Parses one JSON line of topic `src` and returns a value read from it (the "touch").
fn parse_line(src: usize, line: &[u8]) -> Result<u64, BenchError> {
    let bad = |e: serde_json::Error| BenchError::Failed(format!("bad JSON line: {e}"));
    Ok(match src {
        0 => serde_json::from_slice::<JsonTrade>(line).map_err(bad)?.ts,
        1 => serde_json::from_slice::<JsonBook>(line).map_err(bad)?.ts,
        _ => serde_json::from_slice::<JsonKline>(line).map_err(bad)?.ts,
    })
}

/// Per-socket read state of the JSON consumer.
struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    open: bool,
}

impl LineReader {
    /// Reads what is available (once) and parses every complete line. Returns lines parsed.
    fn pump(&mut self, src: usize, chunk: &mut [u8], sum: &mut u64) -> Result<u64, BenchError> {
        match self.stream.read(chunk) {
            Ok(0) => {
                self.open = false;
                if !self.buf.is_empty() {
                    return Err(BenchError::Failed("a partial JSON line at EOF".into()));
                }
                return Ok(0);
            }
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e.into()),
        }
        let mut start = 0;
        let mut lines = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            *sum = sum.wrapping_add(parse_line(src, &self.buf[start..start + nl])?);
            start += nl + 1;
            lines += 1;
        }
        self.buf.drain(..start);
        Ok(lines)
    }
}

/// The design Aegis replaces: one Unix socket per topic (trades, book, klines ~ 60/30/10 % of
/// `events`) carrying JSON lines, written as fast as possible by one producer thread per topic
/// (pre-serialised lines through a 64 KiB buffer); one consumer thread `poll`s the three
/// sockets and parses every line.
pub fn socket_json_throughput(events: u64) -> Result<ThroughputRow, BenchError> {
    let mut counts = [0u64; 3];
    for (src, _) in global_stream(events) {
        counts[src] += 1;
    }
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);
    let go = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    let mut producers = Vec::new();
    for (src, &count) in counts.iter().enumerate() {
        let (tx, rx) = UnixStream::pair().map_err(setup_err("socketpair"))?;
        tx.set_write_timeout(Some(STEP_TIMEOUT))?;
        rx.set_nonblocking(true)?;
        readers.push(LineReader {
            stream: rx,
            buf: Vec::with_capacity(1 << 17),
            open: true,
        });
        let pool = json_pool(src);
        let go = go.clone();
        let a = abort.clone();
        producers.push(
            std::thread::Builder::new()
                .name(format!("aegis-bench-json-{src}"))
                .spawn(move || -> Result<(), BenchError> {
                    wait_for_start(&go, &a)?;
                    let mut w = std::io::BufWriter::with_capacity(1 << 16, &tx);
                    let r = (|| {
                        for j in 0..count {
                            if j.is_multiple_of(4096) && a.load(Ordering::Relaxed) {
                                return Err(BenchError::Aborted);
                            }
                            w.write_all(&pool[j as usize % POOL])?;
                        }
                        w.flush()?;
                        Ok(())
                    })();
                    drop(w);
                    let _ = tx.shutdown(std::net::Shutdown::Write);
                    if r.is_err() {
                        a.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .map_err(setup_err("spawn"))?,
        );
    }

    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    let consumed = (|| -> Result<u64, BenchError> {
        let mut chunk = vec![0u8; 1 << 16];
        let (mut lines, mut sum) = (0u64, 0u64);
        let mut idle_since: Option<Instant> = None;
        while readers.iter().any(|r| r.open) {
            let mut fds: Vec<libc::pollfd> = readers
                .iter()
                .map(|r| libc::pollfd {
                    fd: if r.open { r.stream.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the
            // call; negative fds are ignored by poll.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if abort.load(Ordering::Relaxed) {
                return Err(BenchError::Aborted);
            }
            let mut progress = false;
            for (src, (r, fd)) in readers.iter_mut().zip(&fds).enumerate() {
                if r.open && fd.revents != 0 {
                    let before = lines;
                    lines += r.pump(src, &mut chunk, &mut sum)?;
                    progress |= lines != before || !r.open;
                }
            }
            if progress {
                idle_since = None;
            } else if idle_since.get_or_insert_with(Instant::now).elapsed() > STEP_TIMEOUT {
                return Err(BenchError::Timeout("JSON consumer"));
            }
        }
        std::hint::black_box(sum);
        Ok(lines)
    })();
    let elapsed = t0.elapsed();
    if consumed.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    drop(readers);
    let mut result = consumed.as_ref().map(drop).map_err(clone_err);
    for p in producers {
        result = first_error(result, join(p, "JSON producer"));
    }
    result?;
    let lines = consumed?;
    if lines != events {
        return Err(BenchError::Failed(format!(
            "JSON consumer parsed {lines} lines, expected {events}"
        )));
    }
    Ok(ThroughputRow::new(
        "socket + JSON (3 sockets)",
        lines,
        elapsed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sane_latency(r: &LatencyRow, samples: u64) {
        assert_eq!(r.samples, samples, "{r:?}");
        assert!(r.p50_ns > 0, "{r:?}");
        assert!(
            r.p50_ns <= r.p99_ns && r.p99_ns <= r.p999_ns && r.p999_ns <= r.max_ns,
            "{r:?}"
        );
    }

    fn sane_throughput(r: &ThroughputRow, events: u64) {
        assert_eq!(r.events, events, "{r:?}");
        assert!(r.seconds > 0.0 && r.events_per_s > 0.0, "{r:?}");
    }

    #[test]
    fn synthetic_stream_mix_and_order() {
        let s = synthetic_sources(1000);
        let names: Vec<_> = s.iter().map(|s| s.name).collect();
        assert_eq!(names, ["book", "klines", "trades"]);
        assert_eq!(
            s.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [300, 100, 600]
        );
        assert!(s.iter().all(|s| s.ts.windows(2).all(|w| w[0] <= w[1])));
        assert_eq!(s[2].frame(0).1.len(), 64, "a Trade archive is 64 bytes");
        let (n, _) = inproc_merge(&s).unwrap();
        assert_eq!(n, 1000);
    }

    /// One test, so that the pinned spinning runs never compete with each other for a core.
    #[test]
    fn every_measurement_returns_a_sane_row() {
        sane_latency(&pingpong(2_000).unwrap(), 2_000);
        sane_latency(&aegis_latency(2_000, true).unwrap(), 2_000);
        sane_latency(&aegis_latency(100, false).unwrap(), 100);
        let [pp, ae] = latency_interleaved(1_001, 4, true).unwrap();
        sane_latency(&pp, 1_001);
        sane_latency(&ae, 1_001);
        sane_latency(&socket_json_latency(300).unwrap(), 300);
        sane_throughput(&inproc_merge_throughput(20_000).unwrap(), 20_000);
        sane_throughput(&aegis_throughput(20_000, 1 << 12, 1 << 13).unwrap(), 20_000);
        sane_throughput(&socket_json_throughput(20_000).unwrap(), 20_000);
        let rows = serde_json::to_string(&pingpong(100).unwrap()).unwrap();
        assert!(rows.contains("\"p999_ns\""));
    }
}
