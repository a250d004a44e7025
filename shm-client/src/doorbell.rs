//! Doorbells: how a reader that found nothing new sleeps without burning a core, and how the
//! writer wakes it within microseconds, across processes.
//!
//! A [`Doorbell`] lives in the control block of a ring or of the bus, in shared memory. It is a
//! futex word plus a "somebody may be asleep" flag:
//!
//! - the **reader** (`Doorbell::park`) reads the futex word, raises the flag, and (after a
//!   full fence) looks once more for new data; only if there still is none does it sleep in
//!   `FUTEX_WAIT` on the word, until woken or a timeout;
//! - the **writer** (`Doorbell::ring`), after the Release store that publishes new data,
//!   issues a full fence and loads the flag. Only if the flag is up does it clear it, bump the
//!   word and call `FUTEX_WAKE`. A writer whose readers all spin pays one fence and one load
//!   of a line nobody else writes, never a system call.
//!
//! The two fences make a Dekker pair: either the writer sees the flag, or the reader's last
//! look sees the data. The word closes the remaining gap: a wake that comes between the
//! reader's last look and its sleep has already bumped the word, so `FUTEX_WAIT` (which
//! compares the word with the value read before the flag went up) returns at once.
//!
//! The flag is a flag, not a count, so that a reader killed while asleep cannot leave the
//! writer calling `FUTEX_WAKE` forever: the next ring clears it, and only a reader that parks
//! again raises it again.
//!
//! The futexes are shared (no `FUTEX_PRIVATE_FLAG`): the sleeper and the waker are different
//! processes mapping the same segment. A process that maps the segment can always wake a
//! sleeper early or make its wait return at once; both only cost a re-check, since every
//! sleeper looks at the data again when it wakes (and sleeps are bounded by their timeout).
//!
//! Under `--cfg loom` the futex is modelled by a mutex and a condition variable, with no
//! timeout: a lost wakeup is a deadlock, which loom reports.

use std::time::Duration;

use crate::sync::{fence, AtomicU32, Ordering};

/// A futex word and a sleeper flag, on a cache line of their own in a control block. All-zero
/// bytes are a valid, idle doorbell.
#[repr(C)]
pub struct Doorbell {
    /// Bumped (Release) by the writer before every wake: the value sleepers compare.
    word: AtomicU32,
    /// 1 when a reader may be asleep (or about to be); cleared by the writer when it wakes.
    sleepers: AtomicU32,
    #[cfg(loom)]
    model: loom_futex::Model,
}

impl Doorbell {
    /// An idle doorbell (the value of all-zero bytes).
    pub(crate) fn fresh() -> Doorbell {
        Doorbell {
            word: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            #[cfg(loom)]
            model: loom_futex::Model::new(),
        }
    }

    /// The writer's side: call right after the Release store that publishes new data. Wakes
    /// every sleeper if one may be asleep.
    #[inline]
    pub(crate) fn ring(&self) {
        // SeqCst fence: pairs with the SeqCst fence in `Doorbell::park` (Dekker): either this
        // load sees the reader's flag, or the reader's re-check after its fence sees the data
        // published before this fence.
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        self.sleepers.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire load of the word in `park`. A reader that reads this
        // value (and so will not sleep on it) sees our publish on its re-check.
        self.word.fetch_add(1, Ordering::Release);
        futex::wake(self);
    }

    /// The reader's side: sleeps until the writer rings, `timeout` passes, or a spurious
    /// wakeup, unless `ready()` (the reader's look for new data, made after the flag is up)
    /// says there is something to read. The caller looks for data again afterwards either way.
    pub(crate) fn park(&self, ready: impl Fn() -> bool, timeout: Duration) {
        // Acquire: pairs with the Release increment in `wake`.
        let seen = self.word.load(Ordering::Acquire);
        self.sleepers.store(1, Ordering::Relaxed);
        // SeqCst fence: pairs with the one in `ring` (see there).
        fence(Ordering::SeqCst);
        if ready() {
            return;
        }
        futex::wait(self, seen, timeout);
    }

    /// Like [`Doorbell::park`] on several doorbells at once (the sequencer waiting on all its
    /// sources): returns when any of them rings.
    pub(crate) fn park_any(bells: &[&Doorbell], ready: impl Fn() -> bool, timeout: Duration) {
        // Beyond the limit of one system call, the bells left out are looked at by `ready`
        // and again after the timeout.
        let bells = &bells[..bells.len().min(futex::MAX_BELLS)];
        match bells {
            [] => {}
            [one] => one.park(ready, timeout),
            _ => {
                let mut seen = [0u32; futex::MAX_BELLS];
                for (s, b) in seen.iter_mut().zip(bells) {
                    // Acquire: as in `park`.
                    *s = b.word.load(Ordering::Acquire);
                    b.sleepers.store(1, Ordering::Relaxed);
                }
                // SeqCst fence: pairs with the one in `ring` of every bell.
                fence(Ordering::SeqCst);
                if ready() {
                    return;
                }
                futex::wait_any(bells, &seen[..bells.len()], timeout);
            }
        }
    }
}

