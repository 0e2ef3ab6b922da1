//! `CoQueue` (QEMU's `CoQueue` with `QemuLockable`): one queue of waiting coroutines, written
//! once, usable under every lock kind.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::Ordering;

use super::lock::LockGuard;
use super::raw::{RawBlockingLock, RawLock};
use crate::aio::{ParkRecord, PendingWake, Wait, WaitRef, run_woken_coroutines};
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
/// Under a lock that never leaves its thread ([`NoLock`](super::NoLock)), waiters park (a
/// lighter suspension than a wait-table entry, see the architecture notes) instead of taking
/// wake records that any thread may use.
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
/// ctx.wait_while(|| !consumer.is_finished());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CoQueue {
    /// The address of the lock this queue is used with (0 until the first call).
    lock: AtomicUsize,
    /// Wake records of the coroutines waiting under a lock that is not
    /// [`THREAD_BOUND`](RawLock::THREAD_BOUND), first to wake first; each is popped (and
    /// woken) once. Touched only under the lock named by `lock`, by callers whose lock type is
    /// not thread-bound.
    waiters: UnsafeCell<VecDeque<WaitRef>>,
    /// Park records of the coroutines waiting under a thread-bound lock, first to wake first;
    /// each is popped (and unparked) once.
    ///
    /// Invariant: touched only under the lock named by `lock`, by callers whose lock type is
    /// thread-bound; every record here belongs to a coroutine suspended in
    /// [`CoQueue::wait_at`] until its record is popped (it checked that it may yield before
    /// queueing the record, and the record owns a handle, so it can neither fail before
    /// suspending nor be dropped while it waits). Such a coroutine holds a reference to the
    /// queue and one to the lock until it resumes, so while the list is not empty the queue
    /// cannot move or be dropped, and by the `THREAD_BOUND` rules every guard that passes the
    /// check in `bound` is on that coroutine's thread: the records never leave it.
    parked: UnsafeCell<VecDeque<ParkRecord>>,
}

impl std::fmt::Debug for CoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoQueue").finish_non_exhaustive()
    }
}

