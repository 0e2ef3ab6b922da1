//! Large reservations of address space that coroutine stacks are carved from.
//!
//! A stack mapped on its own costs two mappings (the stack and its guard page), and Linux caps a
//! process at `vm.max_map_count` mappings (65 530 by default): ~30 000 suspended coroutines. Here
//! a stack is instead a slot of a big `PROT_NONE`, `MAP_NORESERVE` reservation, so reserving
//! costs address space only. Slots are armed (made readable and writable, their guards installed,
//! see `guard.rs`) from the bottom up, a run at a time, when the free ones run out; the armed
//! slots of a reservation form a prefix that the kernel keeps as one mapping, so a reservation
//! costs at most two mappings (armed prefix, reserved rest) whatever the number of stacks in it.
//!
//! Each new reservation holds as many slots as all reservations of that slot size together
//! (from [`FIRST_SLOTS`] up to [`MAX_RESERVATION_BYTES`]), so the number of mappings grows with
//! the logarithm of the number of stacks up to that size, and by one per 64 GiB after: about 30
//! reservations for a million 1 MiB stacks.
//!
//! A returned slot keeps its guard and its access rights, so handing it out again costs no
//! system call; its pages go back to the kernel (`MADV_DONTNEED`) when it is returned, so the
//! memory of stacks that the pool does not keep is freed. A reservation whose slots have all come
//! back is unmapped, which also frees the page tables that its guards and touched pages used,
//! unless it is the last, first-sized one of its slot size: a program that runs one coroutine of
//! its own stack size after another then reuses one slot, with one `MADV_DONTNEED` per coroutine
//! instead of mapping, arming and unmapping a reservation for each.

use std::io;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

use super::guard::Guards;
use crate::sys;

/// Slots in the first reservation of a slot size.
const FIRST_SLOTS: usize = 16;

/// The most bytes one reservation spans (unless a single slot is larger): 64 GiB, a two-thousandth
/// of x86_64's 128 TiB of user address space.
#[cfg(target_pointer_width = "64")]
const MAX_RESERVATION_BYTES: usize = 1 << 36;

/// The most bytes one reservation spans (unless a single slot is larger): 256 MiB of a 32-bit
/// address space.
#[cfg(not(target_pointer_width = "64"))]
const MAX_RESERVATION_BYTES: usize = 1 << 28;

/// The reservations that stacks are carved from, with the guards they are armed with.
pub(crate) struct StackSpace {
    guards: Guards,
    reservations: Mutex<Vec<Reservation>>,
}

/// One reservation: `capacity` slots of `slot_len` bytes from `base`.
///
/// Invariant: `base..base + capacity * slot_len` is one private anonymous `PROT_NONE`,
/// `MAP_NORESERVE` mapping owned by this value, except that slots `0..armed` are armed stacks
/// (guard at the bottom, the rest readable and writable). Of those, the slots in `free` are not
/// in use; every other armed slot is owned by one `GuardedStack`. The mapping is unmapped when the
/// value drops, which happens only once every armed slot is free.
struct Reservation {
    base: NonNull<u8>,
    slot_len: usize,
    capacity: usize,
    armed: usize,
    free: Vec<usize>,
}

// SAFETY: a reservation is addresses and counters; the memory it describes has no thread
// affinity, and all access to the values goes through the `StackSpace` mutex.
unsafe impl Send for Reservation {}

impl Reservation {
    /// Reserves address space for `capacity` slots of `slot_len` bytes.
    fn map(slot_len: usize, capacity: usize) -> io::Result<Self> {
        let len = slot_len.checked_mul(capacity).ok_or_else(|| {
            io::Error::other(format!("{capacity} coroutine stacks of {slot_len} bytes overflow"))
        })?;
        let base = sys::map_inaccessible(len)?;
        Ok(Reservation { base, slot_len, capacity, armed: 0, free: Vec::new() })
    }

    /// The lowest address of slot `index`.
    fn slot(&self, index: usize) -> NonNull<u8> {
        debug_assert!(index < self.capacity);
        // SAFETY: `index < capacity`, so the slot lies in the mapping.
        unsafe { self.base.add(index * self.slot_len) }
    }

    /// The index of the slot starting at `addr`, if it lies in this reservation.
    fn index_of(&self, addr: NonNull<u8>) -> Option<usize> {
        let offset = (addr.as_ptr() as usize).checked_sub(self.base.as_ptr() as usize)?;
        let index = offset / self.slot_len;
        (index < self.capacity).then_some(index)
    }

