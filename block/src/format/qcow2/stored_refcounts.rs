//! The refcounts as a check finds them on disk (QEMU's `qcow2_get_refcount` and
//! `update_refcount` as `qemu-img check` uses them): the refcount table and the blocks it
//! names, read whole on first use, with the changes a repair makes kept until written back.
//!
//! Unlike the driver's cache (`refcount`), nothing here refuses a damaged structure: a
//! block past the end of the file reads as zeroes, as QEMU reads it, so that the check can
//! count what it means (every cluster it covers unreferenced) rather than stop.

use std::collections::BTreeSet;
use std::io;

use aiocoro::coroutine::Co;

use super::corrupt;
use super::io::read_within_file;
use super::io::write_at;
use super::offsets::{Geometry, HostCluster, HostOffset};
use super::refcount::{get_entry, set_entry};
use super::table::decode_table;
use crate::node::BlockNode;

/// The bits of a refcount table entry that hold the block's offset (9..=63).
pub(crate) const BLOCK_OFFSET_MASK: u64 = !0x1ff;

/// The stored refcount table and the blocks read so far.
pub(crate) struct StoredRefcounts {
    geometry: Geometry,
    order: u32,
    /// The table's entries as stored (reserved bits included).
    table: Vec<u64>,
    /// Blocks read so far, by table index.
    blocks: Vec<Option<Box<[u8]>>>,
    /// Table indices of blocks a repair changed.
    dirty: BTreeSet<usize>,
}

impl StoredRefcounts {
    /// Reads the refcount table of `clusters` clusters at `offset` of an image of `order`-bit
    /// refcounts (the part past `file_len` reads as zeroes).
    ///
    /// # Errors
    ///
    /// The read error.
    pub(crate) fn load(
        co: &Co,
        file: &BlockNode,
        file_len: u64,
        geometry: Geometry,
        order: u32,
        (offset, clusters): (HostOffset, u32),
    ) -> io::Result<StoredRefcounts> {
        let mut raw = vec![0u8; (u64::from(clusters) * geometry.cluster_size()) as usize];
        read_within_file(co, file, file_len, offset.0, &mut raw)?;
        let table: Vec<u64> = decode_table(&raw).collect();
        Ok(StoredRefcounts {
            geometry,
            order,
            blocks: vec![None; table.len()],
            table,
            dirty: BTreeSet::new(),
        })
    }

    /// The table's entries as stored.
    pub(crate) fn table(&self) -> &[u64] {
        &self.table
    }

    /// Refcounts one block holds.
    pub(crate) fn per_block(&self) -> u64 {
        (self.geometry.cluster_size() * 8) >> self.order
    }

    /// The block counting `cluster` and the entry's index in it; `None` if the table names
    /// no block for it.
    fn block(
        &mut self,
        co: &Co,
        file: &BlockNode,
        file_len: u64,
        HostCluster(cluster): HostCluster,
    ) -> io::Result<Option<(&mut [u8], usize, usize)>> {
        let per_block = self.per_block();
        let Some(slot) =
            usize::try_from(cluster / per_block).ok().filter(|&s| s < self.table.len())
        else {
            return Ok(None);
        };
        let offset = self.table[slot] & BLOCK_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if !self.geometry.is_cluster_aligned(HostOffset(offset)) {
            return Err(corrupt(format!(
                "refcount block {slot} at {offset:#x} is not cluster-aligned"
            )));
        }
        let index = (cluster % per_block) as usize;
        if self.blocks[slot].is_none() {
            let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
            read_within_file(co, file, file_len, offset, &mut bytes)?;
            self.blocks[slot] = Some(bytes.into());
        }
        Ok(self.blocks[slot].as_deref_mut().map(|bytes| (bytes, slot, index)))
    }

    /// The stored refcount of host cluster `cluster` (0 if no block counts it).
    ///
    /// # Errors
    ///
    /// `InvalidData` if its block is misaligned; the block's read error.
    pub(crate) fn get(
        &mut self,
        co: &Co,
        file: &BlockNode,
        file_len: u64,
        cluster: HostCluster,
    ) -> io::Result<u64> {
        let order = self.order;
        Ok(self
            .block(co, file, file_len, cluster)?
            .map_or(0, |(bytes, _, index)| get_entry(bytes, order, index)))
    }

    /// Sets the refcount of host cluster `cluster`, which a block must count, to `value`
    /// (which fits the width); written by [`StoredRefcounts::write_back`].
    ///
    /// # Errors
    ///
    /// `InvalidData` if no block counts the cluster or its block is misaligned; the block's
    /// read error.
    pub(crate) fn set(
        &mut self,
        co: &Co,
        file: &BlockNode,
        file_len: u64,
        cluster: HostCluster,
        value: u64,
    ) -> io::Result<()> {
        let order = self.order;
        let Some((bytes, slot, index)) = self.block(co, file, file_len, cluster)? else {
            return Err(corrupt(format!("no refcount block counts {cluster}")));
        };
        set_entry(bytes, order, index, value);
        self.dirty.insert(slot);
        Ok(())
    }

    /// Writes the blocks a repair changed (not flushed).
    ///
    /// # Errors
    ///
    /// The first write error.
    pub(crate) fn write_back(&mut self, co: &Co, file: &BlockNode) -> io::Result<()> {
        while let Some(slot) = self.dirty.pop_first() {
            let offset = self.table[slot] & BLOCK_OFFSET_MASK;
            let bytes = self.blocks[slot].as_deref().expect("qcow2 check: a dirty block is read");
            write_at(co, file, offset, bytes)?;
        }
        Ok(())
    }
}
