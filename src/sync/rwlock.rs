//! `CoRwLock` (QEMU's `CoRwlock`): a readers-writer lock whose waiters are suspended coroutines.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::mem;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;

use super::raw::RawLock;
use super::spin::RawSpinLock;
use crate::aio::{Abandon, OnLeak, Wait, WaitId, WaitRef};
use crate::coroutine::Co;
use crate::loom::AtomicUsize;

/// A writer holds the lock.
const WRITER: usize = 1;
/// Waiters are queued.
const QUEUED: usize = 2;
/// One reader holds the lock (the reader count is `state / READER`).
const READER: usize = 4;
/// The top bit of the reader count: reached only by an absurd number of read guards (leaked
/// with `mem::forget`), refused before the count can overflow into the flag bits.
const READERS_FULL: usize = 1 << (usize::BITS - 1);

/// Whether a new reader may join the holders described by `state` without queueing: no writer
/// holds the lock, nobody is queued (readers never overtake a queued writer), and the count has
/// room.
#[inline]
fn read_lockable(state: usize) -> bool {
    state & (WRITER | QUEUED | READERS_FULL) == 0
}

/// A readers-writer lock for coroutines (QEMU's `CoRwlock`), owning its data: any number of
/// readers, or one writer. Waiting suspends the coroutine, not the thread, and the lock works
/// across contexts: coroutines on several [`IoThread`](crate::aio::IoThread)s may share it
/// (through an `Arc`), and a waiter is woken on its own context whatever thread releases.
///
/// * **Fair.** Waiters queue first in, first out, and a reader that finds anybody queued
///   queues too, so a stream of readers cannot starve a writer.
/// * **No barging.** On release the lock is handed to the waiters at the head of the queue
///   *before* they are woken; nobody can slip in between. A run of readers at the head is
///   handed the lock together.
/// * **Cheap when uncontended.** One atomic state word: taking or releasing a read lock or the
///   write lock is one atomic read-modify-write (a compare-and-swap to take, a subtraction to
///   release). An internal spinlock is taken only to queue or to hand the lock over.
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
    /// Takes a read lock, suspending the coroutine while a writer holds the lock or anybody is
    /// queued (QEMU's `qemu_co_rwlock_rdlock`).
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

    /// Takes the write lock, suspending the coroutine while anybody holds the lock or is queued
    /// (QEMU's `qemu_co_rwlock_wrlock`).
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

    /// Takes a read lock if that needs no waiting: no writer holds the lock and nobody is
    /// queued. Works outside a coroutine too.
    #[inline]
    pub fn try_read(&self) -> Option<CoRwLockReadGuard<'_, T>> {
        self.raw.try_read().then(|| CoRwLockReadGuard { lock: self, _not_send: PhantomData })
    }

    /// Takes the write lock if nobody holds it. Works outside a coroutine too.
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
    /// Immediate if this is the only reader and nobody is queued. Otherwise the coroutine gives
    /// up its read lock and queues as a writer behind everybody already queued, so the data may
    /// change before it gets the write lock: re-check what was read.
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
            lock.raw.upgrade_contended(wait);
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
    /// `qemu_co_rwlock_downgrade`). Readers queued at the head of the queue join at once; a
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

/// A queued coroutine: its wake record (woken once, by the hand-over that grants it the lock,
/// while it waits) and what it wants.
struct Waiter {
    waker: WaitRef,
    writer: bool,
}

/// The wakers of the waiters one hand-over granted the lock to, woken once the queue lock is
/// released. (The common single waiter needs no allocation.)
#[derive(Default)]
struct Granted {
    first: Option<WaitRef>,
    rest: Vec<WaitRef>,
}

impl Granted {
    fn push(&mut self, waker: WaitRef) {
        if self.first.is_none() {
            self.first = Some(waker);
        } else {
            self.rest.push(waker);
        }
    }

