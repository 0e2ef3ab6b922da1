//! Refcounts (QEMU's `qcow2-refcount.c`): the refcount table, a cache of the refcount blocks
//! it names (loaded on first use; the least recently used is evicted, written first if dirty;
//! dirty ones written back by [`Refcounts::write_back`]), and the cluster allocator over them
//! (the first free run of clusters, as QEMU allocates).
//!
//! A changed block may reach the disk at any time, before a flush: its new counts are never
//! less safe than the old ones, because a reference is only dropped once no L2 entry on disk
//! needs it (the metadata's pending frees) or it never was on disk (an abandoned allocation).
//!
//! A block for clusters nobody counted yet goes to the first cluster of the free run being
//! allocated when a block counts that cluster (so that a run may cross any number of
//! blocks' ranges), else to the first cluster it counts, counting itself; a grown refcount
//! table is placed, with the blocks that count it, past the end of the image. All state
//! here is guarded by the driver's metadata lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;

use aiocoro::coroutine::Co;

use super::corrupt;
use super::header::{MAX_REFCOUNT_TABLE_BYTES, field};
use super::header_update::{HeaderUpdates, TableFields};
use super::io::{read_exact_at, write_at};
use super::offsets::{ClusterCount, Geometry, HostCluster, HostOffset};
use super::overlap::{
    Holder, MetadataCluster, TableClusters, allocation_error, clusters, first_shared,
};
use super::table::{decode_table, encode_table};
use crate::node::BlockNode;

/// The refcount of entry `index` of a block of `2^order`-bit big-endian entries (entries
/// narrower than a byte are packed from the least significant bit, as QEMU does).
pub(crate) fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            u64::from((block[index / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        _ => {
            let bytes = 1usize << (order - 3);
            let at = index * bytes;
            block[at..at + bytes].iter().fold(0u64, |value, &byte| (value << 8) | u64::from(byte))
        }
    }
}

/// Sets entry `index` (see [`get_entry`]); `value` must fit the width.
pub(crate) fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let bytes = 1usize << (order - 3);
            let at = index * bytes;
            block[at..at + bytes].copy_from_slice(&value.to_be_bytes()[8 - bytes..]);
        }
    }
}

/// The fewest refcount blocks the cache holds, whatever size it is given (an allocation can
/// need two at once; QEMU's minimum is four clusters too).
pub(crate) const MIN_CACHED_BLOCKS: usize = 4;

/// A loaded refcount block.
struct Block {
    offset: HostOffset,
    bytes: Vec<u8>,
    /// When it was last used (`Refcounts::clock`), for eviction.
    last_use: u64,
}

/// The refcount table and loaded blocks of an image opened read-write.
pub(crate) struct Refcounts {
    geometry: Geometry,
    order: u32,
    table_offset: HostOffset,
    /// Block offsets by table index (0: no block).
    table: Vec<u64>,
    /// The clusters of the blocks `table` names, for overlap checks (see `overlap`).
    block_clusters: TableClusters,
    /// Loaded blocks by table index; at most `capacity` once a load or an addition made room.
    blocks: BTreeMap<usize, Block>,
    /// How many blocks the cache holds (at least [`MIN_CACHED_BLOCKS`]).
    capacity: usize,
    /// Counts block uses, for `Block::last_use`.
    clock: u64,
    /// The end of the image file as far as this process knows: its length at open, raised by
    /// every block this process writes. A block the table names past it cannot be real (it
    /// would read as all-free); one of ours, evicted and loaded again, lies before it.
    known_end: u64,
    /// Table indices of blocks changed since they were last written.
    dirty: BTreeSet<usize>,
    /// No free cluster lies before this one (QEMU's `free_cluster_index`).
    free_hint: u64,
    /// The first free byte of the cluster that compressed data is packed into (QEMU's
    /// `free_byte_offset`); `None` if there is none. Forgotten when that cluster's
    /// refcount drops to zero, so bytes of a cluster handed out again are never packed into.
    compressed_tail: Option<u64>,
    /// Whether the header names the tables memory uses (see `header_update`).
    pub(crate) header: HeaderUpdates,
}

