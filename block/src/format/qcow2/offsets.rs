//! Offsets and cluster numbers that the type system keeps apart: a guest offset (a byte of
//! the virtual disk) can never be passed where a host offset (a byte of the image file) is
//! meant, a guest cluster where a host cluster is, and offsets are told from cluster
//! numbers and cluster numbers from cluster counts (imago's `types.rs` draws the same
//! lines). Arithmetic on offsets is checked: an overflow is `None`, never a wrap. A cluster
//! number plus a count of clusters adds plainly: cluster numbers are offsets divided by at
//! least 512, far from the end of a `u64`.
//!
//! ```
//! use aiocoro_block::qcow2::{ClusterCount, Geometry, GuestCluster, GuestOffset};
//!
//! let geometry = Geometry::new(16);
//! let cluster = geometry.cluster_of(GuestOffset(3 << 16)) + ClusterCount(2);
//! assert_eq!(cluster, GuestCluster(5));
//! ```
//!
//! A host cluster does not pass for a guest cluster:
//!
//! ```compile_fail
//! use aiocoro_block::qcow2::{ClusterCount, Geometry, GuestCluster, HostOffset};
//!
//! let geometry = Geometry::new(16);
//! let cluster: GuestCluster = geometry.host_cluster_of(HostOffset(3 << 16)) + ClusterCount(2);
//! ```

use std::fmt;
use std::ops::{Add, Sub};

/// A byte offset in the virtual disk the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (the `file` child).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The number of a guest cluster: guest offset divided by the cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// The number of a host cluster: host offset divided by the cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

/// A number of clusters: the length of a run of guest clusters or of host clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterCount(pub u64);

impl GuestOffset {
    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<GuestOffset> {
        self.0.checked_add(bytes).map(GuestOffset)
    }

    /// The bytes from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_distance_from(self, earlier: GuestOffset) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }
}

impl HostOffset {
    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<HostOffset> {
        self.0.checked_add(bytes).map(HostOffset)
    }
}

impl GuestCluster {
    /// The next cluster, or `None` on overflow.
    pub fn checked_next(self) -> Option<GuestCluster> {
        self.0.checked_add(1).map(GuestCluster)
    }
}

impl Add<ClusterCount> for GuestCluster {
    type Output = GuestCluster;

    /// The guest cluster `count` clusters on.
    fn add(self, count: ClusterCount) -> GuestCluster {
        GuestCluster(self.0 + count.0)
    }
}

impl Add<ClusterCount> for HostCluster {
    type Output = HostCluster;

    /// The host cluster `count` clusters on.
    fn add(self, count: ClusterCount) -> HostCluster {
        HostCluster(self.0 + count.0)
    }
}

impl Sub for HostCluster {
    type Output = ClusterCount;

    /// The clusters from `earlier` to `self`.
    ///
    /// # Panics
    ///
    /// In debug builds, if `earlier` is later.
    fn sub(self, earlier: HostCluster) -> ClusterCount {
        ClusterCount(self.0 - earlier.0)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host offset {:#x}", self.0)
    }
}

impl fmt::Display for GuestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest cluster {}", self.0)
    }
}

impl fmt::Display for HostCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host cluster {}", self.0)
    }
}

/// The shape of an image's address translation: the cluster size and how many entries an
/// L2 table holds. Turns guest offsets into cluster indices and table positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    /// Extended L2 entries: 16 bytes, the usual entry and a bitmap of 32 subclusters.
    extended_l2: bool,
}

/// The subclusters of a cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Where a guest cluster's entry is: the L1 index (which L2 table) and the index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TablePosition {
    /// The entry of the L1 table.
    pub l1_index: u64,
    /// The entry of the L2 table.
    pub l2_index: usize,
}

/// The part of a guest request that one L2 table maps: from the request's first byte to its
/// end or to the end of that table, whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableSpan {
    /// Where the first cluster's L2 entry is.
    pub(crate) position: TablePosition,
    /// How far into its first cluster the span starts.
    pub(crate) in_cluster: u64,
    /// The span's length in bytes.
    pub(crate) len: u64,
    /// How many clusters (L2 entries from `position`) it touches.
    pub(crate) clusters: ClusterCount,
    /// The cluster size in bytes.
    cluster_size: u64,
}