    /// Wakes them, in queue order.
    fn wake(self) {
        if let Some(first) = self.first {
            // SAFETY: each record was popped from the queue once, by the hand-over that
            // granted its coroutine the lock, and that wait stays registered until this wake:
            // a CoRwLock wait is not cancelled by its context's shutdown (`prepare_wait`), so
            // nothing else ends it, and its context stays alive meanwhile (a shutdown that
            // leaks the wait instead, and releases the lock for it, leaks it registered, with
            // its context).
            unsafe { first.wake() };
        }
        for waker in self.rest {
            // SAFETY: as above.
            unsafe { waker.wake() };
        }
    }
}

/// The lock without its data.
struct RawCoRwLock {
    /// `WRITER` bit | `QUEUED` bit | reader count × `READER`.
    ///
    /// Invariants:
    /// 1. `WRITER` and a non-zero reader count never hold together: the holders are one writer,
    ///    or readers, or nobody.
    /// 2. `QUEUED` is set exactly when `waiters` is not empty, as seen under `queue_lock`: it is
    ///    set (together with the push) and cleared (together with the pop that empties the
    ///    queue) only by a holder of `queue_lock`.
    /// 3. Nobody takes the lock past a set `QUEUED` bit: the fast paths need it clear, and a
    ///    slow path that finds it set queues. So waiters are served in queue order, and
    ///    readers never overtake a queued writer.
    /// 4. The release that leaves the state at exactly `QUEUED` (no holder, waiters queued)
    ///    obliges its maker to take `queue_lock` and hand the lock to the head of the queue. In
    ///    that state, and while the only holder is a writer with `QUEUED` set, nobody but the
    ///    holder of `queue_lock` can change the word (every fast path fails, and the holders
    ///    that could release are the caller itself), so a hand-over may simply store the new
    ///    state.
    /// 5. A hand-over stores the new holders (the woken waiters) before it wakes them: a woken
    ///    waiter owns the lock already.
    state: AtomicUsize,
    /// Protects `waiters`; held only for a few instructions, never across a yield.
    queue_lock: RawSpinLock,
    /// The queued coroutines, oldest first; touched only under `queue_lock`.
    waiters: UnsafeCell<VecDeque<Waiter>>,
}

// SAFETY: `waiters` is only touched under `queue_lock`, and records are `Send + Sync`; the other
// fields are atomics.
unsafe impl Send for RawCoRwLock {}
// SAFETY: as above.
unsafe impl Sync for RawCoRwLock {}