    /// Arms the next slots with `guards` (as many as `guards` arms at once), keeps all but the
    /// first as free, and hands the first out.
    fn arm_next(&mut self, guards: &Guards, guard: usize) -> io::Result<NonNull<u8>> {
        debug_assert!(self.armed < self.capacity);
        let first = self.armed;
        let count = guards.batch().min(self.capacity - first);
        // SAFETY: slots from `armed` on are still `PROT_NONE` and unreferenced (type invariant);
        // the slot length and the guard are whole pages, the guard smaller than the slot (checked
        // by `StackSpace::take`).
        unsafe { guards.arm(self.slot(first), count, self.slot_len, guard)? };
        self.armed += count;
        // Lowest first out, so that stacks fill a reservation from its bottom.
        self.free.extend((first + 1..first + count).rev());
        Ok(self.slot(first))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        debug_assert_eq!(
            self.free.len(),
            self.armed,
            "a reservation was dropped with stacks in use"
        );
        // SAFETY: the mapping is ours and no slot of it is in use (type invariant: a reservation
        // drops only once every armed slot is free).
        let result = unsafe { sys::unmap(self.base, self.capacity * self.slot_len) };
        debug_assert!(result.is_ok(), "munmap of a stack reservation failed: {result:?}");
    }
}

impl StackSpace {
    /// An empty stack space whose stacks get `guards`.
    pub(crate) const fn new(guards: Guards) -> Self {
        StackSpace { guards, reservations: Mutex::new(Vec::new()) }
    }

    /// Hands out an armed slot of `slot_len` bytes whose lowest `guard` bytes are its guard: a
    /// returned one if there is one (no system call), else the next slot of a reservation, else
    /// the first slot of a new reservation. Returns the slot's lowest address.
    ///
    /// Both sizes must be multiples of the page size, `guard` smaller than `slot_len`; every slot
    /// of one size must be taken with the same `guard`.
    pub(crate) fn take(&self, slot_len: usize, guard: usize) -> io::Result<NonNull<u8>> {
        let page = sys::page_size();
        assert!(
            guard.is_multiple_of(page) && slot_len.is_multiple_of(page) && guard < slot_len,
            "aiocoro: a stack slot of {slot_len} bytes with a guard of {guard} bytes is not whole \
             pages with room above the guard"
        );
        let mut reservations = self.reservations.lock().unwrap_or_else(PoisonError::into_inner);
        // Returned slots first, oldest reservation first, so that newer reservations drain.
        if let Some(reservation) =
            reservations.iter_mut().find(|r| r.slot_len == slot_len && !r.free.is_empty())
        {
            let index = reservation.free.pop().expect("the reservation has a free slot");
            return Ok(reservation.slot(index));
        }
        if let Some(reservation) =
            reservations.iter_mut().find(|r| r.slot_len == slot_len && r.armed < r.capacity)
        {
            return reservation.arm_next(&self.guards, guard);
        }
        let held: usize =
            reservations.iter().filter(|r| r.slot_len == slot_len).map(|r| r.capacity).sum();
        let most = (MAX_RESERVATION_BYTES / slot_len).max(1);
        let mut reservation = Reservation::map(slot_len, held.max(FIRST_SLOTS).min(most))?;
        let slot = reservation.arm_next(&self.guards, guard)?;
        reservations.push(reservation);
        Ok(slot)
    }

