//! `CoMutex` (QEMU's `CoMutex`): a mutex whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::lock::Lock;
use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::{Parked, Wait, WaitRef};
use crate::coroutine::Co;
use crate::loom::{AtomicU64, spin_hint};

/// How many times a locker polls a mutex whose holder runs on another thread before it queues
/// and sleeps (a couple under loom, whose spin hint yields to another model thread).
const SPIN_LIMIT: u32 = if cfg!(aiocoro_loom) { 2 } else { 1_000 };

/// How many spins of the loop above pass between two offers of the CPU to other threads.
const YIELD_EVERY: u32 = 100;

/// Offers the CPU to another runnable thread (under loom: to another model thread).
fn yield_cpu() {
    #[cfg(not(aiocoro_loom))]
    std::thread::yield_now();
    #[cfg(aiocoro_loom)]
    spin_hint();
}

/// The raw lock of [`CoMutex`](super::CoMutex).
///
/// * Uncontended, `lock` is one compare-and-swap and `unlock` another.
/// * A locker that finds the lock held by a coroutine on *another* thread spins briefly (that
///   holder can make progress meanwhile); otherwise it queues and suspends.
/// * Queued waiters are served first in, first out, and the lock is handed straight to the
///   woken waiter: the lock is never free while anybody waits, so nobody barges past the
///   queue. The waiter is woken on its own context, whatever thread unlocks.
/// * A coroutine that finds the lock held on its own thread, with nobody queued from other
///   threads, queues on a list that only the holder's thread touches, and the hand-over to it
///   is a plain pop and wake: no atomic operation, no spinlock.
pub struct RawCoMutex {
    /// The holder's thread id (`thread_id`) in the upper 32 bits, and in the lower 32 the
    /// holder plus the waiters of `waiters`; 0 when free. Waiters of `local_waiters` are not
    /// counted.
    ///
    /// Invariants:
    /// * the increment that counts a waiter of `waiters` and its push happen together under
    ///   `queue_lock`, so an unlocker that sees a count above 1 and takes `queue_lock` finds
    ///   a waiter to hand the lock to;
    /// * only the holder changes the thread id (when it releases the lock or hands it over),
    ///   so while the id names a thread, the lock stays with a coroutine of that thread at
    ///   least until that thread runs its unlock.
    state: AtomicU64,
    /// The id of the holding coroutine (debug builds; 0 when unknown), for
    /// [`CoMutex::assert_locked`](Lock::assert_locked).
    #[cfg(debug_assertions)]
    holder_coroutine: AtomicU64,
    /// Protects `waiters`.
    queue_lock: RawSpinLock,
    /// Wake records of the counted waiters, oldest first; touched only under `queue_lock`.
    waiters: UnsafeCell<VecDeque<Waiter>>,
    /// Park records of waiters on the holder's thread that queued while `waiters` was empty,
    /// oldest first. They are served before `waiters`, so the whole order stays first come,
    /// first served.
    ///
    /// Invariant: touched only by the thread whose id `state` holds, while it holds it; it is
    /// empty whenever that id changes (the unlocker serves it first), so each new holder
    /// thread finds it empty, and the release / acquire on `state` orders the accesses of
    /// successive holder threads.
    local_waiters: UnsafeCell<VecDeque<Parked>>,
}

/// How a locker goes on after [`RawCoMutex::enqueue`].
enum Queued<'co> {
    /// The lock is ours already.
    Acquired,
    /// Parked in `local_waiters`.
    Parked,
    /// Waiting in `waiters`.
    Waiting(Wait<'co>),
}

/// A counted waiter: its wake record and its thread's id (the holder's thread once the lock is
/// handed to it).
struct Waiter {
    record: WaitRef,
    thread: u32,
}

// SAFETY: `waiters` is only touched under `queue_lock`, and its records are `Send + Sync`;
// `local_waiters` is only touched by the holder's thread, which is the thread of every park
// record in it, and is empty whenever the holder's thread changes (see the field invariants),
// so those records never leave their thread; the other fields are atomics.
unsafe impl Send for RawCoMutex {}
// SAFETY: as above.
unsafe impl Sync for RawCoMutex {}

/// The part of `state` that counts the holder and the counted waiters.
const COUNT: u64 = u32::MAX as u64;

/// `state` for a lock held by thread `thread` with `count` parties counted.
#[inline]
fn state_of(thread: u32, count: u64) -> u64 {
    (u64::from(thread) << 32) | count
}

/// The holder's thread id in a `state` (0: free).
#[inline]
fn holder_of(state: u64) -> u32 {
    (state >> 32) as u32
}

