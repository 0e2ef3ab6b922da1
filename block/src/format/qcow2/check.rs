//! Checking and repairing an image: QEMU's `qcow2_co_check` as `qemu-img check [-r
//! leaks|all]` runs it.
//!
//! A check counts every reference the image makes to a host cluster (the header, the L1
//! table, each L2 table and the clusters its entries name, the refcount table and its
//! blocks) and compares the counts with the stored refcounts: a cluster counted higher than
//! it is used is leaked, one counted lower (or free) while used is a corruption, and so are
//! malformed entries. It then checks that `OFLAG_COPIED` is set exactly where the refcount
//! is one. `-r leaks` frees leaked clusters and fixes `OFLAG_COPIED` when nothing else is
//! wrong; `-r all` also raises refcounts that are too low, grows the file over a refcount
//! block past its end, fixes `OFLAG_COPIED` whatever else is wrong and, when the stored
//! refcounts cannot be trusted (a used cluster counted free, a bad refcount block), writes
//! a new refcount structure from the counted references (see `rebuild`). A repair that
//! leaves no errors clears the dirty and corrupt bits. After a repair that fixed something
//! the image is checked again and that check is reported, as qemu-img does.
//!
//! The image is read through its `file` node directly, not through an open
//! [`Qcow2Driver`](super::Qcow2Driver): a check must work on images the driver refuses to
//! write (dirty, marked corrupt, with wrong refcounts), and nothing else may use the image
//! meanwhile. Internal snapshots (their L1 and L2 tables, the snapshot table) and persistent
//! bitmaps (the directory, the bitmap tables and their clusters) are counted too.

use std::io;
use std::path::Path;

use aiocoro::coroutine::Co;

use super::bitmap_directory::{ENTRY_OFFSET_MASK, is_valid_entry, read_bitmap_directory};
use super::check_report::{CheckReport, Repair};
use super::header::{
    AUTOCLEAR_BITMAPS, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES, field,
};
use super::io::{read_within_file, write_at};
use super::mapping::{COMPRESSED, COPIED, OFFSET_MASK, ZERO, compressed_extent};
use super::offsets::{ClusterCount, HostCluster, HostOffset};
use super::rebuild::rebuild_refcounts;
use super::references::{Added, References};
use super::snapshot_table::{Snapshot, SnapshotTable, read_snapshot_table};
use super::stored_refcounts::{BLOCK_OFFSET_MASK, StoredRefcounts};
use super::subclusters::is_invalid;
use super::table::{decode_table, encode_table};
use crate::node::BlockNode;

/// L1 entry bits that must be zero.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero.
const L2_STANDARD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry bits that must be zero.
const REFCOUNT_TABLE_RESERVED: u64 = 0x1ff;
/// The most clusters a check counts (QEMU's limit, `INT_MAX`): the counts of that many take
/// 8 GiB.
const MAX_CLUSTERS: u64 = i32::MAX as u64;
/// How far past the end of the file a refcount block may lie for `-r all` to grow the file
/// over it (64 MiB more counts); one further out is repaired by a rebuild instead, as QEMU
/// repairs it when the file cannot grow.
const MAX_GROWTH_CLUSTERS: u64 = 1 << 24;

