//! The stack pool: a bounded cache per thread in front of one bounded pool shared by all threads.
//!
//! A terminated coroutine's stack goes back to its thread's cache and the next coroutine created
//! on that thread takes it from there, with no system call and no lock. When a thread's cache is
//! full, half of it moves to the shared pool in one batch; when it is empty, a batch comes back.
//! Only when both are empty is a new stack taken from the process's stack reservations, and only
//! when both are full is one given back to them (its memory to the kernel). Deep nesting
//! therefore costs no more than shallow nesting once the pool has grown to the depth used,
//! instead of falling off QEMU's cliff where every level past the pool's cap maps and unmaps a
//! fresh stack. Stacks are slots of a few large reservations (see `reservation.rs`), so a million
//! stacks alive at once cost a few dozen mappings, not two million.
//!
//! ```
//! use aiocoro::coroutine::{pool, Coroutine};
//!
//! let before = pool::thread_stats();
//! for _ in 0..1000 {
//!     Coroutine::new(|_co| {}).enter();
//! }
//! let after = pool::thread_stats();
//! assert!(after.allocated - before.allocated <= 1, "one stack serves every cycle");
//! assert!(after.reused - before.reused >= 999);
//! ```

use std::cell::UnsafeCell;
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::overflow;
use super::shared_pool::SharedPool;
use super::slot::Slot;
use super::stack::{DEFAULT_STACK_SIZE, GuardedStack, MIN_STACK_SIZE};
use crate::sys;

/// How big pooled stacks are and how many stacks the pool keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Usable bytes of every pooled stack (rounded up to whole pages). A coroutine built with
    /// another size gets a stack of its own that is given back when it ends.
    pub stack_size: usize,
    /// The most stacks each thread keeps for itself.
    pub thread_cache: usize,
    /// The most stacks the shared pool keeps for all threads together.
    pub shared_capacity: usize,
}

impl PoolConfig {
    /// The configuration a process starts with: 1 MiB stacks, 256 per thread (QEMU keeps two
    /// batches of 128), 4096 shared.
    pub const DEFAULT: PoolConfig =
        PoolConfig { stack_size: DEFAULT_STACK_SIZE, thread_cache: 256, shared_capacity: 4096 };
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig::DEFAULT
    }
}

/// Stack counters of one thread: what [`thread_stats`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Stacks this thread took from the stack reservations because the pool had none.
    pub allocated: u64,
    /// Coroutines this thread created on a stack taken from the pool.
    pub reused: u64,
    /// Stacks this thread gave back to the stack reservations, their memory to the kernel,
    /// because the pool was full (or the size did not match).
    pub freed: u64,
    /// Stacks in this thread's cache right now (a snapshot, not a counter).
    pub cached: usize,
}

/// Stack counters of the whole process: what [`global_stats`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalPoolStats {
    /// Stacks taken from the stack reservations by any thread.
    pub allocated: u64,
    /// Stacks given back to the stack reservations by any thread.
    pub freed: u64,
    /// Stacks waiting in the shared pool right now.
    pub shared: usize,
}

/// Usable size of pooled stacks, already rounded to whole pages (the default is a multiple of
/// every page size up to 1 MiB).
static POOLED_SIZE: AtomicUsize = AtomicUsize::new(DEFAULT_STACK_SIZE);
static THREAD_CACHE: AtomicUsize = AtomicUsize::new(PoolConfig::DEFAULT.thread_cache);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);

/// A slot (with its stack) on its way through the shared pool to another thread.
///
/// Invariant: the slot is pooled: no handle refers to it, no coroutine runs on its stack, and
/// its cells are reachable only through this box.
struct PooledSlot(Box<Slot>);

// SAFETY: by the invariant, moving the box moves sole ownership of plain memory and of a stack
// nobody runs on; nothing in it is tied to the thread that pooled it.
unsafe impl Send for PooledSlot {}

fn shared() -> &'static SharedPool<PooledSlot> {
    static SHARED: OnceLock<SharedPool<PooledSlot>> = OnceLock::new();
    SHARED.get_or_init(|| SharedPool::new(PoolConfig::DEFAULT.shared_capacity))
}

