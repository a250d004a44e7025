//! The common consumer loop in one `for`: [`Component::events`] yields every event of the
//! session as a native copy, ends at END-OF-STREAM, and turns a stop, an eviction, a lost
//! daemon or a silent bus into an error item instead of a hang.
//!
//! ```no_run
//! use aegis_shm_client::client::Component;
//! use aegis_shm_client::protocol::Role;
//! use std::time::Duration;
//!
//! let c = Component::from_env("vwap", Role::Consumer, vec![])?;
//! let events = c.events(Duration::from_secs(30))?;
//! c.ready(Duration::from_secs(60))?;
//! for ev in events {
//!     let ev = ev?;
//!     println!("{} {} {}", ev.ts, ev.event.kind().name(), ev.event.symbol());
//! }
//! c.finished()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The copy costs a few nanoseconds per event (events are small and fixed-size). A consumer
//! that wants the archives in place, zero-copy, reads [`BusReader::next`] itself.
//!
//! **No self-delivery** (SPEC section 13): a component that also produces (role `both`) does
//! not get the events of its own sources back, whatever their kind, unless it asks for them
//! with [`Events::receive_own_events`]. Other consumers see every event. The filter is one
//! bit test per event against [`Component::own_source_ids`], resolved at the first event; a
//! reader of [`BusReader::next`] applies that set itself.

use std::time::{Duration, Instant};

use crate::client::{ClientError, Component};
use crate::event::{AnyEvent, DecodeError};
use crate::frame::{flags, Kind, Seq};
use crate::spmc::{BusReader, ReadError};
use crate::wait::{Deadline, Park, WaitStrategy};

/// How often an idle [`Events`] looks at the control connection (stop, eviction, daemon gone).
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// One event, copied out of the bus, with its place in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Bus sequence number (the stream's order; consecutive unless events were missed).
    pub seq: Seq,
    /// Event time, ns since the Unix epoch.
    pub ts: u64,
    /// Source rank: an index into `Started::source_names`.
    pub source: u16,
    /// Topic id: see `Started::topics`.
    pub topic: u32,
    /// Older than an event already delivered (live only).
    pub late: bool,
    /// The event.
    pub event: AnyEvent,
}

/// Why [`Events`] could not deliver the next event.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The daemon stopped the session (or refused us), with its reason. Final.
    #[error("the daemon stopped the session: {0}")]
    Stopped(String),
    /// `aegis-shmctl session evict` evicted this consumer. Final.
    #[error("evicted: {0}")]
    Evicted(String),
    /// The control connection closed: the daemon is gone. Final.
    #[error("the daemon's connection closed")]
    Disconnected,
    /// Nothing arrived for the idle timeout. Final.
    #[error("nothing arrived for {0:?}")]
    Idle(Duration),
    /// The stream ended with END-OF-STREAM flagged ABORT: the session failed. Final.
    #[error("the session ended aborted (it failed; `aegis-shmctl session inspect` says why)")]
    Aborted,
    /// Live: this consumer fell a whole bus behind and missed `missed` events; the iteration
    /// goes on at the head. Not final.
    #[error("{missed} events missed (lapped; resumed at the head)")]
    Overrun {
        /// Events missed.
        missed: u64,
    },
    /// A frame's payload failed validation. Final.
    #[error("bus frame {seq}: {error}")]
    Decode {
        /// Its bus sequence number.
        seq: Seq,
        /// Why.
        error: DecodeError,
    },
    /// The bus could not be read (corrupt, or the slot was released). Final.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// The events of a session, in bus order: see the module docs. Ends (`None`) after
/// END-OF-STREAM or after a final error.
pub struct Events<'a> {
    comp: &'a Component,
    bus: BusReader,
    wait: Park,
    idle: Duration,
    idle_since: Option<Instant>,
    checked: Option<Instant>,
    done: bool,
    /// Deliver the events of the component's own sources too.
    receive_own: bool,
    /// The component's own source ids (bit set), once resolved at the first event.
    own: Option<u64>,
}

impl Component {
    /// Attaches to the bus (as [`Component::consumer`]) and returns the session's events.
    /// Call it before [`Component::ready`], so that nothing is published before the reader
    /// is attached. `idle`: how long the bus may stay silent before the iteration fails with
    /// [`ConsumeError::Idle`].
    pub fn events(&self, idle: Duration) -> Result<Events<'_>, ClientError> {
        Ok(Events {
            comp: self,
            bus: self.consumer()?,
            wait: Park::default(),
            idle,
            idle_since: None,
            checked: None,
            done: false,
            receive_own: false,
            own: None,
        })
    }
}

