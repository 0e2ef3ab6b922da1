//! `SpinLock` (QEMU's `QemuSpin`).

use std::sync::atomic::Ordering;

use super::raw::{RawBlockingLock, RawLock};
use crate::coroutine::Co;
use crate::loom::{AtomicBool, spin_hint};

/// The raw lock of [`SpinLock`](super::SpinLock): test-and-test-and-set on one flag. For
/// critical sections of a few instructions; never hold it across a yield.
pub struct RawSpinLock {
    locked: AtomicBool,
}

impl std::fmt::Debug for RawSpinLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSpinLock").finish_non_exhaustive()
    }
}

impl RawSpinLock {
    /// Takes the lock (for locks built on this one).
    #[inline]
    pub(crate) fn lock_raw(&self) {
        self.spin_lock();
    }

    /// Gives the lock back.
    ///
    /// # Safety
    ///
    /// The caller holds it.
    #[inline]
    pub(crate) unsafe fn unlock_raw(&self) {
        self.locked.store(false, Ordering::Release);
    }

    #[inline]
    fn spin_lock(&self) {
        // Test and test-and-set: spin on plain loads, which keep the cache line shared, then
        // try a compare-and-swap, which (unlike a swap) writes nothing when it fails, so a
        // waiting thread changes nothing (which is also what lets loom see it as waiting).
        while self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                spin_hint();
            }
        }
    }
}

// SAFETY: the swap admits one holder at a time; acquire on taking, release on giving back.
unsafe impl RawLock for RawSpinLock {
    fn new() -> Self {
        RawSpinLock { locked: AtomicBool::new(false) }
    }

    const YIELD_SAFE: bool = false;

    #[inline]
    fn lock(&self, _co: &Co) {
        self.spin_lock();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

// SAFETY: as above.
unsafe impl RawBlockingLock for RawSpinLock {
    #[inline]
    fn lock_blocking(&self) {
        self.spin_lock();
    }
}