    /// Takes back the slot at `slot` (from [`take`](Self::take) with `slot_len` and `guard`):
    /// gives the pages of its stack to the kernel and keeps the slot, armed, for the next
    /// [`take`](Self::take). A reservation whose slots are all back is unmapped, unless it is the
    /// only one of its slot size and no bigger than a first one.
    ///
    /// # Safety
    ///
    /// `slot` must have come from `take(slot_len, guard)` on this space and not been given back
    /// since, and nothing may use the slot's memory any more.
    pub(crate) unsafe fn give(&self, slot: NonNull<u8>, slot_len: usize, guard: usize) {
        // SAFETY: the stack lies in the slot (guard < slot_len, checked by `take`), which is ours
        // and whose contents nobody needs (the caller's contract).
        let discarded = unsafe { sys::discard(slot.add(guard), slot_len - guard) };
        // A failure only leaves the pages in memory; the slot stays a valid stack.
        debug_assert!(
            discarded.is_ok(),
            "MADV_DONTNEED of a coroutine stack failed: {discarded:?}"
        );
        let mut reservations = self.reservations.lock().unwrap_or_else(PoisonError::into_inner);
        let (position, index) = reservations
            .iter()
            .enumerate()
            .find_map(|(position, r)| Some((position, r.index_of(slot)?)))
            .expect("aiocoro: a coroutine stack was given back to a space it did not come from");
        let reservation = &mut reservations[position];
        debug_assert_eq!(reservation.slot(index), slot, "a stack was given back misaligned");
        reservation.free.push(index);
        if reservation.free.len() < reservation.armed {
            return;
        }
        let small = reservation.capacity <= FIRST_SLOTS;
        if small && reservations.iter().filter(|r| r.slot_len == slot_len).count() == 1 {
            return;
        }
        let empty = reservations.remove(position);
        drop(reservations);
        drop(empty);
    }

    /// The address ranges of the reservations (for tests).
    #[cfg(test)]
    fn reservation_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let reservations = self.reservations.lock().unwrap();
        let start = |r: &Reservation| r.base.as_ptr() as usize;
        reservations.iter().map(|r| start(r)..start(r) + r.capacity * r.slot_len).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use super::*;

    /// A small slot: a guard page and four stack pages.
    fn slot_len() -> usize {
        5 * sys::page_size()
    }

