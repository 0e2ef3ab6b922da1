//! The one seam between production code and the loom model checker.
//!
//! Code that is shared between threads takes its atomics and locks from here. A normal build gets
//! `std`'s; a build with `RUSTFLAGS="--cfg aiocoro_loom"` gets loom's, so that `loom-tests/`
//! model-checks exactly the algorithm that ships.

#[cfg(not(aiocoro_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence,
};
#[cfg(not(aiocoro_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(aiocoro_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence,
};
#[cfg(aiocoro_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

/// Parking and unparking threads: `std`'s, or loom's, whose model threads park for real (a
/// wake-up that never comes is a deadlock the model reports).
pub(crate) mod thread {
    #[cfg(not(aiocoro_loom))]
    pub(crate) use std::thread::{Thread, current, park};

    #[cfg(aiocoro_loom)]
    pub(crate) use loom::thread::{Thread, current, park};
}

/// Tells the CPU that this thread spins waiting for another (under loom: lets another model
/// thread run, so that a spin loop cannot starve the model).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(aiocoro_loom))]
    std::hint::spin_loop();
    #[cfg(aiocoro_loom)]
    loom::thread::yield_now();
}

/// Sleeps while `word` holds `expected`, until [`futex_wake_one`] (a Linux futex); may return
/// early for no reason, so callers re-check. Under loom: yields to another model thread.
#[inline]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32) {
    #[cfg(not(aiocoro_loom))]
    crate::sys::futex_wait(word, expected);
    // The model of a futex: wait (yielding to other model threads) while the word holds
    // `expected`.
    #[cfg(aiocoro_loom)]
    while word.load(std::sync::atomic::Ordering::Relaxed) == expected {
        loom::thread::yield_now();
    }
}

/// Wakes one thread sleeping in [`futex_wait`] on `word`.
#[inline]
pub(crate) fn futex_wake_one(word: &AtomicU32) {
    #[cfg(not(aiocoro_loom))]
    crate::sys::futex_wake_one(word);
    #[cfg(aiocoro_loom)]
    let _ = word;
}
