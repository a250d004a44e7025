//! The control protocol: newline-delimited JSON over a Unix stream socket. Every message is
//! one JSON object with a `"cmd"` field, at most [`MAX_LINE`] bytes including the newline.
//! See `docs/protocol.md` for the flow and an example session.

use serde::{Deserialize, Serialize};

/// Largest accepted line, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/tmp/aegis/aegis-components.sock";
/// Interval between client heartbeats.
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
/// A component silent for this long is declared dead.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 5_000;

/// The socket path: `explicit`, else `$AEGIS_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path(explicit: Option<&std::path::Path>) -> std::path::PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("AEGIS_SOCKET")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
    }
}

/// Whether `name` is a valid component, session or source name: `[A-Za-z0-9._-]{1,64}`, and
/// not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Generates a lower-case (snake_case) name table for a fieldless enum: `name()`,
/// `Display` and `FromStr` agree with its serde names.
macro_rules! named_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name used on the wire and in output.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<$ty, String> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = $ty::ALL.iter().map(|v| v.name()).collect();
                    format!("{} must be {}, got {s:?}", $what, names.join(" or "))
                })
            }
        }
    };
}

/// How a session merges: exactly (backtest), or with a bounded wait for idle sources (live).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Real-time feeds; late consumers join at the head; idle sources are waited for at most
    /// `max_lateness_us`.
    Live,
    /// Recorded data; every event is merged in exact order; nothing joins after the start.
    Backtest,
}

named_enum!(Mode, "mode", { Live => "live", Backtest => "backtest" });

/// The kind of events a source carries, as declared at REGISTER. Distinct from
/// [`crate::frame::Kind`], which also has a `Control` kind that no source declares.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Trades.
    Trade,
    /// Best bid / ask updates.
    Book,
    /// Klines (candles).
    Kline,
    /// Application events ([`crate::event::Custom`]) of one type, on topic `custom.<type>`.
    Custom,
}

named_enum!(SourceKind, "kind", { Trade => "trade", Book => "book", Kline => "kline", Custom => "custom" });

impl From<SourceKind> for crate::frame::Kind {
    fn from(k: SourceKind) -> crate::frame::Kind {
        match k {
            SourceKind::Trade => crate::frame::Kind::Trade,
            SourceKind::Book => crate::frame::Kind::Book,
            SourceKind::Kline => crate::frame::Kind::Kline,
            SourceKind::Custom => crate::frame::Kind::Custom,
        }
    }
}

impl TryFrom<crate::frame::Kind> for SourceKind {
    /// `Control`, which no source declares.
    type Error = crate::frame::Kind;
    fn try_from(k: crate::frame::Kind) -> Result<SourceKind, crate::frame::Kind> {
        match k {
            crate::frame::Kind::Trade => Ok(SourceKind::Trade),
            crate::frame::Kind::Book => Ok(SourceKind::Book),
            crate::frame::Kind::Kline => Ok(SourceKind::Kline),
            crate::frame::Kind::Custom => Ok(SourceKind::Custom),
            crate::frame::Kind::Control => Err(k),
        }
    }
}

/// Why the daemon refused: the `code` of an `ERROR` reply. Serialised as snake_case
/// (`bad_request`, ...); `docs/protocol.md` lists them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON.
    MalformedJson,
    /// The object has no string `cmd`.
    MissingCmd,
    /// `cmd` names no command.
    UnknownCmd,
    /// A known command with missing or invalid fields.
    BadRequest,
    /// The line is longer than [`MAX_LINE`].
    LineTooLong,
    /// Half a line stayed unfinished too long.
    Timeout,
    /// No session has this token.
    BadToken,
    /// A name outside `[A-Za-z0-9._-]{1,64}`.
    BadName,
    /// The component or source name is taken.
    DuplicateName,
    /// The session already started.
    SessionStarted,
    /// The session is over (finished, failed or stopped).
    SessionOver,
    /// The session cannot start yet.
    NotReady,
    /// A limit (sources, consumer slots) is reached.
    TooMany,
    /// No session of that name.
    NoSession,
    /// A session of that name exists.
    Exists,
    /// A component message before REGISTER.
    NotRegistered,
    /// A second REGISTER on one connection.
    AlreadyRegistered,
    /// The session of a registered component was destroyed.
    SessionGone,
    /// The peer's uid is neither the daemon's nor root.
    PermissionDenied,
    /// Too many connections.
    Busy,
    /// The daemon failed (a segment could not be created, say).
    Internal,
    /// No component of that name in the session.
    NoComponent,
    /// The component already finished, died or was evicted.
    ComponentGone,
    /// Sent to a component that `session evict` evicted: it must stop (a consumer's bus slot
    /// is released; its next read says so).
    Evicted,
    /// A topic that no source of the (started) session publishes.
    UnknownTopic,
    /// A request's target is no live component of the session.
    NoTarget,
    /// From a group member that no longer holds the lease (fenced: a newer epoch is active),
    /// for any frame or request it sends; it must stop (SPEC section 12). Also a request's
    /// answer when its target group has no active member (SPEC 13).
    NotActive,
    /// The target's request handler failed.
    HandlerError,
    /// A component sent a request to itself.
    SelfRequest,
    /// `DISCOVER` of a group the session does not know.
    NoGroup,
}

