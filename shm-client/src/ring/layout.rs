//! The ring's capacity rule and its data area.

use crate::segment;

/// Smallest ring capacity in bytes.
pub const MIN_CAPACITY: usize = 256;

/// Checks a ring capacity: a power of two, at least [`MIN_CAPACITY`].
pub fn check_capacity(capacity: usize) -> Result<(), segment::CreateError> {
    if !capacity_ok(capacity) {
        return Err(segment::CreateError::BadCapacity {
            capacity,
            reason: "must be a power of two of at least 256 bytes",
        });
    }
    Ok(())
}

/// Whether `capacity` is a usable ring capacity (the rule [`check_capacity`] reports on).
#[inline]
pub(crate) fn capacity_ok(capacity: usize) -> bool {
    capacity.is_power_of_two() && capacity >= MIN_CAPACITY
}

/// The data area of a mapped ring. Positions are monotonic byte counts (`u64`, never wrapping
/// in practice); the offset of position `p` is `p & mask`.
///
/// Invariants: `cap` is a power of two of at least [`MIN_CAPACITY`], `mask == cap - 1`, and
/// `data .. data + cap` lies inside a mapping that outlives this value (the owning
/// [`super::mapped::Mapped`] keeps the region alive).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingData {
    data: *mut u8,
    cap: u64,
    mask: u64,
}

impl RingData {
    /// # Safety
    /// `data .. data + cap` must be mapped memory that stays mapped while this value (or a copy)
    /// is used, and `cap` must satisfy [`capacity_ok`].
    pub(crate) unsafe fn new(data: *mut u8, cap: usize) -> RingData {
        debug_assert!(capacity_ok(cap));
        RingData {
            data,
            cap: cap as u64,
            mask: cap as u64 - 1,
        }
    }

    /// Capacity in bytes.
    #[inline]
    pub(crate) fn cap(&self) -> u64 {
        self.cap
    }

    /// The data offset of position `pos` (in `0..cap`).
    #[inline]
    pub(crate) fn offset(&self, pos: u64) -> usize {
        (pos & self.mask) as usize
    }

    /// Bytes from position `pos` to the wrap (in `1..=cap`).
    #[inline]
    pub(crate) fn contiguous(&self, pos: u64) -> u64 {
        self.cap - (pos & self.mask)
    }

    /// Asks the CPU to fetch, for writing, the cache line holding position `pos` (a hint: it
    /// writes nothing and never faults). The bus writer calls it a little ahead of where it
    /// writes: a store to a line another core holds (a consumer read it a lap ago) waits for
    /// the line, and stores drain in order, so a line fetched late holds every store behind
    /// it. Off x86-64, or on a CPU without PREFETCHW, it does nothing.
    #[inline]
    pub(crate) fn prefetch_write(&self, pos: u64) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        if has_prefetchw() {
            // SAFETY: the offset is inside the data area; a prefetch reads and writes nothing
            // the program can observe and never faults.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) self.data.add(self.offset(pos)),
                    options(nostack, preserves_flags, readonly)
                )
            };
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = pos;
    }

    /// A pointer to data offset `off`.
    ///
    /// # Safety
    /// `off <= cap`.
    #[inline]
    pub(crate) unsafe fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off as u64 <= self.cap);
        // SAFETY: `off <= cap` (the caller's promise), so the result stays inside the data
        // area or one past its end.
        unsafe { self.data.add(off) }
    }
}

/// Whether the CPU has PREFETCHW (CPUID 8000_0001h, ECX bit 8, "3DNowPrefetch"), read once.
/// (`is_x86_feature_detected!` does not know the feature on stable Rust.)
#[cfg(all(target_arch = "x86_64", not(loom)))]
#[inline]
fn has_prefetchw() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not read yet, 1: no, 2: yes. Relaxed: every thread computes the same answer.
    static HAS: AtomicU8 = AtomicU8::new(0);
    match HAS.load(Ordering::Relaxed) {
        0 => {
            // CPUID exists on every x86-64 CPU; leaf 8000_0000h says how far the extended
            // leaves go.
            use std::arch::x86_64::__cpuid;
            let yes =
                __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0;
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}
