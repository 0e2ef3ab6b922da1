//! `CoMutex` (QEMU's `CoMutex`): a mutex whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::adaptive_spin;
use super::asymmetric_fence;
use super::lock::Lock;
use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::{ParkRecord, Wait, WaitRef};
use crate::coroutine::Co;
use crate::loom::AtomicU32;
#[cfg(debug_assertions)]
use crate::loom::AtomicU64;

/// The raw lock of [`CoMutex`](super::CoMutex).
///
/// * Uncontended, `lock` is one compare-and-swap and `unlock` a plain store: no locked
///   instruction, just loads of the waiter count around the store (see `remote`).
/// * A locker that finds the lock held by a coroutine on *another* thread spins briefly, and
///   only while that holder's thread can be running (not while it sleeps in its poll, see
///   `adaptive_spin`); otherwise it queues and suspends.
/// * Queued waiters are served first in, first out, and the lock is handed straight to the
///   woken waiter: nobody takes a free lock while anybody is queued, and an unlocker that sees
///   a waiter hands the lock over without freeing it, so nobody barges past the queue. The
///   waiter is woken on its own context, whatever thread unlocks.
/// * A coroutine that finds the lock held on its own thread, with nobody queued from other
///   threads, queues on a list that only the holder's thread touches, and the hand-over to it
///   is a plain pop and wake: no atomic operation, no spinlock.
/// * A waiter from another thread pays for the plain-store unlock: after it queues, it runs a
///   heavy fence (a `membarrier` system call) that pairs with the unlockers' compiler fence.
pub struct RawCoMutex {
    /// The holder's thread id (`thread_id`); 0 when free.
    ///
    /// Invariants:
    /// * only the holder changes it from an id: to 0 when it releases the lock, to a waiter's
    ///   thread when it hands the lock over; so while it names a thread, the lock stays with a
    ///   coroutine of that thread at least until that thread runs its unlock;
    /// * it goes from 0 to an id only by compare-and-swap: a locker's (which first saw `remote`
    ///   at 0), or `hand_to_head`'s (under `queue_lock`, for the head of `waiters`).
    state: AtomicU32,
    /// How many waiters `waiters` holds: written only under `queue_lock`, with each push and
    /// pop, so whoever holds `queue_lock` finds it non-zero exactly when `waiters` is not
    /// empty. Lockers take a free lock only while they see it at 0 (no barging past the
    /// queue); an unlocker that sees it above 0 hands the lock over instead of freeing it.
    ///
    /// The unlocker frees the lock with a plain store and only then looks at this count, while
    /// a waiter counts itself and only then looks at `state`: an asymmetric Dekker handshake,
    ///
    /// ```text
    /// unlocker U                              waiter W
    /// state = 0 (release)                     under queue_lock: push, count (remote += 1)
    /// F_U = asymmetric_fence::light()         F_W = asymmetric_fence::heavy()
    /// if remote != 0 { hand_to_head() }       if state == 0 { hand_to_head() }
    /// ```
    ///
    /// where `hand_to_head`, under `queue_lock`, moves `state` from 0 to the thread of the head
    /// of `waiters` by compare-and-swap, and if that succeeds pops the head and wakes it. The
    /// two fences are sequentially consistent towards each other (see `asymmetric_fence`), so
    /// no wake-up is lost. Say W's load of `state` reads the value `v`:
    ///
    /// * every release (store of 0) that comes after `v` in the modification order of `state`
    ///   was not seen by that load, so its unlocker's fence comes after F_W in the fences'
    ///   total order (were it before, the load would read that store or a later one); then that
    ///   unlocker's load of `remote` sees W's increment or a later value, which still counts W
    ///   unless W was popped (handed the lock already), and it runs `hand_to_head`;
    /// * if `v` is 0, W runs `hand_to_head` itself.
    ///
    /// So the last release of the lock while W is queued is followed by an attempt to hand it
    /// over: W's own if that release is `v`, its unlocker's if it comes after `v`. An attempt
    /// fails only when somebody took the lock after that release, and that holder's release
    /// then comes later still. Once handed over, the lock goes from head to head, first in,
    /// first out, until W has it.
    ///
    /// Only a waiter that finds `waiters` empty when it pushes needs the handshake (and its
    /// system call). One that finds a waiter W0 ahead of it is popped after W0, which is
    /// handed the lock (by the argument above, for W0) by a pop under `queue_lock` that comes
    /// after our push; W0's wake, and so W0's unlock (or that of the last coroutine of W0's
    /// thread that W0 hands the lock to through `local_waiters`), happens after our count,
    /// so that unlock sees us counted and hands the lock over rather than freeing it.
    remote: AtomicU32,
    /// The id of the holding coroutine (debug builds; 0 when unknown), for
    /// [`CoMutex::assert_locked`](Lock::assert_locked).
    #[cfg(debug_assertions)]
    holder_coroutine: AtomicU64,
    /// Protects `waiters` and the writes of `remote`.
    queue_lock: RawSpinLock,
    /// Wake records of the waiters from other threads, oldest first; touched only under
    /// `queue_lock`.
    waiters: UnsafeCell<VecDeque<Waiter>>,
    /// Park records of waiters on the holder's thread that queued while `waiters` was empty,
    /// oldest first. They are served before `waiters`, so the whole order stays first come,
    /// first served.
    ///
    /// Invariant: touched only by the thread whose id `state` holds, while it holds it; it is
    /// empty whenever that id changes (the unlocker serves it first), so each new holder
    /// thread finds it empty, and the release / acquire on `state` orders the accesses of
    /// successive holder threads.
    local_waiters: UnsafeCell<VecDeque<ParkRecord>>,
}

