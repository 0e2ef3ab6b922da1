//! Suspending a coroutine until something wakes it, from this thread or any other (QEMU's
//! `qemu_coroutine_yield` + `aio_co_wake`, made safe against stale and duplicate wakes).
//!
//! Every suspension gets its own entry in the context's wait table, under a generation-checked
//! key. Wakers name that key. The first wake moves the entry from *waiting* to *delivered* and
//! queues the coroutine on its home context's run queue; later wakes for the same key find it
//! delivered (duplicate) or gone (stale: the suspension is over, and its key will never name
//! another entry), and do nothing. The coroutine itself, when entered, looks at its entry and
//! goes back to sleep unless it was delivered, so even a stray `enter` cannot end a wait early.
//! That is how a wake never resumes a coroutine in the middle of some other wait.

use std::marker::PhantomData;
use std::ptr;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::arena::Key;
use super::context::{
    Local, Message, RunItem, Shared, current_local, deliver_here, home_local, home_rc, no_context,
    with_current_brief,
};
use super::deferred::Dispatch;
use crate::coroutine::{Co, Coroutine, ParkState, in_coroutine};

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeReason {
    /// A waker woke it.
    Woken,
    /// Its timeout expired first.
    TimedOut,
}

/// How a suspension ended: the public [`WakeReason`], or cancelled by the context's shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Woken, or timed out.
    Woken(WakeReason),
    /// Cancelled: its context shut down while it waited (see
    /// [`AioContext`](super::AioContext)'s shutdown).
    Cancelled,
}

/// One suspension in the wait table: the suspended coroutine (owned here while it waits), the
/// first wake it received, if any, whether the context's shutdown may cancel it, and the lock
/// to tell if the shutdown leaks it.
pub(crate) struct WaitState {
    pub(crate) coroutine: Coroutine,
    pub(crate) delivered: Option<Outcome>,
    pub(crate) cancellable: bool,
    pub(crate) on_leak: Option<OnLeak>,
}

impl WaitState {
    /// Records the first wake; returns whether this was it.
    pub(crate) fn deliver(&mut self, reason: WakeReason) -> bool {
        self.end(Outcome::Woken(reason))
    }

    /// Cancels the suspension if it may be and was not woken yet; returns whether it was.
    pub(crate) fn cancel(&mut self) -> bool {
        self.cancellable && self.end(Outcome::Cancelled)
    }

    fn end(&mut self, outcome: Outcome) -> bool {
        let first = self.delivered.is_none();
        if first {
            self.delivered = Some(outcome);
        }
        first
    }
}

/// A lock that queues wake records of coroutines and gives the coroutine it pops something it
/// must come and take (a turn, the lock itself): what it does when the context of a queued
/// coroutine shuts down and leaks that coroutine's wait (step 3 of
/// [`AioContext`](super::AioContext)'s shutdown). The coroutine will never run again, so the
/// lock must not wait for it: it takes the wait's record out of its queue or, if a release
/// popped it already, gives up or passes on what that release gave it, as the coroutine would
/// have done had it been cancelled.
///
/// Called once per leaked wait, on the wait's thread, after its context is down (its inbox
/// refuses wakes, nothing runs there again), while the wait is still registered: its coroutine
/// stays suspended inside the lock's code for good, holding a reference to the lock.
pub(crate) trait Abandon: Sync {
    /// Abandons `wait`, which this lock queued.
    fn abandon(&self, wait: WaitId);
}

/// The lock to tell if a shutdown leaks the wait that carries this (see [`Abandon`]).
#[derive(Clone, Copy)]
pub(crate) struct OnLeak {
    lock: NonNull<dyn Abandon>,
}

