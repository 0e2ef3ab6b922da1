//! Dropping whole clusters, for discard and (in version 3 images) zero writes: afterwards they
//! read as zeroes. The L2 entry is cleared, or, where a backing node would show through, set
//! to the zero flag (version 3). A version 2 image over a backing node has no way to say
//! "zero" without writing zeroes, so discard leaves its clusters alone there, as QEMU does.
//! The clusters the entries named lose their reference at the next flush, once the changed
//! L2 tables are on disk. Partial clusters are the caller's: discard ignores them (it is
//! advisory), zero writes write zero bytes there.

use std::io;

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::mapping::ZERO;
use super::offsets::{ClusterCount, GuestCluster, GuestOffset};

impl Qcow2Driver {
    /// Makes the whole clusters inside `len` bytes at `offset` read as zeroes without data
    /// (see the module doc: a version 2 image over a backing node is left as it is); waits
    /// for in-flight allocations of those clusters first.
    pub(super) fn drop_clusters(&self, co: &Co, guest: GuestOffset, len: u64) -> io::Result<()> {
        let geometry = self.header.geometry;
        if geometry.has_subclusters() {
            return self.drop_subclusters(co, guest, len);
        }
        let offset = guest.0;
        let cluster_size = geometry.cluster_size();
        let mut cluster = offset.div_ceil(cluster_size);
        let end = (offset + len) / cluster_size;
        let new_entry = match (self.backing.is_some(), self.header.version >= 3) {
            (false, _) => 0,
            (true, true) => ZERO,
            (true, false) => return Ok(()),
        };
        while cluster < end {
            let position = geometry.position(GuestCluster(cluster));
            let in_table = (geometry.l2_entries() - position.l2_index) as u64;
            let count = in_table.min(end - cluster);
            let mut meta = self.metadata.lock(co);
            meta.check_writable()?;
            if let Some(in_flight) = meta.overlapping(GuestCluster(cluster), ClusterCount(count)) {
                let allocation = in_flight.allocation().clone();
                allocation.wait(co, &mut meta);
                continue;
            }
            let l2 = match self.writable_l2(co, &mut meta, position.l1_index)? {
                Some(l2) => l2,
                // Unallocated already reads as the backing node or zeroes.
                None if new_entry == 0 => {
                    cluster += count;
                    continue;
                }
                None => self.allocate_l2(co, &mut meta, position.l1_index)?,
            };
            let table = self.l2_table(co, &mut meta, l2)?;
            let (index, count_in_table) = (position.l2_index, count as usize);
            if table[index..index + count_in_table].iter().any(|&entry| entry != new_entry) {
                // Not held while the cache changes the table, which would copy it.
                drop(table);
                meta.set_l2_entries(l2, index, count_in_table, |_| new_entry);
            }
            cluster += count;
        }
        Ok(())
    }
}
