//! Bottom halves: callbacks that any thread can schedule to run once on a context's home thread
//! (QEMU's `QEMUBH`).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::arena::Key;
use super::context::{Local, Shared};
use crate::loom::AtomicU32;

/// Scheduled and not yet taken by a poll: the BH is in a pending list.
const PENDING: u32 = 1 << 0;
/// Scheduled and not cancelled: the callback runs when the pending entry is taken.
const SCHEDULED: u32 = 1 << 1;
/// Deleted: never runs again.
const DELETED: u32 = 1 << 2;

/// The shared half of a bottom half: its flags and where its callback lives.
pub(crate) struct BhCore {
    flags: AtomicU32,
    /// Where the callback is in the home context's BH table.
    index: Key,
    shared: Arc<Shared>,
}

impl BhCore {
    /// Marks the BH scheduled; queues it if it was not pending already (repeated schedules
    /// coalesce).
    fn schedule(self: &Arc<Self>) {
        let old = self.flags.fetch_or(PENDING | SCHEDULED, Ordering::AcqRel);
        if old & (PENDING | DELETED) == 0 {
            self.shared.enqueue_bh(self.clone());
        }
    }

    fn cancel(&self) {
        self.flags.fetch_and(!SCHEDULED, Ordering::AcqRel);
    }

    fn is_scheduled(&self) -> bool {
        self.flags.load(Ordering::Acquire) & (SCHEDULED | DELETED) == SCHEDULED
    }

    /// Takes the pending mark; returns the callback index if the BH should run now.
    pub(crate) fn take(&self) -> Option<Key> {
        let old = self.flags.fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
        (old & (SCHEDULED | DELETED) == SCHEDULED).then_some(self.index)
    }
}

/// A bottom half owned by its context's home thread (QEMU's `aio_bh_new` /
/// `qemu_bh_schedule` / `qemu_bh_cancel` / `qemu_bh_delete`).
///
/// The callback may hold non-`Send` state; it runs on the home thread, once per schedule that
/// reaches a poll (schedules that arrive while the BH is pending coalesce). Dropping the
/// `BottomHalf` deletes it: a pending run is dropped. It schedules, cancels and inspects itself
/// through the methods of [`BhHandle`] (it dereferences to one); [`BottomHalf::handle`] gives a
/// `Send + Sync` copy for other threads.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use std::{cell::Cell, rc::Rc};
///
/// let ctx = AioContext::new()?;
/// let runs = Rc::new(Cell::new(0));
/// let r = runs.clone();
/// let bh = ctx.new_bh(move || r.set(r.get() + 1));
/// bh.schedule();
/// bh.schedule(); // coalesces with the first
/// while ctx.poll(false) {}
/// assert_eq!(runs.get(), 1);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct BottomHalf {
    /// Scheduling works the same through the owner and through its handles.
    handle: BhHandle,
    local: Rc<Local>,
}

impl std::fmt::Debug for BottomHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BottomHalf").finish_non_exhaustive()
    }
}

impl BottomHalf {
    pub(crate) fn new(local: Rc<Local>, callback: Rc<dyn Fn()>) -> BottomHalf {
        let index = local.bhs.borrow_mut().insert(callback);
        let core =
            Arc::new(BhCore { flags: AtomicU32::new(0), index, shared: local.shared.clone() });
        BottomHalf { handle: BhHandle { core }, local }
    }

    /// A `Send + Sync` handle that schedules and cancels this BH from any thread.
    pub fn handle(&self) -> BhHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for BottomHalf {
    type Target = BhHandle;

    /// The owner schedules, cancels and inspects the BH as its handles do.
    fn deref(&self) -> &BhHandle {
        &self.handle
    }
}

impl Drop for BottomHalf {
    fn drop(&mut self) {
        let core = &self.handle.core;
        core.flags.fetch_or(DELETED, Ordering::AcqRel);
        let callback = self.local.bhs.borrow_mut().remove(core.index);
        // Dropped after the table's borrow ends: the callback may own other BHs, whose drops
        // borrow the table too.
        drop(callback);
    }
}

/// Schedules or cancels a [`BottomHalf`] from any thread. Once the `BottomHalf` is dropped,
/// the handle does nothing.
#[derive(Clone)]
pub struct BhHandle {
    core: Arc<BhCore>,
}

impl std::fmt::Debug for BhHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BhHandle").finish_non_exhaustive()
    }
}

impl BhHandle {
    /// Schedules the callback to run once in a coming poll of the context; wakes the context if
    /// it may be blocked.
    pub fn schedule(&self) {
        self.core.schedule();
    }

    /// Unschedules it: if it has not run yet, it will not (until scheduled again).
    pub fn cancel(&self) {
        self.core.cancel();
    }

    /// Whether it is scheduled and has not run yet.
    pub fn is_scheduled(&self) -> bool {
        self.core.is_scheduled()
    }
}