impl OnLeak {
    /// Tells `lock` about the leak.
    ///
    /// # Safety
    ///
    /// The wait that carries this is waited on by a coroutine that holds a reference to `lock`
    /// until that wait ends (it suspends inside the lock's code), so `lock` is alive for as
    /// long as the wait is registered.
    pub(crate) unsafe fn new(lock: &(dyn Abandon + 'static)) -> OnLeak {
        OnLeak { lock: NonNull::from(lock) }
    }

    /// Runs the lock's [`Abandon::abandon`] for `wait`, which carries this and is still
    /// registered.
    pub(crate) fn abandon(self, wait: WaitId) {
        // SAFETY: `wait` is still registered, so its coroutine still holds the lock borrowed
        // (the contract of `new`).
        unsafe { self.lock.as_ref() }.abandon(wait);
    }
}

/// Names one suspension, to find its [`WaitRef`] in a lock's queue.
#[derive(Clone, Copy)]
pub(crate) enum WaitId {
    /// A suspension of the context whose shared half is `shared`.
    Context { shared: *const Shared, key: Key },
    /// A loom model's suspension.
    #[cfg(aiocoro_loom)]
    Model(*const super::wait_model::ModelParker),
}

/// A suspension being prepared: make wakers with it, hand them out, then [`Wait::wait`].
///
/// ```
/// use aiocoro::aio::{AioContext, WakeReason};
/// use std::{cell::RefCell, rc::Rc};
///
/// let ctx = AioContext::new()?;
/// let parked = Rc::new(RefCell::new(None));
/// let p = parked.clone();
/// let co = ctx.spawn(move |co| {
///     let wait = co.prepare_wait();
///     *p.borrow_mut() = Some(wait.waker());
///     assert_eq!(wait.wait(), WakeReason::Woken);
/// });
/// ctx.poll(false); // runs the coroutine until it waits
/// let waker = parked.borrow_mut().take().unwrap();
/// std::thread::spawn(move || waker.wake()).join().unwrap();
/// co.join().unwrap(); // runs the woken coroutine to its end
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Wait<'co> {
    co: &'co Co,
    target: Target,
}

impl std::fmt::Debug for Wait<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wait").finish_non_exhaustive()
    }
}

/// Where a suspension is registered.
enum Target {
    /// In the wait table of a context.
    Context { local: Rc<Local>, key: Key },
    /// A loom model's stand-in: the "coroutine" is a loom thread that parks; the lock to tell
    /// if the model leaks the wait.
    #[cfg(aiocoro_loom)]
    Model(Arc<super::wait_model::ModelParker>, Option<OnLeak>),
}