    /// The lines of `/proc/self/maps` for mappings that overlap `range`.
    fn maps_within(range: Range<usize>) -> Vec<String> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|line| {
                let (low, rest) = line.split_once('-').unwrap();
                let high = rest.split_once(' ').unwrap().0;
                let low = usize::from_str_radix(low, 16).unwrap();
                let high = usize::from_str_radix(high, 16).unwrap();
                low < range.end && range.start < high
            })
            .map(str::to_owned)
            .collect()
    }

    /// The permissions column of the one mapping that contains `addr`.
    fn permissions_at(addr: usize) -> String {
        let lines = maps_within(addr..addr + 1);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines[0].split(' ').nth(1).unwrap().to_owned()
    }

    #[test]
    fn a_hundred_stacks_with_guard_regions_take_a_handful_of_mappings() {
        let space = StackSpace::new(Guards::new());
        let (len, page) = (slot_len(), sys::page_size());
        let slots: Vec<_> = (0..100).map(|_| space.take(len, page).unwrap()).collect();
        assert!(space.guards.uses_regions(), "this kernel has guard regions (Linux 6.13+)");
        let mut starts: Vec<usize> = slots.iter().map(|s| s.as_ptr() as usize).collect();
        starts.sort_unstable();
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= len), "slots overlap: {starts:?}");
        let ranges = space.reservation_ranges();
        assert_eq!(ranges.len(), 4, "16 + 16 + 32 + 64 slots");
        let mut maps: Vec<String> = ranges.into_iter().flat_map(maps_within).collect();
        maps.dedup();
        // Three full reservations, each one mapping, and the armed prefix and reserved rest of
        // the fourth (adjacent reservations may even merge).
        assert!(maps.len() <= 5, "{maps:#?}");
        // Every stack is writable right up to its guard.
        for slot in &slots {
            // SAFETY: the slot was armed; its stack starts one page above the guard.
            unsafe { slot.add(page).write_bytes(0xa5, len - page) };
        }
        for slot in slots {
            // SAFETY: taken from `space` with these sizes; nothing uses it any more.
            unsafe { space.give(slot, len, page) };
        }
        assert_eq!(space.reservation_ranges().len(), 0, "every reservation was unmapped");
    }

    #[test]
    fn protection_only_guards_are_inaccessible_pages() {
        let space = StackSpace::new(Guards::protection_only());
        let (len, page) = (slot_len(), sys::page_size());
        let slot = space.take(len, page).unwrap();
        let low = slot.as_ptr() as usize;
        assert_eq!(permissions_at(low), "---p");
        assert_eq!(permissions_at(low + page), "rw-p");
        assert_eq!(permissions_at(low + len - 1), "rw-p");
        // SAFETY: taken from `space` with these sizes; nothing uses it any more.
        unsafe { space.give(slot, len, page) };
    }

    #[test]
    fn a_returned_slot_comes_back_zeroed_without_a_new_reservation() {
        let space = StackSpace::new(Guards::new());
        let (len, page) = (slot_len(), sys::page_size());
        let keep = space.take(len, page).unwrap();
        let slot = space.take(len, page).unwrap();
        // SAFETY: the stack part of an armed slot is writable.
        unsafe { slot.add(len - 8).write(7) };
        // SAFETY: taken from `space` with these sizes; nothing uses it any more.
        unsafe { space.give(slot, len, page) };
        assert_eq!(space.reservation_ranges().len(), 1, "`keep` holds the reservation");
        let again = space.take(len, page).unwrap();
        assert_eq!(again, slot, "the returned slot is handed out first");
        // SAFETY: as above, the slot is armed and readable.
        assert_eq!(unsafe { again.add(len - 8).read() }, 0, "its pages went back to the kernel");
        for slot in [keep, again] {
            // SAFETY: taken from `space` with these sizes; nothing uses it any more.
            unsafe { space.give(slot, len, page) };
        }
    }

    #[test]
    fn the_last_small_reservation_of_a_size_stays_for_the_next_stack() {
        let space = StackSpace::new(Guards::new());
        let (len, page) = (slot_len(), sys::page_size());
        let slot = space.take(len, page).unwrap();
        // SAFETY: taken from `space` with these sizes; nothing uses it any more.
        unsafe { space.give(slot, len, page) };
        let kept = space.reservation_ranges();
        assert_eq!(kept.len(), 1, "the only reservation of its size, 16 slots: kept");
        let again = space.take(len, page).unwrap();
        assert_eq!(again, slot);
        assert_eq!(space.reservation_ranges(), kept, "no new reservation");
        // SAFETY: as above.
        unsafe { space.give(again, len, page) };
    }

    #[test]
    fn reservations_grow_geometrically_up_to_the_cap() {
        let space = StackSpace::new(Guards::new());
        let (len, page) = (slot_len(), sys::page_size());
        let slots: Vec<_> = (0..1000).map(|_| space.take(len, page).unwrap()).collect();
        // 16, 16, 32, 64, 128, 256, 512 slots hold 1024.
        assert_eq!(space.reservation_ranges().len(), 7);
        for slot in slots {
            // SAFETY: taken from `space` with these sizes; nothing uses it any more.
            unsafe { space.give(slot, len, page) };
        }
        // A slot bigger than the cap gets a reservation of its own, of one slot.
        let huge = MAX_RESERVATION_BYTES + 2 * page;
        let slot = space.take(huge, page).unwrap();
        let low = slot.as_ptr() as usize;
        assert_eq!(maps_within(low..low + huge).len(), 1, "one armed slot, nothing reserved");
        // SAFETY: taken from `space` with these sizes; nothing uses it any more.
        unsafe { space.give(slot, huge, page) };
        // The 512-slot reservation went when its slots came back; the huge one, the only one of
        // its size and as small as a first one, stays.
        assert_eq!(space.reservation_ranges(), vec![Range { start: low, end: low + huge }]);
    }

    /// The environment variable that tells a re-run of this test binary which test should fault.
    const CHILD: &str = "AIOCORO_RESERVATION_CHILD";

    /// Writes one byte into a fresh slot's guard in a child process, with `guards`; returns the
    /// signal the child died of.
    fn touch_guard_in_child(test: &str, guards: Guards) -> Option<i32> {
        if std::env::var(CHILD).as_deref() == Ok(test) {
            let space = StackSpace::new(guards);
            let (len, page) = (slot_len(), sys::page_size());
            let _below = space.take(len, page).unwrap();
            let slot = space.take(len, page).unwrap();
            // SAFETY: the address is in the slot's guard, which no Rust object owns; the write
            // faults (what the test checks) and the process dies before anything can observe it.
            unsafe { slot.add(page - 1).write_volatile(1) };
            std::process::exit(0);
        }
        let output = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--test-threads=1"])
            .env(CHILD, test)
            .output()
            .unwrap();
        output.status.signal()
    }

    #[test]
    fn a_guard_region_faults() {
        let test = "coroutine::reservation::tests::a_guard_region_faults";
        assert_eq!(touch_guard_in_child(test, Guards::new()), Some(libc::SIGSEGV));
    }

    #[test]
    fn a_protection_only_guard_faults() {
        let test = "coroutine::reservation::tests::a_protection_only_guard_faults";
        assert_eq!(touch_guard_in_child(test, Guards::protection_only()), Some(libc::SIGSEGV));
    }
}
