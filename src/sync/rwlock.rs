//! `CoRwLock` (QEMU's `CoRwlock`): a readers-writer lock whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::mem;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;

use super::adaptive_spin;
use super::comutex::thread_id;
use super::patience::Patience;
use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::{Abandon, OnLeak, Wait, WaitId, WaitRef};
use crate::coroutine::Co;
use crate::loom::{AtomicU32, AtomicUsize};

/// A writer holds the lock.
const WRITER: usize = 1;
/// Waiters are queued.
const QUEUED: usize = 2;
/// A waiter popped from the queue is on its way (see `RawCoRwLock::state`).
const CANDIDATE: usize = 4;
/// The candidate on its way was handed the lock: it is counted among the holders already.
const HANDED: usize = 8;
/// Unlocks hand the lock to the head of the queue, and nobody takes it past a waiter.
const STARVING: usize = 16;
/// One reader holds the lock (the reader count is `state / READER`).
const READER: usize = 32;
/// The top bit of the reader count: reached only by an absurd number of read guards (leaked
/// with `mem::forget`), refused before the count can overflow into the flag bits.
const READERS_FULL: usize = 1 << (usize::BITS - 1);
/// The bits that say who holds the lock: the writer bit and the reader count.
const HOLDERS: usize = WRITER | !(READER - 1);

/// A readers-writer lock for coroutines (QEMU's `CoRwlock`), owning its data: any number of
/// readers, or one writer. Waiting suspends the coroutine, not the thread, and the lock works
/// across contexts: coroutines on several [`IoThread`](crate::aio::IoThread)s may share it
/// (through an `Arc`), and a waiter is woken on its own context whatever thread releases.
///
/// * **Eventually fair.** Waiters queue first in, first out, and a reader that finds readers
///   holding the lock with anybody waiting queues too, so a stream of readers cannot starve
///   a writer. A release frees the lock and wakes the head of the queue, the *candidate*,
///   which takes the lock when it runs unless a running locker took it first (*barging*); a
///   candidate that loses spins while the new holder can be running, then goes back to the
///   front of the queue. Once a waiter has waited 1 ms, the lock turns *starving*: releases
///   hand it to the head of the queue without freeing it and nobody takes it past a waiter
///   (QEMU's `CoRwlock` always works this way). A run of queued readers is let in together.
///
///   Handing over on every release is what QEMU does, and with more threads than CPUs it
///   collapses: once waiters of two threads interleave in the queue, every acquisition wakes
///   a sleeping thread, and a read-mostly workload on two IoThreads (`sync_perf`'s
///   `multi/rwlock_cross_thread`, 3 million operations) took 8 s instead of 15 ms in one run
///   out of five. Barging lets the running threads batch, as `CoMutex` does.
/// * **Spins only while it pays.** A locker that finds the lock held spins briefly before it
///   queues, and only while the last acquirer's thread can be running; never against a
///   writer of its own thread (a suspended coroutine of its own thread cannot let go while
///   it spins); see `adaptive_spin`.
/// * **Cheap when uncontended.** One atomic state word: taking or releasing a read lock or the
///   write lock is one atomic read-modify-write (a compare-and-swap to take, a subtraction to
///   release). An internal spinlock is taken only to queue or to serve the queue.
/// * [`CoRwLockReadGuard::upgrade`] and [`CoRwLockWriteGuard::downgrade`] as in QEMU.
///
/// Guards may be held across a yield (that is what the lock is for); they stay with their
/// coroutine (they are not `Send`).
///
/// ```
/// use aiocoro::aio::AioContext;
/// use aiocoro::sync::CoRwLock;
/// use std::{rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let table = Rc::new(CoRwLock::new(vec![1, 2, 3]));
/// let mut tasks = Vec::new();
/// for _ in 0..3 {
///     let table = table.clone();
///     tasks.push(ctx.spawn(move |co| {
///         let entries = table.read(co); // readers share the lock
///         co.sleep(Duration::from_micros(10));
///         assert!(entries.len() >= 3);
///     }));
/// }
/// let t = table.clone();
/// tasks.push(ctx.spawn(move |co| {
///     let mut entries = t.write(co); // waits until the readers are done
///     entries.push(4);
/// }));
/// ctx.wait_while(|| tasks.iter().any(|task| !task.is_finished()));
/// assert_eq!(*table.try_read().unwrap(), [1, 2, 3, 4]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CoRwLock<T: ?Sized> {
    raw: RawCoRwLock,
    data: UnsafeCell<T>,
}

