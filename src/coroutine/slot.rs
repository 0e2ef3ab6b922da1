//! The control block behind every coroutine handle, recycled through the pool with its stack.

use std::cell::{Cell, UnsafeCell};
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

use corosensei::Yielder;

use super::stack::{GuardedStack, StackBounds};
use super::{current, pool};

/// The corosensei coroutine under an aiocoro coroutine: no values pass in or out, the body
/// returns nothing, it runs on the stack of its slot.
pub(crate) type RawCoroutine = corosensei::Coroutine<(), (), (), StackBounds>;

/// The suspension handle corosensei gives the body.
pub(crate) type RawYielder = Yielder<(), ()>;

/// Where a coroutine is in its life.
///
/// The innermost running coroutine is not marked: it stays `Ready` and is told apart by being
/// its thread's current coroutine (see `current.rs`), which `enter` reads anyway. Only a
/// coroutine that enters another is marked, as `Entering`, until that one yields or ends. So
/// an `enter` from outside every coroutine (an event loop's) writes no state at all, and a yield
/// round trip costs two stores fewer: stores are what bound a switch's speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Created, suspended in a yield, or the current coroutine: `enter` may run it unless it
    /// is the current one.
    Ready,
    /// Waiting in `enter` for a coroutine it entered to yield or end: it runs, as an ancestor
    /// of the current coroutine.
    Entering,
    /// Its last handle was dropped while it was suspended, and its stack is being unwound.
    Unwinding,
    /// Returned or panicked, or (in the pool) not yet started.
    Ended,
}

/// Where a coroutine is in a park, the light suspension of same-thread hand-overs (see
/// `aio::wait::ParkRecord`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParkState {
    /// Not parked.
    Idle,
    /// Parked, waiting for its record to be unparked.
    Parked,
    /// Unparked: queued on the run queue, which resumes it (and only that ends the park).
    Woken,
}

/// One coroutine's control block, shared by its handles, and recycled with its stack.
///
/// Invariants (all access is from the thread that owns the slot, which the `!Send` handles
/// guarantee; a pooled slot is owned by one cache):
/// * `raw` is initialized exactly while `state` is `Ready`, `Entering` or `Unwinding` (so
///   `enter`, having seen `Ready`, needs no check of its own), and runs on `stack`, which the
///   slot owns for life; it is never dropped, only forgotten once its body has returned (see
///   [`Slot::finish`]);
/// * `raw` is borrowed mutably only by the one `enter` that made the coroutine current, until
///   it leaves again, by the drop that moved `state` from `Ready` to `Unwinding`, or by the owner
///   of an `Ended` slot with no handles. Two borrows never overlap: `enter` needs `Ready` and
///   not current, and no running coroutine is both (the current one is current, the others
///   are `Entering`, or `Unwinding` and being dropped);
/// * `refs` counts the live [`Coroutine`](super::Coroutine) handles; the slot goes back to the
///   pool when it reaches zero and the coroutine has ended;
/// * `bounds` describes `stack`.
pub(crate) struct Slot {
    pub(crate) raw: UnsafeCell<MaybeUninit<RawCoroutine>>,
    stack: GuardedStack,
    pub(crate) refs: Cell<usize>,
    pub(crate) state: Cell<State>,
    /// Creation number on this thread, for messages.
    pub(crate) id: Cell<u64>,
    /// Optional name given by the builder, for messages. Written only while no handle exists.
    pub(crate) name: UnsafeCell<Option<Box<str>>>,
    /// `stack.bounds()`, computed once.
    bounds: StackBounds,
    /// Thread-lock guards alive when the coroutine was last entered (debug builds check at
    /// each yield that the coroutine added none; see `sync::yield_check`).
    pub(crate) locks_at_entry: Cell<usize>,
    /// Where the coroutine is in a park; `Idle` whenever a body starts.
    pub(crate) park: Cell<ParkState>,
    /// How many [`Co::shielded`](super::Co::shielded) calls the coroutine is in: while above
    /// zero, its waits are not cancelled when its context shuts down.
    pub(crate) shield: Cell<u32>,
    /// Whether its context cancelled it (a wait of it unwound with `Cancelled`), for messages.
    pub(crate) cancelled: Cell<bool>,
    /// Whose panic is in flight while the coroutine runs, as far as it knows (see
    /// [`Co::may_be_cancelled`](super::Co::may_be_cancelled)).
    pub(crate) panic_seen: Cell<PanicSeen>,
}

