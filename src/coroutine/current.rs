//! Which coroutine is running on this thread.

use std::cell::Cell;
use std::ptr::{self, NonNull};

use super::Coroutine;
use super::slot::Slot;

thread_local! {
    /// The innermost running coroutine of this thread, or null outside every coroutine.
    ///
    /// Invariant: a non-null pointer names a slot whose state is `Ready` (the current coroutine
    /// is the one running coroutine that `State` does not mark) or `Unwinding`; the `enter` (or
    /// drop) that set it keeps a handle alive and restores the previous value before it returns
    /// or unwinds.
    static CURRENT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
}

/// The current coroutine's slot, or null.
#[inline]
pub(crate) fn get() -> *const Slot {
    CURRENT.with(Cell::get)
}

/// Makes `slot` the current coroutine.
#[inline]
pub(crate) fn set(slot: *const Slot) {
    CURRENT.with(|current| current.set(slot));
}

/// The current coroutine's slot, or null. Async-signal-safe (a plain thread-local read).
#[inline]
pub(crate) fn slot() -> *const Slot {
    CURRENT.try_with(Cell::get).unwrap_or(ptr::null())
}

/// The id of the current coroutine (see [`Coroutine::id`]), or 0 outside every coroutine. For
/// debug checks.
#[cfg(debug_assertions)]
pub(crate) fn id() -> u64 {
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer names a live slot of this thread.
    unsafe { slot().as_ref() }.map_or(0, |slot| slot.id.get())
}

/// Whether the calling code runs inside a coroutine (QEMU's `qemu_in_coroutine`).
///
/// ```
/// use aiocoro::coroutine::{in_coroutine, Coroutine};
///
/// assert!(!in_coroutine());
/// Coroutine::new(|_co| assert!(in_coroutine())).enter();
/// ```
#[inline]
pub fn in_coroutine() -> bool {
    !slot().is_null()
}

/// A handle to the coroutine the calling code runs in, if any (QEMU's `qemu_coroutine_self`).
///
/// Code that holds a [`Co`](super::Co) gets the same from [`Co::current`](super::Co::current)
/// without the `Option`.
pub fn current() -> Option<Coroutine> {
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer names a live slot of this thread.
    NonNull::new(slot().cast_mut()).map(|slot| unsafe { Coroutine::from_slot(slot) })
}
