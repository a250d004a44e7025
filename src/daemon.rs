//! The daemon (`aegis-shmctl serve`): the control socket, one thread per connection, a
//! monitor thread for liveness, and a clean shutdown on SIGINT / SIGTERM.
//!
//! Every connection has a reader thread (this module) and a writer thread (an [`Outbox`]), so
//! a slow or stuck client only ever costs its own threads. Request handlers (the `dispatch`
//! module) decide under a session's lock and only queue what they send. A line may take at
//! most [`protocol::MAX_LINE`] bytes; a client that leaves half a line unfinished for
//! [`PARTIAL_LINE_TIMEOUT`] is answered with ERROR and dropped.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{self, ErrorCode, Reply};

use crate::dispatch::{self, Peer};
use crate::outbox::Outbox;
use crate::registry::Registry;
use crate::session::State;

/// How long half a line may stay unfinished.
pub const PARTIAL_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection that is not a component may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Read timeout of a connection: how often its thread looks at the shutdown flag and clocks.
const READ_POLL: Duration = Duration::from_millis(200);
/// Pause of the accept loop when no connection is pending.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Pause of the accept loop after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Interval of the liveness and progress tick over every session.
const LIVENESS_TICK: Duration = Duration::from_millis(50);
/// How long the write of a refusal to a peer that is not served may block the accept loop.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// At shutdown, how long the STOP messages get to reach the components.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// What the daemon prints when a mapped segment was truncated under it (see README,
/// "Security"): the one failure it cannot survive, said plainly instead of a bare core dump.
const SIGBUS_MESSAGE: &[u8] = b"aegis-shmctl serve: fatal: SIGBUS: a shared-memory segment \
was truncated or resized by another process of the same user while the daemon had it mapped; \
the daemon cannot go on safely and exits. Every session of this daemon is lost: run \
`aegis-shmctl gc` to remove their segments.\n";
/// Exit status after [`SIGBUS_MESSAGE`] (EX_SOFTWARE).
const SIGBUS_EXIT: libc::c_int = 70;

