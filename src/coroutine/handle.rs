//! `Coroutine`, the handle that creates and enters a coroutine, and its `Builder`.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use corosensei::CoroutineResult;

use super::slot::{self, ParkState, RawCoroutine, Slot, State};
use super::{Co, current};

/// A stackful coroutine (QEMU's `Coroutine *`).
///
/// A handle is cheap to clone; all clones name the same coroutine. The coroutine runs only when
/// [`enter`](Coroutine::enter)ed, on the thread that created it, until it yields or ends. It never
/// moves to another thread, which is why the handle is neither `Send` nor `Sync`: a body may keep
/// `Rc`s, `RefCell` borrows and thread-local references across a yield.
///
/// When the body returns or panics, the coroutine has ended; its stack goes back to the pool
/// together with its control block when the last handle is dropped (a handle can still answer
/// [`is_ended`](Coroutine::is_ended) until then). Dropping the last handle of a suspended
/// coroutine unwinds its stack (running the destructors of its locals) and returns the stack to
/// the pool.
///
/// ```
/// use aiocoro::coroutine::Coroutine;
/// use std::{cell::RefCell, rc::Rc};
///
/// let log = Rc::new(RefCell::new(Vec::new()));
/// let inner_log = log.clone();
/// let co = Coroutine::new(move |co| {
///     inner_log.borrow_mut().push("first entry");
///     co.yield_now();
///     inner_log.borrow_mut().push("second entry");
/// });
/// co.enter();
/// log.borrow_mut().push("between");
/// co.enter();
/// assert_eq!(*log.borrow(), ["first entry", "between", "second entry"]);
/// assert!(co.is_ended());
/// ```
///
/// ```compile_fail,E0277
/// // A coroutine never migrates: its handle cannot be sent to another thread.
/// use aiocoro::coroutine::Coroutine;
/// let co = Coroutine::new(|_co| {});
/// std::thread::spawn(move || co.enter());
/// ```
pub struct Coroutine {
    /// Invariant: a slot from `slot::acquire` on this thread; this handle is counted in its
    /// `refs`, so the slot stays allocated while the handle lives.
    slot: NonNull<Slot>,
    _not_send: PhantomData<*mut ()>,
}

impl Coroutine {
    /// Creates a coroutine that will run `body` when first entered, on a stack from the pool.
    ///
    /// # Panics
    ///
    /// If no stack can be had (the process is out of memory or address space); use
    /// [`Builder::build`] to get that as an error.
    pub fn new<F>(body: F) -> Coroutine
    where
        F: FnOnce(&Co) + 'static,
    {
        match create(None, None, body) {
            Ok(coroutine) => coroutine,
            Err(error) => panic!("aiocoro: cannot get a stack for a new coroutine: {error}"),
        }
    }

    /// A builder for a coroutine with its own stack size or a name.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// Makes a new handle to `slot`.
    ///
    /// # Safety
    ///
    /// `slot` must be a live slot of this thread (its `refs` non-zero, or its coroutine running).
    pub(crate) unsafe fn from_slot(slot: NonNull<Slot>) -> Coroutine {
        // SAFETY: the caller guarantees the slot is alive.
        let fields = unsafe { slot.as_ref() };
        fields.refs.set(fields.refs.get() + 1);
        Coroutine { slot, _not_send: PhantomData }
    }

    #[inline]
    fn slot(&self) -> &Slot {
        // SAFETY: this handle keeps the slot alive (field invariant).
        unsafe { self.slot.as_ref() }
    }

