//! The atomics every ring protocol uses, switched to loom's under `--cfg loom`.
//!
//! Ring code takes its atomics and fences from here and nowhere else, so the loom models in
//! `tests/loom_*.rs` exercise the very code that runs on `/dev/shm`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

/// A hint to the CPU that we are in a spin loop (a no-op yield under loom, so models terminate).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
