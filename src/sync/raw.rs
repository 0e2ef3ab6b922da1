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
///
/// [`RawLock::THREAD_BOUND`] may be true only if `Self` is neither `Sync` nor zero-sized (see
/// there).
///
/// # Panics
///
/// `lock` and `try_lock` may panic; a call that panics must leave the lock not held by the
/// caller (taking it and then panicking is a bug of the implementation). `unlock` must not
/// panic: a caller that unwinds from it could not know whether it still holds the lock, so
/// [`Lock`](super::Lock) aborts the process, with a message, if it does. Where a lock
/// operation releases a guard's lock and takes it back ([`CoQueue`](super::CoQueue)), a
/// panicking `lock` there (say, [`NoLock`](super::NoLock)'s check that finds another holder)
/// is met by taking the lock back with `try_lock`, or, if that fails, by aborting: a guard
/// always holds its lock.
pub unsafe trait RawLock {
    /// An unlocked lock. (A function rather than `lock_api`'s `const INIT`, so that the same
    /// code builds on loom's atomics, which are not `const`.)
    fn new() -> Self;

    /// Whether a guard may stay alive across a yield. False for locks that block or spin the
    /// thread: a coroutine that yields while holding one can deadlock its whole context.
    const YIELD_SAFE: bool;

    /// Whether a lock of this type never leaves the thread that uses it, so that a
    /// [`CoQueue`](super::CoQueue) under it may suspend its waiters in the light, same-thread
    /// way (a park record, which must never be touched from another thread).
    ///
    /// True only for a type that is not `Sync` and not zero-sized (a safety requirement of the
    /// trait). Not `Sync`: while a coroutine waits holding a reference to the lock, every
    /// reference to it and every guard of it are on that coroutine's thread. Not zero-sized:
    /// two such locks alive at one address are nested one in the other, so a guard of either
    /// is on that thread too.
    const THREAD_BOUND: bool = false;

    /// Acquires the lock. A coroutine lock suspends `co` while it waits; a thread lock blocks or
    /// spins the thread.
    fn lock(&self, co: &Co);

    /// Acquires the lock if that needs no waiting.
    fn try_lock(&self) -> bool;

    /// Releases the lock. Must not panic (see the trait's docs).
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
