//! The client side of declarative subscriptions (SPEC section 14): the component applies the
//! desired set the daemon holds for it, at once when it is pushed, and compares it with the
//! actual set every `reconcile_s` seconds, repairing any difference and counting it as drift.
//!
//! - A consumer's actual set is its bus slot's topic mask ([`crate::spmc::TopicMask`]), which
//!   the daemon reads too; a repair stores the desired mask, which the reader applies from its
//!   next poll.
//! - A producer that accepts a symbol set installs a [`SymbolHandler`]: its
//!   [`SymbolHandler::actual`] is the actual set, and [`SymbolHandler::apply`] is called on a
//!   push and on a repair.
//!
//! Level-triggered, as a Kubernetes controller: a periodic reconciliation does not trust the
//! last push, it asks the daemon for the desired set again, then compares. Repairs are
//! idempotent (storing the same mask twice, applying the same set twice). One thread runs the
//! periodic ones and the pushes; `Subs::reconcile` holds a lock for its whole run, so the
//! application's thread (at attach and at STARTED) never runs one at the same time.
//!
//! After a (re-)registration the ACK carries the desired set, and it is applied before the
//! component reads or writes anything: at [`crate::client::Component::consumer`], at
//! [`crate::client::Component::ready`] (with the final topic table) and when the producer
//! installs its handler.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::spmc::{SlotTopics, TopicMask};
use crate::subscription::{Cause, Desired, NameSet, Push, Report};

/// A producer's symbol filter, driven by the desired set.
///
/// Both methods are called from the library's reconciliation thread (and once from the
/// thread that installs the handler): keep them short, and make the filter readable by the
/// producing threads (an atomic, or a lock they take rarely).
pub trait SymbolHandler: Send + Sync {
    /// Produce only `desired` from now on ([`NameSet::All`]: everything). Must be idempotent.
    fn apply(&self, desired: &NameSet);
    /// The set the producer filters by now: its actual set.
    fn actual(&self) -> NameSet;
}

/// What ran a reconciliation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The application: the consumer attached, the session started, a handler was installed.
    /// Applies the desired set; a difference is not drift.
    Start,
    /// A push of a changed desired set: applied at once; not drift.
    Push,
    /// The periodic check after re-reading the desired set: a difference is drift.
    Periodic,
}

/// The subscription state of one component, shared by the control connection's reader
/// thread, the reconciliation thread and the application.
pub(crate) struct Subs {
    state: Mutex<State>,
    /// Signalled on a push, an answer and shutdown ([`Subs::wake_all`]).
    wake: Condvar,
    /// Held for the whole of a reconciliation: no two at once.
    running: Mutex<()>,
}

#[derive(Default)]
struct State {
    desired: Desired,
    /// A changed desired set arrived and is not applied yet.
    pending_push: bool,
    /// Answers to our `SUBSCRIPTIONS` requests so far.
    answers: u64,
    /// The session's topic table (name → id): the ACK's, then STARTED's (final).
    table: BTreeMap<String, u32>,
    mask: Option<Arc<SlotTopics>>,
    handler: Option<Arc<dyn SymbolHandler>>,
    drift: u64,
    reconciles: u64,
    last: Option<(Instant, Duration)>,
    errors: Vec<String>,
}

/// The component's reconciliation figures so far (also reported to the daemon).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileStatus {
    /// The desired set held now.
    pub desired: Desired,
    /// Differences found by periodic reconciliations (and repaired).
    pub drift: u64,
    /// Reconciliations run.
    pub reconciles: u64,
    /// When the last one ended, and how long it took.
    pub last: Option<(Instant, Duration)>,
    /// Errors of the last one.
    pub errors: Vec<String>,
}