named_enum!(ErrorCode, "error code", {
    MalformedJson => "malformed_json",
    MissingCmd => "missing_cmd",
    UnknownCmd => "unknown_cmd",
    BadRequest => "bad_request",
    LineTooLong => "line_too_long",
    Timeout => "timeout",
    BadToken => "bad_token",
    BadName => "bad_name",
    DuplicateName => "duplicate_name",
    SessionStarted => "session_started",
    SessionOver => "session_over",
    NotReady => "not_ready",
    TooMany => "too_many",
    NoSession => "no_session",
    Exists => "exists",
    NotRegistered => "not_registered",
    AlreadyRegistered => "already_registered",
    SessionGone => "session_gone",
    PermissionDenied => "permission_denied",
    Busy => "busy",
    Internal => "internal",
    NoComponent => "no_component",
    ComponentGone => "component_gone",
    Evicted => "evicted",
    UnknownTopic => "unknown_topic",
    NoTarget => "no_target",
    NotActive => "not_active",
    HandlerError => "handler_error",
    SelfRequest => "self_request",
    NoGroup => "no_group",
});

/// Where a session is in its life: `created → running → draining → finished`, or `failed` /
/// `stopped`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Accepting registrations; nothing flows.
    Created,
    /// Data flows.
    Running,
    /// Every producer finished; the sequencer drains.
    Draining,
    /// Every event delivered, every consumer finished (or gone).
    Finished,
    /// Failed (the reason is reported beside the state).
    Failed,
    /// Stopped by `session stop` or `destroy`.
    Stopped,
}

named_enum!(SessionState, "session state", {
    Created => "created",
    Running => "running",
    Draining => "draining",
    Finished => "finished",
    Failed => "failed",
    Stopped => "stopped",
});

impl SessionState {
    /// Whether nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SessionState::Finished | SessionState::Failed | SessionState::Stopped
        )
    }
}

/// A component's state as `inspect` shows it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    /// Registered, not READY.
    Registered,
    /// READY (waiting for STARTED, or running).
    Ready,
    /// Sent FINISHED.
    Finished,
    /// Declared dead (connection closed, heartbeats missed, pid gone, evicted).
    Dead,
    /// Reported an ERROR.
    Error,
    /// Backtest only: silent past the heartbeat timeout while its pid is alive (paused by a
    /// debugger or SIGSTOP). Not dead: the session waits for it, and it goes back to the
    /// state it had when its heartbeats resume.
    Stalled,
}

named_enum!(ComponentState, "component state", {
    Registered => "registered",
    Ready => "ready",
    Finished => "finished",
    Dead => "dead",
    Error => "error",
    Stalled => "stalled",
});

/// A source's state as `inspect` shows it: `registered` before the session starts, then the
/// sequencer's view ([`crate::stats::SourceState`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    /// Declared at REGISTER; the sequencer has not started.
    Registered,
    /// A control-segment entry not in use.
    Unused,
    /// Being merged.
    Active,
    /// Reached end-of-stream.
    Ended,
    /// Refused for a corrupt frame or cursor.
    Failed,
    /// Removed from a live merge (its producer died).
    Removed,
}

named_enum!(SourceStatus, "source state", {
    Registered => "registered",
    Unused => "unused",
    Active => "active",
    Ended => "ended",
    Failed => "failed",
    Removed => "removed",
});

impl From<crate::stats::SourceState> for SourceStatus {
    fn from(s: crate::stats::SourceState) -> SourceStatus {
        use crate::stats::SourceState as S;
        match s {
            S::Unused => SourceStatus::Unused,
            S::Active => SourceStatus::Active,
            S::Ended => SourceStatus::Ended,
            S::Failed => SourceStatus::Failed,
            S::Removed => SourceStatus::Removed,
        }
    }
}

/// A component's role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writes one or more sources.
    Producer,
    /// Reads the bus.
    Consumer,
    /// Both.
    Both,
}

named_enum!(Role, "role", { Producer => "producer", Consumer => "consumer", Both => "both" });

impl Role {
    /// Whether the role produces.
    pub fn produces(self) -> bool {
        matches!(self, Role::Producer | Role::Both)
    }
    /// Whether the role consumes.
    pub fn consumes(self) -> bool {
        matches!(self, Role::Consumer | Role::Both)
    }
}

/// A source a producer declares.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceDecl {
    /// The source's name (`[A-Za-z0-9._-]{1,64}`), unique in the session.
    pub name: String,
    /// `trade`, `book`, `kline` or `custom` (another value makes the REGISTER a
    /// `bad_request`). A `custom` source publishes [`crate::event::Custom`] events of one
    /// type on topic `custom.<type>`.
    pub kind: SourceKind,
    /// The topic it publishes, e.g. `klines.BTCUSDT.1m`.
    pub topic: String,
    /// An absolute path to a journal (SPEC section 8) holding the source's frames, offered to
    /// the daemon. In a backtest the daemon maps it read-only and merges straight from it: no
    /// ring is created, the ACK says `journal: true`, and the producer pushes nothing for this
    /// source (it stays registered until the session ends, and may follow the source's
    /// progress in the ctl segment). A live session creates a ring as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    /// A recording (SPEC section 11) replayed as one pre-sequenced stream (`aegis-replay
    /// DIR`), backtest only. The daemon reads it itself and copies its bus frames to the bus
    /// unchanged (source and topic ids, source seqs, LATE flags); the session takes its
    /// source names and topic table from the recording's manifest (`kind` and `topic` of
    /// this declaration are not used on the bus), and refuses any other source beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingDecl>,
}

