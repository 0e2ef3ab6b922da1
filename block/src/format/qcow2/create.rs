//! Creating an image (QEMU's `qcow2_co_create`): the header with its extensions and backing
//! file name in cluster 0, then the refcount table, the refcount blocks that count every
//! cluster written here, and an empty L1 table sized for the virtual disk.

use std::io;
use std::path::Path;

use aiocoro::coroutine::Co;

use super::header::{
    Compression, EXT_BACKING_FORMAT, INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2, MAGIC,
    MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, SECTOR_SIZE, V2_HEADER_LEN, field,
};
use super::io::write_at;
use super::offsets::Geometry;
use super::refcount::set_entry;
use super::table::encode_table;
use crate::block_graph::BlockGraph;
use crate::error::invalid_input;
use crate::node::BlockNode;

/// The version 3 header length QEMU writes (with the compression type byte and padding).
const WRITTEN_V3_HEADER_LEN: usize = 112;

/// The on-disk format version (`compat=` in qemu-img's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`compat=0.10`): 16-bit refcounts, no zero clusters, no lazy refcounts.
    V2,
    /// Version 3 (`compat=1.1`), the default.
    V3,
}

/// What [`create`] makes (qemu-img's `-o` options for qcow2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// The virtual disk size in bytes: a multiple of [`SECTOR_SIZE`].
    pub size: u64,
    /// A power of two from 512 B to 2 MiB; 64 KiB by default.
    pub cluster_size: u64,
    /// The format version.
    pub compat: Compat,
    /// The refcount width in bits: a power of two from 1 to 64 (16 for version 2).
    pub refcount_bits: u32,
    /// Sets the lazy refcounts feature bit (version 3 only). This driver keeps refcounts
    /// exact anyway and never sets the dirty bit; QEMU may use the bit when it writes the
    /// image.
    pub lazy_refcounts: bool,
    /// The backing file name, stored as given (a relative name is relative to the image).
    pub backing_file: Option<String>,
    /// The backing file's format (`qcow2`, `raw`), stored in a header extension.
    pub backing_format: Option<String>,
    /// How compressed clusters are compressed (qemu-img's `compression_type=zlib|zstd`);
    /// zstd needs version 3.
    pub compression: Compression,
    /// Extended L2 entries (`extended_l2=on`): 32 subclusters a cluster, allocated and
    /// copied on write one by one. Needs version 3 and clusters of at least 16 KiB.
    pub extended_l2: bool,
}

