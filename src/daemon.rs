//! The daemon (`aegis-shmctl serve`): the control socket, one thread per connection, a
//! monitor thread for liveness, and a clean shutdown on SIGINT / SIGTERM.
//!
//! Every connection has read and write timeouts, so a slow or stuck client only ever costs
//! its own thread. A line may take at most [`protocol::MAX_LINE`] bytes; a client that leaves
//! half a line unfinished for [`PARTIAL_LINE_TIMEOUT`] is answered with ERROR and dropped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{self, Reply, Request};
use serde_json::json;

use crate::session::{self, CompState, Session, State};

/// How long half a line may stay unfinished.
pub const PARTIAL_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection that is not a component may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon answers on the socket.
    #[error("a daemon is already listening at {0}")]
    InUse(PathBuf),
    /// The socket directory is unsafe.
    #[error("{0}")]
    UnsafeDir(String),
    /// I/O.
    #[error("cannot listen at {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

struct Shared {
    sessions: Mutex<BTreeMap<String, Session>>,
    shutdown: AtomicBool,
    next_conn: AtomicU64,
    connections: AtomicUsize,
    uid: u32,
}

/// A running daemon (in this process).
pub struct Daemon {
    shared: Arc<Shared>,
    listener: UnixListener,
    socket: PathBuf,
}

impl Daemon {
    /// Binds the socket: creates its directory 0700 if needed, refuses if another daemon
    /// answers, replaces a stale socket file, and sets the socket to 0600.
    pub fn bind(socket: &Path) -> Result<Daemon, ServeError> {
        let io = |source| ServeError::Io {
            path: socket.to_path_buf(),
            source,
        };
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io)?;
            }
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(dir).map_err(io)?;
            if meta.uid() != nix::unistd::getuid().as_raw() {
                return Err(ServeError::UnsafeDir(format!(
                    "socket directory {} belongs to another user",
                    dir.display()
                )));
            }
            if meta.mode() & 0o077 != 0 && dir.starts_with("/tmp/aegis") {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
            }
        }
        if socket.exists() {
            if UnixStream::connect(socket).is_ok() {
                return Err(ServeError::InUse(socket.to_path_buf()));
            }
            std::fs::remove_file(socket).map_err(io)?;
        }
        let listener = UnixListener::bind(socket).map_err(io)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        Ok(Daemon {
            shared: Arc::new(Shared {
                sessions: Mutex::new(BTreeMap::new()),
                shutdown: AtomicBool::new(false),
                next_conn: AtomicU64::new(1),
                connections: AtomicUsize::new(0),
                uid: nix::unistd::getuid().as_raw(),
            }),
            listener,
            socket: socket.to_path_buf(),
        })
    }

    /// Installs SIGINT / SIGTERM handlers that make [`Daemon::run`] return.
    pub fn handle_signals() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { sigaction(sig, &action) }.expect("install a signal handler");
        }
        // A client that disconnects mid-write must not kill the daemon.
        // SAFETY: ignoring SIGPIPE is always sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    }

    /// Serves until a signal (or [`Daemon::stop_flag`]), then stops every session, removes
    /// every segment and the socket.
    pub fn run(self) {
        let monitor = {
            let shared = self.shared.clone();
            std::thread::spawn(move || monitor_loop(&shared))
        };
        while !self.shared.shutdown.load(Ordering::Relaxed) && !SIGNALLED.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => self.accept(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    eprintln!("aegis: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        self.shared.shutdown.store(true, Ordering::Relaxed);
        let _ = monitor.join();
        let sessions = std::mem::take(
            &mut *self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (_, mut s) in sessions {
            s.stop(State::Stopped, "the daemon is shutting down");
            s.shutdown();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// A flag that makes `run` return (for in-process use and tests).
    pub fn stop_handle(&self) -> Arc<dyn Fn() + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || shared.shutdown.store(true, Ordering::Relaxed))
    }

    fn accept(&self, stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
        let (uid, pid) = match cred {
            Ok(c) => (c.uid(), c.pid() as u32),
            Err(_) => (u32::MAX, 0),
        };
        if let Err(msg) = check_peer(uid, self.shared.uid) {
            refuse(stream, "permission_denied", &msg);
            return;
        }
        if self.shared.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            refuse(stream, "busy", "too many connections");
            return;
        }
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("aegis-conn-{conn}"))
            .spawn(move || {
                serve_connection(&shared, stream, conn, pid);
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The peer check: the daemon's own uid, or root.
pub fn check_peer(peer_uid: u32, daemon_uid: u32) -> Result<(), String> {
    if peer_uid == daemon_uid || peer_uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "peer uid {peer_uid} is neither the daemon's uid ({daemon_uid}) nor root"
        ))
    }
}

fn refuse(mut stream: UnixStream, code: &str, msg: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&protocol::encode(&Reply::error(code, msg)));
}