    /// Runs the coroutine until it yields or ends, then returns (QEMU's `qemu_coroutine_enter`).
    ///
    /// Entering from inside another coroutine nests: when the entered one yields, control comes
    /// back here, in the enterer. If the body panics, the coroutine ends, its stack goes back to
    /// the pool, and the panic continues here with its original payload.
    ///
    /// # Panics
    ///
    /// If the coroutine is running (it is the caller itself, or one of the coroutines that
    /// entered the caller) or has ended. Both are bugs in the caller, as in QEMU, where they
    /// abort.
    #[inline(always)]
    pub fn enter(&self) {
        let slot = self.slot();
        let caller = current::get();
        if !caller.is_null() {
            // SAFETY: `caller` is the current coroutine.
            return unsafe { enter_nested(slot, caller) };
        }
        // One check for every misuse from outside every coroutine: an ended or unwinding
        // coroutine is not `Ready` (see `State`), and none is running.
        if slot.state.get() != State::Ready {
            enter_misuse(slot);
        }
        // SAFETY: no coroutine is current, and `self` keeps `slot` alive until `run` returns.
        unsafe { run(slot, ptr::null()) }
    }

    /// The coroutine's park state (see `aio::wait::ParkRecord`).
    #[inline]
    pub(crate) fn park_state(&self) -> &Cell<ParkState> {
        &self.slot().park
    }

    /// Whether the body has returned or panicked.
    #[inline]
    pub fn is_ended(&self) -> bool {
        self.slot().state.get() == State::Ended
    }

    /// Whether the coroutine is running: it is the current coroutine or one that entered it.
    pub fn is_running(&self) -> bool {
        self.slot().is_running()
    }

    /// The coroutine's number, unique among the coroutines created on its thread.
    pub fn id(&self) -> u64 {
        self.slot().id.get()
    }

    /// The name given by [`Builder::name`], if any.
    pub fn name(&self) -> Option<&str> {
        self.slot().name()
    }
}

#[cold]
#[inline(never)]
fn enter_misuse(slot: &Slot) -> ! {
    match slot.state.get() {
        // `Ready` and misused: it is the current coroutine.
        State::Ready | State::Entering => panic!(
            "aiocoro: {} was entered while it is running (it is the current coroutine or one \
             that entered it); a running coroutine must yield before it can be entered again",
            slot.describe()
        ),
        State::Ended if slot.cancelled.get() => panic!(
            "aiocoro: {} was entered after its AioContext cancelled it (the context shut down \
             while the coroutine was suspended, and unwound it); an ended coroutine cannot run \
             again",
            slot.describe()
        ),
        State::Ended => panic!(
            "aiocoro: {} was entered after it ended; an ended coroutine cannot run again",
            slot.describe()
        ),
        State::Unwinding => panic!(
            "aiocoro: {} was entered while its stack was being unwound because its last \
             handle was dropped",
            slot.describe()
        ),
    }
}

/// [`Coroutine::enter`] from inside a coroutine: the entered one nests in `caller`.
///
/// # Safety
///
/// `caller` is the current coroutine, and `slot` a live slot of this thread that stays alive
/// until this returns.
// Out of line: an event loop enters from outside every coroutine, and that path stays short.
#[inline(never)]
unsafe fn enter_nested(slot: &Slot, caller: *const Slot) {
    // A running coroutine is current or not `Ready` (see `State`), an ended or unwinding one
    // is not `Ready`.
    if slot.state.get() != State::Ready || ptr::eq(caller, slot) {
        enter_misuse(slot);
    }
    // SAFETY: as promised by the caller; `slot` is `Ready` and not current, so not running.
    unsafe { run(slot, caller) }
}

/// Runs `slot`'s coroutine until it yields or ends, in place of `caller`.
///
/// # Safety
///
/// `caller` is the current coroutine (null outside every coroutine); `slot` is a live slot of
/// this thread, `Ready` and not running, that stays alive until this returns.
#[inline(always)]
unsafe fn run(slot: &Slot, caller: *const Slot) {
    if cfg!(debug_assertions) {
        slot.locks_at_entry.set(crate::sync::yield_check::held());
    }
    slot.note_entry();
    // SAFETY: as promised by the caller.
    unsafe { make_current(slot, caller) };
    // Restores the current coroutine, and ends this one if its body panicked, also when
    // `resume` unwinds; the panic then continues with its original payload.
    let run = EnterScope { slot, caller };
    // SAFETY: the coroutine was `Ready` and not running, and it is now current: this is the
    // only borrow of `raw`, and `raw` is initialized (slot invariants).
    let raw = unsafe { (*slot.raw.get()).assume_init_mut() };
    match raw.resume(()) {
        CoroutineResult::Yield(()) => run.suspended(),
        CoroutineResult::Return(()) => drop(run),
    }
}