impl TableSpan {
    /// The bytes of the span that its first `count` clusters hold.
    pub(crate) fn len_in(&self, count: ClusterCount) -> u64 {
        self.len.min(count.0 * self.cluster_size - self.in_cluster)
    }
}

impl Geometry {
    /// The geometry of clusters of `1 << cluster_bits` bytes with 8-byte L2 entries.
    ///
    /// # Panics
    ///
    /// If `cluster_bits` is outside 9..=21 (the header parser refuses those first).
    pub fn new(cluster_bits: u32) -> Geometry {
        assert!(
            (9..=21).contains(&cluster_bits),
            "qcow2: Geometry::new: cluster_bits {cluster_bits} is outside 9..=21"
        );
        Geometry { cluster_bits, extended_l2: false }
    }

    /// The geometry of clusters of `1 << cluster_bits` bytes with extended (16-byte) L2
    /// entries: 32 subclusters a cluster.
    ///
    /// # Panics
    ///
    /// If `cluster_bits` is outside 14..=21 (subclusters of 512 B to 64 KiB; the header
    /// parser refuses those first).
    pub fn extended(cluster_bits: u32) -> Geometry {
        assert!(
            (14..=21).contains(&cluster_bits),
            "qcow2: Geometry::extended: cluster_bits {cluster_bits} is outside 14..=21"
        );
        Geometry { cluster_bits, extended_l2: true }
    }

    /// Whether L2 entries are extended (each cluster has 32 subclusters).
    pub fn has_subclusters(&self) -> bool {
        self.extended_l2
    }