/// What a coroutine knows of a panic in flight on its thread. `std::thread::panicking` counts
/// every panic of the thread: the coroutine's own, and also those of its enterer and of other
/// coroutines suspended in destructors that run during their panics.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum PanicSeen {
    /// None was in flight when the coroutine was last entered: one in flight now is its own.
    Nothing,
    /// One was in flight when it was last entered, not known to be its own.
    Outside,
    /// Its own is in flight: a wait during its unwinding found it. Kept across its entries
    /// (which see that panic in flight) until one finds no panic in flight.
    Own,
}

impl Slot {
    /// A pooled slot around `stack`.
    pub(crate) fn new(stack: GuardedStack) -> Box<Slot> {
        Box::new(Slot {
            raw: UnsafeCell::new(MaybeUninit::uninit()),
            refs: Cell::new(0),
            state: Cell::new(State::Ended),
            id: Cell::new(0),
            name: UnsafeCell::new(None),
            bounds: stack.bounds(),
            stack,
            locks_at_entry: Cell::new(0),
            park: Cell::new(ParkState::Idle),
            shield: Cell::new(0),
            cancelled: Cell::new(false),
            panic_seen: Cell::new(PanicSeen::Nothing),
        })
    }

    /// Notes, as the coroutine is entered, whether a panic is in flight that is not known to be
    /// its own (see [`PanicSeen`]).
    #[inline(always)]
    pub(crate) fn note_entry(&self) {
        let seen = if !std::thread::panicking() {
            PanicSeen::Nothing
        } else if self.panic_seen.get() == PanicSeen::Own {
            PanicSeen::Own
        } else {
            PanicSeen::Outside
        };
        // Written only when it changes: a store on every entry cost a yield round trip
        // ~0.35 ns (alternating runs); the two loads and the compare cost ~0.1 ns.
        if self.panic_seen.get() != seen {
            self.panic_seen.set(seen);
        }
    }

    /// Usable bytes of the slot's stack.
    #[inline]
    pub(crate) fn stack_size(&self) -> usize {
        self.stack.usable_size()
    }

    /// The guard page below the slot's stack. Async-signal-safe.
    pub(crate) fn guard_range(&self) -> std::ops::Range<usize> {
        self.stack.guard_range()
    }

    /// The name given at creation, if any.
    pub(crate) fn name(&self) -> Option<&str> {
        // SAFETY: `name` is written only by `acquire` and `release`, while no handle (and so no
        // `&Slot` user) exists; in between it is only read.
        unsafe { (*self.name.get()).as_deref() }
    }

    /// Ends the coroutine after its body returned or panicked; its stack stays in the slot until
    /// the slot returns to the pool with the last handle.
    ///
    /// Must be called by the owner of the `body` borrow (see the type invariants), after the
    /// borrow ended.
    pub(crate) fn finish(&self) {
        // `raw` is now uninitialized in all but name: the body has returned or panicked, so the
        // corosensei coroutine owns nothing any more (its stack belongs to the slot), and it is
        // forgotten rather than dropped, which would do nothing. `Ended` says so (invariant).
        self.state.set(State::Ended);
    }

    /// Whether this is the current coroutine of this thread. Async-signal-safe.
    #[inline]
    pub(crate) fn is_current(&self) -> bool {
        std::ptr::eq(current::slot(), self)
    }

