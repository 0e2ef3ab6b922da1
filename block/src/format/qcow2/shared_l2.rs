//! Copy-on-write of L2 tables shared with internal snapshots (QEMU's `l2_allocate` with an
//! old table): an L1 entry without `OFLAG_COPIED` names a table whose refcount is above
//! one, which a snapshot's L1 table names too. Before this image changes an entry of it, the
//! table is copied to a new cluster, the L1 entry pointed at the copy, and the old table
//! loses the active L1 table's reference at the next flush.
//!
//! The copy keeps every entry as it was: a data cluster's refcount counts the L1 tables that
//! reach it, so the snapshot's reference stays counted and the entries stay without
//! `OFLAG_COPIED`; a write to one of their clusters then copies that cluster as any shared
//! cluster is copied (see `write`), and the old cluster loses one reference.

use std::io;
use std::sync::Arc;

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::mapping::COPIED;
use super::metadata::Metadata;
use super::offsets::HostOffset;

impl Qcow2Driver {
    /// The L2 table L1 entry `l1_index` names, ready for its entries to change: copied
    /// first if a snapshot shares it; `None` if there is none.
    ///
    /// # Errors
    ///
    /// As [`Qcow2Driver::l2_offset`]; the copy's allocation, write or flush error (nothing
    /// changes then but a leaked cluster at worst).
    pub(super) fn writable_l2(
        &self,
        co: &Co,
        meta: &mut Metadata,
        l1_index: u64,
    ) -> io::Result<Option<HostOffset>> {
        let Some(old) = self.l2_offset(meta, l1_index)? else { return Ok(None) };
        if meta.l1_entry(l1_index).is_some_and(|entry| entry & COPIED != 0) {
            return Ok(Some(old));
        }
        self.copy_shared_l2(co, meta, l1_index, old).map(Some)
    }

    /// Copies the shared L2 table at `old` that L1 entry `l1_index` names to a new cluster:
    /// its refcount made stable, the copy written and flushed, then the L1 entry written
    /// (as for a new table, see [`Metadata::install_l2`]); the old table's reference is
    /// dropped at the next flush.
    fn copy_shared_l2(
        &self,
        co: &Co,
        meta: &mut Metadata,
        l1_index: u64,
        old: HostOffset,
    ) -> io::Result<HostOffset> {
        let table = self.l2_table(co, meta, old)?;
        // Its own copy, not the cached old table's: changing one leaves the other.
        let copy: Arc<[u64]> = table.iter().copied().collect();
        let purpose =
            format_args!("a copy of the L2 table shared with a snapshot (L1 entry {l1_index})");
        meta.install_l2(co, &self.file.node(), l1_index, copy, Some(old), &purpose)
    }
}
