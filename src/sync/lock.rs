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

    /// The lock `guard` holds. An associated function, as lock_api's `MutexGuard::mutex`, so
    /// that it does not hide a `lock` method of the protected data behind `Deref`: call it as
    /// `LockGuard::lock(&guard)`.
    pub fn lock(guard: &Self) -> &'a Lock<R, T> {
        guard.lock
    }

    /// Releases the lock while the guard stays borrowed (so the data cannot be reached), for
    /// [`CoQueue::wait`](super::CoQueue::wait): the returned span takes it back with
    /// [`Released::retake`], or, if a panic unwinds through it, as [`Released`] says.
    pub(crate) fn release<'g>(&'g mut self) -> Released<'g, 'a, R, T> {
        self.release_with(R::try_lock)
    }

    fn release_with<'g>(&'g mut self, retake_on_unwind: fn(&R) -> bool) -> Released<'g, 'a, R, T> {
        yield_check::released::<R>();
        // SAFETY: the guard holds the lock; the `Released` made below takes it back before the
        // guard can be used or dropped again (it borrows the guard until then).
        unsafe { unlock_or_abort(&self.lock.raw) };
        Released { guard: self, retake_on_unwind }
    }
}

impl<'a, R: RawBlockingLock, T: ?Sized> LockGuard<'a, R, T> {
    /// Like [`LockGuard::release`], for a caller outside a coroutine: the span takes the lock
    /// back by blocking the thread, with [`Released::retake_blocking`] or when a panic unwinds
    /// through it (for [`CoQueue::enter_next`](super::CoQueue::enter_next), whose caller may
    /// catch the panic of a coroutine it entered).
    pub(crate) fn release_blocking<'g>(&'g mut self) -> Released<'g, 'a, R, T> {
        self.release_with(|raw| {
            raw.lock_blocking();
            true
        })
    }
}

/// The span between releasing a guard's lock and taking it back, which borrows the guard so
/// that its data cannot be reached meanwhile (the spans of [`CoQueue::wait`](super::CoQueue)
/// and `enter_next` / `enter_all`).
///
/// Rule 5 of the design (`docs/design.md`): a guard always holds its lock, also after a panic
/// unwound through such a span and was caught. So the span ends by taking the lock back on
/// every path: by [`Released::retake`] (or `retake_blocking`) when the operation goes on
/// normally, and by its `Drop` when a panic unwinds through it (a coroutine entered by
/// `enter_next` panicked, or the lock's own `lock` panicked while taking it back). If the lock
/// cannot be taken back then, without waiting, the process aborts with a message naming the
/// rule: unwinding on would leave the caller a guard whose drop releases a lock that somebody
/// else holds, two `&mut` to one value.
#[must_use = "the lock must be taken back with `retake`"]
pub(crate) struct Released<'g, 'a, R: RawLock, T: ?Sized> {
    guard: &'g mut LockGuard<'a, R, T>,
    /// How the `Drop` of an unwinding takes the lock back; false if it could not.
    retake_on_unwind: fn(&R) -> bool,
}

impl<R: RawLock, T: ?Sized> Released<'_, '_, R, T> {
    /// The released lock.
    pub(crate) fn raw(&self) -> &R {
        &self.guard.lock.raw
    }

    /// Takes the lock back, waiting as [`RawLock::lock`] does (a coroutine lock suspends `co`,
    /// shielded from its context's cancellation: the lock must come back whatever happens). If
    /// `lock` panics, the `Drop` below handles the unwinding.
    #[inline]
    pub(crate) fn retake(self, co: &Co) {
        co.shielded(|| self.raw().lock(co));
        self.reacquired();
    }

    fn reacquired(self) {
        yield_check::acquired::<R>();
        std::mem::forget(self);
    }
}

impl<R: RawBlockingLock, T: ?Sized> Released<'_, '_, R, T> {
    /// Takes the lock back by blocking the thread.
    pub(crate) fn retake_blocking(self) {
        self.raw().lock_blocking();
        self.reacquired();
    }
}

impl<R: RawLock, T: ?Sized> Drop for Released<'_, '_, R, T> {
    /// Reached only by a panic unwinding through the span (the normal paths forget `self`).
    fn drop(&mut self) {
        if (self.retake_on_unwind)(&self.guard.lock.raw) {
            yield_check::acquired::<R>();
        } else {
            guard_without_lock();
        }
    }
}

#[cold]
#[inline(never)]
fn guard_without_lock() -> ! {
    eprintln!(
        "aiocoro: a panic unwound through CoQueue::wait (or enter_next / enter_all) while the \
         caller's lock was released, and the lock could not be taken back (somebody else holds \
         it); the caller's guard would then release a lock it does not hold, two holders of its \
         data. A guard always holds its lock (rule 5 of docs/design.md): aborting"
    );
    std::process::abort()
}

/// Releases `raw`; aborts the process if `unlock` panics, which the [`RawLock`] contract
/// forbids (an unwinding caller could not know whether it still holds the lock).
///
/// # Safety
///
/// As [`RawLock::unlock`]: the caller holds the lock.
#[inline(always)]
pub(crate) unsafe fn unlock_or_abort<R: RawLock>(raw: &R) {
    /// Aborts when dropped, which only an unwinding `unlock` does.
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            eprintln!(
                "aiocoro: RawLock::unlock panicked; the RawLock contract forbids it (the lock's \
                 state would be unknown to every guard): aborting"
            );
            std::process::abort();
        }
    }
    let bomb = Bomb;
    // SAFETY: the caller holds the lock.
    unsafe { raw.unlock() };
    std::mem::forget(bomb);
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
        unsafe { unlock_or_abort(&self.lock.raw) };
    }
}

impl<R: RawLock, T: ?Sized + fmt::Debug> fmt::Debug for LockGuard<'_, R, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}
