//! Declarative subscriptions, the daemon's side (SPEC section 14): the one source of truth for
//! what each component should receive, persisted in the state directory, pushed on every
//! change, and compared with what the components report.
//!
//! The store holds, per session name and component name, a desired topic set (consumers) and
//! a desired symbol set (producers that accept one). A REGISTER seeds the entry when the store
//! has none (its `topics`, or `requires` × `supported_symbols` × `supported_timeframes`, or a
//! symbol-accepting producer's `supported_symbols`); after that the store wins, so a
//! component that restarts, or registers again after a daemon restart, gets the set it had.
//! `aegis-shmctl subscribe` changes it.
//!
//! Persistence: `<state dir>/subscriptions.json`, rewritten whole on every change by an atomic
//! replace (a temporary file, fsync, rename, fsync of the directory). The map's lock is held
//! only to change or copy the map; the file is written under a second lock, in version order
//! (a write that finds a later version already on disk skips), so that no session's work ever
//! waits for a disk. A state file that does not parse is an error at `serve`, never ignored.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use aegis_shm_client::protocol::{self, ErrorCode, Register, Reply, Role};
use aegis_shm_client::reconcile::names_of;
use aegis_shm_client::subscription::{
    check_names, resolve_requires, Cause, Desired, ListError, NameSet, Push, Report, SetKind,
    Subscribed, SubscriptionInfo, SubscriptionsView, DEFAULT_RECONCILE_S,
};
use serde::{Deserialize, Serialize};

use crate::daemon::Shared;
use crate::refusal::Refusal;
use crate::session::Session;

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "subscriptions.json";
/// The state file's format version.
const FORMAT: u32 = 1;

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state file exists but does not hold a valid store.
    #[error("the subscription state file {path} is corrupt: {why}. The daemon will not start over it: fix it, or move it away to start with no desired sets")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// I/O.
    #[error("subscription state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One component's desired sets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    topics: NameSet,
    #[serde(default)]
    symbols: NameSet,
    version: u64,
}

impl Entry {
    fn desired(&self) -> Desired {
        Desired {
            topics: self.topics.clone(),
            symbols: self.symbols.clone(),
            version: self.version,
        }
    }
}

/// The state file.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    /// The last version handed out.
    version: u64,
    /// Session name → component name → entry.
    sessions: BTreeMap<String, BTreeMap<String, Entry>>,
}

/// A component's last reconciliation report, and when it came.
struct Reported {
    report: Report,
    at: Instant,
}