impl std::fmt::Debug for RawCoMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCoMutex").finish_non_exhaustive()
    }
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

/// A waiter of `waiters`: its wake record and its thread's id (the holder's thread once the
/// lock is handed to it).
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

/// A number that names the calling thread among the live threads, never 0.
#[inline]
pub(super) fn thread_id() -> u32 {
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
        // Not past a queued waiter (`remote`).
        let acquired = self.state.load(Ordering::Relaxed) == 0
            && self.remote.load(Ordering::Relaxed) == 0
            && self
                .state
                .compare_exchange(0, thread_id(), Ordering::Acquire, Ordering::Relaxed)
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
        // Woken or unparked only by whoever handed us the lock (stray entries are absorbed
        // by the wait or the park), so when these return the lock is ours. A park is not
        // cancelled (its record holds a handle to us, so nothing unwinds from it either); a
        // wait is cancelled when our context shuts down, and then we leave the queue.
        match self.enqueue(co) {
            Queued::Acquired => return,
            Queued::Parked => co.wait_unparked(),
            Queued::Waiting(wait) => {
                if wait.suspend().is_none() {
                    self.leave(co, wait);
                }
            }
        }
        self.note_holder();
    }

    /// Our wait in `waiters` was cancelled by our context's shutdown: takes our record out of
    /// the queue, or, if a hand-over popped it already (only hand-overs pop, and a pop hands
    /// the lock over), passes on the lock that is ours then; then unwinds. Either way the lock
    /// is never left with a coroutine that will not run.
    ///
    /// Leaving keeps the hand-over protocol of `remote`: a removal under `queue_lock` is as
    /// if the record had never been queued, except for the waiters that queued behind it
    /// without the handshake, and those only rely on a hand-over attempt following the last
    /// release, which picks whatever head the queue has under `queue_lock` at that time (the
    /// next one, once we are gone), or picks us before we leave, and then we pass it on.
    #[cold]
    #[inline(never)]
    fn leave(&self, co: &Co, wait: Wait<'_>) -> ! {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        let ours = waiters.iter().position(|waiter| waiter.record.is_for(&wait));
        if let Some(index) = ours {
            waiters.remove(index);
            self.count(waiters);
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if ours.is_none() {
            self.note_holder();
            // SAFETY: our record was popped by a hand-over, which made us the holder (the
            // pop and the store of our thread into `state` happen together under
            // `queue_lock`, which we took after them).
            unsafe { self.unlock() };
        }
        drop(wait);
        co.unwind_cancelled()
    }

    /// Takes the lock if it comes free while we spin, or queues this coroutine and says how
    /// to suspend until the lock is handed to it.
    #[inline(never)]
    fn enqueue<'co>(&self, co: &'co Co) -> Queued<'co> {
        let me = thread_id();
        // Acquire: pairs with the release of whoever put our id in (see `local_waiters`).
        if self.state.load(Ordering::Acquire) == me {
            if self.remote.load(Ordering::Relaxed) == 0 {
                // Held on this thread, nobody queued from elsewhere: queue behind the other
                // waiters of this thread. The holder cannot let go before we yield.
                let parked = co.park(0);
                // SAFETY: `state` names this thread, so we may touch `local_waiters` (field
                // invariant); nothing else on this thread runs until we yield.
                unsafe { (*self.local_waiters.get()).push_back(parked) };
                return Queued::Parked;
            }
        } else if self.spin() {
            return Queued::Acquired;
        }
        // Fail, if at all, before queueing a waiter: a hand-over to a waiter that is gone
        // would leave the lock held by nobody.
        co.assert_may_yield(0);
        let wait = co.prepare_wait();
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        let first = waiters.is_empty();
        waiters.push_back(Waiter { record: wait.wait_ref(), thread: me });
        self.count(waiters);
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        // Behind another waiter we are safe without the handshake (see `remote`).
        if first {
            // The waiter's side of the handshake: counted, then look at `state`.
            asymmetric_fence::heavy();
            if self.state.load(Ordering::Relaxed) == 0 {
                // Freed by an unlocker that may not have seen us counted. The head is us
                // (unless we were handed the lock already, and then it is not free): the wake
                // lands before the wait, which returns at once.
                self.hand_to_head();
            }
        }
        Queued::Waiting(wait)
    }

    /// Stores the length of `waiters` into `remote` (saturated: only 0 or not matters).
    ///
    /// Must be called under `queue_lock`, with `waiters` the queue it protects.
    #[inline]
    fn count(&self, waiters: &VecDeque<Waiter>) {
        let count = u32::try_from(waiters.len()).unwrap_or(u32::MAX);
        self.remote.store(count, Ordering::Relaxed);
    }

    /// Polls a lock held on another thread while its holder can be running; returns whether
    /// we took it.
    fn spin(&self) -> bool {
        adaptive_spin::spin(|| self.try_acquire(), || self.state.load(Ordering::Relaxed))
    }

    /// Hands the lock we hold to the head of `waiters`, without freeing it in between; frees
    /// it if the queue emptied meanwhile (its waiters were cancelled and left).
    ///
    /// Must be called by the holder, after it saw `remote` above 0.
    #[cold]
    fn hand_over(&self) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        // Only hand-overs pop (`hand_over` by the holder, which is us, and `hand_to_head` only
        // once its compare-and-swap took a free lock, which ours is not), but a waiter whose
        // context cancels its wait leaves the queue by itself (`leave`): the waiters we saw
        // counted may all be gone.
        let Some(next) = waiters.pop_front() else {
            // Free the lock. A waiter that queues from now on takes `queue_lock` after us, so
            // its look at `state` in the handshake of `remote` sees this store.
            self.state.store(0, Ordering::Release);
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            return;
        };
        self.count(waiters);
        // The new holder's thread, before it even runs: lockers on that thread queue at once
        // (spinning could not let it run), lockers elsewhere spin rather than sleep behind a
        // hand-over in flight. Release: orders our accesses to `local_waiters` before those
        // of the new holder's thread (field invariant).
        self.state.store(next.thread, Ordering::Release);
        // SAFETY: each record is popped once, and its coroutine still waits: it is woken only
        // by a hand-over, and a cancelled one takes `queue_lock`, which we hold, before it
        // leaves. Claimed now, the wake stays valid after we release `queue_lock`.
        let wake = unsafe { next.record.claim() };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        wake.wake();
    }

    /// If the lock is free and somebody is queued, gives the lock to the head of `waiters` and
    /// wakes it; does nothing if the queue is empty or somebody else took the lock (whose
    /// unlock then sees the queue: see `remote`).
    #[cold]
    fn hand_to_head(&self) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        // Acquire: pairs with the release that freed the lock (the last holder's accesses to
        // `local_waiters`); release: with the acquire of the new holder's thread.
        let next = match waiters.front() {
            Some(head) => self
                .state
                .compare_exchange(0, head.thread, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
                .then(|| waiters.pop_front())
                .flatten(),
            None => None,
        };
        // SAFETY: each record is popped once, and its coroutine waits until it is woken here
        // (or is about to wait, and then does not suspend); a cancelled one takes
        // `queue_lock`, which we hold, before it leaves. Claimed now, the wake stays valid
        // after we release `queue_lock`.
        let wake = next.map(|next| unsafe { next.record.claim() });
        if wake.is_some() {
            self.count(waiters);
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if let Some(wake) = wake {
            wake.wake();
        }
    }

    /// Whether some coroutine holds the lock (QEMU's `qemu_co_mutex_assert_locked`, for
    /// debug assertions: with a guard in hand it is always true).
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != 0
    }
}

