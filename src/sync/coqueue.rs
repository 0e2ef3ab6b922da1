//! `CoQueue` (QEMU's `CoQueue` with `QemuLockable`): one queue of waiting coroutines, written
//! once, usable under every lock kind.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::Ordering;

use super::lock::LockGuard;
use super::raw::{RawBlockingLock, RawLock};
use crate::aio::{WaitRef, run_woken_coroutines};
use crate::coroutine::Co;
use crate::loom::AtomicUsize;

/// Coroutines waiting for a condition on data protected by a lock (QEMU's `CoQueue`).
///
/// The queue has no lock of its own: every call takes the guard of the lock that protects the
/// condition, of any kind ([`CoMutex`](super::CoMutex), [`ThreadMutex`](super::ThreadMutex),
/// [`SpinLock`](super::SpinLock), [`NoLock`](super::NoLock)). The first call ties the queue to
/// that lock; a call with a guard of another lock panics, because the queue's own state is
/// protected by that one lock.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use aiocoro::sync::{CoMutex, CoQueue};
/// use std::rc::Rc;
///
/// let ctx = AioContext::new()?;
/// let state = Rc::new((CoMutex::new(0u32), CoQueue::new()));
/// let s = state.clone();
/// let consumer = ctx.spawn(move |co| {
///     let (items, queue) = &*s;
///     let mut guard = items.lock(co);
///     while *guard == 0 {
///         queue.wait(co, &mut guard); // releases the lock while it waits
///     }
///     *guard -= 1;
/// });
/// let s = state.clone();
/// ctx.spawn(move |co| {
///     let (items, queue) = &*s;
///     let mut guard = items.lock(co);
///     *guard += 1;
///     queue.next(&mut guard);
/// });
/// ctx.wait_while(|| !consumer.is_ended());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CoQueue {
    /// The address of the lock this queue is used with (0 until the first call).
    lock: AtomicUsize,
    /// Wake records of the waiting coroutines, first to wake first; each is popped (and woken)
    /// once. Touched only under the lock named by `lock`.
    waiters: UnsafeCell<VecDeque<WaitRef>>,
}

// SAFETY: `waiters` is only touched by a caller that holds the one lock the queue is tied to
// (checked in `waiters`), which serialises those accesses across threads; records are
// `Send + Sync`.
unsafe impl Send for CoQueue {}
// SAFETY: as above.
unsafe impl Sync for CoQueue {}

impl Default for CoQueue {
    fn default() -> Self {
        CoQueue::new()
    }
}

impl CoQueue {
    /// An empty queue, not yet tied to a lock.
    pub fn new() -> CoQueue {
        CoQueue { lock: AtomicUsize::new(0), waiters: UnsafeCell::new(VecDeque::new()) }
    }

    /// Ties the queue to `guard`'s lock, or checks that it is tied to it; then gives access to
    /// the waiters, which that lock protects.
    #[allow(clippy::mut_from_ref, reason = "exclusive by the guard of the bound lock")]
    fn waiters<R: RawLock, T: ?Sized>(
        &self,
        guard: &LockGuard<'_, R, T>,
    ) -> &mut VecDeque<WaitRef> {
        let id = ptr::from_ref(guard.lock()).cast::<()>() as usize;
        let mut bound = self.lock.load(Ordering::Relaxed);
        if bound == 0 {
            bound = match self.lock.compare_exchange(0, id, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => id,
                Err(bound) => bound,
            };
        }
        assert_eq!(
            bound, id,
            "aiocoro: a CoQueue was used with a guard of a different lock than the one it is \
             tied to; each queue belongs to the one lock that protects its condition"
        );
        // SAFETY: the caller holds the lock the queue is tied to (the guard proves it, and the
        // check above proves it is that lock), so no other access to `waiters` is in progress.
        unsafe { &mut *self.waiters.get() }
    }

    /// Queues this coroutine, releases the lock, suspends until woken, and retakes the lock
    /// (QEMU's `qemu_co_queue_wait`). A waiter competes for the lock again when woken, so the
    /// condition must be re-checked in a loop.
    #[inline]
    pub fn wait<R: RawLock, T: ?Sized>(&self, co: &Co, guard: &mut LockGuard<'_, R, T>) {
        self.wait_at(co, guard, false);
    }

