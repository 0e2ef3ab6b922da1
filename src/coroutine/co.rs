//! The `&Co` token: proof that the code holding it runs inside a coroutine and may yield.
//!
//! `Co`'s methods live beside what they wait for, so that each subsystem keeps its state
//! private; this file defines the core ones. The whole coroutine-side surface:
//!
//! | Method | Waits for | Defined in |
//! |---|---|---|
//! | [`Co::yield_now`], [`Co::current`] | the enterer (plain coroutine switch) | `coroutine/co.rs` |
//! | [`Co::reschedule`], [`Co::prepare_wait`], [`Co::sleep`] | the context's run queue, a wake, a timer | `aio/wait.rs` |
//! | [`Co::sleep_wakeable`] | a timer or a [`Sleeper`](crate::aio::Sleeper) | `aio/sleep.rs` |
//! | [`Co::wait_readable`], [`Co::wait_writable`] | a file descriptor | `aio/fd.rs` |
//! | [`Co::run_blocking`] | a job on the thread pool | `aio/thread_pool.rs` |
//! | [`Co::block_on`] | any `Future` | `aio/future.rs` |
//! | [`Co::run_uncancellable`] | nothing: a section the context's shutdown waits for | `aio/uncancellable.rs` |
//! | [`Co::join`] | another coroutine's end | `aio/join.rs` |
//!
//! Locks take the `&Co` as an argument instead ([`CoMutex::lock`](crate::sync::CoMutex),
//! [`CoQueue::wait`](crate::sync::CoQueue::wait), ...).

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::Coroutine;
use super::slot::{PanicSeen, ParkState, RawYielder, Slot, State};

/// The token a coroutine body receives: QEMU's `coroutine_fn` annotation as a type.
///
/// Code that may yield takes `&Co`. Only the runtime makes a `Co`, on the coroutine's own stack,
/// and lends it to the body, so:
///
/// * calling a yielding function outside a coroutine does not compile (there is no `Co` to pass);
/// * a `&Co` cannot outlive the body that received it;
/// * a `Co` cannot move to another thread (it is neither `Send` nor `Sync`);
/// * a nested coroutine cannot capture its enterer's `Co`, because a body must be `'static`.
///
/// ```compile_fail,E0277
/// // Outside a coroutine there is no `Co` (nothing outside the runtime can make one), so
/// // yielding code cannot be called there.
/// fn flush(co: &aiocoro::coroutine::Co) { co.yield_now() }
/// let token: aiocoro::coroutine::Co = Default::default();
/// flush(&token);
/// ```
///
/// ```compile_fail,E0521
/// // A `&Co` cannot escape its coroutine, not even into a thread-local.
/// use aiocoro::coroutine::{Co, Coroutine};
/// use std::cell::Cell;
/// thread_local! { static ESCAPED: Cell<Option<&'static Co>> = Cell::new(None); }
/// Coroutine::new(|co| ESCAPED.with(|escaped| escaped.set(Some(co))));
/// ```
///
/// ```compile_fail,E0277
/// // A `Co` cannot be shared with another thread.
/// use aiocoro::coroutine::Coroutine;
/// Coroutine::new(|co| {
///     std::thread::scope(|s| {
///         s.spawn(|| co.yield_now());
///     });
/// });
/// ```
///
/// ```compile_fail,E0521
/// // An inner coroutine cannot yield its enterer.
/// use aiocoro::coroutine::Coroutine;
/// Coroutine::new(|outer| {
///     Coroutine::new(|_inner| outer.yield_now()).enter();
/// });
/// ```
pub struct Co {
    /// Invariant: points to corosensei's yielder on this coroutine's stack, valid while the
    /// body runs, which outlives every `&Co`.
    yielder: NonNull<RawYielder>,
    /// Invariant: this coroutine's slot; the enterer's handle keeps it alive while the body runs.
    slot: NonNull<Slot>,
    /// `Co` stays on its thread and inside its body.
    _not_send: PhantomData<*mut ()>,
    /// A loom model's token (see [`Co::model`]): the pointers above are dangling and must not
    /// be used; waits park the model thread instead.
    #[cfg(aiocoro_loom)]
    model: bool,
    /// A loom model's token whose waits are cancelled (see [`Co::model_cancelled`]).
    #[cfg(aiocoro_loom)]
    model_cancelled: bool,
    /// A loom model's token that leaks a wait (see [`Co::model_leaked`]): how many of its
    /// waits suspend normally first.
    #[cfg(aiocoro_loom)]
    model_leaked: Option<Cell<u32>>,
}

impl std::fmt::Debug for Co {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Co").finish_non_exhaustive()
    }
}

impl Co {
    pub(crate) fn new(yielder: &RawYielder, slot: NonNull<Slot>) -> Co {
        Co {
            yielder: NonNull::from(yielder),
            slot,
            _not_send: PhantomData,
            #[cfg(aiocoro_loom)]
            model: false,
            #[cfg(aiocoro_loom)]
            model_cancelled: false,
            #[cfg(aiocoro_loom)]
            model_leaked: None,
        }
    }