/// Checks the qcow2 image stored in `file`, repairing what `repair` allows (the node must
/// then be writable), as `qemu-img check` does.
///
/// ```no_run
/// use aiocoro_block::qcow2::{Repair, check_image_file};
///
/// let report = check_image_file("disk.qcow2".as_ref(), Repair::None)?;
/// print!("{}", report.human());
/// std::process::exit(report.exit_code().into());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The header's errors (`InvalidData` for a malformed one, `Unsupported` for what
/// [`Header::parse`] refuses), `PermissionDenied` for a repair of a read-only node. Errors met
/// while checking end the check instead: [`CheckReport::failure`] says why.
pub fn check(co: &Co, file: &BlockNode, repair: Repair) -> io::Result<CheckReport> {
    if repair.writes() && file.is_read_only() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "qcow2: a check that repairs needs the image file open for writing",
        ));
    }
    let report = Pass::run(co, file, repair)?;
    if repair.writes() {
        // A rebuild or a grown file may have written past the node's end: record the
        // length, so that the node (and a driver opened over it next) sees the new blocks.
        let len = file.driver().length(co)?;
        if len != file.length() {
            file.truncate(co, len)?;
        }
    }
    if report.failure.is_some() || !report.repaired() {
        return Ok(report);
    }
    let mut again = Pass::run(co, file, Repair::None)?;
    let mut messages = report.messages;
    messages.append(&mut again.messages);
    Ok(CheckReport {
        messages,
        leaks_fixed: report.leaks_fixed,
        corruptions_fixed: report.corruptions_fixed,
        ..again
    })
}

/// [`check`] on the image file at `path`, opened read-only unless `repair` writes, in a
/// coroutine of its own.
///
/// # Errors
///
/// The open error, or [`check`]'s.
pub fn check_image_file(path: &Path, repair: Repair) -> io::Result<CheckReport> {
    let read_only = if repair.writes() { "off" } else { "on" };
    let options = format!(
        "driver=file,read-only={read_only},filename={}",
        path.to_string_lossy().replace(',', ",,")
    );
    crate::run_in_coroutine(move |co| {
        let (_, node) = crate::open(co, &crate::BlockGraph::new(), &options)?;
        check(co, &node, repair)
    })?
}

/// One pass over the image: QEMU's `qcow2_co_check_locked`.
struct Pass<'a> {
    co: &'a Co,
    file: &'a BlockNode,
    header: Header,
    snapshots: SnapshotTable,
    repair: Repair,
    /// The file's length now (the node's is not updated by writes past its end).
    file_len: u64,
    stored: StoredRefcounts,
    report: CheckReport,
    /// What was found and done, in order.
    messages: Vec<String>,
}

impl<'a> Pass<'a> {
    fn run(co: &'a Co, file: &'a BlockNode, repair: Repair) -> io::Result<CheckReport> {
        let file_len = file.driver().length(co)?;
        let header = Header::parse(&Header::read_first_cluster(co, file)?, file_len)?;
        let snapshots = read_snapshot_table(
            co,
            file,
            file_len,
            header.snapshots_offset.0,
            header.nb_snapshots,
        )?;
        let stored = StoredRefcounts::load(
            co,
            file,
            file_len,
            header.geometry,
            header.refcount_order,
            (header.refcount_table_offset, header.refcount_table_clusters),
        )?;
        let mut pass = Pass {
            co,
            file,
            report: CheckReport {
                total_clusters: header.virtual_size.div_ceil(header.geometry.cluster_size()),
                ..CheckReport::default()
            },
            header,
            snapshots,
            repair,
            file_len,
            stored,
            messages: Vec::new(),
        };
        if let Err(error) = pass.check_everything() {
            pass.report.failure = Some(error.to_string());
        }
        pass.report.messages = pass.messages;
        Ok(pass.report)
    }

    fn say(&mut self, message: String) {
        self.messages.push(message);
    }

    fn cluster_size(&self) -> u64 {
        self.header.geometry.cluster_size()
    }

    fn cluster_bits(&self) -> u32 {
        self.header.geometry.cluster_bits()
    }

    /// The clusters of the file, the last one possibly partial.
    fn file_clusters(&self) -> ClusterCount {
        ClusterCount(self.file_len.div_ceil(self.cluster_size()))
    }

    fn is_aligned(&self, offset: u64) -> bool {
        self.header.geometry.is_cluster_aligned(HostOffset(offset))
    }