impl Co {
    /// Starts a suspension of this coroutine in its thread's context; see [`Wait`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext).
    ///
    /// When the context shuts down while the coroutine waits, the wait is cancelled: it does
    /// not return, the coroutine unwinds from it (see [`AioContext`](super::AioContext)).
    pub fn prepare_wait(&self) -> Wait<'_> {
        self.prepare_wait_as(self.may_be_cancelled(), None)
    }

    /// Like [`Co::prepare_wait`]; `cancellable` says whether the context's shutdown may cancel
    /// the wait. One that starts while the context cancels its coroutines is cancelled at once.
    /// `on_leak` is the lock to tell if the shutdown leaks the wait instead (see [`Abandon`]).
    pub(crate) fn prepare_wait_as(&self, cancellable: bool, on_leak: Option<OnLeak>) -> Wait<'_> {
        #[cfg(aiocoro_loom)]
        if self.is_model() {
            return Wait { co: self, target: Target::Model(Default::default(), on_leak) };
        }
        let local = current_local("a coroutine wait");
        let delivered = (cancellable && local.is_cancelling()).then_some(Outcome::Cancelled);
        let key = local.waits.borrow_mut().insert(WaitState {
            coroutine: self.current(),
            delivered,
            cancellable,
            on_leak,
        });
        Wait { co: self, target: Target::Context { local, key } }
    }

    /// Parks this coroutine in its thread's context and returns the record that ends the park;
    /// then [`Co::wait_unparked`]. See [`ParkRecord`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext), or if the coroutine may not
    /// yield once the caller has released `releasing` thread-lock guards (as [`Co::yield_now`]
    /// would then): before anything is parked, so that no record names a coroutine that does
    /// not wait. The caller's queueing of the record and the suspension that follows then
    /// cannot fail.
    #[inline]
    pub(crate) fn park(&self, releasing: usize) -> ParkRecord {
        self.assert_may_yield(releasing);
        let coroutine = self.current();
        // SAFETY: the count update runs no other code.
        let context = unsafe {
            with_current_brief(|local| {
                local.parked.set(local.parked.get() + 1);
                local.shared.id
            })
        };
        let context = context.unwrap_or_else(|| no_context("a coroutine park"));
        self.park_state().set(ParkState::Parked);
        ParkRecord { coroutine, context }
    }

    /// Suspends until the run queue resumes this coroutine for the unpark of its record.
    /// Stray entries yield again.
    // Inlined for the same reason as `Wait::wait`.
    #[inline(always)]
    pub(crate) fn wait_unparked(&self) {
        loop {
            self.yield_now();
            if self.park_state().get() == ParkState::Idle {
                return;
            }
        }
    }

    /// Lets the other coroutines of this context run, then continues: queues this coroutine
    /// at the back of the context's run queue and suspends (QEMU's `aio_co_schedule` of
    /// `qemu_coroutine_self()` followed by `qemu_coroutine_yield`).
    ///
    /// Once the context's shutdown cancels its coroutines, a reschedule is cancelled as a wait
    /// is: it does not return, the coroutine unwinds from it (see
    /// [`AioContext`](super::AioContext)). So a coroutine that reschedules itself forever (a
    /// busy poll) ends with its context, and whoever joins it gets the cancellation.
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext).
    #[inline]
    pub fn reschedule(&self) {
        self.cancel_if_cancelling();
        // Queued behind the coroutines already runnable; the run queue brings it back. The
        // park is in this thread's context, which is alive, so the unpark queues it.
        let queued = self.park(0).unpark();
        debug_assert!(queued, "aiocoro: a reschedule's park was not queued");
        self.wait_unparked();
    }

    /// Unwinds this coroutine with its cancellation, as a wait that starts now would, if its
    /// context is cancelling its coroutines and it may be cancelled (see
    /// [`Co::may_be_cancelled`]): a cancellation point where no wait starts.
    pub(crate) fn cancel_if_cancelling(&self) {
        // SAFETY: reading the phase runs no other code.
        if unsafe { with_current_brief(Local::is_cancelling) } == Some(true)
            && self.may_be_cancelled()
        {
            self.unwind_cancelled();
        }
    }

    /// Suspends this coroutine for `duration` (QEMU's `qemu_co_sleep_ns`).
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext).
    pub fn sleep(&self, duration: Duration) {
        self.prepare_wait().wait_timeout(duration);
    }
}

