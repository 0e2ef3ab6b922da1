//! The metadata one `CoMutex` guards (QEMU's `s->lock`), and the order in which changed
//! metadata reaches the disk.
//!
//! Metadata is cached and written back (QEMU's writeback caches, with the refcount cache
//! as the L2 cache's dependency):
//!
//! 1. changed refcount blocks are written, then the file is flushed;
//! 2. only then are changed L2 tables written (so no L2 entry on disk names a cluster whose
//!    refcount is not on disk, and the data written before the entry was set is stable);
//! 3. a new L2 table is written and flushed before the L1 entry that points at it; L1
//!    entries and header fields are written through;
//! 4. clusters that an L2 entry stopped naming (overwritten compressed clusters, discards)
//!    lose their reference only after the L2 table without them is on disk, at the next
//!    flush; until then they stay allocated.
//!
//! A crash at any point therefore leaves at worst leaked clusters. Dirty L2 tables are
//! written back by [`Metadata::flush`] and when the cache evicts them; dirty refcount blocks
//! at step 1 and when their cache evicts them (early is safe: see `refcount`), and every L2
//! write-back flushes the file first, so an evicted block is stable before any L2 entry that
//! needs it. The node flushes when it is closed or dropped (see `BlockNode`).
//!
//! The order is kept here, not by callers: the fields are private to this module, and what
//! changes them are methods that take each step in its place. Entries of an L2 table change
//! through [`Metadata::set_l2_entries`] and [`Metadata::set_extended_entry`], which defer the
//! frees of the clusters the old entries named (step 4); tables reach the disk through
//! [`Metadata::cache_l2`]'s evictions and [`Metadata::flush`] (steps 1 and 2); an L1 entry
//! or the header names a new table only through `l1`, and only a table that `flushed`
//! wrote and flushed with its refcounts (step 3).

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use aiocoro::coroutine::Co;

mod flushed;
mod l1;

use super::allocation::{MergedWrite, PendingAllocation, SharedAllocation};
use super::header::{Header, field};
use super::io::write_at;
use super::l2_cache::L2Cache;
use super::mapping::{COMPRESSED, OFFSET_MASK, referenced_range};
use super::offsets::{ClusterCount, Geometry, GuestCluster, HostCluster, HostOffset};
use super::overlap::{Holder, MetadataCluster, TableClusters, clusters, first_shared};
use super::refcount::Refcounts;
use super::table::encode_table;
use crate::node::BlockNode;

/// What the write path needs besides the tables: present when the image is open
/// read-write.
struct Writer {
    refcounts: Refcounts,
    /// The clusters of the L2 tables the L1 table names, for overlap checks (see
    /// `overlap`); updated as tables are added.
    l2_tables: TableClusters,
    in_flight: Vec<PendingAllocation>,
    /// `(offset, bytes)` ranges of host clusters to unreference once the L2 tables that
    /// stopped naming them are on disk.
    pending_frees: Vec<(HostOffset, u64)>,
}

impl Writer {
    /// Step 4: `(offset, bytes)` of host clusters that a changed L2 entry stopped naming lose
    /// their reference at the next flush, once the table without them is on disk.
    fn defer_free(&mut self, range: (HostOffset, u64)) {
        self.pending_frees.push(range);
    }
}

/// The error of a write to an image opened read-only.
fn refuse_read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "qcow2: the image is open read-only")
}

/// The writer of an image open read-write, for code that found it so under the lock.
///
/// # Panics
///
/// If the image is open read-only (a broken invariant: the writer never goes away).
fn writable(writer: &mut Option<Writer>) -> &mut Writer {
    writer
        .as_mut()
        .expect("qcow2: an image opened for writing keeps its writer until it is dropped")
}

/// The metadata the lock protects.
pub(crate) struct Metadata {
    /// The image's cluster geometry.
    geometry: Geometry,
    /// The active L1 table, decoded.
    l1: Vec<u64>,
    /// Where the L1 table is.
    l1_offset: HostOffset,
    /// Recently used L2 tables.
    l2_cache: L2Cache,
    /// The virtual disk size.
    virtual_size: u64,
    /// The end of the image's clusters in the file (grows with allocations).
    image_end: u64,
    /// `None` when the image is open read-only.
    writer: Option<Writer>,
}