/// A number that names the calling thread among the live threads, never 0.
#[inline]
fn thread_id() -> u32 {
    #[cfg(not(aiocoro_loom))]
    thread_local! {
        static ID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    // A model thread is not an OS thread: each needs an id of its own.
    #[cfg(aiocoro_loom)]
    loom::thread_local! {
        static ID: std::cell::Cell<u32> = std::cell::Cell::new(0);
    }
    ID.with(|id| match id.get() {
        0 => {
            let new = new_thread_id();
            id.set(new);
            new
        }
        known => known,
    })
}

/// Hands out thread ids, from 1.
#[cold]
fn new_thread_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(id != 0, "aiocoro: CoMutex ran out of thread ids (2^32 threads used one)");
    id
}

impl RawCoMutex {
    #[inline]
    fn try_acquire(&self) -> bool {
        let acquired = self.state.load(Ordering::Relaxed) == 0
            && self
                .state
                .compare_exchange(0, state_of(thread_id(), 1), Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
        if acquired {
            self.note_holder();
        }
        acquired
    }

    /// Records the holding coroutine (debug builds).
    #[inline]
    fn note_holder(&self) {
        #[cfg(debug_assertions)]
        self.holder_coroutine.store(crate::coroutine::current_id(), Ordering::Relaxed);
    }

    // Inlined so that the yield sits in the locker's frame: every call level between a
    // coroutine's loop and its yield costs a mispredicted return per hand-over.
    #[inline(always)]
    fn lock_contended(&self, co: &Co) {
        // Woken or unparked only by the unlocker that handed us the lock (stray entries are
        // absorbed by the wait or the park), so when these return the lock is ours.
        match self.enqueue(co) {
            Queued::Acquired => return,
            Queued::Parked => co.wait_unparked(),
            Queued::Waiting(wait) => {
                wait.wait();
            }
        }
        self.note_holder();
    }

    /// Takes the lock if it comes free while we spin, or queues this coroutine and says how
    /// to suspend until the lock is handed to it.
    #[inline(never)]
    fn enqueue<'co>(&self, co: &'co Co) -> Queued<'co> {
        let me = thread_id();
        // Acquire: pairs with the release of the unlocker that put our id in (see
        // `local_waiters`).
        let state = self.state.load(Ordering::Acquire);
        if holder_of(state) == me {
            if state & COUNT == 1 {
                // Held on this thread, nobody counted: queue behind the other waiters of
                // this thread. The holder cannot let go before we yield.
                let parked = co.park();
                // SAFETY: `state` names this thread, so we may touch `local_waiters` (field
                // invariant); nothing else on this thread runs until we yield.
                unsafe { (*self.local_waiters.get()).push_back(parked) };
                return Queued::Parked;
            }
        } else if self.spin() {
            return Queued::Acquired;
        }
        // Fail, if at all, before counting and queueing a waiter: a hand-over to a waiter
        // that is gone would leave the lock held by nobody.
        co.assert_may_yield(0);
        let wait = co.prepare_wait();
        self.queue_lock.lock_raw();
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let counted = if state == 0 { state_of(me, 1) } else { state + 1 };
            match self.state.compare_exchange_weak(
                state,
                counted,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        if state == 0 {
            // Released meanwhile: ours, with nobody to wait for.
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            self.note_holder();
            return Queued::Acquired;
        }
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        unsafe { (*self.waiters.get()).push_back(Waiter { record: wait.wait_ref(), thread: me }) };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        Queued::Waiting(wait)
    }

    /// Polls a lock held on another thread for a while; returns whether we took it.
    fn spin(&self) -> bool {
        for round in 0..SPIN_LIMIT {
            if self.try_acquire() {
                return true;
            }
            if round % YIELD_EVERY == YIELD_EVERY - 1 {
                // With more threads than CPUs the holder may be waiting for ours: give it the
                // CPU now and then rather than spinning out our time slice.
                yield_cpu();
            } else {
                spin_hint();
            }
        }
        false
    }

    #[cold]
    fn unlock_contended(&self, state: u64) {
        let me = holder_of(state);
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let next = unsafe { (*self.waiters.get()).pop_front() };
        // The count is above 1, so a waiter is queued (`state` invariant).
        let next = next.expect("aiocoro: CoMutex count says a waiter is queued, but none is");
        // One party fewer, and the new holder's thread, before it even runs: lockers on that
        // thread queue at once (spinning could not let it run), lockers elsewhere spin rather
        // than sleep behind a hand-over in flight. Only we change the id, so adding the
        // difference leaves the concurrent increments of other lockers intact.
        let delta = (u64::from(next.thread).wrapping_sub(u64::from(me)) << 32).wrapping_sub(1);
        self.state.fetch_add(delta, Ordering::Release);
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        // SAFETY: each record is popped once, and its coroutine waits until it is woken here.
        unsafe { next.record.wake() };
    }

    /// Whether some coroutine holds the lock (QEMU's `qemu_co_mutex_assert_locked`, for
    /// debug assertions: with a guard in hand it is always true).
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != 0
    }
}