impl CreateOptions {
    /// Options for a `size`-byte image with qemu-img's defaults (64 KiB clusters, compat 1.1,
    /// 16-bit refcounts, no backing file).
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_size: 64 << 10,
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            compression: Compression::Deflate,
            extended_l2: false,
        }
    }

    /// Checks the options and returns the geometry and refcount order they give.
    fn check(&self) -> io::Result<(Geometry, u32)> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(invalid_input(format!(
                "qcow2: cluster_size {cs} must be a power of two from 512 to 2M"
            )));
        }
        let bits = self.refcount_bits;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(invalid_input(format!(
                "qcow2: refcount_bits {bits} must be a power of two from 1 to 64"
            )));
        }
        if self.compat == Compat::V2 && bits != 16 {
            return Err(invalid_input("qcow2: compat=0.10 needs refcount_bits=16"));
        }
        if self.compat == Compat::V2 && self.compression != Compression::Deflate {
            return Err(invalid_input("qcow2: compression_type=zstd needs compat=1.1"));
        }
        if self.compat == Compat::V2 && self.lazy_refcounts {
            return Err(invalid_input("qcow2: lazy refcounts need compat=1.1"));
        }
        if self.size > i64::MAX as u64 {
            return Err(invalid_input(format!("qcow2: the size {} is too large", self.size)));
        }
        if !self.size.is_multiple_of(SECTOR_SIZE) {
            return Err(invalid_input(format!(
                "qcow2: the size {} is not a multiple of {SECTOR_SIZE} bytes (the virtual size \
                 is whole sectors; qemu-img create rounds it up)",
                self.size
            )));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(invalid_input("qcow2: a backing format without a backing file"));
        }
        if self.backing_format.as_ref().is_some_and(|format| format.len() > 15) {
            return Err(invalid_input("qcow2: the backing format name is longer than 15 bytes"));
        }
        if self.backing_file.as_ref().is_some_and(|name| name.is_empty() || name.len() > 1023) {
            return Err(invalid_input("qcow2: the backing file name must be 1 to 1023 bytes"));
        }
        if self.extended_l2 && (self.compat == Compat::V2 || cs < 16 << 10) {
            return Err(invalid_input(
                "qcow2: extended_l2 needs compat=1.1 and a cluster_size of at least 16K",
            ));
        }
        let geometry = if self.extended_l2 {
            Geometry::extended(cs.trailing_zeros())
        } else {
            Geometry::new(cs.trailing_zeros())
        };
        Ok((geometry, bits.trailing_zeros()))
    }

    /// The header cluster's bytes, given where the tables are.
    fn header(&self, geometry: Geometry, order: u32, layout: &Layout) -> io::Result<Vec<u8>> {
        let cs = geometry.cluster_size();
        let mut h = vec![0u8; cs as usize];
        let put32 =
            |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        h[..4].copy_from_slice(&MAGIC);
        put32(&mut h, field::VERSION, if self.compat == Compat::V2 { 2 } else { 3 });
        put32(&mut h, field::CLUSTER_BITS, geometry.cluster_bits());
        put64(&mut h, field::SIZE, self.size);
        put32(&mut h, field::L1_SIZE, layout.l1_size);
        put64(&mut h, field::L1_TABLE_OFFSET, layout.l1_cluster * cs);
        put64(&mut h, field::REFCOUNT_TABLE_OFFSET, cs);
        put32(&mut h, field::REFCOUNT_TABLE_CLUSTERS, layout.table_clusters as u32);
        let mut at = V2_HEADER_LEN;
        if self.compat == Compat::V3 {
            let mut incompatible = if self.extended_l2 { INCOMPAT_EXTENDED_L2 } else { 0 };
            if self.compression != Compression::Deflate {
                incompatible |= INCOMPAT_COMPRESSION;
                h[field::COMPRESSION_TYPE] = self.compression.type_byte();
            }
            put64(&mut h, field::INCOMPATIBLE_FEATURES, incompatible);
            put64(&mut h, field::COMPATIBLE_FEATURES, u64::from(self.lazy_refcounts));
            put32(&mut h, field::REFCOUNT_ORDER, order);
            put32(&mut h, field::HEADER_LENGTH, WRITTEN_V3_HEADER_LEN as u32);
            at = WRITTEN_V3_HEADER_LEN;
        }
        let overflow = || {
            invalid_input(format!(
                "qcow2: the header, extensions and backing file name do not fit a {cs}-byte \
                 cluster"
            ))
        };
        if let Some(format) = &self.backing_format {
            let padded = format.len().next_multiple_of(8);
            if at + 8 + padded > h.len() {
                return Err(overflow());
            }
            put32(&mut h, at, EXT_BACKING_FORMAT);
            put32(&mut h, at + 4, format.len() as u32);
            h[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
            at += 8 + padded;
        }
        if self.compat == Compat::V3 {
            at += 8; // The end of the extensions (type 0, length 0).
        }
        if let Some(name) = &self.backing_file {
            if at + name.len() > h.len() {
                return Err(overflow());
            }
            put64(&mut h, field::BACKING_FILE_OFFSET, at as u64);
            put32(&mut h, field::BACKING_FILE_SIZE, name.len() as u32);
            h[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(h)
    }
}

/// Where the tables of a new image go, in clusters.
#[derive(Debug)]
struct Layout {
    l1_size: u32,
    l1_cluster: u64,
    l1_clusters: u64,
    table_clusters: u64,
    blocks: u64,
}

impl Layout {
    /// Header at cluster 0, refcount table from cluster 1, then the refcount blocks, then
    /// the L1 table (QEMU's layout for small images).
    fn new(geometry: Geometry, order: u32, size: u64) -> io::Result<Layout> {
        let cs = geometry.cluster_size();
        let l1_size = geometry.l1_entries_for(size);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid_input(format!(
                "qcow2: {size} bytes need an L1 table larger than {MAX_L1_BYTES} bytes; use \
                 larger clusters"
            )));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let per_block = (cs * 8) >> order;
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + table_clusters + blocks + l1_clusters;
            let new_blocks = total.div_ceil(per_block);
            let new_table = (new_blocks * 8).div_ceil(cs);
            if (new_blocks, new_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (new_blocks, new_table);
        }
        if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid_input("qcow2: the image needs too large a refcount table"));
        }
        Ok(Layout {
            l1_size: l1_size as u32,
            l1_cluster: 1 + table_clusters + blocks,
            l1_clusters,
            table_clusters,
            blocks,
        })
    }
}

