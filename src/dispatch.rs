//! One function per request verb. Each decides under the lock of the one session it concerns
//! (never the registry's lock for longer than a lookup) and only queues what it sends: the
//! caller writes the reply through the connection's [`Outbox`], and messages to other
//! components go to their own outboxes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_shm_client::protocol::{
    self, ErrorCode, Register, Reply, Request, SessionDestroyed, SessionSpec, SessionStarted,
    SessionStopped,
};

use crate::daemon::Shared;
use crate::outbox::Outbox;
use crate::refusal::Refusal;
use crate::registry::{SessionCell, SessionGuard};
use crate::session::{CompState, Session, State};
use crate::subscriptions;

/// `SESSION_START` waits this long for missing READYs unless the request says otherwise.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `SESSION_START` wait a request may ask for.
const MAX_START_TIMEOUT: Duration = Duration::from_secs(600);
/// How often `SESSION_START` looks at the READY barrier again.
const START_POLL: Duration = Duration::from_millis(20);

/// What a connection has become.
pub enum Peer {
    /// Not registered (CLI, or not yet).
    Anonymous,
    /// A component of this session (named so; the cell tells a destroyed session from a
    /// later one of the same name).
    Component(String, Arc<SessionCell>),
}

/// The connection a request came on.
pub struct Conn<'a> {
    /// The daemon's state.
    pub shared: &'a Shared,
    /// Connection id.
    pub conn: u64,
    /// The peer's pid (SO_PEERCRED), 0 if unknown.
    pub pid: u32,
    /// The connection's outbound queue.
    pub outbox: &'a Outbox,
}

/// Answers one line (without its newline); `None` when nothing is to be answered.
pub fn handle_line(ctx: &Conn<'_>, peer: &mut Peer, line: &[u8]) -> Option<Reply> {
    let req = match protocol::parse_request(line) {
        Ok(r) => r,
        Err(e) => return Some(e),
    };
    if let Peer::Component(name, cell) = &*peer {
        return match cell.lock() {
            Some(mut s) => component_request(ctx.shared, &mut s, ctx.conn, req),
            None => Some(Reply::error(
                ErrorCode::SessionGone,
                format!("session {name} no longer exists"),
            )),
        };
    }
    let answer = match req {
        Request::Call(call) => return call_from_cli(ctx, call),
        Request::Register(reg) => register(ctx, peer, &reg),
        Request::SessionCreate(spec) => create(ctx.shared, spec),
        Request::SessionStart { name, timeout_ms } => {
            let timeout = timeout_ms
                .map_or(DEFAULT_START_TIMEOUT, Duration::from_millis)
                .min(MAX_START_TIMEOUT);
            start(ctx.shared, &name, timeout)
        }
        Request::SessionList => Ok(list(ctx.shared)),
        Request::SessionInspect { name } => inspect(ctx.shared, &name),
        Request::SessionStop { name } => stop(ctx.shared, &name),
        Request::SessionDestroy { name } => destroy(ctx.shared, &name),
        Request::SessionEvict { name, component } => evict(ctx.shared, &name, &component),
        Request::Discover {
            session,
            group,
            component,
        } => {
            let name = session.ok_or_else(|| {
                Refusal::bad_request("DISCOVER from outside a session needs `session`")
            });
            name.and_then(|name| {
                let cell = self::session(ctx.shared, &name)?;
                let s = lock(&cell, &name)?;
                Ok(Reply::data(
                    &s.discover(group.as_deref(), component.as_deref())?,
                ))
            })
        }
        Request::Subscribe {
            name,
            component,
            topics,
            symbols,
        } => subscriptions::subscribe(ctx.shared, &name, &component, topics, symbols),
        Request::SessionSubscriptions { name } => subscriptions::view(ctx.shared, &name),
        Request::Subscriptions
        | Request::Answer(_)
        | Request::Reconciled(_)
        | Request::Ready
        | Request::Finished
        | Request::Heartbeat
        | Request::Ack
        | Request::Wait { .. }
        | Request::Error { .. } => Err(Refusal::new(ErrorCode::NotRegistered, "REGISTER first")),
    };
    Some(answer.unwrap_or_else(Reply::from))
}

/// The connection closed: a component's session learns it at once.
pub fn disconnected(peer: &Peer, conn: u64) {
    if let Peer::Component(_, cell) = peer {
        if let Some(mut s) = cell.lock() {
            if let Some(c) = s.component_mut(conn) {
                c.connected = false;
            }
            s.tick();
        }
    }
}