extern "C" fn on_sigbus(_: libc::c_int) {
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the message is a static buffer.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            SIGBUS_MESSAGE.as_ptr().cast(),
            SIGBUS_MESSAGE.len(),
        );
        libc::_exit(SIGBUS_EXIT);
    }
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
    /// The subscription store could not be opened (a corrupt state file among others).
    #[error(transparent)]
    State(#[from] crate::subscriptions::StoreError),
    /// I/O.
    #[error("cannot listen at {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What every connection thread and the monitor share.
pub(crate) struct Shared {
    /// The sessions.
    pub(crate) sessions: Registry,
    /// The desired subscription sets (persisted in the state directory).
    pub(crate) subs: crate::subscriptions::Store,
    /// Requests between components in flight, and their figures.
    pub(crate) requests: crate::requests::Router,
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
    /// answers, replaces a stale socket file, and sets the socket to 0600. Opens the
    /// subscription store in `state_dir` first (a corrupt state file is an error).
    pub fn bind(socket: &Path, state_dir: &Path) -> Result<Daemon, ServeError> {
        let subs = crate::subscriptions::Store::open(state_dir)?;
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
                sessions: Registry::default(),
                subs,
                requests: crate::requests::Router::default(),
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
        // A same-uid process that truncates a mapped segment raises SIGBUS in whichever thread
        // touches it next; say so and exit rather than die without a word.
        let bus = SigAction::new(
            SigHandler::Handler(on_sigbus),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only calls async-signal-safe functions (write, _exit).
        unsafe { sigaction(Signal::SIGBUS, &bus) }.expect("install the SIGBUS handler");
        // A client that disconnects mid-write must not kill the daemon.
        // SAFETY: ignoring SIGPIPE is always sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    }

    /// Serves until a signal (or [`Daemon::stop_handle`]), then stops every session, removes
    /// every segment and the socket.
    pub fn run(self) {
        let monitor = {
            let shared = self.shared.clone();
            std::thread::spawn(move || monitor_loop(&shared))
        };
        let expiry = {
            let shared = self.shared.clone();
            std::thread::spawn(move || shared.requests.expire_loop(|| stopping(&shared)))
        };
        while !self.shared.shutdown.load(Ordering::Relaxed) && !SIGNALLED.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => self.accept(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL)
                }
                Err(e) => {
                    eprintln!("aegis: accept failed: {e}");
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                }
            }
        }
        self.shared.shutdown.store(true, Ordering::Relaxed);
        let _ = monitor.join();
        let _ = expiry.join();
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        for cell in self.shared.sessions.take_all() {
            let Some(mut s) = cell.take() else {
                continue;
            };
            s.stop(State::Stopped, "the daemon is shutting down");
            s.shutdown();
            for c in &s.components {
                c.outbox.flush(deadline);
            }
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
            refuse(stream, ErrorCode::PermissionDenied, &msg);
            return;
        }
        if self.shared.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            refuse(stream, ErrorCode::Busy, "too many connections");
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

fn refuse(mut stream: UnixStream, code: ErrorCode, msg: &str) {
    let _ = stream.set_write_timeout(Some(REFUSAL_WRITE_TIMEOUT));
    let _ = stream.write_all(&protocol::encode(&Reply::error(code, msg)));
}

fn monitor_loop(shared: &Shared) {
    while !shared.shutdown.load(Ordering::Relaxed) && !SIGNALLED.load(Ordering::Relaxed) {
        for cell in shared.sessions.all() {
            if let Some(mut s) = cell.lock() {
                s.tick();
            }
        }
        std::thread::sleep(LIVENESS_TICK);
    }
}

/// Whether the daemon is shutting down.
fn stopping(shared: &Shared) -> bool {
    shared.shutdown.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed)
}

/// A connection's reader: answers each line through the connection's [`Outbox`] and
/// enforces the idle clock; [`Lines`] does the framing.
fn serve_connection(shared: &Shared, stream: UnixStream, conn: u64, pid: u32) {
    let _ = stream.set_read_timeout(Some(READ_POLL));
    let Ok(outbox) = stream
        .try_clone()
        .and_then(|w| Outbox::spawn(w, format!("aegis-out-{conn}")))
    else {
        return;
    };
    let ctx = dispatch::Conn {
        shared,
        conn,
        pid,
        outbox: &outbox,
    };
    let mut reader = stream;
    let mut peer = Peer::Anonymous;
    let mut lines = Lines::default();
    let mut chunk = [0u8; 8192];
    let mut last_activity = Instant::now();
    while !stopping(shared) {
        while let Some(line) = lines.next_line() {
            if let Some(r) = dispatch::handle_line(&ctx, &mut peer, &line) {
                outbox.send(&r);
            }
        }
        if !lines.check(&outbox) {
            break;
        }
        if matches!(peer, Peer::Anonymous) && last_activity.elapsed() > IDLE_TIMEOUT {
            break;
        }
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                last_activity = Instant::now();
                lines.push(&chunk[..n]);
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
    outbox.close();
    dispatch::disconnected(&peer, conn);
    shared.requests.disconnected(conn);
}

/// The line framing of one connection: the bytes read and not yet answered, the cap of
/// [`protocol::MAX_LINE`] (the rest of an over-long line is discarded up to its newline) and
/// the partial-line clock.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// Since when `buf` holds an unfinished line.
    partial_since: Option<Instant>,
    /// Skipping the rest of an over-long line.
    discarding: bool,
}

impl Lines {
    /// The next complete line, without its newline.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            self.partial_since = None;
            if self.discarding {
                self.discarding = false;
                continue;
            }
            line.pop();
            return Some(line);
        }
        None
    }

    /// Bytes read from the peer.
    fn push(&mut self, bytes: &[u8]) {
        if !self.discarding {
            self.buf.extend_from_slice(bytes);
        } else if let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.discarding = false;
            // The over-long line is over, and so is its partial-line clock. It used to keep
            // running: an idle connection was dropped with "incomplete line" 5 s after an
            // over-long line it had been told about.
            self.partial_since = None;
            self.buf.extend_from_slice(&bytes[nl + 1..]);
        }
    }

    /// After the complete lines are answered: refuses an over-long line (`line_too_long`,
    /// the connection goes on) and a line left unfinished too long (`timeout`). Returns false
    /// when the connection must close.
    fn check(&mut self, outbox: &Outbox) -> bool {
        if self.buf.len() >= protocol::MAX_LINE {
            outbox.send(&Reply::error(
                ErrorCode::LineTooLong,
                format!("line longer than {} bytes", protocol::MAX_LINE),
            ));
            self.buf.clear();
            self.discarding = true;
        }
        if !self.buf.is_empty() && self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
        if self
            .partial_since
            .is_some_and(|t| t.elapsed() > PARTIAL_LINE_TIMEOUT)
        {
            outbox.send(&Reply::error(
                ErrorCode::Timeout,
                format!(
                    "incomplete line: no newline within {} s",
                    PARTIAL_LINE_TIMEOUT.as_secs()
                ),
            ));
            return false;
        }
        true
    }
}
