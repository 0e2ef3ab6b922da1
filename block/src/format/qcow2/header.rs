//! The qcow2 header (versions 2 and 3), its extensions and feature bits, parsed and checked
//! against the file's length before anything else of the image is trusted.

use std::fmt;
use std::io;

use super::offsets::{Geometry, HostOffset};
use super::{corrupt, refuse};

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// The length of a version 2 header (and of the fields every version shares).
pub(crate) const V2_HEADER_LEN: usize = 72;
/// The shortest version 3 header.
const MIN_V3_HEADER_LEN: usize = 104;
/// QEMU's sector: the unit of the virtual size (kept in whole sectors) and of the lengths of
/// compressed clusters.
pub const SECTOR_SIZE: u64 = 512;
/// The largest L1 table QEMU opens (32 MiB of entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table QEMU opens (8 MiB).
pub(crate) const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// The most snapshots QEMU opens.
const MAX_SNAPSHOTS: u32 = 65536;
/// The longest backing file name the format allows.
const MAX_BACKING_NAME: u64 = 1023;
/// The longest backing format name QEMU reads (its buffer holds 16 bytes with the NUL).
const MAX_BACKING_FORMAT: u32 = 15;

/// Header extension types.
const EXT_END: u32 = 0;
/// The backing file format name extension.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// The persistent bitmaps extension.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear feature bit 0: the bitmaps extension is valid.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Incompatible feature bit 0: the refcounts may be stale (lazy refcounts were in use).
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt: refused for writing until repaired.
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Other incompatible feature bits.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Compatible feature bits.
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// The byte offsets of the header fields after the magic (big-endian; `u32` or `u64` as the
/// spec says), for the parser and for the code that writes fields (create, resize, the
/// refcount table).
pub(crate) mod field {
    /// `version` (u32).
    pub(crate) const VERSION: usize = 4;
    /// `backing_file_offset` (u64).
    pub(crate) const BACKING_FILE_OFFSET: usize = 8;
    /// `backing_file_size` (u32).
    pub(crate) const BACKING_FILE_SIZE: usize = 16;
    /// `cluster_bits` (u32).
    pub(crate) const CLUSTER_BITS: usize = 20;
    /// `size`, the virtual disk size (u64).
    pub(crate) const SIZE: usize = 24;
    /// `crypt_method` (u32).
    pub(crate) const CRYPT_METHOD: usize = 32;
    /// `l1_size` (u32), right before the L1 table offset.
    pub(crate) const L1_SIZE: usize = 36;
    /// `l1_table_offset` (u64).
    pub(crate) const L1_TABLE_OFFSET: usize = 40;
    /// `refcount_table_offset` (u64), right before the refcount table's cluster count.
    pub(crate) const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `refcount_table_clusters` (u32).
    pub(crate) const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `nb_snapshots` (u32).
    pub(crate) const NB_SNAPSHOTS: usize = 60;
    /// `snapshots_offset` (u64).
    pub(crate) const SNAPSHOTS_OFFSET: usize = 64;
    /// `incompatible_features` (u64, version 3).
    pub(crate) const INCOMPATIBLE_FEATURES: usize = 72;
    /// `compatible_features` (u64, version 3).
    pub(crate) const COMPATIBLE_FEATURES: usize = 80;
    /// `autoclear_features` (u64, version 3).
    pub(crate) const AUTOCLEAR_FEATURES: usize = 88;
    /// `refcount_order` (u32, version 3).
    pub(crate) const REFCOUNT_ORDER: usize = 96;
    /// `header_length` (u32, version 3).
    pub(crate) const HEADER_LENGTH: usize = 100;
    /// `compression_type` (one byte, present if `header_length` covers it).
    pub(crate) const COMPRESSION_TYPE: usize = 104;
}

/// How compressed clusters are compressed (the header's `compression_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Raw deflate (the default, "zlib" in the spec and in qemu-img's options).
    #[default]
    Deflate,
    /// Zstandard (`compression_type=zstd`: type 1, with incompatible feature bit 3).
    Zstd,
}

impl Compression {
    /// The name qemu-img gives it (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Deflate => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    /// The header's `compression_type` byte.
    pub(crate) fn type_byte(self) -> u8 {
        match self {
            Compression::Deflate => 0,
            Compression::Zstd => 1,
        }
    }
}

/// Which feature bitmap a feature name belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
}

