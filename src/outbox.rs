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
        let result = write_line(inner, &mut stream, &line);
        q = inner.lock();
        q.writing = false;
        inner.changed.notify_all();
        match result {
            Ok(()) => {}
            // A write timeout loses this message only (none of it went out, see `write_line`),
            // as long as the connection is open.
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

/// Writes `line` to the client. A timeout before any of it went out gives the line up (the
/// client is not reading; the connection goes on). Once part of it went out, the rest must
/// follow: cut there, the next line would be glued to the half line and the client would lose
/// both (a glued line over `MAX_LINE` even ends its reader), so a timeout then only means
/// trying again, until the line is out or the connection is closed ([`Outbox::close`]). The
/// queue lock is taken only to look at `closed`, never held across a write.
fn write_line(inner: &Inner, stream: &mut UnixStream, line: &[u8]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < line.len() {
        match stream.write(&line[sent..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if sent > 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                    && !inner.lock().closed => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_shm_client::protocol::ErrorCode;
    use std::io::Read;

    /// Regression: a write that timed out part-way through a line gave the rest of it up and
    /// went on with the next line, which the client then read glued to the half line: both
    /// were lost (the client drops a line that does not parse), whatever they were (a STOP,
    /// a request's answer), and the glued line, over `MAX_LINE`, ended the client's reader.
    /// Lines of ~60 KB fill the socket buffer in the middle of one: the write that hits the
    /// timeout returns the part that went out, the next one times out with nothing sent.
    #[test]
    fn a_line_cut_by_a_write_timeout_is_finished_not_glued_to_the_next() {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        let outbox = Outbox::spawn(ours, "aegis-out-test".into()).expect("spawn");
        let big = Reply::error(ErrorCode::BadRequest, "x".repeat(60_000));
        for _ in 0..8 {
            assert!(outbox.send(&big));
        }
        // The client reads nothing for two write timeouts: the first write to time out
        // returns part of a line, the next one nothing.
        std::thread::sleep(2 * WRITE_TIMEOUT + Duration::from_millis(500));
        let reader = std::thread::spawn(move || {
            theirs
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).expect("read");
            all
        });
        assert!(outbox.send(&Reply::Heartbeat));
        assert!(outbox.flush(Instant::now() + Duration::from_secs(30)));
        outbox.close();
        let all = reader.join().expect("reader");
        let lines: Vec<&[u8]> = all
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        for (i, line) in lines.iter().enumerate() {
            assert!(
                serde_json::from_slice::<Reply>(line).is_ok(),
                "line {i} of {} ({} bytes) is not a message: a cut line glued to the next",
                lines.len(),
                line.len()
            );
        }
        assert_eq!(
            lines
                .last()
                .map(|l| serde_json::from_slice::<Reply>(l).ok()),
            Some(Some(Reply::Heartbeat))
        );
    }
}
