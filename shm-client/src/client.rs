//! The component side of the control protocol: connect, register, map, READY, wait for
//! STARTED, heartbeat in the background, FINISHED.
//!
//! While it runs, a component learns that it must stop from [`Component::stop_requested`]
//! (the session's STOP, or an ERROR the daemon sent, such as `evicted`),
//! [`Component::evicted`] (`aegis-shmctl session evict`) and [`Component::disconnected`] (the
//! daemon is gone). A long-running component looks at them whenever it is idle.
//!
//! ```no_run
//! use aegis_shm_client::client::Component;
//! use aegis_shm_client::protocol::{Register, Role};
//! use aegis_shm_client::wait::{Deadline, Park};
//! use std::time::Duration;
//!
//! // A consumer: AEGIS_SOCKET and AEGIS_SESSION_TOKEN come from `aegis-shmctl session run`.
//! let c = Component::from_env("my-strategy", Role::Consumer, vec![])?;
//! let mut bus = c.consumer()?;
//! c.ready(Duration::from_secs(60))?;
//! // Spins briefly, then sleeps on the bus's doorbell until the sequencer publishes.
//! let mut wait = Park::default();
//! loop {
//!     let f = bus.next(&mut wait, Deadline::after(Duration::from_secs(30)))?;
//!     if f.is_eof() { break; }
//!     let _event = f.event()?;
//! }
//! c.finished()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::custom::CustomPublisher;
use crate::protocol::{
    self, Ack, ErrorCode, GroupRole, Lease, Register, Reply, Request, Role, SourceDecl, SourceKind,
};
pub use crate::reconcile::{ReconcileStatus, SymbolHandler};
use crate::reconcile::{Subs, Trigger};
use crate::request::{Calls, Handler, RequestError, Served, Server};
use crate::segment::{OpenError, ShmRegion};
use crate::spmc::{AttachError, BusReader};
use crate::spsc::Producer;
use crate::stats::StatsView;

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error("no daemon at {0} — start one with `aegis-shmctl serve`")]
    NoDaemon(PathBuf),
    /// `AEGIS_SESSION_TOKEN` is not set.
    #[error("AEGIS_SESSION_TOKEN is not set: start this component with `aegis-shmctl session run`, or export the token printed by `session create`")]
    NoToken,
    /// The daemon refused.
    #[error("daemon refused ({code}): {message}")]
    Refused {
        /// Error code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
    /// The daemon said something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The deadline passed.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The session was stopped.
    #[error("session stopped: {0}")]
    Stopped(String),
    /// `aegis-shmctl session evict` evicted this component (a consumer's bus slot is gone).
    #[error("evicted: {0}")]
    Evicted(String),
    /// This group member was fenced: a newer epoch holds the group's lease, and the daemon
    /// refuses its frames and requests (`not_active`).
    #[error("not active: {0}")]
    NotActive(String),
    /// The component registered into no group (a standby call on a plain component).
    #[error("this component registered into no group")]
    NoGroup,
    /// A segment could not be mapped.
    #[error("cannot map {path}: {source}")]
    Map {
        /// Segment path.
        path: String,
        /// Why.
        source: OpenError,
    },
    /// The bus could not be attached.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// No such source in the ACK.
    #[error("source {0} was not registered by this component")]
    UnknownSource(String),
    /// I/O.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
}

/// What STARTED carried.
#[derive(Clone, Debug, Default)]
pub struct Started {
    /// Topic table (name → id).
    pub topics: std::collections::BTreeMap<String, u32>,
    /// Source names by rank.
    pub source_names: Vec<String>,
}

#[derive(Default)]
struct Status {
    started: Option<Started>,
    stopped: Option<String>,
    /// The message of the daemon's `ERROR evicted` (`stopped` is set too).
    evicted: Option<String>,
    /// The group lease as last heard of (ACK, then PROMOTED or `not_active`).
    lease: Option<Lease>,
    /// The `resume_after` of the last PROMOTED.
    promoted_resume_after: Option<u64>,
    /// The reason of RELEASED (a standby with nothing left to take over).
    released: Option<String>,
    /// The message of the daemon's `ERROR not_active` (`stopped` is set too).
    fenced: Option<String>,
    /// The answer to the last DISCOVER: its data, or the refusal.
    #[allow(clippy::type_complexity)]
    discovered: Option<Result<serde_json::Value, (ErrorCode, String)>>,
    finished_ack: bool,
    closed: bool,
}

/// Lock order: a thread that holds both takes the subscription lock (`Subs`) first and the
/// status lock second; nothing takes `Subs` while it holds `status`.
struct Shared {
    status: Mutex<Status>,
    changed: Condvar,
    quit: AtomicBool,
}

