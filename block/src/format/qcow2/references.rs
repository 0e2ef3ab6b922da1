//! The references a check counts (QEMU's in-memory refcount table of `qemu-img check`): for
//! every host cluster, how many times the header, the tables and the L2 entries use it. The
//! check compares them with the stored refcounts; a rebuild allocates the new refcount
//! structure from the clusters nobody uses and writes these counts as its refcounts.

use super::offsets::{ClusterCount, HostCluster};

/// Per-cluster reference counts, up to a width's maximum.
#[derive(Clone, Debug)]
pub(crate) struct References {
    counts: Vec<u32>,
    /// The largest count: the refcount width's maximum, capped at `u32::MAX` (a cluster is
    /// never referenced four billion times; a 64-bit width overflows there instead).
    max: u64,
}

/// What [`References::add`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Added {
    /// The cluster's count went up by one.
    Counted,
    /// The count was already at the width's maximum (it stays there).
    Overflow,
}

impl References {
    /// No references to `clusters` clusters, counted up to the maximum of `order`-bit
    /// refcounts (`order` 0..=6).
    pub(crate) fn new(ClusterCount(clusters): ClusterCount, order: u32) -> References {
        let max = if order >= 5 { u64::from(u32::MAX) } else { (1 << (1 << order)) - 1 };
        References { counts: vec![0; to_index(clusters)], max }
    }

    /// How many clusters are covered (from host cluster 0): the file's, and any referenced
    /// past it.
    pub(crate) fn len(&self) -> ClusterCount {
        ClusterCount(self.counts.len() as u64)
    }

    /// Covers at least `clusters` clusters.
    pub(crate) fn grow_to(&mut self, clusters: ClusterCount) {
        if clusters > self.len() {
            self.counts.resize(to_index(clusters.0), 0);
        }
    }

    /// The references to `cluster` (0 past the end).
    pub(crate) fn get(&self, HostCluster(cluster): HostCluster) -> u64 {
        usize::try_from(cluster).ok().and_then(|i| self.counts.get(i)).map_or(0, |&n| n.into())
    }

    /// Counts one more reference to `cluster`, covering it if need be.
    pub(crate) fn add(&mut self, HostCluster(cluster): HostCluster) -> Added {
        self.grow_to(ClusterCount(cluster + 1));
        let count = &mut self.counts[to_index(cluster)];
        if u64::from(*count) >= self.max {
            return Added::Overflow;
        }
        *count += 1;
        Added::Counted
    }

    /// Whether one of the `count` clusters from `first` is referenced.
    pub(crate) fn any_in(&self, first: HostCluster, count: ClusterCount) -> bool {
        let (start, end) = (first.0, (first + count).0.min(self.len().0));
        start < end && self.counts[to_index(start)..to_index(end)].iter().any(|&n| n > 0)
    }

    /// Takes the first run of `count` unreferenced clusters at or after `*first_free`
    /// (covering clusters past the end as needed), counts one reference to each and returns
    /// the first; `*first_free` moves to the first unreferenced cluster it passed.
    pub(crate) fn allocate(
        &mut self,
        ClusterCount(count): ClusterCount,
        first_free: &mut HostCluster,
    ) -> HostCluster {
        while self.get(*first_free) != 0 {
            first_free.0 += 1;
        }
        let mut start = first_free.0;
        let mut found = 0;
        while found < count {
            if self.get(HostCluster(start + found)) == 0 {
                found += 1;
            } else {
                start += found + 1;
                found = 0;
            }
        }
        for cluster in start..start + count {
            self.grow_to(ClusterCount(cluster + 1));
            self.counts[to_index(cluster)] = 1;
        }
        HostCluster(start)
    }

    /// Drops the references of `count` clusters from `start` that [`References::allocate`]
    /// took.
    pub(crate) fn release(&mut self, start: HostCluster, count: ClusterCount) {
        for cluster in start.0..(start + count).0 {
            self.counts[to_index(cluster)] = 0;
        }
    }
}

/// A cluster count or number as an index into the counts.
///
/// # Panics
///
/// If it does not fit the address space (the check caps the clusters it covers first).
fn to_index(cluster: u64) -> usize {
    usize::try_from(cluster)
        .unwrap_or_else(|_| panic!("qcow2 check: cluster {cluster} is past the address space"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_at_the_width() {
        let mut refs = References::new(ClusterCount(2), 0);
        assert_eq!(refs.add(HostCluster(1)), Added::Counted);
        assert_eq!(refs.add(HostCluster(1)), Added::Overflow);
        assert_eq!(refs.get(HostCluster(1)), 1);
        assert_eq!(refs.add(HostCluster(5)), Added::Counted);
        assert_eq!(refs.len(), ClusterCount(6));
        assert!(refs.any_in(HostCluster(4), ClusterCount(2)));
        assert!(!refs.any_in(HostCluster(2), ClusterCount(3)));
        assert!(!refs.any_in(HostCluster(9), ClusterCount(3)));
    }

    #[test]
    fn allocation_is_first_fit() {
        let mut refs = References::new(ClusterCount(8), 4);
        for cluster in [0, 1, 3, 6] {
            refs.add(HostCluster(cluster));
        }
        let mut first_free = HostCluster(0);
        assert_eq!(refs.allocate(ClusterCount(2), &mut first_free), HostCluster(4));
        assert_eq!(first_free, HostCluster(2));
        assert_eq!(refs.allocate(ClusterCount(1), &mut first_free), HostCluster(2));
        assert_eq!(refs.allocate(ClusterCount(3), &mut first_free), HostCluster(7));
        assert_eq!(refs.len(), ClusterCount(10));
        refs.release(HostCluster(7), ClusterCount(3));
        assert_eq!(refs.get(HostCluster(8)), 0);
    }
}