// SAFETY: `waiters` is only touched by a caller that holds the one lock the queue is tied to
// (checked in `bound`), which serialises those accesses across threads; its records are
// `Send + Sync`. `parked` is only touched on the thread of its records, and the queue cannot
// move to another thread or be dropped there while it holds any (field invariant).
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
        CoQueue {
            lock: AtomicUsize::new(0),
            waiters: UnsafeCell::new(VecDeque::new()),
            parked: UnsafeCell::new(VecDeque::new()),
        }
    }

    /// Ties the queue to `guard`'s lock, or checks that it is tied to it.
    #[inline]
    fn bound<R: RawLock, T: ?Sized>(&self, guard: &LockGuard<'_, R, T>) {
        let id = ptr::from_ref(LockGuard::lock(guard)).cast::<()>() as usize;
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
    }

    /// The wake records, which the lock protects; for a lock type that is not thread-bound.
    #[allow(clippy::mut_from_ref, reason = "exclusive by the guard of the bound lock")]
    #[inline]
    fn waiters<R: RawLock, T: ?Sized>(
        &self,
        guard: &LockGuard<'_, R, T>,
    ) -> &mut VecDeque<WaitRef> {
        debug_assert!(!R::THREAD_BOUND);
        self.bound(guard);
        // SAFETY: the caller holds the lock the queue is tied to (the guard proves it, and
        // `bound` proves it is that lock), so no other access to `waiters` is in progress.
        unsafe { &mut *self.waiters.get() }
    }

    /// The park records, which the lock protects; for a thread-bound lock type.
    #[allow(clippy::mut_from_ref, reason = "exclusive by the guard of the bound lock")]
    #[inline]
    fn parked<R: RawLock, T: ?Sized>(
        &self,
        guard: &LockGuard<'_, R, T>,
    ) -> &mut VecDeque<ParkRecord> {
        debug_assert!(R::THREAD_BOUND);
        self.bound(guard);
        // SAFETY: as in `waiters`, and the guard is of a thread-bound lock, so this is the
        // thread of the records (field invariant).
        unsafe { &mut *self.parked.get() }
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
        if R::THREAD_BOUND {
            let parked = self.parked(guard);
            // `park` fails (if it does) before there is a record, and nothing fails between
            // queueing the record and suspending (see the invariant on `parked`). The guard of
            // a thread lock is released before the yield.
            let record = co.park(usize::from(!R::YIELD_SAFE));
            if front {
                parked.push_front(record);
            } else {
                parked.push_back(record);
            }
            let released = guard.release();
            // A park is not cancelled, and its record holds a handle to this coroutine (an
            // orphaned record is leaked, never dropped), so nothing unwinds from here.
            co.wait_unparked();
            released.retake(co);
            return;
        }
        // Fail, if at all, before queueing a record: one left behind would name a wait that is
        // over, in a context that may be gone when someone pops it. The guard of a thread
        // lock is released before the yield.
        co.assert_may_yield(usize::from(!R::YIELD_SAFE));
        let wait = co.prepare_wait();
        let waiters = self.waiters(guard);
        if front {
            waiters.push_front(wait.wait_ref());
        } else {
            waiters.push_back(wait.wait_ref());
        }
        let released = guard.release();
        let woken = wait.suspend();
        released.retake(co);
        if woken.is_none() {
            // Cancelled by the context's shutdown: with the lock back, leave the queue (or pass
            // on the wake that popped us already), then unwind with the guard holding its lock.
            self.leave(guard, &wait);
            drop(wait);
            co.unwind_cancelled();
        }
    }

    /// Takes the record of `wait` out of the queue; if a wake popped it already, wakes the next
    /// waiter instead, so that the wake is not lost with the cancelled waiter.
    #[cold]
    fn leave<R: RawLock, T: ?Sized>(&self, guard: &mut LockGuard<'_, R, T>, wait: &Wait<'_>) {
        let waiters = self.waiters(guard);
        match waiters.iter().position(|record| record.is_for(wait)) {
            Some(index) => {
                waiters.remove(index);
            }
            None => {
                self.next(guard);
            }
        }
    }

    /// Wakes the first waiter, if any; it runs once the caller yields or returns to its
    /// context, and then retakes the lock (QEMU's `qemu_co_queue_next`). Returns whether there
    /// was one.
    pub fn next<R: RawLock, T: ?Sized>(&self, guard: &mut LockGuard<'_, R, T>) -> bool {
        if R::THREAD_BOUND {
            // A record whose context is gone wakes nobody: try the next.
            let parked = self.parked(guard);
            while let Some(record) = parked.pop_front() {
                if record.unpark() {
                    return true;
                }
            }
            return false;
        }
        match self.pop_live(guard) {
            Some(waker) => {
                // SAFETY: popped records are woken once, and a queued record's suspension
                // waits until then: it is only woken through this queue, and a cancelled one
                // takes the lock we hold before it leaves (`leave`). The signal to another
                // thread's context waits until this coroutine yields: the waiter would only
                // find the lock held.
                unsafe { waker.wake_under_lock() };
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter (QEMU's `qemu_co_queue_restart_all`); returns how many.
    pub fn restart_all<R: RawLock, T: ?Sized>(&self, guard: &mut LockGuard<'_, R, T>) -> usize {
        // Woken in place: a wake only queues its coroutine (an orphaned park record is leaked,
        // not dropped), it runs no code that could touch this queue (and the guard stays held).
        if R::THREAD_BOUND {
            return self
                .parked(guard)
                .drain(..)
                .map(ParkRecord::unpark)
                .filter(|&woken| woken)
                .count();
        }
        let mut count = 0;
        while let Some(waker) = self.pop_live(guard) {
            // SAFETY: as in `next`.
            unsafe { waker.wake_under_lock() };
            count += 1;
        }
        count
    }

    /// Pops the first record whose coroutine can still run. The records before it are of
    /// coroutines whose context shut down and leaked them where they could not leave the queue
    /// (a cancelled waiter whose re-take of the lock was leaked): they are dropped, so that
    /// the wake goes to a waiter that can take it. (A record popped while its context is still
    /// shutting down is woken; a coroutine leaked afterwards loses that wake.)
    fn pop_live<R: RawLock, T: ?Sized>(&self, guard: &LockGuard<'_, R, T>) -> Option<WaitRef> {
        let waiters = self.waiters(guard);
        while let Some(record) = waiters.pop_front() {
            // SAFETY: a queued record's suspension waits (see `next`).
            if !unsafe { record.is_leaked() } {
                return Some(record);
            }
        }
        None
    }

    /// Whether nobody waits (QEMU's `qemu_co_queue_empty`).
    pub fn is_empty<R: RawLock, T: ?Sized>(&self, guard: &LockGuard<'_, R, T>) -> bool {
        if R::THREAD_BOUND {
            return self.parked(guard).is_empty();
        }
        self.waiters(guard).is_empty()
    }

    /// For a caller outside a coroutine that holds the lock (QEMU's `qemu_co_enter_next`):
    /// wakes the first waiter, releases the lock, runs the woken coroutine now if it lives on
    /// this thread, and retakes the lock. Returns whether there was a waiter.
    ///
    /// If the entered coroutine (or one it woke) panics, the lock is taken back before the
    /// panic continues here, so a caller that catches it still holds its guard's lock.
    pub fn enter_next<R: RawBlockingLock, T: ?Sized>(
        &self,
        guard: &mut LockGuard<'_, R, T>,
    ) -> bool {
        if R::THREAD_BOUND {
            let Some(record) = self.parked(guard).pop_front() else { return false };
            enter_woken(guard, [record]);
            return true;
        }
        let Some(waker) = self.pop_live(guard) else { return false };
        // SAFETY: as in `next`; claimed while we hold the lock, the wake stays valid after we
        // release it.
        let wake = unsafe { waker.claim() };
        enter_woken(guard, [wake]);
        true
    }

    /// Like [`CoQueue::enter_next`] for every waiter (QEMU's `qemu_co_enter_all`); returns how
    /// many there were.
    pub fn enter_all<R: RawBlockingLock, T: ?Sized>(
        &self,
        guard: &mut LockGuard<'_, R, T>,
    ) -> usize {
        if R::THREAD_BOUND {
            let parked: Vec<ParkRecord> = self.parked(guard).drain(..).collect();
            let count = parked.len();
            if count > 0 {
                enter_woken(guard, parked);
            }
            return count;
        }
        let mut woken: Vec<PendingWake> = Vec::new();
        while let Some(waker) = self.pop_live(guard) {
            // SAFETY: as in `enter_next`.
            woken.push(unsafe { waker.claim() });
        }
        let count = woken.len();
        if count > 0 {
            enter_woken(guard, woken);
        }
        count
    }
}

/// A waiter popped by `enter_next` / `enter_all`.
trait Popped {
    /// Wakes it and enters it now if that may be done here.
    fn enter(self);
    /// Wakes it without entering it.
    fn queue(self);
}

impl Popped for ParkRecord {
    fn enter(self) {
        // False only for a park whose context is gone: its coroutine can never run.
        let _ = self.unpark_and_enter();
    }

    fn queue(self) {
        let _ = self.unpark();
    }
}

impl Popped for PendingWake {
    fn enter(self) {
        self.wake_and_enter();
    }

    fn queue(self) {
        self.wake();
    }
}

/// Releases the lock, wakes and enters each of `woken`, runs what they woke, and retakes the
/// lock. If a coroutine panics, the waiters not entered yet are woken (queued: a popped waiter
/// must not be lost) and the lock is taken back before the panic continues.
fn enter_woken<R: RawBlockingLock, T: ?Sized, W: Popped>(
    guard: &mut LockGuard<'_, R, T>,
    woken: impl IntoIterator<Item = W>,
) {
    /// Queues the waiters left when dropped.
    struct Rest<I: Iterator<Item = W>, W: Popped>(I);
    impl<I: Iterator<Item = W>, W: Popped> Drop for Rest<I, W> {
        fn drop(&mut self) {
            self.0.by_ref().for_each(W::queue);
        }
    }
    let released = guard.release_blocking();
    let mut rest = Rest(woken.into_iter());
    for waiter in rest.0.by_ref() {
        waiter.enter();
    }
    drop(rest);
    // What the entered coroutines woke in turn runs before the lock is retaken.
    run_woken_coroutines();
    released.retake_blocking();
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use crate::aio::AioContext;
    use crate::coroutine::Co;
    use crate::sync::{CoQueue, Lock, RawBlockingLock, RawLock};

    /// A thread lock (not yield-safe: a guard must not live across a yield) that never leaves
    /// its thread, so that a queue under it parks its waiters.
    struct RawBoundThreadLock {
        held: Cell<bool>,
    }

    // SAFETY: `held` admits one holder at a time (a second `lock` panics, `try_lock` fails);
    // not `Sync` (`Cell`) and not zero-sized (a `bool`), as `THREAD_BOUND` requires.
    unsafe impl RawLock for RawBoundThreadLock {
        fn new() -> Self {
            RawBoundThreadLock { held: Cell::new(false) }
        }

        const YIELD_SAFE: bool = false;

        const THREAD_BOUND: bool = true;

        fn lock(&self, _co: &Co) {
            self.lock_blocking();
        }

        fn try_lock(&self) -> bool {
            !self.held.replace(true)
        }

        unsafe fn unlock(&self) {
            self.held.set(false);
        }
    }

    // SAFETY: as above.
    unsafe impl RawBlockingLock for RawBoundThreadLock {
        fn lock_blocking(&self) {
            assert!(self.try_lock(), "test lock taken twice");
        }
    }

    #[test]
    fn a_waiter_under_a_thread_bound_thread_lock_parks_without_tripping_the_yield_check() {
        let ctx = AioContext::new().unwrap();
        let lock = Rc::new(Lock::<RawBoundThreadLock, bool>::new(false));
        let queue = Rc::new(CoQueue::new());
        let (l, q) = (lock.clone(), queue.clone());
        let waiter = ctx.spawn(move |co| {
            let mut ready = l.lock(co);
            // The guard is released before the coroutine yields: no thread lock is held then.
            while !*ready {
                q.wait(co, &mut ready);
            }
        });
        ctx.poll(false);
        let (l, q) = (lock.clone(), queue.clone());
        ctx.spawn(move |co| {
            let mut ready = l.lock(co);
            *ready = true;
            assert!(q.next(&mut ready), "the waiter is queued");
        });
        ctx.wait_while(|| !waiter.is_finished());
        assert!(*lock.try_lock().unwrap());
    }
}
