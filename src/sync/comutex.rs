//! `CoMutex` (QEMU's `CoMutex`): a mutex whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::lock::Lock;
use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::WaitRef;
use crate::coroutine::Co;
#[cfg(debug_assertions)]
use crate::loom::AtomicU64;
use crate::loom::{AtomicUsize, spin_hint};

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
///   woken waiter: `locked` never drops to 0 while anybody waits, so nobody barges past the
///   queue. The waiter is woken on its own context, whatever thread unlocks.
pub struct RawCoMutex {
    /// How many parties want the lock: 0 free, 1 held, n > 1 held with n - 1 waiters queued.
    ///
    /// Invariant: an increment that finds a non-zero value and the push of that waiter happen
    /// together under `queue_lock`, so an unlocker that sees n > 1 and takes `queue_lock` finds
    /// a waiter to hand the lock to.
    locked: AtomicUsize,
    /// A tag of the holder's thread (0: none yet), to decide whether spinning can help. A
    /// hand-over sets it to the new holder's thread before waking it.
    holder: AtomicUsize,
    /// The id of the holding coroutine (debug builds; 0 when unknown), for
    /// [`CoMutex::assert_locked`](Lock::assert_locked).
    #[cfg(debug_assertions)]
    holder_coroutine: AtomicU64,
    /// Protects `waiters`.
    queue_lock: RawSpinLock,
    /// Wake records of the queued coroutines, oldest first; touched only under `queue_lock`.
    waiters: UnsafeCell<VecDeque<Waiter>>,
}

/// A queued coroutine: its wake record and the tag of its thread (the holder's thread once the
/// lock is handed to it).
struct Waiter {
    record: WaitRef,
    thread: usize,
}

// SAFETY: `waiters` is only touched under `queue_lock`, and records are `Send + Sync`; the other
// fields are atomics.
unsafe impl Send for RawCoMutex {}
// SAFETY: as above.
unsafe impl Sync for RawCoMutex {}

/// A number unique to the calling thread (the address of a thread-local).
#[inline]
fn thread_tag() -> usize {
    thread_local! {
        static TAG: u8 = const { 0 };
    }
    TAG.with(|tag| std::ptr::from_ref(tag) as usize)
}

impl RawCoMutex {
    #[inline]
    fn try_acquire(&self) -> bool {
        let acquired =
            self.locked.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok();
        if acquired {
            self.holder.store(thread_tag(), Ordering::Relaxed);
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

    // Not `#[cold]`: a coroutine suspends in here, and each call level between its loop and
    // its yield costs a mispredicted return per hand-over.
    #[inline]
    fn lock_contended(&self, co: &Co) {
        let me = thread_tag();
        if self.holder.load(Ordering::Relaxed) != me {
            for round in 0..SPIN_LIMIT {
                if self.locked.load(Ordering::Relaxed) == 0 && self.try_acquire() {
                    return;
                }
                if round % YIELD_EVERY == YIELD_EVERY - 1 {
                    // With more threads than CPUs the holder may be waiting for ours: give it
                    // the CPU now and then rather than spinning out our time slice.
                    yield_cpu();
                } else {
                    spin_hint();
                }
            }
        }
        let wait = co.prepare_wait();
        self.queue_lock.lock_raw();
        if self.locked.fetch_add(1, Ordering::AcqRel) == 0 {
            // Released meanwhile: ours, with nobody to wait for.
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            self.holder.store(me, Ordering::Relaxed);
            self.note_holder();
            return;
        }
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        unsafe { (*self.waiters.get()).push_back(Waiter { record: wait.wait_ref(), thread: me }) };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        // Woken only by the unlocker that handed us the lock (stray entries are absorbed by the
        // wait), so when this returns the lock is ours.
        wait.wait();
        self.holder.store(me, Ordering::Relaxed);
        self.note_holder();
    }

    #[cold]
    fn unlock_contended(&self) {
        self.queue_lock.lock_raw();
        self.locked.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let next = unsafe { (*self.waiters.get()).pop_front() };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        // The count still includes the waiter: the lock is now its (the `locked` invariant
        // guarantees there is one).
        let next = next.expect("aiocoro: CoMutex count says a waiter is queued, but none is");
        // The new holder's thread, before it even runs: lockers on that thread queue at once
        // (spinning could not let it run), lockers elsewhere spin rather than sleep behind a
        // hand-over in flight.
        self.holder.store(next.thread, Ordering::Relaxed);
        // SAFETY: each record is popped once, and its coroutine waits until it is woken here.
        unsafe { next.record.wake() };
    }

    /// Whether some coroutine holds the lock (QEMU's `qemu_co_mutex_assert_locked`, for
    /// debug assertions: with a guard in hand it is always true).
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed) != 0
    }
}

// SAFETY: see the type's doc and the `locked` invariant: the one who moves `locked` from 0 to
// 1, or to whom an unlocker hands the lock while keeping `locked` above 0, holds it; acquire
// on every acquisition, release (or the wake's own synchronisation) on every hand-over.
unsafe impl RawLock for RawCoMutex {
    fn new() -> Self {
        RawCoMutex {
            locked: AtomicUsize::new(0),
            holder: AtomicUsize::new(0),
            #[cfg(debug_assertions)]
            holder_coroutine: AtomicU64::new(0),
            queue_lock: RawSpinLock::new(),
            waiters: UnsafeCell::new(VecDeque::new()),
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
        if self.locked.compare_exchange(1, 0, Ordering::Release, Ordering::Relaxed).is_err() {
            self.unlock_contended();
        }
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
            let same_thread = raw.holder.load(Ordering::Relaxed) == thread_tag();
            assert!(
                holder == me && me != 0 && same_thread,
                "aiocoro: CoMutex::assert_locked: held by coroutine #{holder}, not by the \
                 caller (coroutine #{me}; 0 = none)"
            );
        }
    }
}
