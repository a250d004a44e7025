//! The command line of `aegis-nats` (clap definitions only; each verb lives in `command/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Bridge an Aegis session to NATS JetStream and back.
#[derive(Parser, Debug)]
#[command(name = "aegis-nats", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Publish a local session's bus to a JetStream stream (a consumer of the session).
    Export(Export),
    /// Write a JetStream stream into a session on this host (a producer of the session).
    Import(Import),
}

/// What both verbs share.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// NATS server URL, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    pub url: String,
    /// JetStream stream name ([A-Za-z0-9_-]{1,64}); its subjects are aegis.<stream>.>.
    #[arg(long)]
    pub stream: String,
    /// Control socket (default: $AEGIS_SOCKET, else /tmp/aegis/aegis-components.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Component name in the session.
    #[arg(long)]
    pub name: Option<String>,
    /// How long the bridge keeps retrying a lost NATS connection (with backoff) before it
    /// gives up, in seconds.
    #[arg(long, default_value_t = 60)]
    pub retry_for: u64,
    /// How long to wait for the session to start, in seconds.
    #[arg(long, default_value_t = 300)]
    pub start_timeout: u64,
    /// Print the summary as one JSON line on stderr.
    #[arg(long)]
    pub json: bool,
}

/// `aegis-nats export`.
#[derive(Args, Debug, Clone)]
pub struct Export {
    /// URL, stream, socket, name, retries.
    #[command(flatten)]
    pub common: Common,
    /// Only these topics (comma-separated); the bus seqs left out are accounted for in the
    /// Aegis-From header, so the importer still checks contiguity.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Publishes awaiting their JetStream ack at most (pipelined).
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Give up when the bus is silent for this long, in seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub idle_timeout: u64,
}

/// `aegis-nats import`.
#[derive(Args, Debug, Clone)]
pub struct Import {
    /// URL, stream, socket, name, retries.
    #[command(flatten)]
    pub common: Common,
    /// Start at this bus seq of the exported session (frames before it are read, checked and
    /// skipped).
    #[arg(long, default_value_t = 0)]
    pub from_seq: u64,
    /// Wait for new messages for as long as it takes (a live bridge); without it, the import
    /// fails when nothing arrives for --idle-timeout seconds before END-OF-STREAM.
    #[arg(long)]
    pub follow: bool,
    /// Without --follow: how long the stream may stay silent before END-OF-STREAM, seconds.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Frames held in memory for sources whose ring is full while the remote merge waits for
    /// another source (backtest), in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub lookahead_bytes: usize,
    /// Keep the exporting host's publish stamps (monotonic clock) in the frames, so the
    /// remote consumers' latency figures span the whole path. Only meaningful when both
    /// sessions run on one host (a loopback measurement).
    #[arg(long)]
    pub keep_stamps: bool,
}
