//! `aegis-shmctl call SESSION TARGET TYPE [JSON] [--timeout-ms N]`: one request to a
//! component from the command line. Prints the answer (JSON) and exits 0, or prints the error
//! and exits non-zero.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{self, Reply, Request};
use aegis_shm_client::request::{Call, RequestError, MAX_TIMEOUT_MS, REPLY_GRACE};

use super::CliError;
use crate::cli::CallArgs;

/// How long the request may take to reach the daemon.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past the deadline we wait for the daemon's own `timeout` before giving up on it.
const DAEMON_SLACK: Duration = Duration::from_secs(2);

/// Runs the call. `Ok(false)`: the request failed (the error is printed).
pub fn run(socket: &Path, json: bool, a: &CallArgs) -> Result<bool, CliError> {
    if !(1..=MAX_TIMEOUT_MS).contains(&a.timeout_ms) {
        return Err(CliError(format!(
            "--timeout-ms must be 1 to {MAX_TIMEOUT_MS}, got {}",
            a.timeout_ms
        )));
    }
    let payload = match &a.payload {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| CliError(format!("the payload is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let call = Call {
        id: 1,
        session: Some(a.session.clone()),
        target: a.target.clone(),
        request_type: a.request_type.clone(),
        payload,
        timeout_ms: a.timeout_ms,
    };
    let timeout = Duration::from_millis(a.timeout_ms);
    match exchange(socket, call, timeout)? {
        Ok(answer) => {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(true)
        }
        Err(e) => {
            if json {
                let code = e.code().map_or("disconnected", |c| c.name());
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": code, "message": e.to_string()}})
                );
            }
            eprintln!("aegis-shmctl: call {} {}: {e}", a.target, a.request_type);
            Ok(false)
        }
    }
}

/// Sends the request and reads until its `REPLY` (or the daemon's refusal). The outer
/// `Result` is a failure to talk to the daemon at all.
fn exchange(
    socket: &Path,
    call: Call,
    timeout: Duration,
) -> Result<Result<serde_json::Value, RequestError>, CliError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CliError(format!(
            "no daemon at {} — start one with `aegis-shmctl serve`",
            socket.display()
        )),
        _ => CliError(format!("cannot connect to {}: {e}", socket.display())),
    })?;
    let id = call.id;
    let end = Instant::now() + timeout + REPLY_GRACE + DAEMON_SLACK;
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    stream.write_all(&protocol::encode(&Request::Call(call)))?;
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Err(RequestError::Timeout(format!(
                "the daemon sent no answer within {timeout:?} (+ {DAEMON_SLACK:?})"
            ))));
        }
        r.get_ref().set_read_timeout(Some(left))?;
        match protocol::read_line(&mut r, &mut line) {
            Ok(Some(())) => {}
            Ok(None) => return Ok(Err(RequestError::Disconnected)),
            Err(protocol::LineError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(CliError(e.to_string())),
        }
        match serde_json::from_slice::<Reply>(&line)? {
            Reply::Answer(a) if a.id == id => return Ok(a.into_result()),
            Reply::Error { code, message } => {
                return Ok(Err(RequestError::from_wire(code, message)))
            }
            _ => {}
        }
    }
}