impl Wait<'_> {
    /// A `Send + Sync` waker for this suspension.
    pub fn waker(&self) -> Waker {
        match &self.target {
            Target::Context { local, key } => {
                Waker { target: WakerTarget::Context { shared: local.shared.clone(), key: *key } }
            }
            #[cfg(aiocoro_loom)]
            Target::Model(parker, _) => Waker { target: WakerTarget::Model(parker.clone()) },
        }
    }

    /// A waker for lock queues: no reference count to update (see [`WaitRef`]).
    pub(crate) fn wait_ref(&self) -> WaitRef {
        match &self.target {
            Target::Context { local, key } => {
                // From `Arc::as_ptr`, not from a `&Shared`: `WaitRef::wake` reaches the `Arc`'s
                // counts through this pointer, which a pointer made from a reference to the
                // `Shared` alone may not do.
                let shared = Arc::as_ptr(&local.shared).cast_mut();
                // SAFETY: `Arc::as_ptr` of a live `Arc` is never null.
                WaitRef::Context { shared: unsafe { NonNull::new_unchecked(shared) }, key: *key }
            }
            #[cfg(aiocoro_loom)]
            Target::Model(parker, _) => WaitRef::Model(parker.clone()),
        }
    }

    /// The name of this suspension, to find its records with [`WaitRef::names`].
    pub(crate) fn id(&self) -> WaitId {
        match &self.target {
            Target::Context { local, key } => {
                WaitId::Context { shared: Arc::as_ptr(&local.shared), key: *key }
            }
            #[cfg(aiocoro_loom)]
            Target::Model(parker, _) => WaitId::Model(Arc::as_ptr(parker)),
        }
    }

    /// A waker for this suspension that stays on this thread (cheaper: no atomic operation).
    pub fn local_waker(&self) -> LocalWaker {
        let (local, key) = self.context("local wakers");
        LocalWaker { context: local.shared.id, key, _not_send: PhantomData }
    }

    /// The context registration; models support only what locks use.
    fn context(&self, what: &str) -> (&Rc<Local>, Key) {
        let _ = what;
        match &self.target {
            Target::Context { local, key } => (local, *key),
            #[cfg(aiocoro_loom)]
            Target::Model(..) => panic!("aiocoro: loom models of coroutines have no {what}"),
        }
    }

    /// Suspends until a waker of this suspension wakes it. Returns at once if that happened
    /// already.
    ///
    /// If the context shuts down first and cancels the wait, this does not return: the
    /// coroutine unwinds from here (its destructors run), see
    /// [`AioContext`](super::AioContext).
    // Inlined so that the yield sits in the caller's frame: every call level between a
    // coroutine's loop and its yield costs a mispredicted return per wake (the CPU's return
    // stack does not survive the switch).
    #[inline(always)]
    pub fn wait(self) -> WakeReason {
        match self.suspend() {
            Some(reason) => reason,
            None => self.unwind_cancelled(),
        }
    }

    /// Like [`Wait::wait`], but a wait woken already still takes its turn: the coroutine
    /// yields once, so that the coroutines queued ahead of it run first, and the run item its
    /// wake queued resumes it. For a loop that polls something which may wake its own waiter
    /// ([`Co::block_on`] of a future that wakes itself during its poll): without the turn, it
    /// would poll again at once, forever, and starve every other coroutine of the context.
    #[inline(always)]
    pub(crate) fn wait_in_turn(self) -> WakeReason {
        #[cfg(aiocoro_loom)]
        if let Target::Model(..) = self.target {
            return self.wait();
        }
        // A wake on this thread delivers through `Local::deliver`, which queues the run item
        // (while this coroutine runs, no caller is outside every coroutine, so none enters it
        // directly); a wake from another thread is not delivered before the context takes it
        // from its inbox, and queues the item then.
        if matches!(self.delivery(), Some(Outcome::Woken(_))) {
            self.co.yield_now();
        }
        self.wait()
    }

    /// Suspends until a waker of this suspension wakes it (`Some`) or the context's shutdown
    /// cancels it (`None`); the entry is removed when `self` drops. A caller that gets `None`
    /// undoes what it set up for the wait (queue records, a released lock) and then unwinds
    /// with [`Co::unwind_cancelled`](crate::coroutine::Co).
    #[inline(always)]
    pub(crate) fn suspend(&self) -> Option<WakeReason> {
        #[cfg(aiocoro_loom)]
        if let Target::Model(parker, on_leak) = &self.target {
            if self.co.is_model_cancelled() {
                return None;
            }
            if self.co.model_leaks_now() {
                self.leak_model(*on_leak);
            }
            parker.park();
            return Some(WakeReason::Woken);
        }
        loop {
            match self.delivery() {
                Some(Outcome::Woken(reason)) => return Some(reason),
                Some(Outcome::Cancelled) => return None,
                None => self.co.yield_now(),
            }
        }
    }

    /// A loom model's stand-in for a shutdown that leaks this wait (see [`Co::model_leaked`]):
    /// the lock abandons it, then the model thread unwinds out of the lock call.
    #[cfg(aiocoro_loom)]
    fn leak_model(&self, on_leak: Option<OnLeak>) -> ! {
        if let Some(on_leak) = on_leak {
            on_leak.abandon(self.id());
        }
        std::panic::resume_unwind(Box::new("aiocoro: a loom model's wait was leaked"))
    }

    /// Ends the wait and unwinds the coroutine: its context cancelled it.
    #[cold]
    #[inline(never)]
    fn unwind_cancelled(self) -> ! {
        let co = self.co;
        drop(self);
        co.unwind_cancelled()
    }

    /// Like [`Wait::wait`], but gives up after `timeout` (QEMU's timeouts on
    /// `qemu_co_sleep_ns_wakeable`).
    pub fn wait_timeout(self, timeout: Duration) -> WakeReason {
        let waker = self.local_waker();
        let (local, _) = self.context("timeouts");
        let timer = local.new_timer(Rc::new(move || waker.wake_with(WakeReason::TimedOut)));
        timer.arm_after(timeout);
        self.wait()
    }

    /// The first wake this suspension received, if any.
    #[inline(always)]
    fn delivery(&self) -> Option<Outcome> {
        let (local, key) = self.context("wait table");
        local.waits.borrow().get(key)?.delivered
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // Finished or abandoned: the suspension is over, and its key goes stale.
        #[allow(irrefutable_let_patterns, reason = "a second variant exists in loom builds")]
        if let Target::Context { local, key } = &self.target {
            let removed = local.waits.borrow_mut().remove(*key);
            drop(removed);
        }
    }
}