/// The recording a [`SourceDecl`] replays, and the window of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecordingDecl {
    /// The recording's directory (absolute).
    pub dir: String,
    /// Start at the first event whose ts is at least this (ns; `None`: the first frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ts: Option<u64>,
    /// End before the first event whose ts is greater than this (ns; `None`: the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ts: Option<u64>,
}

/// The REGISTER payload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The component's name, unique in the session.
    pub component_name: String,
    /// The session token (32 hex digits).
    pub session_token: String,
    /// Producer, consumer or both.
    pub role: Option<Role>,
    /// Sources it will produce.
    #[serde(default)]
    pub sources: Vec<SourceDecl>,
    /// Event kinds it requires (`klines`, `orderbook`, `trades`): with `supported_symbols`
    /// and `supported_timeframes`, a consumer's topics when `topics` is empty (SPEC 14).
    #[serde(default)]
    pub requires: Vec<String>,
    /// Topics it wants: seeds its desired topic set, unless the daemon already holds one for
    /// this component name (see `crate::subscription`). Empty: every topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Symbols it supports; for a producer that accepts a symbol set, the initial desired set.
    #[serde(default)]
    pub supported_symbols: Vec<String>,
    /// Timeframes it supports (kline topics of `requires`).
    #[serde(default)]
    pub supported_timeframes: Vec<String>,
    /// A producer that filters by a desired symbol set (it installs a
    /// `client::SymbolHandler`): `aegis-shmctl subscribe --symbols` may address it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepts_symbols: bool,
    /// The component's pid (liveness); the daemon also reads it from SO_PEERCRED.
    #[serde(default)]
    pub pid: Option<u32>,
    /// A group to join (hot standby, SPEC section 12): one member holds the lease (active),
    /// the others are standbys. Producers of a group publish the same one source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The group's failover policy (default `balanced`); every member must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// Which `session run` command started it, and which start of that command this is
    /// (from `$AEGIS_COMMAND_INDEX` and `$AEGIS_INCARNATION`, which `session run` sets): the
    /// daemon tells `chaos` which pid `session run` will restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
}

/// How `session run` started a component (SPEC section 12: restarts through its command
/// lines).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// The index of its `-c` command (0 for the first).
    pub command: u32,
    /// 1 for the first start of that command, 2 after one restart, ...
    pub incarnation: u32,
}

impl Launch {
    /// The environment variable that carries [`Launch::command`].
    pub const COMMAND_ENV: &'static str = "AEGIS_COMMAND_INDEX";
    /// The environment variable that carries [`Launch::incarnation`].
    pub const INCARNATION_ENV: &'static str = "AEGIS_INCARNATION";

    /// The launch `session run` described in the environment, if both variables are set
    /// and are numbers (an incarnation is at least 1).
    pub fn from_env() -> Option<Launch> {
        let var = |k: &str| std::env::var(k).ok()?.trim().parse::<u32>().ok();
        Some(Launch {
            command: var(Self::COMMAND_ENV)?,
            incarnation: var(Self::INCARNATION_ENV).filter(|n| *n >= 1)?,
        })
    }

    /// Restarts `session run` made of the command before this incarnation.
    pub fn restarts(&self) -> u32 {
        self.incarnation.saturating_sub(1)
    }
}

/// Settings of a new session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// Session name.
    pub name: String,
    /// Live or backtest.
    pub mode: Mode,
    /// Start automatically once this many components are READY.
    #[serde(default)]
    pub expect: Option<u32>,
    /// Pin the sequencer to this core.
    #[serde(default)]
    pub sequencer_core: Option<usize>,
    /// Bus size in bytes (power of two).
    #[serde(default)]
    pub bus_bytes: Option<usize>,
    /// Source ring size in bytes (power of two).
    #[serde(default)]
    pub source_bytes: Option<usize>,
    /// Live: max lateness in µs.
    #[serde(default)]
    pub max_lateness_us: Option<u64>,
    /// Period of the components' subscription reconciliation, in seconds (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_s: Option<u64>,
    /// Record the bus into this directory (absolute; SPEC section 11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<std::path::PathBuf>,
    /// Recording segment size in bytes (default 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_segment_bytes: Option<u64>,
    /// Live, set by `session run --restart-killed N`: it restarts a component that died by
    /// a signal, at most N times per command. `inspect` then marks the components it will
    /// restart (`restartable`), for `chaos --restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_killed: Option<u32>,
}

