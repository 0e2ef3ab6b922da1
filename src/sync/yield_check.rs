//! Rule 3 (`docs/design.md`) at run time: a guard of a lock that blocks the thread must not live
//! across a yield.
//!
//! The type system cannot see a yield (it is a call through `&Co`), so debug builds count the
//! thread-lock guards each thread holds; entering a coroutine records the count, and a yield
//! that finds more panics, naming the rule. Release builds skip the bookkeeping.

use std::cell::Cell;

use super::raw::RawLock;

thread_local! {
    /// Guards of thread-blocking locks alive on this thread (debug builds only).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// Counts a new guard of `R` (debug builds, thread-blocking locks).
#[inline]
pub(crate) fn acquired<R: RawLock>() {
    if cfg!(debug_assertions) && !R::YIELD_SAFE {
        HELD.with(|held| held.set(held.get() + 1));
    }
}

/// Uncounts a guard of `R`.
#[inline]
pub(crate) fn released<R: RawLock>() {
    if cfg!(debug_assertions) && !R::YIELD_SAFE {
        HELD.with(|held| held.set(held.get().saturating_sub(1)));
    }
}

/// Thread-lock guards alive on this thread (always 0 in release builds).
#[inline]
pub(crate) fn held() -> usize {
    if cfg!(debug_assertions) { HELD.try_with(Cell::get).unwrap_or(0) } else { 0 }
}
