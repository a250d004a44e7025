//! The one control-plane request the bridge makes besides registering: `SESSION_INSPECT`, for
//! the kind and topic of every source of the exported session (the manifest). A consumer's ACK
//! names the sources by rank but not their kinds and topics.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use aegis_shm_client::protocol::{self, Inspect, Reply, Request};

/// Deadline of the request, each way.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the daemon at `socket` (see [`protocol::socket_path`]) to inspect session `name`.
/// Fails with the daemon's ERROR, or after a 10 s deadline.
pub fn inspect(socket: Option<&Path>, name: &str) -> Result<Inspect, String> {
    let path = protocol::socket_path(socket);
    let mut s = UnixStream::connect(&path)
        .map_err(|e| format!("cannot connect to the daemon at {}: {e}", path.display()))?;
    let io = |e: std::io::Error| format!("control socket {}: {e}", path.display());
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    s.write_all(&protocol::encode(&Request::SessionInspect {
        name: name.to_string(),
    }))
    .map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    match protocol::read_line(&mut r, &mut line) {
        Ok(Some(())) => {}
        Ok(None) => return Err("the daemon closed the connection without answering".into()),
        Err(e) => {
            return Err(format!(
                "no answer to SESSION_INSPECT within {TIMEOUT:?}: {e}"
            ))
        }
    }
    match serde_json::from_slice::<Reply>(&line) {
        Ok(Reply::Ack {
            data: Some(data), ..
        }) => serde_json::from_value(data).map_err(|e| format!("unexpected inspect answer: {e}")),
        Ok(Reply::Error { code, message }) => Err(format!(
            "the daemon refused SESSION_INSPECT ({code}): {message}"
        )),
        Ok(other) => Err(format!("unexpected answer to SESSION_INSPECT: {other:?}")),
        Err(e) => Err(format!("bad answer to SESSION_INSPECT: {e}")),
    }
}
