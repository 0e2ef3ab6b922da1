//! The raw-lock traits: mutual exclusion without data, in the shape of `lock_api`.

use crate::coroutine::Co;

/// A lock without data; [`Lock`](super::Lock) adds the data and the RAII guard.
///
/// # Safety
///
/// Implementations must provide mutual exclusion: between a return from [`RawLock::lock`] (or a
/// `true` from [`RawLock::try_lock`]) and the matching [`RawLock::unlock`], no other call of
/// `lock` returns and no other `try_lock` succeeds. The acquiring operations must synchronise
/// with the releasing one (acquire / release ordering), so data written under the lock is seen
/// by the next holder.
pub unsafe trait RawLock {
    /// An unlocked lock. (A function rather than `lock_api`'s `const INIT`, so that the same
    /// code builds on loom's atomics, which are not `const`.)
    fn new() -> Self;

    /// Whether a guard may stay alive across a yield. False for locks that block or spin the
    /// thread: a coroutine that yields while holding one can deadlock its whole context.
    const YIELD_SAFE: bool;

    /// Acquires the lock. A coroutine lock suspends `co` while it waits; a thread lock blocks or
    /// spins the thread.
    fn lock(&self, co: &Co);

    /// Acquires the lock if that needs no waiting.
    fn try_lock(&self) -> bool;

    /// Releases the lock.
    ///
    /// # Safety
    ///
    /// The caller holds the lock.
    unsafe fn unlock(&self);
}

/// A raw lock that can also be taken outside a coroutine, by blocking or spinning the thread.
///
/// # Safety
///
/// As [`RawLock`]; `lock_blocking` acquires the same lock as `lock`.
pub unsafe trait RawBlockingLock: RawLock {
    /// Acquires the lock, blocking (or spinning) the thread until it can.
    fn lock_blocking(&self);
}