/// Makes `slot` the current coroutine in place of `caller`, which, if it is a coroutine, now
/// waits for `slot` as `Entering`.
///
/// # Safety
///
/// `caller` is the current coroutine (what `current::get` returns), and `slot` a live slot of
/// this thread that stays alive until [`restore_current`] undoes this.
#[inline]
unsafe fn make_current(slot: &Slot, caller: *const Slot) {
    // SAFETY: by the invariant on `CURRENT`, a non-null current slot is alive.
    if let Some(caller) = unsafe { caller.as_ref() } {
        caller.enters_another();
    }
    current::set(slot);
}

/// One run of a coroutine, from `enter` until it yields (`suspended`), ends, or unwinds.
struct EnterScope<'a> {
    slot: &'a Slot,
    caller: *const Slot,
}

impl EnterScope<'_> {
    #[inline]
    fn suspended(self) {
        // SAFETY: `enter` made the slot current in place of `caller`, which is alive: it is
        // the coroutine (if any) waiting in that very `enter`.
        unsafe { restore_current(self.caller) };
        std::mem::forget(self);
    }
}

impl Drop for EnterScope<'_> {
    /// The body returned or panicked: the coroutine has ended.
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as in `suspended`.
        unsafe { restore_current(self.caller) };
        self.slot.finish();
    }
}

/// Undoes [`make_current`]: control leaves a coroutine for `caller`, which is current again.
///
/// # Safety
///
/// `caller` is what `make_current` replaced, and is alive.
#[inline]
unsafe fn restore_current(caller: *const Slot) {
    current::set(caller);
    // SAFETY: the caller guarantees a non-null `caller` is alive.
    if let Some(caller) = unsafe { caller.as_ref() } {
        caller.back_from_another();
    }
}

impl Clone for Coroutine {
    #[inline]
    fn clone(&self) -> Coroutine {
        // SAFETY: this handle keeps the slot alive.
        unsafe { Coroutine::from_slot(self.slot) }
    }
}

impl Drop for Coroutine {
    #[inline]
    fn drop(&mut self) {
        let slot = self.slot();
        let refs = slot.refs.get() - 1;
        slot.refs.set(refs);
        if refs == 0 {
            // SAFETY: this was the last handle of a live slot of this thread.
            unsafe { drop_last_handle(self.slot) };
        }
    }
}

/// Disposes of a coroutine whose last handle is gone.
///
/// # Safety
///
/// `slot` is a live slot of this thread whose `refs` just reached zero.
// Out of line, so that dropping a handle that is not the last (the run queue's, a park
// record's) is a decrement and a test wherever it is inlined.
#[cold]
#[inline(never)]
unsafe fn drop_last_handle(slot_ptr: NonNull<Slot>) {
    // SAFETY: the slot is alive until `release` below.
    let slot = unsafe { slot_ptr.as_ref() };
    match slot.state.get() {
        State::Ended => {}
        State::Ready if !slot.is_current() => unwind_suspended(slot_ptr),
        State::Ready | State::Entering | State::Unwinding => {
            unreachable!("aiocoro: the handle that entered a coroutine outlives its run")
        }
    }
    if slot.refs.get() == 0 {
        // SAFETY: no handle is left, the coroutine has ended (so `raw` owns nothing), and
        // `slot` is not used after this point.
        unsafe { slot::release(slot_ptr) };
    }
}