/// The daemon's subscription store.
pub struct Store {
    file: PathBuf,
    held: Mutex<StateFile>,
    /// The version last written to the file (file writes are serialised by this lock).
    written: Mutex<u64>,
    /// Reports by session id and component name (not persisted: they describe processes).
    reports: Mutex<BTreeMap<(String, String), Reported>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens the store in `dir` (created 0700 if missing), reading its state file if there is
    /// one. A file that does not parse, or holds invalid names, is [`StoreError::Corrupt`].
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let file = dir.join(STATE_FILE);
        let held = match std::fs::read(&file) {
            Ok(bytes) => parse(&bytes).map_err(|why| StoreError::Corrupt {
                path: file.clone(),
                why,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile {
                format: FORMAT,
                ..StateFile::default()
            },
            Err(e) => return Err(io(&file)(e)),
        };
        let written = held.version;
        Ok(Store {
            file,
            held: Mutex::new(held),
            written: Mutex::new(written),
            reports: Mutex::new(BTreeMap::new()),
        })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The desired set of `component` in session `session`, if the store holds one.
    pub fn desired(&self, session: &str, component: &str) -> Option<Desired> {
        let held = lock(&self.held);
        held.sessions
            .get(session)
            .and_then(|s| s.get(component))
            .map(Entry::desired)
    }

    /// The entry of `component`, or `seed` stored as its entry if there is none (in memory:
    /// [`Store::persist`] writes it). Returns the desired set and whether it was seeded.
    pub fn seed(&self, session: &str, component: &str, seed: Desired) -> (Desired, bool) {
        let mut held = lock(&self.held);
        if let Some(e) = held.sessions.get(session).and_then(|s| s.get(component)) {
            return (e.desired(), false);
        }
        if seed.topics == NameSet::All && seed.symbols == NameSet::All {
            // Nothing declared: nothing to keep (the file holds only explicit sets).
            return (Desired::default(), false);
        }
        held.version += 1;
        let entry = Entry {
            topics: seed.topics,
            symbols: seed.symbols,
            version: held.version,
        };
        let d = entry.desired();
        held.sessions
            .entry(session.to_string())
            .or_default()
            .insert(component.to_string(), entry);
        (d, true)
    }

    /// Sets `component`'s topics and/or symbols (in memory; [`Store::persist`] writes them)
    /// and returns its desired set, with a new version.
    pub fn set(
        &self,
        session: &str,
        component: &str,
        topics: Option<NameSet>,
        symbols: Option<NameSet>,
    ) -> Desired {
        let mut held = lock(&self.held);
        held.version += 1;
        let version = held.version;
        let e = held
            .sessions
            .entry(session.to_string())
            .or_default()
            .entry(component.to_string())
            .or_default();
        if let Some(t) = topics {
            e.topics = t;
        }
        if let Some(s) = symbols {
            e.symbols = s;
        }
        e.version = version;
        e.desired()
    }

    /// Every entry of session `session`, by component name.
    pub fn entries(&self, session: &str) -> BTreeMap<String, Desired> {
        let held = lock(&self.held);
        held.sessions
            .get(session)
            .map(|s| s.iter().map(|(c, e)| (c.clone(), e.desired())).collect())
            .unwrap_or_default()
    }

    /// Writes the store to its file, atomically, unless a later version is there already.
    /// The map is copied under its lock; the disk is written under the file lock only.
    pub fn persist(&self) -> Result<(), StoreError> {
        let (version, bytes) = {
            let held = lock(&self.held);
            let bytes =
                serde_json::to_vec_pretty(&*held).expect("the subscription state serialises");
            (held.version, bytes)
        };
        let mut written = lock(&self.written);
        if *written >= version {
            return Ok(());
        }
        write_atomic(&self.file, &bytes)?;
        *written = version;
        Ok(())
    }

    /// Records a component's reconciliation report.
    pub fn record(&self, session_id: &str, component: &str, report: Report) {
        lock(&self.reports).insert(
            (session_id.to_string(), component.to_string()),
            Reported {
                report,
                at: Instant::now(),
            },
        );
    }

    /// Forgets the reports of a destroyed session.
    pub fn forget(&self, session_id: &str) {
        lock(&self.reports).retain(|(s, _), _| s != session_id);
    }
}

/// Parses and checks a state file.
fn parse(bytes: &[u8]) -> Result<StateFile, String> {
    let f: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.format != FORMAT {
        return Err(format!("format {} (this daemon reads {FORMAT})", f.format));
    }
    for (session, comps) in &f.sessions {
        if !protocol::valid_name(session) {
            return Err(format!("invalid session name {session:?}"));
        }
        for (c, e) in comps {
            if !protocol::valid_name(c) {
                return Err(format!("invalid component name {c:?} in session {session}"));
            }
            if e.version > f.version {
                return Err(format!(
                    "entry {session}/{c} has version {} past the file's {}",
                    e.version, f.version
                ));
            }
            for (set, what) in [(&e.topics, "topic"), (&e.symbols, "symbol")] {
                if let NameSet::Only(names) = set {
                    check_names(names, what).map_err(|err| format!("{session}/{c}: {err}"))?;
                }
            }
        }
    }
    Ok(f)
}

/// Replaces `path` with `bytes` atomically: a temporary file beside it (0600), fsync, rename
/// over `path`, fsync of the directory (so the rename itself survives a crash).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p, source }
    };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// The default state directory for a daemon on `socket`: `<socket>.state` beside it (so two
/// daemons on two sockets never share one).
pub fn default_state_dir(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".state");
    socket.with_file_name(name)
}

fn list_refusal(e: ListError) -> Refusal {
    match e {
        ListError::BadName(m) => Refusal::new(ErrorCode::BadName, m),
        other => Refusal::bad_request(other.to_string()),
    }
}

/// The desired set a REGISTER declares (its seed, used when the store has none), checked.
pub fn seed_of(reg: &Register) -> Result<Desired, Refusal> {
    let consumes = reg.role.is_some_and(Role::consumes);
    if reg.accepts_symbols && !reg.role.is_some_and(Role::produces) {
        return Err(Refusal::bad_request(
            "accepts_symbols is for producers (a symbol set filters what a producer writes)",
        ));
    }
    let topics = if !reg.topics.is_empty() {
        check_names(&reg.topics, "topic").map_err(list_refusal)?;
        NameSet::only(reg.topics.iter().cloned())
    } else if consumes && !reg.requires.is_empty() {
        check_names(&reg.supported_symbols, "symbol").map_err(list_refusal)?;
        check_names(&reg.supported_timeframes, "topic").map_err(list_refusal)?;
        let t = resolve_requires(
            &reg.requires,
            &reg.supported_symbols,
            &reg.supported_timeframes,
        )
        .map_err(Refusal::bad_request)?;
        check_names(&t, "topic").map_err(list_refusal)?;
        NameSet::Only(t)
    } else {
        NameSet::All
    };
    let symbols = if reg.accepts_symbols && !reg.supported_symbols.is_empty() {
        check_names(&reg.supported_symbols, "symbol").map_err(list_refusal)?;
        NameSet::only(reg.supported_symbols.iter().cloned())
    } else {
        NameSet::All
    };
    Ok(Desired {
        topics,
        symbols,
        version: 0,
    })
}