    /// log2 of the subcluster size (the cluster size without extended L2 entries).
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.cluster_bits
        }
    }

    /// The subcluster size in bytes (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }

    /// Where the entry of L2 index `index` is in a table decoded to 64-bit words (its bitmap,
    /// with extended L2 entries, is the next word).
    pub fn l2_slot(&self, index: usize) -> usize {
        index << u32::from(self.extended_l2)
    }

    /// The 64-bit words of an L2 table (one cluster).
    pub fn l2_words(&self) -> usize {
        1 << (self.cluster_bits - 3)
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the entries of an L2 table (one cluster of 8-byte entries, or 16-byte ones
    /// when extended).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3 - u32::from(self.extended_l2)
    }

    /// The entries of an L2 table.
    pub fn l2_entries(&self) -> usize {
        1 << self.l2_bits()
    }

    /// The bytes of the virtual disk one L2 table maps.
    pub fn bytes_per_l2(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// The cluster holding `offset`.
    pub fn cluster_of(&self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits)
    }

    /// The first byte of `cluster`, or `None` past the largest offset.
    pub fn cluster_start(&self, cluster: GuestCluster) -> Option<GuestOffset> {
        cluster.0.checked_mul(self.cluster_size()).map(GuestOffset)
    }

    /// The host cluster holding `offset`.
    pub fn host_cluster_of(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    /// The first byte of host `cluster` (a cluster of the file, so its offset fits).
    pub fn host_cluster_start(&self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0 << self.cluster_bits)
    }

    /// The bytes of `count` clusters.
    pub fn bytes_of(&self, count: ClusterCount) -> u64 {
        count.0 << self.cluster_bits
    }

    /// How far into its cluster `offset` is.
    pub fn offset_in_cluster(&self, offset: GuestOffset) -> u64 {
        offset.0 & (self.cluster_size() - 1)
    }

    /// Whether a host offset starts a cluster.
    pub fn is_cluster_aligned(&self, offset: HostOffset) -> bool {
        offset.0 & (self.cluster_size() - 1) == 0
    }

    /// Where `cluster`'s L2 entry lives.
    pub fn position(&self, cluster: GuestCluster) -> TablePosition {
        TablePosition {
            l1_index: cluster.0 >> self.l2_bits(),
            l2_index: (cluster.0 & (self.l2_entries() as u64 - 1)) as usize,
        }
    }

    /// The part of a request of `len` bytes from `offset` inside the L2 table of its first
    /// cluster.
    pub(crate) fn table_span(&self, offset: GuestOffset, len: u64) -> TableSpan {
        let position = self.position(self.cluster_of(offset));
        let in_cluster = self.offset_in_cluster(offset);
        let table_end = (position.l1_index + 1).saturating_mul(self.bytes_per_l2());
        let len = len.min(table_end - offset.0);
        let cluster_size = self.cluster_size();
        let clusters = ClusterCount((in_cluster + len).div_ceil(cluster_size));
        TableSpan { position, in_cluster, len, clusters, cluster_size }
    }

    /// The L1 entries needed to map `virtual_size` bytes (QEMU's `size_to_l1`).
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.bytes_per_l2())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_64k_clusters() {
        let geometry = Geometry::new(16);
        assert_eq!(geometry.l2_entries(), 8192);
        assert_eq!(geometry.bytes_per_l2(), 512 << 20);
        let offset = GuestOffset((512 << 20) + 3 * 65536 + 17);
        let cluster = geometry.cluster_of(offset);
        assert_eq!(geometry.position(cluster), TablePosition { l1_index: 1, l2_index: 3 });
        assert_eq!(geometry.offset_in_cluster(offset), 17);
        assert_eq!(geometry.cluster_start(cluster), Some(GuestOffset((512 << 20) + 3 * 65536)));
        assert_eq!(geometry.l1_entries_for(0), 0);
        assert_eq!(geometry.l1_entries_for(1), 1);
        assert_eq!(geometry.l1_entries_for(512 << 20), 1);
        assert_eq!(geometry.l1_entries_for((512 << 20) + 1), 2);
    }

    #[test]
    fn extended_entries_halve_what_a_table_maps() {
        let geometry = Geometry::extended(16);
        assert!(geometry.has_subclusters() && !Geometry::new(16).has_subclusters());
        assert_eq!((geometry.l2_entries(), geometry.l2_words()), (4096, 8192));
        assert_eq!(geometry.bytes_per_l2(), 256 << 20);
        assert_eq!(
            (geometry.subcluster_size(), Geometry::new(16).subcluster_size()),
            (2048, 65536)
        );
        assert_eq!((geometry.l2_slot(3), Geometry::new(16).l2_slot(3)), (6, 3));
        let offset = GuestOffset((256 << 20) + 5 * 65536);
        let position = geometry.position(geometry.cluster_of(offset));
        assert_eq!(position, TablePosition { l1_index: 1, l2_index: 5 });
        assert_eq!(geometry.l1_entries_for((256 << 20) + 1), 2);
    }

    #[test]
    fn a_span_stops_at_the_end_of_its_l2_table() {
        let geometry = Geometry::new(16);
        let span = geometry.table_span(GuestOffset((512 << 20) - 65536 - 100), 1 << 20);
        assert_eq!((span.in_cluster, span.len, span.clusters), (65436, 65636, ClusterCount(2)));
        assert_eq!((span.len_in(ClusterCount(1)), span.len_in(ClusterCount(2))), (100, 65636));
        let span = geometry.table_span(GuestOffset(10), 20);
        assert_eq!(
            (span.len, span.clusters, span.len_in(ClusterCount(1))),
            (20, ClusterCount(1), 20)
        );
    }

    #[test]
    fn host_clusters_and_counts_convert_through_the_geometry() {
        let geometry = Geometry::new(16);
        let cluster = geometry.host_cluster_of(HostOffset(3 * 65536 + 5));
        assert_eq!(cluster, HostCluster(3));
        assert_eq!(geometry.host_cluster_start(cluster + ClusterCount(2)), HostOffset(5 * 65536));
        assert_eq!(GuestCluster(7) + ClusterCount(3), GuestCluster(10));
        assert_eq!(HostCluster(9) - HostCluster(4), ClusterCount(5));
        assert_eq!(geometry.bytes_of(ClusterCount(3)), 3 * 65536);
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(GuestOffset(u64::MAX).checked_add(1), None);
        assert_eq!(HostOffset(u64::MAX - 1).checked_add(1), Some(HostOffset(u64::MAX)));
        assert_eq!(GuestCluster(u64::MAX).checked_next(), None);
        assert_eq!(Geometry::new(21).cluster_start(GuestCluster(u64::MAX)), None);
        assert_eq!(GuestOffset(5).checked_distance_from(GuestOffset(7)), None);
    }
}