/// Component → daemon, and CLI → daemon.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "cmd")]
pub enum Request {
    /// Join a session.
    #[serde(rename = "REGISTER")]
    Register(Register),
    /// Segments mapped; ready for data.
    #[serde(rename = "READY")]
    Ready,
    /// Acknowledge a daemon message.
    #[serde(rename = "ACK")]
    Ack,
    /// The component needs time (reason).
    #[serde(rename = "WAIT")]
    Wait {
        /// Why.
        #[serde(default)]
        reason: String,
    },
    /// Still alive.
    #[serde(rename = "HEARTBEAT")]
    Heartbeat,
    /// Done (a producer ended its streams; a consumer saw END-OF-STREAM).
    #[serde(rename = "FINISHED")]
    Finished,
    /// The component failed.
    #[serde(rename = "ERROR")]
    Error {
        /// Machine-readable code, chosen by the component (free-form, unlike the daemon's
        /// [`ErrorCode`]).
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// CLI: create a session.
    #[serde(rename = "SESSION_CREATE")]
    SessionCreate(SessionSpec),
    /// CLI: the trigger.
    #[serde(rename = "SESSION_START")]
    SessionStart {
        /// Session name.
        name: String,
        /// How long to wait for missing READYs.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// CLI: list sessions.
    #[serde(rename = "SESSION_LIST")]
    SessionList,
    /// CLI: inspect a session.
    #[serde(rename = "SESSION_INSPECT")]
    SessionInspect {
        /// Session name.
        name: String,
    },
    /// CLI: stop a session.
    #[serde(rename = "SESSION_STOP")]
    SessionStop {
        /// Session name.
        name: String,
    },
    /// CLI: destroy a session and its segments.
    #[serde(rename = "SESSION_DESTROY")]
    SessionDestroy {
        /// Session name.
        name: String,
    },
    /// CLI: evict a component on purpose (it is marked dead, as if it had died).
    #[serde(rename = "SESSION_EVICT")]
    SessionEvict {
        /// Session name.
        name: String,
        /// Component name.
        component: String,
    },
    /// Component: send me my desired set (answered with `SUBSCRIPTIONS`).
    #[serde(rename = "SUBSCRIPTIONS")]
    Subscriptions,
    /// Component: what a reconciliation found (not answered).
    #[serde(rename = "RECONCILED")]
    Reconciled(crate::subscription::Report),
    /// CLI: set a component's desired topics (consumer) or symbols (producer).
    #[serde(rename = "SUBSCRIBE")]
    Subscribe {
        /// Session name.
        name: String,
        /// Component name.
        component: String,
        /// The topics (one of `topics` and `symbols`).
        #[serde(default)]
        topics: Option<Vec<String>>,
        /// The symbols.
        #[serde(default)]
        symbols: Option<Vec<String>>,
    },
    /// CLI: desired vs actual sets of a session's components.
    #[serde(rename = "SESSION_SUBSCRIPTIONS")]
    SessionSubscriptions {
        /// Session name.
        name: String,
    },
    /// A request to another component (`crate::request`); the CLI names the session.
    #[serde(rename = "REQUEST")]
    Call(crate::request::Call),
    /// A component's answer to a request it was sent.
    #[serde(rename = "REPLY")]
    Answer(crate::request::Answer),
    /// Who is in a group, and who holds its lease (SPEC section 12). From a registered
    /// component: in its own session (`session` may be left out). From the CLI: `session` is
    /// needed. Exactly one of `group` and `component`.
    #[serde(rename = "DISCOVER")]
    Discover {
        /// Session name (the CLI's connection has none).
        #[serde(default)]
        session: Option<String>,
        /// A group's name.
        #[serde(default)]
        group: Option<String>,
        /// A component's name.
        #[serde(default)]
        component: Option<String>,
    },
}

/// A source in an ACK.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AckSource {
    /// Name.
    pub name: String,
    /// Its ring's segment path, or the journal's path for a journal-backed source.
    pub path: String,
    /// Topic id to stamp on its frames.
    pub topic_id: u32,
    /// Kind.
    pub kind: SourceKind,
    /// The daemon reads this source straight from the journal the producer declared (a
    /// backtest): the producer pushes nothing for it. `false` (a live session, or no journal
    /// declared): the producer writes its ring as usual.
    #[serde(default)]
    pub journal: bool,
    /// Set when events of this source were merged already (a producer restarted under the
    /// same source name, or a group member taking over): the source seq of the last one
    /// accepted. The producer resumes after it; the sequencer drops anything at or below it
    /// as a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_after: Option<u64>,
}

/// The ACK of a REGISTER.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Session UUID.
    pub session_id: String,
    /// Session name.
    pub session: String,
    /// Live or backtest.
    pub mode: Mode,
    /// Segment epoch to check on open.
    pub epoch: u64,
    /// Layout version the daemon speaks.
    pub layout_version: u32,
    /// The bus segment.
    pub bus: String,
    /// The control segment.
    pub control: String,
    /// Consumer slot on the bus (consumers).
    pub slot: Option<usize>,
    /// The sources this component writes.
    pub sources: Vec<AckSource>,
    /// The session's topic table so far (name → id).
    pub topics: std::collections::BTreeMap<String, u32>,
    /// Source names by rank (source id), for consumers.
    pub source_names: Vec<String>,
    /// The desired set the daemon holds for this component (applied before anything else).
    #[serde(default)]
    pub desired: crate::subscription::Desired,
    /// The session's reconciliation period, in seconds.
    #[serde(default = "default_reconcile_s")]
    pub reconcile_s: u64,
    /// The directory the session records into (`--record`), for readers that catch up from
    /// the recording (`aegis-tap --catch-up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<std::path::PathBuf>,
    /// The lease of a component that registered into a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Lease>,
}

fn default_reconcile_s() -> u64 {
    crate::subscription::DEFAULT_RECONCILE_S
}