/// A parked coroutine: the light suspension of hand-overs on the coroutine's own thread (a
/// `CoMutex` passed between coroutines of one context, a reschedule).
///
/// Unlike a [`Wait`] it has no wait-table entry and no key: the record owns a handle to the
/// coroutine (so the coroutine cannot be dropped while parked), never leaves the coroutine's
/// thread, and is unparked at most once, so it can be neither stale nor duplicated. The park
/// state lives in the coroutine: `Parked`, then `Woken` by the unpark, which queues the record
/// on the run queue, then `Idle` when the run queue resumes it; or straight from `Parked` to
/// `Idle` by [`ParkRecord::unpark_and_enter`], which then enters it. Only the holder of the record
/// sets `Idle`, and that ends the park, so a stray `enter` cannot. The context counts its
/// parked coroutines as suspended.
pub(crate) struct ParkRecord {
    coroutine: Coroutine,
    /// The id of the context that counts the park.
    context: u64,
}

impl ParkRecord {
    /// Queues the parked coroutine to run, behind the coroutines already runnable; the park
    /// ends when it does. Must be called on the coroutine's thread.
    ///
    /// Returns false if the park's context is gone (it shut down while the coroutine was
    /// parked where its shutdown could not reach it): that coroutine can never run again. Its
    /// record is leaked, not dropped: dropping the last handle would unwind the coroutine from
    /// the middle of its park, where the caller of the lock operation it is in does not expect
    /// it (a `CoQueue::wait` whose caller's guard would then release a lock it does not hold).
    #[must_use = "a false return means nothing was woken: wake another waiter instead"]
    #[inline]
    pub(crate) fn unpark(self) -> bool {
        // Kept out of the closure, so that no path drops it: without a context on this thread
        // the closure would be dropped unrun.
        let mut record = Some(self);
        // SAFETY: the closure only queues the record; it drops nothing.
        unsafe {
            with_current_brief(|local| {
                let Some(record) = record.take_if(|record| record.context == local.shared.id)
                else {
                    return;
                };
                debug_assert_eq!(
                    record.coroutine.park_state().get(),
                    ParkState::Parked,
                    "aiocoro: a ParkRecord was unparked twice or its coroutine was not parked"
                );
                record.coroutine.park_state().set(ParkState::Woken);
                local.run_queue.borrow_mut().push_back(RunItem::Unpark(record.coroutine));
            })
        };
        match record {
            None => true,
            Some(orphan) => {
                orphan.leak();
                false
            }
        }
    }

