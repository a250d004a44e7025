//! Requests between components (SPEC section 13): the daemon routes each `REQUEST` to its
//! target's connection and the target's `REPLY` back, and answers `timeout` itself at the
//! deadline. It keeps the figures per session, target and type for `inspect`.
//!
//! Decisions are taken under the caller's session lock (which target, is it alive) and the
//! router's own lock (the table of requests in flight); every send only queues a line on an
//! [`Outbox`]. The lock order is session, then router: the expiry thread takes the router's
//! lock only.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{self, ErrorCode, Reply};
use aegis_shm_client::request::{Answer, Call, Incoming, RequestStats, MAX_TIMEOUT_MS};
use hdrhistogram::Histogram;

use crate::outbox::Outbox;
use crate::session::Session;

/// How often the expiry thread looks at the shutdown flag when nothing is due.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Deadlines of answered requests the heap may hold beyond twice those in flight.
const HEAP_SLACK: usize = 4096;

/// A request in flight.
struct Pending {
    session: String,
    caller: Outbox,
    caller_conn: u64,
    caller_id: u64,
    target_conn: u64,
    target: String,
    request_type: String,
    received: Instant,
    deadline: Instant,
}

/// One target and type's figures.
struct Figures {
    requests: u64,
    replies: u64,
    errors: u64,
    timeouts: u64,
    /// Round trip in µs (REQUEST received → REPLY received), 1 µs to 10 min, 3 digits.
    latency: Histogram<u64>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            requests: 0,
            replies: 0,
            errors: 0,
            timeouts: 0,
            latency: Histogram::new_with_bounds(1, MAX_TIMEOUT_MS * 1000, 3)
                .expect("valid histogram bounds"),
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Deadlines of `pending` (an entry whose request is gone is skipped).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Session id → (target, type) → figures.
    figures: HashMap<String, BTreeMap<(String, String), Figures>>,
}

impl State {
    /// The deadlines of answered requests stay in the heap until they pass; with long
    /// timeouts and many requests they would pile up, so the heap is rebuilt from the
    /// requests in flight once it holds many more.
    fn prune_deadlines(&mut self) {
        if self.deadlines.len() > 2 * self.pending.len() + HEAP_SLACK {
            self.deadlines = self
                .pending
                .iter()
                .map(|(&id, p)| Reverse((p.deadline, id)))
                .collect();
        }
    }

    fn figures(&mut self, session: &str, target: &str, request_type: &str) -> &mut Figures {
        self.figures
            .entry(session.to_string())
            .or_default()
            .entry((target.to_string(), request_type.to_string()))
            .or_insert_with(Figures::new)
    }
}

/// Every request in flight in the daemon, and the figures.
#[derive(Default)]
pub struct Router {
    state: Mutex<State>,
    changed: Condvar,
}