/// Daemon → component and daemon → CLI.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "cmd")]
pub enum Reply {
    /// Registration accepted, or a CLI request done (`data` holds the answer).
    #[serde(rename = "ACK")]
    Ack {
        /// REGISTER: the details.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ack: Option<Box<Ack>>,
        /// CLI answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
    },
    /// Not yet: the reason.
    #[serde(rename = "WAIT")]
    Wait {
        /// Why.
        reason: String,
    },
    /// The session started: data flows. Carries the final topic table and source ranks.
    #[serde(rename = "STARTED")]
    Started {
        /// Topic table.
        topics: std::collections::BTreeMap<String, u32>,
        /// Source names by rank.
        source_names: Vec<String>,
    },
    /// Heartbeat answer.
    #[serde(rename = "HEARTBEAT")]
    Heartbeat,
    /// Stop now (session stopped or failed).
    #[serde(rename = "STOP")]
    Stop {
        /// Why.
        reason: String,
    },
    /// The component's desired set: pushed on every change, and the answer to its
    /// `SUBSCRIPTIONS` request.
    #[serde(rename = "SUBSCRIPTIONS")]
    Subscriptions(crate::subscription::Push),
    /// A request for this component to answer (`crate::request`).
    #[serde(rename = "REQUEST")]
    Request(crate::request::Incoming),
    /// The answer to this peer's request.
    #[serde(rename = "REPLY")]
    Answer(crate::request::Answer),
    /// A refusal.
    #[serde(rename = "ERROR")]
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable message.
        message: String,
    },
    /// To a standby of a group: it now holds the lease (the active member died, closed its
    /// connection, or missed its heartbeats for the policy's bound).
    #[serde(rename = "PROMOTED")]
    Promoted {
        /// The group.
        group: String,
        /// The new epoch (incremented on every promotion).
        epoch: u64,
        /// A producer group: the source seq of the last event merged from the source; resume
        /// after it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_after: Option<u64>,
    },
    /// To a standby of a producer group whose active member finished the source: nothing is
    /// left to take over; it may exit (the daemon counts it finished).
    #[serde(rename = "RELEASED")]
    Released {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
}

impl Reply {
    /// An ERROR reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }

    /// An ACK carrying a CLI answer (one of the answer types below, e.g. [`Inspect`]).
    pub fn data(answer: &impl Serialize) -> Reply {
        Reply::Ack {
            ack: None,
            data: Some(serde_json::to_value(answer).expect("protocol answers serialise")),
        }
    }

    /// An ACK with nothing in it (the answer to FINISHED and ERROR).
    pub fn ack() -> Reply {
        Reply::Ack {
            ack: None,
            data: None,
        }
    }
}

/// The command names of [`Request`], read first by [`parse_request`] so that an unknown
/// command and a known one with bad fields get different codes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Cmd {
    /// [`Request::Register`].
    Register,
    /// [`Request::Ready`].
    Ready,
    /// [`Request::Ack`].
    Ack,
    /// [`Request::Wait`].
    Wait,
    /// [`Request::Heartbeat`].
    Heartbeat,
    /// [`Request::Finished`].
    Finished,
    /// [`Request::Error`].
    Error,
    /// [`Request::SessionCreate`].
    SessionCreate,
    /// [`Request::SessionStart`].
    SessionStart,
    /// [`Request::SessionList`].
    SessionList,
    /// [`Request::SessionInspect`].
    SessionInspect,
    /// [`Request::SessionStop`].
    SessionStop,
    /// [`Request::SessionDestroy`].
    SessionDestroy,
    /// [`Request::SessionEvict`].
    SessionEvict,
    /// [`Request::Subscriptions`].
    Subscriptions,
    /// [`Request::Reconciled`].
    Reconciled,
    /// [`Request::Subscribe`].
    Subscribe,
    /// [`Request::SessionSubscriptions`].
    SessionSubscriptions,
    /// [`Request::Call`].
    Request,
    /// [`Request::Answer`].
    Reply,
    /// [`Request::Discover`].
    Discover,
}

named_enum!(Cmd, "cmd", {
    Register => "REGISTER",
    Ready => "READY",
    Ack => "ACK",
    Wait => "WAIT",
    Heartbeat => "HEARTBEAT",
    Finished => "FINISHED",
    Error => "ERROR",
    SessionCreate => "SESSION_CREATE",
    SessionStart => "SESSION_START",
    SessionList => "SESSION_LIST",
    SessionInspect => "SESSION_INSPECT",
    SessionStop => "SESSION_STOP",
    SessionDestroy => "SESSION_DESTROY",
    SessionEvict => "SESSION_EVICT",
    Subscriptions => "SUBSCRIPTIONS",
    Reconciled => "RECONCILED",
    Subscribe => "SUBSCRIBE",
    SessionSubscriptions => "SESSION_SUBSCRIPTIONS",
    Request => "REQUEST",
    Reply => "REPLY",
    Discover => "DISCOVER",
});

impl Request {
    /// The request's command name.
    pub fn cmd(&self) -> Cmd {
        match self {
            Request::Register(_) => Cmd::Register,
            Request::Ready => Cmd::Ready,
            Request::Ack => Cmd::Ack,
            Request::Wait { .. } => Cmd::Wait,
            Request::Heartbeat => Cmd::Heartbeat,
            Request::Finished => Cmd::Finished,
            Request::Error { .. } => Cmd::Error,
            Request::SessionCreate(_) => Cmd::SessionCreate,
            Request::SessionStart { .. } => Cmd::SessionStart,
            Request::SessionList => Cmd::SessionList,
            Request::SessionInspect { .. } => Cmd::SessionInspect,
            Request::SessionStop { .. } => Cmd::SessionStop,
            Request::SessionDestroy { .. } => Cmd::SessionDestroy,
            Request::SessionEvict { .. } => Cmd::SessionEvict,
            Request::Subscriptions => Cmd::Subscriptions,
            Request::Reconciled(_) => Cmd::Reconciled,
            Request::Subscribe { .. } => Cmd::Subscribe,
            Request::SessionSubscriptions { .. } => Cmd::SessionSubscriptions,
            Request::Call(_) => Cmd::Request,
            Request::Answer(_) => Cmd::Reply,
            Request::Discover { .. } => Cmd::Discover,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The answers to CLI requests: the `data` of their ACK, one type per request.
// ---------------------------------------------------------------------------------------------

/// The answer to `SESSION_CREATE`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionCreated {
    /// Session name.
    pub name: String,
    /// Session UUID.
    pub id: String,
    /// Live or backtest.
    pub mode: Mode,
    /// The session token (32 hex digits) components register with.
    pub token: String,
    /// Always `created`.
    pub state: SessionState,
}

/// The answer to `SESSION_START`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionStarted {
    /// Session name.
    pub name: String,
    /// The state after the start (`running`).
    pub state: SessionState,
    /// Components registered when it started.
    pub components: usize,
}

/// One entry of the answer to `SESSION_LIST`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session name.
    pub name: String,
    /// Session UUID.
    pub id: String,
    /// Short id used in segment names (`/dev/shm/aegis-<sid>-*`).
    pub sid: String,
    /// Live or backtest.
    pub mode: Mode,
    /// State.
    pub state: SessionState,
    /// Components registered (including gone ones).
    pub components: usize,
    /// Sources registered.
    pub sources: usize,
    /// Events the sequencer merged so far.
    pub events_merged: u64,
}