// SAFETY: the lock owns its data; sending the lock sends the data.
unsafe impl<T: ?Sized + Send> Send for CoRwLock<T> {}
// SAFETY: `&CoRwLock` hands out `&T` to several readers at once, possibly on several threads
// (`T: Sync`), or `&mut T` to one writer at a time, possibly on another thread than the last
// one (`T: Send`); the raw lock provides the exclusion and the ordering.
unsafe impl<T: ?Sized + Send + Sync> Sync for CoRwLock<T> {}

impl<T> CoRwLock<T> {
    /// An unlocked lock around `value`.
    pub fn new(value: T) -> Self {
        CoRwLock { raw: RawCoRwLock::new(), data: UnsafeCell::new(value) }
    }

    /// The data, taking the lock apart.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> CoRwLock<T> {
    /// Takes a read lock, suspending the coroutine while a writer holds the lock, or readers
    /// do and somebody waits (QEMU's `qemu_co_rwlock_rdlock`).
    ///
    /// A coroutine that already holds a read lock and takes another can deadlock: if a writer
    /// queued in between, the second read waits behind it, and the writer waits for the first.
    ///
    /// # Panics
    ///
    /// If the coroutine has to wait and its thread has no [`AioContext`](crate::aio::AioContext).
    #[inline]
    pub fn read(&self, co: &Co) -> CoRwLockReadGuard<'_, T> {
        if !self.raw.try_read() {
            self.raw.lock_contended(co, false);
        }
        CoRwLockReadGuard { lock: self, _not_send: PhantomData }
    }

    /// Takes the write lock, suspending the coroutine while anybody holds the lock (QEMU's
    /// `qemu_co_rwlock_wrlock`).
    ///
    /// # Panics
    ///
    /// If the coroutine has to wait and its thread has no [`AioContext`](crate::aio::AioContext).
    #[inline]
    pub fn write(&self, co: &Co) -> CoRwLockWriteGuard<'_, T> {
        if !self.raw.try_write() {
            self.raw.lock_contended(co, true);
        }
        CoRwLockWriteGuard { lock: self, _not_send: PhantomData }
    }

    /// Takes a read lock if that needs no waiting: no writer holds the lock, and either nobody
    /// holds it (and it is not starving) or nobody waits. Works outside a coroutine too.
    #[inline]
    pub fn try_read(&self) -> Option<CoRwLockReadGuard<'_, T>> {
        self.raw.try_read().then(|| CoRwLockReadGuard { lock: self, _not_send: PhantomData })
    }

    /// Takes the write lock if nobody holds it (and it is not starving). Works outside a
    /// coroutine too.
    #[inline]
    pub fn try_write(&self) -> Option<CoRwLockWriteGuard<'_, T>> {
        self.raw.try_write().then(|| CoRwLockWriteGuard { lock: self, _not_send: PhantomData })
    }

    /// The data, through exclusive access to the lock (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<T: Default> Default for CoRwLock<T> {
    fn default() -> Self {
        CoRwLock::new(T::default())
    }
}

impl<T> From<T> for CoRwLock<T> {
    fn from(value: T) -> Self {
        CoRwLock::new(value)
    }
}

impl<T: ?Sized> fmt::Debug for CoRwLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoRwLock").finish_non_exhaustive()
    }
}

/// A read lock of a [`CoRwLock`]: shared access to the data; dropping it releases the lock.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct CoRwLockReadGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
    /// Stays with its coroutine.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: a shared read guard only hands out `&T`.
unsafe impl<T: ?Sized + Sync> Sync for CoRwLockReadGuard<'_, T> {}