/// A registered component. Dropping it closes the connection (the daemon then treats the
/// component as gone).
pub struct Component {
    writer: Arc<Mutex<UnixStream>>,
    /// Another handle on the socket, for `Drop` to shut it down without the writer lock: the
    /// heartbeat, handler and reconciliation threads hold that lock while they write, and a
    /// write to a daemon that stopped reading (SIGSTOPped, its socket buffer full) blocks
    /// for [`IO_TIMEOUT`] each time. A shutdown wakes such a write at once (`EPIPE`).
    closer: UnixStream,
    shared: Arc<Shared>,
    /// The desired set and its reconciliation (`crate::reconcile`).
    subs: Arc<Subs>,
    /// Requests this component sent and waits for (`crate::request`).
    calls: Arc<Calls>,
    /// Request handlers and their queue, run by the handler thread.
    server: Arc<Server>,
    ack: Ack,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How a standby's wait ended ([`Component::wait_promoted`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standby {
    /// It holds the lease now.
    Promoted {
        /// The new epoch.
        epoch: u64,
        /// A producer: the source seq of the last event merged; resume after it.
        resume_after: Option<u64>,
    },
    /// The active member finished the group's source: nothing is left to take over.
    Released(String),
}

/// Deadline for each socket read and write, and for the ACKs of REGISTER and FINISHED.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout of the background reader, so that it notices `quit` promptly.
const READER_POLL: Duration = Duration::from_millis(200);
/// Interval between heartbeats.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(protocol::HEARTBEAT_INTERVAL_MS);

impl Component {
    /// Registers with the daemon found through `$AEGIS_SOCKET` (or the default socket) using
    /// `$AEGIS_SESSION_TOKEN`.
    pub fn from_env(
        name: &str,
        role: Role,
        sources: Vec<SourceDecl>,
    ) -> Result<Component, ClientError> {
        let token = std::env::var("AEGIS_SESSION_TOKEN").map_err(|_| ClientError::NoToken)?;
        Component::connect(
            None,
            Register {
                component_name: name.to_string(),
                session_token: token,
                role: Some(role),
                sources,
                pid: Some(std::process::id()),
                ..Register::default()
            },
        )
    }