impl Refcounts {
    /// Reads the refcount table of an image (`clusters` clusters at `offset`, of
    /// `2^order`-bit refcounts); up to `cache_bytes` of blocks are cached (at least
    /// [`MIN_CACHED_BLOCKS`] blocks).
    ///
    /// # Errors
    ///
    /// The read error.
    pub(crate) fn load(
        co: &Co,
        file: &BlockNode,
        geometry: Geometry,
        order: u32,
        (offset, clusters): (HostOffset, u32),
        cache_bytes: u64,
    ) -> io::Result<Refcounts> {
        let mut raw = vec![0u8; (u64::from(clusters) * geometry.cluster_size()) as usize];
        read_exact_at(co, file, offset.0, &mut raw)?;
        // Bits 0-8 are reserved; every other bit is the block's offset (checked when the
        // block is loaded).
        let table: Vec<u64> = decode_table(&raw).map(|entry| entry & !0x1ff).collect();
        Ok(Refcounts {
            geometry,
            order,
            table_offset: offset,
            block_clusters: TableClusters::new(geometry, table.iter().copied()),
            table,
            blocks: BTreeMap::new(),
            capacity: usize::try_from(cache_bytes / geometry.cluster_size())
                .unwrap_or(usize::MAX)
                .max(MIN_CACHED_BLOCKS),
            clock: 0,
            known_end: file.length(),
            dirty: BTreeSet::new(),
            free_hint: 0,
            compressed_tail: None,
            header: HeaderUpdates::default(),
        })
    }

    /// Refcounts one block holds.
    fn per_block(&self) -> u64 {
        (self.geometry.cluster_size() * 8) >> self.order
    }

    /// The most clusters an allocating write asks for at once: half a block's worth. (Any
    /// run can be allocated; a longer one places more new blocks ahead of itself.)
    pub(crate) fn max_run(&self) -> u64 {
        (self.per_block() / 2).max(1)
    }

    /// The largest refcount the width holds.
    fn max_refcount(&self) -> u64 {
        if self.order == 6 { u64::MAX } else { (1 << (1 << self.order)) - 1 }
    }

    /// The first host cluster of `range` that the refcount table or a refcount block
    /// occupies, and which.
    pub(crate) fn metadata_in(&self, range: &Range<u64>) -> Option<MetadataCluster> {
        let table = clusters(self.geometry, self.table_offset.0, self.table.len() as u64 * 8);
        if let Some(cluster) = first_shared(&table, range) {
            return Some((HostCluster(cluster), Holder::RefcountTable));
        }
        let (cluster, slot) = self.block_clusters.first_in(range)?;
        Some((HostCluster(cluster), Holder::RefcountBlock { slot }))
    }

    /// Fails if the refcounts call host clusters `range` free although they hold metadata:
    /// the refcounts' own, or what `others` (the rest of the metadata) says; `purpose` is
    /// what the clusters were to be allocated for.
    fn check_free(
        &self,
        range: Range<u64>,
        others: &impl Fn(&Range<u64>) -> Option<MetadataCluster>,
        purpose: &dyn fmt::Display,
    ) -> io::Result<()> {
        match self.metadata_in(&range).or_else(|| others(&range)) {
            Some(hit) => Err(allocation_error(self.geometry, purpose, hit)),
            None => Ok(()),
        }
    }