/// Rounds a requested stack size the way [`GuardedStack::new`] will.
fn rounded(size: usize) -> usize {
    size.max(MIN_STACK_SIZE).next_multiple_of(sys::page_size())
}

#[inline]
fn pooled_size() -> usize {
    POOLED_SIZE.load(Ordering::Relaxed)
}

/// Replaces the pool configuration for the whole process.
///
/// Cached stacks of the old size are given back when next met; the shared pool shrinks at once;
/// threads' caches shrink as they next overflow.
///
/// # Panics
///
/// If `stack_size` is so large that it cannot be rounded to whole pages.
pub fn configure(config: PoolConfig) {
    assert!(
        config.stack_size.checked_next_multiple_of(sys::page_size()).is_some(),
        "aiocoro: pool stack size {} is too large",
        config.stack_size
    );
    POOLED_SIZE.store(rounded(config.stack_size), Ordering::Relaxed);
    THREAD_CACHE.store(config.thread_cache, Ordering::Relaxed);
    let mut excess = Vec::new();
    shared().set_capacity(config.shared_capacity, &mut excess);
    free_stacks(excess.len(), None);
}

/// The configuration in effect (with `stack_size` rounded to whole pages).
pub fn config() -> PoolConfig {
    PoolConfig {
        stack_size: pooled_size(),
        thread_cache: THREAD_CACHE.load(Ordering::Relaxed),
        shared_capacity: shared().capacity(),
    }
}

/// This thread's stack counters.
pub fn thread_stats() -> PoolStats {
    CACHE
        .try_with(|cache| {
            cache.with(|cache| PoolStats { cached: cache.slots.len(), ..cache.stats })
        })
        .unwrap_or_default()
}

/// The process's stack counters.
pub fn global_stats() -> GlobalPoolStats {
    GlobalPoolStats {
        allocated: ALLOCATED.load(Ordering::Relaxed),
        freed: FREED.load(Ordering::Relaxed),
        shared: shared().len(),
    }
}

/// One thread's cache of coroutine slots (each with its stack), its counters, and the number
/// of the next coroutine it creates.
struct ThreadCache {
    #[allow(clippy::vec_box, reason = "handles point into slots, so a slot never moves")]
    slots: Vec<Box<Slot>>,
    stats: PoolStats,
    next_id: u64,
}

/// Interior mutability for the thread cache without a borrow flag.
///
/// Invariant: the `&mut ThreadCache` handed to a closure by [`CacheCell::with`] is the only
/// reference to the cache while the closure runs. That holds because the cache is thread-local,
/// and no closure passed to `with` calls back into this module or runs user code.
struct CacheCell(UnsafeCell<ThreadCache>);

impl CacheCell {
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> R {
        // SAFETY: see the invariant on `CacheCell`: no other reference to the cache is live.
        f(unsafe { &mut *self.0.get() })
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        // A thread that exits gives its stacks to the other threads rather than to the kernel.
        let slots = std::mem::take(&mut self.slots);
        deposit(slots, Some(&mut self.stats));
    }
}

thread_local! {
    static CACHE: CacheCell = const {
        CacheCell(UnsafeCell::new(ThreadCache {
            slots: Vec::new(),
            stats: PoolStats { allocated: 0, reused: 0, freed: 0, cached: 0 },
            next_id: 1,
        }))
    };
}

/// Counts `count` stacks as given back (the caller drops them).
fn free_stacks(count: usize, stats: Option<&mut PoolStats>) {
    FREED.fetch_add(count as u64, Ordering::Relaxed);
    if let Some(stats) = stats {
        stats.freed += count as u64;
    }
}

/// Moves `slots` into the shared pool; those that do not fit, or are not of the pooled size,
/// are given back.
fn deposit(slots: impl IntoIterator<Item = Box<Slot>>, stats: Option<&mut PoolStats>) {
    let want = pooled_size();
    let (mut batch, other_size): (Vec<_>, Vec<_>) =
        slots.into_iter().map(PooledSlot).partition(|slot| slot.0.stack_size() == want);
    shared().deposit(&mut batch);
    free_stacks(batch.len() + other_size.len(), stats);
}