    fn check_everything(&mut self) -> io::Result<()> {
        if self.file_clusters().0 > MAX_CLUSTERS {
            self.report.check_errors += 1;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("the image file has more than {MAX_CLUSTERS} clusters to count"),
            ));
        }
        self.check_refcounts()?;
        let clean = self.report.check_errors == 0 && self.report.corruptions == 0;
        if self.repair.writes() && clean {
            self.mark_clean()?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_refcounts`: count, compare, repair or rebuild, then check
    /// `OFLAG_COPIED`.
    fn check_refcounts(&mut self) -> io::Result<()> {
        let order = self.header.refcount_order;
        let mut refs = References::new(self.file_clusters(), order);
        let mut rebuild = false;
        self.count_references(&mut refs, self.repair, &mut rebuild)?;
        let counted = self.report.clone();
        let mut highest = HostCluster(0);
        self.compare(&refs, Repair::None, &mut rebuild, &mut highest);

        if rebuild && self.repair.fixes_errors() {
            let old = self.report.clone();
            self.say("Rebuilding refcount structure".to_owned());
            let new =
                rebuild_refcounts(self.co, self.file, self.header.geometry, order, &mut refs)?;
            self.header.refcount_table_offset = new.offset;
            self.header.refcount_table_clusters = new.clusters;
            self.file_len = self.file.driver().length(self.co)?.max(new.end);
            self.stored = StoredRefcounts::load(
                self.co,
                self.file,
                self.file_len,
                self.header.geometry,
                order,
                (new.offset, new.clusters),
            )?;
            // The old structure is now leaked: count again and free what is.
            self.report.corruptions = 0;
            self.report.leaks = 0;
            let mut rebuild = false;
            let mut refs = References::new(self.file_clusters(), order);
            self.count_references(&mut refs, Repair::None, &mut rebuild)?;
            let recounted = std::mem::take(&mut self.report);
            self.compare(&refs, Repair::Leaks, &mut rebuild, &mut highest);
            if rebuild {
                self.say("ERROR rebuilt refcount structure is still broken".to_owned());
            }
            let fresh_leaks = self.report.leaks;
            self.report = recounted;
            self.report.corruptions_fixed +=
                old.corruptions.saturating_sub(self.report.corruptions);
            self.report.leaks_fixed += old.leaks.saturating_sub(self.report.leaks);
            self.report.leaks += fresh_leaks;
        } else if self.repair.writes() {
            if rebuild {
                self.say("ERROR need to rebuild refcount structures".to_owned());
                self.report.check_errors += 1;
                return Err(io::Error::other(
                    "the refcounts need a rebuild, which only a repair of all errors (-r all) \
                     does",
                ));
            }
            if self.report.leaks + self.report.corruptions > 0 {
                self.report = counted;
                self.compare(&refs, self.repair, &mut rebuild, &mut highest);
            }
        }
        if self.repair.writes() {
            self.stored.write_back(self.co, self.file)?;
            self.file.flush(self.co)?;
        }
        self.check_oflag_copied()?;
        self.report.image_end_offset = (highest.0 + 1) * self.cluster_size();
        Ok(())
    }

    /// QEMU's `calculate_refcounts`: counts every reference into `refs`.
    fn count_references(
        &mut self,
        refs: &mut References,
        repair: Repair,
        rebuild: &mut bool,
    ) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        self.count_range(refs, 0, cluster_size);
        let (l1_offset, l1_size) = (self.header.l1_table_offset.0, self.header.l1_size);
        self.count_l1(refs, (l1_offset, l1_size), true, repair)?;
        for snapshot in self.snapshots.snapshots.clone() {
            let Snapshot { id, name, l1_offset, l1_size, .. } = snapshot;
            if !self.is_aligned(l1_offset) {
                self.say(format!(
                    "ERROR snapshot {id} ({name}) l1_offset={l1_offset:#x}: L1 table is not \
                     cluster aligned; snapshot table entry corrupted"
                ));
                self.report.corruptions += 1;
                continue;
            }
            if u64::from(l1_size) * 8 > MAX_L1_BYTES {
                self.say(format!(
                    "ERROR snapshot {id} ({name}) l1_size={l1_size:#x}: L1 table is too large; \
                     snapshot table entry corrupted"
                ));
                self.report.corruptions += 1;
                continue;
            }
            self.count_l1(refs, (l1_offset, l1_size), false, repair)?;
        }
        let (snapshots_offset, snapshots_bytes) =
            (self.header.snapshots_offset.0, self.snapshots.bytes);
        self.count_range(refs, snapshots_offset, snapshots_bytes);
        let table_bytes = u64::from(self.header.refcount_table_clusters) * cluster_size;
        self.count_range(refs, self.header.refcount_table_offset.0, table_bytes);
        self.count_bitmaps(refs)?;
        self.check_refcount_blocks(refs, repair, rebuild)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to each cluster of `size`
    /// bytes at `offset`.
    fn count_range(&mut self, refs: &mut References, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster may be partly past the end of the file, not more.
        let end = u128::from(offset) + u128::from(size);
        if end >= u128::from(self.file_len) + u128::from(self.cluster_size()) {
            self.say(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.report.corruptions += 1;
            return;
        }
        let bits = self.cluster_bits();
        for cluster in offset >> bits..=(offset + size - 1) >> bits {
            if refs.add(HostCluster(cluster)) == Added::Overflow {
                self.say(format!(
                    "ERROR: overflow cluster offset={:#x}\nUse qemu-img amend to increase the \
                     refcount entry width or qemu-img convert to create a clean copy if the \
                     image cannot be opened for writing",
                    cluster << bits
                ));
                self.report.corruptions += 1;
                self.report.refcount_overflows += 1;
            }
        }
    }

    /// The `len` bytes at `offset`, as a table of 64-bit entries.
    fn read_table(&self, offset: u64, len: u64) -> io::Result<Vec<u64>> {
        let mut raw = vec![0u8; len as usize];
        read_within_file(self.co, self.file, self.file_len, offset, &mut raw)?;
        Ok(decode_table(&raw).collect())
    }

    /// The L1 table of `entries` entries at `offset`, as stored.
    fn read_l1(&mut self, (offset, entries): (u64, u32)) -> io::Result<Vec<u64>> {
        self.read_table(offset, u64::from(entries) * 8).inspect_err(|_| {
            self.report.check_errors += 1;
        })
    }

    /// QEMU's `check_refcounts_l1` for the L1 table of `entries` entries at `offset`: the
    /// active one (whose clusters count as allocated, fragmented and compressed) or a
    /// snapshot's.
    fn count_l1(
        &mut self,
        refs: &mut References,
        (offset, entries): (u64, u32),
        active: bool,
        repair: Repair,
    ) -> io::Result<()> {
        self.count_range(refs, offset, u64::from(entries) * 8);
        let l1 = self.read_l1((offset, entries)).inspect_err(|_| {
            self.messages.push("ERROR: I/O error in check_refcounts_l1".to_owned());
        })?;
        for entry in l1 {
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED != 0 {
                self.say(format!("ERROR found L1 entry with reserved bits set: {entry:x}"));
                self.report.corruptions += 1;
            }
            let l2_offset = entry & OFFSET_MASK;
            self.count_range(refs, l2_offset, self.cluster_size());
            if !self.is_aligned(l2_offset) {
                self.say(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                     corrupted"
                ));
                self.report.corruptions += 1;
            }
            self.count_l2(refs, l2_offset, active, repair)?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2` for an L2 table (of the active L1 table if `active`: its
    /// clusters count as allocated, fragmented and compressed).
    fn count_l2(
        &mut self,
        refs: &mut References,
        l2_offset: u64,
        active: bool,
        repair: Repair,
    ) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let table = self.read_table(l2_offset, cluster_size).inspect_err(|_| {
            self.messages.push("ERROR: I/O error in check_refcounts_l2".to_owned());
            self.report.check_errors += 1;
        })?;
        let mut next_contiguous = 0;
        let geometry = self.header.geometry;
        for (index, &entry) in table.iter().enumerate().step_by(geometry.l2_slot(1)) {
            if entry & COMPRESSED != 0 {
                // Bit 63 (`OFLAG_COPIED`) is not part of the extent.
                let (offset, len) = compressed_extent(entry, self.header.geometry);
                if entry & COPIED != 0 {
                    self.say(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                         clusters",
                        offset.0
                    ));
                    self.report.corruptions += 1;
                }
                // The spec reserves a compressed cluster's subcluster bitmap (zero); QEMU
                // neither counts such a cluster's references nor the cluster.
                if geometry.has_subclusters() && table[index + 1] != 0 {
                    self.say(format!(
                        "ERROR compressed cluster {} with non-zero subcluster allocation \
                         bitmap, entry={:#x}",
                        index / geometry.l2_slot(1),
                        entry & !COPIED
                    ));
                    self.report.corruptions += 1;
                    continue;
                }
                self.count_range(refs, offset.0, len);
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    // Compressed clusters share sectors: they always count as fragmented.
                    self.report.fragmented_clusters += 1;
                }
                continue;
            }
            if entry & L2_STANDARD_RESERVED != 0 {
                self.say(format!("ERROR found l2 entry with reserved bits set: {entry:x}"));
                self.report.corruptions += 1;
            }
            let offset = entry & OFFSET_MASK;
            // With extended L2 entries, the subcluster bitmap after the entry.
            let bitmap = geometry.has_subclusters().then(|| table[index + 1]);
            if offset == 0 {
                if bitmap.is_some_and(|bitmap| is_invalid(bitmap, false)) {
                    self.say(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                            .to_owned(),
                    );
                    self.report.corruptions += 1;
                }
                // Unallocated, or zero without a preallocated cluster.
                continue;
            }
            if !self.is_aligned(offset) {
                self.report.corruptions += 1;
                if entry & ZERO != 0 && !geometry.has_subclusters() {
                    let fix = repair.fixes_errors();
                    self.say(format!(
                        "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 \
                         entry corrupted.",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    if fix {
                        let at = l2_offset + index as u64 * 8;
                        write_at(self.co, self.file, at, &ZERO.to_be_bytes())?;
                        self.report.corruptions -= 1;
                        self.report.corruptions_fixed += 1;
                        continue;
                    }
                } else {
                    self.say(format!(
                        "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry \
                         corrupted."
                    ));
                }
            }
            if bitmap.is_some_and(|bitmap| is_invalid(bitmap, true)) {
                self.say(format!(
                    "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                     allocation bitmap"
                ));
                self.report.corruptions += 1;
            }
            if active {
                self.report.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.report.fragmented_clusters += 1;
                }
                next_contiguous = offset + cluster_size;
            }
            self.count_range(refs, offset, cluster_size);
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the bitmap directory, each bitmap's table
    /// and the clusters of bitmap data it names, if the bitmaps are valid (autoclear bit 0).
    fn count_bitmaps(&mut self, refs: &mut References) -> io::Result<()> {
        let Some(extension) = self.header.bitmaps else { return Ok(()) };
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || extension.count == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        let (directory, size) = (extension.directory_offset.0, extension.directory_size);
        self.count_range(refs, directory, size);
        let tables = read_bitmap_directory(self.co, self.file, self.file_len, &extension)
            .inspect_err(|_| self.report.corruptions += 1)?;
        for table in tables {
            let bytes = u64::from(table.entries) * 8;
            self.count_range(refs, table.offset, bytes);
            if !self.is_aligned(table.offset)
                || table.offset.checked_add(bytes).is_none_or(|end| end > self.file_len)
            {
                // QEMU cannot load such a table and stops counting bitmaps.
                self.report.corruptions += 1;
                break;
            }
            for entry in self.read_table(table.offset, bytes)? {
                if !is_valid_entry(entry, cluster_size) {
                    self.report.corruptions += 1;
                } else if entry & ENTRY_OFFSET_MASK != 0 {
                    self.count_range(refs, entry & ENTRY_OFFSET_MASK, cluster_size);
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`: counts the refcount blocks and checks their table entries;
    /// `-r all` grows the file over a block past its end.
    fn check_refcount_blocks(
        &mut self,
        refs: &mut References,
        repair: Repair,
        rebuild: &mut bool,
    ) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        for slot in 0..self.stored.table().len() {
            let entry = self.stored.table()[slot];
            let offset = entry & BLOCK_OFFSET_MASK;
            let cluster = offset >> self.cluster_bits();
            if entry & REFCOUNT_TABLE_RESERVED != 0 {
                self.say(format!("ERROR refcount table entry {slot} has reserved bits set"));
                self.block_error(rebuild);
                continue;
            }
            if !self.is_aligned(offset) {
                self.say(format!(
                    "ERROR refcount block {slot} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.block_error(rebuild);
                continue;
            }
            if cluster >= refs.len().0 {
                let fix = repair.fixes_errors();
                self.say(format!(
                    "{} refcount block {slot} is outside image",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                self.report.corruptions += 1;
                self.report.refcount_block_errors += 1;
                if fix {
                    let limit = (refs.len().0 + MAX_GROWTH_CLUSTERS).min(MAX_CLUSTERS);
                    let grown = if cluster < limit {
                        self.file.truncate(self.co, offset + cluster_size)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::FileTooLarge,
                            format!(
                                "the block lies more than {MAX_GROWTH_CLUSTERS} clusters past \
                                 the end of the file"
                            ),
                        ))
                    };
                    match grown {
                        Ok(()) => {
                            self.file_len = self.file.driver().length(self.co)?;
                            refs.grow_to(self.file_clusters());
                            self.report.corruptions -= 1;
                            self.report.corruptions_fixed += 1;
                            self.count_range(refs, offset, cluster_size);
                        }
                        Err(error) => {
                            *rebuild = true;
                            self.say(format!("ERROR could not resize image: {error}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.count_range(refs, offset, cluster_size);
                let count = refs.get(HostCluster(cluster));
                if count != 1 {
                    self.say(format!("ERROR refcount block {slot} refcount={count}"));
                    self.block_error(rebuild);
                }
            }
        }
        Ok(())
    }

    /// Counts a refcount table entry that calls for a rebuild.
    fn block_error(&mut self, rebuild: &mut bool) {
        self.report.corruptions += 1;
        self.report.refcount_block_errors += 1;
        *rebuild = true;
    }

    /// QEMU's `compare_refcounts`: the stored refcount of every cluster against its counted
    /// references, fixing what `repair` allows. A used cluster stored as free calls for a
    /// rebuild. `highest` becomes the last cluster in use or counted.
    fn compare(
        &mut self,
        refs: &References,
        repair: Repair,
        rebuild: &mut bool,
        highest: &mut HostCluster,
    ) {
        for cluster in 0..refs.len().0 {
            let host = HostCluster(cluster);
            let stored = match self.stored.get(self.co, self.file, self.file_len, host) {
                Ok(stored) => stored,
                Err(error) => {
                    self.say(format!("Can't get refcount for cluster {cluster}: {error}"));
                    self.report.check_errors += 1;
                    continue;
                }
            };
            let counted = refs.get(host);
            if stored > 0 || counted > 0 {
                *highest = host;
            }
            if stored == counted {
                continue;
            }
            let fixable = if stored == 0 {
                *rebuild = true;
                false
            } else if stored > counted {
                repair.fixes_leaks()
            } else {
                repair.fixes_errors()
            };
            let verdict = match (fixable, stored < counted) {
                (true, _) => "Repairing",
                (false, true) => "ERROR",
                (false, false) => "Leaked",
            };
            self.say(format!("{verdict} cluster {cluster} refcount={stored} reference={counted}"));
            if fixable && self.stored.set(self.co, self.file, self.file_len, host, counted).is_ok()
            {
                if stored > counted {
                    self.report.leaks_fixed += 1;
                } else {
                    self.report.corruptions_fixed += 1;
                }
                continue;
            }
            if stored < counted {
                self.report.corruptions += 1;
            } else {
                self.report.leaks += 1;
            }
        }
    }

    /// QEMU's `check_oflag_copied`: `OFLAG_COPIED` must be set in the L1 entries of L2
    /// tables and the L2 entries of standard clusters whose refcount is one, and only
    /// there.
    fn check_oflag_copied(&mut self) -> io::Result<()> {
        let repair = match self.repair {
            Repair::All => true,
            // Only when the refcounts are known to be right.
            Repair::Leaks => {
                self.report.check_errors + self.report.corruptions + self.report.leaks == 0
            }
            Repair::None => false,
        };
        let verdict = if repair { "Repairing" } else { "ERROR" };
        let (bits, cluster_size) = (self.cluster_bits(), self.cluster_size());
        let l1 = self.read_l1((self.header.l1_table_offset.0, self.header.l1_size))?;
        for (index, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let l2_cluster = HostCluster(l2_offset >> bits);
            let Ok(refcount) = self.stored.get(self.co, self.file, self.file_len, l2_cluster)
            else {
                continue;
            };
            if (refcount == 1) != (l1_entry & COPIED != 0) {
                self.report.corruptions += 1;
                self.report.oflag_copied_mismatches += 1;
                self.say(format!(
                    "{verdict} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={l1_entry:x} \
                     refcount={refcount}"
                ));
                if repair {
                    let fixed = if refcount == 1 { l1_entry | COPIED } else { l1_entry & !COPIED };
                    let at = self.header.l1_table_offset.0 + index as u64 * 8;
                    write_at(self.co, self.file, at, &fixed.to_be_bytes()).inspect_err(|_| {
                        self.report.check_errors += 1;
                    })?;
                    self.report.corruptions -= 1;
                    self.report.corruptions_fixed += 1;
                }
            }
            let mut table = self.read_table(l2_offset, cluster_size).inspect_err(|error| {
                self.messages.push(format!("ERROR: Could not read L2 table: {error}"));
                self.report.check_errors += 1;
            })?;
            let mut changed = 0;
            for entry in table.iter_mut().step_by(self.header.geometry.l2_slot(1)) {
                let data = *entry & OFFSET_MASK;
                if *entry & COMPRESSED != 0 || data == 0 {
                    continue;
                }
                let data_cluster = HostCluster(data >> bits);
                let Ok(refcount) = self.stored.get(self.co, self.file, self.file_len, data_cluster)
                else {
                    continue;
                };
                if (refcount == 1) != (*entry & COPIED != 0) {
                    self.report.corruptions += 1;
                    self.report.oflag_copied_mismatches += 1;
                    self.messages.push(format!(
                        "{verdict} OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                        *entry
                    ));
                    if repair {
                        *entry = if refcount == 1 { *entry | COPIED } else { *entry & !COPIED };
                        changed += 1;
                    }
                }
            }
            if changed > 0 {
                write_at(self.co, self.file, l2_offset, &encode_table(&table)).inspect_err(
                    |error| {
                        self.messages.push(format!("ERROR: Could not write L2 table: {error}"));
                        self.report.check_errors += 1;
                    },
                )?;
                self.report.corruptions -= changed;
                self.report.corruptions_fixed += changed;
            }
        }
        if repair {
            self.file.flush(self.co)?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_mark_clean` and `qcow2_mark_consistent`: a repair that left no errors
    /// clears the dirty and corrupt bits.
    fn mark_clean(&mut self) -> io::Result<()> {
        let features = self.header.incompatible_features;
        if features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) == 0 {
            return Ok(());
        }
        self.file.flush(self.co)?;
        let cleared = features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        write_at(self.co, self.file, field::INCOMPATIBLE_FEATURES as u64, &cleared.to_be_bytes())?;
        self.file.flush(self.co)
    }
}
