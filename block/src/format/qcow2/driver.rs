//! The qcow2 driver: reads through the L1 table and cached L2 tables.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro::coroutine::Co;
use aiocoro::sync::CoMutex;

use super::compressed::{LastInflated, decompress_cluster};
use super::corrupt;
use super::corruption::CorruptMark;
use super::header::Header;
use super::in_place::InPlaceWrites;
use super::io::{read_at, read_exact_at, sub_slices, zero};
use super::mapping::{ClusterMapping, decode_l1, decode_l2};
use super::metadata::Metadata;
use super::offsets::{ClusterCount, GuestOffset, HostOffset};
use super::refcount::Refcounts;
use super::refuse;
use super::subclusters::subcluster_run;
use super::table::decode_table;
use crate::buffer::scatter;
use crate::driver::{Alignment, Allocation, BlockDriver, BlockStatus, write_zeroes_by_writing};
use crate::node::{BlockNode, Child};

/// How much memory the metadata caches of an image may hold (QEMU's `l2-cache-size` and
/// `refcount-cache-size`).
///
/// ```
/// use aiocoro_block::qcow2::CacheSizes;
///
/// let small = CacheSizes { l2_bytes: 1 << 20, ..CacheSizes::default() };
/// assert_eq!(small.refcount_bytes, CacheSizes::default().refcount_bytes);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    /// Bytes of L2 tables (at least one table is cached). Default 32 MiB, QEMU's default
    /// maximum on Linux.
    pub l2_bytes: u64,
    /// Bytes of refcount blocks (at least four blocks are cached, as in QEMU). Default
    /// 1 MiB: with 64 KiB clusters and 16-bit refcounts, the blocks of a 32 GiB image file.
    pub refcount_bytes: u64,
}

impl Default for CacheSizes {
    fn default() -> CacheSizes {
        CacheSizes { l2_bytes: 32 << 20, refcount_bytes: 1 << 20 }
    }
}

/// A stretch of guest bytes that all map the same way.
#[derive(Clone, Copy, Debug)]
struct MappedRun {
    /// For [`ClusterMapping::Data`], the host offset of the run's first byte (not of its
    /// cluster); for compressed clusters the whole cluster's data.
    mapping: ClusterMapping,
    /// How many bytes from the asked offset (within one L2 table, and within one cluster if
    /// compressed).
    len: u64,
}

/// The qcow2 format over a `file` child, with an optional `backing` child. Opened
/// read-write when the file child is writable (see [`Qcow2Driver::open`]).
///
/// Written metadata is cached and written back by a flush; closing the node flushes
/// ([`BlockNode::close`], or dropping its last handle), so nothing is lost when the image
/// is closed. `write_zeroes` frees whole clusters whatever `may_unmap` says.
pub struct Qcow2Driver {
    pub(super) file: Child,
    pub(super) backing: Option<Child>,
    pub(super) header: Header,
    pub(super) metadata: CoMutex<Metadata>,
    /// In-place writes in progress, whose clusters a flush must not free yet.
    pub(super) in_place: InPlaceWrites,
    pub(super) last_inflated: LastInflated,
    /// Set once a write found metadata in its way (see `corruption`).
    pub(super) corrupt: CorruptMark,
}

/// A drop cannot wait for I/O: the node flushes before it drops its driver (see
/// [`BlockNode`]). Metadata still unwritten here (that flush failed, or the driver was
/// never put in a node) is said on stderr: the writes since the last flush are then lost
/// (the image itself stays consistent: at worst it leaks clusters).
impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        let unwritten = self.metadata.get_mut().unwritten();
        if unwritten != 0 {
            eprintln!(
                "aiocoro-block: a qcow2 image on node '{}' was closed with {unwritten} metadata \
                 table(s) not written back; the writes since its last flush are lost",
                self.file.node().name()
            );
        }
    }
}