impl RawCoRwLock {
    fn new() -> Self {
        RawCoRwLock {
            state: AtomicUsize::new(0),
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

    /// Takes a read lock if no writer holds it and nobody is queued.
    #[inline]
    fn try_read(&self) -> bool {
        let mut state = self.state.load(Ordering::Relaxed);
        while read_lockable(state) {
            match self.state.compare_exchange_weak(
                state,
                state + READER,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => state = now,
            }
        }
        false
    }

    /// Takes the write lock if it is free (then nobody is queued either: invariant 4).
    #[inline]
    fn try_write(&self) -> bool {
        self.state.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Starts a wait of `co` in `waiters`. Not cancelled by the context's shutdown: a queued
    /// waiter is granted the lock by a hand-over and must be there to take it (it is cancelled
    /// at its next wait instead). If the shutdown leaks it instead, it is abandoned.
    fn prepare_wait<'co>(&self, co: &'co Co) -> Wait<'co> {
        // SAFETY: the wait is waited on in `lock_contended` or `upgrade_contended`, which hold
        // `self` until it ends.
        let on_leak = unsafe { OnLeak::new(self) };
        co.prepare_wait_as(false, Some(on_leak))
    }

    /// Takes the lock, or queues and suspends until a hand-over grants it.
    #[cold]
    fn lock_contended(&self, co: &Co, writer: bool) {
        // Fail, if at all, before queueing: a hand-over to a waiter that is gone would leave
        // the lock held by nobody.
        co.assert_may_yield(0);
        let wait = self.prepare_wait(co);
        self.queue_lock.lock_raw();
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let (new, acquired) = if writer && state == 0 {
                (WRITER, true)
            } else if !writer && read_lockable(state) {
                (state + READER, true)
            } else if state & QUEUED != 0 {
                // Others are queued already: behind them (invariant 3).
                break;
            } else if !writer && state & (WRITER | READERS_FULL) == READERS_FULL {
                // SAFETY: we hold `queue_lock`.
                unsafe { self.queue_lock.unlock_raw() };
                panic!(
                    "aiocoro: a CoRwLock has {} read guards; the reader count is full (are \
                     guards being leaked with mem::forget?)",
                    state / READER
                );
            } else {
                // Held and nobody queued: we are the first waiter.
                (state | QUEUED, false)
            };
            match self.state.compare_exchange(state, new, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) if acquired => {
                    // SAFETY: we hold `queue_lock`.
                    unsafe { self.queue_lock.unlock_raw() };
                    return;
                }
                Ok(_) => break,
                // A holder released meanwhile (or another reader joined): look again.
                Err(now) => state = now,
            }
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.waiters().push_back(Waiter { waker: wait.wait_ref(), writer }) };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        // Woken only by the hand-over that granted us the lock (invariant 5); the wait absorbs
        // stray wakes.
        wait.wait();
        if cfg!(debug_assertions) {
            let state = self.state.load(Ordering::Acquire);
            let held =
                if writer { state & WRITER != 0 } else { state & WRITER == 0 && state >= READER };
            debug_assert!(held, "aiocoro: a CoRwLock waiter woke without the lock");
        }
    }

    /// Gives up a read lock.
    ///
    /// # Safety
    ///
    /// The caller holds a read lock.
    #[inline]
    unsafe fn read_unlock(&self) {
        if self.state.fetch_sub(READER, Ordering::Release) == READER | QUEUED {
            // The last reader, with waiters queued: ours to hand over (invariant 4).
            self.hand_over();
        }
    }

    /// Gives up the write lock.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock.
    #[inline]
    unsafe fn write_unlock(&self) {
        if self.state.fetch_sub(WRITER, Ordering::Release) != WRITER {
            // It was `WRITER | QUEUED`: ours to hand over (invariant 4).
            self.hand_over();
        }
    }

    /// Hands the lock, which nobody holds, to the head of the queue.
    #[cold]
    fn hand_over(&self) {
        self.queue_lock.lock_raw();
        // Acquire: the releases of the earlier holders (each reader's `fetch_sub` continues the
        // release sequence) happen before whatever the new holders do.
        let state = self.state.load(Ordering::Acquire);
        debug_assert_eq!(state, QUEUED, "aiocoro: CoRwLock hand-over from a held state");
        // SAFETY: we hold `queue_lock`; the state is exactly `QUEUED`, which only we may change
        // (invariant 4).
        let granted = unsafe { self.grant(0) };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        granted.wake();
    }

    /// Grants the lock to the waiters at the head of the queue that can hold it together with
    /// `readers` remaining readers (a writer only if `readers` is 0), stores the new state, and
    /// returns the wakers to wake.
    ///
    /// # Safety
    ///
    /// The caller holds `queue_lock`, and the state is one that only it may change (invariant
    /// 4): exactly `QUEUED`, or a writer (the caller) with `QUEUED`, which the caller gives up.
    unsafe fn grant(&self, mut readers: usize) -> Granted {
        // SAFETY: the caller holds `queue_lock`.
        let waiters = unsafe { self.waiters() };
        let mut granted = Granted::default();
        let mut state = if readers == 0 && waiters.front().is_some_and(|waiter| waiter.writer) {
            let waiter = waiters.pop_front().expect("checked above");
            granted.push(waiter.waker);
            WRITER
        } else {
            while waiters.front().is_some_and(|waiter| !waiter.writer) {
                let waiter = waiters.pop_front().expect("checked above");
                granted.push(waiter.waker);
                readers += 1;
            }
            readers * READER
        };
        if !waiters.is_empty() {
            state |= QUEUED;
        }
        self.state.store(state, Ordering::Release);
        granted
    }

    /// Turns the caller's read lock into the write lock if it is the only reader and nobody is
    /// queued.
    #[inline]
    fn try_upgrade(&self) -> bool {
        self.state.compare_exchange(READER, WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Upgrades now if that became possible; otherwise gives up the caller's read lock, queues
    /// it as a writer at the tail, and suspends until a hand-over grants it the write lock.
    ///
    /// The caller holds a read lock, whose ownership passes to this function.
    #[cold]
    fn upgrade_contended(&self, wait: Wait<'_>) {
        self.queue_lock.lock_raw();
        if self.try_upgrade() {
            // SAFETY: we hold `queue_lock`.
            unsafe { self.queue_lock.unlock_raw() };
            return;
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.waiters().push_back(Waiter { waker: wait.wait_ref(), writer: true }) };
        // Leave the readers and mark the queue non-empty in one step, so that whichever reader
        // leaves last sees `QUEUED` and hands over. Release for what we read; acquire in case
        // we are that last reader and hand over to a writer.
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |state| {
                Some((state - READER) | QUEUED)
            })
            .expect("the closure always gives a new state");
        let granted = if (before - READER) | QUEUED == QUEUED {
            // We were the last reader: ours to hand over (invariant 4), maybe to ourselves.
            // SAFETY: we hold `queue_lock`, and the state is exactly `QUEUED`.
            unsafe { self.grant(0) }
        } else {
            Granted::default()
        };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        granted.wake();
        wait.wait();
        debug_assert!(
            self.state.load(Ordering::Acquire) & WRITER != 0,
            "aiocoro: a CoRwLock upgrade woke without the write lock"
        );
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
        self.queue_lock.lock_raw();
        // SAFETY: we hold `queue_lock`; the state is `WRITER | QUEUED` with the caller the
        // writer, which only we may change (invariant 4). We stay as one reader.
        let granted = unsafe { self.grant(1) };
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        granted.wake();
    }
}

