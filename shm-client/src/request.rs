//! Requests between components (SPEC section 13): a question with an answer and a deadline,
//! carried over the control socket.
//!
//! The model: the caller sends `REQUEST` {`id`, `target`, `type`, `payload`, `timeout_ms`} to
//! the daemon; the daemon finds the target (a component, or a group's active member), gives
//! the request its own id and deadline, queues it on the target's connection, and sends the
//! target's `REPLY` back to the caller. At the
//! deadline the daemon answers `timeout` itself and forgets the request (a late `REPLY` is
//! dropped). The caller therefore always gets exactly one of: the reply, an error
//! (`no_target`, `not_active`, `handler_error`, `self_request`, `busy`), or `timeout`; the
//! client library also keeps its own clock, so even a daemon that went silent costs the caller
//! no more than the deadline (plus [`REPLY_GRACE`]).
//!
//! On the serving side the client library's reader thread only queues an incoming request;
//! one handler thread per component runs the handlers registered with
//! [`crate::client::Component::serve`], one request at a time, in arrival order. A request
//! whose deadline passed while it was queued is skipped (the caller already has its
//! `timeout`). Market data never goes through this path, so a slow handler delays other
//! requests to the same component, never the bus.
//!
//! Circular calls (A's handler asks B, whose handler asks A) cannot deadlock: every wait has a
//! deadline, so the inner request times out (A's handler thread is busy), and the chain unwinds
//! by deadlines.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::ErrorCode;

/// The longest timeout a request may ask for.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// How long past its deadline the caller still waits for the daemon's own `timeout` (which
/// the daemon sends at the deadline it computed on receipt, a little later than the caller's).
pub const REPLY_GRACE: Duration = Duration::from_millis(25);
/// The longest `REQUEST` or `REPLY` line a component sends: room is left under
/// [`crate::protocol::MAX_LINE`] for what the daemon adds when it forwards it (the caller's
/// name, its own id), so a forwarded line never exceeds the limit.
pub const MAX_MESSAGE: usize = crate::protocol::MAX_LINE - 512;
/// Requests queued for one component's handler thread at most (see `Server::received`).
pub const MAX_QUEUED: usize = 4096;
/// Requests one component may have in flight at once; a further `request` waits for room
/// (within its deadline). It keeps the daemon's per-connection queues (1024 messages) from
/// overflowing.
pub const MAX_IN_FLIGHT: usize = 256;

/// `REQUEST`, caller → daemon (a component, or the CLI with `session`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Call {
    /// The caller's id for this request (echoed in the `REPLY`).
    pub id: u64,
    /// The session, for a caller that is not a registered component (`aegis-shmctl call`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The target component's name.
    pub target: String,
    /// The request type (`[A-Za-z0-9._-]{1,64}`), e.g. `stats`.
    #[serde(rename = "type")]
    pub request_type: String,
    /// Any JSON value.
    #[serde(default)]
    pub payload: Value,
    /// The deadline, from now (1 to [`MAX_TIMEOUT_MS`]).
    pub timeout_ms: u64,
}

/// `REQUEST`, daemon → target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Incoming {
    /// The daemon's id for this request (the target's `REPLY` carries it).
    pub id: u64,
    /// The caller's component name (`None`: the command line).
    #[serde(default)]
    pub from: Option<String>,
    /// The request type.
    #[serde(rename = "type")]
    pub request_type: String,
    /// The caller's payload.
    #[serde(default)]
    pub payload: Value,
    /// Time left until the deadline when the daemon sent it.
    pub timeout_ms: u64,
}

/// `REPLY`: target → daemon (with the daemon's id), and daemon → caller (with the caller's).
/// `error` set means failure; otherwise `ok` is the answer (absent means `null`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Answer {
    /// The request's id.
    pub id: u64,
    /// The answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    /// The failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CallError>,
}

/// Why a request failed, on the wire.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// `no_target`, `not_active`, `handler_error`, `self_request`, `timeout`, `busy`, or a
    /// refusal of the request itself (`bad_request`, `bad_name`, `no_session`).
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
}

impl Answer {
    /// A failure answer.
    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Answer {
        Answer {
            id,
            ok: None,
            error: Some(CallError {
                code,
                message: message.into(),
            }),
        }
    }

    /// The outcome as the caller sees it.
    pub fn into_result(self) -> Result<Value, RequestError> {
        match self.error {
            None => Ok(self.ok.unwrap_or(Value::Null)),
            Some(e) => Err(RequestError::from_wire(e.code, e.message)),
        }
    }
}

