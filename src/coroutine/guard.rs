//! The guard below every coroutine stack, and how it is made.
//!
//! A stack is a slot of a large reservation (see `reservation.rs`): `guard` bytes at its bottom,
//! the usable stack above. The guard must fault on any access, so that an overflow dies instead
//! of writing over the stack below. There are two ways to get that:
//!
//! * **Guard regions** (Linux 6.13+, `MADV_GUARD_INSTALL`): the whole slot is made readable and
//!   writable, then its guard is marked in the page tables. The mapping is not split, so a
//!   reservation stays one mapping however many stacks it holds.
//! * **A `PROT_NONE` page**: only the usable part is made readable and writable and the guard
//!   stays inaccessible. The kernel splits the mapping around it: two mappings per stack, which
//!   caps a process at ~30 000 stacks under the default `vm.max_map_count`.
//!
//! Guard regions are tried first. The first refusal (`EINVAL`: an older kernel, or a mapping that
//! cannot have them, such as memory locked by `mlockall(MCL_FUTURE)`) switches the process to
//! `PROT_NONE` guards for good; both kinds of guard fault the same way, with `SIGSEGV` at the
//! guard's address, which is what the overflow reporter looks for.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

/// How many slots are armed at once with guard regions: 64 MiB of 1 MiB stacks, one `mprotect`.
const REGION_BATCH: usize = 64;

/// How the guards of one set of reservations are made: guard regions until the kernel refuses
/// them, `PROT_NONE` pages after.
pub(crate) struct Guards {
    /// Whether guard regions are still worth trying.
    regions: AtomicBool,
}

impl Guards {
    /// Guards that try guard regions first.
    pub(crate) const fn new() -> Self {
        Guards { regions: AtomicBool::new(true) }
    }

    /// Guards that are always `PROT_NONE` pages, as on a kernel without guard regions.
    #[cfg(test)]
    pub(crate) const fn protection_only() -> Self {
        Guards { regions: AtomicBool::new(false) }
    }

    /// Whether the next guard will be a guard region (no kernel has refused one yet).
    pub(crate) fn uses_regions(&self) -> bool {
        self.regions.load(Ordering::Relaxed)
    }

    /// How many slots to arm at once. With guard regions, a run of slots is made readable and
    /// writable with one `mprotect` and stays one mapping, so arming ahead is cheap; with
    /// `PROT_NONE` guards every armed slot costs two mappings, so only the slot needed is armed.
    pub(crate) fn batch(&self) -> usize {
        if self.uses_regions() { REGION_BATCH } else { 1 }
    }

    /// Makes the `count` adjacent slots of `len` bytes from `first` stacks: the lowest `guard`
    /// bytes of each a guard, the rest readable and writable.
    ///
    /// # Safety
    ///
    /// The slots must lie in a `PROT_NONE` part of a private anonymous mapping this process owns,
    /// that nothing references; `guard` must be a multiple of the page size smaller than `len`,
    /// as `first` and `len` must be.
    pub(crate) unsafe fn arm(
        &self,
        first: NonNull<u8>,
        count: usize,
        len: usize,
        guard: usize,
    ) -> io::Result<()> {
        // SAFETY: every call passes `index < count`, so the offset stays inside the slots.
        let slot = |index: usize| unsafe { first.add(index * len) };
        if self.uses_regions() {
            // SAFETY: the slots are ours and unreferenced (the caller's contract).
            unsafe { sys::make_read_write(first, count * len)? };
            for index in 0..count {
                // SAFETY: the guard lies in a slot: a private anonymous mapping nobody uses.
                match unsafe { sys::install_guard(slot(index), guard) } {
                    Ok(()) => {}
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                        self.regions.store(false, Ordering::Relaxed);
                        // The guards not installed become the inaccessible pages they would
                        // have been without guard regions.
                        for index in index..count {
                            // SAFETY: as above.
                            unsafe { sys::make_inaccessible(slot(index), guard)? };
                        }
                        return Ok(());
                    }
                    Err(error) => {
                        // SAFETY: as above. Best effort: the slots are not handed out either way,
                        // and arming them again later installs the guards again.
                        let _ = unsafe { sys::make_inaccessible(first, count * len) };
                        return Err(error);
                    }
                }
            }
            return Ok(());
        }
        for index in 0..count {
            // SAFETY: the usable part of a slot, which is ours and unreferenced.
            unsafe { sys::make_read_write(slot(index).add(guard), len - guard)? };
        }
        Ok(())
    }
}
