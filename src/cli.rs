//! The command line of `aegis-shmctl` (clap definitions only; see `command/`).

use std::path::PathBuf;

use aegis_shm_client::protocol::Mode;
use clap::{Args, Parser, Subcommand};

/// Aegis: one deterministic, time-ordered market-data stream over shared memory.
#[derive(Parser, Debug)]
#[command(name = "aegis-shmctl", version, about)]
pub struct Cli {
    /// Control socket (default: $AEGIS_SOCKET, else /tmp/aegis/aegis-components.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (SIGINT/SIGTERM: clean shutdown, segments removed).
    Serve {
        /// Where the desired subscription sets are kept (default: SOCKET.state beside the
        /// socket).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Manage sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Remove /dev/shm/aegis-* segments whose daemon or session is gone, and a stale socket.
    Gc,
    /// The embedded demo: a backtest of bundled data with two consumers.
    Demo(DemoArgs),
    /// The cross-process comparison table (latency and throughput against baselines).
    Bench(BenchArgs),
    /// A live view of the sessions, sources, consumers and sequencer, refreshed every second
    /// (`q` quits); `--once` prints one snapshot (with `--json` for scripts).
    Top(TopArgs),
    /// Set a component's desired topics (a consumer) or symbols (a producer that accepts a
    /// symbol set). Persisted by the daemon and pushed to the component at once; the
    /// component's reconciliation enforces it from then on.
    Subscribe(SubscribeArgs),
    /// Desired vs actual subscription sets of a session's components, drift, last
    /// reconciliation and errors.
    Subscriptions {
        /// Session name.
        session: String,
    },
    /// Send one request to a component of a session and print its answer (exit 0), or the
    /// error: no_target, not_active, handler_error, timeout, busy (exit 1).
    Call(CallArgs),
    /// Recordings made with `--record`.
    #[command(subcommand)]
    Record(RecordCommand),
    /// Seeded fault injection into a running session: kill -9 and SIGSTOP/SIGCONT of its
    /// group members, kill -9 of components `session run` restarts (pids the daemon knows),
    /// then the invariants checked (counts, duplicates, gaps, restarts). Exits non-zero if
    /// one fails.
    Chaos(ChaosArgs),
    /// The live members of a group (or of a component's group) and which one is active.
    /// Exits non-zero for an unknown session, group or component.
    Discover(DiscoverArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `aegis-shmctl call`.
#[derive(Args, Debug, Clone)]
pub struct CallArgs {
    /// Session name.
    pub session: String,
    /// The component to ask.
    pub target: String,
    /// The request type, e.g. `stats` (aegis-tap answers it).
    #[arg(value_name = "TYPE")]
    pub request_type: String,
    /// The payload: any JSON value (default null).
    #[arg(value_name = "JSON")]
    pub payload: Option<String>,
    /// The deadline, in milliseconds (1 to 600000).
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Settings of a new session.
#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Session name ([A-Za-z0-9._-]{1,64}).
    pub name: String,
    /// live or backtest.
    #[arg(long)]
    pub mode: Mode,
    /// Start automatically once N components are READY.
    #[arg(long)]
    pub expect: Option<u32>,
    /// Pin the sequencer to this core.
    #[arg(long)]
    pub sequencer_core: Option<usize>,
    /// Bus size in bytes (power of two).
    #[arg(long)]
    pub bus_bytes: Option<usize>,
    /// Source ring size in bytes (power of two).
    #[arg(long)]
    pub source_bytes: Option<usize>,
    /// Live: how long an idle source may hold the merge back (µs, default 1000).
    #[arg(long)]
    pub max_lateness_us: Option<u64>,
    /// How often each component compares its subscription with the desired set and repairs
    /// it, in seconds (default 30).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub reconcile_s: Option<u64>,
    /// Record the session's bus into DIR (created; must hold no recording yet).
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Roll recording segments at this size (bytes, a multiple of 4096; default 256 MiB).
    #[arg(long, value_name = "BYTES", requires = "record")]
    pub record_segment_bytes: Option<u64>,
}

/// `subscribe`.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("set").required(true).args(["topics", "symbols"])))]
pub struct SubscribeArgs {
    /// Session name.
    pub session: String,
    /// Component name (it need not be registered yet: it gets the set when it registers).
    pub component: String,
    /// The topics to deliver, comma-separated (trades.BTCUSDT,klines.BTCUSDT.1m).
    #[arg(long, value_name = "T,...")]
    pub topics: Option<String>,
    /// The symbols to produce, comma-separated (BTCUSDT,ETHUSDT).
    #[arg(long, value_name = "S,...")]
    pub symbols: Option<String>,
}

/// `record` subcommands.
#[derive(Subcommand, Debug)]
pub enum RecordCommand {
    /// Read a whole recording and report its frames, bus-seq range, gaps and torn tail;
    /// exits non-zero if it is unreadable (bad or future manifest, corrupt segment).
    Verify {
        /// The recording's directory.
        dir: PathBuf,
    },
}

/// `session` subcommands.
#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Create a session; prints its token.
    Create(CreateArgs),
    /// Create a session, run the components, start when all are READY, wait, summarise.
    Run(RunArgs),
    /// The trigger: start once every registered component is READY.
    Start {
        /// Session name.
        name: String,
        /// How long to wait for missing READYs, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// List sessions.
    List,
    /// Show a session's components, sources, consumers and counters.
    Inspect {
        /// Session name.
        name: String,
    },
    /// Stop a session.
    Stop {
        /// Session name.
        name: String,
    },
    /// Stop a session and remove its segments.
    Destroy {
        /// Session name.
        name: String,
    },
    /// Evict a component on purpose: it is marked dead and told so (ERROR evicted).
    ///
    /// A consumer's bus slot is released, so it no longer holds the bus back; its next read
    /// fails saying it was evicted. A producer is treated as dead: a backtest fails with the
    /// reason, a live session removes its sources from the merge. Use it for a consumer that
    /// is `stalled` (paused) in a backtest, which the session would otherwise wait for.
    Evict {
        /// Session name.
        name: String,
        /// Component name (as in `session inspect`).
        component: String,
    },
}

/// `session run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Session settings.
    #[command(flatten)]
    pub create: CreateArgs,
    /// A component to start (run with `sh -c`); repeat for each.
    #[arg(short = 'c', long = "command", required = true)]
    pub commands: Vec<String>,
    /// Give up (and kill the components) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Keep the session (and its segments) after the run, for `inspect`.
    #[arg(long)]
    pub keep: bool,
    /// Live: restart a component that dies by a signal (kill -9, a crash), with the same
    /// command line and environment, at most N times per command. A restarted producer
    /// resumes its source where the merge left it. The summary counts the restarts; the
    /// run's verdict is the last start's exit. `inspect` marks such components
    /// `restartable`, and `chaos --restart` picks among them.
    #[arg(long, value_name = "N")]
    pub restart_killed: Option<u32>,
}

/// `demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Generated trade and book events (besides the bundled klines).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Consumers to run (at least 2).
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
}

/// `top`.
#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Show this session in detail (default: the first one listed; Up/Down choose).
    pub session: Option<String>,
    /// Print one snapshot and exit, without a terminal (text tables, or JSON with `--json`).
    /// The rates come from two samples one `--interval` apart.
    #[arg(long)]
    pub once: bool,
    /// Refresh period in milliseconds (the rates are per second whatever it is).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval: u64,
}