/// Writes a new, empty image to `file` (truncated first), as `qemu-img create -f qcow2`
/// does: `qemu-img check` finds no errors and no leaks in it.
///
/// # Errors
///
/// `InvalidInput` for bad options (saying which); the file's write or truncate error.
pub fn create(co: &Co, file: &BlockNode, options: &CreateOptions) -> io::Result<()> {
    write_image(co, file, &Plan::new(options)?)
}

/// A new image, its options checked: where its tables go and its header.
struct Plan {
    geometry: Geometry,
    order: u32,
    layout: Layout,
    header: Vec<u8>,
}

impl Plan {
    /// Checks `options` and lays the image out.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for bad options (saying which).
    fn new(options: &CreateOptions) -> io::Result<Plan> {
        let (geometry, order) = options.check()?;
        let layout = Layout::new(geometry, order, options.size)?;
        let header = options.header(geometry, order, &layout)?;
        Ok(Plan { geometry, order, layout, header })
    }
}

/// Writes the image `plan` lays out to `file` (truncated first).
///
/// # Errors
///
/// The file's write or truncate error.
fn write_image(co: &Co, file: &BlockNode, plan: &Plan) -> io::Result<()> {
    let Plan { geometry, order, ref layout, ref header } = *plan;
    let cs = geometry.cluster_size();
    let used = layout.l1_cluster + layout.l1_clusters;
    let per_block = (cs * 8) >> order;

    file.truncate(co, 0)?;
    let block_offsets: Vec<u64> =
        (0..layout.blocks).map(|n| (1 + layout.table_clusters + n) * cs).collect();
    let mut table = encode_table(&block_offsets);
    table.resize((layout.table_clusters * cs) as usize, 0);
    let mut blocks = vec![0u8; (layout.blocks * cs) as usize];
    for cluster in 0..used {
        let block = &mut blocks[((cluster / per_block) * cs) as usize..][..cs as usize];
        set_entry(block, order, (cluster % per_block) as usize, 1);
    }
    write_at(co, file, cs, &table)?;
    write_at(co, file, (1 + layout.table_clusters) * cs, &blocks)?;
    write_at(co, file, layout.l1_cluster * cs, &vec![0u8; (layout.l1_clusters * cs) as usize])?;
    file.flush(co)?;
    // The header last: an interrupted create leaves no image that looks valid.
    write_at(co, file, 0, header)?;
    file.flush(co)
}

/// [`create`] into the file at `path` (created, or truncated if it exists). Options that
/// [`create`] refuses leave the file as it was.
///
/// # Errors
///
/// As [`create`], and the error of opening the file.
pub fn create_file(co: &Co, path: &Path, options: &CreateOptions) -> io::Result<()> {
    let plan = Plan::new(options)?;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    let graph = BlockGraph::new();
    let mut file = crate::options::BlockOptions::default();
    file.set("driver", "file")?;
    file.set("filename", &path.to_string_lossy())?;
    let (_, node) = crate::options::open_options(co, &graph, &file)?;
    write_image(co, &node, &plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_count_themselves() {
        let layout = Layout::new(Geometry::new(16), 4, 1 << 30).unwrap();
        assert_eq!(
            (layout.table_clusters, layout.blocks, layout.l1_cluster, layout.l1_clusters),
            (1, 1, 3, 1)
        );
        // 512-byte clusters of 64-bit refcounts: 64 per block; a 1 TiB disk needs 2^15
        // L1 entries = 512 clusters of L1.
        let layout = Layout::new(Geometry::new(9), 6, 1 << 40).unwrap_err();
        assert!(layout.to_string().contains("L1 table"));
        let layout = Layout::new(Geometry::new(9), 6, 16 << 30).unwrap();
        let total = 1 + layout.table_clusters + layout.blocks + layout.l1_clusters;
        assert!(layout.blocks * 64 >= total && layout.table_clusters * 64 >= layout.blocks);
    }
}
