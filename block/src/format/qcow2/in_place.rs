//! Host ranges that in-place writes are writing now. Such a write looks its cluster up under
//! the metadata lock and writes the data outside it; a discard of the same cluster meanwhile
//! must not give the cluster back (and let it be reallocated to other guest data) before the
//! write has landed. Frees of a busy range wait for a later flush.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::offsets::HostOffset;

/// The host byte ranges `(start, len)` of the in-place writes in progress (a multiset).
#[derive(Default)]
pub(crate) struct InPlaceWrites {
    ranges: Mutex<Vec<(u64, u64)>>,
}

/// One in-place write in progress; dropping it ends it.
pub(crate) struct Writing<'a> {
    set: &'a InPlaceWrites,
    range: (u64, u64),
}

impl InPlaceWrites {
    fn ranges(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.ranges.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a write of `len` bytes at host offset `start`, until the returned guard drops.
    /// Call it under the metadata lock, with the lookup that chose the range.
    pub(crate) fn begin(&self, start: HostOffset, len: u64) -> Writing<'_> {
        self.ranges().push((start.0, len));
        Writing { set: self, range: (start.0, len) }
    }

    /// Whether a write in progress touches `len` bytes at `start`.
    pub(crate) fn overlaps(&self, HostOffset(start): HostOffset, len: u64) -> bool {
        self.ranges().iter().any(|&(s, l)| s < start + len && start < s + l)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut ranges = self.set.ranges();
        if let Some(at) = ranges.iter().position(|range| *range == self.range) {
            ranges.swap_remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_busy_while_its_write_runs() {
        let set = InPlaceWrites::default();
        let first = set.begin(HostOffset(4096), 4096);
        let second = set.begin(HostOffset(4096), 4096);
        assert!(set.overlaps(HostOffset(0), 4097));
        assert!(!set.overlaps(HostOffset(0), 4096), "touching is not overlapping");
        assert!(!set.overlaps(HostOffset(8192), 10));
        drop(first);
        assert!(set.overlaps(HostOffset(6000), 1), "the same range written twice stays busy");
        drop(second);
        assert!(!set.overlaps(HostOffset(4096), 4096));
    }
}