impl Metadata {
    /// The metadata of the image `header` describes, in a file of `file_len` bytes, whose
    /// active L1 table holds `l1`; up to `l2_tables` L2 tables are cached. Writable if
    /// `refcounts` (the image's, loaded) are given.
    pub(crate) fn new(
        header: &Header,
        l1: Vec<u64>,
        file_len: u64,
        l2_tables: usize,
        refcounts: Option<Refcounts>,
    ) -> Metadata {
        let geometry = header.geometry;
        let writer = refcounts.map(|refcounts| Writer {
            refcounts,
            l2_tables: TableClusters::new(geometry, l1.iter().map(|entry| entry & OFFSET_MASK)),
            in_flight: Vec::new(),
            pending_frees: Vec::new(),
        });
        Metadata {
            geometry,
            l1,
            l1_offset: header.l1_table_offset,
            l2_cache: L2Cache::new(l2_tables),
            virtual_size: header.virtual_size,
            image_end: file_len.next_multiple_of(geometry.cluster_size()),
            writer,
        }
    }

    /// The virtual disk size.
    pub(crate) fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The end of the image's clusters in the file: no entry names a cluster at or past it.
    pub(crate) fn image_end(&self) -> u64 {
        self.image_end
    }

    /// Nothing if the image is open read-write.
    ///
    /// # Errors
    ///
    /// `PermissionDenied` if it is open read-only.
    pub(crate) fn check_writable(&self) -> io::Result<()> {
        if self.writer.is_none() {
            return Err(refuse_read_only());
        }
        Ok(())
    }

    /// The most clusters an allocating write asks for at once (one if the image is open
    /// read-only).
    pub(crate) fn max_allocation_run(&self) -> ClusterCount {
        ClusterCount(self.writer.as_ref().map_or(1, |writer| writer.refcounts.max_run()))
    }

    /// Grows the virtual disk to `len` bytes: the header's size field is written and
    /// flushed first.
    ///
    /// # Errors
    ///
    /// The header write's error (the size stays as it was in memory).
    ///
    /// # Panics
    ///
    /// If the image is open read-only (the caller checked under the lock it still holds).
    pub(crate) fn set_virtual_size(
        &mut self,
        co: &Co,
        file: &BlockNode,
        len: u64,
    ) -> io::Result<()> {
        let refcounts = &mut writable(&mut self.writer).refcounts;
        refcounts.header.write(co, file, field::SIZE, &len.to_be_bytes())?;
        self.virtual_size = len;
        Ok(())
    }

    /// The in-flight allocation overlapping guest clusters `first..first + count`, if any.
    pub(crate) fn overlapping(
        &mut self,
        first: GuestCluster,
        count: ClusterCount,
    ) -> Option<&mut PendingAllocation> {
        let writer = self.writer.as_mut()?;
        writer.in_flight.iter_mut().find(|m| m.overlaps(first, count))
    }

    /// Lists `allocation` (guest clusters `first..first + count`) as in flight; it takes
    /// merged writes if `merging`.
    ///
    /// # Panics
    ///
    /// If the image is open read-only (allocating needs the writer).
    pub(crate) fn start_allocation(
        &mut self,
        first: GuestCluster,
        count: ClusterCount,
        allocation: Arc<SharedAllocation>,
        merging: bool,
    ) {
        let in_flight = PendingAllocation::new(first, count, u32::MAX, allocation, merging);
        writable(&mut self.writer).in_flight.push(in_flight);
    }

    /// Lists `allocation`, a write of the subclusters `mask` of guest `cluster` (extended L2
    /// entries), as in flight; it takes no merged writes.
    ///
    /// # Panics
    ///
    /// If the image is open read-only (writing needs the writer).
    pub(crate) fn start_subcluster_write(
        &mut self,
        cluster: GuestCluster,
        mask: u32,
        allocation: Arc<SharedAllocation>,
    ) {
        let in_flight = PendingAllocation::new(cluster, ClusterCount(1), mask, allocation, false);
        writable(&mut self.writer).in_flight.push(in_flight);
    }