/// The answer to `SESSION_STOP`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionStopped {
    /// Session name.
    pub name: String,
    /// The state after the stop (`stopped`, or the final state it had reached before).
    pub state: SessionState,
}

/// The answer to `SESSION_DESTROY`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionDestroyed {
    /// Session name.
    pub name: String,
    /// Always true.
    pub destroyed: bool,
}

/// The answer to `SESSION_EVICT`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ComponentEvicted {
    /// Session name.
    pub name: String,
    /// The evicted component.
    pub component: String,
    /// Its role.
    pub role: Role,
    /// The session's state after the eviction (`failed` when a backtest lost a producer).
    pub state: SessionState,
}

/// The answer to `SESSION_INSPECT` (SPEC section 7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Inspect {
    /// Session name.
    pub name: String,
    /// Session UUID.
    pub id: String,
    /// Live or backtest.
    pub mode: Mode,
    /// State.
    pub state: SessionState,
    /// Why it failed (`failed` only).
    pub reason: Option<String>,
    /// Creation time, Unix seconds.
    pub created_unix_s: u64,
    /// Seconds since the start (until the end), once started.
    pub elapsed_s: Option<f64>,
    /// Every component, in registration order.
    pub components: Vec<ComponentInfo>,
    /// Every source.
    pub sources: Vec<SourceInfo>,
    /// A session replaying a recording (`aegis-replay DIR`): the recorded sources by bus
    /// `source_id`, the names consumers see (`sources` lists the one source the daemon
    /// reads the recording as). Absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replayed_sources: Vec<ReplayedSource>,
    /// Every consumer's bus slot.
    pub consumers: Vec<ConsumerInfo>,
    /// Topic table (name → id).
    pub topics: std::collections::BTreeMap<String, u32>,
    /// The sequencer's counters.
    pub sequencer: SequencerStats,
    /// The groups (hot standby), by name.
    #[serde(default)]
    pub groups: Vec<GroupInfo>,
    /// The session's segments.
    pub segments: Segments,
    /// The recorder, if the session records (`--record`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingInfo>,
    /// Requests between components, per target and type (absent when there were none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<crate::request::RequestStats>,
}

/// The recorder in [`Inspect`]: where it records and how far it has got.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecordingInfo {
    /// The recording's directory.
    pub dir: std::path::PathBuf,
    /// State (`None` until the session starts).
    pub state: Option<crate::stats::RecordingState>,
    /// The segment being written.
    pub segment: u32,
    /// Frames written (gap records included).
    pub frames: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The recorded position: the bus seq after the last frame recorded.
    pub next_seq: u64,
    /// Gap records (live: the bus lapped the recorder).
    pub gaps: u64,
    /// Frames lost to gaps.
    pub missed: u64,
    /// Why the recording is incomplete.
    pub reason: Option<String>,
}

/// A component in [`Inspect`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ComponentInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Pid (0 if unknown).
    pub pid: u32,
    /// State.
    pub state: ComponentState,
    /// Why it is dead, in error or stalled.
    pub reason: Option<String>,
    /// The `session run` command that started it, and which start of it this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// Alive, and `session run` will restart it if it dies by a signal (its command has
    /// restarts left under `--restart-killed`).
    #[serde(default)]
    pub restartable: bool,
}

/// A source in [`Inspect`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: SourceStatus,
    /// Events merged from it.
    pub events: u64,
    /// The sequencer's counters, once it runs (absent before the start).
    #[serde(flatten)]
    pub progress: Option<SourceProgress>,
    /// Declared kind (absent from the registry only if the control segment names a source
    /// the daemon does not know).
    pub kind: Option<SourceKind>,
    /// Declared topic.
    pub topic: Option<String>,
    /// The component that writes it.
    pub component: Option<String>,
    /// Times it changed hands (a promoted standby, a restarted producer).
    #[serde(default)]
    pub takeovers: u64,
}

/// A recorded source in [`Inspect::replayed_sources`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplayedSource {
    /// Its recorded name.
    pub name: String,
    /// Its declared kind (absent from a recording made before recordings kept it).
    pub kind: Option<SourceKind>,
    /// Its topic (absent likewise).
    pub topic: Option<String>,
}