/// An entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap.
    pub kind: FeatureKind,
    /// The bit number (0..=63).
    pub bit: u8,
    /// The name the image gives it.
    pub name: String,
}

/// The persistent bitmaps extension: where the bitmap directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// How many bitmaps the directory lists.
    pub count: u32,
    /// The directory's length in bytes.
    pub directory_size: u64,
    /// Where the directory starts.
    pub directory_offset: HostOffset,
}

/// A parsed and checked qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// The cluster size and table shapes.
    pub geometry: Geometry,
    /// The virtual disk size in bytes: the header's size field in whole sectors of
    /// [`SECTOR_SIZE`] bytes (a remainder is dropped, as QEMU reads the field).
    pub virtual_size: u64,
    /// The backing file name as stored (relative to the image's directory unless absolute).
    pub backing_file: Option<String>,
    /// The backing file's format from the header extension, if any.
    pub backing_format: Option<String>,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table starts.
    pub l1_table_offset: HostOffset,
    /// Where the refcount table starts.
    pub refcount_table_offset: HostOffset,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: HostOffset,
    /// The incompatible feature bits.
    pub incompatible_features: u64,
    /// The compatible feature bits.
    pub compatible_features: u64,
    /// The auto-clear feature bits.
    pub autoclear_features: u64,
    /// The header's length in bytes (72 for version 2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// The feature name table, if the image has one.
    pub feature_names: Vec<FeatureName>,
    /// The persistent bitmaps extension, if the image has one (it is valid only while the
    /// autoclear bit 0 is set).
    pub bitmaps: Option<BitmapsExtension>,
}

/// Big-endian field readers over a byte slice known to be long enough (the header, the
/// snapshot table's and the bitmap directory's fixed entry parts).
pub(super) struct Fields<'a>(pub(super) &'a [u8]);

impl Fields<'_> {
    pub(super) fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.0[at..at + 2].try_into().expect("a 2-byte slice is a [u8; 2]"))
    }

    pub(super) fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.0[at..at + 4].try_into().expect("a 4-byte slice is a [u8; 4]"))
    }

    pub(super) fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.0[at..at + 8].try_into().expect("an 8-byte slice is a [u8; 8]"))
    }
}

impl Header {
    /// How many bytes [`Header::parse`] needs to see at least: the fixed fields of any
    /// version. The whole first cluster is needed for extensions and the backing name.
    pub const PROBE_LEN: usize = MIN_V3_HEADER_LEN;

    /// Whether `bytes` start with the qcow2 magic.
    pub fn has_magic(bytes: &[u8]) -> bool {
        bytes.starts_with(&MAGIC)
    }

    /// The cluster size a header claims, read before the rest (to know how much of the
    /// file is the first cluster). `None` if `bytes` are too short or not qcow2.
    pub fn peek_cluster_bits(bytes: &[u8]) -> Option<u32> {
        (bytes.len() >= field::CLUSTER_BITS + 4 && Header::has_magic(bytes))
            .then(|| Fields(bytes).u32(field::CLUSTER_BITS))
    }