    /// The in-flight allocation or subcluster write overlapping subclusters `mask` of guest
    /// `cluster`, if any.
    pub(crate) fn overlapping_subclusters(
        &self,
        cluster: GuestCluster,
        mask: u32,
    ) -> Option<&PendingAllocation> {
        let writer = self.writer.as_ref()?;
        writer.in_flight.iter().find(|m| m.overlaps_subclusters(cluster, mask))
    }

    /// Stops `allocation` taking merged writes and returns those it took.
    pub(crate) fn stop_merging(&mut self, allocation: &Arc<SharedAllocation>) -> Vec<MergedWrite> {
        self.writer
            .as_mut()
            .and_then(|writer| writer.in_flight.iter_mut().find(|m| m.is(allocation)))
            .map(PendingAllocation::stop_merging)
            .unwrap_or_default()
    }

    /// Takes `allocation` off the in-flight list (it was linked or abandoned).
    pub(crate) fn end_allocation(&mut self, allocation: &Arc<SharedAllocation>) {
        if let Some(writer) = self.writer.as_mut() {
            writer.in_flight.retain(|m| !m.is(allocation));
        }
    }

    /// Allocates `count` contiguous host clusters (refcount 1, not yet written back) for
    /// `purpose` (named in errors).
    ///
    /// # Errors
    ///
    /// The allocator's I/O errors; `InvalidData` if the refcounts call metadata free
    /// (nothing is allocated then); `PermissionDenied` if the image is open read-only.
    pub(crate) fn allocate(
        &mut self,
        co: &Co,
        file: &BlockNode,
        count: ClusterCount,
        purpose: &dyn fmt::Display,
    ) -> io::Result<HostOffset> {
        let Metadata { geometry, l1, l1_offset, image_end, writer, .. } = self;
        let Some(writer) = writer.as_mut() else {
            return Err(refuse_read_only());
        };
        let l1_area = clusters(*geometry, l1_offset.0, l1.len() as u64 * 8);
        let l2_tables = &writer.l2_tables;
        let others = |range: &Range<u64>| tables_in(&l1_area, l2_tables, range);
        writer.refcounts.allocate(co, file, count, image_end, others, purpose)
    }

