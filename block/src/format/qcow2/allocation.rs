//! In-flight allocations (QEMU's `QCowL2Meta`) and the writes merged into them.
//!
//! An allocating write chooses new host clusters under the metadata lock, writes them
//! without it, and takes the lock again to link them into the L2 table. Until then the
//! guest clusters are *in flight*: requests for them wait on the allocation's queue and
//! look again once it is linked or abandoned.
//!
//! A write that lands inside an allocation whose data is not written yet need not wait and then
//! write on its own: while the allocation [takes merges](PendingAllocation::merge), the write's
//! bytes are copied into it and reach the disk in the allocation's one data write; the write
//! completes when the allocation is linked (or, if it is abandoned, starts over on its own).
//! Small sequential writes into fresh clusters thus cost one device write per allocation rather
//! than one per request, and nothing else changes: the merged bytes are written and linked
//! exactly as the allocating request's own bytes are.
//!
//! This module and `metadata` use each other on purpose: the metadata lists the in-flight
//! allocations, and an allocation's queue waits and finishes under the metadata's lock guard
//! (a `CoQueue` releases and retakes the caller's guard, so it names the guarded type).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use aiocoro::coroutine::Co;
use aiocoro::sync::{CoMutexGuard, CoQueue};

use super::metadata::Metadata;
use super::offsets::{ClusterCount, Geometry, GuestCluster, GuestOffset};
use crate::buffer::IoBuffer;

/// An allocation between choosing its clusters and linking them, as the metadata lists it.
pub(crate) struct PendingAllocation {
    /// The first guest cluster.
    first: GuestCluster,
    /// How many guest clusters.
    count: ClusterCount,
    /// The subclusters of a one-cluster write with extended L2 entries that it covers;
    /// all bits for whole clusters.
    subclusters: u32,
    /// What waiting requests hold on to.
    allocation: Arc<SharedAllocation>,
    /// Writes merged so far, while the allocation still takes them; `None` once its data
    /// is being written (or when its own request covers all of it).
    merging: Option<Vec<MergedWrite>>,
}

impl PendingAllocation {
    /// `allocation`, of the subclusters `subclusters` (all bits for whole clusters) of the
    /// `count` guest clusters from `first`; it takes merged writes if `merging`.
    pub(crate) fn new(
        first: GuestCluster,
        count: ClusterCount,
        subclusters: u32,
        allocation: Arc<SharedAllocation>,
        merging: bool,
    ) -> PendingAllocation {
        let merging = merging.then(Vec::new);
        PendingAllocation { first, count, subclusters, allocation, merging }
    }

    /// What requests waiting for it hold on to.
    pub(crate) fn allocation(&self) -> &Arc<SharedAllocation> {
        &self.allocation
    }

    /// Whether `allocation` is this one's.
    pub(crate) fn is(&self, allocation: &Arc<SharedAllocation>) -> bool {
        Arc::ptr_eq(&self.allocation, allocation)
    }

    /// Whether it covers one of the `count` guest clusters from `first`.
    pub(crate) fn overlaps(&self, first: GuestCluster, count: ClusterCount) -> bool {
        self.first < first + count && first < self.first + self.count
    }

    /// Whether it covers one of the subclusters `mask` of guest `cluster`.
    pub(crate) fn overlaps_subclusters(&self, cluster: GuestCluster, mask: u32) -> bool {
        self.overlaps(cluster, ClusterCount(1)) && self.subclusters & mask != 0
    }

    /// Merges the start of a write of `len` bytes at `guest` (inside the allocation's
    /// clusters, of `geometry`), up to the allocation's end: `bytes(n)` copies its first
    /// `n` bytes. Returns how many bytes it merged; `None` if the allocation takes no more
    /// merges (its data is being written).
    pub(crate) fn merge(
        &mut self,
        geometry: Geometry,
        guest: GuestOffset,
        len: u64,
        bytes: impl FnOnce(u64) -> IoBuffer,
    ) -> Option<u64> {
        let merged = self.merging.as_mut()?;
        let at = guest.0 - self.first.0 * geometry.cluster_size();
        let len = len.min(geometry.bytes_of(self.count) - at);
        merged.push(MergedWrite { at, data: bytes(len) });
        Some(len)
    }

    /// Stops taking merged writes; returns those it took.
    pub(crate) fn stop_merging(&mut self) -> Vec<MergedWrite> {
        self.merging.take().unwrap_or_default()
    }
}

/// Bytes of a write merged into an allocation.
pub(crate) struct MergedWrite {
    /// Where they go, in bytes from the start of the allocation's first cluster.
    pub(crate) at: u64,
    /// A copy of the write's bytes.
    pub(crate) data: IoBuffer,
}

/// The part of an in-flight allocation that the requests waiting for it share.
///
/// Invariant: `outcome` changes only under the metadata lock, from `PENDING` to `LINKED` or
/// `ABANDONED`, once, immediately before the queue is restarted.
pub(crate) struct SharedAllocation {
    /// Requests waiting for the allocation to be linked or abandoned.
    queue: CoQueue,
    outcome: AtomicU8,
}

const PENDING: u8 = 0;
const LINKED: u8 = 1;
const ABANDONED: u8 = 2;

impl SharedAllocation {
    /// A new, pending allocation.
    pub(crate) fn new() -> Arc<SharedAllocation> {
        Arc::new(SharedAllocation { queue: CoQueue::new(), outcome: AtomicU8::new(PENDING) })
    }

    /// Releases `meta` until the allocation is linked or abandoned, or a spurious wake-up;
    /// the caller looks at the metadata again afterwards.
    pub(crate) fn wait(&self, co: &Co, meta: &mut CoMutexGuard<'_, Metadata>) {
        self.queue.wait(co, meta);
    }

    /// Waits until the allocation is linked (`true`) or abandoned (`false`).
    pub(crate) fn wait_outcome(&self, co: &Co, meta: &mut CoMutexGuard<'_, Metadata>) -> bool {
        loop {
            match self.outcome.load(Ordering::Relaxed) {
                PENDING => self.queue.wait(co, meta),
                outcome => return outcome == LINKED,
            }
        }
    }

    /// Records whether the allocation was linked and wakes everybody waiting for it.
    pub(crate) fn finish(&self, linked: bool, meta: &mut CoMutexGuard<'_, Metadata>) {
        let outcome = if linked { LINKED } else { ABANDONED };
        // Relaxed: read and written only under the metadata lock.
        self.outcome.store(outcome, Ordering::Relaxed);
        self.queue.restart_all(meta);
    }
}