    /// The block counting table index `slot`, loaded if need be; `None` if there is none.
    fn block(&mut self, co: &Co, file: &BlockNode, slot: usize) -> io::Result<Option<&mut Block>> {
        let Some(&offset) = self.table.get(slot) else { return Ok(None) };
        if offset == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&slot) {
            let offset = HostOffset(offset);
            if !self.geometry.is_cluster_aligned(offset) {
                return Err(corrupt(format!(
                    "refcount table entry {slot}: the block at {offset} is not cluster-aligned"
                )));
            }
            let known_end = self.known_end;
            if offset.0.checked_add(self.geometry.cluster_size()).is_none_or(|end| end > known_end)
            {
                return Err(corrupt(format!(
                    "refcount table entry {slot}: the block at {offset} lies past the end of \
                     the image file ({known_end} bytes)"
                )));
            }
            let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
            read_exact_at(co, file, offset.0, &mut bytes)?;
            self.insert(co, file, slot, offset, bytes)?;
        }
        self.clock += 1;
        let block = self.blocks.get_mut(&slot).expect("qcow2: the block was cached just above");
        block.last_use = self.clock;
        Ok(Some(block))
    }

    /// Caches `bytes` as the block of table index `slot`, at `offset`, evicting the least
    /// recently used blocks (written first if dirty) beyond the cache's capacity.
    ///
    /// # Errors
    ///
    /// The write error of a dirty block evicted (it stays cached and dirty).
    fn insert(
        &mut self,
        co: &Co,
        file: &BlockNode,
        slot: usize,
        offset: HostOffset,
        bytes: Vec<u8>,
    ) -> io::Result<()> {
        while self.blocks.len() >= self.capacity {
            let (&victim, block) = self
                .blocks
                .iter()
                .min_by_key(|(_, block)| block.last_use)
                .expect("qcow2: a full cache holds a block");
            if self.dirty.contains(&victim) {
                write_at(co, file, block.offset.0, &block.bytes)?;
                self.dirty.remove(&victim);
            }
            self.blocks.remove(&victim);
        }
        self.known_end = self.known_end.max(offset.0 + self.geometry.cluster_size());
        self.clock += 1;
        self.blocks.insert(slot, Block { offset, bytes, last_use: self.clock });
        Ok(())
    }

    /// The refcount of host cluster `cluster`.
    ///
    /// # Errors
    ///
    /// The read error of its block.
    pub(crate) fn get(
        &mut self,
        co: &Co,
        file: &BlockNode,
        HostCluster(cluster): HostCluster,
    ) -> io::Result<u64> {
        let per_block = self.per_block();
        let order = self.order;
        let slot = usize::try_from(cluster / per_block).unwrap_or(usize::MAX);
        Ok(match self.block(co, file, slot)? {
            Some(block) => get_entry(&block.bytes, order, (cluster % per_block) as usize),
            None => 0,
        })
    }

    /// Checks that the clusters of `what` (`len` bytes at `offset`, which the image uses)
    /// are counted: the allocator would hand out clusters counted as free again, and
    /// overwrite them.
    ///
    /// # Errors
    ///
    /// `InvalidData` naming `what` if one of its clusters has refcount zero; a block's
    /// read error.
    pub(crate) fn check_counted(
        &mut self,
        co: &Co,
        file: &BlockNode,
        what: &str,
        offset: HostOffset,
        len: u64,
    ) -> io::Result<()> {
        for cluster in clusters(self.geometry, offset.0, len) {
            if self.get(co, file, HostCluster(cluster))? == 0 {
                return Err(corrupt(format!(
                    "the {what} is in host cluster {cluster}, whose refcount is 0: the \
                     refcounts are wrong (repair them with qemu-img check -r all before \
                     writing, or open the image read-only)"
                )));
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of host cluster `cluster`, which a block must count.
    ///
    /// # Errors
    ///
    /// `InvalidData` if the refcount would leave its range or no block counts the cluster;
    /// a block's read error.
    pub(crate) fn change(
        &mut self,
        co: &Co,
        file: &BlockNode,
        HostCluster(cluster): HostCluster,
        delta: i64,
    ) -> io::Result<()> {
        let (per_block, order, max) = (self.per_block(), self.order, self.max_refcount());
        let slot = usize::try_from(cluster / per_block).unwrap_or(usize::MAX);
        let Some(block) = self.block(co, file, slot)? else {
            return Err(corrupt(format!("no refcount block counts host cluster {cluster}")));
        };
        let index = (cluster % per_block) as usize;
        let old = get_entry(&block.bytes, order, index);
        let new = old.checked_add_signed(delta).filter(|&new| new <= max).ok_or_else(|| {
            corrupt(format!(
                "the refcount of host cluster {cluster} ({old}) cannot change by {delta}"
            ))
        })?;
        set_entry(&mut block.bytes, order, index, new);
        self.dirty.insert(slot);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
            let bits = self.geometry.cluster_bits();
            if self.compressed_tail.is_some_and(|tail| tail >> bits == cluster) {
                self.compressed_tail = None;
            }
        }
        Ok(())
    }

    /// Takes `len` bytes (less than a cluster) for compressed data after the data packed
    /// last, with one more reference to that cluster, if they fit in it and its refcount can
    /// grow (QEMU's `qcow2_alloc_bytes`); `None` if not: the caller allocates a cluster and
    /// calls [`Refcounts::start_packing`]. Callers keep `len` a multiple of the file's
    /// request alignment, so that packed data never shares a block another write rewrites
    /// (the next data starts where this ends).
    ///
    /// # Errors
    ///
    /// A block's read error; as [`Refcounts::change`].
    ///
    /// # Panics
    ///
    /// If `len` is zero or not less than a cluster (compressed data never is).
    pub(crate) fn pack_bytes(
        &mut self,
        co: &Co,
        file: &BlockNode,
        len: u64,
    ) -> io::Result<Option<HostOffset>> {
        let cluster_size = self.geometry.cluster_size();
        assert!(
            (1..cluster_size).contains(&len),
            "qcow2: compressed data takes 1 to {} bytes, not {len}",
            cluster_size - 1
        );
        let Some(tail) = self.compressed_tail.take() else { return Ok(None) };
        let cluster = tail >> self.geometry.cluster_bits();
        let fits = tail + len <= (cluster + 1) * cluster_size;
        if !fits || self.get(co, file, HostCluster(cluster))? >= self.max_refcount() {
            return Ok(None);
        }
        self.change(co, file, HostCluster(cluster), 1)?;
        self.compressed_tail = Some(tail + len).filter(|end| end % cluster_size != 0);
        Ok(Some(HostOffset(tail)))
    }

    /// Packs later compressed data after the `len` bytes at the start of the newly
    /// allocated cluster `start`.
    pub(crate) fn start_packing(&mut self, start: HostOffset, len: u64) {
        self.compressed_tail = Some(start.0 + len);
    }

    /// Drops one reference to each host cluster that `len` bytes at `offset` touch (the one
    /// at `offset` if `len` is 0).
    ///
    /// # Errors
    ///
    /// As [`Refcounts::change`].
    pub(crate) fn free(
        &mut self,
        co: &Co,
        file: &BlockNode,
        offset: HostOffset,
        len: u64,
    ) -> io::Result<()> {
        for cluster in clusters(self.geometry, offset.0, len.max(1)) {
            self.change(co, file, HostCluster(cluster), -1)?;
        }
        Ok(())
    }

    /// Allocates `count` contiguous free clusters (refcount 1) at or past no free cluster
    /// (first fit) and returns the first one's offset. Adds refcount blocks, and grows the
    /// refcount table, as the clusters need; `image_end` is the image file's end in bytes
    /// (where a grown table goes), raised as allocations pass it.
    ///
    /// # Errors
    ///
    /// Read and write errors of blocks and tables; `Unsupported` if the refcount table
    /// would outgrow its limit; `InvalidData` naming `purpose` if a cluster the refcounts
    /// call free, and that a new block or the allocation would take, holds metadata: the
    /// refcounts' own, or what `others` says (the clusters of the rest of the metadata in a
    /// range of host clusters). Nothing is then written or counted for that cluster.
    pub(crate) fn allocate(
        &mut self,
        co: &Co,
        file: &BlockNode,
        ClusterCount(count): ClusterCount,
        image_end: &mut u64,
        others: impl Fn(&Range<u64>) -> Option<MetadataCluster>,
        purpose: &dyn fmt::Display,
    ) -> io::Result<HostOffset> {
        let (bits, order, per_block) = (self.geometry.cluster_bits(), self.order, self.per_block());
        let mut start = self.free_hint;
        let mut found = 0;
        let mut skipped_free = false;
        while found < count {
            let cluster = start + found;
            let slot = usize::try_from(cluster / per_block).unwrap_or(usize::MAX);
            let index = (cluster % per_block) as usize;
            let Some(refcount) =
                self.block(co, file, slot)?.map(|block| get_entry(&block.bytes, order, index))
            else {
                if slot < self.table.len() {
                    // The run so far is free and counted: its first cluster can hold the
                    // block (and the run moves on past it).
                    let at = if found > 0 { start } else { cluster };
                    self.check_free(at..at + 1, &others, purpose)?;
                    self.add_block(co, file, slot, at, image_end)?;
                } else {
                    let grown =
                        self.grow_table(co, file, cluster.max(image_end.div_ceil(1 << bits)));
                    // Past the table even if the move failed after memory moved.
                    *image_end = (*image_end).max(self.table_end());
                    grown?;
                }
                // The new metadata took clusters: look again from the start of the run.
                found = 0;
                continue;
            };
            if refcount == 0 {
                found += 1;
            } else {
                // A run too short for `count` stays free before the new hint otherwise.
                skipped_free |= found > 0;
                start = cluster + 1;
                found = 0;
            }
        }
        self.check_free(start..start + count, &others, purpose)?;
        if !skipped_free {
            self.free_hint = start + count;
        }
        for cluster in start..start + count {
            self.change(co, file, HostCluster(cluster), 1)?;
        }
        *image_end = (*image_end).max((start + count) << bits);
        Ok(HostOffset(start << bits))
    }

    /// The byte after the refcount table.
    fn table_end(&self) -> u64 {
        self.table_offset.0 + self.table.len() as u64 * 8
    }

    /// Puts a new block for table index `slot` at free host cluster `at`, which either the
    /// new block counts (then it counts itself) or a loaded block does (then that block is
    /// written back first); writes the new block, flushes, then writes the table entry, so
    /// that no table entry on disk names a block whose own count is not on disk.
    fn add_block(
        &mut self,
        co: &Co,
        file: &BlockNode,
        slot: usize,
        at: u64,
        image_end: &mut u64,
    ) -> io::Result<()> {
        let (bits, order, per_block) = (self.geometry.cluster_bits(), self.order, self.per_block());
        let mut bytes = vec![0u8; 1 << bits];
        if at / per_block == slot as u64 {
            set_entry(&mut bytes, order, (at % per_block) as usize, 1);
        } else {
            self.change(co, file, HostCluster(at), 1)?;
            self.write_back(co, file)?;
        }
        let offset = HostOffset(at << bits);
        write_at(co, file, offset.0, &bytes)?;
        file.flush(co)?;
        // A failed write may still land: the disk then names a stable block for clusters
        // nothing uses yet (the slot had no block), while memory retries the slot later.
        write_at(co, file, self.table_offset.0 + slot as u64 * 8, &offset.0.to_be_bytes())?;
        self.table[slot] = offset.0;
        self.block_clusters.insert(self.geometry, slot as u64, offset.0);
        self.insert(co, file, slot, offset, bytes)?;
        *image_end = (*image_end).max((at + 1) << bits);
        Ok(())
    }

    /// Moves the refcount table to a larger one at host cluster `area` or later, together
    /// with the new blocks that count the clusters it and they take (QEMU's
    /// `qcow2_refcount_area`): blocks and table are written and flushed before the header
    /// points at the new table; then the old table is retired. Once the header write was
    /// tried, memory uses the new table whatever the write did (see `header_update`); the
    /// new blocks are loaded from the disk when first used.
    fn grow_table(&mut self, co: &Co, file: &BlockNode, area: u64) -> io::Result<()> {
        let (bits, per_block) = (self.geometry.cluster_bits(), self.per_block());
        let entries_per_cluster = 1u64 << (bits - 3);
        let first_slot = area / per_block;
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        let len = loop {
            let last = area + blocks + table_clusters - 1;
            let needed = (last / per_block + 1).max(self.table.len() as u64 * 3 / 2 + 1);
            let (new_blocks, new_table) =
                (last / per_block - first_slot + 1, needed.div_ceil(entries_per_cluster));
            if (new_blocks, new_table) == (blocks, table_clusters) {
                break new_table * entries_per_cluster;
            }
            (blocks, table_clusters) = (new_blocks, new_table);
        };
        if len * 8 > MAX_REFCOUNT_TABLE_BYTES {
            return Err(super::refuse("the image is too large for its refcount table"));
        }
        let mut table = self.table.clone();
        table.resize(len as usize, 0);
        let area_end = area + blocks + table_clusters;
        for n in 0..blocks {
            let slot = first_slot + n;
            let mut bytes = vec![0u8; 1 << bits];
            for cluster in (slot * per_block).max(area)..((slot + 1) * per_block).min(area_end) {
                set_entry(&mut bytes, self.order, (cluster % per_block) as usize, 1);
            }
            let offset = HostOffset((area + n) << bits);
            write_at(co, file, offset.0, &bytes)?;
            table[slot as usize] = offset.0;
        }
        let table_offset = HostOffset((area + blocks) << bits);
        write_at(co, file, table_offset.0, &encode_table(&table))?;
        file.flush(co)?;
        // The table's offset and cluster count, adjacent in the header: one write.
        let at = field::REFCOUNT_TABLE_OFFSET;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.0.to_be_bytes());
        fields[field::REFCOUNT_TABLE_CLUSTERS - at..]
            .copy_from_slice(&(table_clusters as u32).to_be_bytes());
        let header_written = self.header.write(co, file, at, &fields);
        let old = (self.table_offset, self.table.len() as u64 * 8);
        for n in 0..blocks {
            self.block_clusters.insert(self.geometry, first_slot + n, (area + n) << bits);
        }
        self.table = table;
        self.table_offset = table_offset;
        self.known_end = self.known_end.max(area_end << bits);
        self.finish_move(co, file, old, header_written)
    }

    /// Ends a table move (of the L1 table or the refcount table) whose header write
    /// returned `header_written`, memory having moved: retires the `(offset, bytes)` of the
    /// `old` table, freed now if the header is stable (see `header_update`).
    ///
    /// # Errors
    ///
    /// The header write's error, else the free's.
    pub(crate) fn finish_move(
        &mut self,
        co: &Co,
        file: &BlockNode,
        (offset, len): (HostOffset, u64),
        header_written: io::Result<()>,
    ) -> io::Result<()> {
        let free_now = if len > 0 { self.header.retire(offset, len) } else { None };
        header_written?;
        match free_now {
            Some((offset, len)) => self.free(co, file, offset, len),
            None => Ok(()),
        }
    }

    /// Makes the header stable if a header write failed (see `header_update`): writes the
    /// virtual `size`, the `l1` table's entries and place and this refcount table's place,
    /// and flushes; then frees the retired tables. Returns whether it flushed.
    ///
    /// # Errors
    ///
    /// The write or flush error; a free's error (the tables not yet freed then leak).
    pub(crate) fn settle_header(
        &mut self,
        co: &Co,
        file: &BlockNode,
        size: u64,
        l1: (u32, HostOffset),
    ) -> io::Result<bool> {
        if !self.header.is_unsure() {
            return Ok(false);
        }
        let clusters = (self.table.len() as u64 * 8).div_ceil(self.geometry.cluster_size());
        let fields = TableFields { size, l1, refcount_table: (self.table_offset, clusters as u32) };
        for (offset, len) in self.header.settle(co, file, fields)? {
            self.free(co, file, offset, len)?;
        }
        Ok(true)
    }

    /// How many refcount blocks changed since they were last written back.
    pub(crate) fn dirty_blocks(&self) -> usize {
        self.dirty.len()
    }

    /// Writes the changed blocks (not flushed); returns whether there were any.
    ///
    /// # Errors
    ///
    /// The first write error (the blocks stay dirty).
    pub(crate) fn write_back(&mut self, co: &Co, file: &BlockNode) -> io::Result<bool> {
        let wrote = !self.dirty.is_empty();
        while let Some(&slot) = self.dirty.first() {
            let block = &self.blocks[&slot];
            write_at(co, file, block.offset.0, &block.bytes)?;
            self.dirty.remove(&slot);
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::{CreateOptions, Header, create_file};

    /// Opens `path` as a file node (its length as it is now).
    fn file_node(co: &Co, path: &std::path::Path) -> std::sync::Arc<BlockNode> {
        let options = format!("driver=file,filename={}", path.display());
        crate::open(co, &crate::BlockGraph::new(), &options).unwrap().1
    }

    fn load(co: &Co, file: &BlockNode, cache_bytes: u64) -> Refcounts {
        let header = Header::read(co, file).unwrap();
        let table = (header.refcount_table_offset, header.refcount_table_clusters);
        Refcounts::load(co, file, header.geometry, header.refcount_order, table, cache_bytes)
            .unwrap()
    }

    #[test]
    fn the_block_cache_stays_within_its_capacity_and_loses_no_count() {
        let path = std::env::temp_dir()
            .join(format!("aiocoro-block-refcount-cache-{}.qcow2", std::process::id()));
        crate::run_in_coroutine(move |co| {
            // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
            let options = CreateOptions { cluster_size: 512, ..CreateOptions::new(4 << 20) };
            create_file(co, &path, &options).unwrap();
            let file = file_node(co, &path);
            let mut refcounts = load(co, &file, 0);
            let mut image_end = file.length();
            let mut allocated = Vec::new();
            for _ in 0..3000 {
                allocated.push(
                    refcounts
                        .allocate(co, &file, ClusterCount(1), &mut image_end, |_| None, &"a test")
                        .unwrap(),
                );
                assert!(refcounts.blocks.len() <= MIN_CACHED_BLOCKS, "{}", refcounts.blocks.len());
            }
            // Frees of the first clusters load blocks this process wrote and evicted.
            for offset in &allocated[..600] {
                refcounts.free(co, &file, *offset, 512).unwrap();
            }
            refcounts.write_back(co, &file).unwrap();
            drop(file); // Its image lock keeps a second writer out.
            let file = file_node(co, &path);
            let mut fresh = load(co, &file, 1 << 20);
            for (n, offset) in allocated.iter().enumerate() {
                let expected = u64::from(n >= 600);
                assert_eq!(
                    fresh.get(co, &file, HostCluster(offset.0 >> 9)).unwrap(),
                    expected,
                    "{offset}"
                );
            }
            std::fs::remove_file(&path).unwrap();
        })
        .unwrap();
    }

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            let entries = (64 * 8) >> order;
            for index in 0..entries {
                set_entry(&mut block, order, index, (index as u64 * 7) & max);
            }
            for index in 0..entries {
                assert_eq!(get_entry(&block, order, index), (index as u64 * 7) & max, "{order}");
            }
        }
        // QEMU packs sub-byte refcounts from the least significant bit.
        let mut block = [0u8; 1];
        set_entry(&mut block, 0, 1, 1);
        assert_eq!(block[0], 0b10);
        let mut block = [0u8; 2];
        set_entry(&mut block, 4, 0, 0x1234);
        assert_eq!(block, [0x12, 0x34]);
    }
}
