//! Wait strategies: what a producer, the sequencer or a consumer does when it cannot make
//! progress (ring full, nothing to read).
//!
//! - [`BusySpin`]: spins with `spin_loop` hints. The lowest latency, and a whole core burnt;
//!   only for pinned latency runs.
//! - [`SpinYield`]: spins a little, then `sched_yield`s. Still burns its time slice.
//! - [`Backoff`]: spins briefly, yields a few times, then sleeps with an exponentially
//!   growing period capped at `max_sleep`. It needs no cooperation from the other side, and
//!   its wake-up is late by up to `max_sleep` (500 µs by default) after a quiet spell.
//! - [`Park`] (the default for consumers and the sequencer): spins briefly, yields a few
//!   times, then sleeps on the ring's or the bus's [`Doorbell`](crate::doorbell::Doorbell)
//!   (a futex in shared memory) until the writer publishes: no CPU while the feed is idle, and
//!   woken within microseconds when it is not. Where no doorbell is at hand (a producer
//!   waiting for room), it behaves as [`Backoff`].
//!
//! Every blocking call takes a deadline as well: a wait strategy decides *how* to wait, the
//! deadline decides *how long*.

use std::time::{Duration, Instant};

use crate::doorbell::Bell;
use crate::sync::{spin_hint, yield_now};

/// How to wait when no progress can be made. `wait` is called once per failed attempt;
/// `reset` after every success.
pub trait WaitStrategy {
    /// Waits a little.
    fn wait(&mut self);
    /// Forgets the waiting history (call after progress).
    fn reset(&mut self);
    /// Waits a little when the caller could sleep on `bell` until the writer publishes (a
    /// consumer waiting on the bus, the sequencer on its sources). Only [`Park`] sleeps on
    /// it; the others [`wait`](WaitStrategy::wait). A sleep never outlasts `deadline`.
    fn wait_on(&mut self, bell: &dyn Bell, deadline: Deadline) {
        let _ = (bell, deadline);
        self.wait();
    }
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

/// Spin, then yield, then sleep on the doorbell of what is waited for until the writer rings
/// it (or `max_park` passes: the caller then looks at its deadlines and parks again). The
/// default of consumers and of the sequencer. Without a doorbell ([`WaitStrategy::wait`]: a
/// producer waiting for room) it is a [`Backoff`].
#[derive(Clone, Copy, Debug)]
pub struct Park {
    spins: u32,
    yields: u32,
    max_park: Duration,
    count: u32,
    fallback: Backoff,
}

impl Park {
    /// Spin `spins` times, yield `yields` times, then park for at most `max_park` at a time.
    pub fn new(spins: u32, yields: u32, max_park: Duration) -> Park {
        Park {
            spins,
            yields,
            max_park,
            count: 0,
            fallback: Backoff::default(),
        }
    }
}

impl Default for Park {
    /// 256 spins and 4 yields (a few microseconds: a burst's next event usually comes
    /// sooner), then parks of up to 100 ms.
    fn default() -> Park {
        Park::new(256, 4, Duration::from_millis(100))
    }
}

impl WaitStrategy for Park {
    fn wait(&mut self) {
        self.fallback.wait();
    }

    fn reset(&mut self) {
        self.count = 0;
        self.fallback.reset();
    }

    fn wait_on(&mut self, bell: &dyn Bell, deadline: Deadline) {
        if self.count < self.spins {
            spin_hint();
        } else if self.count < self.spins + self.yields {
            yield_now();
        } else {
            let t = deadline
                .remaining()
                .map_or(self.max_park, |r| r.min(self.max_park));
            if !t.is_zero() {
                bell.park(t);
            }
        }
        self.count = self.count.saturating_add(1);
    }
}

/// Which strategy to build, by name (`spin`, `yield`, `backoff`, `park`), for command lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitKind {
    /// [`BusySpin`].
    Spin,
    /// [`SpinYield`].
    Yield,
    /// [`Backoff`].
    Backoff,
    /// [`Park`].
    Park,
}

impl WaitKind {
    /// Every kind, in the order of the names.
    pub const ALL: [WaitKind; 4] = [
        WaitKind::Spin,
        WaitKind::Yield,
        WaitKind::Backoff,
        WaitKind::Park,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            WaitKind::Spin => "spin",
            WaitKind::Yield => "yield",
            WaitKind::Backoff => "backoff",
            WaitKind::Park => "park",
        }
    }
}

impl std::fmt::Display for WaitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WaitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<WaitKind, String> {
        WaitKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown wait strategy {s:?} (spin, yield, backoff, park)"))
    }
}

/// A boxed strategy of the given kind.
pub fn strategy(kind: WaitKind) -> Box<dyn WaitStrategy + Send> {
    match kind {
        WaitKind::Spin => Box::new(BusySpin),
        WaitKind::Yield => Box::new(SpinYield::default()),
        WaitKind::Backoff => Box::new(Backoff::default()),
        WaitKind::Park => Box::new(Park::default()),
    }
}

impl<W: WaitStrategy + ?Sized> WaitStrategy for Box<W> {
    fn wait(&mut self) {
        (**self).wait()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn wait_on(&mut self, bell: &dyn Bell, deadline: Deadline) {
        (**self).wait_on(bell, deadline)
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
    /// At `t`.
    pub fn at(t: Instant) -> Deadline {
        Deadline(Some(t))
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
    /// Time left (zero once passed); `None` for no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.0.map(|t| t.saturating_duration_since(Instant::now()))
    }
}