    /// Whether the coroutine runs: it is the current coroutine, or one waiting for a coroutine
    /// it entered.
    pub(crate) fn is_running(&self) -> bool {
        match self.state.get() {
            State::Entering => true,
            State::Ready => self.is_current(),
            State::Unwinding | State::Ended => false,
        }
    }

    /// The coroutine, which is current, enters another: it waits in that `enter` as `Entering`
    /// until the other yields or ends. An `Unwinding` one stays so (that keeps `enter` away too).
    #[inline]
    pub(crate) fn enters_another(&self) {
        if self.state.get() == State::Ready {
            self.state.set(State::Entering);
        }
    }

    /// The coroutine it entered yielded or ended: this one is current again.
    #[inline]
    pub(crate) fn back_from_another(&self) {
        if self.state.get() == State::Entering {
            self.state.set(State::Ready);
        }
    }

    /// Describes the coroutine for panic messages: `coroutine #7 "name"`.
    pub(crate) fn describe(&self) -> Description<'_> {
        Description(self)
    }
}

/// Formats a slot as `coroutine #<id>` plus its name in quotes when it has one.
pub(crate) struct Description<'a>(&'a Slot);

impl fmt::Display for Description<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coroutine #{}", self.0.id.get())?;
        if let Some(name) = self.0.name() {
            write!(f, " {name:?}")?;
        }
        Ok(())
    }
}

/// Takes a slot from the pool and starts a coroutine in it; `refs` starts at 1.
#[inline]
pub(crate) fn acquire(
    stack_size: Option<usize>,
    name: Option<Box<str>>,
    make_raw: impl FnOnce(NonNull<Slot>, StackBounds) -> RawCoroutine,
) -> io::Result<NonNull<Slot>> {
    let slot = NonNull::from(Box::leak(pool::take(stack_size)?));
    // SAFETY: the slot was just taken from the pool, which owned it alone; no handle and no
    // coroutine refer to it, so this is the only reference.
    let fields = unsafe { slot.as_ref() };
    fields.refs.set(1);
    // A coroutine dropped while parked left its park state behind.
    fields.park.set(ParkState::Idle);
    fields.shield.set(0);
    fields.cancelled.set(false);
    // A coroutine that ended by its panic left `Own` behind (read first: a store here costs
    // every coroutine's creation).
    if fields.panic_seen.get() != PanicSeen::Nothing {
        fields.panic_seen.set(PanicSeen::Nothing);
    }
    // SAFETY: as above, nothing else references the slot yet; its `raw` is uninitialized (it
    // is pooled: `Ended`), so the stack is free for the new coroutine, and writing `raw` over
    // it drops nothing.
    unsafe {
        if name.is_some() {
            *fields.name.get() = name;
        }
        (*fields.raw.get()).write(make_raw(slot, fields.bounds));
    }
    fields.state.set(State::Ready);
    Ok(slot)
}

/// Returns a slot whose last handle is gone and whose coroutine has ended to the pool.
///
/// # Safety
///
/// `slot` came from [`acquire`] on this thread, its `refs` is zero, its coroutine has ended,
/// and no reference to it outlives this call.
#[inline]
pub(crate) unsafe fn release(slot: NonNull<Slot>) {
    // SAFETY: by the contract the block is unreferenced and was leaked from a `Box` in `acquire`.
    let slot = unsafe { Box::from_raw(slot.as_ptr()) };
    // SAFETY: we own the block now.
    let name = unsafe { &mut *slot.name.get() };
    if name.is_some() {
        *name = None;
    }
    pool::give(slot);
}

/// Runs the body `f` of a coroutine whose control block is `slot`; the start of every coroutine.
pub(crate) fn body<F: FnOnce(&super::Co) + 'static>(
    slot: NonNull<Slot>,
    f: F,
) -> impl FnOnce(&RawYielder, ()) + 'static {
    move |yielder, ()| {
        let co = super::Co::new(yielder, slot);
        f(&co);
    }
}
