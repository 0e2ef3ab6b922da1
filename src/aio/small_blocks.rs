//! A per-thread cache of small heap blocks, for the completion cells of join handles
//! (`completion.rs`): a spawn and join on one thread takes the cell freed by the last one,
//! a few instructions instead of a round trip through `malloc` and `free` (which together
//! were about a fifth of a same-thread spawn and join).
//!
//! Every block that fits is allocated with the one layout [`BLOCK`], so any thread may cache
//! or free a block another thread allocated. A thread keeps at most [`CACHED`] blocks and
//! frees them when it exits.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::cell::Cell;
use std::ptr::NonNull;

/// The layout of every block this cache hands out: what fits in it is served from the cache.
const BLOCK: Layout = match Layout::from_size_align(64, 16) {
    Ok(layout) => layout,
    Err(_) => panic!("64 bytes aligned to 16 is a valid layout"),
};

/// How many free blocks a thread keeps.
const CACHED: usize = 16;

/// A thread's free blocks: `blocks[..len]` are free blocks of layout [`BLOCK`].
struct Cache {
    blocks: [Cell<*mut u8>; CACHED],
    len: Cell<usize>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        for block in &self.blocks[..self.len.get()] {
            // SAFETY: a cached block came from `alloc(BLOCK)` and is owned by the cache.
            unsafe { dealloc(block.get(), BLOCK) };
        }
    }
}

thread_local! {
    static CACHE: Cache = const {
        Cache { blocks: [const { Cell::new(std::ptr::null_mut()) }; CACHED], len: Cell::new(0) }
    };
}

/// Whether a value of `layout` is served from the cache.
const fn fits(layout: Layout) -> bool {
    layout.size() <= BLOCK.size() && layout.align() <= BLOCK.align()
}

/// Allocates a block for a `T` (uninitialised): from this thread's cache when `T` fits.
pub(super) fn allocate<T>() -> NonNull<T> {
    let layout = Layout::new::<T>();
    assert!(layout.size() != 0, "aiocoro: small_blocks::allocate of a zero-sized type");
    if fits(layout) {
        let cached = CACHE
            .try_with(|cache| {
                let len = cache.len.get().checked_sub(1)?;
                cache.len.set(len);
                Some(cache.blocks[len].get())
            })
            .ok()
            .flatten();
        if let Some(block) = cached.and_then(NonNull::new) {
            return block.cast();
        }
    }
    let layout = if fits(layout) { BLOCK } else { layout };
    // SAFETY: `layout` has a non-zero size (asserted above; `BLOCK` is 64 bytes).
    let block = unsafe { alloc(layout) };
    NonNull::new(block).unwrap_or_else(|| handle_alloc_error(layout)).cast()
}

/// Gives back a block from [`allocate`] (its value already dropped): to this thread's cache
/// when it has room.
///
/// # Safety
///
/// `block` came from `allocate::<T>()` (on any thread), is not used after, and is released
/// once.
pub(super) unsafe fn release<T>(block: NonNull<T>) {
    let layout = Layout::new::<T>();
    let block = block.cast::<u8>().as_ptr();
    if !fits(layout) {
        // SAFETY: a block that does not fit was allocated with its own layout (the contract).
        unsafe { dealloc(block, layout) };
        return;
    }
    let kept = CACHE.try_with(|cache| {
        let len = cache.len.get();
        if len == CACHED {
            return false;
        }
        cache.blocks[len].set(block);
        cache.len.set(len + 1);
        true
    });
    if kept != Ok(true) {
        // SAFETY: a block that fits was allocated with `BLOCK` (the contract).
        unsafe { dealloc(block, BLOCK) };
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::{allocate, release};

    #[test]
    fn a_released_block_is_reused_and_large_values_bypass_the_cache() {
        let first = allocate::<[u64; 4]>();
        // SAFETY: `first` came from `allocate` and is released once.
        unsafe { release(first) };
        let second = allocate::<[u64; 4]>();
        assert_eq!(first.cast::<u8>(), second.cast::<u8>(), "the freed block was not reused");
        // SAFETY: as above.
        unsafe { release(second) };
        let large = allocate::<[u64; 64]>();
        // SAFETY: writing the whole block proves it is as large as asked.
        unsafe { large.write([7; 64]) };
        // SAFETY: `large` came from `allocate` and is released once.
        unsafe { release(large) };
    }
}