    /// Gives up on a park whose context is gone (see [`ParkRecord::unpark`]).
    #[cold]
    fn leak(self) {
        std::mem::forget(self.coroutine);
    }

    /// Ends the park and enters the coroutine at once, when the caller is not itself a
    /// coroutine (QEMU's `qemu_co_enter_next`); otherwise queues it as [`ParkRecord::unpark`] does.
    /// Must be called on the coroutine's thread. Returns false, as `unpark` does, if the
    /// park's context is gone.
    #[must_use = "a false return means nothing was woken: wake another waiter instead"]
    #[inline]
    pub(crate) fn unpark_and_enter(self) -> bool {
        if in_coroutine() {
            return self.unpark();
        }
        // SAFETY: the closure only updates the park state and the count; it drops nothing.
        let home = unsafe {
            with_current_brief(|local| {
                let home = local.shared.id == self.context;
                if home {
                    let park = self.coroutine.park_state();
                    debug_assert_eq!(
                        park.get(),
                        ParkState::Parked,
                        "aiocoro: a ParkRecord was unparked twice or its coroutine was not \
                         parked"
                    );
                    park.set(ParkState::Idle);
                    local.parked.set(local.parked.get() - 1);
                }
                home
            })
        };
        // Entered after the last use of the context: the coroutine may drop its last handle.
        if home == Some(true) {
            Dispatch::begin().enter(&self.coroutine);
            return true;
        }
        // A park in a context that is gone can never run (see `unpark`).
        self.leak();
        false
    }
}

/// Wakes one suspension of a coroutine, from any thread (QEMU's `aio_co_wake`).
///
/// From the coroutine's home thread, a wake only queues the coroutine: no eventfd, no lock, no
/// allocation. From another thread it is one push onto the context's inbox, plus an eventfd
/// write if the context may be blocked. Either way the coroutine runs on its home context,
/// after the current coroutine yields or the current callback returns, in wake order. Waking a
/// suspension that is over, or waking it twice, does nothing.
#[derive(Clone)]
pub struct Waker {
    target: WakerTarget,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum WakerTarget {
    Context {
        shared: Arc<Shared>,
        key: Key,
    },
    #[cfg(aiocoro_loom)]
    Model(Arc<super::wait_model::ModelParker>),
}

impl Waker {
    /// Wakes the suspension this waker was made for.
    pub fn wake(&self) {
        match &self.target {
            // SAFETY: `deliver` runs no user code and drops nothing.
            WakerTarget::Context { shared, key } => match unsafe { home_local(shared) } {
                Some(local) => local.deliver(*key, WakeReason::Woken),
                // Refused only by a context that has shut down: no poll is left there to resume
                // the coroutine in.
                None => drop(shared.send(Message::Wake(*key, WakeReason::Woken))),
            },
            #[cfg(aiocoro_loom)]
            WakerTarget::Model(parker) => parker.unpark(),
        }
    }
}

/// A waker for the queues of locks, which wake each of their records exactly once while its
/// suspension waits. Unlike [`Waker`] it holds no reference count (two atomic operations
/// saved per wait), so it is valid only under that rule.
///
/// Invariant: `shared` (of `Context`) is the `Shared` of the context of a suspension that is
/// waiting. A waiting suspension keeps its context alive (its [`Wait`] holds the `Local`, which holds the
/// `Shared`), so the pointer is valid for as long as the rule of [`WaitRef::wake`] holds.
pub(crate) enum WaitRef {
    Context {
        shared: NonNull<Shared>,
        key: Key,
    },
    #[cfg(aiocoro_loom)]
    Model(Arc<super::wait_model::ModelParker>),
}

// SAFETY: a `WaitRef` is a key plus a pointer to the `Sync` part of a context, which it only
// reads through `&Shared` methods meant for any thread.
unsafe impl Send for WaitRef {}
// SAFETY: as above.
unsafe impl Sync for WaitRef {}

impl WaitRef {
    /// Wakes the suspension this record names.
    ///
    /// # Safety
    ///
    /// The suspension has not been woken yet by this or any other record (it still waits), so
    /// its context is alive; each record is woken at most once.
    #[inline]
    pub(crate) unsafe fn wake(self) {
        // SAFETY: the caller's contract.
        unsafe { self.deliver(false) };
    }