/// What a request was refused with, before it reached a target.
fn refusal(id: u64, code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::Answer(Answer::error(id, code, message))
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `REQUEST` from connection `caller_conn` (the component `from`, or the CLI when
    /// `None`) in session `s`: routed to the target's outbox, or refused at once. Returns the
    /// refusal to send to the caller, if any.
    pub fn call(
        &self,
        s: &Session,
        from: Option<&str>,
        caller_conn: u64,
        caller: &Outbox,
        call: Call,
    ) -> Option<Reply> {
        let id = call.id;
        if !protocol::valid_name(&call.request_type) {
            return Some(refusal(
                id,
                ErrorCode::BadName,
                format!(
                    "request type {:?} is outside [A-Za-z0-9._-]{{1,64}}",
                    call.request_type
                ),
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&call.timeout_ms) {
            return Some(refusal(
                id,
                ErrorCode::BadRequest,
                format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}"),
            ));
        }
        let received = Instant::now();
        let deadline = received + Duration::from_millis(call.timeout_ms);
        let target = resolve(s, &call.target);
        let mut st = self.lock();
        let failed = |st: &mut State, code: ErrorCode, message: String| {
            st.figures(&s.id, &call.target, &call.request_type).requests += 1;
            st.figures(&s.id, &call.target, &call.request_type).errors += 1;
            Some(refusal(id, code, message))
        };
        if from == Some(call.target.as_str()) {
            return failed(
                &mut st,
                ErrorCode::SelfRequest,
                format!("{} sent a request to itself", call.target),
            );
        }
        let (target_conn, outbox) = match target {
            Ok(t) => t,
            Err((code, message)) => return failed(&mut st, code, message),
        };
        st.next_id += 1;
        let rid = st.next_id;
        let incoming = Incoming {
            id: rid,
            from: from.map(str::to_string),
            request_type: call.request_type.clone(),
            payload: call.payload,
            timeout_ms: call.timeout_ms,
        };
        if !outbox.send(&Reply::Request(incoming)) {
            return failed(
                &mut st,
                ErrorCode::Busy,
                format!("the queue of {} is full", call.target),
            );
        }
        st.figures(&s.id, &call.target, &call.request_type).requests += 1;
        st.pending.insert(
            rid,
            Pending {
                session: s.id.clone(),
                caller: caller.clone(),
                caller_conn,
                caller_id: id,
                target_conn,
                target: call.target,
                request_type: call.request_type,
                received,
                deadline,
            },
        );
        let earliest = st
            .deadlines
            .peek()
            .is_none_or(|Reverse((d, _))| deadline < *d);
        st.deadlines.push(Reverse((deadline, rid)));
        st.prune_deadlines();
        if earliest {
            self.changed.notify_all();
        }
        None
    }

    /// A `REPLY` from connection `conn`: forwarded to the caller if `conn` is the request's
    /// target and the request is still in flight (a late one is dropped: the caller has its
    /// `timeout`).
    pub fn answer(&self, conn: u64, answer: Answer) {
        let mut st = self.lock();
        if st
            .pending
            .get(&answer.id)
            .is_none_or(|p| p.target_conn != conn)
        {
            return;
        }
        let p = st.pending.remove(&answer.id).expect("checked above");
        let elapsed = u64::try_from(p.received.elapsed().as_micros()).unwrap_or(u64::MAX);
        let reply = match answer.error {
            None => {
                let f = st.figures(&p.session, &p.target, &p.request_type);
                f.replies += 1;
                f.latency.saturating_record(elapsed.max(1));
                Answer {
                    id: p.caller_id,
                    ok: Some(answer.ok.unwrap_or_default()),
                    error: None,
                }
            }
            Some(e) => {
                let f = st.figures(&p.session, &p.target, &p.request_type);
                f.errors += 1;
                f.latency.saturating_record(elapsed.max(1));
                // Whatever code the target wrote, to the caller it is its handler's failure.
                Answer::error(p.caller_id, ErrorCode::HandlerError, e.message)
            }
        };
        drop(st);
        p.caller.send(&Reply::Answer(reply));
    }

    /// Connection `conn` closed: the requests it was to answer fail at once (`no_target`),
    /// the ones it sent are forgotten.
    pub fn disconnected(&self, conn: u64) {
        let mut st = self.lock();
        let gone: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.target_conn == conn || p.caller_conn == conn)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            let p = st.pending.remove(&id).expect("listed above");
            if p.target_conn == conn {
                st.figures(&p.session, &p.target, &p.request_type).errors += 1;
                p.caller.send(&Reply::Answer(Answer::error(
                    p.caller_id,
                    ErrorCode::NoTarget,
                    format!("{} disconnected before it answered", p.target),
                )));
            }
        }
    }

    /// The figures of session `session_id`, per target and type.
    pub fn stats(&self, session_id: &str) -> Vec<RequestStats> {
        let st = self.lock();
        let Some(m) = st.figures.get(session_id) else {
            return Vec::new();
        };
        m.iter()
            .map(|((target, request_type), f)| {
                let some = |q: f64| (!f.latency.is_empty()).then(|| f.latency.value_at_quantile(q));
                RequestStats {
                    target: target.clone(),
                    request_type: request_type.clone(),
                    requests: f.requests,
                    replies: f.replies,
                    errors: f.errors,
                    timeouts: f.timeouts,
                    p50_us: some(0.5),
                    p99_us: some(0.99),
                    max_us: (!f.latency.is_empty()).then(|| f.latency.max()),
                }
            })
            .collect()
    }

    /// Drops the figures of a destroyed session.
    pub fn forget(&self, session_id: &str) {
        self.lock().figures.remove(session_id);
    }

    /// The expiry thread: answers `timeout` to each request at its deadline, until `stop`.
    pub fn expire_loop(&self, stop: impl Fn() -> bool) {
        let mut st = self.lock();
        while !stop() {
            let now = Instant::now();
            let next = match st.deadlines.peek() {
                Some(&Reverse((d, id))) if d <= now => {
                    st.deadlines.pop();
                    if let Some(p) = st.pending.remove(&id) {
                        st.figures(&p.session, &p.target, &p.request_type).timeouts += 1;
                        let ms = p.deadline.duration_since(p.received).as_millis();
                        p.caller.send(&Reply::Answer(Answer::error(
                            p.caller_id,
                            ErrorCode::Timeout,
                            format!("{} did not answer within {ms} ms", p.target),
                        )));
                    }
                    continue;
                }
                Some(&Reverse((d, _))) => (d - now).min(IDLE_POLL),
                None => IDLE_POLL,
            };
            st = self
                .changed
                .wait_timeout(st, next)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The connection and outbox of the live component named `target`, or, when `target` names
/// a group (SPEC 12), of the group's active member: `not_active` while it has none (the lease
/// is between members, or the active member is gone).
fn resolve(s: &Session, target: &str) -> Result<(u64, Outbox), (ErrorCode, String)> {
    let live = |c: &&crate::session::Component| c.connected && !c.state.gone();
    if let Some(c) = s
        .components
        .iter()
        .rev()
        .find(|c| c.name == target && live(c))
    {
        return Ok((c.conn, c.outbox.clone()));
    }
    if let Some(g) = s.groups.get(target) {
        return g
            .active
            .and_then(|conn| s.component_by_conn(conn))
            .filter(|c| live(c) && !c.fenced)
            .map(|c| (c.conn, c.outbox.clone()))
            .ok_or_else(|| {
                (
                    ErrorCode::NotActive,
                    format!("group {target} has no active member (epoch {})", g.epoch),
                )
            });
    }
    Err((
        ErrorCode::NoTarget,
        format!("no live component or group {target} in session {}", s.name),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_deadlines_do_not_pile_up() {
        let mut st = State::default();
        let far = Instant::now() + Duration::from_secs(600);
        for id in 0..=(HEAP_SLACK as u64) {
            st.deadlines.push(Reverse((far, id)));
            st.prune_deadlines();
        }
        assert!(st.deadlines.len() <= HEAP_SLACK, "{}", st.deadlines.len());
    }

    #[test]
    fn figures_report_percentiles_only_with_samples() {
        let r = Router::default();
        assert!(r.stats("x").is_empty());
        r.lock().figures("x", "risk", "fits").requests += 1;
        let s = r.stats("x");
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].requests, s[0].p50_us), (1, None));
    }
}
