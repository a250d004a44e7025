//! Sessions: identity and secrets, segments, components, the READY barrier and the state
//! machine `Created → Running → Draining → Finished | Failed`, plus `Stopped`.
//!
//! A session owns its segments (`/dev/shm/aegis-<sid>-bus`, `-ctl`, `-src-<name>`): they are
//! created `O_EXCL`, mode 0600, and removed when the session is dropped.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::protocol::{self, Ack, AckSource, Register, Reply, Role, SessionSpec};
use aegis_shm_client::segment::{segment_path, ShmRegion, LAYOUT_VERSION};
use aegis_shm_client::spmc::{self, BusMonitor, BusWriter, Policy, MAX_CONSUMERS};
use aegis_shm_client::spsc::{self, RingReader};
use aegis_shm_client::stats::StatsWriter;
use serde_json::json;

use crate::sequencer::{self, Config, Input, Mode, SequencerError, Summary};

/// Default bus size.
pub const DEFAULT_BUS_BYTES: usize = 1 << 22;
/// Default source ring size.
pub const DEFAULT_SOURCE_BYTES: usize = 1 << 20;
/// Default live max lateness.
pub const DEFAULT_MAX_LATENESS_US: u64 = 1_000;

/// Where a session is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Accepting registrations; nothing flows.
    Created,
    /// Data flows.
    Running,
    /// Every producer finished; the sequencer drains.
    Draining,
    /// Done: every event delivered, every consumer finished (or gone).
    Finished,
    /// Failed, with the reason.
    Failed(String),
    /// Stopped by `session stop`.
    Stopped,
}

impl State {
    /// Lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Draining => "draining",
            State::Finished => "finished",
            State::Failed(_) => "failed",
            State::Stopped => "stopped",
        }
    }

    /// Whether nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(self, State::Finished | State::Failed(_) | State::Stopped)
    }
}

/// A component's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompState {
    /// Registered, not READY.
    Registered,
    /// READY, waiting for STARTED (or running).
    Ready,
    /// Sent FINISHED.
    Finished,
    /// Declared dead, with the reason.
    Dead(String),
    /// Reported an ERROR.
    Error(String),
}

impl CompState {
    fn name(&self) -> &'static str {
        match self {
            CompState::Registered => "registered",
            CompState::Ready => "ready",
            CompState::Finished => "finished",
            CompState::Dead(_) => "dead",
            CompState::Error(_) => "error",
        }
    }
    fn gone(&self) -> bool {
        matches!(
            self,
            CompState::Finished | CompState::Dead(_) | CompState::Error(_)
        )
    }
}

/// A registered component.
pub struct Component {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Pid (from SO_PEERCRED).
    pub pid: u32,
    /// State.
    pub state: CompState,
    /// Bus slot (consumers).
    pub slot: Option<usize>,
    /// Sources it writes.
    pub sources: Vec<String>,
    /// Last heartbeat (or any message).
    pub last_seen: Instant,
    /// Whether its connection is still open.
    pub connected: bool,
    /// Write half of its connection, to push STARTED / STOP.
    pub writer: Arc<Mutex<UnixStream>>,
    /// Connection id.
    pub conn: u64,
}

struct SourceRec {
    region: Arc<ShmRegion>,
    kind: String,
    topic: String,
    component: String,
}

struct Running {
    handle: Option<JoinHandle<Result<Summary, SequencerError>>>,
    stop: Arc<AtomicBool>,
    removals: Arc<AtomicU64>,
    ranks: Vec<String>,
}

/// One session.
pub struct Session {
    /// Name.
    pub name: String,
    /// UUID.
    pub id: String,
    /// Short id used in segment names.
    pub sid: String,
    token: [u8; 16],
    /// Segment epoch.
    pub epoch: u64,
    /// Backtest or live.
    pub mode: Mode,
    /// Settings.
    pub spec: SessionSpec,
    /// State.
    pub state: State,
    bus: Arc<ShmRegion>,
    ctl: Arc<ShmRegion>,
    control: Arc<StatsWriter>,
    monitor: BusMonitor,
    /// Components by registration order.
    pub components: Vec<Component>,
    sources: BTreeMap<String, SourceRec>,
    running: Option<Running>,
    summary: Option<Summary>,
    created: SystemTime,
    started: Option<Instant>,
    finished: Option<Instant>,
}

