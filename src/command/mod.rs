//! One module per `aegis-shmctl` verb, and what they share: talking to the daemon.

pub mod bench;
pub mod bench_live;
pub mod call;
pub mod chaos;
pub mod completions;
pub mod demo;
pub mod discover;
pub mod gc;
pub mod plot;
pub mod private_daemon;
pub mod record;
pub mod serve;
pub mod session;
pub mod subscribe;
pub mod table;
pub mod top;

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aegis_shm_client::protocol::{self, Reply, Request};
use serde::de::DeserializeOwned;

/// How long a request may take to reach the daemon.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A command's failure: the message printed after `aegis-shmctl: error:`.
#[derive(Debug)]
pub struct CliError(pub String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> CliError {
        CliError(e.to_string())
    }
}

/// Sends one request to the daemon and returns the `data` of its ACK, decoded as the
/// request's answer type `T` (see `aegis_shm_client::protocol`). Every step has a deadline
/// (`timeout` for the reply).
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, CliError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CliError(format!(
            "no daemon at {} — start one with `aegis-shmctl serve`",
            socket.display()
        )),
        _ => CliError(format!("cannot connect to {}: {e}", socket.display())),
    })?;
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&protocol::encode(req))?;
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    match protocol::read_line(&mut r, &mut line) {
        Ok(Some(())) => {}
        Ok(None) => {
            return Err(CliError(
                "the daemon closed the connection without answering".into(),
            ))
        }
        Err(protocol::LineError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(CliError(format!(
                "the daemon did not answer within {timeout:?}"
            )))
        }
        Err(e) => return Err(CliError(e.to_string())),
    }
    match serde_json::from_slice::<Reply>(&line)? {
        Reply::Ack { data, .. } => {
            let data = data.unwrap_or(serde_json::Value::Null);
            serde_json::from_value(data)
                .map_err(|e| CliError(format!("unexpected answer from the daemon: {e}")))
        }
        Reply::Error { code, message } => Err(CliError(format!("{message} ({code})"))),
        other => Err(CliError(format!(
            "unexpected answer from the daemon: {other:?}"
        ))),
    }
}

/// The socket path from `--socket`, `$AEGIS_SOCKET` or the default.
pub fn socket(explicit: &Option<PathBuf>) -> PathBuf {
    protocol::socket_path(explicit.as_deref())
}

/// Prints `v` as pretty JSON, with the keys of every object in sorted order.
pub fn print_json(v: &impl serde::Serialize) {
    let v = serde_json::to_value(v).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}