/// A running source's counters in [`SourceInfo`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SourceProgress {
    /// Events refused (corrupt or out of order).
    pub rejected: u64,
    /// Live: the source seq of the last event accounted for (merged or refused).
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// Live: resent events dropped (at or below the seq a new producer resumed after).
    #[serde(default)]
    pub duplicates: u64,
    /// Live: source seqs skipped.
    #[serde(default)]
    pub seq_gaps: u64,
    /// Highest timestamp merged (ns).
    pub watermark: u64,
    /// Why it failed or was removed.
    pub reason: Option<String>,
}

/// A consumer in [`Inspect`]. The bus figures are `null` while it holds no slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Component name.
    pub name: String,
    /// Bus slot.
    pub slot: Option<usize>,
    /// Component state.
    pub state: ComponentState,
    /// Read cursor on the bus (bytes).
    pub cursor: Option<u64>,
    /// Bytes behind the bus tail.
    pub lag_bytes: Option<u64>,
    /// Frames read.
    pub read: Option<u64>,
    /// Times the writer lapped it (live).
    pub overruns: Option<u64>,
    /// Frames lost to overruns.
    pub missed: Option<u64>,
}

/// The sequencer's counters in [`Inspect`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SequencerStats {
    /// Events written to the bus.
    pub events_merged: u64,
    /// Live: events older than the merge point.
    pub late_events: u64,
    /// Events refused.
    pub rejected_events: u64,
    /// Times the merge waited for a source.
    pub source_stalls: u64,
    /// Total of those waits (ms).
    pub source_stall_ms: u64,
    /// Times the merge waited for a consumer.
    pub consumer_stalls: u64,
    /// Total of those waits (ms).
    pub consumer_stall_ms: u64,
    /// Bytes on the bus not yet read by the slowest consumer.
    pub bus_fill_bytes: u64,
    /// Merge rate since the start.
    pub events_per_s: Option<u64>,
    /// Live: events dropped because their source seq was at or below the last one merged
    /// from their source (resent after a failover or a restart). Never on the bus.
    #[serde(default)]
    pub duplicates: u64,
    /// Live: source seqs skipped (a source's next merged event was not the last one + 1).
    /// Zero when every failover and restart resumed exactly.
    #[serde(default)]
    pub seq_gaps: u64,
}

/// A group's failover policy: how long its active member may miss heartbeats before a
/// standby is promoted. A closed connection or a gone pid promotes at once, whatever the
/// policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// Promotion within 2 s: heartbeats missed for 1 s.
    Aggressive,
    /// Promotion within 2 to 5 s: heartbeats missed for 3 s.
    #[default]
    Balanced,
    /// Promotion within 5 to 10 s: heartbeats missed for 7 s.
    Conservative,
}

named_enum!(Failover, "failover policy", {
    Aggressive => "aggressive",
    Balanced => "balanced",
    Conservative => "conservative",
});

impl Failover {
    /// How long the active member may stay silent (no heartbeat, no message) before it is
    /// fenced and a standby promoted. Client heartbeats go every
    /// [`HEARTBEAT_INTERVAL_MS`]: the bound is 4, 12 and 28 of them.
    pub fn bound(self) -> std::time::Duration {
        std::time::Duration::from_millis(match self {
            Failover::Aggressive => 1_000,
            Failover::Balanced => 3_000,
            Failover::Conservative => 7_000,
        })
    }
}

/// A group member's standing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupRole {
    /// Holds the lease: its frames are merged, its requests served.
    Active,
    /// Waits to be promoted (a standby consumer may read the bus).
    Standby,
    /// Lost the lease to a newer epoch: its frames and requests are refused (`not_active`).
    Fenced,
    /// Left: finished, died or released.
    Gone,
}

named_enum!(GroupRole, "group role", {
    Active => "active",
    Standby => "standby",
    Fenced => "fenced",
    Gone => "gone",
});

/// What the ACK of a REGISTER into a group says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The group.
    pub group: String,
    /// `active` or `standby`.
    pub role: GroupRole,
    /// The group's epoch now (the active member's).
    pub epoch: u64,
    /// The group's policy.
    pub failover: Failover,
}

/// A member of a group, in [`GroupInfo`] and [`Discovered`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Component name.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its standing.
    pub role: GroupRole,
    /// Its component state.
    pub state: ComponentState,
}

/// A group in [`Inspect`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// Name.
    pub name: String,
    /// Policy.
    pub failover: Failover,
    /// The source its producers publish (a producer group).
    pub source: Option<String>,
    /// Every member that registered, in registration order.
    pub members: Vec<GroupMember>,
    /// The active member's name.
    pub active: Option<String>,
    /// Incremented on every promotion (1 for the first lease).
    pub epoch: u64,
    /// Promotions after the first lease.
    pub failovers: u64,
    /// When the last failover happened (ms since the Unix epoch).
    pub last_failover_unix_ms: Option<u64>,
}

/// The answer to `DISCOVER`: the live members of a group (or of the group of a component,
/// or the component alone if it is in none) and the active one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// The session.
    pub session: String,
    /// The group, if any.
    pub group: Option<String>,
    /// The live members (not gone, not fenced).
    pub members: Vec<GroupMember>,
    /// The active member's name.
    pub active: Option<String>,
    /// The group's epoch (0 outside a group).
    pub epoch: u64,
}

/// The segments of a session in [`Inspect`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Segments {
    /// The bus.
    pub bus: std::path::PathBuf,
    /// The control segment.
    pub control: std::path::PathBuf,
    /// The source rings.
    pub sources: Vec<std::path::PathBuf>,
}

