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
    /// `trade`, `book` or `kline`.
    pub kind: String,
    /// The topic it publishes, e.g. `klines.BTCUSDT.1m`.
    pub topic: String,
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
    /// Event kinds it requires (informational).
    #[serde(default)]
    pub requires: Vec<String>,
    /// Topics it wants (informational; filtering happens in the consumer).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Symbols it supports (informational).
    #[serde(default)]
    pub supported_symbols: Vec<String>,
    /// Timeframes it supports (informational).
    #[serde(default)]
    pub supported_timeframes: Vec<String>,
    /// The component's pid (liveness); the daemon also reads it from SO_PEERCRED.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// Settings of a new session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// Session name.
    pub name: String,
    /// `live` or `backtest`.
    pub mode: String,
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
        /// Machine-readable code.
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
}

/// A source in an ACK.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AckSource {
    /// Name.
    pub name: String,
    /// Segment path.
    pub path: String,
    /// Topic id to stamp on its frames.
    pub topic_id: u32,
    /// Kind.
    pub kind: String,
}

/// The ACK of a REGISTER.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Session UUID.
    pub session_id: String,
    /// Session name.
    pub session: String,
    /// `live` or `backtest`.
    pub mode: String,
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
    /// A refusal.
    #[serde(rename = "ERROR")]
    Error {
        /// Machine-readable code.
        code: String,
        /// Human-readable message.
        message: String,
    },
}

impl Reply {
    /// An ERROR reply.
    pub fn error(code: &str, message: impl Into<String>) -> Reply {
        Reply::Error {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// An ACK carrying CLI data.
    pub fn data(v: serde_json::Value) -> Reply {
        Reply::Ack {
            ack: None,
            data: Some(v),
        }
    }
}

/// Parses one line (without its newline) into a request. Never panics.
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    if line.len() >= MAX_LINE {
        return Err(Reply::error(
            "line_too_long",
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Reply::error("malformed_json", format!("malformed JSON: {e}")))?;
    let cmd = v
        .get("cmd")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Reply::error("missing_cmd", "every message needs a string \"cmd\""))?
        .to_string();
    serde_json::from_value(v).map_err(|e| {
        if e.to_string().contains("unknown variant") {
            Reply::error("unknown_cmd", format!("unknown cmd {cmd:?}"))
        } else {
            Reply::error("bad_request", format!("bad {cmd}: {e}"))
        }
    })
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
            Err(Reply::Error { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(b"{nope"), "malformed_json");
        assert_eq!(code(br#"{"cmd":"FLY"}"#), "unknown_cmd");
        assert_eq!(code(br#"{"x":1}"#), "missing_cmd");
        assert_eq!(code(br#"{"cmd":"REGISTER"}"#), "bad_request");
        assert_eq!(code(&vec![b' '; MAX_LINE]), "line_too_long");
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
