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