/// A doorbell and the look for new data that goes with it: what a parking wait strategy
/// ([`crate::wait::Park`]) sleeps on.
pub trait Bell {
    /// Sleeps until rung or `timeout`, unless there is new data (see the module docs).
    fn park(&self, timeout: Duration);
}

#[cfg(not(loom))]
mod futex {
    //! The system calls.
    use std::time::Duration;

    use super::Doorbell;

    /// Bells one `futex_waitv` call can wait on.
    pub(super) const MAX_BELLS: usize = 128;

    fn timespec(d: Duration) -> libc::timespec {
        libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        }
    }

    pub(super) fn wait(bell: &Doorbell, seen: u32, timeout: Duration) {
        let ts = timespec(timeout);
        // SAFETY: the word is a valid, aligned u32 for the duration of the call (the doorbell
        // is borrowed); FUTEX_WAIT only reads it. The timeout is relative. EAGAIN (the word
        // changed), EINTR and ETIMEDOUT all mean "look again", which every caller does.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                bell.word.as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &ts as *const libc::timespec,
            );
        }
    }

    pub(super) fn wake(bell: &Doorbell) {
        // SAFETY: as in `wait`; FUTEX_WAKE does not access the word's value.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                bell.word.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
            );
        }
    }

    /// `struct futex_waitv` of the kernel's futex2 interface (Linux 5.16).
    #[repr(C)]
    struct FutexWaitv {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }

    /// `FUTEX2_SIZE_U32`.
    const FUTEX2_SIZE_U32: u32 = 2;

    pub(super) fn wait_any(bells: &[&Doorbell], seen: &[u32], timeout: Duration) {
        let waiters: Vec<FutexWaitv> = bells
            .iter()
            .zip(seen)
            .map(|(b, &s)| FutexWaitv {
                val: s as u64,
                uaddr: b.word.as_ptr() as u64,
                flags: FUTEX2_SIZE_U32,
                reserved: 0,
            })
            .collect();
        // futex_waitv takes an absolute CLOCK_MONOTONIC deadline.
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let end = Duration::new(now.tv_sec as u64, now.tv_nsec as u32).saturating_add(timeout);
        let end = timespec(end);
        // SAFETY: `waiters` describes valid, aligned u32 words that stay borrowed for the call;
        // the kernel only reads them and the array. Errors mean "look again", as in `wait`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex_waitv,
                waiters.as_ptr(),
                waiters.len() as libc::c_uint,
                0 as libc::c_uint,
                &end as *const libc::timespec,
                libc::CLOCK_MONOTONIC,
            )
        };
        if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // A kernel older than 5.16: sleep on the first bell, briefly, so the others are
            // still looked at often.
            wait(bells[0], seen[0], timeout.min(Duration::from_micros(200)));
        }
    }
}

#[cfg(loom)]
mod futex {
    //! The futex modelled for loom: a wait that compares and sleeps atomically (under the
    //! model's mutex), and a wake that notifies under it. No timeouts.
    use std::time::Duration;

    use super::Doorbell;
    use crate::sync::Ordering;

    pub(super) const MAX_BELLS: usize = 1;

    pub(super) fn wait(bell: &Doorbell, seen: u32, _timeout: Duration) {
        let g = bell.model.lock.lock().unwrap();
        if bell.word.load(Ordering::Relaxed) == seen {
            drop(bell.model.cv.wait(g).unwrap());
        }
    }

    pub(super) fn wake(bell: &Doorbell) {
        let _g = bell.model.lock.lock().unwrap();
        bell.model.cv.notify_all();
    }

    pub(super) fn wait_any(_: &[&Doorbell], _: &[u32], _: Duration) {
        unreachable!("MAX_BELLS is 1 under loom")
    }
}

#[cfg(loom)]
mod loom_futex {
    /// The kernel's futex hash bucket, for one doorbell.
    pub(super) struct Model {
        pub(super) lock: loom::sync::Mutex<()>,
        pub(super) cv: loom::sync::Condvar,
    }

    impl Model {
        pub(super) fn new() -> Model {
            Model {
                lock: loom::sync::Mutex::new(()),
                cv: loom::sync::Condvar::new(),
            }
        }
    }
}