/// `chaos`.
#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// The session (running).
    pub session: String,
    /// Seed of the schedule (default: from the clock; printed, to repeat a run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long to inject faults, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// kill -9 group members that have a live standby.
    #[arg(long)]
    pub kill: bool,
    /// SIGSTOP group members for this many milliseconds, then SIGCONT.
    #[arg(long, value_name = "MS")]
    pub pause: Option<u64>,
    /// Only these components or groups (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Mean time between two faults, in milliseconds (each delay is 0.5x to 1.5x of it).
    #[arg(long, default_value_t = 1000)]
    pub every_ms: u64,
    /// After the faults, wait for the session to end before checking the invariants.
    #[arg(long)]
    pub wait_finished: bool,
    /// With --wait-finished: give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// kill -9 components that `session run --restart-killed` will restart (`restartable`
    /// in `inspect`), then wait for the restarted start to register and report the time.
    #[arg(long)]
    pub restart: bool,
    /// With --restart: how long to wait for a killed component's restart to register, in
    /// seconds.
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub restart_timeout: u64,
}

/// `discover`.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["group", "component"])))]
pub struct DiscoverArgs {
    /// The session.
    pub session: String,
    /// A group: its live members and the active one.
    #[arg(long)]
    pub group: Option<String>,
    /// A component: the live members of its group (or the component alone if it is in
    /// none).
    #[arg(long)]
    pub component: Option<String>,
}

/// `bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Events for the throughput rows.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Samples for the latency rows.
    #[arg(long, default_value_t = 100_000)]
    pub samples: u64,
    /// Events of each live real-path session (one per consumer wait strategy); 0 skips them.
    #[arg(long, default_value_t = 2_000)]
    pub live_events: u64,
    /// Pace of the live real-path feed, events per second.
    #[arg(long, default_value_t = 1_000)]
    pub live_rate: u64,
    /// Runs of the real path and of the in-process merge, alternated; each of the two rows
    /// is its median run (runs of one build spread by about ±10 % on a shared machine).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=99))]
    pub rounds: u64,
    /// Also draw the latency rows' distributions (p50 to max, log scales) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}