    /// Like [`CoQueue::wait`], but queues at the front: this coroutine is woken next.
    pub fn wait_front<R: RawLock, T: ?Sized>(&self, co: &Co, guard: &mut LockGuard<'_, R, T>) {
        self.wait_at(co, guard, true);
    }

    #[inline(always)]
    fn wait_at<R: RawLock, T: ?Sized>(
        &self,
        co: &Co,
        guard: &mut LockGuard<'_, R, T>,
        front: bool,
    ) {
        let wait = co.prepare_wait();
        let waiters = self.waiters(guard);
        if front {
            waiters.push_front(wait.wait_ref());
        } else {
            waiters.push_back(wait.wait_ref());
        }
        // SAFETY: the lock is retaken below, before the guard is used again, and `reacquired`
        // follows; the guard stays borrowed meanwhile, so its data cannot be reached.
        unsafe { guard.release() };
        wait.wait();
        guard.lock().raw().lock(co);
        guard.reacquired();
    }

    /// Wakes the first waiter, if any; it runs once the caller yields or returns to its
    /// context, and then retakes the lock (QEMU's `qemu_co_queue_next`). Returns whether there
    /// was one.
    pub fn next<R: RawLock, T: ?Sized>(&self, guard: &mut LockGuard<'_, R, T>) -> bool {
        match self.waiters(guard).pop_front() {
            Some(waker) => {
                // SAFETY: popped records are woken once, and a queued record's suspension
                // waits until then (it is only woken through this queue).
                unsafe { waker.wake() };
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter (QEMU's `qemu_co_queue_restart_all`); returns how many.
    pub fn restart_all<R: RawLock, T: ?Sized>(&self, guard: &mut LockGuard<'_, R, T>) -> usize {
        let woken: Vec<WaitRef> = self.waiters(guard).drain(..).collect();
        let count = woken.len();
        for waker in woken {
            // SAFETY: as in `next`.
            unsafe { waker.wake() };
        }
        count
    }

    /// Whether nobody waits (QEMU's `qemu_co_queue_empty`).
    pub fn is_empty<R: RawLock, T: ?Sized>(&self, guard: &LockGuard<'_, R, T>) -> bool {
        self.waiters(guard).is_empty()
    }

    /// For a caller outside a coroutine that holds the lock (QEMU's `qemu_co_enter_next`):
    /// wakes the first waiter, releases the lock, runs the woken coroutine now if it lives on
    /// this thread, and retakes the lock. Returns whether there was a waiter.
    pub fn enter_next<R: RawBlockingLock, T: ?Sized>(
        &self,
        guard: &mut LockGuard<'_, R, T>,
    ) -> bool {
        let Some(waker) = self.waiters(guard).pop_front() else { return false };
        self.enter_woken(guard, [waker]);
        true
    }

    /// Like [`CoQueue::enter_next`] for every waiter (QEMU's `qemu_co_enter_all`); returns how
    /// many there were.
    pub fn enter_all<R: RawBlockingLock, T: ?Sized>(
        &self,
        guard: &mut LockGuard<'_, R, T>,
    ) -> usize {
        let woken: Vec<WaitRef> = self.waiters(guard).drain(..).collect();
        let count = woken.len();
        if count > 0 {
            self.enter_woken(guard, woken);
        }
        count
    }

    fn enter_woken<R: RawBlockingLock, T: ?Sized>(
        &self,
        guard: &mut LockGuard<'_, R, T>,
        woken: impl IntoIterator<Item = WaitRef>,
    ) {
        // SAFETY: retaken below before the guard is used again.
        unsafe { guard.release() };
        for waker in woken {
            // SAFETY: as in `next`.
            unsafe { waker.wake_and_enter() };
        }
        // What the entered coroutines woke in turn runs before the lock is retaken.
        run_woken_coroutines();
        guard.lock().raw().lock_blocking();
        guard.reacquired();
    }
}
