//! Discard and zero writes with extended L2 entries, at subcluster granularity: whole
//! subclusters inside the range stop being allocated and read as zeroes (their zero bits are
//! set); a cluster covered whole drops its host cluster (freed at the next flush, as
//! `discard` does) and reads as zeroes, or, without a backing node, as unallocated. The host
//! cluster of a partly dropped cluster stays allocated. Part of a compressed or shared
//! cluster cannot be dropped alone: zeroes are written there.

use std::io;

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::mapping::{COMPRESSED, COPIED, OFFSET_MASK};
use super::offsets::{ClusterCount, GuestOffset};
use super::subclusters::{ALL_ZERO, allocated, bitmap, mask, zeroed};
use crate::driver::write_zeroes_by_writing;

impl Qcow2Driver {
    /// Makes the whole subclusters inside `len` bytes at `offset` read as zeroes without
    /// data (see the module doc); waits for in-flight writes of their clusters first.
    pub(super) fn drop_subclusters(
        &self,
        co: &Co,
        GuestOffset(offset): GuestOffset,
        len: u64,
    ) -> io::Result<()> {
        let geometry = self.header.geometry;
        let (cluster_size, sub) = (geometry.cluster_size(), geometry.subcluster_size());
        let mut at = offset.next_multiple_of(sub);
        let end = (offset + len) / sub * sub;
        while at < end {
            let cluster = geometry.cluster_of(GuestOffset(at));
            let cluster_start = cluster.0 * cluster_size;
            let piece_end = end.min(cluster_start + cluster_size);
            let wanted = mask(
                ((at - cluster_start) / sub) as u32,
                ((piece_end - cluster_start) / sub) as u32,
            );
            let mut meta = self.metadata.lock(co);
            meta.check_writable()?;
            if let Some(in_flight) = meta.overlapping(cluster, ClusterCount(1)) {
                let allocation = in_flight.allocation().clone();
                allocation.wait(co, &mut meta);
                continue;
            }
            let position = geometry.position(cluster);
            // A table shared with a snapshot is copied before its entry changes.
            let l2 = match self.writable_l2(co, &mut meta, position.l1_index)? {
                Some(l2) => l2,
                // Unallocated already reads as zeroes.
                None if self.backing.is_none() => {
                    at = piece_end;
                    continue;
                }
                None => self.allocate_l2(co, &mut meta, position.l1_index)?,
            };
            let slot = geometry.l2_slot(position.l2_index);
            let (entry, map) = {
                let table = self.l2_table(co, &mut meta, l2)?;
                (table[slot], table[slot + 1])
            };
            let new = if wanted == u32::MAX {
                (0, if self.backing.is_some() { ALL_ZERO } else { 0 })
            } else if entry & COMPRESSED != 0 || (entry & OFFSET_MASK != 0 && entry & COPIED == 0) {
                drop(meta);
                write_zeroes_by_writing(co, at, piece_end - at, |co, offset, bufs| {
                    self.write_guest(co, GuestOffset(offset), bufs)
                })?;
                at = piece_end;
                continue;
            } else {
                (entry, bitmap(allocated(map) & !wanted, zeroed(map) | wanted))
            };
            if new != (entry, map) {
                meta.set_extended_entry(l2, position.l2_index, new.0, new.1);
            }
            at = piece_end;
        }
        Ok(())
    }
}