/// A message from a registered component.
fn component_request(shared: &Shared, s: &mut Session, conn: u64, req: Request) -> Option<Reply> {
    if let Some(refused) = s.not_active(conn) {
        // A fenced group member: nothing it sends is served (SPEC section 12).
        return (!matches!(req, Request::Ack | Request::Wait { .. })).then_some(refused);
    }
    if let Some(c) = s.component_mut(conn) {
        c.last_seen = Instant::now();
    }
    match req {
        Request::Discover {
            group, component, ..
        } => Some(
            s.discover(group.as_deref(), component.as_deref())
                .map_or_else(Reply::from, |d| Reply::data(&d)),
        ),
        Request::Heartbeat => Some(Reply::Heartbeat),
        Request::Ready => ready(s, conn),
        Request::Finished => {
            s.component_finished(conn);
            Some(Reply::ack())
        }
        Request::Error { code, message } => {
            s.component_error(conn, format!("{code}: {message}"));
            Some(Reply::ack())
        }
        Request::Ack | Request::Wait { .. } => None,
        Request::Subscriptions => Some(subscriptions::answer(shared, s, conn)),
        Request::Reconciled(report) => {
            subscriptions::record(shared, s, conn, report);
            None
        }
        Request::Call(call) => {
            let c = s.component_mut(conn)?;
            let (from, outbox) = (c.name.clone(), c.outbox.clone());
            shared.requests.call(s, Some(&from), conn, &outbox, call)
        }
        Request::Answer(answer) => {
            shared.requests.answer(conn, answer);
            None
        }
        Request::Register(_) => Some(Reply::error(
            ErrorCode::AlreadyRegistered,
            "this connection is already registered",
        )),
        _ => Some(Reply::error(
            ErrorCode::BadRequest,
            "session commands come from a separate connection",
        )),
    }
}

/// `REQUEST` from the command line (`aegis-shmctl call`): the session is named in it.
fn call_from_cli(ctx: &Conn<'_>, call: aegis_shm_client::request::Call) -> Option<Reply> {
    let Some(name) = call.session.clone() else {
        return Some(Reply::error(
            ErrorCode::BadRequest,
            "a REQUEST from a connection that is not a component names its session",
        ));
    };
    let found = session(ctx.shared, &name).and_then(|cell| {
        let s = lock(&cell, &name)?;
        Ok(ctx
            .shared
            .requests
            .call(&s, None, ctx.conn, ctx.outbox, call))
    });
    found.unwrap_or_else(|r| Some(Reply::from(r)))
}

/// READY: the barrier. STARTED at once for a late live consumer; the start itself when
/// `--expect N` is met (STARTED then goes to every READY component, this one included);
/// else WAIT.
fn ready(s: &mut Session, conn: u64) -> Option<Reply> {
    let c = s.component_mut(conn)?;
    if c.state == CompState::Registered {
        c.state = CompState::Ready;
    }
    if matches!(s.state, State::Running | State::Draining) {
        return Some(s.started_reply());
    }
    if s.expect_met() {
        return s.start().err().map(Reply::from);
    }
    let reason = match s.spec.expect {
        Some(n) => format!(
            "waiting for {} READY components ({} so far)",
            n,
            s.ready_count()
        ),
        None => format!("waiting for `aegis-shmctl session start {}`", s.name),
    };
    Some(Reply::Wait { reason })
}

/// REGISTER: find the session by token, then register under that session's lock only.
fn register(ctx: &Conn<'_>, peer: &mut Peer, reg: &Register) -> Result<Reply, Refusal> {
    let cell = ctx
        .shared
        .sessions
        .by_token(&reg.session_token)
        .ok_or_else(|| Refusal::new(ErrorCode::BadToken, "unknown session token"))?;
    let pid = if ctx.pid != 0 {
        ctx.pid
    } else {
        reg.pid.unwrap_or(0)
    };
    let seed = subscriptions::seed_of(reg)?;
    let mut s = cell
        .lock()
        .ok_or_else(|| Refusal::new(ErrorCode::BadToken, "unknown session token"))?;
    subscriptions::check_topics(&s, &seed.topics)?;
    let mut ack = s.register(reg, pid, ctx.conn, ctx.outbox.clone())?;
    // The store's set wins over the REGISTER's, which only seeds a new entry.
    let (desired, seeded) = ctx.shared.subs.seed(&s.name, &reg.component_name, seed);
    ack.desired = desired;
    *peer = Peer::Component(s.name.clone(), cell.clone());
    drop(s);
    if seeded {
        // Written under no session lock. The component runs with the set either way.
        if let Err(e) = ctx.shared.subs.persist() {
            eprintln!(
                "aegis: the desired set of {} is not persisted: {e}",
                reg.component_name
            );
        }
    }
    Ok(Reply::Ack {
        ack: Some(Box::new(ack)),
        data: None,
    })
}

