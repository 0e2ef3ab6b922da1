//! The process-wide overflow pool behind the per-thread stack caches.

// Its `pub` items are re-exported to the loom models (`loom_exports`, loom builds only).
#![cfg_attr(not(aiocoro_loom), allow(unreachable_pub))]

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use crate::loom::{AtomicUsize, Mutex};

/// A bounded pool of items shared by all threads, filled and drained in batches.
///
/// Threads keep their own caches and only come here when theirs overflows or runs dry, so the
/// mutex is taken once per batch, not once per item. `len` mirrors `items.len()` so that an empty
/// pool is seen without taking the lock.
pub struct SharedPool<T> {
    /// The pooled items. Invariant: `items.len() <= capacity` whenever the lock is free.
    items: Mutex<Vec<T>>,
    /// A copy of `items.len()`, written only under the lock; a stale read only costs a lock.
    len: AtomicUsize,
    /// The most items the pool keeps; what does not fit is handed back to the depositor.
    capacity: AtomicUsize,
}

impl<T> std::fmt::Debug for SharedPool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPool").finish_non_exhaustive()
    }
}

impl<T> SharedPool<T> {
    /// Creates an empty pool that keeps at most `capacity` items.
    pub fn new(capacity: usize) -> Self {
        SharedPool {
            items: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            capacity: AtomicUsize::new(capacity),
        }
    }

    /// Moves as many items from the end of `batch` into the pool as fit under its capacity.
    /// What does not fit stays in `batch` for the caller to free.
    pub fn deposit(&self, batch: &mut Vec<T>) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.load(Ordering::Relaxed).saturating_sub(items.len());
        let moved = room.min(batch.len());
        items.extend(batch.drain(batch.len() - moved..));
        self.len.store(items.len(), Ordering::Release);
    }

    /// Moves up to `max` items from the pool to the end of `into`; returns how many moved.
    pub fn withdraw(&self, into: &mut Vec<T>, max: usize) -> usize {
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let moved = max.min(items.len());
        let keep = items.len() - moved;
        into.extend(items.drain(keep..));
        self.len.store(items.len(), Ordering::Release);
        moved
    }

    /// Changes the capacity; items above the new capacity are moved to `excess` for the caller
    /// to free.
    pub fn set_capacity(&self, capacity: usize, excess: &mut Vec<T>) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        self.capacity.store(capacity, Ordering::Relaxed);
        if items.len() > capacity {
            excess.extend(items.drain(capacity..));
        }
        self.len.store(items.len(), Ordering::Release);
    }

    /// The most items the pool keeps.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// The number of pooled items (a snapshot).
    #[allow(clippy::len_without_is_empty, reason = "a snapshot count; nothing asks for emptiness")]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_capacity_and_returns_the_rest() {
        let pool = SharedPool::new(3);
        let mut batch = vec![1, 2, 3, 4, 5];
        pool.deposit(&mut batch);
        assert_eq!(pool.len(), 3);
        assert_eq!(batch, vec![1, 2]);
        let mut out = Vec::new();
        assert_eq!(pool.withdraw(&mut out, 2), 2);
        assert_eq!(pool.len(), 1);
        let mut excess = Vec::new();
        pool.set_capacity(0, &mut excess);
        assert_eq!(excess.len(), 1);
        assert_eq!(pool.len(), 0);
        assert_eq!(pool.withdraw(&mut out, 5), 0);
        let mut all: Vec<_> = out.into_iter().chain(excess).chain(batch).collect();
        all.sort();
        assert_eq!(all, vec![1, 2, 3, 4, 5], "nothing lost or duplicated");
    }
}