// SAFETY: see the type's doc and the `state` invariants: the one who moves `state` from 0 to
// held, or to whom the holder hands the lock while keeping `state` held, holds it; acquire on
// every acquisition, release (or the wake's own synchronisation) on every hand-over.
unsafe impl RawLock for RawCoMutex {
    fn new() -> Self {
        RawCoMutex {
            state: AtomicU64::new(0),
            #[cfg(debug_assertions)]
            holder_coroutine: AtomicU64::new(0),
            queue_lock: RawSpinLock::new(),
            waiters: UnsafeCell::new(VecDeque::new()),
            local_waiters: UnsafeCell::new(VecDeque::new()),
        }
    }

    const YIELD_SAFE: bool = true;

    #[inline]
    fn lock(&self, co: &Co) {
        if !self.try_acquire() {
            self.lock_contended(co);
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.try_acquire()
    }

    #[inline]
    unsafe fn unlock(&self) {
        // SAFETY: we hold the lock, on this thread (guards do not leave it), so `state` names
        // this thread and `local_waiters` is ours to touch.
        let local = unsafe { &mut *self.local_waiters.get() };
        if let Some(next) = local.pop_front() {
            // Same thread, nobody counted in between: the lock passes as it is.
            next.unpark();
            return;
        }
        let mut state = self.state.load(Ordering::Relaxed);
        if state & COUNT == 1 {
            match self.state.compare_exchange(state, 0, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                // A waiter was counted meanwhile.
                Err(now) => state = now,
            }
        }
        self.unlock_contended(state);
    }
}

impl<T: ?Sized> Lock<RawCoMutex, T> {
    /// Panics unless the calling coroutine holds this mutex (QEMU's
    /// `qemu_co_mutex_assert_locked`). Release builds only check that somebody holds it.
    ///
    /// ```
    /// use aiocoro::aio::AioContext;
    /// use aiocoro::sync::CoMutex;
    /// use std::rc::Rc;
    ///
    /// let ctx = AioContext::new()?;
    /// let mutex = Rc::new(CoMutex::new(()));
    /// let m = mutex.clone();
    /// let co = ctx.spawn(move |co| {
    ///     let _guard = m.lock(co);
    ///     m.assert_locked();
    /// });
    /// ctx.wait_while(|| !co.is_ended());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[track_caller]
    pub fn assert_locked(&self) {
        let raw = self.raw();
        assert!(raw.is_locked(), "aiocoro: CoMutex::assert_locked: the mutex is not locked");
        #[cfg(debug_assertions)]
        {
            let holder = raw.holder_coroutine.load(Ordering::Relaxed);
            let me = crate::coroutine::current_id();
            let same_thread = holder_of(raw.state.load(Ordering::Relaxed)) == thread_id();
            assert!(
                holder == me && me != 0 && same_thread,
                "aiocoro: CoMutex::assert_locked: held by coroutine #{holder}, not by the \
                 caller (coroutine #{me}; 0 = none)"
            );
        }
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Duration;

    use super::COUNT;
    use crate::aio::{AioContext, IoThread};
    use crate::sync::CoMutex;

    /// The parties the state word counts: the holder and the waiters of other threads.
    fn counted(mutex: &CoMutex<Vec<&'static str>>) -> u64 {
        mutex.raw().state.load(std::sync::atomic::Ordering::Relaxed) & COUNT
    }

    #[test]
    fn waiters_of_the_holders_thread_and_of_others_are_served_in_arrival_order() {
        let ctx = AioContext::new().unwrap();
        let iothread = IoThread::spawn("comutex-order").unwrap();
        let mutex = Arc::new(CoMutex::new(Vec::new()));
        let release = Rc::new(Cell::new(false));
        let (m, r) = (mutex.clone(), release.clone());
        ctx.spawn(move |co| {
            let mut guard = m.lock(co);
            guard.push("holder");
            while !r.get() {
                co.sleep(Duration::from_millis(1));
            }
        });
        ctx.poll(false);
        let m = mutex.clone();
        ctx.spawn(move |co| m.lock(co).push("local"));
        ctx.poll(false);
        assert_eq!(counted(&mutex), 1, "a waiter of the holder's thread is not counted");
        let m = mutex.clone();
        iothread.handle().spawn(move |co| m.lock(co).push("remote")).unwrap();
        while counted(&mutex) < 2 {
            std::thread::yield_now();
        }
        let m = mutex.clone();
        ctx.spawn(move |co| m.lock(co).push("late"));
        ctx.poll(false);
        assert_eq!(counted(&mutex), 3, "behind a counted waiter, this thread's waiters count");
        release.set(true);
        ctx.wait_while(|| mutex.try_lock().is_none_or(|order| order.len() < 4));
        iothread.stop();
        assert_eq!(*mutex.try_lock().unwrap(), ["holder", "local", "remote", "late"]);
    }
}