    /// A token for a loom model thread standing in for a coroutine (loom builds only): lock
    /// code that waits through it parks the thread. It cannot yield or name a coroutine.
    #[cfg(aiocoro_loom)]
    #[doc(hidden)]
    pub fn model() -> Co {
        Co {
            yielder: NonNull::dangling(),
            slot: NonNull::dangling(),
            _not_send: PhantomData,
            model: true,
            model_cancelled: false,
            model_leaked: None,
        }
    }

    /// Like [`Co::model`], but every wait of the token is cancelled as its context's shutdown
    /// would cancel it, right when it would suspend (loom builds only): lock code then undoes
    /// its queueing and unwinds with the cancellation payload, racing the other model threads.
    #[cfg(aiocoro_loom)]
    #[doc(hidden)]
    pub fn model_cancelled() -> Co {
        Co { model_cancelled: true, ..Co::model() }
    }

    /// Whether this is a loom model's token whose waits are cancelled.
    #[cfg(aiocoro_loom)]
    pub(crate) fn is_model_cancelled(&self) -> bool {
        self.model_cancelled
    }

    /// Like [`Co::model`], but once `waits_before` of its waits have suspended normally, the
    /// next one is leaked as a shutdown that cannot finish it leaks it, right when it would
    /// suspend (loom builds only): the lock that queued it abandons it (see
    /// `aio::wait::Abandon`), racing the other model threads, and the model thread then unwinds
    /// out of the lock call with a private payload, standing in for a coroutine that never
    /// runs again (a real one is never unwound).
    #[cfg(aiocoro_loom)]
    #[doc(hidden)]
    pub fn model_leaked(waits_before: u32) -> Co {
        Co { model_leaked: Some(Cell::new(waits_before)), ..Co::model() }
    }

    /// Whether the wait of this loom model's token that is about to suspend is leaked (each
    /// call is one suspension).
    #[cfg(aiocoro_loom)]
    pub(crate) fn model_leaks_now(&self) -> bool {
        let Some(left) = &self.model_leaked else { return false };
        let leaks = left.get() == 0;
        left.set(left.get().saturating_sub(1));
        leaks
    }

    /// Whether this is a loom model's token.
    #[cfg(aiocoro_loom)]
    pub(crate) fn is_model(&self) -> bool {
        self.model
    }

    #[cfg(aiocoro_loom)]
    fn assert_not_model(&self) {
        assert!(!self.model, "aiocoro: a loom model's Co cannot yield or name a coroutine");
    }

    /// Suspends this coroutine and returns to whoever entered it (QEMU's
    /// `qemu_coroutine_yield`). Returns when it is entered again.
    ///
    /// ```
    /// use aiocoro::coroutine::Coroutine;
    /// use std::{cell::Cell, rc::Rc};
    ///
    /// let steps = Rc::new(Cell::new(0));
    /// let seen = steps.clone();
    /// let co = Coroutine::new(move |co| {
    ///     seen.set(1);
    ///     co.yield_now();
    ///     seen.set(2);
    /// });
    /// co.enter();
    /// assert_eq!(steps.get(), 1);
    /// co.enter();
    /// assert_eq!(steps.get(), 2);
    /// assert!(co.is_ended());
    /// ```
    ///
    /// # Panics
    ///
    /// If the coroutine's last handle was dropped while it was suspended and its stack is being
    /// unwound: a destructor that runs then may not yield (the process aborts, as for any panic
    /// during unwinding, after printing the message).
    #[inline]
    pub fn yield_now(&self) {
        #[cfg(aiocoro_loom)]
        self.assert_not_model();
        self.assert_may_yield(0);
        // SAFETY: the yielder lives on this coroutine's stack for as long as the body runs
        // (field invariant), and this code runs inside the body.
        unsafe { self.yielder.as_ref() }.suspend(());
    }

    /// Panics, as [`Co::yield_now`] would, if this coroutine may not yield once it has released
    /// `releasing` thread-lock guards. For code that must not fail after it has given out a
    /// record of the coroutine's suspension: both conditions (its stack is not being unwound;
    /// in debug builds, it holds no more thread-lock guards than when it was entered) stay as
    /// they are until it yields, unless it takes a thread lock meanwhile. A loom model's token
    /// passes (its waits park a thread, they do not yield).
    #[inline]
    pub(crate) fn assert_may_yield(&self, releasing: usize) {
        #[cfg(aiocoro_loom)]
        if self.model {
            return;
        }
        // SAFETY: the slot outlives every `&Co` (field invariant).
        let slot = unsafe { self.slot.as_ref() };
        if slot.state.get() == State::Unwinding {
            yield_while_unwinding(slot);
        }
        if cfg!(debug_assertions) {
            let held = crate::sync::yield_check::held().saturating_sub(releasing);
            if held > slot.locks_at_entry.get() {
                yield_holding_thread_lock(slot, held - slot.locks_at_entry.get());
            }
        }
    }

