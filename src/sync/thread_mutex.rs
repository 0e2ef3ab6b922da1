//! `ThreadMutex` (QEMU's `QemuMutex`): a mutex that blocks the thread, on a futex.

use std::sync::atomic::Ordering;

use super::raw::{RawBlockingLock, RawLock};
use crate::coroutine::Co;
use crate::loom::{AtomicU32, futex_wait, futex_wake_one};

/// Unlocked.
const UNLOCKED: u32 = 0;
/// Locked, nobody sleeping on it.
const LOCKED: u32 = 1;
/// Locked, and a thread may be sleeping on it: unlocking must wake one.
const CONTENDED: u32 = 2;

/// The raw lock of [`ThreadMutex`](super::ThreadMutex): the classic three-state futex mutex.
/// Blocks the whole thread (and so its context) while it waits; never hold it across a yield.
pub struct RawThreadMutex {
    /// `UNLOCKED`, `LOCKED` or `CONTENDED`.
    state: AtomicU32,
}

impl std::fmt::Debug for RawThreadMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawThreadMutex").finish_non_exhaustive()
    }
}

impl RawThreadMutex {
    #[inline]
    fn acquire(&self) {
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.acquire_contended();
        }
    }

    #[cold]
    fn acquire_contended(&self) {
        // Marking it contended before sleeping makes the holder's unlock wake us.
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            futex_wait(&self.state, CONTENDED);
        }
    }
}

// SAFETY: only the thread whose compare-and-swap or swap moves the state away from `UNLOCKED`
// holds the lock; acquire on taking, release on giving back.
unsafe impl RawLock for RawThreadMutex {
    fn new() -> Self {
        RawThreadMutex { state: AtomicU32::new(UNLOCKED) }
    }

    const YIELD_SAFE: bool = false;

    #[inline]
    fn lock(&self, _co: &Co) {
        self.acquire();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.state.compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            futex_wake_one(&self.state);
        }
    }
}

// SAFETY: as above.
unsafe impl RawBlockingLock for RawThreadMutex {
    #[inline]
    fn lock_blocking(&self) {
        self.acquire();
    }
}