/// Why [`crate::client::Component::request`] returned no answer. The caller always gets
/// one: the answer, one of these, or [`RequestError::Timeout`] at its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No live component of that name in the session.
    #[error("no_target: {0}")]
    NoTarget(String),
    /// The target is a group (SPEC 12) with no active member.
    #[error("not_active: {0}")]
    NotActive(String),
    /// The target's handler failed (returned an error, panicked, or there is no handler for
    /// the type).
    #[error("handler_error: {0}")]
    HandlerError(String),
    /// A component asked itself.
    #[error("self_request: {0}")]
    SelfRequest(String),
    /// The deadline passed with no answer.
    #[error("timeout: {0}")]
    Timeout(String),
    /// The target's queue in the daemon is full.
    #[error("busy: {0}")]
    Busy(String),
    /// The request itself was refused (`bad_request`, `bad_name`, `no_session`, ...).
    #[error("{code}: {message}")]
    Refused {
        /// The daemon's code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The connection to the daemon closed before the answer came.
    #[error("disconnected: the daemon's connection closed before the answer")]
    Disconnected,
}

impl RequestError {
    /// The error of a wire code.
    pub fn from_wire(code: ErrorCode, message: String) -> RequestError {
        match code {
            ErrorCode::NoTarget => RequestError::NoTarget(message),
            ErrorCode::NotActive => RequestError::NotActive(message),
            ErrorCode::HandlerError => RequestError::HandlerError(message),
            ErrorCode::SelfRequest => RequestError::SelfRequest(message),
            ErrorCode::Timeout => RequestError::Timeout(message),
            ErrorCode::Busy => RequestError::Busy(message),
            code => RequestError::Refused { code, message },
        }
    }

    /// The wire code (`disconnected` has none: it is the client's own verdict).
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            RequestError::NoTarget(_) => ErrorCode::NoTarget,
            RequestError::NotActive(_) => ErrorCode::NotActive,
            RequestError::HandlerError(_) => ErrorCode::HandlerError,
            RequestError::SelfRequest(_) => ErrorCode::SelfRequest,
            RequestError::Timeout(_) => ErrorCode::Timeout,
            RequestError::Busy(_) => ErrorCode::Busy,
            RequestError::Refused { code, .. } => *code,
            RequestError::Disconnected => return None,
        })
    }
}

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The caller's component name (`None`: the command line).
    pub from: Option<String>,
    /// The request type.
    pub request_type: String,
    /// The caller's payload.
    pub payload: Value,
    /// The caller's deadline (a handler that asks others should not wait past it).
    pub deadline: Instant,
}

impl Served {
    /// Time left until the deadline (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A request handler: the answer, or an error message (sent as `handler_error`).
pub type Handler = dyn Fn(&Served) -> Result<Value, String> + Send + Sync;

/// One request's figures in `inspect`: per target and type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RequestStats {
    /// Target component.
    pub target: String,
    /// Request type.
    #[serde(rename = "type")]
    pub request_type: String,
    /// Requests received.
    pub requests: u64,
    /// Answered by the target's handler.
    pub replies: u64,
    /// Failed (`handler_error`, `no_target`, `self_request`, `busy`, ...), timeouts excepted.
    pub errors: u64,
    /// Timed out.
    pub timeouts: u64,
    /// Round trip in the daemon (REQUEST received → REPLY received), answered requests, µs.
    pub p50_us: Option<u64>,
    /// 99th percentile.
    pub p99_us: Option<u64>,
    /// Largest.
    pub max_us: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// The caller's side: requests in flight, completed by the reader thread.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct CallsState {
    pending: HashMap<u64, mpsc::SyncSender<Answer>>,
    closed: bool,
}

/// The requests this component has in flight.
#[derive(Default)]
pub(crate) struct Calls {
    next: AtomicU64,
    state: Mutex<CallsState>,
    room: Condvar,
}

/// A request in flight: its answer comes through `rx`.
pub(crate) struct Ticket {
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<Answer>,
}

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, CallsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new request id with room for it, waiting for room until `deadline`.
    pub(crate) fn begin(&self, deadline: Instant) -> Result<Ticket, RequestError> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Err(RequestError::Disconnected);
            }
            if st.pending.len() < MAX_IN_FLIGHT {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RequestError::Timeout(format!(
                    "{MAX_IN_FLIGHT} requests of this component were in flight until the deadline"
                )));
            }
            st = self
                .room
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::sync_channel(1);
        st.pending.insert(id, tx);
        Ok(Ticket { id, rx })
    }

    /// Forgets a request (answered, timed out, or never sent).
    pub(crate) fn end(&self, id: u64) {
        if self.lock().pending.remove(&id).is_some() {
            self.room.notify_one();
        }
    }

    /// The reader thread got an answer.
    pub(crate) fn complete(&self, answer: Answer) {
        let tx = self.lock().pending.remove(&answer.id);
        if let Some(tx) = tx {
            self.room.notify_one();
            let _ = tx.try_send(answer);
        }
    }

    /// The connection closed: every request in flight fails at once.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.pending.clear();
        self.room.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The target's side: handlers and their queue.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Queue {
    items: VecDeque<(Incoming, Instant)>,
    quit: bool,
}

/// The handlers of this component and the requests waiting for the handler thread.
#[derive(Default)]
pub(crate) struct Server {
    handlers: Mutex<HashMap<String, Arc<Handler>>>,
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Server {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs (or replaces) the handler of `request_type`.
    pub(crate) fn set(&self, request_type: &str, handler: Arc<Handler>) {
        self.handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_type.to_string(), handler);
    }

