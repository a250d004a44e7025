//! Sessions: identity and secrets, segments, components, the READY barrier and the state
//! machine `Created → Running → Draining → Finished | Failed`, plus `Stopped`.
//!
//! A session owns its segments (`/dev/shm/aegis-<sid>-bus`, `-ctl`, `-src-<name>`): they are
//! created `O_EXCL`, mode 0600, and removed when the session is dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use aegis_shm_client::event;
use aegis_shm_client::protocol::{
    self, Ack, AckSource, ComponentEvicted, ComponentInfo, ComponentState, ConsumerInfo, ErrorCode,
    Inspect, Launch, Register, ReplayedSource, Reply, Role, Segments, SequencerStats, SessionInfo,
    SessionSpec, SessionState, SourceInfo, SourceKind, SourceProgress, SourceStatus,
};
use aegis_shm_client::recording::RecordedSource;
use aegis_shm_client::segment::{segment_path, ShmRegion, LAYOUT_VERSION};
use aegis_shm_client::spmc::{self, BusMonitor, BusWriter, Policy, MAX_CONSUMERS};
use aegis_shm_client::spsc::{self, RingReader};
use aegis_shm_client::stats::{StatsWriter, MAX_SOURCES};

use crate::groups::Groups;
use crate::outbox::Outbox;
use crate::recorder::{self, Prepared, RecordError};
pub use crate::refusal::Refusal;
use crate::sequencer::{self, Config, Input, Mode, SequencerError, Summary};
use crate::source::{JournalSource, RecordingSource, SourceReader};
use crate::takeover::Takeovers;

