//! The floor of any cross-core hand-off: a raw cache line bounced between two pinned cores.

use super::*;

/// One cache line, alone on its 128-byte pair of lines (no false sharing with anything).
#[repr(align(128))]
pub(super) struct Line(AtomicU64);

/// Raw cache-line ping-pong between the first two cores: the floor of any cross-core hand-off.
/// One-way latency = round trip / 2.
#[cfg_attr(not(test), allow(dead_code))] // used by the tests, not the verb
pub fn pingpong(samples: u64) -> Result<LatencyRow, BenchError> {
    Ok(latency_row(PINGPONG, &pingpong_histogram(samples)?))
}

pub(super) const PINGPONG: &str = "ping-pong (raw cache line)";

pub(super) fn pingpong_histogram(samples: u64) -> Result<Histogram<u64>, BenchError> {
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
    join_pair(
        (pinger, "ping-pong initiator"),
        (ponger, "ping-pong responder"),
        &abort,
    )
}

pub(super) const RELAY: &str = "raw relay (2 hops through a thread, 112-byte frame, tail words)";

/// Words of one relayed frame: a frame header and a `Trade` (48 + 64 bytes).
const RELAY_WORDS: usize = (FRAME_HEADER_LEN + 64) / 8;
/// Words of one ring of the relay (64 KiB, as the latency rig's): 128-byte slots.
const RELAY_RING_WORDS: usize = 1 << 13;

/// One ring of the relay: slots of 128 bytes, and a tail word on a line pair of its own.
#[repr(align(128))]
struct RelayRing {
    words: [AtomicU64; RELAY_RING_WORDS],
    tail: Line,
}

impl RelayRing {
    fn new() -> Box<RelayRing> {
        Box::new(RelayRing {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            tail: Line(AtomicU64::new(0)),
        })
    }

    fn slot(k: u64) -> usize {
        (k as usize * 16) % RELAY_RING_WORDS
    }

    /// Writes frame `k` (its first word `first`, the others `k`), then publishes it in the
    /// tail word. Release: pairs with the Acquire load in [`RelayRing::wait`].
    fn write(&self, k: u64, first: u64) {
        let s = Self::slot(k);
        self.words[s].store(first, Ordering::Relaxed);
        for w in &self.words[s + 1..s + RELAY_WORDS] {
            w.store(k, Ordering::Relaxed);
        }
        self.tail.0.store(k, Ordering::Release);
    }

    /// Waits for frame `k` and reads it whole; returns its first word.
    fn wait(
        &self,
        k: u64,
        w: &mut Waiter<SpinYield>,
        abort: &AtomicBool,
    ) -> Result<u64, BenchError> {
        while self.tail.0.load(Ordering::Acquire) != k {
            w.idle(abort)?;
        }
        w.progress();
        let s = Self::slot(k);
        let sum: u64 = self.words[s + 1..s + RELAY_WORDS]
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        if sum != k.wrapping_mul(RELAY_WORDS as u64 - 1) {
            return Err(BenchError::Failed(format!("relay: frame {k} torn")));
        }
        Ok(self.words[s].load(Ordering::Relaxed))
    }
}

/// The floor of the Aegis latency rig's own path, with none of its work: one thread (first
/// core) stamps the clock, writes a 112-byte frame and a tail word into one ring, and spins
/// for the frame on a second ring; a thread on the second core spins on the first ring's
/// tail, reads the frame and writes it into the second ring the same way. Plain atomics, no
/// validation, no encoding: what two hops of that size cost on this machine, measured like
/// the Aegis row (`now - stamp`, not halved).
pub(super) fn relay_histogram(samples: u64) -> Result<Histogram<u64>, BenchError> {
    let total = warmup(samples) + samples;
    let skip = warmup(samples);
    let cores = two_cores();
    let (there, back) = (Arc::new(RelayRing::new()), Arc::new(RelayRing::new()));
    let abort = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(vec![abort.clone()]);
    let (t, b, a) = (there.clone(), back.clone(), abort.clone());
    let relay = std::thread::Builder::new()
        .name("aegis-bench-relay".into())
        .spawn(move || -> Result<(), BenchError> {
            pin(cores.map(|c| c.1));
            // A relay that fails or panics stops the origin at once, which then reports
            // `Aborted` and lets the relay's own error through (`first_error`).
            let failed = AbortUnlessDone(&a, false);
            let mut w = Waiter::new(spinning(), "relay");
            for k in 1..=total {
                let first = t.wait(k, &mut w, &a)?;
                b.write(k, first);
            }
            failed.done();
            Ok(())
        })
        .map_err(setup_err("spawn"))?;
    let a = abort.clone();
    let origin = std::thread::Builder::new()
        .name("aegis-bench-origin".into())
        .spawn(move || -> Result<Histogram<u64>, BenchError> {
            pin(cores.map(|c| c.0));
            let mut h = histogram();
            let mut w = Waiter::new(spinning(), "relay origin");
            for k in 1..=total {
                there.write(k, monotonic_ns());
                let stamp = back.wait(k, &mut w, &a)?;
                let now = monotonic_ns();
                if k > skip {
                    h.saturating_record(now.saturating_sub(stamp));
                }
            }
            Ok(h)
        })
        .map_err(setup_err("spawn"))?;
    join_pair((origin, "relay origin"), (relay, "relay"), &abort)
}

/// Sets the abort flag when dropped before [`AbortUnlessDone::done`]: on an early return
/// or a panic of the thread that holds it.
struct AbortUnlessDone<'a>(&'a AtomicBool, bool);

impl AbortUnlessDone<'_> {
    fn done(mut self) {
        self.1 = true;
    }
}

impl Drop for AbortUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}