impl Qcow2Driver {
    /// Opens the image in `file` whose parsed header is `header`
    /// ([`Header::read`]), reading its L1 table; unallocated clusters read from `backing`.
    /// The metadata caches hold up to `caches` bytes.
    ///
    /// The image is opened read-write unless the file node is read-only. Writing needs an
    /// image whose refcounts are exact: one with the dirty bit set (left by QEMU with lazy
    /// refcounts) is first repaired as `qemu-img check -r all` would (see
    /// [`check`](super::check())); one whose refcounts say that its header, L1 table or
    /// refcount table is free is refused, and so are clusters smaller than the file's
    /// request alignment. Images with internal snapshots are written keeping the snapshots
    /// intact: clusters and L2 tables they share are copied before they change (see
    /// `shared_l2`). With the lazy refcounts feature this driver still keeps
    /// refcounts exact and never sets the dirty bit.
    ///
    /// # Errors
    ///
    /// The read error of the L1 table or the refcount table, `InvalidData` if the header
    /// does not fit this file or the refcounts call its tables free, `Unsupported` for an
    /// image that cannot be written.
    pub fn open(
        co: &Co,
        file: Child,
        backing: Option<Child>,
        header: Header,
        caches: CacheSizes,
    ) -> io::Result<Qcow2Driver> {
        let node = file.node();
        let mut header = if header.is_dirty() && !node.is_read_only() {
            super::dirty::repair_dirty(co, &node)?
        } else {
            header
        };
        let file_len = node.length();
        let refcounts = if node.is_read_only() {
            None
        } else {
            let refcounts = open_refcounts(co, &node, &header, caches.refcount_bytes)?;
            super::autoclear::clear_autoclear_bits(co, &node, &mut header)?;
            Some(refcounts)
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > 0
            && header.l1_table_offset.checked_add(l1_bytes).is_none_or(|end| end.0 > file_len)
        {
            return Err(corrupt(format!(
                "the L1 table ({l1_bytes} bytes at {}) ends past the end of the file ({file_len} \
                 bytes)",
                header.l1_table_offset
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        read_exact_at(co, &node, header.l1_table_offset.0, &mut raw)?;
        let l1: Vec<u64> = decode_table(&raw).collect();
        // Not capped by the L1 table's size: it can grow (truncate), and the cache only
        // holds the tables it has met.
        let tables = caches.l2_bytes / header.geometry.cluster_size();
        let metadata = Metadata::new(&header, l1, file_len, tables as usize, refcounts);
        Ok(Qcow2Driver {
            file,
            backing,
            header,
            metadata: CoMutex::new(metadata),
            in_place: InPlaceWrites::default(),
            last_inflated: LastInflated::default(),
            corrupt: CorruptMark::default(),
        })
    }

    /// The image's header as it was opened (writes may have changed the virtual size and
    /// the tables' places since).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing child, if any.
    pub fn backing(&self) -> Option<&Child> {
        self.backing.as_ref()
    }

    /// The L2 table at `offset`, from the cache or read into it. Called with the metadata
    /// lock held, as QEMU loads L2 tables under `s->lock`.
    pub(super) fn l2_table(
        &self,
        co: &Co,
        meta: &mut Metadata,
        offset: HostOffset,
    ) -> io::Result<Arc<[u64]>> {
        if let Some(table) = meta.cached_l2(offset) {
            return Ok(table);
        }
        let mut raw = vec![0u8; self.header.geometry.cluster_size() as usize];
        read_exact_at(co, &self.file.node(), offset.0, &mut raw)?;
        let table: Arc<[u64]> = decode_table(&raw).collect();
        meta.cache_l2(co, &self.file.node(), offset, table.clone())?;
        Ok(table)
    }

    /// How the bytes from `offset` map, for up to `len` of them.
    fn lookup(&self, co: &Co, offset: GuestOffset, len: u64) -> io::Result<MappedRun> {
        let geometry = self.header.geometry;
        let cluster_size = geometry.cluster_size();
        let span = geometry.table_span(offset, len);
        let (position, in_cluster) = (span.position, span.in_cluster);

        let mut meta = self.metadata.lock(co);
        let file_len = meta.image_end();
        let Some(l1_raw) = meta.l1_entry(position.l1_index) else {
            return Err(corrupt(format!(
                "{offset} needs L1 entry {}, past the {} of the L1 table",
                position.l1_index,
                meta.l1_len()
            )));
        };
        let l2_offset = decode_l1(l1_raw, geometry, file_len).map_err(|why| {
            corrupt(format!("{offset}: L1 entry {} ({l1_raw:#018x}): {why}", position.l1_index))
        })?;
        let Some(l2_offset) = l2_offset else {
            return Ok(MappedRun { mapping: ClusterMapping::Unallocated, len: span.len });
        };
        let table = self.l2_table(co, &mut meta, l2_offset)?;
        drop(meta);
        if geometry.has_subclusters() {
            let decode = |n: u64, first: u32| {
                let index = position.l2_index + n as usize;
                let slot = geometry.l2_slot(index);
                let (entry, bitmap) = (table[slot], table[slot + 1]);
                subcluster_run((entry, bitmap), first, geometry, file_len).map_err(|why| {
                    let guest = offset.0 - in_cluster + n * cluster_size;
                    corrupt(format!(
                        "guest offset {guest:#x}: extended L2 entry {index} ({entry:#018x}, \
                         bitmap {bitmap:#018x}) of the L2 table at {l2_offset} (L1 entry {}): \
                         {why}",
                        position.l1_index
                    ))
                })
            };
            let sub_bits = geometry.subcluster_bits();
            let first = (in_cluster >> sub_bits) as u32;
            let (mapping, count) = decode(0, first)?;
            // Bytes from the start of the first cluster that map alike; a run that fills its
            // cluster goes on into the next ones while they continue it.
            let mut end = u64::from(first + count) << sub_bits;
            let mut n = 1;
            while end == n * cluster_size
                && n < span.clusters.0
                && !matches!(mapping, ClusterMapping::Compressed { .. })
            {
                let (next, count) = decode(n, 0)?;
                let continues = match (mapping, next) {
                    (ClusterMapping::Unallocated, ClusterMapping::Unallocated)
                    | (ClusterMapping::Zero, ClusterMapping::Zero) => true,
                    (ClusterMapping::Data(start), ClusterMapping::Data(next)) => {
                        start.checked_add(n * cluster_size) == Some(next)
                    }
                    _ => false,
                };
                if !continues {
                    break;
                }
                end = n * cluster_size + (u64::from(count) << sub_bits);
                n += 1;
            }
            let mapping = match mapping {
                ClusterMapping::Data(start) => {
                    ClusterMapping::Data(HostOffset(start.0 + in_cluster))
                }
                other => other,
            };
            return Ok(MappedRun { mapping, len: span.len.min(end - in_cluster) });
        }

        let decode = |index: usize| {
            let raw = table[index];
            decode_l2(raw, geometry, self.header.version, file_len).map_err(|why| {
                let guest =
                    offset.0 - in_cluster + (index - position.l2_index) as u64 * cluster_size;
                corrupt(format!(
                    "guest offset {guest:#x}: L2 entry {index} ({raw:#018x}) of the L2 table at \
                     {l2_offset} (L1 entry {}): {why}",
                    position.l1_index
                ))
            })
        };
        let first = decode(position.l2_index)?;
        let mut count = 1;
        if !matches!(first, ClusterMapping::Compressed { .. }) {
            while count < span.clusters.0 {
                let step = count * cluster_size;
                let continues = match (first, decode(position.l2_index + count as usize)?) {
                    (ClusterMapping::Unallocated, ClusterMapping::Unallocated)
                    | (ClusterMapping::Zero, ClusterMapping::Zero) => true,
                    (ClusterMapping::Data(start), ClusterMapping::Data(next)) => {
                        start.checked_add(step) == Some(next)
                    }
                    _ => false,
                };
                if !continues {
                    break;
                }
                count += 1;
            }
        }
        let mapping = match first {
            ClusterMapping::Data(start) => ClusterMapping::Data(HostOffset(start.0 + in_cluster)),
            other => other,
        };
        Ok(MappedRun { mapping, len: span.len_in(ClusterCount(count)) })
    }

    /// Fills `bufs` with the guest bytes from `guest` that this image does not hold: from
    /// the backing node where it has them, zeroes past its end or without one.
    fn read_unallocated(
        &self,
        co: &Co,
        GuestOffset(guest): GuestOffset,
        bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
        let Some(backing) = &self.backing else {
            zero(bufs);
            return Ok(());
        };
        let node = backing.node();
        let inside = node.length().saturating_sub(guest).min(total);
        if inside > 0 {
            read_at(co, &node, guest, &mut sub_slices(bufs, 0, inside as usize))?;
        }
        if inside < total {
            zero(&mut sub_slices(bufs, inside as usize, (total - inside) as usize));
        }
        Ok(())
    }

    /// Fills `bufs` from the compressed cluster holding `guest`.
    fn read_compressed(
        &self,
        co: &Co,
        guest: GuestOffset,
        offset: HostOffset,
        len: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        let geometry = self.header.geometry;
        let cluster = match self.last_inflated.get(offset) {
            Some(cluster) => cluster,
            None => {
                // At most two clusters by the entry's layout, so the allocation is bounded.
                let mut packed = vec![0u8; len as usize];
                read_exact_at(co, &self.file.node(), offset.0, &mut packed)?;
                let mut cluster = vec![0u8; geometry.cluster_size() as usize];
                decompress_cluster(self.header.compression, &packed, &mut cluster).map_err(
                    |why| corrupt(format!("{guest}: the compressed cluster at {offset}: {why}")),
                )?;
                let cluster: Arc<[u8]> = cluster.into();
                self.last_inflated.put(offset, cluster.clone());
                cluster
            }
        };
        scatter(&cluster[geometry.offset_in_cluster(guest) as usize..], bufs);
        Ok(())
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    /// The children's: guest bytes written in place (or into allocated subclusters) go to
    /// the same offsets in their host cluster as they came, so a request the file's
    /// alignment does not fit (an `O_DIRECT` file's sectors) would reach it misaligned; the
    /// backend pads such requests above the node instead, serialising their
    /// read-modify-write. (Metadata and compressed data are padded here, in `io.rs`.)
    fn alignment(&self, below: Alignment) -> Alignment {
        below
    }

    fn length(&self, co: &Co) -> io::Result<u64> {
        Ok(self.metadata.lock(co).virtual_size())
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        let mut done = 0usize;
        while done < total {
            let guest = GuestOffset(offset + done as u64);
            let run = self.lookup(co, guest, (total - done) as u64)?;
            let len = run.len as usize;
            let mut piece = sub_slices(bufs, done, len);
            match run.mapping {
                ClusterMapping::Unallocated => self.read_unallocated(co, guest, &mut piece)?,
                ClusterMapping::Zero => zero(&mut piece),
                ClusterMapping::Data(host) => read_at(co, &self.file.node(), host.0, &mut piece)?,
                ClusterMapping::Compressed { offset, len } => {
                    self.read_compressed(co, guest, offset, len, &mut piece)?;
                }
            }
            done += len;
        }
        Ok(())
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.refuse_if_corrupt()?;
        self.mark_corrupt_on_overlap(co, self.write_guest(co, GuestOffset(offset), bufs))
    }

    fn write_compressed(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.refuse_if_corrupt()?;
        self.mark_corrupt_on_overlap(co, self.write_compressed_clusters(co, offset, bufs))
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        let mut meta = self.metadata.lock(co);
        meta.flush(co, &self.file.node(), |offset, len| self.in_place.overlaps(offset, len))
    }

    fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_if_corrupt()?;
        self.mark_corrupt_on_overlap(co, self.drop_clusters(co, GuestOffset(offset), len))
    }

    fn write_zeroes(&self, co: &Co, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.refuse_if_corrupt()?;
        let by_writing = |co: &Co, offset, len| {
            write_zeroes_by_writing(co, offset, len, |co, offset, bufs| {
                self.write(co, offset, bufs)
            })
        };
        if self.header.version < 3 {
            return by_writing(co, offset, len);
        }
        // Whole clusters (subclusters with extended L2 entries) get the zero flag; the
        // partial ones at either end zero bytes.
        let cluster_size = self.header.geometry.subcluster_size();
        let end = offset + len;
        let (first, last) =
            (offset.next_multiple_of(cluster_size), end / cluster_size * cluster_size);
        if first >= last {
            return by_writing(co, offset, len);
        }
        for (from, to) in [(offset, first), (last, end)] {
            if from < to {
                by_writing(co, from, to - from)?;
            }
        }
        self.mark_corrupt_on_overlap(co, self.drop_clusters(co, GuestOffset(first), last - first))
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        self.refuse_if_corrupt()?;
        let old = self.length(co)?;
        self.mark_corrupt_on_overlap(co, self.grow(co, len))?;
        // What a longer backing node holds past the old end must not show through in the new
        // area: it reads as zeroes, as QEMU makes it.
        if let Some(backing) = &self.backing {
            let shown = backing.node().length().min(len);
            if shown > old {
                self.write_zeroes(co, old, shown - old, false)?;
            }
        }
        Ok(())
    }

    /// Whole (sub)clusters of a version 3 image: they get the zero flag, nothing is written.
    fn can_zero_fast(&self, offset: u64, len: u64) -> bool {
        let cluster_size = self.header.geometry.subcluster_size();
        self.header.version >= 3
            && offset.is_multiple_of(cluster_size)
            && len.is_multiple_of(cluster_size)
    }

    fn backing_node(&self) -> Option<Arc<BlockNode>> {
        self.backing.as_ref().map(Child::node)
    }

    fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let run = self.lookup(co, GuestOffset(offset), len)?;
        let allocation = match run.mapping {
            ClusterMapping::Unallocated => Allocation::Unallocated,
            ClusterMapping::Zero => Allocation::Zero,
            ClusterMapping::Data(_) | ClusterMapping::Compressed { .. } => Allocation::Data,
        };
        Ok(BlockStatus { allocation, len: run.len })
    }
}

/// Checks that the image in `node` may be written and loads its refcount table.
fn open_refcounts(
    co: &Co,
    node: &BlockNode,
    header: &Header,
    refcount_cache_bytes: u64,
) -> io::Result<Refcounts> {
    if header.is_marked_corrupt() {
        return Err(refuse(
            "the image is marked corrupt (incompatible feature 'corrupt', bit 1): it is not \
             opened for writing; repair it with check -r all (qemu-img check -r all), or open \
             it read-only",
        ));
    }
    let cluster_size = header.geometry.cluster_size();
    if node.alignment().request > cluster_size {
        return Err(refuse(format!(
            "writes need clusters ({cluster_size} bytes) at least as large as the file's \
             request alignment ({} bytes)",
            node.alignment().request
        )));
    }
    let mut refcounts = Refcounts::load(
        co,
        node,
        header.geometry,
        header.refcount_order,
        (header.refcount_table_offset, header.refcount_table_clusters),
        refcount_cache_bytes,
    )?;
    let table_bytes = u64::from(header.refcount_table_clusters) * cluster_size;
    for (what, offset, len) in [
        ("header", HostOffset(0), cluster_size),
        ("refcount table", header.refcount_table_offset, table_bytes),
        ("L1 table", header.l1_table_offset, u64::from(header.l1_size) * 8),
    ] {
        refcounts.check_counted(co, node, what, offset, len)?;
    }
    Ok(refcounts)
}

impl fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("file", &self.file)
            .field("backing", &self.backing)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}