impl<'a, T: ?Sized> CoRwLockReadGuard<'a, T> {
    /// Turns this read lock into the write lock (QEMU's `qemu_co_rwlock_upgrade`).
    ///
    /// Immediate if this is the only reader (and the lock is not starving). Otherwise the
    /// coroutine gives up its read lock and queues as a writer behind everybody already
    /// queued, so the data may change before it gets the write lock: re-check what was read.
    ///
    /// ```
    /// use aiocoro::aio::AioContext;
    /// use aiocoro::sync::CoRwLock;
    ///
    /// let ctx = AioContext::new()?;
    /// let cache = std::rc::Rc::new(CoRwLock::new(None::<u32>));
    /// let c = cache.clone();
    /// let task = ctx.spawn(move |co| {
    ///     let entry = c.read(co);
    ///     if entry.is_none() {
    ///         let mut entry = entry.upgrade(co);
    ///         // Another writer may have filled it while this one waited.
    ///         entry.get_or_insert(42);
    ///     }
    /// });
    /// ctx.wait_while(|| !task.is_finished());
    /// assert_eq!(*cache.try_read().unwrap(), Some(42));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// If the coroutine has to wait and its thread has no [`AioContext`](crate::aio::AioContext).
    pub fn upgrade(self, co: &Co) -> CoRwLockWriteGuard<'a, T> {
        let lock = self.lock;
        if lock.raw.try_upgrade() {
            mem::forget(self);
        } else {
            // Checked and prepared while the guard still owns the read lock, so that a panic
            // here (a yield that may not happen, no context) releases it normally.
            co.assert_may_yield(0);
            let wait = lock.raw.prepare_wait(co);
            // From here the raw lock takes over the read ownership.
            mem::forget(self);
            lock.raw.upgrade_contended(co, wait);
        }
        CoRwLockWriteGuard { lock, _not_send: PhantomData }
    }
}

impl<T: ?Sized> Deref for CoRwLockReadGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds a read lock, so no writer reaches the data; readers only
        // share it.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T: ?Sized> Drop for CoRwLockReadGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the guard holds a read lock and gives it up here.
        unsafe { self.lock.raw.read_unlock() };
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for CoRwLockReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// The write lock of a [`CoRwLock`]: exclusive access to the data; dropping it releases the
/// lock.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct CoRwLockWriteGuard<'a, T: ?Sized> {
    lock: &'a CoRwLock<T>,
    /// Stays with its coroutine.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: a shared write guard only hands out `&T`.
unsafe impl<T: ?Sized + Sync> Sync for CoRwLockWriteGuard<'_, T> {}

impl<'a, T: ?Sized> CoRwLockWriteGuard<'a, T> {
    /// Turns the write lock into a read lock without ever waiting (QEMU's
    /// `qemu_co_rwlock_downgrade`). Readers queued at the head of the queue are let in at once; a
    /// queued writer stays queued (and keeps later readers out).
    ///
    /// ```
    /// use aiocoro::aio::AioContext;
    /// use aiocoro::sync::CoRwLock;
    ///
    /// let ctx = AioContext::new()?;
    /// let config = std::rc::Rc::new(CoRwLock::new(String::new()));
    /// let c = config.clone();
    /// let task = ctx.spawn(move |co| {
    ///     let mut text = c.write(co);
    ///     text.push_str("ready");
    ///     let text = text.downgrade(); // other readers may read it now
    ///     assert_eq!(*text, "ready");
    /// });
    /// ctx.wait_while(|| !task.is_finished());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn downgrade(self) -> CoRwLockReadGuard<'a, T> {
        let lock = self.lock;
        mem::forget(self);
        lock.raw.downgrade();
        CoRwLockReadGuard { lock, _not_send: PhantomData }
    }
}

impl<T: ?Sized> Deref for CoRwLockWriteGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the write lock: nobody else reaches the data.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T: ?Sized> DerefMut for CoRwLockWriteGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the write lock and is borrowed mutably: this is the only
        // access.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T: ?Sized> Drop for CoRwLockWriteGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the guard holds the write lock and gives it up here.
        unsafe { self.lock.raw.write_unlock() };
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for CoRwLockWriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for CoRwLockWriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// A queued coroutine: its wake record (woken once, by the `serve` that pops it, while it
/// waits) and what it wants.
struct Waiter {
    waker: WaitRef,
    writer: bool,
}

/// How a locker that reached the queue goes on.
#[derive(PartialEq, Eq)]
enum Queued {
    /// It took the lock instead.
    Acquired,
    /// It waits in the queue.
    Waiting,
}