    /// Like [`WaitRef::wake`], for a waker that holds the lock the woken coroutine will want
    /// next (a `CoQueue` wake): called inside a coroutine that a context dispatched, the signal
    /// of a context of another thread is written only when that coroutine yields or ends (see
    /// `aio::deferred`), so the woken thread does not preempt the lock holder only to find the
    /// lock held.
    ///
    /// # Safety
    ///
    /// As [`WaitRef::wake`].
    #[inline]
    pub(crate) unsafe fn wake_under_lock(self) {
        // SAFETY: the caller's contract.
        unsafe { self.deliver(super::deferred::may_defer()) };
    }

    /// `wake`, with the signal of another thread's context deferred if `defer_signal`.
    ///
    /// # Safety
    ///
    /// As [`WaitRef::wake`].
    unsafe fn deliver(self, defer_signal: bool) {
        let (pointer, key) = match self {
            WaitRef::Context { shared, key } => (shared, key),
            #[cfg(aiocoro_loom)]
            WaitRef::Model(parker) => return parker.unpark(),
        };
        // SAFETY: the suspension still waits, so its context and `Shared` are alive (type
        // invariant and the caller's contract).
        let shared = unsafe { pointer.as_ref() };
        // SAFETY: `deliver` runs no user code and drops nothing.
        match unsafe { home_local(shared) } {
            Some(local) => local.deliver(key, WakeReason::Woken),
            None => {
                // Once the message is in, the coroutine may run, finish and drop its context
                // at any time: hold a reference of our own until we are done with `shared`.
                // SAFETY: `shared` came from `Arc::as_ptr` of an `Arc` that is alive right now
                // (see above).
                let shared = unsafe {
                    Arc::increment_strong_count(pointer.as_ptr());
                    Arc::from_raw(pointer.as_ptr())
                };
                if defer_signal {
                    shared.send_wake_deferred(key, WakeReason::Woken);
                } else {
                    drop(shared.send(Message::Wake(key, WakeReason::Woken)));
                }
            }
        }
    }
}

impl WaitRef {
    /// Whether the suspension's context has shut down: its coroutine never runs again (the
    /// shutdown leaked it), so a wake would be lost with it.
    ///
    /// # Safety
    ///
    /// As [`WaitRef::wake`]: the suspension still waits (a leaked one waits for good), so its
    /// context is alive.
    pub(crate) unsafe fn is_leaked(&self) -> bool {
        match self {
            // SAFETY: the context is alive (the caller's contract and the type invariant).
            WaitRef::Context { shared, .. } => unsafe { shared.as_ref() }.is_down(),
            #[cfg(aiocoro_loom)]
            WaitRef::Model(_) => false,
        }
    }

    /// Whether this record was made for `wait` (by [`Wait::wait_ref`]).
    pub(crate) fn is_for(&self, wait: &Wait<'_>) -> bool {
        self.names(wait.id())
    }

    /// Whether this record was made for the suspension `id` names.
    pub(crate) fn names(&self, id: WaitId) -> bool {
        match (self, id) {
            (WaitRef::Context { shared, key }, WaitId::Context { shared: own, key: own_key }) => {
                *key == own_key && ptr::eq(shared.as_ptr().cast_const(), own)
            }
            #[cfg(aiocoro_loom)]
            (WaitRef::Model(parker), WaitId::Model(own)) => ptr::eq(Arc::as_ptr(parker), own),
            #[cfg(aiocoro_loom)]
            _ => false,
        }
    }