/// SESSION_CREATE: the segments are created before the registry is locked; a session whose
/// name turned out to be taken is dropped again, which removes them.
fn create(shared: &Shared, spec: SessionSpec) -> Result<Reply, Refusal> {
    let exists =
        |name: &str| Refusal::new(ErrorCode::Exists, format!("session {name} already exists"));
    if shared.sessions.get(&spec.name).is_some() {
        return Err(exists(&spec.name));
    }
    let session = Session::create(spec)?;
    let answer = session.created();
    match shared.sessions.insert(session) {
        Some(_) => Ok(Reply::data(&answer)),
        None => Err(exists(&answer.name)),
    }
}

/// The session named `name`, or `no_session`.
fn session(shared: &Shared, name: &str) -> Result<Arc<SessionCell>, Refusal> {
    shared
        .sessions
        .get(name)
        .ok_or_else(|| Refusal::no_session(name))
}

/// Locks a session found a moment ago; `no_session` if it was destroyed since.
fn lock<'a>(cell: &'a SessionCell, name: &str) -> Result<SessionGuard<'a>, Refusal> {
    cell.lock().ok_or_else(|| Refusal::no_session(name))
}

/// SESSION_START, the trigger: start once every registered component is READY, waiting up
/// to `timeout` (the session's lock is released between looks).
fn start(shared: &Shared, name: &str, timeout: Duration) -> Result<Reply, Refusal> {
    let cell = session(shared, name)?;
    let end = Instant::now() + timeout;
    loop {
        {
            let mut s = lock(&cell, name)?;
            s.check_not_started()?;
            let missing = s.not_ready();
            if missing.is_empty() && !s.components.is_empty() {
                s.start()?;
                return Ok(Reply::data(&SessionStarted {
                    name: name.to_string(),
                    state: s.state.public(),
                    components: s.components.len(),
                }));
            }
            if Instant::now() >= end {
                let what = if s.components.is_empty() {
                    "no component has registered".to_string()
                } else {
                    format!("not READY: {}", missing.join(", "))
                };
                return Err(Refusal::new(
                    ErrorCode::NotReady,
                    format!(
                        "session {name} did not start within {} ms: {what}",
                        timeout.as_millis()
                    ),
                ));
            }
        }
        std::thread::sleep(START_POLL);
    }
}

/// SESSION_LIST.
fn list(shared: &Shared) -> Reply {
    let infos: Vec<_> = shared
        .sessions
        .all()
        .iter()
        .filter_map(|cell| cell.lock().map(|s| s.info()))
        .collect();
    Reply::data(&infos)
}

/// SESSION_INSPECT (after a liveness tick, so that the view is current).
fn inspect(shared: &Shared, name: &str) -> Result<Reply, Refusal> {
    let cell = session(shared, name)?;
    let mut s = lock(&cell, name)?;
    s.tick();
    let mut view = s.inspect();
    view.requests = shared.requests.stats(&s.id);
    Ok(Reply::data(&view))
}

/// SESSION_STOP.
fn stop(shared: &Shared, name: &str) -> Result<Reply, Refusal> {
    let cell = session(shared, name)?;
    let mut s = lock(&cell, name)?;
    s.stop(State::Stopped, "stopped by `aegis-shmctl session stop`");
    Ok(Reply::data(&SessionStopped {
        name: name.to_string(),
        state: s.state.public(),
    }))
}

/// SESSION_EVICT.
fn evict(shared: &Shared, name: &str, component: &str) -> Result<Reply, Refusal> {
    let cell = session(shared, name)?;
    let mut s = lock(&cell, name)?;
    Ok(Reply::data(&s.evict(component)?))
}

/// SESSION_DESTROY: out of the registry, then out of its cell (its components' connections
/// see it gone), then stopped, its sequencer joined and its segments removed, under no lock.
fn destroy(shared: &Shared, name: &str) -> Result<Reply, Refusal> {
    let mut s = shared
        .sessions
        .remove(name)
        .and_then(|cell| cell.take())
        .ok_or_else(|| Refusal::no_session(name))?;
    s.stop(State::Stopped, "session destroyed");
    s.shutdown();
    shared.subs.forget(&s.id);
    shared.requests.forget(&s.id);
    drop(s);
    Ok(Reply::data(&SessionDestroyed {
        name: name.to_string(),
        destroyed: true,
    }))
}