/// In a started session the topic table is final: every desired topic must be in it.
pub fn check_topics(s: &Session, topics: &NameSet) -> Result<(), Refusal> {
    let NameSet::Only(names) = topics else {
        return Ok(());
    };
    if s.state.public() == protocol::SessionState::Created {
        return Ok(());
    }
    let table = s.topic_table();
    let unknown: Vec<&String> = names.iter().filter(|t| !table.contains_key(*t)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let known: Vec<&String> = table.keys().collect();
    Err(Refusal::new(
        ErrorCode::UnknownTopic,
        format!(
            "unknown topic{} {}: no source of session {} publishes {}; its topics are: {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            s.name,
            if unknown.len() > 1 { "them" } else { "it" },
            known
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// The reconciliation period of a session.
pub fn reconcile_s(s: &Session) -> u64 {
    s.spec.reconcile_s.unwrap_or(DEFAULT_RECONCILE_S)
}

/// A component's `SUBSCRIPTIONS` request: its desired set, as the store holds it.
pub(crate) fn answer(shared: &Shared, s: &Session, conn: u64) -> Reply {
    let name = s
        .components
        .iter()
        .find(|c| c.conn == conn)
        .map(|c| &c.name);
    let desired = name
        .and_then(|n| shared.subs.desired(&s.name, n))
        .unwrap_or_default();
    Reply::Subscriptions(Push {
        desired,
        cause: Cause::Requested,
    })
}

/// A component's `RECONCILED` report.
pub(crate) fn record(shared: &Shared, s: &Session, conn: u64, report: Report) {
    if let Some(c) = s.components.iter().find(|c| c.conn == conn) {
        shared.subs.record(&s.id, &c.name, report);
    }
}

/// `SUBSCRIBE`: checks the request against the session (under its lock), changes the store
/// and writes it (under no session lock), then pushes the new set to the running component.
pub(crate) fn subscribe(
    shared: &Shared,
    name: &str,
    component: &str,
    topics: Option<Vec<String>>,
    symbols: Option<Vec<String>>,
) -> Result<Reply, Refusal> {
    if !protocol::valid_name(component) {
        return Err(Refusal::bad_name("component name", component));
    }
    let (topics, symbols) = match (topics, symbols) {
        (Some(t), None) => {
            check_names(&t, "topic").map_err(list_refusal)?;
            (Some(NameSet::only(t)), None)
        }
        (None, Some(s)) => {
            check_names(&s, "symbol").map_err(list_refusal)?;
            (None, Some(NameSet::only(s)))
        }
        _ => {
            return Err(Refusal::bad_request(
                "SUBSCRIBE takes exactly one of topics and symbols",
            ))
        }
    };
    let cell = shared
        .sessions
        .get(name)
        .ok_or_else(|| Refusal::no_session(name))?;
    {
        let s = cell.lock().ok_or_else(|| Refusal::no_session(name))?;
        if let Some(c) = s.components.iter().rev().find(|c| c.name == component) {
            if topics.is_some() && !c.role.consumes() {
                return Err(Refusal::bad_request(format!(
                    "component {component} is a {}: it has no topic set (a producer takes --symbols)",
                    c.role
                )));
            }
            if symbols.is_some() && !c.accepts_symbols {
                return Err(Refusal::bad_request(format!(
                    "component {component} does not accept a symbol set (it registered without a symbol handler, e.g. aegis-replay without --symbols)"
                )));
            }
        }
        if let Some(t) = &topics {
            check_topics(&s, t)?;
        }
    }
    let desired = shared.subs.set(name, component, topics, symbols);
    let persisted = shared.subs.persist();
    let mut pushed = false;
    if let Some(s) = cell.lock() {
        let push = Reply::Subscriptions(Push {
            desired: desired.clone(),
            cause: Cause::Changed,
        });
        for c in s.components.iter().filter(|c| c.name == component) {
            if c.connected && !c.state.gone() {
                c.outbox.send(&push);
                pushed = true;
            }
        }
    }
    if let Err(e) = persisted {
        return Err(Refusal::internal(format!(
            "the desired set of {component} changed{} but was NOT persisted, so it will not survive a daemon restart: {e}",
            if pushed { " and was pushed" } else { "" }
        )));
    }
    Ok(Reply::data(&Subscribed {
        name: name.to_string(),
        component: component.to_string(),
        desired,
        pushed,
    }))
}

/// `SESSION_SUBSCRIPTIONS`: desired vs actual of every component that has a set or
/// reconciles one.
pub(crate) fn view(shared: &Shared, name: &str) -> Result<Reply, Refusal> {
    let cell = shared
        .sessions
        .get(name)
        .ok_or_else(|| Refusal::no_session(name))?;
    let s = cell.lock().ok_or_else(|| Refusal::no_session(name))?;
    let entries = shared.subs.entries(name);
    let table = s.topic_table();
    let reports = lock(&shared.subs.reports);
    let mut names: Vec<&String> = entries.keys().collect();
    for c in &s.components {
        if (c.role.consumes() || c.accepts_symbols) && !names.contains(&&c.name) {
            names.push(&c.name);
        }
    }
    names.sort();
    let mut rows = Vec::new();
    for n in names {
        let comp = s.components.iter().rev().find(|c| &c.name == n);
        let desired = entries.get(n).cloned().unwrap_or_default();
        let rep = reports.get(&(s.id.clone(), n.clone()));
        let mut kinds = Vec::new();
        match comp {
            Some(c) => {
                if c.role.consumes() {
                    kinds.push(SetKind::Topics);
                }
                if c.accepts_symbols {
                    kinds.push(SetKind::Symbols);
                }
            }
            None => {
                if desired.topics != NameSet::All || desired.symbols == NameSet::All {
                    kinds.push(SetKind::Topics);
                }
                if desired.symbols != NameSet::All {
                    kinds.push(SetKind::Symbols);
                }
            }
        }
        for kind in kinds {
            let (want, actual) = match kind {
                SetKind::Topics => (
                    desired.topics.clone(),
                    comp.filter(|c| !c.state.gone())
                        .and_then(|c| c.slot)
                        .and_then(|slot| s.topic_mask(slot))
                        .map(|m| names_of(m, &table)),
                ),
                SetKind::Symbols => (
                    desired.symbols.clone(),
                    rep.and_then(|r| r.report.symbols.clone()),
                ),
            };
            rows.push(SubscriptionInfo {
                component: n.clone(),
                role: comp.map(|c| c.role),
                state: comp.map(|c| c.public_state()),
                set: kind,
                in_sync: actual.as_ref().map(|a| *a == want),
                desired: want,
                actual,
                drift: rep.map_or(0, |r| r.report.drift),
                reconciles: rep.map_or(0, |r| r.report.reconciles),
                last_reconcile_age_s: rep.map(|r| r.at.elapsed().as_secs_f64()),
                last_reconcile_ms: rep.map(|r| r.report.duration_us as f64 / 1000.0),
                errors: rep.map(|r| r.report.errors.clone()).unwrap_or_default(),
            });
        }
    }
    Ok(Reply::data(&SubscriptionsView {
        name: name.to_string(),
        reconcile_s: reconcile_s(&s),
        components: rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "aegis-subs-unit-{}-{tag}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_store_survives_a_reopen_and_refuses_a_corrupt_file() {
        let d = dir("reopen");
        let st = Store::open(&d).unwrap();
        let (seeded, new) = st.seed(
            "s1",
            "tap",
            Desired {
                topics: NameSet::only(["trades.A".to_string()]),
                ..Desired::default()
            },
        );
        assert!(new);
        let again = st.seed("s1", "tap", Desired::default()).0;
        assert_eq!(again, seeded, "the store wins over a later seed");
        let d2 = st.set(
            "s1",
            "tap",
            Some(NameSet::only(["book.A".to_string()])),
            None,
        );
        assert!(d2.version > seeded.version);
        st.persist().unwrap();
        drop(st);
        let st = Store::open(&d).unwrap();
        assert_eq!(st.desired("s1", "tap"), Some(d2));
        assert!(!d.join("subscriptions.json.tmp").exists());
        drop(st);
        std::fs::write(d.join(STATE_FILE), b"{\"format\":1,\"version\":").unwrap();
        let e = Store::open(&d).err().expect("a corrupt file is an error");
        assert!(e.to_string().contains("is corrupt"), "{e}");
        std::fs::write(
            d.join(STATE_FILE),
            br#"{"format":1,"version":1,"sessions":{"s":{"c":{"topics":{"only":["a b"]},"version":1}}}}"#,
        )
        .unwrap();
        let e = Store::open(&d).err().expect("a bad topic is corruption");
        assert!(e.to_string().contains("a b"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn default_state_dir_is_beside_the_socket() {
        assert_eq!(
            default_state_dir(Path::new("/tmp/aegis/aegis-components.sock")),
            Path::new("/tmp/aegis/aegis-components.sock.state")
        );
    }
}