    /// Connects to the daemon at `socket` (see [`protocol::socket_path`]) and registers.
    /// Fails with the daemon's ERROR, or after a 5 s deadline.
    ///
    /// A component started by `aegis-shmctl session run` says which of its commands it is
    /// ([`protocol::Launch::from_env`]) unless `reg.launch` is set already.
    pub fn connect(socket: Option<&Path>, mut reg: Register) -> Result<Component, ClientError> {
        if reg.launch.is_none() {
            reg.launch = protocol::Launch::from_env();
        }
        let path = protocol::socket_path(socket);
        let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon(path.clone())
            }
            _ => ClientError::Io(e),
        })?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(&protocol::encode(&Request::Register(reg)))?;
        let mut reader = BufReader::new(stream);
        let ack = match read_reply(&mut reader)? {
            Reply::Ack { ack: Some(ack), .. } => *ack,
            Reply::Error { code, message } => return Err(ClientError::Refused { code, message }),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected ACK, got {other:?}"
                )))
            }
        };
        reader.get_ref().set_read_timeout(Some(READER_POLL))?;
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                lease: ack.group.clone(),
                ..Status::default()
            }),
            changed: Condvar::new(),
            quit: AtomicBool::new(false),
        });
        let closer = writer.try_clone()?;
        let writer = Arc::new(Mutex::new(writer));
        // The desired set of the ACK is the first thing held: it is applied before the
        // component reads or writes anything (`consumer`, `ready`, `on_symbols`).
        let subs = Arc::new(Subs::new(ack.desired.clone(), ack.topics.clone()));
        let calls = Arc::new(Calls::default());
        let server = Arc::new(Server::default());
        let mut threads = Vec::new();
        {
            let (shared, subs) = (shared.clone(), subs.clone());
            let (calls, server) = (calls.clone(), server.clone());
            threads.push(std::thread::spawn(move || {
                reader_loop(reader, &shared, &subs, &calls, &server)
            }));
        }
        {
            // Request handlers run here: never on the reader thread, never on the data path.
            let (server, writer) = (server.clone(), writer.clone());
            threads.push(std::thread::spawn(move || {
                server.run(|answer| {
                    let mut line = protocol::encode(&Request::Answer(answer.clone()));
                    if line.len() > crate::request::MAX_MESSAGE {
                        line = protocol::encode(&Request::Answer(crate::request::Answer::error(
                            answer.id,
                            ErrorCode::HandlerError,
                            format!(
                                "the answer takes {} bytes as JSON, over the {} byte limit",
                                line.len(),
                                crate::request::MAX_MESSAGE
                            ),
                        )));
                    }
                    let mut g = writer.lock().unwrap_or_else(|e| e.into_inner());
                    write_line(&mut g, &line).is_ok()
                })
            }));
        }
        {
            let (shared, subs, writer) = (shared.clone(), subs.clone(), writer.clone());
            let period = Duration::from_secs(ack.reconcile_s.max(1));
            threads.push(std::thread::spawn(move || {
                reconcile_loop(&writer, &shared, &subs, period)
            }));
        }
        {
            let shared = shared.clone();
            let writer = writer.clone();
            threads.push(std::thread::spawn(move || heartbeat_loop(&writer, &shared)));
        }
        Ok(Component {
            writer,
            closer,
            shared,
            subs,
            calls,
            server,
            ack,
            threads,
        })
    }

    /// Installs the producer's symbol filter (a producer that registered with
    /// `accepts_symbols`): it is applied the desired set at once, then on every push and
    /// whenever the periodic reconciliation finds it differs (counted as drift).
    pub fn on_symbols(&self, handler: Arc<dyn SymbolHandler>) {
        self.subs.set_handler(handler);
        self.reconcile(Trigger::Start);
    }

    /// The desired set held now, and the reconciliation's figures.
    pub fn subscriptions(&self) -> ReconcileStatus {
        self.subs.status()
    }

    /// Runs one reconciliation (the application's thread) and reports it to the daemon.
    fn reconcile(&self, trigger: Trigger) {
        if let Some(report) = self.subs.reconcile(trigger) {
            let _ = self.send(&Request::Reconciled(report));
        }
    }

    /// The daemon's ACK: segment paths, slot, topic ids.
    pub fn ack(&self) -> &Ack {
        &self.ack
    }

    /// Opens the producer end of `source` (declared at REGISTER). Returns the producer and
    /// the topic id to stamp on its frames.
    pub fn producer(&self, source: &str) -> Result<(Producer, u32), ClientError> {
        let s = self
            .ack
            .sources
            .iter()
            .find(|s| s.name == source)
            .ok_or_else(|| ClientError::UnknownSource(source.to_string()))?;
        let map = |e| ClientError::Map {
            path: s.path.clone(),
            source: e,
        };
        let region = Arc::new(ShmRegion::open(Path::new(&s.path)).map_err(map)?);
        let mut p = Producer::open(region, Some(self.ack.epoch), 0).map_err(map)?;
        if let Some(last) = s.resume_after {
            // A restart: number on from the last event the session merged (the caller skips
            // the events up to it; anything resent is dropped as a duplicate anyway).
            p.set_next_seq(last + 1);
        }
        Ok((p, s.topic_id))
    }

    /// Opens the producer end of the custom source `source` (declared at REGISTER with
    /// [`SourceDecl::custom`]): a publisher of its type's events, stamped with its topic.
    /// Fails as [`Component::producer`] does, or with `UnknownSource` if `source` is not a
    /// custom source of this component.
    pub fn custom_publisher(&self, source: &str) -> Result<CustomPublisher, ClientError> {
        let unknown = || ClientError::UnknownSource(source.to_string());
        let s = self
            .ack
            .sources
            .iter()
            .find(|s| s.name == source && s.kind == SourceKind::Custom)
            .ok_or_else(unknown)?;
        // The ACK's topic table holds our own topics, with the ids of the ACK's sources.
        let type_name = self
            .ack
            .topics
            .iter()
            .find(|(_, &id)| id == s.topic_id)
            .and_then(|(name, _)| crate::event::custom_topic_type(name).ok())
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "the ACK names no custom.<type> topic with id {} for source {source}",
                    s.topic_id
                ))
            })?;
        let (producer, topic_id) = self.producer(source)?;
        Ok(CustomPublisher::new(producer, topic_id, type_name))
    }

    /// The source ids (ranks) of this component's own sources, as a bit set: bit `i` is
    /// source id `i`. Ranks are fixed when the session starts, so this waits (5 s at most)
    /// for STARTED; a component without sources gets 0 at once. Ids beyond 63 cannot occur
    /// (a session has at most [`crate::stats::MAX_SOURCES`] sources).
    pub fn own_source_ids(&self) -> Result<u64, ClientError> {
        if self.ack.sources.is_empty() {
            return Ok(0);
        }
        let started = self.wait_for(IO_TIMEOUT, "STARTED", |s| s.started.clone())?;
        Ok(started
            .source_names
            .iter()
            .enumerate()
            .filter(|(id, name)| *id < 64 && self.ack.sources.iter().any(|s| &s.name == *name))
            .fold(0u64, |mask, (id, _)| mask | 1 << id))
    }

    /// Whether the daemon reads `source` straight from the journal this producer declared
    /// for it (a backtest): then there is no ring to open and nothing to push.
    pub fn is_journal_backed(&self, source: &str) -> bool {
        self.ack
            .sources
            .iter()
            .any(|s| s.name == source && s.journal)
    }

    /// A read-only view of the session's counters (ctl segment): per-source events, state
    /// and failure reason, the sequencer's counters. A journal-backed source's producer
    /// follows its progress here.
    pub fn stats(&self) -> Result<StatsView, ClientError> {
        let map = |e| ClientError::Map {
            path: self.ack.control.clone(),
            source: e,
        };
        let region = Arc::new(ShmRegion::open(Path::new(&self.ack.control)).map_err(map)?);
        StatsView::open(region, Some(self.ack.epoch)).map_err(map)
    }

    /// Attaches to the bus in the slot the daemon assigned.
    pub fn consumer(&self) -> Result<BusReader, ClientError> {
        let map = |e| ClientError::Map {
            path: self.ack.bus.clone(),
            source: e,
        };
        let region = Arc::new(ShmRegion::open(Path::new(&self.ack.bus)).map_err(map)?);
        let bus = BusReader::attach(region, Some(self.ack.epoch), self.ack.slot)?;
        // The slot's topic mask is this consumer's actual set: the desired one goes in
        // before the first read (again at STARTED, with the final topic table).
        self.subs.set_mask(bus.topic_handle().map_err(map)?);
        self.reconcile(Trigger::Start);
        Ok(bus)
    }

    fn send(&self, req: &Request) -> Result<(), ClientError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_line(&mut w, &protocol::encode(req))?;
        Ok(())
    }

    /// Sends READY and waits for STARTED (the READY barrier), at most `timeout`.
    pub fn ready(&self, timeout: Duration) -> Result<Started, ClientError> {
        self.send(&Request::Ready)?;
        let started = self.wait_for(timeout, "STARTED", |s| s.started.clone())?;
        // The topic table is final now: the consumer's mask is set from it before the
        // caller's first read.
        self.subs.set_table(started.topics.clone());
        self.reconcile(Trigger::Start);
        Ok(started)
    }

    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &'static str,
        f: impl Fn(&Status) -> Option<T>,
    ) -> Result<T, ClientError> {
        let end = Instant::now() + timeout;
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            if let Some(r) = &st.evicted {
                return Err(ClientError::Evicted(r.clone()));
            }
            if let Some(r) = &st.fenced {
                return Err(ClientError::NotActive(r.clone()));
            }
            if let Some(r) = &st.stopped {
                return Err(ClientError::Stopped(r.clone()));
            }
            if st.closed {
                return Err(ClientError::Protocol(format!(
                    "daemon closed the connection while we waited for {what}"
                )));
            }
            let now = Instant::now();
            if now >= end {
                return Err(ClientError::Timeout(timeout, what));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the daemon asked us to stop, if it did: its STOP, or any ERROR it sent after the
    /// registration (an eviction included, as `evicted: ...`).
    pub fn stop_requested(&self) -> Option<String> {
        self.status().stopped.clone()
    }

    /// The daemon's message if `aegis-shmctl session evict` evicted this component. A
    /// consumer must stop reading: its bus slot was released.
    pub fn evicted(&self) -> Option<String> {
        self.status().evicted.clone()
    }

    /// The group lease as last heard of: the ACK's, then updated by PROMOTED and by
    /// `not_active` (role `fenced`). `None` outside a group.
    pub fn lease(&self) -> Option<Lease> {
        self.status().lease.clone()
    }

    /// The daemon's message if this group member was fenced (`not_active`): a newer epoch
    /// holds the lease; it must stop publishing and acting.
    pub fn fenced(&self) -> Option<String> {
        self.status().fenced.clone()
    }

    /// A standby waits until it is promoted (PROMOTED) or released (RELEASED: the active
    /// member finished the source), at most `timeout`. Returns at once if it is active
    /// already. Fails if the session stops, the member is fenced, or the daemon goes away.
    pub fn wait_promoted(&self, timeout: Duration) -> Result<Standby, ClientError> {
        if self.status().lease.is_none() {
            return Err(ClientError::NoGroup);
        }
        self.wait_for(timeout, "PROMOTED", |s| {
            if let Some(r) = &s.released {
                return Some(Standby::Released(r.clone()));
            }
            let l = s.lease.as_ref()?;
            (l.role == GroupRole::Active).then_some(Standby::Promoted {
                epoch: l.epoch,
                resume_after: s.promoted_resume_after,
            })
        })
    }

    /// Asks the daemon who is in `group` (or in the group of `component`, exactly one of
    /// the two) and which member is active. Waits 5 s at most for the answer.
    pub fn discover(
        &self,
        group: Option<&str>,
        component: Option<&str>,
    ) -> Result<protocol::Discovered, ClientError> {
        self.status().discovered = None;
        self.send(&Request::Discover {
            session: None,
            group: group.map(str::to_string),
            component: component.map(str::to_string),
        })?;
        let v = self.wait_for(IO_TIMEOUT, "the answer to DISCOVER", |s| {
            s.discovered.clone()
        })?;
        v.map_err(|(code, message)| ClientError::Refused { code, message })
            .and_then(|v| {
                serde_json::from_value(v)
                    .map_err(|e| ClientError::Protocol(format!("bad DISCOVER answer: {e}")))
            })
    }

    /// Whether the daemon's connection closed (the daemon is gone, or it dropped us).
    pub fn disconnected(&self) -> bool {
        self.status().closed
    }

    /// Sends a request of type `request_type` to the component named `target` (or, if
    /// `target` names a group, to its active member) and waits for its answer, at most
    /// `timeout` (1 ms to 600 s). `payload` is any JSON value.
    ///
    /// Returns the target's answer, or a [`RequestError`]: `NoTarget` (no live component or
    /// group of that name), `NotActive` (a group with no active member), `SelfRequest`,
    /// `HandlerError` (the target's handler failed, panicked or does not exist), `Busy` (the
    /// target's queue is full), `Refused` (`bad_request`: the request takes more than
    /// [`crate::request::MAX_MESSAGE`] bytes as JSON; `bad_name`: a bad type), `Timeout` at
    /// the deadline (the target is slow, paused or stuck; the daemon forgets the request),
    /// `Disconnected`. It never waits much past the deadline (see
    /// [`crate::request::REPLY_GRACE`]). Any thread may call it, several at once; at most
    /// [`crate::request::MAX_IN_FLIGHT`] requests of one component are in flight, and a
    /// further one waits for room within its deadline. Cost: one line each way over the
    /// control socket, routed by the daemon (see the README for the measured round trip).
    pub fn request(
        &self,
        target: &str,
        request_type: &str,
        payload: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, RequestError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if !(1..=crate::request::MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(RequestError::Refused {
                code: ErrorCode::BadRequest,
                message: format!(
                    "a request's timeout must be 1 to {} ms, got {timeout:?}",
                    crate::request::MAX_TIMEOUT_MS
                ),
            });
        }
        let deadline = Instant::now() + timeout;
        let ticket = self.calls.begin(deadline)?;
        let call = crate::request::Call {
            id: ticket.id,
            session: None,
            target: target.to_string(),
            request_type: request_type.to_string(),
            payload,
            // Rounded up: the daemon's deadline is never before the caller's.
            timeout_ms: u64::try_from(
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000),
            )
            .unwrap_or(u64::MAX)
            .max(1),
        };
        let line = protocol::encode(&Request::Call(call));
        if line.len() > crate::request::MAX_MESSAGE {
            self.calls.end(ticket.id);
            return Err(RequestError::Refused {
                code: ErrorCode::BadRequest,
                message: format!(
                    "the request takes {} bytes as JSON, over the {} byte limit",
                    line.len(),
                    crate::request::MAX_MESSAGE
                ),
            });
        }
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_line(&mut w, &line)
        };
        if sent.is_err() {
            self.calls.end(ticket.id);
            return Err(RequestError::Disconnected);
        }
        let wait =
            (deadline + crate::request::REPLY_GRACE).saturating_duration_since(Instant::now());
        let outcome = ticket.rx.recv_timeout(wait);
        self.calls.end(ticket.id);
        match outcome {
            Ok(answer) => answer.into_result(),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(RequestError::Timeout(format!(
                "no answer from {target} within {} ms",
                timeout.as_millis()
            ))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(RequestError::Disconnected),
        }
    }

    /// Answers requests of type `request_type` with `handler` (replacing an earlier one).
    ///
    /// Handlers run on this component's handler thread, one request at a time in arrival
    /// order, never on the thread that reads the bus: a slow handler delays other requests to
    /// this component, never its market data. A handler returns the answer, or an error
    /// message that the caller gets as `handler_error` (a panic is caught and reported so).
    /// A request whose deadline passed while it waited in the queue is not run. A request of
    /// a type with no handler is answered `handler_error`.
    pub fn serve(
        &self,
        request_type: &str,
        handler: impl Fn(&Served) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    ) {
        let handler: Arc<Handler> = Arc::new(handler);
        self.server.set(request_type, handler);
    }

    /// Tells the daemon we are done, waits (5 s at most) for its ACK, and disconnects.
    pub fn finished(self) -> Result<(), ClientError> {
        self.send(&Request::Finished)?;
        self.wait_for(IO_TIMEOUT, "the ACK of FINISHED", |s| {
            s.finished_ack.then_some(())
        })
    }

    /// Reports a failure to the daemon and disconnects.
    pub fn error(self, code: &str, message: &str) -> Result<(), ClientError> {
        self.send(&Request::Error {
            code: code.to_string(),
            message: message.to_string(),
        })
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Relaxed);
        self.subs.wake_all();
        self.server.quit();
        // Not under the writer lock: a thread blocked in a write holds it (see `closer`).
        let _ = self.closer.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            // A handler that held the last reference drops the component on the handler
            // thread itself: that thread ends when the handler returns, never joined by itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Writes one line on the control socket; the caller holds the writer lock. A write that
/// times out before any of the line went out loses that line only. A line cut part-way (the
/// daemon read nothing for two write timeouts, e.g. it was SIGSTOPped) cannot be taken back:
/// the next line, from whichever thread, would be glued to the half line and the daemon would
/// lose both. The connection is shut down there instead, and the component sees itself
/// disconnected (a daemon that silent has timed its heartbeats out anyway).
fn write_line(w: &mut UnixStream, line: &[u8]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < line.len() {
        match w.write(&line[sent..]) {
            Ok(n @ 1..) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            result => {
                if sent > 0 {
                    let _ = w.shutdown(std::net::Shutdown::Both);
                }
                return Err(result
                    .err()
                    .unwrap_or_else(|| std::io::ErrorKind::WriteZero.into()));
            }
        }
    }
    Ok(())
}

fn read_reply(r: &mut BufReader<UnixStream>) -> Result<Reply, ClientError> {
    let mut buf = Vec::new();
    match protocol::read_line(r, &mut buf) {
        Ok(Some(())) => serde_json::from_slice(&buf)
            .map_err(|e| ClientError::Protocol(format!("bad reply: {e}"))),
        Ok(None) => Err(ClientError::Protocol("daemon closed the connection".into())),
        Err(protocol::LineError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(ClientError::Timeout(IO_TIMEOUT, "the daemon's reply"))
        }
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}

fn reader_loop(
    mut r: BufReader<UnixStream>,
    shared: &Shared,
    subs: &Subs,
    calls: &Calls,
    server: &Server,
) {
    let mut buf = Vec::new();
    while !shared.quit.load(Ordering::Relaxed) {
        let reply = match protocol::read_line(&mut r, &mut buf) {
            Ok(Some(())) => match serde_json::from_slice::<Reply>(&buf) {
                Ok(r) => r,
                Err(_) => continue,
            },
            Err(protocol::LineError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            _ => break,
        };
        if let Reply::Subscriptions(push) = reply {
            // Not under the status lock: the reconciliation thread takes the two in the
            // other order.
            subs.received(push);
            continue;
        }
        match reply {
            Reply::Request(req) => {
                server.received(req);
                continue;
            }
            Reply::Answer(answer) => {
                calls.complete(answer);
                continue;
            }
            Reply::Started { ref topics, .. } => {
                // Before the status lock, never under it: the reconciliation thread holds the
                // subscription lock while it looks at the status (its `stop`), so taking them
                // in the other order here deadlocked a consumer whose STARTED came while that
                // thread was waiting (found by
                // `live_consumer_lapped_over_the_end_sees_eos_with_exact_missed_count`, 1 run
                // in ~25).
                subs.set_table(topics.clone());
            }
            _ => {}
        }
        let mut st = shared.status.lock().unwrap_or_else(|e| e.into_inner());
        match reply {
            Reply::Started {
                topics,
                source_names,
            } => {
                st.started = Some(Started {
                    topics,
                    source_names,
                })
            }
            Reply::Stop { reason } => st.stopped = Some(reason),
            Reply::Error { code, message }
                if matches!(
                    code,
                    ErrorCode::NoGroup | ErrorCode::NoComponent | ErrorCode::BadRequest
                ) =>
            {
                // The refusal of a DISCOVER: an answer, not a reason to stop.
                st.discovered = Some(Err((code, message)));
            }
            Reply::Error { code, message } => {
                if code == ErrorCode::Evicted {
                    st.evicted = Some(message.clone());
                }
                if code == ErrorCode::NotActive {
                    st.fenced = Some(message.clone());
                    if let Some(l) = &mut st.lease {
                        l.role = GroupRole::Fenced;
                    }
                }
                st.stopped = Some(format!("{code}: {message}"));
            }
            Reply::Promoted {
                epoch,
                resume_after,
                ..
            } => {
                if let Some(l) = &mut st.lease {
                    l.role = GroupRole::Active;
                    l.epoch = epoch;
                }
                st.promoted_resume_after = resume_after;
            }
            Reply::Released { reason, .. } => st.released = Some(reason),
            Reply::Ack { data: Some(d), .. } => st.discovered = Some(Ok(d)),
            Reply::Ack { .. } => st.finished_ack = true,
            Reply::Wait { .. }
            | Reply::Heartbeat
            | Reply::Subscriptions(_)
            | Reply::Request(_)
            | Reply::Answer(_) => continue,
        }
        shared.changed.notify_all();
    }
    calls.close();
    shared
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .closed = true;
    shared.changed.notify_all();
}

/// The periodic reconciliation (and the pushes), until the component is dropped, stopped or
/// disconnected: every `period`, asks the daemon for the desired set (level-triggered: the
/// last push is not trusted), waits for the answer (5 s at most), reconciles and reports.
fn reconcile_loop(w: &Mutex<UnixStream>, shared: &Shared, subs: &Subs, period: Duration) {
    let stop = || {
        shared.quit.load(Ordering::Relaxed) || {
            let st = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            st.closed || st.stopped.is_some()
        }
    };
    let send = |req: &Request| {
        let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
        write_line(&mut g, &protocol::encode(req)).is_ok()
    };
    let mut next = Instant::now() + period;
    while !stop() {
        if subs.wait_push(next, stop) {
            if let Some(r) = subs.reconcile(Trigger::Push) {
                send(&Request::Reconciled(r));
            }
            continue;
        }
        if Instant::now() < next || stop() {
            continue;
        }
        next = Instant::now() + period;
        if !subs.has_targets() {
            continue;
        }
        let seen = subs.answers();
        let answered = send(&Request::Subscriptions) && subs.wait_answer(seen, IO_TIMEOUT, stop);
        if let Some(mut r) = subs.reconcile(Trigger::Periodic) {
            if !answered {
                r.errors.push(format!(
                    "the daemon did not send the desired set within {IO_TIMEOUT:?}: reconciled with the one held"
                ));
            }
            send(&Request::Reconciled(r));
        }
    }
}

fn heartbeat_loop(w: &Mutex<UnixStream>, shared: &Shared) {
    let line = protocol::encode(&Request::Heartbeat);
    while !shared.quit.load(Ordering::Relaxed) {
        std::thread::sleep(HEARTBEAT_INTERVAL);
        let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
        if write_line(&mut g, &line).is_err() {
            break;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::subscription::{Cause, Desired, Push};
    use std::collections::BTreeMap;
    use std::io::Read;

    /// A daemon for one component: it accepts, ACKs the REGISTER (reconciliation every
    /// `reconcile_s` seconds), then hands the connection to `then`. The socket file is
    /// removed when the returned guard drops.
    struct FakeDaemon {
        path: PathBuf,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl FakeDaemon {
        fn start(
            name: &str,
            reconcile_s: u64,
            then: impl FnOnce(UnixStream) + Send + 'static,
        ) -> FakeDaemon {
            let path = std::env::temp_dir().join(format!(
                "aegis-client-test-{}-{name}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
            let thread = std::thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                let mut line = Vec::new();
                let mut r = BufReader::new(stream.try_clone().expect("clone"));
                std::io::BufRead::read_until(&mut r, b'\n', &mut line).expect("REGISTER");
                let ack = protocol::Ack {
                    session_id: "s".into(),
                    session: "s".into(),
                    mode: protocol::Mode::Live,
                    epoch: 1,
                    layout_version: 0,
                    bus: String::new(),
                    control: String::new(),
                    slot: None,
                    sources: vec![],
                    topics: BTreeMap::new(),
                    source_names: vec![],
                    desired: Desired::default(),
                    reconcile_s,
                    recording: None,
                    group: None,
                };
                let mut w = stream.try_clone().expect("clone");
                w.write_all(&protocol::encode(&Reply::Ack {
                    ack: Some(Box::new(ack)),
                    data: None,
                }))
                .expect("ACK");
                then(stream);
            });
            FakeDaemon {
                path,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> Component {
            Component::connect(
                Some(&self.path),
                Register {
                    component_name: "c".into(),
                    session_token: "t".into(),
                    ..Register::default()
                },
            )
            .expect("connect")
        }
    }

    impl Drop for FakeDaemon {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Regression: `Drop` took the writer lock to shut the socket down. The handler thread
    /// holds that lock while it writes an answer; with a daemon that stopped reading
    /// (SIGSTOPped) and a full socket buffer the write blocks until its 5 s timeout, and
    /// `drop` waited for it (and then for the heartbeat thread's own timed-out write).
    #[test]
    fn drop_is_prompt_while_a_write_is_blocked_on_a_daemon_that_stopped_reading() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let daemon = FakeDaemon::start("stalled", 3600, move |mut stream| {
            go_rx.recv().expect("go");
            // Answers of ~60 KB each: a few fill the socket buffer, and nothing is read.
            for id in 1..=32 {
                let req = Reply::Request(crate::request::Incoming {
                    id,
                    from: None,
                    request_type: "big".into(),
                    payload: serde_json::Value::Null,
                    timeout_ms: 60_000,
                });
                stream.write_all(&protocol::encode(&req)).expect("REQUEST");
            }
            // Stalled (not reading) until the test is over; the socket stays open.
            let _ = end_rx.recv();
        });
        let c = daemon.connect();
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let answered = answered.clone();
            c.serve("big", move |_| {
                answered.fetch_add(1, Ordering::Relaxed);
                Ok(serde_json::Value::String("x".repeat(60_000)))
            });
        }
        go_tx.send(()).expect("go");
        // The handler thread is blocked in its write once the count stops moving.
        let mut last = 0;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let n = answered.load(Ordering::Relaxed);
            if n == last && n > 0 {
                break;
            }
            last = n;
        }
        assert!(last < 32, "the socket buffer never filled ({last} answers)");
        let t0 = Instant::now();
        drop(c);
        let took = t0.elapsed();
        end_tx.send(()).expect("end");
        drop(daemon);
        assert!(
            took < Duration::from_secs(2),
            "drop took {took:?}: it waited for the blocked write to time out"
        );
    }

    /// Regression: a write that timed out part-way through a line (the daemon read nothing
    /// for two write timeouts) left half a line on the socket, and the next line, from any
    /// thread, was glued to it: the daemon lost both. The connection is shut down at a cut
    /// line now: the daemon reads only whole lines, then the end.
    #[test]
    fn a_line_cut_by_a_write_timeout_is_never_glued_to_the_next() {
        let (read_tx, read_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let daemon = FakeDaemon::start("cut", 3600, move |mut stream| {
            std::thread::sleep(2 * IO_TIMEOUT + Duration::from_secs(1));
            // It reads again, for 3 s (heartbeats go on coming) or until the end.
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let (mut all, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
            read_tx.send(all).expect("send");
        });
        let c = Arc::new(daemon.connect());
        // Requests of ~60 KB fill the socket buffer in the middle of one.
        let sender = {
            let c = c.clone();
            std::thread::spawn(move || {
                let payload = serde_json::Value::String("x".repeat(60_000));
                for _ in 0..8 {
                    let _ = c.request("t", "big", payload.clone(), Duration::from_millis(1));
                }
            })
        };
        let all = read_rx.recv().expect("what the daemon read");
        sender.join().expect("sender");
        let mut lines: Vec<&[u8]> = all.split(|&b| b == b'\n').collect();
        lines.pop(); // After the last newline: nothing, or the cut line's first part.
        for (i, line) in lines.iter().enumerate() {
            assert!(
                protocol::parse_request(line).is_ok(),
                "line {i} of {} ({} bytes) is not a message: a cut line glued to the next",
                lines.len(),
                line.len()
            );
        }
        assert!(c.disconnected(), "the cut line shut the connection down");
        drop(c);
        drop(daemon);
    }

    /// Regression: the reader thread took the subscription lock under the status lock (to
    /// store STARTED's topic table) while the reconciliation thread takes them in the other
    /// order (its `stop` looks at the status inside `Subs::wait_push`). A consumer whose
    /// STARTED arrived at that moment hung in `ready` for ever. Many STARTED lines, each
    /// followed by a push that wakes the reconciliation thread, make the two meet; the final
    /// ACK must get through.
    #[test]
    fn started_and_pushes_never_deadlock_the_reader_and_the_reconciler() {
        let (mut daemon, comp) = UnixStream::pair().expect("socket pair");
        let reader = BufReader::new(comp.try_clone().expect("clone"));
        reader
            .get_ref()
            .set_read_timeout(Some(READER_POLL))
            .expect("timeout");
        let writer = Arc::new(Mutex::new(comp));
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::default()),
            changed: Condvar::new(),
            quit: AtomicBool::new(false),
        });
        let subs = Arc::new(Subs::new(Desired::default(), BTreeMap::new()));
        let (calls, server) = (Arc::new(Calls::default()), Arc::new(Server::default()));
        let threads = [
            {
                let (shared, subs) = (shared.clone(), subs.clone());
                std::thread::spawn(move || reader_loop(reader, &shared, &subs, &calls, &server))
            },
            {
                let (shared, subs, writer) = (shared.clone(), subs.clone(), writer.clone());
                std::thread::spawn(move || {
                    reconcile_loop(&writer, &shared, &subs, Duration::from_secs(1))
                })
            },
        ];
        // Whatever the component writes is drained, so its writes never block.
        let mut drain = daemon.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
        });
        let started = protocol::encode(&Reply::Started {
            topics: BTreeMap::from([("trades.BTCUSDT".to_string(), 1)]),
            source_names: vec!["a".into()],
        });
        // A deadlocked reader stops reading: the writes then time out, and the check below
        // fails.
        daemon
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut sent = true;
        for version in 1..=20_000u64 {
            if daemon.write_all(&started).is_err() {
                sent = false;
                break;
            }
            let push = Reply::Subscriptions(Push {
                desired: Desired {
                    version,
                    ..Desired::default()
                },
                cause: Cause::Changed,
            });
            if daemon.write_all(&protocol::encode(&push)).is_err() {
                sent = false;
                break;
            }
        }
        sent = sent
            && daemon
                .write_all(&protocol::encode(&Reply::Ack {
                    ack: None,
                    data: None,
                }))
                .is_ok();
        // `try_lock`: a deadlocked reader holds the status lock for ever.
        let end = Instant::now() + Duration::from_secs(60);
        let acked = sent
            && loop {
                if shared.status.try_lock().is_ok_and(|st| st.finished_ack) {
                    break true;
                }
                if Instant::now() >= end {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
        assert!(
            acked,
            "the reader thread never got to the last line: deadlocked with the reconciliation thread"
        );
        shared.quit.store(true, Ordering::Relaxed);
        let _ = daemon.shutdown(std::net::Shutdown::Both);
        for t in threads {
            t.join().expect("thread");
        }
    }
}
