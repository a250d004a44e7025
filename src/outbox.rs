//! A connection's outbound queue and its writer thread.
//!
//! The daemon never writes to a socket while it holds a lock that other connections need:
//! whoever decides to send (a request handler, the liveness tick, a session's start or stop)
//! only queues the line here, and the connection's own writer thread does the blocking write.
//! A client that stops reading therefore stalls nobody but its own writer; once its queue is
//! full, further messages to it are dropped (as a write timeout used to drop them).

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{self, Reply};

/// How long one write to a client may block before that message is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages queued for one client at most; more are dropped.
pub const OUTBOX_CAPACITY: usize = 1024;

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// No more lines are accepted; the writer flushes what is queued and exits.
    closed: bool,
    /// The writer is in a `write` (the queue may be empty while a line is still going out).
    writing: bool,
    /// The writer exited.
    done: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side of one connection; cheap to clone. Dropping every clone does not stop
/// the writer: [`Outbox::close`] does.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl Outbox {
    /// Starts the writer thread of `stream` (a clone of the connection's socket), which gets
    /// a [`WRITE_TIMEOUT`] per write.
    pub fn spawn(stream: UnixStream, name: String) -> std::io::Result<Outbox> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let theirs = inner.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || writer_loop(&theirs, stream))?;
        Ok(Outbox { inner })
    }

    /// Queues `msg`. Never blocks on the socket. Returns false if it was dropped (the queue
    /// is full or closed).
    pub fn send(&self, msg: &Reply) -> bool {
        let mut q = self.inner.lock();
        if q.closed || q.lines.len() >= OUTBOX_CAPACITY {
            return false;
        }
        q.lines.push_back(protocol::encode(msg));
        self.inner.changed.notify_all();
        true
    }

    /// Accepts no more messages; the writer sends what is queued (giving up at the first
    /// write that fails or times out) and exits, which closes its end of the socket.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.changed.notify_all();
    }

    /// Waits until everything queued so far is written (or given up), at most until
    /// `deadline`. Returns whether it was.
    pub fn flush(&self, deadline: Instant) -> bool {
        let mut q = self.inner.lock();
        loop {
            if q.done || (q.lines.is_empty() && !q.writing) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self
                .inner
                .changed
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn writer_loop(inner: &Inner, mut stream: UnixStream) {
    let mut q = inner.lock();
    loop {
        let Some(line) = q.lines.pop_front() else {
            if q.closed {
                break;
            }
            q = inner.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        q.writing = true;
        drop(q);
        let result = stream.write_all(&line);
        q = inner.lock();
        q.writing = false;
        inner.changed.notify_all();
        match result {
            Ok(()) => {}
            // A write timeout loses this message only, as long as the connection is open.
            Err(e)
                if !q.closed
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
            Err(_) => {
                q.closed = true;
                q.lines.clear();
            }
        }
    }
    q.done = true;
    inner.changed.notify_all();
}