/// The lock without its data.
struct RawCoRwLock {
    /// `WRITER` | `QUEUED` | `CANDIDATE` | `HANDED` | `STARVING` | reader count × `READER`.
    ///
    /// Every change is a read-modify-write of this word (no plain store), so each one reads
    /// the latest value and the releases form one release sequence.
    ///
    /// Invariants:
    /// 1. `WRITER` and a non-zero reader count never hold together: the holders are one writer,
    ///    or readers, or nobody.
    /// 2. `QUEUED` is set exactly when `waiters` is not empty, as seen under `queue_lock`: it
    ///    changes only under `queue_lock`, with the push that fills the queue or the pop that
    ///    empties it. `STARVING` is set only with `QUEUED` and cleared with it.
    /// 3. `CANDIDATE` is set while a waiter that `serve` popped is on its way: woken, not yet
    ///    back in the queue or in the lock's ownership for good. Only `serve` sets it, under
    ///    `queue_lock`, with the pop, and only when it was clear: there is at most one
    ///    candidate. Only the candidate clears it. `HANDED` goes with it when `serve` handed
    ///    the candidate the lock (counted it among the holders) instead of waking it to take
    ///    it.
    /// 4. Who may take the lock without queueing (*barging*, see `barge`): a writer when
    ///    nobody holds it and it is not `STARVING`; a reader when no writer holds it and
    ///    either nobody does and it is not `STARVING`, or readers do and nobody waits (neither
    ///    `QUEUED` nor `CANDIDATE`: readers never join past a waiter, so they drain and a
    ///    queued writer's turn comes). The candidate may take it when the holders are
    ///    compatible (`may_hold`) whatever the flags.
    /// 5. No wake-up is lost: whenever `QUEUED` is set and `CANDIDATE` is not, either somebody
    ///    holds the lock, and the release that leaves it without holders sees the flags and
    ///    runs `serve`; or whoever left it without holders in that state still has to run
    ///    `serve`. The transitions that reach "no holders, `QUEUED`, no `CANDIDATE`" are:
    ///    a release (`read_unlock`, `write_unlock`, an upgrade that gives up the last read
    ///    lock), whose maker reads the new value and serves; a candidate clearing `CANDIDATE`
    ///    never does it (it clears it only while it holds the lock, taken or handed, or,
    ///    going back to the queue, while somebody incompatible holds it); a locker setting
    ///    `QUEUED` only does it while the lock is held, or when `QUEUED` was set already
    ///    (starving, a serve due). `serve`, under `queue_lock`, pops the head as the candidate
    ///    when the holders are compatible with it (none for a writer, no writer for a reader);
    ///    otherwise the holders' release is due. A candidate in turn takes the lock (and its
    ///    release serves), or goes back to the front of the queue as above.
    /// 6. `serve` pops a waiter only while it is not `STARVING`, waking it as the candidate,
    ///    or while `STARVING`, handing it the lock: it counts it among the holders in the same
    ///    compare-and-swap (`HANDED`), so nobody takes the lock past it, and the starving lock
    ///    is handed from waiter to waiter as QEMU's always is. `STARVING` is set by a candidate
    ///    that goes back to the queue after waiting
    ///    [`STARVATION_NS`](super::comutex::STARVATION_NS) since it first queued; cleared with
    ///    the last pop, or by a handed waiter that waited less.
    /// 7. A reader candidate that took the lock, and a reader handed it, serve the next head
    ///    if it is a reader too: a run of queued readers is admitted together, one wake after
    ///    another.
    state: AtomicUsize,
    /// The thread (`comutex::thread_id`) of the last coroutine that took the lock: a hint
    /// for lockers, which spin only while that thread may be running, and not at all when a
    /// writer holds the lock and the hint names their own thread (a suspended coroutine of
    /// their thread is the writer: spinning cannot let it run). Readers on several threads
    /// share the lock, so under readers it names one of them, or a thread whose readers left
    /// already: a locker spins then even if the hint is its own thread. It only steers
    /// spinning, never what the lock does.
    holder_thread: AtomicU32,
    /// Protects `waiters`; held only for a few instructions, never across a yield.
    queue_lock: RawSpinLock,
    /// The queued coroutines, oldest first (a candidate that lost goes back to the front);
    /// touched only under `queue_lock`.
    waiters: UnsafeCell<VecDeque<Waiter>>,
}

// SAFETY: `waiters` is only touched under `queue_lock`, and records are `Send + Sync`; the other
// fields are atomics.
unsafe impl Send for RawCoRwLock {}
// SAFETY: as above.
unsafe impl Sync for RawCoRwLock {}

/// Whether holders described by `state` leave room for a writer (`writer`) or one more reader.
#[inline]
fn may_hold(state: usize, writer: bool) -> bool {
    if writer { state & HOLDERS == 0 } else { state & (WRITER | READERS_FULL) == 0 }
}

