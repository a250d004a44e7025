//! The daemon's sessions by name, each behind its own lock.
//!
//! The registry's lock is held only to look a session up, add or remove one: never while a
//! session is created (its segments mapped), registers a component, starts, stops or ticks.
//! Those take the session's own lock, so one session's work never waits for another's.
//! Lock order: the registry, then a session, never the reverse (no code path takes the
//! registry's lock while it holds a session's).

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::session::{self, Session};

/// One session and what the registry needs without its lock. Connections of its components
/// hold the cell; [`SessionCell::take`] ends the session for all of them at once, so its
/// segments go when it is destroyed, not when the last connection closes.
pub struct SessionCell {
    /// The session's token, hex (immutable; compared without locking the session).
    token: String,
    /// `None` once destroyed.
    session: Mutex<Option<Session>>,
}

/// A locked, live session.
pub struct SessionGuard<'a>(MutexGuard<'a, Option<Session>>);

impl Deref for SessionGuard<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.0.as_ref().expect("a SessionGuard holds a session")
    }
}

impl DerefMut for SessionGuard<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        self.0.as_mut().expect("a SessionGuard holds a session")
    }
}

impl SessionCell {
    fn slot(&self) -> MutexGuard<'_, Option<Session>> {
        // A panic while it was locked leaves it usable.
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the session; `None` once it was destroyed.
    pub fn lock(&self) -> Option<SessionGuard<'_>> {
        let g = self.slot();
        g.is_some().then_some(SessionGuard(g))
    }

    /// Takes the session out (waiting for whoever holds its lock); `None` if already taken.
    pub fn take(&self) -> Option<Session> {
        self.slot().take()
    }
}

/// Sessions by name.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<BTreeMap<String, Arc<SessionCell>>>,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<SessionCell>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<SessionCell>> {
        self.map().get(name).cloned()
    }

    /// The session whose token is `token`. Every token is compared, in constant time, so the
    /// time taken says nothing about which one matched.
    pub fn by_token(&self, token: &str) -> Option<Arc<SessionCell>> {
        let mut found = None;
        for cell in self.map().values() {
            if session::ct_eq(token.as_bytes(), cell.token.as_bytes()) {
                found = Some(cell.clone());
            }
        }
        found
    }

    /// Every session, in name order (a snapshot: lock each one after this returns).
    pub fn all(&self) -> Vec<Arc<SessionCell>> {
        self.map().values().cloned().collect()
    }

    /// Adds `session`; `None` if its name is taken (the session is dropped, after the
    /// registry's lock is released, which removes its segments).
    pub fn insert(&self, session: Session) -> Option<Arc<SessionCell>> {
        let mut map = self.map();
        if map.contains_key(&session.name) {
            drop(map);
            return None;
        }
        let name = session.name.clone();
        let cell = Arc::new(SessionCell {
            token: session.token_hex(),
            session: Mutex::new(Some(session)),
        });
        map.insert(name, cell.clone());
        Some(cell)
    }

    /// Removes the session named `name`.
    pub fn remove(&self, name: &str) -> Option<Arc<SessionCell>> {
        self.map().remove(name)
    }

    /// Removes every session.
    pub fn take_all(&self) -> Vec<Arc<SessionCell>> {
        std::mem::take(&mut *self.map()).into_values().collect()
    }
}
