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
//! - The raw relay (a row of [`latency_interleaved`]) — the Aegis row's path with none of its
//!   work: the first core stamps the clock and writes a 112-byte frame (a header and a trade)
//!   and a tail word into one ring, a thread on the second core spins on that tail and copies
//!   the frame into a second ring the same way, and the first core spins on it. Two hops of a
//!   two-line frame with a separate tail word, in plain atomics: the floor under the Aegis
//!   row, which the round trip alone does not show (a frame's payload lines come after its
//!   tail, one more transfer per hop).
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
use aegis_shm_client::spmc::{self, BusReader, BusWriter, Policy, ReadError};
use aegis_shm_client::spsc::{self, ClaimError, Producer, PushError, RingReader};
use aegis_shm_client::wait::{Backoff, Deadline, Park, SpinYield, WaitKind, WaitStrategy};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

// The includer provides the sequencer's path (`crate::sequencer` in the library, `aegis::sequencer`
// in the binary), so this tree compiles in either.
use super::sequencer::{self, merge_key, Config, Input, Mode, Sequencer};

mod latency;
mod pingpong;
mod socket_json;
mod synthetic;
mod throughput;

pub use latency::*;
pub use pingpong::*;
pub use socket_json::*;
pub use synthetic::*;
pub use throughput::*;

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

/// One point of a latency distribution: the value at a quantile.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Percentile {
    /// The quantile, in `0.5..1` (0.99 is p99).
    pub quantile: f64,
    /// The latency at that quantile, ns.
    pub ns: u64,
}

/// One latency measurement: a row of the latency table.
#[derive(Serialize, Clone, Debug, PartialEq)]
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
    /// The distribution from p50 to the max ([`percentiles`]), for `bench --plot`; not part
    /// of the JSON rows.
    #[serde(skip)]
    pub percentiles: Vec<Percentile>,
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
    /// A row for `events` moved in `elapsed`.
    pub fn new(name: &str, events: u64, elapsed: Duration) -> ThroughputRow {
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

/// Joins the measuring thread `main`, then its helper thread (stopped through `abort` first
/// if the measuring one failed); the measurement, or the error that caused the failure.
fn join_pair<T>(
    main: (JoinHandle<Result<T, BenchError>>, &str),
    helper: (JoinHandle<Result<(), BenchError>>, &str),
    abort: &AtomicBool,
) -> Result<T, BenchError> {
    let m = join(main.0, main.1);
    if m.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let h = join(helper.0, helper.1);
    match (m, h) {
        (Ok(m), Ok(())) => Ok(m),
        (m, h) => {
            first_error(m.map(drop), h)?;
            unreachable!("one of them failed")
        }
    }
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

/// How often a producer waiting for room in a full ring looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(10);

/// The ring was full: pushes `value` with a blocking push of the producer API (`push`, or
/// `push_frame` with `value = ()`), in slices of [`ABORT_POLL`] so that the abort flag is
/// seen, for at most [`STEP_TIMEOUT`] (then the run is aborted). Only called once a `try_`
/// push found the ring full, so the fast path reads no clock.
#[cold]
fn wait_for_room<T>(
    abort: &AtomicBool,
    what: &'static str,
    mut value: T,
    mut push: impl FnMut(T, Deadline) -> Result<frame::Seq, PushError<T>>,
) -> Result<(), BenchError> {
    let give_up = Instant::now() + STEP_TIMEOUT;
    loop {
        match push(value, Deadline::after(ABORT_POLL)) {
            Ok(_) => return Ok(()),
            Err(PushError::Timeout(v)) => value = v,
            Err(e) => return Err(BenchError::Failed(e.to_string())),
        }
        if abort.load(Ordering::Relaxed) {
            return Err(BenchError::Aborted);
        }
        if Instant::now() >= give_up {
            abort.store(true, Ordering::Relaxed);
            return Err(BenchError::Timeout(what));
        }
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
        percentiles: percentiles(h),
    }
}

/// Steps between two points of [`percentiles`], in nines (0.05: about 20 points per decade
/// of the tail, from p50 to p90, from p90 to p99, ...).
const NINES_STEP: f64 = 0.05;

/// The distribution of `h` from p50 to the max, evenly spaced in "nines" (`-log10(1 - q)`:
/// p90 is 1, p99 is 2, p99.9 is 3), the scale of a percentile plot. The last point is the
/// largest sample, at the quantile of the last of `h.len()` samples (`1 - 1/len`, at least
/// 0.5). Empty for an empty histogram.
fn percentiles(h: &Histogram<u64>) -> Vec<Percentile> {
    let n = h.len();
    if n == 0 {
        return Vec::new();
    }
    let last = (1.0 - 1.0 / n as f64).max(0.5);
    let top = -(1.0 - last).log10();
    let p50 = 2f64.log10();
    let mut points: Vec<Percentile> = (0..)
        .map(|k| p50 + k as f64 * NINES_STEP)
        .take_while(|&nines| nines < top)
        .map(|nines| {
            let quantile = 1.0 - 10f64.powf(-nines);
            Percentile {
                quantile,
                ns: h.value_at_quantile(quantile),
            }
        })
        .collect();
    points.push(Percentile {
        quantile: last,
        ns: h.max(),
    });
    points
}

/// Round trips discarded before recording (caches, branch predictors, page faults).
fn warmup(samples: u64) -> u64 {
    (samples / 10).clamp(16, 20_000)
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
    fn percentiles_run_from_p50_to_the_max() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let p = percentiles(&h);
        assert!((p[0].quantile - 0.5).abs() < 1e-9, "{:?}", p[0]);
        assert!(p[0].ns.abs_diff(5_000) <= 5, "{:?}", p[0]);
        assert!(p
            .windows(2)
            .all(|w| w[0].quantile < w[1].quantile && w[0].ns <= w[1].ns));
        let last = p.last().unwrap();
        assert!((last.quantile - 0.9999).abs() < 1e-12, "{last:?}");
        assert_eq!(last.ns, h.max());
        // p50 to p99.99 in steps of 0.05 nines, and the max.
        assert!((70..=80).contains(&p.len()), "{}", p.len());
        let one = histogram();
        assert!(percentiles(&one).is_empty());
        let mut one = histogram();
        one.record(42).unwrap();
        assert_eq!(
            percentiles(&one),
            [Percentile {
                quantile: 0.5,
                ns: 42
            }]
        );
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
        let [pp, ae, fan, hop, relay] = latency_interleaved(1_001, 4, true).unwrap();
        sane_latency(&relay, 1_001);
        sane_latency(&pp, 1_001);
        sane_latency(&ae, 1_001);
        sane_latency(&fan, 1_001);
        sane_latency(&hop, 1_001);
        sane_latency(&socket_json_latency(300).unwrap(), 300);
        sane_throughput(&inproc_merge_throughput(20_000).unwrap(), 20_000);
        sane_throughput(&aegis_throughput(20_000, 1 << 12, 1 << 13).unwrap(), 20_000);
        sane_throughput(&socket_json_throughput(20_000).unwrap(), 20_000);
        let rows = serde_json::to_string(&pingpong(100).unwrap()).unwrap();
        assert!(rows.contains("\"p999_ns\""));
    }
}
