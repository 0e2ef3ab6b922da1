//! The active L1 table: read by every lookup; an entry changes only to name an L2 table
//! that is on disk with its refcount, and the table moves only to a copy that is (step 3
//! of the write-back order: both take a [`Flushed`] table).

use std::fmt;
use std::io;
use std::sync::Arc;

use aiocoro::coroutine::Co;

use super::flushed::Flushed;
use super::{Metadata, writable};
use crate::node::BlockNode;
use crate::qcow2::header::field;
use crate::qcow2::io::write_at;
use crate::qcow2::mapping::COPIED;
use crate::qcow2::offsets::HostOffset;
use crate::qcow2::table::encode_table;

impl Metadata {
    /// The entries of the L1 table.
    pub(crate) fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// L1 entry `index` as stored, or `None` past the end of the table.
    pub(crate) fn l1_entry(&self, index: u64) -> Option<u64> {
        usize::try_from(index).ok().and_then(|index| self.l1.get(index)).copied()
    }

    /// Makes the new L2 table `table` the one L1 entry `l1_index` names (QEMU's
    /// `l2_allocate`): allocates a cluster for it (for `purpose`, named in errors), writes
    /// and flushes it with its refcount, then writes the L1 entry through, and caches it.
    /// If it replaces `shared` (the table the entry named, which a snapshot shares), that
    /// one loses this L1 table's reference at the next flush (step 4). Returns where the
    /// new table is.
    ///
    /// # Errors
    ///
    /// The allocation's, the write's or the flush's error (nothing changes then but a
    /// leaked cluster at worst); the L1 entry's write error; the error of writing back the
    /// table the cache evicts for it.
    ///
    /// # Panics
    ///
    /// If the image is open read-only, or `l1_index` is past the L1 table (the caller found
    /// the writer and read the entry under the lock it still holds).
    pub(crate) fn install_l2(
        &mut self,
        co: &Co,
        file: &BlockNode,
        l1_index: u64,
        table: Arc<[u64]>,
        shared: Option<HostOffset>,
        purpose: &dyn fmt::Display,
    ) -> io::Result<HostOffset> {
        let new = self.write_flushed(co, file, &encode_table(&table), purpose)?;
        let offset = new.offset();
        self.set_l1_entry(co, file, l1_index, new)?;
        let geometry = self.geometry;
        let writer = writable(&mut self.writer);
        if let Some(old) = shared {
            writer.l2_tables.remove(geometry, old.0);
            writer.defer_free((old, geometry.cluster_size()));
        }
        writer.l2_tables.insert(geometry, l1_index, offset.0);
        self.cache_l2(co, file, offset, table)?;
        Ok(offset)
    }

    /// Points L1 entry `l1_index` at the L2 table `table`, on disk (written through) and
    /// then in memory.
    ///
    /// # Errors
    ///
    /// The write error: memory keeps the old entry. The write may still land: the disk
    /// then names the new table, which reads as what the old entry names (an empty table
    /// as no table, a copy as the table it copies); it stays allocated (a leak at worst) and
    /// a later write makes another.
    fn set_l1_entry(
        &mut self,
        co: &Co,
        file: &BlockNode,
        l1_index: u64,
        table: Flushed,
    ) -> io::Result<()> {
        let entry = table.offset().0 | COPIED;
        write_at(co, file, self.l1_offset.0 + l1_index * 8, &entry.to_be_bytes())?;
        self.l1[l1_index as usize] = entry;
        Ok(())
    }

    /// Moves the L1 table to a new place with room for `entries` entries (QEMU's
    /// `qcow2_grow_l1_table`): the new table is written and flushed with its refcounts
    /// before the header names it; the old one is retired, freed once the header is known
    /// to be stable (see `header_update`).
    ///
    /// # Errors
    ///
    /// The allocation's, the write's or the flush's error (nothing changes then but leaked
    /// clusters at worst); the header write's error (memory has moved to the new table
    /// then: see `header_update`); the error of freeing the old table.
    ///
    /// # Panics
    ///
    /// If the image is open read-only, or `entries` does not fit the header's 32-bit field
    /// (the caller checks both first).
    pub(crate) fn grow_l1(&mut self, co: &Co, file: &BlockNode, entries: u64) -> io::Result<()> {
        let cluster_size = self.geometry.cluster_size();
        let size = u32::try_from(entries).expect("qcow2: grow_l1 needs a 32-bit entry count");
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut raw = encode_table(&l1);
        raw.resize(raw.len().next_multiple_of(cluster_size as usize), 0);
        let new = self.write_flushed(co, file, &raw, &"a larger L1 table")?;
        // The L1 size and offset, adjacent in the header: one write.
        let at = field::L1_SIZE;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&size.to_be_bytes());
        fields[field::L1_TABLE_OFFSET - at..].copy_from_slice(&new.offset().0.to_be_bytes());
        let refcounts = &mut writable(&mut self.writer).refcounts;
        let header_written = refcounts.header.write(co, file, at, &fields);
        // Whatever that write did, memory moves to the new table (see `header_update`).
        let old = (self.l1_offset, self.l1.len() as u64 * 8);
        self.l1 = l1;
        self.l1_offset = new.offset();
        writable(&mut self.writer).refcounts.finish_move(co, file, old, header_written)
    }
}
