//! The atomics every ring protocol uses, switched to loom's under `--cfg loom`.
//!
//! Ring code takes its atomics and fences from here and nowhere else, so the loom models in
//! `tests/loom_*.rs` exercise the very code that runs on `/dev/shm`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;

/// Under loom, every fence is modelled as a SeqCst fence.
///
/// Loom does not see the ring's data bytes, so it cannot know when a bus consumer's copy read
/// bytes the writer stored after its Release fence (the overwrite-policy seqlock): on hardware
/// that read makes the consumer's Acquire fence synchronise with the writer's, and the reload
/// of `claim` sees the announcement; in loom nothing links them, and the reload may return an
/// older `claim`, a false alarm. A SeqCst fence links them by execution order instead: loom runs
/// the data writes after the writer's fence and the reads before the consumer's fence, so a
/// consumer that saw the bytes sees the claim. What this gives up is checking the fences'
/// *strength*. The writer's order (announce, fence, then write) is still checked; the place of
/// the consumer's fence relative to its copy is not (loom sees no access in between).
#[cfg(loom)]
#[inline]
pub(crate) fn fence(order: Ordering) {
    assert_ne!(
        order,
        Ordering::Relaxed,
        "there is no such thing as a relaxed fence"
    );
    loom::sync::atomic::fence(Ordering::SeqCst);
}

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
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