/// Whether a writer (`writer`) or a reader may take the lock described by `state` without
/// queueing (invariant 4).
#[inline]
fn barge(state: usize, writer: bool) -> bool {
    if state & HOLDERS == 0 {
        state & STARVING == 0
    } else {
        !writer && state & (WRITER | QUEUED | CANDIDATE | READERS_FULL) == 0
    }
}

/// Whether a release that left the lock in `state` must run `serve`: nobody holds it, waiters
/// are queued, and no candidate is on its way (invariant 5).
#[inline]
fn must_serve(state: usize) -> bool {
    state & !STARVING == QUEUED
}

impl RawCoRwLock {
    fn new() -> Self {
        RawCoRwLock {
            state: AtomicUsize::new(0),
            holder_thread: AtomicU32::new(0),
            queue_lock: RawSpinLock::new(),
            waiters: UnsafeCell::new(VecDeque::new()),
        }
    }

    /// The queue.
    ///
    /// # Safety
    ///
    /// The caller holds `queue_lock` for as long as it uses the reference.
    #[allow(clippy::mut_from_ref, reason = "exclusive by `queue_lock`")]
    unsafe fn waiters(&self) -> &mut VecDeque<Waiter> {
        // SAFETY: the caller holds `queue_lock`, which serialises every access.
        unsafe { &mut *self.waiters.get() }
    }

    /// Records this thread as the holder's (see `holder_thread`).
    #[inline]
    fn note_holder(&self, me: u32) {
        if self.holder_thread.load(Ordering::Relaxed) != me {
            self.holder_thread.store(me, Ordering::Relaxed);
        }
    }