    /// This coroutine's park state (see `aio::wait::ParkRecord`).
    #[inline]
    pub(crate) fn park_state(&self) -> &Cell<ParkState> {
        #[cfg(aiocoro_loom)]
        self.assert_not_model();
        // SAFETY: the slot outlives every `&Co` (field invariant).
        &unsafe { self.slot.as_ref() }.park
    }

    /// A handle to this coroutine (QEMU's `qemu_coroutine_self`).
    #[inline]
    pub fn current(&self) -> Coroutine {
        #[cfg(aiocoro_loom)]
        self.assert_not_model();
        // SAFETY: the slot is alive while the body runs (field invariant).
        unsafe { Coroutine::from_slot(self.slot) }
    }
}

/// The panic payload that unwinds a coroutine its context cancelled (see
/// [`AioContext`](crate::aio::AioContext)'s shutdown): the context catches it, no panic hook
/// runs for it, and nobody else should catch it for good.
pub(crate) struct Cancelled;

impl Co {
    /// Runs `f` with this coroutine's waits shielded from cancellation: a wait that starts
    /// inside `f` ends only by being woken, even once the context shuts down. For waits that
    /// restore an invariant the unwinding of a cancellation relies on (a lock that a caller's
    /// guard must hold again), and for [`Co::run_uncancellable`].
    pub(crate) fn shielded<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Lifts the shield, also when `f` unwinds.
        struct Lift<'a>(&'a Cell<u32>);
        impl Drop for Lift<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        #[cfg(aiocoro_loom)]
        if self.model {
            return f();
        }
        // SAFETY: the slot outlives every `&Co` (field invariant).
        let shield = &unsafe { self.slot.as_ref() }.shield;
        shield.set(shield.get() + 1);
        let _lift = Lift(shield);
        f()
    }

    /// Whether this coroutine runs inside [`Co::shielded`] (a section of
    /// [`Co::run_uncancellable`], say).
    #[inline]
    pub(crate) fn is_shielded(&self) -> bool {
        // SAFETY: the slot outlives every `&Co` (field invariant).
        unsafe { self.slot.as_ref() }.shield.get() != 0
    }

    /// Whether a wait that starts now may be cancelled by the context's shutdown: not inside
    /// [`Co::shielded`], and not while a panic unwinds this coroutine, its cancellation or any
    /// other (a destructor that waits then gets what it waits for: a cancellation would unwind
    /// from the middle of the unwinding, which aborts the process).
    ///
    /// `std::thread::panicking` is the thread's: it also counts the panics of the thread that
    /// entered this coroutine and of other coroutines suspended in their destructors. A panic
    /// in flight is this coroutine's own if none was when it was last entered, and stays known
    /// as its own across the entries that resume its unwinding ([`PanicSeen::Own`]); a panic
    /// that was in flight at an entry is not known to be its own, unless it is its
    /// cancellation (a panic of its own that starts after another coroutine's and before its
    /// next wait leaves its destructors' waits cancellable).
    #[inline]
    pub(crate) fn may_be_cancelled(&self) -> bool {
        #[cfg(aiocoro_loom)]
        if self.model {
            return false;
        }
        // SAFETY: the slot outlives every `&Co` (field invariant).
        let slot = unsafe { self.slot.as_ref() };
        if self.is_shielded() {
            return false;
        }
        if !std::thread::panicking() {
            // Nothing in flight: one that starts before its next entry is its own.
            if slot.panic_seen.get() != PanicSeen::Nothing {
                slot.panic_seen.set(PanicSeen::Nothing);
            }
            return true;
        }
        match slot.panic_seen.get() {
            PanicSeen::Outside => !slot.cancelled.get(),
            PanicSeen::Nothing | PanicSeen::Own => {
                // Its own: its next entries resume this unwinding with the panic in flight.
                slot.panic_seen.set(PanicSeen::Own);
                false
            }
        }
    }

    /// Unwinds this coroutine because its context cancelled the wait it was in; the caller has
    /// already undone what that wait had set up (queue records, released locks).
    #[cold]
    #[inline(never)]
    pub(crate) fn unwind_cancelled(&self) -> ! {
        #[cfg(aiocoro_loom)]
        if self.model {
            std::panic::resume_unwind(Box::new(Cancelled));
        }
        // SAFETY: the slot outlives every `&Co` (field invariant).
        unsafe { self.slot.as_ref() }.cancelled.set(true);
        std::panic::resume_unwind(Box::new(Cancelled))
    }
}

#[cold]
#[inline(never)]
fn yield_holding_thread_lock(slot: &Slot, guards: usize) -> ! {
    panic!(
        "aiocoro: {} yielded while holding {guards} guard(s) of a thread-blocking lock \
         (ThreadMutex or SpinLock); that can deadlock its whole context: release the guard \
         before yielding, or use a CoMutex",
        slot.describe()
    )
}

#[cold]
#[inline(never)]
fn yield_while_unwinding(slot: &Slot) -> ! {
    panic!(
        "aiocoro: {} yielded while its stack was being unwound because its last handle was \
         dropped; a coroutine cannot be suspended after it has been dropped",
        slot.describe()
    )
}