/// Why a request about a session was refused: an ERROR code and message.
pub type Refusal = (&'static str, String);

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_pow2(v: Option<usize>, default: usize, what: &str) -> Result<usize, Refusal> {
    let v = v.unwrap_or(default);
    if !v.is_power_of_two() || !(4096..=1 << 32).contains(&v) {
        return Err((
            "bad_request",
            format!("{what} must be a power of two between 4096 and 2^32, got {v}"),
        ));
    }
    Ok(v)
}

impl Session {
    /// Creates a session and its bus and control segments.
    pub fn create(spec: SessionSpec) -> Result<Session, Refusal> {
        if !protocol::valid_name(&spec.name) {
            return Err((
                "bad_name",
                format!(
                    "session name {:?} must match [A-Za-z0-9._-]{{1,64}}",
                    spec.name
                ),
            ));
        }
        let mode = match spec.mode.as_str() {
            "backtest" => Mode::Backtest,
            "live" => Mode::Live {
                max_lateness: Duration::from_micros(
                    spec.max_lateness_us.unwrap_or(DEFAULT_MAX_LATENESS_US),
                ),
            },
            m => {
                return Err((
                    "bad_request",
                    format!("mode must be live or backtest, got {m:?}"),
                ))
            }
        };
        let bus_bytes = parse_pow2(spec.bus_bytes, DEFAULT_BUS_BYTES, "--bus-bytes")?;
        parse_pow2(spec.source_bytes, DEFAULT_SOURCE_BYTES, "--source-bytes")?;
        if let Some(core) = spec.sequencer_core {
            let n = core_affinity::get_core_ids().map_or(0, |c| c.len());
            if core >= n {
                return Err((
                    "bad_request",
                    format!("--sequencer-core {core}: this machine has {n} cores"),
                ));
            }
        }
        let uuid = random_bytes::<16>();
        let id = format!(
            "{}-{}-4{}-{}-{}",
            hex(&uuid[0..4]),
            hex(&uuid[4..6]),
            &hex(&uuid[6..8])[1..],
            hex(&uuid[8..10]),
            hex(&uuid[10..16])
        );
        let sid = hex(&uuid[0..6]);
        let epoch = u64::from_le_bytes(random_bytes::<8>());
        let policy = match mode {
            Mode::Backtest => Policy::Block,
            Mode::Live { .. } => Policy::Overwrite,
        };
        let io = |e: aegis_shm_client::segment::CreateError| ("internal", e.to_string());
        let bus = Arc::new(
            spmc::create_shm(&segment_path(&sid, "bus"), bus_bytes, epoch, policy).map_err(io)?,
        );
        let (control, ctl) =
            StatsWriter::create_shm(&segment_path(&sid, "ctl"), epoch).map_err(io)?;
        let monitor =
            BusMonitor::open(bus.clone(), Some(epoch)).map_err(|e| ("internal", e.to_string()))?;
        Ok(Session {
            name: spec.name.clone(),
            id,
            sid,
            token: random_bytes::<16>(),
            epoch,
            mode,
            spec,
            state: State::Created,
            bus,
            ctl,
            control: Arc::new(control),
            monitor,
            components: Vec::new(),
            sources: BTreeMap::new(),
            running: None,
            summary: None,
            created: SystemTime::now(),
            started: None,
            finished: None,
        })
    }

    /// The token as 32 hex digits.
    pub fn token_hex(&self) -> String {
        hex(&self.token)
    }

    /// Whether `token` (hex) is this session's, compared in constant time.
    pub fn token_matches(&self, token: &str) -> bool {
        ct_eq(token.as_bytes(), self.token_hex().as_bytes())
    }

    /// The mode's name.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Backtest => "backtest",
            Mode::Live { .. } => "live",
        }
    }

    /// Handles a REGISTER that carried this session's token.
    pub fn register(
        &mut self,
        reg: &Register,
        pid: u32,
        conn: u64,
        writer: Arc<Mutex<UnixStream>>,
    ) -> Result<Ack, Refusal> {
        if !protocol::valid_name(&reg.component_name) {
            return Err((
                "bad_name",
                format!(
                    "component name {:?} must match [A-Za-z0-9._-]{{1,64}}",
                    reg.component_name
                ),
            ));
        }
        let role = reg.role.ok_or((
            "bad_request",
            "REGISTER needs a role: producer, consumer or both".to_string(),
        ))?;
        if self.state.is_final() {
            return Err((
                "session_over",
                format!("session {} is {}", self.name, self.state.name()),
            ));
        }
        if self.state != State::Created {
            let late_consumer = matches!(self.mode, Mode::Live { .. }) && role == Role::Consumer;
            if !late_consumer {
                return Err((
                    "session_started",
                    format!(
                        "session {} already started: a {} session takes no new {}",
                        self.name,
                        self.mode_name(),
                        if matches!(self.mode, Mode::Live { .. }) {
                            "producers"
                        } else {
                            "components"
                        }
                    ),
                ));
            }
        }
        if self
            .components
            .iter()
            .any(|c| c.name == reg.component_name && !c.state.gone())
        {
            return Err((
                "duplicate_name",
                format!("component {} is already registered", reg.component_name),
            ));
        }
        if role.produces() && reg.sources.is_empty() {
            return Err((
                "bad_request",
                "a producer must declare at least one source".into(),
            ));
        }
        if !role.produces() && !reg.sources.is_empty() {
            return Err(("bad_request", "only producers declare sources".into()));
        }
        for (i, s) in reg.sources.iter().enumerate() {
            if !protocol::valid_name(&s.name) {
                return Err((
                    "bad_name",
                    format!("source name {:?} must match [A-Za-z0-9._-]{{1,64}}", s.name),
                ));
            }
            if !protocol::valid_name(&s.topic) {
                return Err((
                    "bad_name",
                    format!("topic {:?} must match [A-Za-z0-9._-]{{1,64}}", s.topic),
                ));
            }
            if !matches!(s.kind.as_str(), "trade" | "book" | "kline") {
                return Err((
                    "bad_request",
                    format!("source {}: kind must be trade, book or kline", s.name),
                ));
            }
            if self.sources.contains_key(&s.name)
                || reg.sources[..i].iter().any(|o| o.name == s.name)
            {
                return Err((
                    "duplicate_name",
                    format!("source {} is already registered", s.name),
                ));
            }
        }
        if self.sources.len() + reg.sources.len() > aegis_shm_client::stats::MAX_SOURCES {
            return Err(("too_many", "a session has at most 64 sources".into()));
        }
        let slot = if role.consumes() {
            let used: Vec<usize> = self
                .components
                .iter()
                .filter(|c| !matches!(c.state, CompState::Dead(_) | CompState::Error(_)))
                .filter_map(|c| c.slot)
                .collect();
            let free = (0..MAX_CONSUMERS).find(|s| {
                !used.contains(s) && !self.monitor.slot_stats().iter().any(|st| st.slot == *s)
            });
            Some(free.ok_or((
                "too_many",
                format!("all {MAX_CONSUMERS} consumer slots are taken"),
            ))?)
        } else {
            None
        };
        let ring_bytes = self.spec.source_bytes.unwrap_or(DEFAULT_SOURCE_BYTES);
        let mut created = Vec::new();
        for s in &reg.sources {
            let path = segment_path(&self.sid, &format!("src-{}", s.name));
            match spsc::create_shm(&path, ring_bytes, self.epoch) {
                Ok(r) => created.push((s, Arc::new(r))),
                Err(e) => return Err(("internal", e.to_string())), // `created` drops: files removed
            }
        }
        let mut ack_sources = Vec::new();
        for (s, region) in created {
            ack_sources.push(AckSource {
                name: s.name.clone(),
                path: region.path().display().to_string(),
                topic_id: 0,
                kind: s.kind.clone(),
            });
            self.sources.insert(
                s.name.clone(),
                SourceRec {
                    region,
                    kind: s.kind.clone(),
                    topic: s.topic.clone(),
                    component: reg.component_name.clone(),
                },
            );
        }
        let topics = self.topic_table();
        for a in &mut ack_sources {
            a.topic_id = topics[&self.sources[&a.name].topic];
        }
        self.components.push(Component {
            name: reg.component_name.clone(),
            role,
            pid,
            state: CompState::Registered,
            slot,
            sources: reg.sources.iter().map(|s| s.name.clone()).collect(),
            last_seen: Instant::now(),
            connected: true,
            writer,
            conn,
        });
        Ok(Ack {
            session_id: self.id.clone(),
            session: self.name.clone(),
            mode: self.mode_name().into(),
            epoch: self.epoch,
            layout_version: LAYOUT_VERSION,
            bus: self.bus.path().display().to_string(),
            control: self.ctl.path().display().to_string(),
            slot,
            sources: ack_sources,
            topics,
            source_names: self.sources.keys().cloned().collect(),
        })
    }

    /// Topic ids: the position of the topic's name among the sorted names, so they never
    /// depend on registration order.
    fn topic_table(&self) -> BTreeMap<String, u32> {
        let mut names: Vec<&String> = self.sources.values().map(|s| &s.topic).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }

    /// Components not READY yet (by name).
    pub fn not_ready(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|c| c.state == CompState::Registered)
            .map(|c| c.name.clone())
            .collect()
    }

    /// Components READY.
    pub fn ready_count(&self) -> usize {
        self.components
            .iter()
            .filter(|c| c.state == CompState::Ready)
            .count()
    }

    /// Whether `--expect N` is met.
    pub fn expect_met(&self) -> bool {
        self.spec.expect.is_some_and(|n| {
            n > 0 && self.ready_count() >= n as usize && self.not_ready().is_empty()
        })
    }

    /// Starts the flow: the sequencer, then STARTED to every component.
    pub fn start(&mut self) -> Result<(), Refusal> {
        if self.state != State::Created {
            return Err((
                "session_started",
                format!("session {} is already {}", self.name, self.state.name()),
            ));
        }
        if self.sources.is_empty() {
            return Err((
                "not_ready",
                format!("session {} has no producer registered", self.name),
            ));
        }
        let topics = self.topic_table();
        let mut inputs = Vec::new();
        for (name, s) in &self.sources {
            let reader = RingReader::open(s.region.clone(), Some(self.epoch))
                .map_err(|e| ("internal", e.to_string()))?;
            inputs.push(Input {
                name: name.clone(),
                topic_id: Some(topics[&s.topic]),
                reader,
            });
        }
        let bus = BusWriter::open(self.bus.clone(), Some(self.epoch))
            .map_err(|e| ("internal", e.to_string()))?;
        let mut config = Config::new(self.mode);
        config.core = self.spec.sequencer_core;
        let seq = sequencer::Sequencer::new(inputs, bus, config, Some(self.control.clone()))
            .map_err(|e| ("internal", e.to_string()))?;
        let removals = seq.removals();
        let ranks = seq.ranks().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = sequencer::spawn(&self.name, seq, stop.clone())
            .map_err(|e| ("internal", e.to_string()))?;
        self.running = Some(Running {
            handle: Some(handle),
            stop,
            removals,
            ranks: ranks.clone(),
        });
        self.state = State::Running;
        self.started = Some(Instant::now());
        let started = Reply::Started {
            topics,
            source_names: ranks,
        };
        for c in &self.components {
            if c.state == CompState::Ready {
                send(&c.writer, &started);
            }
        }
        Ok(())
    }

    /// The STARTED message for a late (live) consumer.
    pub fn started_reply(&self) -> Reply {
        Reply::Started {
            topics: self.topic_table(),
            source_names: self
                .running
                .as_ref()
                .map(|r| r.ranks.clone())
                .unwrap_or_default(),
        }
    }

    /// Stops the sequencer and tells every component to stop.
    pub fn stop(&mut self, state: State, reason: &str) {
        if let Some(r) = &self.running {
            r.stop.store(true, Ordering::Relaxed);
        }
        if !self.state.is_final() {
            self.state = state;
            self.finished = Some(Instant::now());
        }
        let msg = Reply::Stop {
            reason: reason.to_string(),
        };
        for c in &self.components {
            if c.connected && !c.state.gone() {
                send(&c.writer, &msg);
            }
        }
    }

    /// Marks component `i` dead and applies the consequences.
    fn bury(&mut self, i: usize, reason: String) {
        let c = &mut self.components[i];
        c.state = CompState::Dead(reason.clone());
        if let Some(slot) = c.slot {
            // A dead consumer never holds the others back.
            self.monitor.release_slot(slot);
        }
        let producer = c.role.produces();
        let name = c.name.clone();
        let sources = c.sources.clone();
        if !producer || self.state.is_final() {
            return;
        }
        match self.mode {
            Mode::Backtest => {
                let why = format!(
                    "producer {name} died ({reason}): a backtest cannot be exact without it"
                );
                self.stop(State::Failed(why.clone()), &why);
            }
            Mode::Live { .. } => {
                if let Some(r) = &self.running {
                    for (rank, n) in r.ranks.iter().enumerate() {
                        if sources.contains(n) {
                            r.removals.fetch_or(1 << rank, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Liveness and progress: called periodically by the daemon.
    pub fn tick(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_millis(protocol::HEARTBEAT_TIMEOUT_MS);
        for i in 0..self.components.len() {
            let c = &self.components[i];
            if c.state.gone() {
                continue;
            }
            let reason = if !c.connected {
                Some("its connection closed".to_string())
            } else if now.duration_since(c.last_seen) > timeout {
                Some(format!(
                    "no heartbeat for {} ms",
                    now.duration_since(c.last_seen).as_millis()
                ))
            } else if c.pid != 0 && !pid_alive(c.pid) {
                Some(format!("pid {} is gone", c.pid))
            } else {
                None
            };
            if let Some(r) = reason {
                self.bury(i, r);
            }
        }
        if let Some(r) = &mut self.running {
            if r.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let result = r.handle.take().expect("checked").join();
                match result {
                    Ok(Ok(summary)) => self.summary = Some(summary),
                    Ok(Err(SequencerError::Stopped)) => {}
                    Ok(Err(e)) => {
                        let why = e.to_string();
                        self.stop(State::Failed(why.clone()), &why);
                    }
                    Err(_) => self.stop(
                        State::Failed("the sequencer panicked".into()),
                        "internal error",
                    ),
                }
            }
        }
        let producers_done = self
            .components
            .iter()
            .filter(|c| c.role.produces())
            .all(|c| c.state == CompState::Finished);
        if self.state == State::Running && producers_done {
            self.state = State::Draining;
        }
        let consumers_done = self
            .components
            .iter()
            .filter(|c| c.role.consumes())
            .all(|c| c.state.gone());
        if matches!(self.state, State::Running | State::Draining)
            && self.summary.is_some()
            && consumers_done
        {
            self.state = State::Finished;
            self.finished = Some(Instant::now());
        }
    }

    /// Finds component by connection.
    pub fn component_mut(&mut self, conn: u64) -> Option<&mut Component> {
        self.components.iter_mut().find(|c| c.conn == conn)
    }

    /// A component reported an error.
    pub fn component_error(&mut self, conn: u64, message: String) {
        if let Some(i) = self.components.iter().position(|c| c.conn == conn) {
            self.components[i].state = CompState::Error(message.clone());
            let c = &self.components[i];
            if let Some(slot) = c.slot {
                self.monitor.release_slot(slot);
            }
            if c.role.produces() && self.mode == Mode::Backtest && !self.state.is_final() {
                let why = format!("producer {} reported an error: {message}", c.name);
                self.stop(State::Failed(why.clone()), &why);
            }
        }
    }

    /// The `inspect` view (SPEC section 7).
    pub fn inspect(&self) -> serde_json::Value {
        let k = self.control.counters();
        let slots = self.monitor.slot_stats();
        let tail = self.monitor.tail();
        let consumers: Vec<_> = self
            .components
            .iter()
            .filter(|c| c.role.consumes())
            .map(|c| {
                let st = c.slot.and_then(|s| slots.iter().find(|x| x.slot == s));
                json!({
                    "name": c.name, "slot": c.slot, "state": c.state.name(),
                    "cursor": st.map(|s| s.cursor), "lag_bytes": st.map(|s| tail.saturating_sub(s.cursor)),
                    "read": st.map(|s| s.read), "overruns": st.map(|s| s.overruns), "missed": st.map(|s| s.missed),
                })
            })
            .collect();
        let topics = self.topic_table();
        let sources: Vec<_> = self
            .control
            .sources()
            .into_iter()
            .map(|s| {
                let rec = self.sources.get(&s.name);
                json!({
                    "name": s.name, "state": s.state.name(), "events": s.events, "rejected": s.rejected,
                    "watermark": s.watermark, "reason": s.reason,
                    "kind": rec.map(|r| r.kind.clone()), "topic": rec.map(|r| r.topic.clone()),
                    "component": rec.map(|r| r.component.clone()),
                })
            })
            .collect();
        let registered: Vec<_> = if sources.is_empty() {
            self.sources
                .iter()
                .map(|(n, r)| json!({"name": n, "state": "registered", "events": 0, "kind": r.kind, "topic": r.topic, "component": r.component}))
                .collect()
        } else {
            sources
        };
        let elapsed = match (self.started, self.finished) {
            (Some(s), Some(f)) => Some(f.duration_since(s).as_secs_f64()),
            (Some(s), None) => Some(s.elapsed().as_secs_f64()),
            _ => None,
        };
        let merged = k.merged.load(Ordering::Relaxed);
        json!({
            "name": self.name, "id": self.id, "mode": self.mode_name(), "state": self.state.name(),
            "reason": match &self.state { State::Failed(r) => Some(r.clone()), _ => None },
            "created_unix_s": self.created.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "elapsed_s": elapsed,
            "components": self.components.iter().map(|c| json!({
                "name": c.name, "role": c.role, "pid": c.pid, "state": c.state.name(),
                "reason": match &c.state { CompState::Dead(r) | CompState::Error(r) => Some(r.clone()), _ => None },
            })).collect::<Vec<_>>(),
            "sources": registered,
            "consumers": consumers,
            "topics": topics,
            "sequencer": {
                "events_merged": merged,
                "late_events": k.late.load(Ordering::Relaxed),
                "rejected_events": k.rejected.load(Ordering::Relaxed),
                "source_stalls": k.source_stalls.load(Ordering::Relaxed),
                "source_stall_ms": k.source_stall_ns.load(Ordering::Relaxed) / 1_000_000,
                "consumer_stalls": k.consumer_stalls.load(Ordering::Relaxed),
                "consumer_stall_ms": k.consumer_stall_ns.load(Ordering::Relaxed) / 1_000_000,
                "bus_fill_bytes": k.bus_fill.load(Ordering::Relaxed),
                "events_per_s": elapsed.filter(|e| *e > 0.0).map(|e| (merged as f64 / e) as u64),
            },
            "segments": {
                "bus": self.bus.path(), "control": self.ctl.path(),
                "sources": self.sources.values().map(|s| s.region.path()).collect::<Vec<_>>(),
            },
        })
    }

    /// One line for `session list`.
    pub fn list_entry(&self) -> serde_json::Value {
        json!({
            "name": self.name, "id": self.id, "sid": self.sid, "mode": self.mode_name(), "state": self.state.name(),
            "components": self.components.len(), "sources": self.sources.len(),
            "events_merged": self.control.counters().merged.load(Ordering::Relaxed),
        })
    }

    /// Stops and joins the sequencer (before the session's segments go away).
    pub fn shutdown(&mut self) {
        if let Some(r) = &mut self.running {
            r.stop.store(true, Ordering::Relaxed);
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sends a message to a component, bounded by the stream's write timeout. A stuck client
/// loses the message; it never blocks the daemon.
pub fn send(w: &Mutex<UnixStream>, msg: &Reply) {
    if let Ok(mut s) = w.lock() {
        use std::io::Write;
        let _ = s.write_all(&protocol::encode(msg));
    }
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}