// SAFETY: see the type's doc and the field invariants: the one who moves `state` from 0 to a
// thread id, or to whom the lock is handed (by `hand_over` keeping `state` held, or by
// `hand_to_head` moving it from 0 under `queue_lock`), holds it; acquire on every acquisition,
// release (or the wake's own synchronisation) on every release and hand-over.
unsafe impl RawLock for RawCoMutex {
    fn new() -> Self {
        // Settles the fences before any unlock of this mutex can run (see `asymmetric_fence`).
        asymmetric_fence::prepare();
        RawCoMutex {
            state: AtomicU32::new(0),
            remote: AtomicU32::new(0),
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
        while let Some(next) = local.pop_front() {
            // Same thread, nobody counted in between: the lock passes as it is. A park whose
            // context is gone is never handed the lock: the next waiter is.
            if next.unpark() {
                return;
            }
        }
        if self.remote.load(Ordering::Relaxed) != 0 {
            return self.hand_over();
        }
        // The unlocker's side of the handshake (see `remote`): free, then look at the count.
        self.state.store(0, Ordering::Release);
        asymmetric_fence::light();
        if self.remote.load(Ordering::Relaxed) != 0 {
            // A waiter counted itself meanwhile, and may have missed the release.
            self.hand_to_head();
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
    /// ctx.wait_while(|| !co.is_finished());
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
            let same_thread = raw.state.load(Ordering::Relaxed) == thread_id();
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

    use crate::aio::{AioContext, IoThread};
    use crate::sync::CoMutex;

    /// The waiters queued in the shared queue (`remote`).
    fn counted(mutex: &CoMutex<Vec<&'static str>>) -> u32 {
        mutex.raw().remote.load(std::sync::atomic::Ordering::Relaxed)
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
        assert_eq!(counted(&mutex), 0, "a waiter of the holder's thread is not counted");
        let m = mutex.clone();
        iothread.handle().spawn(move |co| m.lock(co).push("remote")).unwrap();
        while counted(&mutex) < 1 {
            std::thread::yield_now();
        }
        let m = mutex.clone();
        ctx.spawn(move |co| m.lock(co).push("late"));
        ctx.poll(false);
        assert_eq!(counted(&mutex), 2, "behind a counted waiter, this thread's waiters count");
        release.set(true);
        ctx.wait_while(|| mutex.try_lock().is_none_or(|order| order.len() < 4));
        iothread.stop();
        assert_eq!(*mutex.try_lock().unwrap(), ["holder", "local", "remote", "late"]);
    }
}