fn new_stack(size: usize, stats: Option<&mut PoolStats>) -> io::Result<Box<Slot>> {
    overflow::install_once();
    let stack = GuardedStack::new(size)?;
    ALLOCATED.fetch_add(1, Ordering::Relaxed);
    if let Some(stats) = stats {
        stats.allocated += 1;
    }
    Ok(Slot::new(stack))
}

/// Takes a slot whose stack has `size` usable bytes (`None`: the pool's size), from the pool
/// when it has one and with a new stack otherwise, and numbers it.
#[inline]
pub(crate) fn take(size: Option<usize>) -> io::Result<Box<Slot>> {
    let want = pooled_size();
    let taken = CACHE.try_with(|cache| {
        cache.with(|cache| {
            let id = cache.next_id;
            cache.next_id += 1;
            let slot = match size {
                Some(size) if rounded(size) != want => new_stack(size, Some(&mut cache.stats)),
                _ => match cache.slots.pop() {
                    Some(slot) if slot.stack_size() == want => {
                        cache.stats.reused += 1;
                        Ok(slot)
                    }
                    other => refill(cache, other, want),
                },
            };
            slot.inspect(|slot| slot.id.set(id))
        })
    });
    match taken {
        Ok(slot) => slot,
        // This thread is exiting and its cache is gone.
        Err(_) => new_stack(size.unwrap_or(want), None),
    }
}

/// Finds a pooled slot when the thread cache has none of the right size: from the shared pool,
/// else a new stack. `stale` is a cached slot of an older configuration's size; when there is
/// one, every stale slot in the cache is given back.
#[cold]
fn refill(cache: &mut ThreadCache, stale: Option<Box<Slot>>, want: usize) -> io::Result<Box<Slot>> {
    if let Some(stale) = stale {
        drop(stale);
        let cached = cache.slots.len();
        cache.slots.retain(|slot| slot.stack_size() == want);
        free_stacks(1 + cached - cache.slots.len(), Some(&mut cache.stats));
    }
    if cache.slots.is_empty() {
        let batch = (THREAD_CACHE.load(Ordering::Relaxed) / 2).max(1);
        let mut pooled = Vec::with_capacity(batch);
        shared().withdraw(&mut pooled, batch);
        for PooledSlot(slot) in pooled {
            if slot.stack_size() == want {
                cache.slots.push(slot);
            } else {
                drop(slot);
                free_stacks(1, Some(&mut cache.stats));
            }
        }
    }
    match cache.slots.pop() {
        Some(slot) => {
            cache.stats.reused += 1;
            Ok(slot)
        }
        None => new_stack(want, Some(&mut cache.stats)),
    }
}

/// Gives a slot back (its coroutine has ended): to this thread's cache, or its stack to the
/// shared pool, or to the kernel.
#[inline]
pub(crate) fn give(slot: Box<Slot>) {
    let mut slot = Some(slot);
    let _ = CACHE.try_with(|cache| {
        cache.with(|cache| {
            let Some(slot) = slot.take() else { return };
            if slot.stack_size() == pooled_size()
                && cache.slots.len() < THREAD_CACHE.load(Ordering::Relaxed)
            {
                cache.slots.push(slot);
            } else {
                spill(cache, slot);
            }
        })
    });
    if let Some(slot) = slot {
        // This thread is exiting and its cache is gone: offer the stack to the other threads.
        deposit([slot], None);
    }
}

/// Moves `slot`'s stack and the stacks of the upper half of a full thread cache to the shared
/// pool.
#[cold]
fn spill(cache: &mut ThreadCache, slot: Box<Slot>) {
    let keep = THREAD_CACHE.load(Ordering::Relaxed) / 2;
    let excess = cache.slots.len().saturating_sub(keep);
    let mut batch: Vec<Box<Slot>> = cache.slots.drain(cache.slots.len() - excess..).collect();
    batch.push(slot);
    deposit(batch, Some(&mut cache.stats));
}