    /// The reader thread got a request: queued for the handler thread, never run here.
    /// Behind a stuck handler the queue is bounded: at [`MAX_QUEUED`] the requests whose
    /// deadline passed are dropped (their callers have their `timeout`), and if it is still
    /// full the new one is dropped too (its caller gets `timeout` at its deadline).
    pub(crate) fn received(&self, req: Incoming) {
        let now = Instant::now();
        let deadline = now + Duration::from_millis(req.timeout_ms);
        let mut q = self.queue();
        if q.items.len() >= MAX_QUEUED {
            q.items.retain(|(_, d)| *d > now);
            if q.items.len() >= MAX_QUEUED {
                return;
            }
        }
        q.items.push_back((req, deadline));
        drop(q);
        self.changed.notify_one();
    }

    /// Stops the handler thread (after the request it is running, if any).
    pub(crate) fn quit(&self) {
        self.queue().quit = true;
        self.changed.notify_all();
    }

    /// The handler thread: runs each queued request whose deadline has not passed and hands
    /// the answer to `send`, until [`Server::quit`].
    pub(crate) fn run(&self, send: impl Fn(&Answer) -> bool) {
        loop {
            let (req, deadline) = {
                let mut q = self.queue();
                loop {
                    if q.quit {
                        return;
                    }
                    if let Some(item) = q.items.pop_front() {
                        break item;
                    }
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            if Instant::now() >= deadline {
                // The daemon has answered `timeout` already.
                continue;
            }
            let handler = self
                .handlers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&req.request_type)
                .cloned();
            let served = Served {
                from: req.from,
                request_type: req.request_type,
                payload: req.payload,
                deadline,
            };
            let result = match handler {
                None => Err(format!(
                    "no handler for request type {:?}",
                    served.request_type
                )),
                Some(h) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(&served)))
                    .unwrap_or_else(|_| Err("the handler panicked".to_string())),
            };
            let answer = match result {
                Ok(v) => Answer {
                    id: req.id,
                    ok: Some(v),
                    error: None,
                },
                Err(m) => Answer::error(req.id, ErrorCode::HandlerError, m),
            };
            if !send(&answer) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip() {
        let a = Answer {
            id: 3,
            ok: None,
            error: None,
        };
        assert_eq!(a.clone().into_result(), Ok(Value::Null));
        let e = Answer::error(4, ErrorCode::NoTarget, "no component risk");
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"id":4,"error":{"code":"no_target","message":"no component risk"}}"#
        );
        let back: Answer = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back.into_result(),
            Err(RequestError::NoTarget("no component risk".into()))
        );
    }

    /// Behind a stuck handler the queue does not grow without bound: expired requests go
    /// first, then new ones are dropped.
    #[test]
    fn the_handler_queue_is_bounded() {
        let server = Server::default();
        let req = |id, timeout_ms| Incoming {
            id,
            from: None,
            request_type: "t".into(),
            payload: Value::Null,
            timeout_ms,
        };
        for id in 0..MAX_QUEUED as u64 {
            server.received(req(id, 1));
        }
        std::thread::sleep(Duration::from_millis(5));
        server.received(req(u64::MAX, 60_000));
        assert_eq!(
            server.queue().items.len(),
            1,
            "the expired ones were dropped"
        );
        for id in 0..MAX_QUEUED as u64 {
            server.received(req(id, 60_000));
        }
        assert_eq!(server.queue().items.len(), MAX_QUEUED);
    }

    #[test]
    fn in_flight_is_capped_within_the_deadline() {
        let calls = Calls::default();
        let far = Instant::now() + Duration::from_secs(60);
        let tickets: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| calls.begin(far).unwrap())
            .collect();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(matches!(calls.begin(soon), Err(RequestError::Timeout(_))));
        calls.end(tickets[0].id);
        assert!(calls.begin(soon).is_ok());
        calls.close();
        assert_eq!(calls.begin(far).err(), Some(RequestError::Disconnected));
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use crate::protocol::{encode, parse_request, Reply, Request};

    #[test]
    fn messages_parse_as_their_enums() {
        let call = Request::Call(Call {
            id: 1,
            session: None,
            target: "risk".into(),
            request_type: "fits".into(),
            payload: serde_json::json!({"qty": 1.5}),
            timeout_ms: 100,
        });
        let line = encode(&call);
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), call);
        let ans = Request::Answer(Answer {
            id: 2,
            ok: Some(serde_json::json!([1, "x"])),
            error: None,
        });
        let line = encode(&ans);
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), ans);
        for reply in [
            Reply::Request(Incoming {
                id: 3,
                from: Some("strategy".into()),
                request_type: "fits".into(),
                payload: serde_json::json!({"a": null}),
                timeout_ms: 5,
            }),
            Reply::Answer(Answer::error(4, ErrorCode::Timeout, "late")),
        ] {
            let line = encode(&reply);
            let back: Reply = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, reply);
        }
    }
}
