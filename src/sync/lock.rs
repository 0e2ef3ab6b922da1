//! `Lock<R, T>`: data reachable only through a guard of its raw lock `R`.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use super::raw::{RawBlockingLock, RawLock};
use super::yield_check;
use crate::coroutine::Co;

/// Data of type `T` protected by the raw lock `R`: the one generic lock behind
/// [`CoMutex`](super::CoMutex), [`ThreadMutex`](super::ThreadMutex),
/// [`SpinLock`](super::SpinLock) and [`NoLock`](super::NoLock). The data is reached only
/// through a [`LockGuard`], which releases the lock when dropped.
pub struct Lock<R, T: ?Sized> {
    raw: R,
    data: UnsafeCell<T>,
}

// SAFETY: the lock owns its data; sending the lock sends the data.
unsafe impl<R: RawLock + Send, T: ?Sized + Send> Send for Lock<R, T> {}
// SAFETY: shared access to the data goes through the raw lock, which provides mutual exclusion
// (the `RawLock` contract), so `&Lock` hands `&mut T` to one party at a time; `T: Send` because
// those parties may be on different threads.
unsafe impl<R: RawLock + Sync, T: ?Sized + Send> Sync for Lock<R, T> {}

impl<R: RawLock, T> Lock<R, T> {
    /// An unlocked lock around `value`.
    pub fn new(value: T) -> Self {
        Lock { raw: R::new(), data: UnsafeCell::new(value) }
    }

    /// The data, taking the lock apart.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<R: RawLock, T: ?Sized> Lock<R, T> {
    /// Acquires the lock: suspends the coroutine while a coroutine lock is held elsewhere, or
    /// blocks the thread for a thread lock.
    #[inline]
    pub fn lock(&self, co: &Co) -> LockGuard<'_, R, T> {
        self.raw.lock(co);
        // SAFETY: the lock was just acquired.
        unsafe { LockGuard::new(self) }
    }

    /// Acquires the lock if that needs no waiting.
    #[inline]
    pub fn try_lock(&self) -> Option<LockGuard<'_, R, T>> {
        // SAFETY: the lock was just acquired.
        self.raw.try_lock().then(|| unsafe { LockGuard::new(self) })
    }

    /// The data, through exclusive access to the lock (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    /// The raw lock.
    pub fn raw(&self) -> &R {
        &self.raw
    }
}

impl<R: RawBlockingLock, T: ?Sized> Lock<R, T> {
    /// Acquires the lock outside a coroutine, blocking (or spinning) the thread.
    #[inline]
    pub fn lock_blocking(&self) -> LockGuard<'_, R, T> {
        self.raw.lock_blocking();
        // SAFETY: the lock was just acquired.
        unsafe { LockGuard::new(self) }
    }
}

impl<R: RawLock, T: Default> Default for Lock<R, T> {
    fn default() -> Self {
        Lock::new(T::default())
    }
}

impl<R: RawLock, T: ?Sized> fmt::Debug for Lock<R, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").finish_non_exhaustive()
    }
}

/// Proof that the lock is held, and the way to its data; dropping it releases the lock.
///
/// A guard stays with the coroutine or thread that took it (it is not `Send`). A guard of a
/// lock that blocks the thread ([`ThreadMutex`](super::ThreadMutex),
/// [`SpinLock`](super::SpinLock)) must not be held across a yield: debug builds panic at such a
/// yield (see the [module docs](super)).
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a, R: RawLock, T: ?Sized> {
    lock: &'a Lock<R, T>,
    _not_send: PhantomData<*const ()>,
}

// SAFETY: a shared guard only hands out `&T`.
unsafe impl<R: RawLock + Sync, T: ?Sized + Sync> Sync for LockGuard<'_, R, T> {}

impl<'a, R: RawLock, T: ?Sized> LockGuard<'a, R, T> {
    /// # Safety
    ///
    /// The caller has just acquired `lock`, and hands that ownership to the guard.
    #[inline]
    unsafe fn new(lock: &'a Lock<R, T>) -> Self {
        yield_check::acquired::<R>();
        LockGuard { lock, _not_send: PhantomData }
    }

    /// The lock this guard holds.
    pub fn lock(&self) -> &'a Lock<R, T> {
        self.lock
    }

    /// Releases the lock while the guard stays borrowed (so the data cannot be reached), for
    /// [`CoQueue::wait`](super::CoQueue::wait) and friends.
    ///
    /// # Safety
    ///
    /// The caller calls [`LockGuard::reacquired`] after taking the lock again, before the guard
    /// is used or dropped.
    pub(crate) unsafe fn release(&mut self) {
        yield_check::released::<R>();
        // SAFETY: the guard holds the lock.
        unsafe { self.lock.raw.unlock() };
    }

    /// Records that the lock was taken again after [`LockGuard::release`].
    pub(crate) fn reacquired(&mut self) {
        yield_check::acquired::<R>();
    }
}

impl<R: RawLock, T: ?Sized> Deref for LockGuard<'_, R, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so nobody else reaches the data.
        unsafe { &*self.lock.data.get() }
    }
}

impl<R: RawLock, T: ?Sized> DerefMut for LockGuard<'_, R, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock and is borrowed mutably: this is the only access.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<R: RawLock, T: ?Sized> Drop for LockGuard<'_, R, T> {
    #[inline]
    fn drop(&mut self) {
        yield_check::released::<R>();
        // SAFETY: the guard holds the lock and gives it up here.
        unsafe { self.lock.raw.unlock() };
    }
}

impl<R: RawLock, T: ?Sized + fmt::Debug> fmt::Debug for LockGuard<'_, R, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}