    /// Parses the header from `first_cluster` (the first cluster of the file, or all of it if
    /// the file is shorter) and checks it against `file_len`, the image file's length.
    ///
    /// # Errors
    ///
    /// `InvalidData` naming the field and the values for what is malformed or points outside
    /// the file; `Unsupported` naming the feature for what this driver does not implement
    /// (encryption, an external data file, compression types other than zlib and zstd,
    /// unknown incompatible features, a version other than 2 and 3). An image marked corrupt parses: it may be
    /// read and checked, not written (see [`Header::is_marked_corrupt`]).
    pub fn parse(first_cluster: &[u8], file_len: u64) -> io::Result<Header> {
        if first_cluster.len() < V2_HEADER_LEN {
            return Err(corrupt(format!(
                "the file has {} bytes, fewer than the {V2_HEADER_LEN} of a qcow2 header",
                first_cluster.len()
            )));
        }
        if !Header::has_magic(first_cluster) {
            return Err(corrupt(format!(
                "not a qcow2 image: the magic is {:02x?}, not {:02x?}",
                &first_cluster[..4],
                MAGIC
            )));
        }
        let f = Fields(first_cluster);
        let version = f.u32(field::VERSION);
        if version != 2 && version != 3 {
            return Err(refuse(format!("qcow2 version {version} (only 2 and 3 are supported)")));
        }
        let cluster_bits = f.u32(field::CLUSTER_BITS);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits is {cluster_bits}; it must be 9..=21 (512 B to 2 MiB clusters)"
            )));
        }
        let geometry = Geometry::new(cluster_bits);
        let cluster_size = geometry.cluster_size();
        let cluster = &first_cluster[..first_cluster.len().min(cluster_size as usize)];

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_LEN as u32)
        } else {
            if cluster.len() < MIN_V3_HEADER_LEN {
                return Err(corrupt(format!(
                    "a version 3 header needs {MIN_V3_HEADER_LEN} bytes; the file has {}",
                    cluster.len()
                )));
            }
            (
                f.u64(field::INCOMPATIBLE_FEATURES),
                f.u64(field::COMPATIBLE_FEATURES),
                f.u64(field::AUTOCLEAR_FEATURES),
                f.u32(field::REFCOUNT_ORDER),
                f.u32(field::HEADER_LENGTH),
            )
        };
        if version == 3
            && (header_length < MIN_V3_HEADER_LEN as u32
                || header_length % 8 != 0
                || u64::from(header_length) > cluster_size)
        {
            return Err(corrupt(format!(
                "header_length is {header_length}; it must be a multiple of 8 from \
                 {MIN_V3_HEADER_LEN} to the cluster size {cluster_size}"
            )));
        }
        if header_length as usize > cluster.len() {
            return Err(corrupt(format!(
                "header_length {header_length} runs past the end of the file ({file_len} bytes)"
            )));
        }
        if refcount_order > 6 {
            return Err(corrupt(format!("refcount_order is {refcount_order}; at most 6")));
        }

        let mut header = Header {
            version,
            geometry,
            virtual_size: f.u64(field::SIZE) / SECTOR_SIZE * SECTOR_SIZE,
            backing_file: None,
            backing_format: None,
            l1_size: f.u32(field::L1_SIZE),
            l1_table_offset: HostOffset(f.u64(field::L1_TABLE_OFFSET)),
            refcount_table_offset: HostOffset(f.u64(field::REFCOUNT_TABLE_OFFSET)),
            refcount_table_clusters: f.u32(field::REFCOUNT_TABLE_CLUSTERS),
            refcount_order,
            nb_snapshots: f.u32(field::NB_SNAPSHOTS),
            snapshots_offset: HostOffset(f.u64(field::SNAPSHOTS_OFFSET)),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            header_length,
            compression: Compression::Deflate,
            feature_names: Vec::new(),
            bitmaps: None,
        };

        let backing_file_offset = f.u64(field::BACKING_FILE_OFFSET);
        let backing_file_size = u64::from(f.u32(field::BACKING_FILE_SIZE));
        let extensions_end = if backing_file_offset != 0 {
            if backing_file_offset < u64::from(header_length)
                || backing_file_size > MAX_BACKING_NAME
                || backing_file_offset
                    .checked_add(backing_file_size)
                    .is_none_or(|end| end > cluster.len() as u64)
            {
                return Err(corrupt(format!(
                    "the backing file name ({backing_file_size} bytes at byte \
                     {backing_file_offset}) must lie in the first cluster after the header \
                     and be at most {MAX_BACKING_NAME} bytes"
                )));
            }
            let start = backing_file_offset as usize;
            let name = &cluster[start..start + backing_file_size as usize];
            let name = String::from_utf8(name.to_vec()).map_err(|_| {
                refuse(format!("a backing file name that is not UTF-8 ({name:02x?})"))
            })?;
            // An empty name is no backing file (as QEMU reads it).
            header.backing_file = Some(name).filter(|name| !name.is_empty());
            start
        } else {
            cluster.len()
        };
        header.read_extensions(&cluster[..extensions_end])?;
        header.check_features(first_cluster)?;
        header.check_layout(file_len)?;
        Ok(header)
    }

    /// Reads the extensions from the end of the header to `area`'s end.
    fn read_extensions(&mut self, area: &[u8]) -> io::Result<()> {
        let mut at = self.header_length as usize;
        while at + 8 <= area.len() {
            let f = Fields(area);
            let (kind, len) = (f.u32(at), f.u32(at + 4));
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            let Some(data) = data_start
                .checked_add(len as usize)
                .filter(|&end| end <= area.len())
                .map(|end| &area[data_start..end])
            else {
                return Err(corrupt(format!(
                    "header extension {kind:#010x} at byte {at} is {len} bytes long, past the \
                     end of the header area (byte {})",
                    area.len()
                )));
            };
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > MAX_BACKING_FORMAT {
                        return Err(corrupt(format!(
                            "the backing format extension at byte {at} is {len} bytes long; \
                             at most {MAX_BACKING_FORMAT}"
                        )));
                    }
                    let format = String::from_utf8(data.to_vec()).map_err(|_| {
                        corrupt(format!("the backing format at byte {at} is not UTF-8"))
                    })?;
                    self.backing_format = Some(format);
                }
                EXT_FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .filter_map(|entry| {
                            let kind = match entry[0] {
                                0 => FeatureKind::Incompatible,
                                1 => FeatureKind::Compatible,
                                2 => FeatureKind::Autoclear,
                                _ => return None,
                            };
                            let name = &entry[2..];
                            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                            let name = String::from_utf8_lossy(&name[..end]).into_owned();
                            Some(FeatureName { kind, bit: entry[1], name })
                        })
                        .collect();
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(corrupt(format!(
                            "the bitmaps extension at byte {at} is {len} bytes long, not 24"
                        )));
                    }
                    let f = Fields(data);
                    self.bitmaps = Some(BitmapsExtension {
                        count: f.u32(0),
                        directory_size: f.u64(8),
                        directory_offset: HostOffset(f.u64(16)),
                    });
                }
                // The encryption header pointer (encryption is refused anyway), the external
                // data file name (refused with its feature bit) and unknown ones.
                _ => {}
            }
            at = data_start + (len as usize).next_multiple_of(8);
        }
        Ok(())
    }

    /// Refuses what this driver cannot read correctly.
    fn check_features(&mut self, first_cluster: &[u8]) -> io::Result<()> {
        let crypt_method = Fields(first_cluster).u32(field::CRYPT_METHOD);
        match crypt_method {
            0 => {}
            1 => return Err(refuse("encryption (AES, crypt_method 1) is not supported")),
            2 => return Err(refuse("encryption (LUKS, crypt_method 2) is not supported")),
            other => return Err(refuse(format!("encryption (unknown crypt_method {other})"))),
        }
        let incompatible = self.incompatible_features;
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(refuse(
                "an external data file (incompatible feature 'external data file', bit 2) is \
                 not supported",
            ));
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            let bits = self.geometry.cluster_bits();
            if bits < 14 {
                return Err(corrupt(format!(
                    "extended L2 entries (incompatible feature bit 4) need clusters of at least \
                     16384 bytes (512-byte subclusters); this image has {} bytes",
                    self.geometry.cluster_size()
                )));
            }
            self.geometry = Geometry::extended(bits);
        }
        let compression_type = if self.header_length as usize > field::COMPRESSION_TYPE {
            first_cluster[field::COMPRESSION_TYPE]
        } else {
            0
        };
        match (incompatible & INCOMPAT_COMPRESSION != 0, compression_type) {
            (false, 0) => {}
            (false, other) => {
                return Err(corrupt(format!(
                    "compression_type is {other} but the compression type feature bit (3) is \
                     clear"
                )));
            }
            (true, 0) => {
                return Err(corrupt(
                    "the compression type feature bit (3) is set but compression_type is 0",
                ));
            }
            (true, 1) => self.compression = Compression::Zstd,
            (true, other) => {
                return Err(refuse(format!("compression type {other} is not supported")));
            }
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTENDED_L2;
        let unknown = incompatible & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| match self.feature_name(FeatureKind::Incompatible, bit) {
                    Some(name) => format!("'{name}' (bit {bit})"),
                    None => format!("unknown (bit {bit})"),
                })
                .collect();
            return Err(refuse(format!(
                "unsupported incompatible feature(s): {}",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// Checks that the tables lie inside the file, past the header, and have sane sizes.
    fn check_layout(&self, file_len: u64) -> io::Result<()> {
        let cluster_size = self.geometry.cluster_size();
        if self.virtual_size > i64::MAX as u64 {
            return Err(corrupt(format!(
                "the virtual size {} is larger than the largest offset {}",
                self.virtual_size,
                i64::MAX
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "the L1 table has {} entries ({l1_bytes} bytes), more than the {MAX_L1_BYTES} \
                 bytes allowed",
                self.l1_size
            )));
        }
        let needed = self.geometry.l1_entries_for(self.virtual_size);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(format!(
                "the L1 table has {} entries, too few for the virtual size {} ({needed} needed)",
                self.l1_size, self.virtual_size
            )));
        }
        if self.l1_size > 0 {
            self.check_table("L1 table", self.l1_table_offset, l1_bytes, file_len)?;
        }
        let refcount_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if refcount_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(format!(
                "the refcount table has {} clusters ({refcount_bytes} bytes), more than the \
                 {MAX_REFCOUNT_TABLE_BYTES} bytes allowed",
                self.refcount_table_clusters
            )));
        }
        if refcount_bytes == 0 {
            return Err(corrupt("the refcount table has no clusters"));
        }
        self.check_table("refcount table", self.refcount_table_offset, refcount_bytes, file_len)?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "{} snapshots, more than the {MAX_SNAPSHOTS} allowed",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            // Each snapshot entry takes at least 40 bytes.
            let at_least = u64::from(self.nb_snapshots) * 40;
            self.check_table("snapshot table", self.snapshots_offset, at_least, file_len)?;
        }
        Ok(())
    }

    /// Checks a table of `bytes` at `offset`: cluster-aligned, after the first cluster, and
    /// inside the file.
    fn check_table(
        &self,
        what: &str,
        offset: HostOffset,
        bytes: u64,
        file_len: u64,
    ) -> io::Result<()> {
        if !self.geometry.is_cluster_aligned(offset) {
            return Err(corrupt(format!(
                "the {what} at {offset} is not aligned to the cluster size {}",
                self.geometry.cluster_size()
            )));
        }
        if offset.0 < self.geometry.cluster_size() {
            return Err(corrupt(format!("the {what} at {offset} overlaps the header cluster")));
        }
        match offset.checked_add(bytes) {
            Some(end) if end.0 <= file_len => Ok(()),
            _ => Err(corrupt(format!(
                "the {what} ({bytes} bytes at {offset}) ends past the end of the file \
                 ({file_len} bytes)"
            ))),
        }
    }

    /// The name the feature table gives a bit, if any.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|entry| entry.kind == kind && entry.bit == bit)
            .map(|entry| entry.name.as_str())
    }

    /// Whether the dirty bit is set (refcounts may be stale; reads are unaffected).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set (QEMU found the metadata corrupt while writing):
    /// readable, but not to be written until repaired.
    pub fn is_marked_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled (compatible feature bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// The width of a refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The compatibility level as `qemu-img info` names it: `0.10` or `1.1`.
    pub fn compat(&self) -> &'static str {
        if self.version == 2 { "0.10" } else { "1.1" }
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qcow2 v{} ({} bytes, {}-byte clusters, {}-bit refcounts",
            self.version,
            self.virtual_size,
            self.geometry.cluster_size(),
            self.refcount_bits()
        )?;
        if let Some(backing) = &self.backing_file {
            write!(f, ", backing {backing}")?;
        }
        f.write_str(")")
    }
}