fn monitor_loop(shared: &Shared) {
    while !shared.shutdown.load(Ordering::Relaxed) && !SIGNALLED.load(Ordering::Relaxed) {
        {
            let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            for s in sessions.values_mut() {
                s.tick();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a connection has become.
enum Peer {
    /// Not registered (CLI, or not yet).
    Anonymous,
    /// A component of session `.0`.
    Component(String),
}

fn serve_connection(shared: &Shared, stream: UnixStream, conn: u64, pid: u32) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return,
    };
    let mut reader = stream;
    let mut peer = Peer::Anonymous;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let mut partial_since: Option<Instant> = None;
    let mut last_activity = Instant::now();
    let mut discarding = false;
    'conn: loop {
        if shared.shutdown.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed) {
            break;
        }
        // Answer every complete line in the buffer.
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            partial_since = None;
            if discarding {
                discarding = false;
                continue;
            }
            let reply = handle_line(
                shared,
                &line[..line.len() - 1],
                conn,
                pid,
                &writer,
                &mut peer,
            );
            if let Some(r) = reply {
                session::send(&writer, &r);
            }
        }
        if buf.len() >= protocol::MAX_LINE {
            session::send(
                &writer,
                &Reply::error(
                    "line_too_long",
                    format!("line longer than {} bytes", protocol::MAX_LINE),
                ),
            );
            buf.clear();
            discarding = true;
        }
        if !buf.is_empty() && partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        if let Some(t) = partial_since {
            if t.elapsed() > PARTIAL_LINE_TIMEOUT {
                session::send(
                    &writer,
                    &Reply::error("timeout", "incomplete line: no newline within 5 s"),
                );
                break 'conn;
            }
        }
        if matches!(peer, Peer::Anonymous) && last_activity.elapsed() > IDLE_TIMEOUT {
            break;
        }
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                last_activity = Instant::now();
                if discarding {
                    if let Some(nl) = chunk[..n].iter().position(|&b| b == b'\n') {
                        discarding = false;
                        // The over-long line is over, and so is its partial-line clock. It
                        // used to keep running: an idle connection was dropped with
                        // "incomplete line" 5 s after an over-long line it had been told about.
                        partial_since = None;
                        buf.extend_from_slice(&chunk[nl + 1..n]);
                    }
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    if let Peer::Component(name) = peer {
        let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get_mut(&name) {
            if let Some(c) = s.component_mut(conn) {
                c.connected = false;
            }
            s.tick();
        }
    }
}

fn handle_line(
    shared: &Shared,
    line: &[u8],
    conn: u64,
    pid: u32,
    writer: &Arc<Mutex<UnixStream>>,
    peer: &mut Peer,
) -> Option<Reply> {
    let req = match protocol::parse_request(line) {
        Ok(r) => r,
        Err(e) => return Some(e),
    };
    let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
    // Component messages.
    if let Peer::Component(name) = &*peer {
        let Some(s) = sessions.get_mut(name) else {
            return Some(Reply::error(
                "session_gone",
                format!("session {name} no longer exists"),
            ));
        };
        if let Some(c) = s.component_mut(conn) {
            c.last_seen = Instant::now();
        }
        return match req {
            Request::Heartbeat => Some(Reply::Heartbeat),
            Request::Ready => {
                let c = s.component_mut(conn)?;
                if c.state == CompState::Registered {
                    c.state = CompState::Ready;
                }
                if matches!(s.state, State::Running | State::Draining) {
                    return Some(s.started_reply());
                }
                if s.expect_met() {
                    if let Err((code, msg)) = s.start() {
                        return Some(Reply::error(code, msg));
                    }
                    return None; // STARTED went to everyone, us included
                }
                Some(Reply::Wait {
                    reason: match s.spec.expect {
                        Some(n) => format!(
                            "waiting for {} READY components ({} so far)",
                            n,
                            s.ready_count()
                        ),
                        None => format!("waiting for `aegis-shmctl session start {}`", s.name),
                    },
                })
            }
            Request::Finished => {
                if let Some(c) = s.component_mut(conn) {
                    c.state = CompState::Finished;
                }
                s.tick();
                Some(Reply::Ack {
                    ack: None,
                    data: None,
                })
            }
            Request::Error { code, message } => {
                s.component_error(conn, format!("{code}: {message}"));
                Some(Reply::Ack {
                    ack: None,
                    data: None,
                })
            }
            Request::Ack | Request::Wait { .. } => None,
            Request::Register(_) => Some(Reply::error(
                "already_registered",
                "this connection is already registered",
            )),
            _ => Some(Reply::error(
                "bad_request",
                "session commands come from a separate connection",
            )),
        };
    }
    match req {
        Request::Register(reg) => {
            // Compare against every session so timing says nothing about which matched.
            let mut found = None;
            for (name, s) in sessions.iter() {
                if s.token_matches(&reg.session_token) {
                    found = Some(name.clone());
                }
            }
            let Some(name) = found else {
                return Some(Reply::error("bad_token", "unknown session token"));
            };
            let s = sessions.get_mut(&name).expect("found");
            let real_pid = if pid != 0 { pid } else { reg.pid.unwrap_or(0) };
            match s.register(&reg, real_pid, conn, writer.clone()) {
                Ok(ack) => {
                    *peer = Peer::Component(name);
                    Some(Reply::Ack {
                        ack: Some(Box::new(ack)),
                        data: None,
                    })
                }
                Err((code, msg)) => Some(Reply::error(code, msg)),
            }
        }
        Request::SessionCreate(spec) => {
            if sessions.contains_key(&spec.name) {
                return Some(Reply::error(
                    "exists",
                    format!("session {} already exists", spec.name),
                ));
            }
            match Session::create(spec) {
                Ok(s) => {
                    let data = json!({"name": s.name, "id": s.id, "mode": s.mode_name(), "token": s.token_hex(), "state": s.state.name()});
                    sessions.insert(s.name.clone(), s);
                    Some(Reply::data(data))
                }
                Err((code, msg)) => Some(Reply::error(code, msg)),
            }
        }
        Request::SessionStart { name, timeout_ms } => {
            drop(sessions);
            Some(start_session(
                shared,
                &name,
                Duration::from_millis(timeout_ms.unwrap_or(10_000).min(600_000)),
            ))
        }
        Request::SessionList => Some(Reply::data(json!(sessions
            .values()
            .map(|s| s.list_entry())
            .collect::<Vec<_>>()))),
        Request::SessionInspect { name } => Some(match sessions.get_mut(&name) {
            Some(s) => {
                s.tick();
                Reply::data(s.inspect())
            }
            None => no_session(&name),
        }),
        Request::SessionStop { name } => Some(match sessions.get_mut(&name) {
            Some(s) => {
                s.stop(State::Stopped, "stopped by `aegis-shmctl session stop`");
                Reply::data(json!({"name": name, "state": s.state.name()}))
            }
            None => no_session(&name),
        }),
        Request::SessionDestroy { name } => Some(match sessions.remove(&name) {
            Some(mut s) => {
                s.stop(State::Stopped, "session destroyed");
                drop(sessions);
                s.shutdown();
                drop(s);
                Reply::data(json!({"name": name, "destroyed": true}))
            }
            None => no_session(&name),
        }),
        Request::Ready
        | Request::Finished
        | Request::Heartbeat
        | Request::Ack
        | Request::Wait { .. }
        | Request::Error { .. } => Some(Reply::error("not_registered", "REGISTER first")),
    }
}

fn no_session(name: &str) -> Reply {
    Reply::error("no_session", format!("no session named {name:?}"))
}

/// The trigger: start once every registered component is READY, waiting up to `timeout`.
fn start_session(shared: &Shared, name: &str, timeout: Duration) -> Reply {
    let end = Instant::now() + timeout;
    loop {
        {
            let mut sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = sessions.get_mut(name) else {
                return no_session(name);
            };
            if s.state != State::Created {
                return Reply::error(
                    "session_started",
                    format!("session {name} is already {}", s.state.name()),
                );
            }
            let missing = s.not_ready();
            if missing.is_empty() && !s.components.is_empty() {
                return match s.start() {
                    Ok(()) => Reply::data(
                        json!({"name": name, "state": s.state.name(), "components": s.components.len()}),
                    ),
                    Err((code, msg)) => Reply::error(code, msg),
                };
            }
            if Instant::now() >= end {
                let what = if s.components.is_empty() {
                    "no component has registered".to_string()
                } else {
                    format!("not READY: {}", missing.join(", "))
                };
                return Reply::error(
                    "not_ready",
                    format!(
                        "session {name} did not start within {} ms: {what}",
                        timeout.as_millis()
                    ),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
