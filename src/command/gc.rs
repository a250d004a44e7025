//! `aegis-shmctl gc`: removes segments whose daemon or session is gone, and a stale socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aegis::session::pid_alive;
use aegis_shm_client::protocol::{Request, SessionInfo};
use aegis_shm_client::segment::{read_header_of, SEGMENT_MAGIC, SHM_DIR};
use serde::Serialize;

use super::CliError;

/// How long gc waits for the daemon's session list.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// A segment without a valid header younger than this may still be being created: kept.
const YOUNG_SEGMENT: Duration = Duration::from_secs(10);

/// What `gc` found (its `--json` output).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Segments removed, with the reason.
    pub removed: Vec<Removed>,
    /// Segments kept (their daemon and session are alive).
    pub kept: Vec<PathBuf>,
    /// Whether a stale socket was removed.
    pub socket_removed: bool,
}

/// A segment `gc` removed.
#[derive(Debug, Serialize)]
pub struct Removed {
    /// Its path.
    pub path: PathBuf,
    /// Why it was removed.
    pub reason: String,
}

/// The creator pid of a segment, if its header is readable and valid.
fn creator_pid(path: &Path) -> Option<u32> {
    let h = read_header_of(path).ok()?;
    (h.magic == SEGMENT_MAGIC).then_some(h.creator_pid)
}

/// Cleans up. `socket`: the daemon to ask which sessions still exist.
pub fn collect(socket: &Path) -> Result<Report, CliError> {
    let mut report = Report::default();
    let live_sids: Option<Vec<String>> =
        match super::request::<Vec<SessionInfo>>(socket, &Request::SessionList, LIST_TIMEOUT) {
            Ok(v) => Some(v.into_iter().map(|s| s.sid).collect()),
            Err(_) => {
                if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_err() {
                    std::fs::remove_file(socket)?;
                    report.socket_removed = true;
                }
                None
            }
        };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(SHM_DIR)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("aegis-") else {
            continue;
        };
        let sid = rest.split('-').next().unwrap_or("").to_string();
        segments.push((entry, sid));
    }
    // First the segments with a valid header: their creator or their session decides.
    let mut dead_sids = std::collections::BTreeSet::new();
    let mut verdicts = Vec::new();
    for (entry, sid) in &segments {
        let path = entry.path();
        let reason = creator_pid(&path).map(|pid| {
            if !pid_alive(pid) {
                Some(format!("its creator (pid {pid}) is gone"))
            } else {
                match &live_sids {
                    Some(sids)
                        if !sids.iter().any(|s| s == sid) && creator_is_daemon(&path, socket) =>
                    {
                        Some("its session no longer exists".to_string())
                    }
                    _ => None,
                }
            }
        });
        if let Some(Some(_)) = &reason {
            dead_sids.insert(sid.clone());
        }
        verdicts.push(reason);
    }
    for ((entry, sid), verdict) in segments.iter().zip(verdicts) {
        let reason = match verdict {
            Some(reason) => reason,
            // No valid header (being created, or truncated by someone): it goes with its
            // session's other segments, or once it is old enough not to be in creation.
            None if dead_sids.contains(sid) => {
                Some("no valid header, and the rest of its session is gone".to_string())
            }
            None => {
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                age.is_some_and(|a| a > YOUNG_SEGMENT)
                    .then(|| "no valid header".to_string())
            }
        };
        let path = entry.path();
        match reason {
            Some(reason) => {
                std::fs::remove_file(&path)?;
                report.removed.push(Removed { path, reason });
            }
            None => report.kept.push(path),
        }
    }
    Ok(report)
}

/// Whether the segment was created by the daemon answering on `socket` (compares the
/// socket's peer pid with the segment's creator).
fn creator_is_daemon(path: &Path, socket: &Path) -> bool {
    let Some(pid) = creator_pid(path) else {
        return false;
    };
    let Ok(s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid() as u32 == pid)
        .unwrap_or(false)
}

/// `aegis-shmctl gc`.
pub fn run(socket: &Path, json_out: bool) -> Result<(), CliError> {
    let r = collect(socket)?;
    if json_out {
        super::print_json(&r);
    } else {
        for Removed { path, reason } in &r.removed {
            println!("removed {} ({reason})", path.display());
        }
        if r.socket_removed {
            println!("removed stale socket {}", socket.display());
        }
        println!("{} removed, {} kept", r.removed.len(), r.kept.len());
    }
    Ok(())
}
