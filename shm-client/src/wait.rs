//! Wait strategies: what a producer, the sequencer or a consumer does when it cannot make
//! progress (ring full, nothing to read).
//!
//! - [`BusySpin`]: spins with `spin_loop` hints. The lowest latency, and a whole core burnt;
//!   only for pinned latency runs.
//! - [`SpinYield`]: spins a little, then `sched_yield`s. Still burns its time slice.
//! - [`Backoff`] (the default): spins briefly, yields a few times, then sleeps with an
//!   exponentially growing period capped at `max_sleep`. It works across processes (it needs
//!   no cooperation from the other side) and lets 4+ processes share 2 cores.
//!
//! Every blocking call takes a deadline as well: a wait strategy decides *how* to wait, the
//! deadline decides *how long*.

use std::time::{Duration, Instant};

use crate::sync::{spin_hint, yield_now};

/// How to wait when no progress can be made. `wait` is called once per failed attempt;
/// `reset` after every success.
pub trait WaitStrategy {
    /// Waits a little.
    fn wait(&mut self);
    /// Forgets the waiting history (call after progress).
    fn reset(&mut self);
}

/// Spin without ever giving up the core.
#[derive(Default, Clone, Copy, Debug)]
pub struct BusySpin;

impl WaitStrategy for BusySpin {
    #[inline]
    fn wait(&mut self) {
        spin_hint();
    }
    #[inline]
    fn reset(&mut self) {}
}

/// Spin `spins` times, then yield the CPU on every call.
#[derive(Clone, Copy, Debug)]
pub struct SpinYield {
    spins: u32,
    count: u32,
}

impl SpinYield {
    /// Spin `spins` times before yielding.
    pub fn new(spins: u32) -> SpinYield {
        SpinYield { spins, count: 0 }
    }
}

impl Default for SpinYield {
    fn default() -> SpinYield {
        SpinYield::new(100)
    }
}

impl WaitStrategy for SpinYield {
    #[inline]
    fn wait(&mut self) {
        if self.count < self.spins {
            self.count += 1;
            spin_hint();
        } else {
            yield_now();
        }
    }
    #[inline]
    fn reset(&mut self) {
        self.count = 0;
    }
}

/// Spin, then yield, then sleep with a doubling period up to `max_sleep`. The default.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    spins: u32,
    yields: u32,
    max_sleep: Duration,
    count: u32,
    sleep: Duration,
}

impl Backoff {
    /// A backoff that spins `spins` times, yields `yields` times, then sleeps from 1 µs up to
    /// `max_sleep`.
    pub fn new(spins: u32, yields: u32, max_sleep: Duration) -> Backoff {
        Backoff {
            spins,
            yields,
            max_sleep,
            count: 0,
            sleep: Duration::from_micros(1),
        }
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(64, 16, Duration::from_micros(500))
    }
}

impl WaitStrategy for Backoff {
    fn wait(&mut self) {
        if self.count < self.spins {
            spin_hint();
        } else if self.count < self.spins + self.yields {
            yield_now();
        } else {
            #[cfg(not(loom))]
            std::thread::sleep(self.sleep);
            #[cfg(loom)]
            yield_now();
            self.sleep = (self.sleep * 2).min(self.max_sleep);
        }
        self.count = self.count.saturating_add(1);
    }

    fn reset(&mut self) {
        self.count = 0;
        self.sleep = Duration::from_micros(1);
    }
}

/// Which strategy to build, by name (`spin`, `yield`, `backoff`), for command lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitKind {
    /// [`BusySpin`].
    Spin,
    /// [`SpinYield`].
    Yield,
    /// [`Backoff`].
    Backoff,
}

impl std::str::FromStr for WaitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<WaitKind, String> {
        match s {
            "spin" => Ok(WaitKind::Spin),
            "yield" => Ok(WaitKind::Yield),
            "backoff" => Ok(WaitKind::Backoff),
            _ => Err(format!(
                "unknown wait strategy {s:?} (spin, yield, backoff)"
            )),
        }
    }
}

/// A boxed strategy of the given kind.
pub fn strategy(kind: WaitKind) -> Box<dyn WaitStrategy + Send> {
    match kind {
        WaitKind::Spin => Box::new(BusySpin),
        WaitKind::Yield => Box::new(SpinYield::default()),
        WaitKind::Backoff => Box::new(Backoff::default()),
    }
}

impl<W: WaitStrategy + ?Sized> WaitStrategy for Box<W> {
    fn wait(&mut self) {
        (**self).wait()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

/// A point in time after which a blocking call gives up. `Deadline::never()` exists for
/// callers that have their own outer deadline (a daemon thread with a stop flag, say).
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline(Instant::now().checked_add(timeout))
    }
    /// No deadline.
    pub fn never() -> Deadline {
        Deadline(None)
    }
    /// Whether the deadline has passed.
    #[inline]
    pub fn expired(&self) -> bool {
        self.0.is_some_and(|t| Instant::now() >= t)
    }
}