    /// Turns the record into a wake that stays valid after the caller gives up what keeps the
    /// suspension waiting (the lock of the queue it was popped from): a waiter that leaves the
    /// queue on its own (cancelled by its context's shutdown) takes that lock first, finds its
    /// record gone and ends, and its context may then go; the [`PendingWake`] holds the
    /// context's shared half (or, on its home thread, its home half) alive until it is woken.
    ///
    /// # Safety
    ///
    /// As [`WaitRef::wake`]: the suspension still waits, so its context is alive.
    pub(crate) unsafe fn claim(self) -> PendingWake {
        let (pointer, key) = match self {
            WaitRef::Context { shared, key } => (shared, key),
            #[cfg(aiocoro_loom)]
            WaitRef::Model(parker) => return PendingWake::Model(parker),
        };
        // SAFETY: the suspension still waits, so its context and `Shared` are alive (type
        // invariant and the caller's contract).
        let shared = unsafe { pointer.as_ref() };
        if let Some(local) = home_rc(shared) {
            return PendingWake::Home { local, key };
        }
        // SAFETY: `shared` came from `Arc::as_ptr` of an `Arc` that is alive right now (see
        // above); the count taken here is the `PendingWake`'s own.
        let shared = unsafe {
            Arc::increment_strong_count(pointer.as_ptr());
            Arc::from_raw(pointer.as_ptr())
        };
        PendingWake::Remote { shared, key }
    }
}

/// A wake claimed from a lock queue with [`WaitRef::claim`]: it keeps the woken suspension's
/// context alive, so it may be woken after the queue's lock is released.
pub(crate) enum PendingWake {
    /// A suspension of this thread's context.
    Home { local: Rc<Local>, key: Key },
    /// A suspension of another thread's context.
    Remote { shared: Arc<Shared>, key: Key },
    #[cfg(aiocoro_loom)]
    Model(Arc<super::wait_model::ModelParker>),
}

impl PendingWake {
    /// Wakes the suspension (as [`Waker::wake`]). If it stopped waiting meanwhile, nothing
    /// happens.
    pub(crate) fn wake(self) {
        match self {
            PendingWake::Home { local, key } => local.deliver(key, WakeReason::Woken),
            // Refused only by a context that has shut down: nothing is left there to wake.
            PendingWake::Remote { shared, key } => {
                drop(shared.send(Message::Wake(key, WakeReason::Woken)));
            }
            #[cfg(aiocoro_loom)]
            PendingWake::Model(parker) => parker.unpark(),
        }
    }

    /// Like [`PendingWake::wake`], but a coroutine of this thread's context is entered at once
    /// when the caller is not itself a coroutine (QEMU's `qemu_co_enter_next`); otherwise it
    /// is queued as by `wake`.
    pub(crate) fn wake_and_enter(self) {
        match self {
            PendingWake::Home { local, key } if !in_coroutine() => {
                let coroutine = local.deliver_for_enter(key, WakeReason::Woken);
                // The coroutine may drop the context's last handle: ours goes first.
                drop(local);
                if let Some(coroutine) = coroutine {
                    Dispatch::begin().enter(&coroutine);
                }
            }
            other => other.wake(),
        }
    }
}

/// A [`Waker`] that stays on the coroutine's thread.
#[derive(Clone)]
pub struct LocalWaker {
    context: u64,
    key: Key,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for LocalWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWaker").field("context", &self.context).finish_non_exhaustive()
    }
}

impl LocalWaker {
    /// Wakes the suspension this waker was made for.
    pub fn wake(&self) {
        self.wake_with(WakeReason::Woken);
    }

    pub(crate) fn wake_with(&self, reason: WakeReason) {
        deliver_here(self.context, self.key, reason);
    }

    /// Wakes it through `local`, which the caller knows to be this thread's context.
    pub(crate) fn wake_in(&self, local: &Local) {
        if local.shared.id == self.context {
            local.deliver(self.key, WakeReason::Woken);
        }
    }
}