/// Default bus size.
pub const DEFAULT_BUS_BYTES: usize = 1 << 22;
/// Default source ring size.
pub const DEFAULT_SOURCE_BYTES: usize = 1 << 20;
/// Default live max lateness.
pub const DEFAULT_MAX_LATENESS_US: u64 = 1_000;
/// A component silent for this long is declared dead.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(protocol::HEARTBEAT_TIMEOUT_MS);
/// Smallest and largest bus or source ring, in bytes.
const RING_BYTES: std::ops::RangeInclusive<usize> = 4096..=1 << 32;

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
    /// The state as the protocol reports it (the reason of `Failed` goes separately).
    pub fn public(&self) -> SessionState {
        match self {
            State::Created => SessionState::Created,
            State::Running => SessionState::Running,
            State::Draining => SessionState::Draining,
            State::Finished => SessionState::Finished,
            State::Failed(_) => SessionState::Failed,
            State::Stopped => SessionState::Stopped,
        }
    }

    /// Why it failed, if it did.
    pub fn reason(&self) -> Option<String> {
        match self {
            State::Failed(r) => Some(r.clone()),
            _ => None,
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
    /// The state as the protocol reports it.
    pub fn public(&self) -> ComponentState {
        match self {
            CompState::Registered => ComponentState::Registered,
            CompState::Ready => ComponentState::Ready,
            CompState::Finished => ComponentState::Finished,
            CompState::Dead(_) => ComponentState::Dead,
            CompState::Error(_) => ComponentState::Error,
        }
    }

    /// Why it is dead or in error.
    pub fn reason(&self) -> Option<String> {
        match self {
            CompState::Dead(r) | CompState::Error(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Whether it is finished, dead or in error.
    pub fn gone(&self) -> bool {
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
    /// Backtest: silent past [`HEARTBEAT_TIMEOUT`] while its pid is alive (paused). Shown as
    /// `stalled` over `state`, which it keeps: cleared when it is heard from again.
    pub stalled: bool,
    /// Whether its connection is still open.
    pub connected: bool,
    /// Its connection's outbound queue, to push STARTED / STOP without blocking.
    pub outbox: Outbox,
    /// Connection id.
    pub conn: u64,
    /// A producer that filters by a desired symbol set (`subscribe --symbols`).
    pub accepts_symbols: bool,
    /// The group it registered into.
    pub group: Option<String>,
    /// A group member that lost the lease: everything it sends gets `not_active`.
    pub fenced: bool,
    /// Per source in `sources`: the ring of its own it got because the source existed
    /// already (a group's standby, a restart); `None`: the source's own ring.
    pub rings: Vec<Option<Arc<ShmRegion>>>,
    /// The `session run` command that started it (from its REGISTER).
    pub launch: Option<Launch>,
}

impl Component {
    /// Alive and not fenced: may hold a group's lease.
    pub fn holds_on(&self) -> bool {
        !self.state.gone() && !self.fenced
    }

    /// The state `inspect` shows: `stalled` over the state it keeps while paused.
    pub fn public_state(&self) -> ComponentState {
        if self.stalled && !self.state.gone() {
            ComponentState::Stalled
        } else {
            self.state.public()
        }
    }

    /// Why it is dead, in error or stalled.
    pub fn reason(&self) -> Option<String> {
        if self.stalled && !self.state.gone() {
            return Some(format!(
                "no heartbeat for {} ms, pid {} alive (paused?): the backtest waits for it",
                self.last_seen.elapsed().as_millis(),
                self.pid
            ));
        }
        self.state.reason()
    }
}

pub(crate) struct SourceRec {
    pub(crate) backing: Backing,
    pub(crate) kind: SourceKind,
    pub(crate) topic: String,
    pub(crate) component: String,
    /// Times the source changed hands (`groups::switch_source`).
    pub(crate) takeovers: u64,
}

/// Where a source's frames come from.
pub(crate) enum Backing {
    /// A ring in shared memory that the producer writes.
    Ring(Arc<ShmRegion>),
    /// A journal the daemon mapped at registration (backtest); moved into the sequencer at
    /// the start.
    Journal {
        path: std::path::PathBuf,
        source: Option<JournalSource>,
    },
    /// A recording the daemon reads (backtest, `aegis-replay DIR`): the session's only
    /// source, whose recorded source names (by rank) and topic table are the session's.
    Recording {
        path: std::path::PathBuf,
        source: Option<Box<RecordingSource>>,
        names: Vec<String>,
        topics: BTreeMap<String, u32>,
        /// The recorded sources' kinds and topics, by rank (empty in an older recording).
        declared: Vec<RecordedSource>,
    },
}

/// The recorder (`--record`): prepared at creation (its bus slot held from the first frame),
/// running from the start.
struct Recording {
    dir: std::path::PathBuf,
    prepared: Option<Prepared>,
    handle: Option<JoinHandle<Result<recorder::Outcome, RecordError>>>,
    stop: Arc<AtomicBool>,
}

pub(crate) struct Running {
    handle: Option<JoinHandle<Result<Summary, SequencerError>>>,
    stop: Arc<AtomicBool>,
    pub(crate) removals: Arc<AtomicU64>,
    /// Source names by the sequencer's ranks.
    pub(crate) ranks: Vec<String>,
    /// Source names by bus `source_id`: the ranks, or a replayed recording's names.
    bus_names: Vec<String>,
    /// Hand-overs of sources to new rings, the last seq merged per source (`takeover.rs`).
    pub(crate) takeovers: Arc<Takeovers>,
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
    pub(crate) sources: BTreeMap<String, SourceRec>,
    pub(crate) running: Option<Running>,
    /// Groups (hot standby) by name (`groups.rs`).
    pub(crate) groups: Groups,
    /// Live sources whose producer died with nobody to take over, since when: held open for
    /// a restart ([`crate::groups::RESTART_WINDOW`]).
    pub(crate) orphans: BTreeMap<String, Instant>,
    /// Live sources that left the merge for good (their restart window passed).
    pub(crate) closed_sources: std::collections::BTreeSet<String>,
    /// Counter of the member rings (`src-NAME~K`).
    pub(crate) next_ring: u64,
    summary: Option<Summary>,
    recording: Option<Recording>,
    created: SystemTime,
    started: Option<Instant>,
    finished: Option<Instant>,
}

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
    if !v.is_power_of_two() || !RING_BYTES.contains(&v) {
        return Err(Refusal::bad_request(format!(
            "{what} must be a power of two between 4096 and 2^32, got {v}"
        )));
    }
    Ok(v)
}

/// A version-4 UUID in its text form, from 16 random bytes.
fn uuid_text(b: &[u8; 16]) -> String {
    format!(
        "{}-{}-4{}-{}-{}",
        hex(&b[0..4]),
        hex(&b[4..6]),
        &hex(&b[6..8])[1..],
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

/// A custom source publishes on `custom.<type>` with a valid type name, and the `custom.`
/// topics belong to custom sources only: a topic's name tells its kind.
fn check_custom_topic(s: &protocol::SourceDecl) -> Result<(), Refusal> {
    let custom_named = s.topic.starts_with(event::CUSTOM_TOPIC_PREFIX);
    match s.kind {
        SourceKind::Custom => event::custom_topic_type(&s.topic).map(drop).map_err(|e| {
            Refusal::bad_request(format!(
                "custom source {}: its topic must be custom.<type>, got {:?}: {e}",
                s.name, s.topic
            ))
        }),
        k if custom_named => Err(Refusal::bad_request(format!(
            "source {} of kind {} may not publish on {:?}: custom.* topics are for sources of kind custom",
            s.name,
            k.name(),
            s.topic
        ))),
        _ => Ok(()),
    }
}

impl Session {
    /// Creates a session and its bus and control segments.
    pub fn create(spec: SessionSpec) -> Result<Session, Refusal> {
        if !protocol::valid_name(&spec.name) {
            return Err(Refusal::bad_name("session name", &spec.name));
        }
        let mode = match spec.mode {
            protocol::Mode::Backtest => Mode::Backtest,
            protocol::Mode::Live => Mode::Live {
                max_lateness: Duration::from_micros(
                    spec.max_lateness_us.unwrap_or(DEFAULT_MAX_LATENESS_US),
                ),
            },
        };
        if spec.restart_killed.is_some() && mode == Mode::Backtest {
            return Err(Refusal::bad_request(
                "--restart-killed needs a live session: a backtest cannot take a restarted producer and stay exact",
            ));
        }
        let bus_bytes = parse_pow2(spec.bus_bytes, DEFAULT_BUS_BYTES, "--bus-bytes")?;
        parse_pow2(spec.source_bytes, DEFAULT_SOURCE_BYTES, "--source-bytes")?;
        if let Some(r) = spec.reconcile_s {
            if !aegis_shm_client::subscription::RECONCILE_S.contains(&r) {
                return Err(Refusal::bad_request(format!(
                    "--reconcile-s must be between 1 and 3600 seconds, got {r}"
                )));
            }
        }
        if let Some(core) = spec.sequencer_core {
            let n = core_affinity::get_core_ids().map_or(0, |c| c.len());
            if core >= n {
                return Err(Refusal::bad_request(format!(
                    "--sequencer-core {core}: this machine has {n} cores"
                )));
            }
        }
        let uuid = random_bytes::<16>();
        let id = uuid_text(&uuid);
        let sid = hex(&uuid[0..6]);
        let epoch = u64::from_le_bytes(random_bytes::<8>());
        let policy = match mode {
            Mode::Backtest => Policy::Block,
            Mode::Live { .. } => Policy::Overwrite,
        };
        let bus = Arc::new(
            spmc::create_shm(&segment_path(&sid, "bus"), bus_bytes, epoch, policy)
                .map_err(Refusal::internal)?,
        );
        let (control, ctl) = StatsWriter::create_shm(&segment_path(&sid, "ctl"), epoch)
            .map_err(Refusal::internal)?;
        let monitor = BusMonitor::open(bus.clone(), Some(epoch)).map_err(Refusal::internal)?;
        let recording = match &spec.record {
            None => None,
            Some(dir) => {
                // Attached before anything flows: the recorder sees the bus from seq 0.
                let reader = spmc::BusReader::attach(bus.clone(), Some(epoch), None)
                    .map_err(Refusal::internal)?;
                let prepared = recorder::prepare(dir, spec.record_segment_bytes, reader)
                    .map_err(|e| Refusal::bad_request(e.to_string()))?;
                Some(Recording {
                    dir: dir.clone(),
                    prepared: Some(prepared),
                    handle: None,
                    stop: Arc::new(AtomicBool::new(false)),
                })
            }
        };
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
            groups: Groups::new(),
            orphans: BTreeMap::new(),
            closed_sources: Default::default(),
            next_ring: 0,
            summary: None,
            recording,
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

    /// The mode as the protocol names it.
    pub fn protocol_mode(&self) -> protocol::Mode {
        match self.mode {
            Mode::Backtest => protocol::Mode::Backtest,
            Mode::Live { .. } => protocol::Mode::Live,
        }
    }

    /// The answer to `SESSION_CREATE`.
    pub fn created(&self) -> protocol::SessionCreated {
        protocol::SessionCreated {
            name: self.name.clone(),
            id: self.id.clone(),
            mode: self.protocol_mode(),
            token: self.token_hex(),
            state: self.state.public(),
        }
    }

    /// Handles a REGISTER that carried this session's token: checks it, assigns a bus slot
    /// (consumers), creates the source rings (producers) and records the component.
    pub fn register(
        &mut self,
        reg: &Register,
        pid: u32,
        conn: u64,
        outbox: Outbox,
    ) -> Result<Ack, Refusal> {
        let role = self.check_registration(reg)?;
        let join = self.check_group(reg, role)?;
        let taken = self.takeover_sources(reg, join.as_ref())?;
        self.check_sources(reg, role, &taken)?;
        let slot = if role.consumes() {
            Some(self.free_slot()?)
        } else {
            None
        };
        let (mut ack_sources, rings) = self.create_sources(reg, &taken)?;
        let topics = self.topic_table();
        for a in &mut ack_sources {
            // A recording's frames keep their recorded topic ids: none to stamp.
            a.topic_id = topics
                .get(&self.sources[&a.name].topic)
                .copied()
                .unwrap_or(0);
        }
        self.components.push(Component {
            name: reg.component_name.clone(),
            role,
            pid,
            state: CompState::Registered,
            slot,
            sources: reg.sources.iter().map(|s| s.name.clone()).collect(),
            last_seen: Instant::now(),
            stalled: false,
            connected: true,
            outbox,
            conn,
            accepts_symbols: reg.accepts_symbols,
            group: join.as_ref().map(|j| j.name().to_string()),
            fenced: false,
            rings,
            launch: reg.launch,
        });
        let group = self.admit(conn, join, &taken, &mut ack_sources);
        Ok(Ack {
            session_id: self.id.clone(),
            session: self.name.clone(),
            mode: self.protocol_mode(),
            epoch: self.epoch,
            layout_version: LAYOUT_VERSION,
            bus: self.bus.path().display().to_string(),
            control: self.ctl.path().display().to_string(),
            slot,
            sources: ack_sources,
            topics,
            source_names: self.bus_source_names(),
            // The caller (`dispatch::register`) fills in the store's desired set.
            desired: Default::default(),
            reconcile_s: crate::subscriptions::reconcile_s(self),
            recording: self.recording.as_ref().map(|r| r.dir.clone()),
            group,
        })
    }

    /// The component on connection `conn`.
    pub fn component_by_conn(&self, conn: u64) -> Option<&Component> {
        self.components.iter().find(|c| c.conn == conn)
    }

    /// The component's name and role, against the session's state: returns the role.
    fn check_registration(&self, reg: &Register) -> Result<Role, Refusal> {
        if !protocol::valid_name(&reg.component_name) {
            return Err(Refusal::bad_name("component name", &reg.component_name));
        }
        let role = reg.role.ok_or_else(|| {
            Refusal::bad_request("REGISTER needs a role: producer, consumer or both")
        })?;
        if self.state.is_final() {
            return Err(Refusal::new(
                ErrorCode::SessionOver,
                format!("session {} is {}", self.name, self.state.public()),
            ));
        }
        let live = matches!(self.mode, Mode::Live { .. });
        // A live producer may come after the start to take over sources that exist (a
        // group's standby, a restart); `takeover_sources` decides whether it may.
        let takes_over = role == Role::Producer
            && !reg.sources.is_empty()
            && reg
                .sources
                .iter()
                .all(|s| self.sources.contains_key(&s.name));
        if self.state != State::Created && !(live && (role == Role::Consumer || takes_over)) {
            return Err(Refusal::new(
                ErrorCode::SessionStarted,
                format!(
                    "session {} already started: a {} session takes no new {}",
                    self.name,
                    self.protocol_mode(),
                    if live { "producers" } else { "components" }
                ),
            ));
        }
        if self
            .components
            .iter()
            .any(|c| c.name == reg.component_name && !c.state.gone())
        {
            return Err(Refusal::new(
                ErrorCode::DuplicateName,
                format!("component {} is already registered", reg.component_name),
            ));
        }
        Ok(role)
    }

    /// The declared sources: names, topics, uniqueness, count (their kinds are typed).
    fn check_sources(&self, reg: &Register, role: Role, taken: &[String]) -> Result<(), Refusal> {
        if role.produces() && reg.sources.is_empty() {
            return Err(Refusal::bad_request(
                "a producer must declare at least one source",
            ));
        }
        if !role.produces() && !reg.sources.is_empty() {
            return Err(Refusal::bad_request("only producers declare sources"));
        }
        if self.replays_recording() && !reg.sources.is_empty() {
            return Err(Refusal::bad_request(format!(
                "session {} replays a recording as its only source: it takes no other source",
                self.name
            )));
        }
        if reg.sources.iter().any(|s| s.recording.is_some()) {
            if self.mode != Mode::Backtest {
                return Err(Refusal::bad_request(
                    "a recording replays into a backtest session, not a live one",
                ));
            }
            if reg.sources.len() > 1 || !self.sources.is_empty() {
                return Err(Refusal::bad_request(format!(
                    "a recording is replayed as the only source of a session, and session {} {}",
                    self.name,
                    if self.sources.is_empty() {
                        "would get other sources from the same REGISTER"
                    } else {
                        "already has sources"
                    }
                )));
            }
        }
        for (i, s) in reg.sources.iter().enumerate() {
            if !protocol::valid_name(&s.name) {
                return Err(Refusal::bad_name("source name", &s.name));
            }
            if !protocol::valid_name(&s.topic) {
                return Err(Refusal::bad_name("topic", &s.topic));
            }
            check_custom_topic(s)?;
            if (self.sources.contains_key(&s.name) && !taken.contains(&s.name))
                || reg.sources[..i].iter().any(|o| o.name == s.name)
            {
                return Err(Refusal::new(
                    ErrorCode::DuplicateName,
                    format!("source {} is already registered", s.name),
                ));
            }
        }
        if self.sources.len() + reg.sources.len() - taken.len() > MAX_SOURCES {
            return Err(Refusal::new(
                ErrorCode::TooMany,
                format!("a session has at most {MAX_SOURCES} sources"),
            ));
        }
        Ok(())
    }

    /// A bus slot held by no live component and no attached reader.
    fn free_slot(&self) -> Result<usize, Refusal> {
        let used: Vec<usize> = self
            .components
            .iter()
            .filter(|c| !matches!(c.state, CompState::Dead(_) | CompState::Error(_)))
            .filter_map(|c| c.slot)
            .collect();
        let attached = self.monitor.slot_stats();
        (0..MAX_CONSUMERS)
            .find(|s| !used.contains(s) && !attached.iter().any(|st| st.slot == *s))
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::TooMany,
                    format!("all {MAX_CONSUMERS} consumer slots are taken"),
                )
            })
    }

    /// Creates the source rings of `reg` (all or none) and records them. The ACK entries
    /// have topic id 0 until the caller fills them in.
    /// Sources in `taken` exist already: each gets a ring of its own (a member ring), which
    /// the sequencer reads only once the source is handed over to it; returned beside the
    /// ACK entries, by source.
    #[allow(clippy::type_complexity)]
    fn create_sources(
        &mut self,
        reg: &Register,
        taken: &[String],
    ) -> Result<(Vec<AckSource>, Vec<Option<Arc<ShmRegion>>>), Refusal> {
        let ring_bytes = self.spec.source_bytes.unwrap_or(DEFAULT_SOURCE_BYTES);
        let mut member_rings = Vec::new();
        for s in &reg.sources {
            member_rings.push(if taken.contains(&s.name) {
                Some(self.member_ring(&s.name)?)
            } else {
                None
            });
        }
        let mut created = Vec::new();
        for s in reg.sources.iter().filter(|s| !taken.contains(&s.name)) {
            // On failure `created` drops: its ring files are removed, its journals unmapped.
            let handover = s.journal.as_deref().filter(|_| self.mode == Mode::Backtest);
            created.push(match (&s.recording, handover) {
                (Some(r), _) => self.open_recording(r)?,
                (None, Some(journal)) => self.open_journal(journal, s.kind)?,
                (None, None) => {
                    let path = segment_path(&self.sid, &format!("src-{}", s.name));
                    let region = spsc::create_shm(&path, ring_bytes, self.epoch)
                        .map_err(Refusal::internal)?;
                    Backing::Ring(Arc::new(region))
                }
            });
        }
        let mut ack_sources = Vec::new();
        for (s, ring) in reg.sources.iter().zip(&member_rings) {
            if let Some(ring) = ring {
                ack_sources.push(AckSource {
                    name: s.name.clone(),
                    path: ring.path().display().to_string(),
                    topic_id: 0,
                    kind: s.kind,
                    journal: false,
                    resume_after: None,
                });
            }
        }
        let fresh = reg.sources.iter().filter(|s| !taken.contains(&s.name));
        for (s, backing) in fresh.zip(created) {
            ack_sources.push(AckSource {
                name: s.name.clone(),
                path: backing.path().display().to_string(),
                topic_id: 0,
                kind: s.kind,
                // A recording is read by the daemon too: the producer pushes nothing.
                journal: matches!(backing, Backing::Journal { .. } | Backing::Recording { .. }),
                resume_after: None,
            });
            self.sources.insert(
                s.name.clone(),
                SourceRec {
                    backing,
                    kind: s.kind,
                    topic: s.topic.clone(),
                    component: reg.component_name.clone(),
                    takeovers: 0,
                },
            );
        }
        Ok((ack_sources, member_rings))
    }

    /// Maps a journal-backed source's journal (backtest only), checking its header, size and
    /// kind now, so that a bad journal is refused at REGISTER with the reason.
    fn open_journal(&self, journal: &str, kind: SourceKind) -> Result<Backing, Refusal> {
        let path = std::path::PathBuf::from(journal);
        if !path.is_absolute() {
            return Err(Refusal::bad_request(format!(
                "the journal path {journal:?} must be absolute"
            )));
        }
        let source = JournalSource::open(&path, kind.into())
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        Ok(Backing::Journal {
            path,
            source: Some(source),
        })
    }

    /// Opens a recording to replay (backtest only, checked by the caller): its manifest and
    /// index now, so that a bad recording is refused at REGISTER with the reason.
    fn open_recording(&self, r: &protocol::RecordingDecl) -> Result<Backing, Refusal> {
        let path = std::path::PathBuf::from(&r.dir);
        if !path.is_absolute() {
            return Err(Refusal::bad_request(format!(
                "the recording path {:?} must be absolute",
                r.dir
            )));
        }
        let source = RecordingSource::open(&path, r.from_ts, r.to_ts)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let m = source.manifest();
        if m.sources.len() > MAX_SOURCES {
            return Err(Refusal::bad_request(format!(
                "{}: the recording names {} sources, at most {MAX_SOURCES}",
                path.display(),
                m.sources.len()
            )));
        }
        let (names, topics, declared) = (m.sources.clone(), m.topics.clone(), m.declared.clone());
        Ok(Backing::Recording {
            path,
            source: Some(Box::new(source)),
            names,
            topics,
            declared,
        })
    }

    /// The recording this session replays, if it does: its source names, topic table and
    /// source declarations.
    #[allow(clippy::type_complexity)]
    fn recording_source(
        &self,
    ) -> Option<(&Vec<String>, &BTreeMap<String, u32>, &Vec<RecordedSource>)> {
        self.sources.values().find_map(|s| match &s.backing {
            Backing::Recording {
                names,
                topics,
                declared,
                ..
            } => Some((names, topics, declared)),
            _ => None,
        })
    }

    /// The kind and topic of every source by bus `source_id` (see [`Self::bus_source_names`]),
    /// for a recording of this session; empty when a replayed recording lacks them.
    fn bus_declared(&self, bus_names: &[String]) -> Vec<RecordedSource> {
        if let Some((_, _, declared)) = self.recording_source() {
            return declared.clone();
        }
        bus_names
            .iter()
            .map(|n| {
                self.sources.get(n).map(|s| RecordedSource {
                    kind: s.kind,
                    topic: s.topic.clone(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    /// A session replaying a recording: the recorded sources by bus `source_id`, with their
    /// kinds and topics when the recording has them (`replayed_sources` of `inspect`).
    fn replayed_sources(&self) -> Vec<ReplayedSource> {
        let Some((names, _, declared)) = self.recording_source() else {
            return Vec::new();
        };
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ReplayedSource {
                name: n.clone(),
                kind: declared.get(i).map(|d| d.kind),
                topic: declared.get(i).map(|d| d.topic.clone()),
            })
            .collect()
    }

    /// Whether the session replays a recording (`aegis-replay DIR`).
    fn replays_recording(&self) -> bool {
        self.recording_source().is_some()
    }

    /// The source names consumers see, by rank (the `source_id` of bus frames): the
    /// sources' own, or the recorded ones when the session replays a recording.
    fn bus_source_names(&self) -> Vec<String> {
        match self.recording_source() {
            Some((names, _, _)) => names.clone(),
            None => self.sources.keys().cloned().collect(),
        }
    }

    /// Topic ids: the position of the topic's name among the sorted names, so they never
    /// depend on registration order. A session replaying a recording has the recorded
    /// table.
    pub fn topic_table(&self) -> BTreeMap<String, u32> {
        if let Some((_, topics, _)) = self.recording_source() {
            return topics.clone();
        }
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
        self.check_not_started()?;
        if self.sources.is_empty() {
            return Err(Refusal::new(
                ErrorCode::NotReady,
                format!("session {} has no producer registered", self.name),
            ));
        }
        let topics = self.topic_table();
        // The fallible steps first (ring readers, the bus), so that a failure leaves every
        // journal in place for the next `start`; only then are the journals handed over.
        let mut rings = Vec::new();
        for s in self.sources.values() {
            rings.push(match &s.backing {
                Backing::Ring(region) => Some(
                    RingReader::open(region.clone(), Some(self.epoch))
                        .map_err(Refusal::internal)?,
                ),
                Backing::Journal { source: None, .. } | Backing::Recording { source: None, .. } => {
                    return Err(Refusal::internal("the journal was already handed over"))
                }
                Backing::Journal { .. } | Backing::Recording { .. } => None,
            });
        }
        let bus = BusWriter::open(self.bus.clone(), Some(self.epoch)).map_err(Refusal::internal)?;
        let mut inputs = Vec::new();
        for ((name, s), ring) in self.sources.iter_mut().zip(rings) {
            let reader: SourceReader = match (&mut s.backing, ring) {
                (_, Some(ring)) => ring.into(),
                (Backing::Journal { source, .. }, None) => {
                    source.take().expect("checked above").into()
                }
                (Backing::Recording { source, .. }, None) => {
                    source.take().expect("checked above").into()
                }
                (Backing::Ring(_), None) => unreachable!("every ring was opened above"),
            };
            let topic_id = match &s.backing {
                Backing::Recording { .. } => None,
                _ => Some(topics[&s.topic]),
            };
            inputs.push(Input {
                name: name.clone(),
                topic_id,
                reader,
            });
        }
        let mut config = Config::new(self.mode);
        config.core = self.spec.sequencer_core;
        let seq = sequencer::Sequencer::new(inputs, bus, config, Some(self.control.clone()))
            .map_err(Refusal::internal)?;
        let removals = seq.removals();
        let takeovers = seq.takeovers();
        let ranks = seq.ranks().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        // What consumers (and the recorder) name sources by: the sequencer's ranks, or a
        // replayed recording's own.
        let bus_names = match self.recording_source() {
            Some((names, _, _)) => names.clone(),
            None => ranks.clone(),
        };
        let declared = self.bus_declared(&bus_names);
        if let Some(rec) = &mut self.recording {
            let facts = recorder::SessionFacts {
                session: self.name.clone(),
                session_id: self.id.clone(),
                mode: self.spec.mode,
                sources: bus_names.clone(),
                declared,
                topics: topics.clone(),
            };
            let prepared = rec
                .prepared
                .take()
                .ok_or_else(|| Refusal::internal("the recorder was already started"))?;
            let handle = recorder::spawn(prepared, facts, self.control.clone(), rec.stop.clone())
                .map_err(Refusal::internal)?;
            rec.handle = Some(handle);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let handle = sequencer::spawn(&self.name, seq, stop.clone()).map_err(Refusal::internal)?;
        self.running = Some(Running {
            handle: Some(handle),
            stop,
            removals,
            ranks: ranks.clone(),
            bus_names: bus_names.clone(),
            takeovers,
        });
        self.state = State::Running;
        self.started = Some(Instant::now());
        let started = Reply::Started {
            topics,
            source_names: bus_names,
        };
        for c in &self.components {
            if c.state == CompState::Ready {
                c.outbox.send(&started);
            }
        }
        Ok(())
    }

    /// `session_started` unless the session is still `created`.
    pub fn check_not_started(&self) -> Result<(), Refusal> {
        if self.state == State::Created {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::SessionStarted,
            format!("session {} is already {}", self.name, self.state.public()),
        ))
    }

    /// The STARTED message for a late (live) consumer.
    pub fn started_reply(&self) -> Reply {
        Reply::Started {
            topics: self.topic_table(),
            source_names: self
                .running
                .as_ref()
                .map(|r| r.bus_names.clone())
                .unwrap_or_default(),
        }
    }

    /// Stops the sequencer and tells every component to stop.
    pub fn stop(&mut self, state: State, reason: &str) {
        if let Some(r) = &self.running {
            r.stop.store(true, Ordering::Relaxed);
        }
        if let Some(r) = &self.recording {
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
                c.outbox.send(&msg);
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
        if c.group.is_some() {
            // Fenced; the lease (and a producer group's source) goes to a standby.
            self.member_gone(i);
            return;
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
                // Out of the merge, held open for a restart under the same source name.
                for n in &sources {
                    self.orphan(n);
                }
            }
        }
    }

    /// `session evict`: marks the component named `name` dead on purpose, as if it had died,
    /// after telling it (`ERROR evicted` through its outbox). A consumer's bus slot is
    /// released; a producer fails a backtest, or leaves a live merge. A component that
    /// registered again under the name after an earlier one was gone is the one evicted.
    pub fn evict(&mut self, name: &str) -> Result<ComponentEvicted, Refusal> {
        let i = self
            .components
            .iter()
            .rposition(|c| c.name == name)
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NoComponent,
                    format!("session {} has no component named {name:?}", self.name),
                )
            })?;
        let c = &self.components[i];
        if c.state.gone() {
            return Err(Refusal::new(
                ErrorCode::ComponentGone,
                format!(
                    "component {name} of session {} is already {}",
                    self.name,
                    c.state.public()
                ),
            ));
        }
        let role = c.role;
        c.outbox.send(&Reply::error(
            ErrorCode::Evicted,
            format!(
                "evicted from session {} by `aegis-shmctl session evict`",
                self.name
            ),
        ));
        self.bury(i, "evicted by operator (aegis-shmctl session evict)".into());
        self.advance_state();
        Ok(ComponentEvicted {
            name: self.name.clone(),
            component: name.to_string(),
            role,
            state: self.state.public(),
        })
    }

    /// A component sent FINISHED (ignored once it is dead: an evicted component stays so).
    pub fn component_finished(&mut self, conn: u64) {
        if let Some(c) = self.component_mut(conn) {
            if !c.state.gone() {
                c.state = CompState::Finished;
            }
        }
        self.member_finished(conn);
        self.tick();
    }

    /// Liveness and progress: called periodically by the daemon.
    pub fn tick(&mut self) {
        self.check_liveness();
        self.expire_orphans();
        self.reap_sequencer();
        self.reap_recorder();
        self.advance_state();
    }

    /// Buries every component whose connection closed, whose pid is gone, or whose
    /// heartbeats stopped. In a backtest, a silent component whose pid is alive is paused
    /// (SIGSTOP, a debugger: every thread stops, the heartbeat thread too), not dead: it is
    /// marked stalled and the session waits for it, since exactness needs every producer and
    /// back-pressure every consumer. Live sessions never wait: silence is death there.
    fn check_liveness(&mut self) {
        let now = Instant::now();
        let backtest = self.mode == Mode::Backtest;
        let bounds = self.member_bounds();
        for (i, bound) in bounds.into_iter().enumerate() {
            let c = &mut self.components[i];
            if c.state.gone() {
                continue;
            }
            let silent = now.duration_since(c.last_seen);
            c.stalled = false;
            let reason = if !c.connected {
                Some("its connection closed".to_string())
            } else if c.pid != 0 && !pid_alive(c.pid) {
                Some(format!("pid {} is gone", c.pid))
            } else if let Some(bound) = bound {
                // A group member: silent past its policy's bound, it loses the lease (even
                // paused in a backtest: a standby takes over instead of the session waiting).
                (silent > bound).then(|| {
                    format!(
                        "no heartbeat for {} ms (failover bound {} ms)",
                        silent.as_millis(),
                        bound.as_millis()
                    )
                })
            } else if silent <= HEARTBEAT_TIMEOUT {
                None
            } else if backtest && c.pid != 0 {
                c.stalled = true;
                None
            } else {
                Some(format!("no heartbeat for {} ms", silent.as_millis()))
            };
            if let Some(r) = reason {
                self.bury(i, r);
            }
        }
    }

    /// Collects the sequencer's result once its thread ended; a failure fails the session.
    fn reap_sequencer(&mut self) {
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
    }

    /// Collects the recorder's result once its thread ended; a backtest whose recording
    /// failed fails (live sessions go on: the recording is marked incomplete).
    fn reap_recorder(&mut self) {
        let Some(rec) = &mut self.recording else {
            return;
        };
        if !rec.handle.as_ref().is_some_and(|h| h.is_finished()) {
            return;
        }
        let result = rec.handle.take().expect("checked").join();
        let why = match result {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the recorder panicked".to_string(),
        };
        if !self.state.is_final() {
            self.stop(State::Failed(why.clone()), &why);
        }
    }

    /// Whether the recorder (if any) has finished.
    fn recorder_done(&self) -> bool {
        self.recording
            .as_ref()
            .is_none_or(|r| r.handle.is_none() && r.prepared.is_none())
    }

    /// `running → draining` once every producer finished; `→ finished` once the sequencer
    /// is done and every consumer is gone.
    fn advance_state(&mut self) {
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
            && self.recorder_done()
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
        let pos = self
            .components
            .iter()
            .position(|c| c.conn == conn && !c.state.gone());
        if let Some(i) = pos {
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
    pub fn inspect(&self) -> Inspect {
        let elapsed = match (self.started, self.finished) {
            (Some(s), Some(f)) => Some(f.duration_since(s).as_secs_f64()),
            (Some(s), None) => Some(s.elapsed().as_secs_f64()),
            _ => None,
        };
        Inspect {
            name: self.name.clone(),
            id: self.id.clone(),
            mode: self.protocol_mode(),
            state: self.state.public(),
            reason: self.state.reason(),
            created_unix_s: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            elapsed_s: elapsed,
            components: self
                .components
                .iter()
                .map(|c| ComponentInfo {
                    name: c.name.clone(),
                    role: c.role,
                    pid: c.pid,
                    state: c.public_state(),
                    reason: c.reason(),
                    launch: c.launch,
                    restartable: self.restartable(c),
                })
                .collect(),
            sources: self.source_infos(),
            replayed_sources: self.replayed_sources(),
            consumers: self.consumer_infos(),
            topics: self.topic_table(),
            sequencer: self.sequencer_stats(elapsed),
            groups: self.group_infos(),
            segments: Segments {
                bus: self.bus.path().to_path_buf(),
                control: self.ctl.path().to_path_buf(),
                sources: self
                    .sources
                    .values()
                    .filter_map(|s| match &s.backing {
                        Backing::Ring(region) => Some(region.path().to_path_buf()),
                        Backing::Journal { .. } | Backing::Recording { .. } => None,
                    })
                    .chain(
                        self.components
                            .iter()
                            .flat_map(|c| c.rings.iter().flatten())
                            .map(|r| r.path().to_path_buf()),
                    )
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            },
            recording: self.recording.as_ref().map(|r| {
                let snap = self.control.view().recording();
                protocol::RecordingInfo {
                    dir: r.dir.clone(),
                    state: snap.as_ref().map(|s| s.state),
                    segment: snap.as_ref().map_or(0, |s| s.segment),
                    frames: snap.as_ref().map_or(0, |s| s.frames),
                    bytes: snap.as_ref().map_or(0, |s| s.bytes),
                    next_seq: snap.as_ref().map_or(0, |s| s.next_seq),
                    gaps: snap.as_ref().map_or(0, |s| s.gaps),
                    missed: snap.as_ref().map_or(0, |s| s.missed),
                    reason: snap.and_then(|s| s.reason),
                }
            }),
            // Filled in by the request router (`crate::requests`), which holds them.
            requests: Vec::new(),
        }
    }

    /// The topic mask in bus slot `slot`, if it is attached.
    pub fn topic_mask(&self, slot: usize) -> Option<aegis_shm_client::spmc::TopicMask> {
        let stats = self.monitor.slot_stats();
        stats.iter().find(|s| s.slot == slot).map(|s| s.topics)
    }

    /// Every consumer's bus slot figures.
    fn consumer_infos(&self) -> Vec<ConsumerInfo> {
        let slots = self.monitor.slot_stats();
        let tail = self.monitor.tail();
        self.components
            .iter()
            .filter(|c| c.role.consumes())
            .map(|c| {
                let st = c.slot.and_then(|s| slots.iter().find(|x| x.slot == s));
                ConsumerInfo {
                    name: c.name.clone(),
                    slot: c.slot,
                    state: c.public_state(),
                    cursor: st.map(|s| s.cursor),
                    lag_bytes: st.map(|s| tail.saturating_sub(s.cursor)),
                    read: st.map(|s| s.read),
                    overruns: st.map(|s| s.overruns),
                    missed: st.map(|s| s.missed),
                }
            })
            .collect()
    }

    /// Every source: the sequencer's view once it runs, else the registrations.
    fn source_infos(&self) -> Vec<SourceInfo> {
        let running: Vec<SourceInfo> = self
            .control
            .sources()
            .into_iter()
            .map(|s| {
                let rec = self.sources.get(&s.name);
                // The seq figures the sequencer publishes per rank (`takeover.rs`).
                let seqs = self.running.as_ref().and_then(|r| {
                    let rank = r.ranks.iter().position(|n| *n == s.name)?;
                    Some((&r.takeovers, rank))
                });
                SourceInfo {
                    state: s.state.into(),
                    events: s.events,
                    progress: Some(SourceProgress {
                        rejected: s.rejected,
                        last_seq: seqs.and_then(|(k, rank)| k.last_seq(rank)),
                        duplicates: seqs.map_or(0, |(k, rank)| k.duplicates(rank)),
                        seq_gaps: seqs.map_or(0, |(k, rank)| k.gaps(rank)),
                        watermark: s.watermark,
                        reason: s.reason,
                    }),
                    kind: rec.map(|r| r.kind),
                    topic: rec.map(|r| r.topic.clone()),
                    component: rec.map(|r| r.component.clone()),
                    takeovers: rec.map_or(0, |r| r.takeovers),
                    name: s.name,
                }
            })
            .collect();
        if !running.is_empty() {
            return running;
        }
        self.sources
            .iter()
            .map(|(n, r)| SourceInfo {
                name: n.clone(),
                state: SourceStatus::Registered,
                events: 0,
                progress: None,
                kind: Some(r.kind),
                topic: Some(r.topic.clone()),
                component: Some(r.component.clone()),
                takeovers: r.takeovers,
            })
            .collect()
    }

    /// Whether `session run` will restart component `c` if it dies by a signal: a live
    /// session that has not begun to drain, `c` alive and started by a `session run` command
    /// that has restarts left under `--restart-killed`.
    fn restartable(&self, c: &Component) -> bool {
        let budget = match (self.spec.restart_killed, c.launch) {
            (Some(n), Some(l)) => l.restarts() < n,
            _ => false,
        };
        budget
            && matches!(self.mode, Mode::Live { .. })
            && matches!(self.state, State::Created | State::Running)
            && !c.state.gone()
            && c.pid != 0
    }

    /// The sequencer's counters; `elapsed` (s) gives the rate.
    fn sequencer_stats(&self, elapsed: Option<f64>) -> SequencerStats {
        let k = self.control.counters();
        let ms = |ns: &AtomicU64| ns.load(Ordering::Relaxed) / 1_000_000;
        let merged = k.merged.load(Ordering::Relaxed);
        SequencerStats {
            events_merged: merged,
            late_events: k.late.load(Ordering::Relaxed),
            rejected_events: k.rejected.load(Ordering::Relaxed),
            source_stalls: k.source_stalls.load(Ordering::Relaxed),
            source_stall_ms: ms(&k.source_stall_ns),
            consumer_stalls: k.consumer_stalls.load(Ordering::Relaxed),
            consumer_stall_ms: ms(&k.consumer_stall_ns),
            bus_fill_bytes: k.bus_fill.load(Ordering::Relaxed),
            events_per_s: elapsed
                .filter(|e| *e > 0.0)
                .map(|e| (merged as f64 / e) as u64),
            duplicates: self.running.as_ref().map_or(0, |r| {
                (0..r.ranks.len()).map(|i| r.takeovers.duplicates(i)).sum()
            }),
            seq_gaps: self
                .running
                .as_ref()
                .map_or(0, |r| (0..r.ranks.len()).map(|i| r.takeovers.gaps(i)).sum()),
        }
    }

    /// One entry of `session list`.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            name: self.name.clone(),
            id: self.id.clone(),
            sid: self.sid.clone(),
            mode: self.protocol_mode(),
            state: self.state.public(),
            components: self.components.len(),
            sources: self.sources.len(),
            events_merged: self.control.counters().merged.load(Ordering::Relaxed),
        }
    }

    /// Stops and joins the sequencer (before the session's segments go away).
    pub fn shutdown(&mut self) {
        if let Some(r) = &mut self.running {
            r.stop.store(true, Ordering::Relaxed);
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
        // After the sequencer: the recorder marks what it has as incomplete and lets go.
        if let Some(r) = &mut self.recording {
            r.stop.store(true, Ordering::Relaxed);
            r.prepared = None;
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

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

impl Backing {
    /// The ring's segment, or the journal.
    fn path(&self) -> &std::path::Path {
        match self {
            Backing::Ring(region) => region.path(),
            Backing::Journal { path, .. } | Backing::Recording { path, .. } => path,
        }
    }
}
