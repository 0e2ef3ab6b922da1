//! A coroutine stack: a slot of one of the process's stack reservations, with a guard below it.

use std::io;
use std::ops::Range;
use std::ptr::NonNull;

use corosensei::stack::valgrind::ValgrindStackRegistration;
use corosensei::stack::{Stack, StackPointer};

use super::guard::Guards;
use super::reservation::StackSpace;
use crate::sys;

/// The smallest usable stack size a caller may ask for, in bytes.
pub const MIN_STACK_SIZE: usize = 16 * 1024;

/// The usable stack size of a coroutine unless the pool or the builder says otherwise: 1 MiB, as
/// in QEMU. Only the pages a coroutine touches take memory.
pub const DEFAULT_STACK_SIZE: usize = 1024 * 1024;

/// Where every coroutine stack of the process comes from.
static STACKS: StackSpace = StackSpace::new(Guards::new());

/// One coroutine stack.
///
/// Invariant: with `page` the page size, `limit - page..limit + usable` is a slot of [`STACKS`]
/// owned by this value: the page below `limit` is its guard (any access faults) and
/// `limit..limit + usable` is readable and writable. The slot goes back to `STACKS` (its pages to
/// the kernel) when the value drops. (Three words, as before reservations, so that `Slot`, which
/// the pool's hot path touches, did not grow.)
pub(crate) struct GuardedStack {
    limit: NonNull<u8>,
    usable: usize,
    /// Tells valgrind, when the process runs under it, that the usable part is a stack, so that
    /// switching to it is not mistaken for a wild stack-pointer move (no effect otherwise).
    _valgrind: ValgrindStackRegistration,
}

impl GuardedStack {
    /// Takes a stack with at least `size` usable bytes (rounded up to whole pages, at least
    /// [`MIN_STACK_SIZE`]) and one guard page below it.
    pub(crate) fn new(size: usize) -> io::Result<Self> {
        let page = sys::page_size();
        let usable = size
            .max(MIN_STACK_SIZE)
            .checked_next_multiple_of(page)
            .ok_or_else(|| io::Error::other(format!("coroutine stack size {size} is too large")))?;
        let len = usable
            .checked_add(page)
            .ok_or_else(|| io::Error::other(format!("coroutine stack size {size} is too large")))?;
        let slot = STACKS.take(len, page)?;
        // SAFETY: `page < len`, so the stack starts inside the slot just taken.
        let limit = unsafe { slot.add(page) };
        let _valgrind = ValgrindStackRegistration::new(limit.as_ptr(), usable);
        Ok(GuardedStack { limit, usable, _valgrind })
    }

    /// The number of bytes a coroutine may use (the slot minus the guard).
    #[inline]
    pub(crate) fn usable_size(&self) -> usize {
        self.usable
    }

    /// The addresses of the guard; a fault there is a stack overflow. Async-signal-safe (the
    /// page size was read before the first stack was taken).
    pub(crate) fn guard_range(&self) -> Range<usize> {
        let limit = self.limit.as_ptr() as usize;
        limit - sys::page_size()..limit
    }
}

impl Drop for GuardedStack {
    fn drop(&mut self) {
        let page = sys::page_size();
        // SAFETY: the guard page below `limit` is the start of the slot (type invariant).
        let slot = unsafe { self.limit.sub(page) };
        // SAFETY: by the type invariant the slot came from `STACKS.take(usable + page, page)` and
        // is ours, and a stack is only dropped once no coroutine runs on it (the pool and the
        // coroutine slot own it exclusively).
        unsafe { STACKS.give(slot, self.usable + page, page) };
    }
}

/// The usable range of a [`GuardedStack`], lent to corosensei for one coroutine.
///
/// Invariant: the stack it was taken from outlives every corosensei coroutine made with it (the
/// slot that owns both drops the coroutine first), and at most one coroutine at a time uses it.
#[derive(Clone, Copy)]
pub(crate) struct StackBounds {
    base: StackPointer,
    limit: StackPointer,
}

impl GuardedStack {
    /// The bounds to hand to corosensei; see the invariant on [`StackBounds`].
    pub(crate) fn bounds(&self) -> StackBounds {
        let limit = self.limit.as_ptr() as usize;
        StackBounds {
            base: StackPointer::new(limit + self.usable).expect("a stack never ends at address 0"),
            limit: StackPointer::new(limit).expect("a stack never starts at address 0"),
        }
    }
}

// SAFETY: `base` is the highest address of the writable part of a live `GuardedStack` and
// `limit` the lowest; everything between is readable and writable, the guard page below `limit`
// faults on overflow, and the stack outlives the coroutine (invariant on `StackBounds`).
unsafe impl Stack for StackBounds {
    #[inline]
    fn base(&self) -> StackPointer {
        self.base
    }

    #[inline]
    fn limit(&self) -> StackPointer {
        self.limit
    }
}

// SAFETY: the stack is plain memory with no thread affinity; moving the owner to another thread
// (for example into the shared pool) is fine while no coroutine runs on it, which ownership
// guarantees.
unsafe impl Send for GuardedStack {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_pages_and_keeps_a_guard_below_the_stack() {
        let page = sys::page_size();
        let stack = GuardedStack::new(MIN_STACK_SIZE + 1).unwrap();
        assert_eq!(stack.usable_size(), (MIN_STACK_SIZE + 1).next_multiple_of(page));
        assert_eq!(stack.guard_range().len(), page);
        let bounds = stack.bounds();
        assert_eq!(bounds.limit().get(), stack.guard_range().end);
        assert_eq!(bounds.base().get() - bounds.limit().get(), stack.usable_size());
    }

    #[test]
    fn absurd_size_is_an_error_not_a_panic() {
        let err = GuardedStack::new(usize::MAX - 10).err().expect("must fail");
        assert!(err.to_string().contains("too large"), "{err}");
    }
}
