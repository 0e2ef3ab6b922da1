//! `NoLock`: state private to one context, where coroutines are atomic between yields.

use std::cell::Cell;

use super::raw::{RawBlockingLock, RawLock};
use crate::coroutine::Co;

/// The raw "lock" of [`NoLock`](super::NoLock): a flag that catches two holders at once.
///
/// Coroutines of one context never run at the same time, so state they share needs no lock as
/// long as nobody holds it across a yield. The flag turns a violation (a second coroutine
/// taking it while the first is suspended with it) into a clear panic instead of two `&mut`.
/// Not `Sync`: the state cannot leave its thread.
pub struct RawNoLock {
    held: Cell<bool>,
}

impl std::fmt::Debug for RawNoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawNoLock").field("held", &self.held.get()).finish()
    }
}

// SAFETY: `held` admits one holder at a time (a second `lock` panics, `try_lock` fails), and
// the type is not `Sync`, so all holders are on one thread and need no memory ordering. Not
// `Sync` (`Cell`) and not zero-sized (a `bool`), as `THREAD_BOUND` requires.
unsafe impl RawLock for RawNoLock {
    fn new() -> Self {
        RawNoLock { held: Cell::new(false) }
    }

    const YIELD_SAFE: bool = true;

    const THREAD_BOUND: bool = true;

    #[inline]
    fn lock(&self, _co: &Co) {
        self.lock_blocking();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        !self.held.replace(true)
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.held.set(false);
    }
}

// SAFETY: as above; taking it outside a coroutine is the same flag.
unsafe impl RawBlockingLock for RawNoLock {
    #[inline]
    fn lock_blocking(&self) {
        assert!(
            self.try_lock(),
            "aiocoro: a NoLock was taken while another holder (a coroutine suspended with its \
             guard) still has it; NoLock state is only atomic between yields, use a CoMutex to \
             hold it across one"
        );
    }
}