    /// Takes a read lock (`writer` false) or the write lock if that needs no queueing
    /// (invariant 4).
    #[inline]
    fn try_barge(&self, writer: bool) -> bool {
        let add = if writer { WRITER } else { READER };
        let mut state = self.state.load(Ordering::Relaxed);
        while barge(state, writer) {
            match self.state.compare_exchange_weak(
                state,
                state + add,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.note_holder(thread_id());
                    return true;
                }
                Err(now) => state = now,
            }
        }
        false
    }

    /// Takes a read lock if no writer holds it and either nobody holds it or nobody waits.
    #[inline]
    fn try_read(&self) -> bool {
        self.try_barge(false)
    }

    /// Takes the write lock if nobody holds it (and it is not starving).
    #[inline]
    fn try_write(&self) -> bool {
        if self.state.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            self.note_holder(thread_id());
            return true;
        }
        self.try_barge(true)
    }

    /// Polls `take` while the last holder's thread may be running, unless a writer of our own
    /// thread holds the lock (see `holder_thread`); returns whether `take` succeeded.
    fn spin(&self, me: u32, take: impl FnMut() -> bool) -> bool {
        let ours = self.holder_thread.load(Ordering::Relaxed) == me
            && self.state.load(Ordering::Relaxed) & WRITER != 0;
        !ours && adaptive_spin::spin(take, || self.holder_thread.load(Ordering::Relaxed))
    }

    /// Starts a wait of `co` for its turn. Not cancelled by the context's shutdown: a queued
    /// waiter may be handed the lock and must be there to take it (it is cancelled at its next
    /// wait instead). If the shutdown leaks it instead, it is abandoned (see `Abandon`).
    fn prepare_wait<'co>(&self, co: &'co Co) -> Wait<'co> {
        // SAFETY: the wait is waited on in `wait_turn` (or dropped unwaited), whose callers
        // hold `self` until it ends.
        let on_leak = unsafe { OnLeak::new(self) };
        co.prepare_wait_as(false, Some(on_leak))
    }

    /// Takes the lock after a spin, or queues and suspends until it is ours.
    #[cold]
    fn lock_contended(&self, co: &Co, writer: bool) {
        let me = thread_id();
        if self.spin(me, || self.try_barge(writer)) {
            return;
        }
        // Fail, if at all, before queueing: a serve that pops a waiter that is gone would
        // leave the queue unserved.
        co.assert_may_yield(0);
        let wait = self.prepare_wait(co);
        if self.enqueue(&wait, writer, None) == Queued::Acquired {
            self.note_holder(me);
            return;
        }
        self.wait_turn(co, wait, writer, Patience::start());
    }

    /// Under `queue_lock`: takes the lock if a locker may (invariant 4), or the candidate may
    /// when `requeue` is `Some(starved)` (then it also stops being the candidate), or queues
    /// `wait`: at the tail, or at the front for a candidate, which turns the lock starving if
    /// `starved`.
    fn enqueue(&self, wait: &Wait<'_>, writer: bool, requeue: Option<bool>) -> Queued {
        let add = if writer { WRITER } else { READER };
        self.queue_lock.lock_raw();
        let mut state = self.state.load(Ordering::Relaxed);
        let queued = loop {
            let (new, queued) = match requeue {
                None if barge(state, writer) => (state + add, Queued::Acquired),
                Some(_) if may_hold(state, writer) => (state + add - CANDIDATE, Queued::Acquired),
                None if !writer && state & (WRITER | READERS_FULL) == READERS_FULL => {
                    // SAFETY: we hold `queue_lock`.
                    unsafe { self.queue_lock.unlock_raw() };
                    panic!(
                        "aiocoro: a CoRwLock has {} read guards; the reader count is full (are \
                         guards being leaked with mem::forget?)",
                        (state & !(READER - 1)) / READER
                    );
                }
                // Held (or starving with a serve due): the holders' release serves the queue
                // (invariant 5).
                None => (state | QUEUED, Queued::Waiting),
                Some(starved) => {
                    let starving = if starved { STARVING } else { 0 };
                    ((state - CANDIDATE) | QUEUED | starving, Queued::Waiting)
                }
            };
            match self.state.compare_exchange(state, new, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break queued,
                // A holder released meanwhile (or another locker took the lock): look again.
                Err(now) => state = now,
            }
        };
        if queued == Queued::Waiting {
            let waiter = Waiter { waker: wait.wait_ref(), writer };
            // SAFETY: we hold `queue_lock`.
            let waiters = unsafe { self.waiters() };
            if requeue.is_some() {
                waiters.push_front(waiter);
            } else {
                waiters.push_back(waiter);
            }
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if queued == Queued::Acquired && requeue.is_some() {
            self.took_as_candidate(state + add - CANDIDATE, writer);
        }
        queued
    }

    /// Waits in the queue until the lock is ours: handed to us, or taken by us as the
    /// candidate; a candidate that loses to a barger (and a spin against it) goes back to the
    /// front of the queue.
    fn wait_turn<'co>(
        &self,
        co: &'co Co,
        mut wait: Wait<'co>,
        writer: bool,
        mut patience: Patience,
    ) {
        let me = thread_id();
        loop {
            // Woken only by the serve that popped us; the wait absorbs stray wakes.
            wait.wait();
            // We are the candidate (invariant 3). Acquire: if handed, pairs with the serve that
            // counted us, which read the releases before it.
            if self.state.load(Ordering::Acquire) & HANDED != 0 {
                let mut done = CANDIDATE | HANDED;
                if !patience.exhausted() {
                    done |= STARVING;
                }
                let before = self.state.fetch_and(!done, Ordering::Acquire);
                self.note_holder(me);
                self.took_as_candidate(before & !done, writer);
                return;
            }
            if self.spin(me, || self.try_take_as_candidate(writer)) {
                self.note_holder(me);
                return;
            }
            patience.lost();
            wait = self.prepare_wait(co);
            if self.enqueue(&wait, writer, Some(patience.exhausted())) == Queued::Acquired {
                self.note_holder(me);
                return;
            }
        }
    }

    /// The candidate takes the lock if the holders leave room (invariant 4), and stops being
    /// the candidate.
    fn try_take_as_candidate(&self, writer: bool) -> bool {
        let add = if writer { WRITER } else { READER };
        let mut state = self.state.load(Ordering::Relaxed);
        while may_hold(state, writer) {
            let new = state + add - CANDIDATE;
            match self.state.compare_exchange_weak(state, new, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.took_as_candidate(new, writer);
                    return true;
                }
                Err(now) => state = now,
            }
        }
        false
    }

    /// After the candidate took the lock, or was handed it, leaving `state`: a reader lets
    /// the readers queued behind it in (invariant 7).
    #[inline]
    fn took_as_candidate(&self, state: usize, writer: bool) {
        if cfg!(debug_assertions) {
            let state = self.state.load(Ordering::Relaxed);
            let held = if writer { state & WRITER != 0 } else { state & HOLDERS >= READER };
            debug_assert!(held, "aiocoro: a CoRwLock waiter went on without the lock");
        }
        if !writer && state & (QUEUED | CANDIDATE) == QUEUED {
            self.serve();
        }
    }

    /// Gives up a read lock.
    ///
    /// # Safety
    ///
    /// The caller holds a read lock.
    #[inline]
    unsafe fn read_unlock(&self) {
        if must_serve(self.state.fetch_sub(READER, Ordering::Release) - READER) {
            self.serve();
        }
    }

    /// Gives up the write lock.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock.
    #[inline]
    unsafe fn write_unlock(&self) {
        if must_serve(self.state.fetch_sub(WRITER, Ordering::Release) - WRITER) {
            self.serve();
        }
    }

    /// Pops the head of the queue as the candidate if the holders are compatible with it and
    /// no candidate is on its way (invariants 5 and 6), and wakes it.
    #[cold]
    fn serve(&self) {
        self.queue_lock.lock_raw();
        // SAFETY: we hold `queue_lock`.
        let popped = unsafe { self.pop_candidate() };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if let Some(waker) = popped {
            // SAFETY: the record was popped once, here, and its coroutine waits until this
            // wake: a CoRwLock wait is not cancelled by its context's shutdown
            // (`prepare_wait_as`), so nothing else ends it, and its context stays alive
            // meanwhile.
            unsafe { waker.wake() };
        }
    }

    /// `serve`'s work under `queue_lock`: returns the waker of the popped head, if any.
    ///
    /// # Safety
    ///
    /// The caller holds `queue_lock`.
    unsafe fn pop_candidate(&self) -> Option<WaitRef> {
        // SAFETY: the caller holds `queue_lock`.
        let waiters = unsafe { self.waiters() };
        let writer = waiters.front()?.writer;
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & CANDIDATE != 0 || !may_hold(state, writer) {
                // The candidate, or the holders' release, is due to serve (invariant 5).
                return None;
            }
            let mut new = state | CANDIDATE;
            if state & STARVING != 0 {
                new += HANDED + if writer { WRITER } else { READER };
            }
            if waiters.len() == 1 {
                new &= !(QUEUED | STARVING);
            }
            // Acquire: a handed waiter's hold starts after the releases we read; release: it
            // reads this.
            match self.state.compare_exchange(state, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        waiters.pop_front().map(|waiter| waiter.waker)
    }

    /// Turns the caller's read lock into the write lock if it is the only reader and nobody
    /// waits.
    #[inline]
    fn try_upgrade(&self) -> bool {
        self.state.compare_exchange(READER, WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Upgrades now if the caller is the only reader (and the lock not starving); otherwise
    /// gives up the caller's read lock, queues it as a writer at the tail, and suspends until
    /// the write lock is ours.
    ///
    /// The caller holds a read lock, whose ownership passes to this function.
    #[cold]
    fn upgrade_contended(&self, co: &Co, wait: Wait<'_>) {
        let me = thread_id();
        self.queue_lock.lock_raw();
        let mut state = self.state.load(Ordering::Relaxed);
        let upgraded = loop {
            let alone = state & HOLDERS == READER && state & STARVING == 0;
            // Release for what we read; acquire in case we take the write lock, or leave it
            // free and serve a waiter (see `pop_candidate`).
            let new = if alone { state - READER + WRITER } else { (state - READER) | QUEUED };
            match self.state.compare_exchange(state, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break if alone { None } else { Some(new) },
                Err(now) => state = now,
            }
        };
        let Some(left) = upgraded else {
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            self.note_holder(me);
            return;
        };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.waiters().push_back(Waiter { waker: wait.wait_ref(), writer: true }) };
        // The last reader gone: ours to serve (invariant 5), never ourselves (a waiter other
        // than us was queued, or we would have upgraded in place).
        let popped = if must_serve(left) {
            // SAFETY: we hold `queue_lock`.
            unsafe { self.pop_candidate() }
        } else {
            None
        };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if let Some(waker) = popped {
            // SAFETY: as in `serve`.
            unsafe { waker.wake() };
        }
        self.wait_turn(co, wait, true, Patience::start());
    }

    /// Turns the caller's write lock into a read lock; readers at the head of the queue join.
    #[inline]
    fn downgrade(&self) {
        if self
            .state
            .compare_exchange(WRITER, READER, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            self.downgrade_contended();
        }
    }

    #[cold]
    fn downgrade_contended(&self) {
        let before = self
            .state
            .fetch_update(Ordering::Release, Ordering::Relaxed, |state| {
                Some(state - WRITER + READER)
            })
            .expect("the closure always gives a new state");
        if (before - WRITER + READER) & (QUEUED | CANDIDATE) == QUEUED {
            // A reader at the head joins (a writer there stays queued).
            self.serve();
        }
    }
}

/// A waiter whose context's shutdown leaked it (it will never run) leaves the queue; if
/// `serve` popped it already, it stops being the candidate, releasing the lock for it if it
/// was handed it, and serves the queue if that leaves it unserved. So the lock never stays
/// with, or waits for, a coroutine that cannot run.
impl Abandon for RawCoRwLock {
    fn abandon(&self, wait: WaitId) {
        self.queue_lock.lock_raw();
        // SAFETY: we hold `queue_lock`.
        let waiters = unsafe { self.waiters() };
        let queued = waiters.iter().position(|waiter| waiter.waker.names(wait));
        if let Some(index) = queued {
            waiters.remove(index);
            if waiters.is_empty() {
                // Invariant 2. A release that left the lock without holders and owes a `serve`
                // finds the queue empty then, and nothing to do.
                self.state.fetch_and(!(QUEUED | STARVING), Ordering::Relaxed);
            }
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if queued.is_some() {
            return;
        }
        // Popped (only `serve` pops, and each pop makes the popped waiter the candidate): the
        // wait is still registered, so its coroutine has not run since, and the candidate on
        // its way is us; only we clear `CANDIDATE` (invariant 3). Release: a hold we were
        // handed ends here; acquire: for the `serve` below.
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |state| {
                Some(without_candidate(state))
            })
            .expect("the closure always gives a new state");
        debug_assert!(
            before & CANDIDATE != 0,
            "aiocoro: an abandoned CoRwLock waiter was neither queued nor the candidate"
        );
        // Unlike a live candidate (invariant 5), this may leave the lock without holders or
        // candidate while waiters are queued: then the queue is ours to serve.
        if must_serve(without_candidate(before)) {
            self.serve();
        }
    }
}

/// `state` once the candidate is gone: without `CANDIDATE` and `HANDED`, and, if it was
/// handed the lock, without its hold (a writer excludes every other holder, readers exclude
/// a writer, so `WRITER` says which it held).
fn without_candidate(state: usize) -> usize {
    let hold = match (state & HANDED != 0, state & WRITER != 0) {
        (false, _) => 0,
        (true, true) => WRITER,
        (true, false) => READER,
    };
    state - (state & (CANDIDATE | HANDED)) - hold
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use super::{CANDIDATE, CoRwLock, HANDED, QUEUED, STARVING, WRITER};
    use crate::aio::IoThread;
    use crate::sync::busy_thread::block_thread;
    use crate::sync::comutex::STARVATION_NS;

    /// Waits until `lock`'s state has all of `flags`.
    fn wait_for_flags(lock: &CoRwLock<u32>, flags: usize) {
        while lock.raw.state.load(Ordering::Relaxed) & flags != flags {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_writer_passed_over_by_readers_for_longer_than_the_starvation_bound_is_handed_the_lock() {
        let iothread = IoThread::spawn("rwlock-starving").unwrap();
        let lock = Arc::new(CoRwLock::new(0u32));
        let holder = lock.try_read().expect("the lock starts free");
        let (written_tx, written_rx) = mpsc::channel();
        let l = lock.clone();
        iothread
            .handle()
            .spawn(move |co| {
                *l.write(co) += 1;
                written_tx.send(()).unwrap();
            })
            .unwrap();
        wait_for_flags(&lock, QUEUED);
        let go = block_thread(&iothread);
        drop(holder);
        // The writer was woken as the candidate, but its thread is busy: a running reader
        // takes the free lock first.
        let barger = lock.try_read().expect("freed for a running locker");
        std::thread::sleep(Duration::from_nanos(2 * STARVATION_NS));
        // The writer runs, finds the lock read, spins, and goes back to the queue, starving.
        drop(go);
        wait_for_flags(&lock, QUEUED | STARVING);
        let go = block_thread(&iothread);
        assert!(lock.try_read().is_none(), "a starving lock lets no reader past a waiter");
        drop(barger);
        assert_eq!(
            lock.raw.state.load(Ordering::Relaxed),
            WRITER | CANDIDATE | HANDED,
            "a starving lock is handed to the waiting writer, not freed"
        );
        assert!(lock.try_read().is_none() && lock.try_write().is_none());
        drop(go);
        written_rx.recv().unwrap();
        iothread.stop();
        assert_eq!(lock.raw.state.load(Ordering::Relaxed), 0, "free, and no longer starving");
        assert_eq!(*lock.try_read().unwrap(), 1);
    }
}