impl Header {
    /// Reads and parses the header of the image stored in `file`.
    ///
    /// # Errors
    ///
    /// The read error, or [`Header::parse`]'s.
    pub fn read(co: &aiocoro::coroutine::Co, file: &crate::node::BlockNode) -> io::Result<Header> {
        Header::parse(&Header::read_first_cluster(co, file)?, file.length())
    }

    /// The bytes [`Header::parse`] needs of the image stored in `file`: its first cluster
    /// (as much of it as the file holds), or the fixed fields if the cluster size is absurd.
    ///
    /// # Errors
    ///
    /// The read error.
    pub(crate) fn read_first_cluster(
        co: &aiocoro::coroutine::Co,
        file: &crate::node::BlockNode,
    ) -> io::Result<Vec<u8>> {
        let file_len = file.length();
        let mut first = vec![0u8; file_len.min(Header::PROBE_LEN as u64) as usize];
        super::io::read_exact_at(co, file, 0, &mut first)?;
        if let Some(bits) = Header::peek_cluster_bits(&first).filter(|bits| (9..=21).contains(bits))
        {
            let cluster = file_len.min(1 << bits) as usize;
            if cluster > first.len() {
                first = vec![0u8; cluster];
                super::io::read_exact_at(co, file, 0, &mut first)?;
            }
        }
        Ok(first)
    }
}