/// Parses one line (without its newline) into a request. Never panics.
///
/// The `cmd` field is read first: a name that is no [`Cmd`] is `unknown_cmd`; a known command
/// whose fields do not fit (a missing field, or an unknown value such as `"role":"admin"`) is
/// `bad_request`.
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    if line.len() >= MAX_LINE {
        return Err(Reply::error(
            ErrorCode::LineTooLong,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Reply::error(ErrorCode::MalformedJson, format!("malformed JSON: {e}")))?;
    let cmd = v.get("cmd").and_then(|c| c.as_str()).ok_or_else(|| {
        Reply::error(
            ErrorCode::MissingCmd,
            "every message needs a string \"cmd\"",
        )
    })?;
    if serde_json::from_value::<Cmd>(serde_json::Value::from(cmd)).is_err() {
        return Err(Reply::error(
            ErrorCode::UnknownCmd,
            format!("unknown cmd {cmd:?}"),
        ));
    }
    let cmd = cmd.to_string();
    serde_json::from_value(v)
        .map_err(|e| Reply::error(ErrorCode::BadRequest, format!("bad {cmd}: {e}")))
}

/// Encodes a message as one line, newline included.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("protocol messages serialise");
    v.push(b'\n');
    v
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream. A longer line
/// is consumed up to its newline and reported as [`LineError::TooLong`].
pub fn read_line(
    r: &mut impl std::io::BufRead,
    buf: &mut Vec<u8>,
) -> Result<Option<()>, LineError> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if chunk.is_empty() {
            return if buf.is_empty() && !too_long {
                Ok(None)
            } else {
                Err(LineError::Eof)
            };
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            if too_long {
                return Err(LineError::TooLong);
            }
            buf.pop();
            return Ok(Some(()));
        }
    }
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The stream ended in the middle of a line.
    #[error("connection closed in the middle of a line")]
    Eof,
    /// I/O error (including a read timeout).
    #[error("{0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request::Register(Register {
            component_name: "tap-1".into(),
            session_token: "00".repeat(16),
            role: Some(Role::Consumer),
            ..Register::default()
        });
        let line = encode(&r);
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), r);
        assert_eq!(
            parse_request(br#"{"cmd":"READY"}"#).unwrap(),
            Request::Ready
        );
    }

    #[test]
    fn bad_input_gets_specific_errors() {
        let code = |l: &[u8]| match parse_request(l) {
            Err(Reply::Error { code, .. }) => code.name(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code(b"{nope"), "malformed_json");
        assert_eq!(code(br#"{"cmd":"FLY"}"#), "unknown_cmd");
        assert_eq!(code(br#"{"x":1}"#), "missing_cmd");
        assert_eq!(code(br#"{"cmd":"REGISTER"}"#), "bad_request");
        assert_eq!(code(&vec![b' '; MAX_LINE]), "line_too_long");
    }

    /// Regression: a known command with an unknown enum value used to be `unknown_cmd`,
    /// because the parser matched serde's "unknown variant" text.
    #[test]
    fn bad_enum_value_of_a_known_cmd_is_bad_request() {
        for line in [
            &br#"{"cmd":"REGISTER","component_name":"x","session_token":"00","role":"admin"}"#[..],
            br#"{"cmd":"SESSION_CREATE","name":"s","mode":"paper"}"#,
            br#"{"cmd":"REGISTER","component_name":"x","session_token":"00","role":"producer","sources":[{"name":"s","kind":"candle","topic":"t"}]}"#,
        ] {
            match parse_request(line) {
                Err(Reply::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn names_match_serde() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
            assert_eq!(c.name().parse::<ErrorCode>().unwrap(), *c);
        }
        for m in Mode::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
        for k in SourceKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        for s in SessionState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for s in ComponentState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for r in Role::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        for s in SourceStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for f in Failover::ALL {
            assert_eq!(serde_json::to_value(f).unwrap(), f.name());
        }
        for g in GroupRole::ALL {
            assert_eq!(serde_json::to_value(g).unwrap(), g.name());
        }
    }

    #[test]
    fn failover_bounds_are_within_their_policies() {
        use std::time::Duration;
        assert!(Failover::Aggressive.bound() < Duration::from_secs(2));
        assert!(
            (Duration::from_secs(2)..=Duration::from_secs(5)).contains(&Failover::Balanced.bound())
        );
        assert!((Duration::from_secs(5)..=Duration::from_secs(10))
            .contains(&Failover::Conservative.bound()));
    }

    /// Every [`Cmd`] is the tag of a [`Request`], under its serde name (the other direction is
    /// `Request::cmd`).
    #[test]
    fn every_cmd_names_a_request() {
        for &cmd in Cmd::ALL {
            let name = cmd.name();
            assert_eq!(serde_json::to_value(cmd).unwrap(), name);
            match parse_request(format!(r#"{{"cmd":"{name}"}}"#).as_bytes()) {
                Ok(r) => assert_eq!(r.cmd(), cmd),
                Err(Reply::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("BTCUSDT-1m-2024-09-21"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn long_lines_are_consumed_and_refused() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.push(b'\n');
        input.extend_from_slice(b"{\"cmd\":\"READY\"}\n");
        let mut r = std::io::BufReader::new(&input[..]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut r, &mut buf),
            Err(LineError::TooLong)
        ));
        read_line(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(buf, b"{\"cmd\":\"READY\"}");
        assert!(read_line(&mut r, &mut buf).unwrap().is_none());
    }
}
