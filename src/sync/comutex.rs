//! `CoMutex` (QEMU's `CoMutex`): a mutex whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::adaptive_spin;
use super::asymmetric_fence;
use super::lock::Lock;
use super::patience::Patience;
use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::{Abandon, OnLeak, ParkRecord, PendingWake, Wait, WaitId, WaitRef};
use crate::coroutine::Co;
#[cfg(debug_assertions)]
use crate::loom::AtomicU64;
use crate::loom::{AtomicBool, AtomicU32};

/// The raw lock of [`CoMutex`](super::CoMutex).
///
/// * Uncontended, `lock` is one compare-and-swap and `unlock` a plain store: no locked
///   instruction, just loads of the waiter count around the store (see `remote`).
/// * A locker that finds the lock held by a coroutine on *another* thread spins briefly, and
///   only while that holder's thread can be running (not while it sleeps in its poll, see
///   `adaptive_spin`); otherwise it queues and suspends.
/// * Queued waiters are served first in, first out, one at a time, and the lock is eventually
///   fair, as the mutexes of std, Go and parking_lot are:
///   - normally an unlock frees the lock and wakes the head of the queue, the *candidate*,
///     which takes the lock when it runs unless a running locker took it first (*barging*).
///     A candidate that loses spins while the new holder runs, then goes back to the front of
///     the queue. While a candidate is on its way, unlocks only free the lock: at most one
///     queued waiter is being woken at any time.
///   - once a waiter has waited 1 ms, the lock turns *starving*: unlocks hand it
///     to the head of the queue without freeing it, and nobody takes a free lock past a queued
///     waiter (QEMU's `CoMutex` always works this way). It turns back when a waiter gets the
///     lock after a shorter wait, or the queue empties.
///
///   Handing over on every unlock is what QEMU does, and with more threads than CPUs it
///   collapses: once waiters of two threads interleave in the queue, every acquisition wakes a
///   sleeping thread (~20 µs on the machines measured), and a producer / consumer queue slowed
///   down 50-fold in one run out of four. Barging lets the running threads batch.
/// * A coroutine that finds the lock held on its own thread, with nobody queued from other
///   threads, queues on a list that only the holder's thread touches, and the hand-over to it
///   is a plain pop and wake: no atomic operation, no spinlock.
/// * A waiter from another thread pays for the plain-store unlock: after it queues, it runs a
///   heavy fence (a `membarrier` system call) that pairs with the unlockers' compiler fence.
/// * A waiter from another thread that will never run (its context shut down: a cancelled
///   wait, or one the shutdown leaked) gives up its place on its own thread: it leaves the
///   queue, or, if an unlock popped it already, gives up its turn or passes the lock it was
///   handed to the next waiter. The lock is never left with a coroutine that cannot run.
pub struct RawCoMutex {
    /// The holder's thread id (`thread_id`); 0 when free.
    ///
    /// Invariants:
    /// * only the holder changes it from an id: to 0 when it releases the lock, to a waiter's
    ///   thread when it hands the lock over; so while it names a thread, the lock stays with a
    ///   coroutine of that thread at least until that thread runs its unlock;
    /// * it goes from 0 to an id only by compare-and-swap: a locker's, a candidate's, or
    ///   `serve_head`'s (under `queue_lock`, for the head of `waiters`, when starving).
    state: AtomicU32,
    /// How many waiters `waiters` holds: written only under `queue_lock`, with each push and
    /// pop (and again by a candidate that gives up its turn), so whoever holds `queue_lock`
    /// finds it non-zero exactly when `waiters` is not empty.
    ///
    /// No wake-up is lost: whenever the lock is free and a waiter is queued, somebody is *due*
    /// to serve the queue: a candidate on its way (it takes the lock, and its unlock serves
    /// the queue, or it goes back to the queue with the handshake below), or an unlocker or
    /// waiter that will run `serve_head`. `serve_head`, under `queue_lock`, does nothing while
    /// a candidate is on its way or the lock is held (that holder's unlock is due, see below),
    /// and otherwise pops the head and wakes it as the candidate (when starving, it moves
    /// `state` from 0 to the head's thread by compare-and-swap first: the head is handed the
    /// lock).
    ///
    /// The unlocker frees the lock with a plain store and only then looks at this count, while
    /// a waiter counts itself and only then looks at `state`: an asymmetric Dekker handshake,
    ///
    /// ```text
    /// unlocker U                              waiter W
    /// state = 0 (release)                     under queue_lock: push, count (remote += 1)
    /// F_U = asymmetric_fence::light()         F_W = asymmetric_fence::heavy()
    /// if remote != 0 { serve_head() }         if state == 0 { serve_head() }
    /// ```
    ///
    /// The two fences are sequentially consistent towards each other (see
    /// `asymmetric_fence`). Say W's load of `state` reads the value `v`:
    ///
    /// * every release (store of 0) that comes after `v` in the modification order of `state`
    ///   was not seen by that load, so its unlocker's fence comes after F_W in the fences'
    ///   total order (were it before, the load would read that store or a later one); then that
    ///   unlocker's load of `remote` sees W's count or a later one, and each count is the
    ///   length of the queue when it was stored: non-zero unless everybody queued by then,
    ///   W included, was popped;
    /// * if `v` is 0, W runs `serve_head` itself.
    ///
    /// So the last release of the lock while W is queued is followed by a `serve_head`: W's
    /// own if that release is `v`, its unlocker's if it comes after `v`. That `serve_head`
    /// does nothing only when the lock is held again (whose release comes later still) or a
    /// candidate is on its way, and a candidate either takes the lock (and its release comes
    /// later still), or gives up its turn with the same handshake: under `queue_lock` it ends
    /// its candidacy and stores the count again (going back to the front of the queue, or
    /// leaving it when cancelled), then runs F_W and looks at `state`. A candidate whose
    /// coroutine can never run (its context's shutdown leaked the wait, and dropped or refused
    /// the wake) does neither itself: that shutdown gives its turn up for it, on its thread,
    /// with the same steps (`give_up`, run by `Abandon::abandon`), once the context is down;
    /// the wake it then refuses or drops is of no consequence. A HANDED one's lock is passed on
    /// by the same `give_up` with `unlock`, as if it had taken it.
    ///
    /// Only a waiter that finds `waiters` empty when it pushes needs the handshake (and its
    /// system call). One that finds a waiter W0 ahead of it is popped after W0, and W0 is
    /// popped (by the argument above, for W0) under `queue_lock` after our push. Once popped,
    /// W0 takes the lock, and its unlock (or that of the last coroutine of W0's thread that
    /// W0 hands the lock to through `local_waiters`) comes after the wake that followed the
    /// pop, so it sees us counted; or W0 gives up its turn with the handshake, and its count
    /// counts us.
    remote: AtomicU32,
    /// Whether a popped waiter is on its way, and how: [`NO_CANDIDATE`], [`WOKEN`] (it will
    /// try to take the free lock) or [`HANDED`] (it holds the lock). Set under `queue_lock` by
    /// whoever pops a waiter, which it does only while this is [`NO_CANDIDATE`]; set back by
    /// the candidate alone (or, for a candidate that can never run, by its context's shutdown
    /// on its behalf: see `remote`), so there is at most one.
    candidate: AtomicU32,
    /// Whether unlocks hand the lock over instead of freeing it (see the type's doc). Only a
    /// hint: each unlock and `serve_head` keeps the queue served whatever it reads.
    starving: AtomicBool,
    /// The id of the holding coroutine (debug builds; 0 when unknown), for
    /// [`CoMutex::assert_locked`](Lock::assert_locked).
    #[cfg(debug_assertions)]
    holder_coroutine: AtomicU64,
    /// Protects `waiters` and the writes of `remote`.
    queue_lock: RawSpinLock,
    /// Wake records of the waiters from other threads, oldest first (a candidate that lost
    /// goes back to the front); touched only under `queue_lock`.
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

/// `candidate`: no popped waiter is on its way.
const NO_CANDIDATE: u32 = 0;
/// `candidate`: a popped waiter was woken to take the lock if it is free when it runs.
const WOKEN: u32 = 1;
/// `candidate`: a popped waiter was handed the lock (starving).
const HANDED: u32 = 2;

/// How long a queued waiter waits before the lock turns starving (Go's `sync.Mutex` uses the
/// same): long enough that barging batches many acquisitions first, short enough that no
/// waiter waits much longer than the queue ahead of it takes.
#[cfg_attr(aiocoro_loom, allow(dead_code, reason = "loom has no clock"))]
pub(crate) const STARVATION_NS: u64 = 1_000_000;

impl std::fmt::Debug for RawCoMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCoMutex").finish_non_exhaustive()
    }
}