impl Events<'_> {
    /// The reader underneath (its slot, its delivered count).
    pub fn reader(&self) -> &BusReader {
        &self.bus
    }

    /// Whether to deliver the events of this component's own sources too (default `false`:
    /// no self-delivery). Only a component that produces has any.
    pub fn receive_own_events(mut self, yes: bool) -> Self {
        self.receive_own = yes;
        self
    }

    /// Between two empty polls: the control connection every [`CHECK_EVERY`], and the idle
    /// timeout.
    fn check(&mut self) -> Result<(), ConsumeError> {
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        if self
            .checked
            .is_none_or(|c| now.duration_since(c) >= CHECK_EVERY)
        {
            self.checked = Some(now);
            if let Some(m) = self.comp.evicted() {
                return Err(ConsumeError::Evicted(m));
            }
            if let Some(r) = self.comp.stop_requested() {
                return Err(ConsumeError::Stopped(r));
            }
            if self.comp.disconnected() {
                return Err(ConsumeError::Disconnected);
            }
            if now.duration_since(since) > self.idle {
                return Err(ConsumeError::Idle(self.idle));
            }
        }
        Ok(())
    }

    /// [`Events::check`], then one wait: until the bus moves (or the slot is released), at
    /// most until the next check.
    fn idle_wait(&mut self) -> Result<(), ConsumeError> {
        self.check()?;
        let next_check = self.checked.unwrap_or_else(Instant::now) + CHECK_EVERY;
        self.bus.idle(&mut self.wait, Deadline::at(next_check));
        Ok(())
    }

    /// The next event if one is waiting, without waiting: `Ok(None)` when the bus has nothing
    /// new now, or when the stream is over ([`Events::ended`]). For a component with work
    /// of its own between events (ending its own source once its inputs have ended, say);
    /// [`Events::wait`] sleeps until the bus moves. Errors are those of the iteration, the
    /// idle timeout included; after a final one, `ended` is true.
    pub fn try_next(&mut self) -> Result<Option<Delivered>, ConsumeError> {
        if self.done {
            return Ok(None);
        }
        self.next_event(false).transpose()
    }

    /// Whether the stream is over: END-OF-STREAM was read, or a final error was returned.
    pub fn ended(&self) -> bool {
        self.done
    }

    /// Sleeps until the bus moves (or the slot is released), at most until `deadline`; after
    /// an empty [`Events::try_next`]. Spins briefly first, then parks on the bus's doorbell.
    pub fn wait(&mut self, deadline: Deadline) {
        self.bus.idle(&mut self.wait, deadline);
    }

    /// The next event; on an empty bus waits (`block`) or returns `None` after the checks.
    fn next_event(&mut self, block: bool) -> Option<Result<Delivered, ConsumeError>> {
        loop {
            match self.bus.try_next() {
                Ok(Some(f)) => {
                    self.idle_since = None;
                    self.wait.reset();
                    let h = f.header;
                    if f.is_eof() {
                        self.done = true;
                        return h.has(flags::ABORT).then_some(Err(ConsumeError::Aborted));
                    }
                    if f.kind() == Kind::Control {
                        continue;
                    }
                    match skip_own(self.comp, &mut self.own, self.receive_own, h.source_id) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                    return Some(match f.event() {
                        Ok(ev) => Ok(Delivered {
                            seq: h.bus_seq,
                            ts: h.ts,
                            source: h.source_id,
                            topic: h.topic_id,
                            late: h.has(flags::LATE),
                            event: ev.to_owned(),
                        }),
                        Err(error) => {
                            self.done = true;
                            Err(ConsumeError::Decode {
                                seq: h.bus_seq,
                                error,
                            })
                        }
                    });
                }
                Ok(None) => {
                    let checked = if block {
                        self.idle_wait()
                    } else {
                        self.check()
                    };
                    if let Err(e) = checked {
                        self.done = true;
                        return Some(Err(e));
                    }
                    if !block {
                        return None;
                    }
                }
                Err(ReadError::Overrun { missed }) => {
                    return Some(Err(ConsumeError::Overrun { missed }));
                }
                Err(e @ ReadError::Detached(_)) => {
                    // The daemon released our slot: an eviction, whether its ERROR or the
                    // bus told us first.
                    self.done = true;
                    let why = self.comp.evicted().unwrap_or_else(|| e.to_string());
                    return Some(Err(ConsumeError::Evicted(why)));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            }
        }
    }
}

/// Whether the frame of source `id` is the component's own and must be skipped (`own`: its
/// source ids, resolved on first use).
#[inline]
fn skip_own(
    comp: &Component,
    own: &mut Option<u64>,
    receive_own: bool,
    id: u16,
) -> Result<bool, ConsumeError> {
    if receive_own {
        return Ok(false);
    }
    let mask = match *own {
        Some(mask) => mask,
        None => {
            // A frame on the bus means the session started: STARTED is at hand.
            let mask = comp.own_source_ids().map_err(|e| {
                ConsumeError::Stopped(format!("cannot tell this component's sources: {e}"))
            })?;
            *own.insert(mask)
        }
    };
    Ok(id < 64 && mask & (1 << id) != 0)
}

impl Iterator for Events<'_> {
    type Item = Result<Delivered, ConsumeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_event(true)
    }
}