impl Subs {
    pub(crate) fn new(desired: Desired, table: BTreeMap<String, u32>) -> Subs {
        Subs {
            state: Mutex::new(State {
                desired,
                table,
                ..State::default()
            }),
            wake: Condvar::new(),
            running: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `SUBSCRIPTIONS` message arrived (reader thread). An older version than the one
    /// held is ignored.
    pub(crate) fn received(&self, p: Push) {
        let mut st = self.lock();
        if p.desired.version >= st.desired.version {
            st.desired = p.desired;
        }
        match p.cause {
            Cause::Changed => st.pending_push = true,
            Cause::Requested => st.answers += 1,
        }
        self.wake.notify_all();
    }

    /// The final topic table arrived with STARTED (reader thread).
    pub(crate) fn set_table(&self, table: BTreeMap<String, u32>) {
        self.lock().table = table;
    }

    /// The consumer attached: its slot's mask is the actual topic set from now on.
    pub(crate) fn set_mask(&self, mask: SlotTopics) {
        self.lock().mask = Some(Arc::new(mask));
    }

    /// The producer installed its handler.
    pub(crate) fn set_handler(&self, h: Arc<dyn SymbolHandler>) {
        self.lock().handler = Some(h);
    }

    /// Whether there is anything to reconcile (a mask or a handler).
    pub(crate) fn has_targets(&self) -> bool {
        let st = self.lock();
        st.mask.is_some() || st.handler.is_some()
    }

    /// The number of answers received so far (to wait for the next one).
    pub(crate) fn answers(&self) -> u64 {
        self.lock().answers
    }

    /// Waits up to `timeout` for more than `seen` answers, a push or `stop()`; returns
    /// whether an answer came.
    pub(crate) fn wait_answer(
        &self,
        seen: u64,
        timeout: Duration,
        stop: impl Fn() -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.answers > seen {
                return true;
            }
            let now = Instant::now();
            if now >= end || stop() {
                return false;
            }
            st = self
                .wake
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until a push is pending, `until` passes or `stop()`; returns whether a push is
    /// pending.
    pub(crate) fn wait_push(&self, until: Instant, stop: impl Fn() -> bool) -> bool {
        let mut st = self.lock();
        loop {
            if st.pending_push {
                return true;
            }
            let now = Instant::now();
            if now >= until || stop() {
                return false;
            }
            // Woken by a push or shutdown; the timeout bounds how late `stop` is noticed.
            let wait = (until - now).min(Duration::from_millis(200));
            st = self
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes the reconciliation thread out of [`Subs::wait_push`] or [`Subs::wait_answer`] to
    /// look at its `stop` again: the component is dropped (`Component::drop` set its quit
    /// flag first). Under the state lock, as the waits check `stop` under it: a notify sent
    /// without it could land after the check and before the wait, and be lost; the thread
    /// then slept out `wait_answer`'s whole timeout (5 s) while `drop` joined it.
    pub(crate) fn wake_all(&self) {
        let _st = self.lock();
        self.wake.notify_all();
    }

    /// The figures so far.
    pub(crate) fn status(&self) -> ReconcileStatus {
        let st = self.lock();
        ReconcileStatus {
            desired: st.desired.clone(),
            drift: st.drift,
            reconciles: st.reconciles,
            last: st.last,
            errors: st.errors.clone(),
        }
    }

    /// Compares the desired set with the actual one and repairs any difference; returns the
    /// report for the daemon, or `None` when there is nothing to reconcile. A pending push
    /// is applied as such even when a periodic run finds it (it is a change, not drift).
    pub(crate) fn reconcile(&self, trigger: Trigger) -> Option<Report> {
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let (desired, table, mask, handler, trigger) = {
            let mut st = self.lock();
            let trigger = if std::mem::take(&mut st.pending_push) {
                Trigger::Push
            } else {
                trigger
            };
            (
                st.desired.clone(),
                st.table.clone(),
                st.mask.clone(),
                st.handler.clone(),
                trigger,
            )
        };
        if mask.is_none() && handler.is_none() {
            return None;
        }
        let mut errors = Vec::new();
        let mut drifted = false;
        let mut topics = None;
        if let Some(mask) = &mask {
            let want = mask_of(&desired.topics, &table, &mut errors);
            match mask.get() {
                None => errors.push(format!(
                    "bus slot {} is no longer this consumer's (released by the daemon)",
                    mask.slot()
                )),
                Some(actual) => {
                    if actual != want {
                        drifted = true;
                        if !mask.set(want) {
                            errors.push(format!(
                                "bus slot {} was released before the repair",
                                mask.slot()
                            ));
                        }
                    }
                    topics = mask.get().map(|m| names_of(m, &table));
                }
            }
        }
        let mut symbols = None;
        if let Some(h) = &handler {
            if h.actual() != desired.symbols {
                drifted = true;
                h.apply(&desired.symbols);
            }
            let now = h.actual();
            if now != desired.symbols {
                errors.push(format!(
                    "the symbol handler reports {now} after applying {}",
                    desired.symbols
                ));
            }
            symbols = Some(now);
        }
        let took = t0.elapsed();
        let mut st = self.lock();
        if drifted && trigger == Trigger::Periodic {
            st.drift += 1;
        }
        st.reconciles += 1;
        st.last = Some((Instant::now(), took));
        st.errors = errors.clone();
        Some(Report {
            topics,
            symbols,
            version: desired.version,
            drift: st.drift,
            reconciles: st.reconciles,
            duration_us: took.as_micros() as u64,
            errors,
        })
    }
}

/// The mask of a desired topic set under `table`; a topic the table lacks is an error (no
/// source of the session publishes it), and is left out.
fn mask_of(topics: &NameSet, table: &BTreeMap<String, u32>, errors: &mut Vec<String>) -> TopicMask {
    match topics {
        NameSet::All => TopicMask::ALL,
        NameSet::Only(names) => {
            let mut ids = Vec::new();
            for n in names {
                match table.get(n) {
                    Some(&id) => ids.push(id),
                    None => errors.push(format!("no source of the session publishes topic {n}")),
                }
            }
            TopicMask::from_ids(ids).unwrap_or_else(|e| {
                errors.push(e.to_string());
                TopicMask::NONE
            })
        }
    }
}

/// The topic names of `mask` under `table` (ids the table lacks show as `#ID`).
pub fn names_of(mask: TopicMask, table: &BTreeMap<String, u32>) -> NameSet {
    if mask == TopicMask::ALL {
        return NameSet::All;
    }
    let by_id: BTreeMap<u32, &String> = table.iter().map(|(n, &id)| (id, n)).collect();
    NameSet::only(mask.ids().map(|id| {
        by_id
            .get(&id)
            .map_or_else(|| format!("#{id}"), |n| n.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Filter(Mutex<NameSet>, Mutex<u32>);
    impl SymbolHandler for Filter {
        fn apply(&self, d: &NameSet) {
            *self.0.lock().unwrap() = d.clone();
            *self.1.lock().unwrap() += 1;
        }
        fn actual(&self) -> NameSet {
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn producer_drift_is_repaired_and_counted_only_by_periodic_runs() {
        let desired = Desired {
            symbols: NameSet::only(["BTCUSDT".to_string()]),
            ..Desired::default()
        };
        let subs = Subs::new(desired, BTreeMap::new());
        assert!(
            subs.reconcile(Trigger::Start).is_none(),
            "nothing to reconcile yet"
        );
        let f = Arc::new(Filter(Mutex::new(NameSet::All), Mutex::new(0)));
        subs.set_handler(f.clone());
        let r = subs.reconcile(Trigger::Start).unwrap();
        assert_eq!(r.drift, 0);
        assert_eq!(f.actual(), NameSet::only(["BTCUSDT".to_string()]));
        // In sync: idempotent, the callback is not called again.
        let r = subs.reconcile(Trigger::Periodic).unwrap();
        assert_eq!((r.drift, *f.1.lock().unwrap()), (0, 1));
        // A bug changes the producer's filter: the next periodic run repairs it, drift 1.
        *f.0.lock().unwrap() = NameSet::All;
        let r = subs.reconcile(Trigger::Periodic).unwrap();
        assert_eq!(r.drift, 1);
        assert_eq!(r.symbols, Some(NameSet::only(["BTCUSDT".to_string()])));
        // A push is a change, not drift, even when a periodic run picks it up.
        subs.received(Push {
            desired: Desired {
                symbols: NameSet::only(["ETHUSDT".to_string()]),
                version: 2,
                ..Desired::default()
            },
            cause: Cause::Changed,
        });
        let r = subs.reconcile(Trigger::Periodic).unwrap();
        assert_eq!((r.drift, r.version), (1, 2));
        assert_eq!(f.actual(), NameSet::only(["ETHUSDT".to_string()]));
        // An older version is ignored.
        subs.received(Push {
            desired: Desired::default(),
            cause: Cause::Requested,
        });
        assert_eq!(subs.status().desired.version, 2);
    }

    /// Regression: the shutdown's notify was sent without the state lock, so a waiter that
    /// had just found `stop()` false, and was not waiting yet, missed it and slept out its
    /// whole timeout. Here the waiter is caught inside that check when the stop comes.
    #[test]
    fn a_stop_between_the_check_and_the_wait_is_not_missed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let subs = Arc::new(Subs::new(Desired::default(), BTreeMap::new()));
        let quit = Arc::new(AtomicBool::new(false));
        let (checking_tx, checking_rx) = std::sync::mpsc::channel();
        let waiter = {
            let (subs, quit) = (subs.clone(), quit.clone());
            std::thread::spawn(move || {
                let stop = || {
                    let q = quit.load(Ordering::SeqCst);
                    let _ = checking_tx.send(());
                    if !q {
                        // Found false: the stop comes now, before this thread waits.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    q
                };
                let t0 = Instant::now();
                let answered = subs.wait_answer(0, Duration::from_secs(10), stop);
                (answered, t0.elapsed())
            })
        };
        checking_rx.recv().expect("the waiter checks stop");
        quit.store(true, Ordering::SeqCst);
        subs.wake_all();
        let (answered, took) = waiter.join().expect("waiter");
        assert!(!answered);
        assert!(
            took < Duration::from_secs(3),
            "the stop was missed: the waiter slept {took:?}"
        );
    }

    #[test]
    fn topic_names_and_masks() {
        let table: BTreeMap<String, u32> = [("a".to_string(), 0), ("b".to_string(), 1)].into();
        let mut errors = Vec::new();
        let m = mask_of(
            &NameSet::only(["b".to_string(), "z".to_string()]),
            &table,
            &mut errors,
        );
        assert_eq!(m, TopicMask::from_ids([1]).unwrap());
        assert_eq!(errors.len(), 1);
        assert_eq!(names_of(m, &table), NameSet::only(["b".to_string()]));
        assert_eq!(names_of(TopicMask::ALL, &table), NameSet::All);
    }
}