/// How a locker goes on after [`RawCoMutex::enqueue`].
enum Queued<'co> {
    /// The lock is ours already.
    Acquired,
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
    /// Takes the lock if it is free, past queued waiters unless the lock is starving.
    #[inline]
    fn try_acquire(&self) -> bool {
        let acquired = self.state.load(Ordering::Relaxed) == 0
            && (self.remote.load(Ordering::Relaxed) == 0 || !self.starving.load(Ordering::Relaxed))
            && self.take_free();
        if acquired {
            self.note_holder();
        }
        acquired
    }

    /// Moves `state` from 0 to this thread.
    #[inline]
    fn take_free(&self) -> bool {
        self.state.compare_exchange(0, thread_id(), Ordering::Acquire, Ordering::Relaxed).is_ok()
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
        // Unparked only by whoever handed us the lock (stray entries are absorbed by the
        // park), so when that returns the lock is ours. A park is not cancelled (its record
        // holds a handle to us, so nothing unwinds from it either).
        let me = thread_id();
        // Acquire: pairs with the release of whoever put our id in (see `local_waiters`).
        if self.state.load(Ordering::Acquire) == me && self.remote.load(Ordering::Relaxed) == 0 {
            // Held on this thread, nobody queued from elsewhere: queue behind the other
            // waiters of this thread. The holder cannot let go before we yield.
            let parked = co.park(0);
            // SAFETY: `state` names this thread, so we may touch `local_waiters` (field
            // invariant); nothing else on this thread runs until we yield.
            unsafe { (*self.local_waiters.get()).push_back(parked) };
            co.wait_unparked();
        } else {
            match self.enqueue(co, me) {
                Queued::Acquired => return,
                Queued::Waiting(wait) => self.wait_turn(co, wait),
            }
        }
        self.note_holder();
    }

    /// Waits in `waiters` until the lock is ours: handed to us, or taken by us when a
    /// `serve_head` made us the candidate; a candidate that loses to a barger goes back to the
    /// front of the queue. A wait cancelled by our context's shutdown leaves the queue.
    #[inline(never)]
    fn wait_turn<'co>(&self, co: &'co Co, mut wait: Wait<'co>) {
        let mut patience = Patience::start();
        loop {
            // Woken only by whoever popped us (stray entries are absorbed by the wait).
            if wait.suspend().is_none() {
                self.leave(co, wait);
            }
            drop(wait);
            // We are the candidate (at most one is on its way, and we were popped).
            if self.candidate.load(Ordering::Relaxed) == HANDED {
                if !patience.exhausted() {
                    self.starving.store(false, Ordering::Relaxed);
                }
                self.candidate.store(NO_CANDIDATE, Ordering::Relaxed);
                return;
            }
            if self.spin(|| self.take_free()) {
                // Our unlock serves the queue from here on.
                self.candidate.store(NO_CANDIDATE, Ordering::Relaxed);
                return;
            }
            patience.lost();
            wait = self.prepare_wait(co);
            self.requeue(&wait, patience.exhausted());
        }
    }

    /// A candidate that lost the lock to a barger goes back to the front of the queue and
    /// gives up its turn with the handshake (see `remote`); `starved` turns the lock
    /// starving.
    #[cold]
    fn requeue(&self, wait: &Wait<'_>, starved: bool) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        waiters.push_front(Waiter { record: wait.wait_ref(), thread: thread_id() });
        self.count(waiters);
        self.candidate.store(NO_CANDIDATE, Ordering::Relaxed);
        if starved {
            self.starving.store(true, Ordering::Relaxed);
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        self.handshake();
    }

    /// The waiter's side of the handshake of `remote`: counted, then look at `state`.
    fn handshake(&self) {
        asymmetric_fence::heavy();
        if self.state.load(Ordering::Relaxed) == 0 {
            // Freed by an unlocker that may not have seen us counted.
            self.serve_head();
        }
    }

    /// Starts a wait of `co` in `waiters`. Its context's shutdown cancels it as any other (the
    /// waiter then `leave`s), or, if the shutdown leaks it instead, `abandon`s it for the
    /// waiter.
    fn prepare_wait<'co>(&self, co: &'co Co) -> Wait<'co> {
        // SAFETY: the wait is waited on in `wait_turn`, which holds `self` until it ends.
        let on_leak = unsafe { OnLeak::new(self) };
        co.prepare_wait_as(co.may_be_cancelled(), Some(on_leak))
    }

    /// Our wait in `waiters` was cancelled by our context's shutdown: we give up our place
    /// (`give_up`), then unwind.
    #[cold]
    #[inline(never)]
    fn leave(&self, co: &Co, wait: Wait<'_>) -> ! {
        self.give_up(wait.id());
        drop(wait);
        co.unwind_cancelled()
    }

    /// The waiter of `wait`, a wait in `waiters` that is still registered (its coroutine has not
    /// run since it was woken, if it was), will not take the lock: takes its record out of the
    /// queue; or, if a `serve_head` or hand-over popped it already (only they pop, and each pop
    /// makes the popped waiter the candidate), ends its candidacy, passing on the lock if it
    /// was handed to it, or giving up its turn with the handshake (see `remote`). Either way
    /// the lock is never left with a coroutine that will not run. Must be called on the
    /// waiter's thread (a lock handed to it is this thread's to pass on).
    ///
    /// A removal under `queue_lock` is as if the record had never been queued, except for the
    /// waiters that queued behind it without the handshake, and those rely only on counts that
    /// are the length of the queue when stored, which still counts them.
    #[cold]
    fn give_up(&self, wait: WaitId) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        let popped_as = match waiters.iter().position(|waiter| waiter.record.names(wait)) {
            Some(index) => {
                waiters.remove(index);
                self.count(waiters);
                None
            }
            None => {
                // Popped: the candidate on its way is us.
                let turn = self.candidate.swap(NO_CANDIDATE, Ordering::Relaxed);
                if turn == WOKEN {
                    self.count(waiters);
                }
                Some(turn)
            }
        };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        match popped_as {
            None => {}
            Some(HANDED) => {
                self.note_holder();
                // SAFETY: the lock was handed to the waiter, on this thread (the pop and the
                // store of its thread into `state` happen together under `queue_lock`, which we
                // took after them), and it never ran since.
                unsafe { self.unlock() };
            }
            Some(_) => self.handshake(),
        }
    }

    /// Takes the lock if it comes free while we spin, or queues this coroutine in `waiters`
    /// (`me` is this thread's id): for a locker that did not park in `local_waiters`.
    #[inline(never)]
    fn enqueue<'co>(&self, co: &'co Co, me: u32) -> Queued<'co> {
        // Held on this thread with waiters from elsewhere queued: spinning cannot let our own
        // thread's holder run.
        if self.state.load(Ordering::Relaxed) != me && self.spin(|| self.try_acquire()) {
            return Queued::Acquired;
        }
        // Fail, if at all, before queueing a waiter: a hand-over to a waiter that is gone
        // would leave the lock held by nobody.
        co.assert_may_yield(0);
        let wait = self.prepare_wait(co);
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
            self.handshake();
        }
        Queued::Waiting(wait)
    }

    /// Polls `take` (an attempt to take the lock) while the lock's holder can be running;
    /// returns whether an attempt succeeded.
    fn spin(&self, take: impl FnMut() -> bool) -> bool {
        adaptive_spin::spin(take, || self.state.load(Ordering::Relaxed))
    }

    /// Stores the length of `waiters` into `remote` (saturated: only 0 or not matters).
    ///
    /// Must be called under `queue_lock`, with `waiters` the queue it protects.
    #[inline]
    fn count(&self, waiters: &VecDeque<Waiter>) {
        let count = u32::try_from(waiters.len()).unwrap_or(u32::MAX);
        self.remote.store(count, Ordering::Relaxed);
    }

    /// Pops the head of `waiters` as the candidate: `turn` says how (see `candidate`). The
    /// lock turns back from starving once the queue is empty.
    ///
    /// Must be called under `queue_lock`, with `waiters` the queue it protects, no candidate
    /// on its way and `waiters` not empty. The wake stays valid after `queue_lock` is
    /// released.
    fn pop_candidate(&self, waiters: &mut VecDeque<Waiter>, turn: u32) -> (PendingWake, u32) {
        let next = waiters
            .pop_front()
            .expect("aiocoro: CoMutex popped an empty queue (a pop needs a queued waiter)");
        self.count(waiters);
        if waiters.is_empty() {
            self.starving.store(false, Ordering::Relaxed);
        }
        self.candidate.store(turn, Ordering::Relaxed);
        // SAFETY: each record is popped once, and its coroutine still waits: it is woken only
        // by a pop, and a cancelled or abandoned one takes `queue_lock`, which our caller
        // holds, before it leaves (`give_up`). Claimed now, the wake stays valid after
        // `queue_lock` is released.
        (unsafe { next.record.claim() }, next.thread)
    }

    /// The starving unlock: hands the lock we hold to the head of `waiters` without freeing
    /// it in between. Frees it instead if a candidate is on its way (it is due to take it) or
    /// the queue emptied meanwhile (its waiters were cancelled and left).
    ///
    /// Must be called by the holder.
    #[cold]
    fn hand_over(&self) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        if waiters.is_empty() || self.candidate.load(Ordering::Relaxed) != NO_CANDIDATE {
            // A waiter that queues from now on takes `queue_lock` after us, so its look at
            // `state` in the handshake of `remote` sees this store.
            self.state.store(0, Ordering::Release);
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            return;
        }
        let (wake, thread) = self.pop_candidate(waiters, HANDED);
        // The new holder's thread, before it even runs: lockers on that thread queue at once
        // (spinning could not let it run), lockers elsewhere spin rather than sleep behind a
        // hand-over in flight. Release: orders our accesses to `local_waiters` before those
        // of the new holder's thread (field invariant).
        self.state.store(thread, Ordering::Release);
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        wake.wake();
    }

    /// Pops the head of `waiters` as the candidate if the lock is free and no candidate is on
    /// its way (see `remote`): handed the lock when starving, woken to take it otherwise.
    #[cold]
    fn serve_head(&self) {
        self.queue_lock.lock_raw();
        // SAFETY: `waiters` is only touched under `queue_lock`, which we hold.
        let waiters = unsafe { &mut *self.waiters.get() };
        let mut wake = None;
        if self.candidate.load(Ordering::Relaxed) == NO_CANDIDATE
            && let Some(head) = waiters.front()
        {
            let turn = if self.starving.load(Ordering::Relaxed) {
                // Acquire: pairs with the release that freed the lock (the last holder's
                // accesses to `local_waiters`); release: with the acquire of the new holder's
                // thread.
                let handed = self.state.compare_exchange(
                    0,
                    head.thread,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                handed.is_ok().then_some(HANDED)
            } else {
                (self.state.load(Ordering::Relaxed) == 0).then_some(WOKEN)
            };
            if let Some(turn) = turn {
                wake = Some(self.pop_candidate(waiters, turn).0);
            }
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

/// A waiter whose context's shutdown leaked it (it will never run) gives up its place as a
/// cancelled one does, run by that shutdown on its thread.
impl Abandon for RawCoMutex {
    fn abandon(&self, wait: WaitId) {
        self.give_up(wait);
    }
}

// SAFETY: see the type's doc and the field invariants: the one who moves `state` from 0 to a
// thread id, or to whom the lock is handed (by `hand_over` keeping `state` held, or by
// `serve_head` moving it from 0 under `queue_lock`), holds it; acquire on every acquisition,
// release (or the wake's own synchronisation) on every release and hand-over.
unsafe impl RawLock for RawCoMutex {
    fn new() -> Self {
        // Settles the fences before any unlock of this mutex can run (see `asymmetric_fence`).
        asymmetric_fence::prepare();
        RawCoMutex {
            state: AtomicU32::new(0),
            remote: AtomicU32::new(0),
            candidate: AtomicU32::new(NO_CANDIDATE),
            starving: AtomicBool::new(false),
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
        if self.remote.load(Ordering::Relaxed) != 0 && self.starving.load(Ordering::Relaxed) {
            return self.hand_over();
        }
        // The unlocker's side of the handshake (see `remote`): free, then look at the count.
        self.state.store(0, Ordering::Release);
        asymmetric_fence::light();
        // A candidate on its way is due to serve the queue. Read after the fence, a stale
        // `WOKEN` is impossible once the candidate gave up its turn: its handshake then sees
        // our release.
        if self.remote.load(Ordering::Relaxed) != 0
            && self.candidate.load(Ordering::Relaxed) == NO_CANDIDATE
        {
            self.serve_head();
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
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use super::STARVATION_NS;
    use crate::aio::{AioContext, IoThread, JoinHandle};
    use crate::sync::CoMutex;
    use crate::sync::busy_thread::block_thread;

    /// The waiters queued in the shared queue (`remote`).
    fn counted(mutex: &CoMutex<Vec<&'static str>>) -> u32 {
        mutex.raw().remote.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until a waiter is queued in the shared queue.
    fn wait_until_counted(mutex: &CoMutex<Vec<&'static str>>) {
        while counted(mutex) < 1 {
            std::thread::yield_now();
        }
    }

    /// Runs a coroutine of `ctx` until it holds `mutex` (pushing "holder"); it lets go once the
    /// returned flag is set.
    fn spawn_holder(
        ctx: &AioContext,
        mutex: &Arc<CoMutex<Vec<&'static str>>>,
    ) -> (Rc<Cell<bool>>, JoinHandle<()>) {
        let release = Rc::new(Cell::new(false));
        let (m, r) = (mutex.clone(), release.clone());
        let holder = ctx.spawn(move |co| {
            let mut guard = m.lock(co);
            guard.push("holder");
            while !r.get() {
                co.sleep(Duration::from_millis(1));
            }
        });
        ctx.poll(false);
        (release, holder)
    }

    #[test]
    fn waiters_of_the_holders_thread_and_of_others_are_served_in_arrival_order() {
        let ctx = AioContext::new().unwrap();
        let iothread = IoThread::spawn("comutex-order").unwrap();
        let mutex = Arc::new(CoMutex::new(Vec::new()));
        let (release, _holder) = spawn_holder(&ctx, &mutex);
        let m = mutex.clone();
        ctx.spawn(move |co| m.lock(co).push("local"));
        ctx.poll(false);
        assert_eq!(counted(&mutex), 0, "a waiter of the holder's thread is not counted");
        let m = mutex.clone();
        iothread.handle().spawn(move |co| m.lock(co).push("remote")).unwrap();
        wait_until_counted(&mutex);
        let m = mutex.clone();
        ctx.spawn(move |co| m.lock(co).push("late"));
        ctx.poll(false);
        assert_eq!(counted(&mutex), 2, "behind a counted waiter, this thread's waiters count");
        release.set(true);
        ctx.wait_while(|| mutex.try_lock().is_none_or(|order| order.len() < 4));
        iothread.stop();
        assert_eq!(*mutex.try_lock().unwrap(), ["holder", "local", "remote", "late"]);
    }

    /// The race that barging is about: a coroutine of `ctx` takes `mutex` (pushing "holder"),
    /// a coroutine of `iothread` queues for it (to push "waiter"), the IoThread is kept busy,
    /// and the holder lets go, waking the waiter. The waiter's thread runs it only once the
    /// returned sender sends (or drops).
    fn wake_a_waiter_whose_thread_is_busy(
        ctx: &AioContext,
        iothread: &IoThread,
        mutex: &Arc<CoMutex<Vec<&'static str>>>,
    ) -> mpsc::Sender<()> {
        let (release, holder) = spawn_holder(ctx, mutex);
        let m = mutex.clone();
        iothread.handle().spawn(move |co| m.lock(co).push("waiter")).unwrap();
        wait_until_counted(mutex);
        let go = block_thread(iothread);
        release.set(true);
        holder.join().unwrap();
        go
    }

    #[test]
    fn an_unlock_frees_the_lock_for_a_running_locker_while_the_woken_waiter_is_on_its_way() {
        let ctx = AioContext::new().unwrap();
        let iothread = IoThread::spawn("comutex-barging").unwrap();
        let mutex = Arc::new(CoMutex::new(Vec::new()));
        let go = wake_a_waiter_whose_thread_is_busy(&ctx, &iothread, &mutex);
        // The waiter was woken, but its thread is busy: a running locker takes the lock
        // rather than wait for that thread (strict hand-over would keep it for the waiter).
        mutex.try_lock().expect("freed for a running locker").push("barger");
        go.send(()).unwrap();
        while mutex.try_lock().is_none_or(|order| order.len() < 3) {
            std::thread::yield_now();
        }
        iothread.stop();
        assert_eq!(*mutex.try_lock().unwrap(), ["holder", "barger", "waiter"]);
    }

    #[test]
    fn a_waiter_passed_over_for_longer_than_the_starvation_bound_is_handed_the_lock() {
        let ctx = AioContext::new().unwrap();
        let iothread = IoThread::spawn("comutex-starving").unwrap();
        let mutex = Arc::new(CoMutex::new(Vec::new()));
        let go = wake_a_waiter_whose_thread_is_busy(&ctx, &iothread, &mutex);
        let mut barger = mutex.try_lock().expect("freed for a running locker");
        barger.push("barger");
        std::thread::sleep(Duration::from_nanos(2 * STARVATION_NS));
        // The waiter runs, finds the lock taken and goes back to the queue, starving.
        go.send(()).unwrap();
        wait_until_counted(&mutex);
        let go = block_thread(&iothread);
        drop(barger);
        assert!(mutex.try_lock().is_none(), "a starving lock is handed over, not freed");
        drop(go);
        while mutex.try_lock().is_none_or(|order| order.len() < 3) {
            std::thread::yield_now();
        }
        iothread.stop();
        assert_eq!(*mutex.try_lock().unwrap(), ["holder", "barger", "waiter"]);
        assert!(!mutex.raw().starving.load(std::sync::atomic::Ordering::Relaxed));
    }
}