    /// Allocates `len` bytes (less than a cluster, a multiple of the file's request
    /// alignment) for compressed data: packed after the compressed data allocated last if
    /// they fit in its cluster, else at the start of a new cluster (see
    /// `Refcounts::pack_bytes`).
    ///
    /// # Errors
    ///
    /// As [`Metadata::allocate`].
    pub(crate) fn allocate_bytes(
        &mut self,
        co: &Co,
        file: &BlockNode,
        len: u64,
        purpose: &dyn fmt::Display,
    ) -> io::Result<HostOffset> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(refuse_read_only());
        };
        if let Some(packed) = writer.refcounts.pack_bytes(co, file, len)? {
            return Ok(packed);
        }
        let start = self.allocate(co, file, ClusterCount(1), purpose)?;
        writable(&mut self.writer).refcounts.start_packing(start, len);
        Ok(start)
    }

    /// The first of the `count` host clusters from `first` that holds metadata (the header,
    /// the L1 table, an L2 table, the refcount table or a refcount block), and which; `None`
    /// if there is none, or if the image is open read-only (nothing is written then).
    pub(crate) fn metadata_in(
        &self,
        first: HostCluster,
        count: ClusterCount,
    ) -> Option<MetadataCluster> {
        self.metadata_in_range(&(first.0..(first + count).0))
    }

    /// [`Metadata::metadata_in`] for the host clusters `range`.
    fn metadata_in_range(&self, range: &Range<u64>) -> Option<MetadataCluster> {
        let writer = self.writer.as_ref()?;
        let l1_area = clusters(self.geometry, self.l1_offset.0, self.l1.len() as u64 * 8);
        tables_in(&l1_area, &writer.l2_tables, range)
            .or_else(|| writer.refcounts.metadata_in(range))
    }

    /// Sets the `count` L2 entries from `index` of the table at `l2`, which the caller has
    /// just cached, the `n`-th to `entry(n)`; the clusters the old entries named are freed at
    /// the next flush (step 4). The table is changed in place, copied only if a reader still
    /// holds it, and dirty until written back.
    ///
    /// # Panics
    ///
    /// If the table is not cached or the image is open read-only (the caller found the
    /// writer, and cached the table, under the lock it still holds).
    pub(crate) fn set_l2_entries(
        &mut self,
        l2: HostOffset,
        index: usize,
        count: usize,
        entry: impl Fn(u64) -> u64,
    ) {
        let Metadata { geometry, writer, l2_cache, .. } = self;
        debug_assert!(!geometry.has_subclusters(), "qcow2: set_l2_entries on extended entries");
        let writer = writable(writer);
        let table = l2_cache
            .get_mut(l2)
            .expect("qcow2: set_l2_entries needs the L2 table cached by its caller");
        for (n, slot) in table[index..index + count].iter_mut().enumerate() {
            if let Some(range) = referenced_range(*slot, *geometry) {
                writer.defer_free(range);
            }
            *slot = entry(n as u64);
        }
    }

    /// Sets the extended L2 entry `index` of the table at `l2`, which the caller has just
    /// cached, to `entry` and its subcluster bitmap to `bitmap`; the cluster the old entry
    /// named, if `entry` names another, is freed at the next flush (step 4). The table is
    /// dirty until written back.
    ///
    /// # Panics
    ///
    /// As [`Metadata::set_l2_entries`].
    pub(crate) fn set_extended_entry(
        &mut self,
        l2: HostOffset,
        index: usize,
        entry: u64,
        bitmap: u64,
    ) {
        let Metadata { geometry, writer, l2_cache, .. } = self;
        let writer = writable(writer);
        let table = l2_cache
            .get_mut(l2)
            .expect("qcow2: set_extended_entry needs the L2 table cached by its caller");
        let slot = geometry.l2_slot(index);
        let old = table[slot];
        if old & (OFFSET_MASK | COMPRESSED) != entry & (OFFSET_MASK | COMPRESSED)
            && let Some(range) = referenced_range(old, *geometry)
        {
            writer.defer_free(range);
        }
        table[slot] = entry;
        table[slot + 1] = bitmap;
    }

    /// Gives back `len` bytes of clusters from `offset` that an allocation took and that
    /// nothing names (its use failed before an entry pointed at them); a leak at worst if
    /// that fails too.
    pub(crate) fn free_unnamed(&mut self, co: &Co, file: &BlockNode, offset: HostOffset, len: u64) {
        if let Some(writer) = &mut self.writer {
            let _ = writer.refcounts.free(co, file, offset, len);
        }
    }

    /// Step 1: writes changed refcount blocks and, if there were any, flushes the file;
    /// returns whether it flushed (so that a caller who needs a flush anyway skips its own).
    /// First, if a header write failed, makes the header name the tables memory uses (see
    /// `header_update`): nothing that depends on them is written before.
    ///
    /// # Errors
    ///
    /// The write or flush error.
    fn flush_refcounts(&mut self, co: &Co, file: &BlockNode) -> io::Result<bool> {
        let Metadata { l1, l1_offset, virtual_size, writer, .. } = self;
        let Some(writer) = writer else { return Ok(false) };
        let l1 = (l1.len() as u32, *l1_offset);
        let settled = writer.refcounts.settle_header(co, file, *virtual_size, l1)?;
        if writer.refcounts.write_back(co, file)? {
            file.flush(co)?;
            return Ok(true);
        }
        Ok(settled)
    }

    /// Writes the dirty L2 table at `offset` after step 1 and a file flush (its entries'
    /// refcounts and data are then stable), and marks it clean.
    ///
    /// # Errors
    ///
    /// The write or flush error.
    fn write_l2(
        &mut self,
        co: &Co,
        file: &BlockNode,
        offset: HostOffset,
        table: &[u64],
    ) -> io::Result<()> {
        if !self.flush_refcounts(co, file)? {
            file.flush(co)?;
        }
        write_at(co, file, offset.0, &encode_table(table))?;
        self.l2_cache.mark_clean(offset);
        Ok(())
    }

    /// The L2 table at `offset` if it is cached.
    pub(crate) fn cached_l2(&mut self, offset: HostOffset) -> Option<Arc<[u64]>> {
        self.l2_cache.get(offset)
    }

    /// Caches `table` (read from `offset`), first writing back the dirty table it would
    /// evict.
    ///
    /// # Errors
    ///
    /// The write-back's error.
    pub(crate) fn cache_l2(
        &mut self,
        co: &Co,
        file: &BlockNode,
        offset: HostOffset,
        table: Arc<[u64]>,
    ) -> io::Result<()> {
        if let Some((victim, victim_table)) = self.l2_cache.dirty_victim(offset) {
            self.write_l2(co, file, victim, &victim_table)?;
        }
        self.l2_cache.insert(offset, table);
        Ok(())
    }

    /// Writes back all changed metadata in the safe order, drops the references that
    /// pending frees release (and writes those refcounts), and flushes the file; nothing if
    /// the image is open read-only (nothing changed then). A pending
    /// free of a range that `busy` says an in-place write is still writing waits for a later
    /// flush; one of metadata (a corrupt L2 entry named a table) is given up, so that the
    /// table keeps its reference and the allocator never hands it out.
    ///
    /// # Errors
    ///
    /// The first write or flush error. A free that fails is given up (its clusters leak at
    /// worst); the frees after it stay pending.
    pub(crate) fn flush(
        &mut self,
        co: &Co,
        file: &BlockNode,
        busy: impl Fn(HostOffset, u64) -> bool,
    ) -> io::Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let dirty = self.l2_cache.dirty();
        if !dirty.is_empty() {
            if !self.flush_refcounts(co, file)? {
                file.flush(co)?;
            }
            for (offset, table) in dirty {
                write_at(co, file, offset.0, &encode_table(&table))?;
                self.l2_cache.mark_clean(offset);
            }
        }
        file.flush(co)?;
        let pending = self.writer.as_mut().map(|writer| std::mem::take(&mut writer.pending_frees));
        if let Some(pending) = pending.filter(|pending| !pending.is_empty()) {
            let (still_busy, ready): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .filter(|&(offset, len)| {
                    self.metadata_in_range(&clusters(self.geometry, offset.0, len)).is_none()
                })
                .partition(|&(offset, len)| busy(offset, len));
            let writer = writable(&mut self.writer);
            writer.pending_frees = still_busy;
            let mut ready = ready.into_iter();
            while let Some((offset, len)) = ready.next() {
                if let Err(error) = writer.refcounts.free(co, file, offset, len) {
                    // The failed range is dropped (it may be partly freed: retrying could
                    // free a cluster twice, a leak is safe); the rest waits for the next
                    // flush.
                    writer.pending_frees.extend(ready);
                    return Err(error);
                }
            }
        }
        self.flush_refcounts(co, file).map(drop)
    }
}

/// The first host cluster of `range` that holds the header, the L1 table (clusters
/// `l1_area`) or one of `l2_tables`, and which.
fn tables_in(
    l1_area: &Range<u64>,
    l2_tables: &TableClusters,
    range: &Range<u64>,
) -> Option<MetadataCluster> {
    if range.start == 0 && !range.is_empty() {
        return Some((HostCluster(0), Holder::Header));
    }
    if let Some(cluster) = first_shared(l1_area, range) {
        return Some((HostCluster(cluster), Holder::L1Table));
    }
    let (cluster, l1_index) = l2_tables.first_in(range)?;
    Some((HostCluster(cluster), Holder::L2Table { l1_index }))
}

impl Metadata {
    /// Cached tables and blocks that changed since the last flush wrote them back.
    pub(crate) fn unwritten(&self) -> usize {
        let refcounts = self.writer.as_ref().map_or(0, |writer| {
            writer.refcounts.dirty_blocks()
                + usize::from(!writer.pending_frees.is_empty())
                + usize::from(writer.refcounts.header.is_unsure())
        });
        self.l2_cache.dirty().len() + refcounts
    }
}
