//! Guest data must never land on the image's own metadata (QEMU's
//! `qcow2_check_metadata_overlap`). On a corrupt or hostile image an L2 entry can say "write
//! in place" at an L2 table, or the refcounts can call a table free so that the allocator
//! hands its cluster out; before guest data reaches a host range, that range is checked
//! against the header cluster, the active L1 table, the refcount table, the refcount blocks
//! and the L2 tables, and the request fails, naming what it would have overwritten.
//!
//! The contiguous areas (header, L1 table, refcount table) are compared with where they are
//! now; the scattered tables are kept in a [`TableClusters`] each, built at open from the
//! entries of the table that names them (no extra reads) and updated as tables are added.
//! `Refcounts` keeps its table and blocks, the metadata's writer the L2 tables. A check is a
//! few comparisons and two ordered-map range queries, under the metadata lock the write
//! holds anyway. The same check keeps a flush from dropping a reference that a corrupt L2
//! entry held to a table (see `Metadata::flush`).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use super::corruption::overlap_error;
use super::offsets::{Geometry, GuestOffset, HostCluster};

/// What a host cluster of metadata holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// The header (host cluster 0).
    Header,
    /// The active L1 table.
    L1Table,
    /// The L2 table that L1 entry `l1_index` names.
    L2Table {
        /// The L1 entry.
        l1_index: u64,
    },
    /// The refcount table.
    RefcountTable,
    /// The refcount block that refcount table entry `slot` names.
    RefcountBlock {
        /// The refcount table entry.
        slot: u64,
    },
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Header => write!(f, "the image header"),
            Holder::L1Table => write!(f, "the L1 table"),
            Holder::L2Table { l1_index } => write!(f, "an L2 table (L1 entry {l1_index})"),
            Holder::RefcountTable => write!(f, "the refcount table"),
            Holder::RefcountBlock { slot } => {
                write!(f, "a refcount block (refcount table entry {slot})")
            }
        }
    }
}

/// A host cluster (index) that holds metadata, and what it holds.
pub(crate) type MetadataCluster = (HostCluster, Holder);

/// The host clusters of the tables that another table's entries name (L2 tables by L1
/// index, refcount blocks by refcount table index), as a map from cluster to entry index.
#[derive(Debug, Default)]
pub(crate) struct TableClusters {
    entry_of: BTreeMap<u64, u64>,
}

impl TableClusters {
    /// The clusters of the tables at `offsets` (entry index by position; 0 names none).
    pub(crate) fn new(geometry: Geometry, offsets: impl IntoIterator<Item = u64>) -> TableClusters {
        let mut tables = TableClusters::default();
        for (index, offset) in offsets.into_iter().enumerate() {
            tables.insert(geometry, index as u64, offset);
        }
        tables
    }

    /// Records the table at host `offset` that entry `index` names; nothing for offset 0.
    /// A corrupt, unaligned offset marks both clusters the table would touch.
    pub(crate) fn insert(&mut self, geometry: Geometry, index: u64, offset: u64) {
        if offset != 0 {
            for cluster in clusters(geometry, offset, geometry.cluster_size()) {
                self.entry_of.insert(cluster, index);
            }
        }
    }

    /// Forgets the table at host `offset` (an entry stopped naming it).
    pub(crate) fn remove(&mut self, geometry: Geometry, offset: u64) {
        for cluster in clusters(geometry, offset, geometry.cluster_size()) {
            self.entry_of.remove(&cluster);
        }
    }

    /// The first of `range` (host cluster indices) that holds a table, with the entry that
    /// names it.
    pub(crate) fn first_in(&self, range: &Range<u64>) -> Option<(u64, u64)> {
        self.entry_of.range(range.clone()).next().map(|(&cluster, &index)| (cluster, index))
    }
}

/// The host clusters (indices) that `len` bytes at host offset `offset` touch.
pub(crate) fn clusters(geometry: Geometry, offset: u64, len: u64) -> Range<u64> {
    let bits = geometry.cluster_bits();
    let end = offset.saturating_add(len).div_ceil(1 << bits);
    offset >> bits..end
}

/// The first cluster of `range` inside `area`, if any.
pub(crate) fn first_shared(area: &Range<u64>, range: &Range<u64>) -> Option<u64> {
    let first = area.start.max(range.start);
    (first < area.end.min(range.end)).then_some(first)
}

/// The error of an in-place write of `guest` that would land in host cluster `cluster`,
/// which holds `holder`.
pub(crate) fn in_place_error(
    geometry: Geometry,
    guest: GuestOffset,
    (cluster, holder): MetadataCluster,
) -> std::io::Error {
    overlap_error(format!(
        "{guest} maps to host cluster {:#x}, which holds {holder}: the image is corrupt; \
         repair it with qemu-img check -r all",
        geometry.host_cluster_start(cluster).0
    ))
}

/// The error of an allocation for `purpose` that found host cluster `cluster`, which holds
/// `holder`, counted as free.
pub(crate) fn allocation_error(
    geometry: Geometry,
    purpose: &dyn fmt::Display,
    (cluster, holder): MetadataCluster,
) -> std::io::Error {
    overlap_error(format!(
        "{purpose}: the refcounts call host cluster {:#x} free, but it holds {holder}: the \
         image is corrupt; repair it with qemu-img check -r all",
        geometry.host_cluster_start(cluster).0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_found_by_cluster() {
        let geometry = Geometry::new(16);
        let tables = TableClusters::new(geometry, [0x40000, 0, 0x90000, 0xa0200]);
        assert_eq!(tables.first_in(&(0..4)), None);
        assert_eq!(tables.first_in(&(0..5)), Some((4, 0)));
        assert_eq!(tables.first_in(&(5..10)), Some((9, 2)));
        assert_eq!(tables.first_in(&(11..12)), Some((11, 3)), "unaligned: both clusters");
        assert_eq!(tables.first_in(&(12..100)), None);
        assert_eq!(clusters(geometry, 0x10000, 1), 1..2);
        assert_eq!(clusters(geometry, 0x1ffff, 2), 1..3);
        assert_eq!(clusters(geometry, 0x30000, 24), 3..4);
        assert_eq!(first_shared(&(3..4), &(0..3)), None);
        assert_eq!(first_shared(&(3..6), &(4..9)), Some(4));
        assert_eq!(first_shared(&(3..3), &(0..9)), None, "an empty area holds nothing");
    }
}