/// A waiter whose context's shutdown leaked it (it will never run) leaves the queue; if a
/// hand-over granted it the lock already, the lock is released for it. So the lock never stays
/// with a coroutine that cannot run.
impl Abandon for RawCoRwLock {
    fn abandon(&self, wait: WaitId) {
        self.queue_lock.lock_raw();
        // SAFETY: we hold `queue_lock`.
        let waiters = unsafe { self.waiters() };
        let queued = waiters.iter().position(|waiter| waiter.waker.names(wait));
        if let Some(index) = queued {
            waiters.remove(index);
            if waiters.is_empty() {
                self.clear_queued();
            }
        }
        // SAFETY: we hold `queue_lock`.
        unsafe { self.queue_lock.unlock_raw() };
        if queued.is_some() {
            return;
        }
        // Granted (only a hand-over pops, and it grants): the wait is still registered, so its
        // coroutine has not run since and still holds what it was granted, and `WRITER` says
        // what that is (a writer excludes every other holder, readers exclude a writer).
        // Acquire: the grant was stored before the queue lock we took after it.
        if self.state.load(Ordering::Acquire) & WRITER != 0 {
            // SAFETY: the waiter holds the write lock, which it gives up through us.
            unsafe { self.write_unlock() };
        } else {
            // SAFETY: the waiter holds a read lock, which it gives up through us.
            unsafe { self.read_unlock() };
        }
    }
}

impl RawCoRwLock {
    /// Clears `QUEUED` once an abandoned waiter was taken out of the queue and left it empty
    /// (invariant 2). Not from exactly `QUEUED`: a release that left that state owes a
    /// hand-over and waits for `queue_lock`, and the hand-over finds the queue empty and frees
    /// the lock. From any other state the holders' releases find `QUEUED` clear and owe none.
    ///
    /// Must be called under `queue_lock`.
    fn clear_queued(&self) {
        let mut state = self.state.load(Ordering::Relaxed);
        while state != QUEUED {
            match self.state.compare_exchange_weak(
                state,
                state & !QUEUED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => state = now,
            }
        }
    }
}