/// Unwinds the stack of a coroutine that was dropped while suspended (or never started), then
/// ends it. A destructor on that stack may make a new handle (through its `Co`); the slot then
/// stays alive until that handle is dropped too.
#[cold]
fn unwind_suspended(slot_ptr: NonNull<Slot>) {
    // SAFETY: the caller holds the slot alive for the duration of this call.
    let slot = unsafe { slot_ptr.as_ref() };
    // The unwinding counts as a handle, so that a handle made and dropped by a destructor on
    // the unwinding stack does not dispose of the slot under our feet.
    slot.refs.set(slot.refs.get() + 1);
    slot.state.set(State::Unwinding);
    let caller = current::get();
    // SAFETY: `caller` is the current coroutine, and the count above keeps `slot` alive until
    // `restore_current` below.
    unsafe { make_current(slot, caller) };
    // SAFETY: the state moved from `Ready` (and not current: see `drop_last_handle`) to
    // `Unwinding` here, so this is the only borrow of `raw`, and `raw` is initialized (slot
    // invariants).
    let raw = unsafe { (*slot.raw.get()).assume_init_mut() };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| raw.force_unwind()));
    // SAFETY: undoes `make_current` above; the caller waited here, so it is alive.
    unsafe { restore_current(caller) };
    slot.finish();
    slot.refs.set(slot.refs.get() - 1);
    if let Err(payload) = outcome {
        panic::resume_unwind(payload);
    }
}

impl PartialEq for Coroutine {
    /// Two handles are equal when they name the same coroutine.
    fn eq(&self, other: &Coroutine) -> bool {
        self.slot == other.slot
    }
}

impl Eq for Coroutine {}

impl fmt::Debug for Coroutine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.slot();
        let state = match slot.state.get() {
            State::Ready if slot.is_current() => "Running",
            State::Ready => "Ready",
            State::Entering => "Running",
            State::Unwinding => "Unwinding",
            State::Ended => "Ended",
        };
        f.debug_struct("Coroutine")
            .field("id", &slot.id.get())
            .field("name", &slot.name())
            .field("state", &format_args!("{state}"))
            .finish()
    }
}

/// Sets up a coroutine with its own stack size or a name (for panic and overflow messages).
///
/// ```
/// use aiocoro::coroutine::Coroutine;
///
/// let co = Coroutine::builder()
///     .name("flusher")
///     .stack_size(64 * 1024)
///     .build(|_co| {})?;
/// assert_eq!(co.name(), Some("flusher"));
/// co.enter();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Builder {
    stack_size: Option<usize>,
    name: Option<Box<str>>,
}

impl Builder {
    /// A builder with the pool's stack size and no name.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Gives the coroutine a stack of at least `bytes` usable bytes. A size other than the
    /// pool's ([`PoolConfig::stack_size`](crate::coroutine::pool::PoolConfig::stack_size)) gets a stack of its own, taken now and
    /// given back when the coroutine ends.
    pub fn stack_size(mut self, bytes: usize) -> Builder {
        self.stack_size = Some(bytes);
        self
    }

    /// Names the coroutine in panic and stack-overflow messages.
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into().into_boxed_str());
        self
    }

    /// Creates the coroutine; it runs `body` when first entered.
    ///
    /// # Errors
    ///
    /// If a stack is needed and cannot be had, or the stack size is absurd.
    #[inline]
    pub fn build<F>(self, body: F) -> io::Result<Coroutine>
    where
        F: FnOnce(&Co) + 'static,
    {
        create(self.stack_size, self.name, body)
    }
}

/// Creates a coroutine on a stack of `stack_size` (`None`: a pooled one) named `name`.
// Out of line on purpose: inlined into a caller's loop, the creation code crowds the
// context-switch sites that follow it, and `cost` (create, enter, yield, enter) measured ~30%
// slower on the reference machine. For a body type that only `Coroutine::new` creates, the
// compiler propagates its constant arguments, and that copy has no branches for a size or a
// name.
#[inline(never)]
fn create<F>(stack_size: Option<usize>, name: Option<Box<str>>, body: F) -> io::Result<Coroutine>
where
    F: FnOnce(&Co) + 'static,
{
    let slot = slot::acquire(stack_size, name, |slot, stack| {
        RawCoroutine::with_stack(stack, slot::body(slot, body))
    })?;
    Ok(Coroutine { slot, _not_send: PhantomData })
}
