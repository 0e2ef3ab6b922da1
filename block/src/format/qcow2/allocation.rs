//! In-flight allocations (QEMU's `QCowL2Meta`) and the writes merged into them.
//!
//! An allocating write chooses new host clusters under the metadata lock, writes them
//! without it, and takes the lock again to link them into the L2 table. Until then the
//! guest clusters are *in flight*: requests for them wait on the allocation's queue and
//! look again once it is linked or abandoned.
//!
//! A write that lands inside an allocation whose data is not written yet need not wait and
//! then write on its own: while the allocation is [merging](PendingAllocation::merging), the write's
//! bytes are copied into it and reach the disk in the allocation's one data write; the
//! write completes when the allocation is linked (or, if it is abandoned, starts over on
//! its own). Small sequential writes into fresh clusters thus cost one device write per
//! allocation rather than one per request, and nothing else changes: the merged bytes are
//! written and linked exactly as the allocating request's own bytes are.
//!
//! This module and `metadata` use each other on purpose: the metadata lists the in-flight
//! allocations, and an allocation's queue waits and finishes under the metadata's lock guard
//! (a `CoQueue` releases and retakes the caller's guard, so it names the guarded type).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use aiocoro::coroutine::Co;
use aiocoro::sync::{CoMutexGuard, CoQueue};

use super::metadata::Metadata;
use super::offsets::{ClusterCount, GuestCluster};
use crate::buffer::IoBuffer;

/// An allocation between choosing its clusters and linking them, as the metadata lists it.
pub(crate) struct PendingAllocation {
    /// The first guest cluster.
    pub(crate) first: GuestCluster,
    /// How many guest clusters.
    pub(crate) count: ClusterCount,
    /// The subclusters of a one-cluster write with extended L2 entries that it covers;
    /// all bits for whole clusters.
    pub(crate) subclusters: u32,
    /// What waiting requests hold on to.
    pub(crate) allocation: Arc<SharedAllocation>,
    /// Writes merged so far, while the allocation still takes them; `None` once its data
    /// is being written (or when its own request covers all of it).
    pub(crate) merging: Option<Vec<MergedWrite>>,
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
