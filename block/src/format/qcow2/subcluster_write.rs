//! Guest writes into an image with extended L2 entries (QEMU's subcluster allocation in
//! `qcow2-cluster.c`), one cluster a step.
//!
//! A write goes into the cluster's host cluster: only the subclusters it touches are
//! written, the partial ones at either end that were not allocated filled with what the
//! guest saw there (the backing node, or zeroes), and once the data is written those
//! subclusters are marked allocated (and not zero). A cluster without a host cluster gets a
//! new one, which the entry names only then, with the subclusters written (as QEMU links an
//! allocation after its data): an entry never names a cluster whose data write failed or
//! has not happened, which could lie past the end of the file (a full disk, a crash), where
//! `qemu-img check` calls it corrupt. If the write fails, the new cluster is given back.
//! Writes into allocated subclusters go in place. A compressed or shared cluster is copied
//! whole into a new host cluster, all of it allocated.
//!
//! A write that marks subclusters of a cluster that has its host cluster is in flight for
//! those subclusters only: writes to other subclusters of the cluster run in parallel,
//! writes to the same ones wait for it. A write that gives a cluster its host cluster is in
//! flight for all of it (so that no other write gives it another).

use std::io::{self, IoSlice};
use std::sync::Arc;

use aiocoro::coroutine::Co;

use super::allocation::SharedAllocation;
use super::corrupt;
use super::driver::Qcow2Driver;
use super::in_place::Writing;
use super::io::sub_slices_ref;
use super::mapping::{COMPRESSED, COPIED, ClusterMapping, OFFSET_MASK, ZERO, decode_l2};
use super::metadata::Metadata;
use super::offsets::{ClusterCount, GuestOffset, HostOffset};
use super::overlap;
use super::subclusters::{allocated, bitmap, is_invalid, mask, zeroed};
use crate::buffer::{IoBuffer, gather_into};

/// How a write into one cluster goes.
enum Plan<'a> {
    /// All its subclusters are allocated: the bytes go in place at `host`.
    InPlace { host: HostOffset, _writing: Writing<'a> },
    /// Bytes `from..to` of the cluster (the request, widened to whole subclusters where
    /// those are not allocated) go into the host cluster at `cluster_host`; then subclusters
    /// `mask` of L2 entry `index` of the table at `l2` are marked allocated, and the entry
    /// made to name `cluster_host` if it is `fresh` (newly allocated, named by nothing yet).
    Subclusters {
        cluster_host: HostOffset,
        fresh: bool,
        from: u64,
        to: u64,
        l2: HostOffset,
        index: usize,
        mask: u32,
        allocation: Arc<SharedAllocation>,
        _writing: Writing<'a>,
    },
    /// The cluster (compressed or shared) is copied, with the request's bytes, into the new
    /// host cluster `host`, which L2 entry `index` of the table at `l2` then names.
    Rewrite { host: HostOffset, l2: HostOffset, index: usize, allocation: Arc<SharedAllocation> },
}

impl Qcow2Driver {
    /// Writes the start of the `len` bytes of `bufs` from byte `start` on at `guest`, up to
    /// the end of its cluster; returns how many bytes it wrote.
    pub(super) fn write_subclusters(
        &self,
        co: &Co,
        guest: GuestOffset,
        bufs: &[IoSlice<'_>],
        start: u64,
        len: u64,
    ) -> io::Result<u64> {
        let geometry = self.header.geometry;
        let (cluster_size, sub) = (geometry.cluster_size(), geometry.subcluster_size());
        let in_cluster = geometry.offset_in_cluster(guest);
        let len = len.min(cluster_size - in_cluster);
        let wanted = mask((in_cluster / sub) as u32, (in_cluster + len).div_ceil(sub) as u32);
        let cluster = geometry.cluster_of(guest);
        let plan = {
            let mut meta = self.metadata.lock(co);
            loop {
                meta.check_writable()?;
                let Some(in_flight) = meta.overlapping_subclusters(cluster, wanted) else {
                    break self.plan_subclusters(co, &mut meta, guest, len, wanted)?;
                };
                let allocation = in_flight.allocation().clone();
                allocation.wait(co, &mut meta);
            }
        };
        let bytes = sub_slices_ref(bufs, start as usize, len as usize);
        let file = self.file.node();
        let cluster_start = guest.0 - in_cluster;
        match plan {
            Plan::InPlace { host, _writing } => file.write(co, host.0, &bytes)?,
            Plan::Subclusters {
                cluster_host,
                fresh,
                from,
                to,
                l2,
                index,
                mask,
                allocation,
                _writing,
            } => {
                let written = if (from, to) == (in_cluster, in_cluster + len) {
                    file.write(co, cluster_host.0 + from, &bytes)
                } else {
                    let mut data = IoBuffer::new((to - from) as usize);
                    let (head, tail) =
                        ((in_cluster - from) as usize, (in_cluster + len - from) as usize);
                    let old = GuestOffset(cluster_start + from);
                    self.fill_around(co, old, &mut data, head..tail, &bytes).and_then(|()| {
                        file.write(co, cluster_host.0 + from, &[IoSlice::new(&data)])
                    })
                };
                let mut meta = self.metadata.lock(co);
                let linked = written.and_then(|()| {
                    self.change_extended_entry(co, &mut meta, l2, index, |entry, map| {
                        let entry = if fresh { cluster_host.0 | COPIED } else { entry };
                        (entry, bitmap(allocated(map) | mask, zeroed(map) & !mask))
                    })
                });
                if fresh && linked.is_err() {
                    meta.free_unnamed(co, &file, cluster_host, cluster_size);
                }
                meta.end_allocation(&allocation);
                allocation.finish(linked.is_ok(), &mut meta);
                linked?;
            }
            Plan::Rewrite { host, l2, index, allocation } => {
                let mut data = IoBuffer::new(cluster_size as usize);
                let range = in_cluster as usize..(in_cluster + len) as usize;
                let written = self
                    .fill_around(co, GuestOffset(cluster_start), &mut data, range, &bytes)
                    .and_then(|()| file.write(co, host.0, &[IoSlice::new(&data)]));
                let mut meta = self.metadata.lock(co);
                let linked = written.and_then(|()| {
                    drop(self.l2_table(co, &mut meta, l2)?);
                    meta.set_extended_entry(l2, index, host.0 | COPIED, bitmap(u32::MAX, 0));
                    Ok(())
                });
                if linked.is_err() {
                    meta.free_unnamed(co, &file, host, cluster_size);
                }
                meta.end_allocation(&allocation);
                allocation.finish(linked.is_ok(), &mut meta);
                linked?;
            }
        }
        Ok(len)
    }

    /// Decides, under the lock, how the write of `len` bytes at `guest` (subclusters
    /// `wanted`) goes, allocating the host cluster and recording the write as in flight if
    /// it changes the entry.
    fn plan_subclusters<'a>(
        &'a self,
        co: &Co,
        meta: &mut Metadata,
        guest: GuestOffset,
        len: u64,
        wanted: u32,
    ) -> io::Result<Plan<'a>> {
        let geometry = self.header.geometry;
        let cluster = geometry.cluster_of(guest);
        let position = geometry.position(cluster);
        let in_cluster = geometry.offset_in_cluster(guest);
        // A table shared with a snapshot is copied before its entry changes.
        let l2 = match self.writable_l2(co, meta, position.l1_index)? {
            Some(offset) => offset,
            None => self.allocate_l2(co, meta, position.l1_index)?,
        };
        let index = position.l2_index;
        let (entry, map) = {
            let table = self.l2_table(co, meta, l2)?;
            let slot = geometry.l2_slot(index);
            (table[slot], table[slot + 1])
        };
        let describe = |why: &str| {
            corrupt(format!(
                "{guest}: extended L2 entry {index} ({entry:#018x}, bitmap {map:#018x}) of the L2 \
                 table at {l2} (L1 entry {}): {why}",
                position.l1_index
            ))
        };
        let raw = if entry & COMPRESSED != 0 { entry } else { entry & !ZERO };
        let decoded = decode_l2(raw, geometry, 3, meta.image_end());
        let decoded = decoded.map_err(|why| describe(&why))?;
        let file = self.file.node();
        if entry & COMPRESSED != 0 || (entry & OFFSET_MASK != 0 && entry & COPIED == 0) {
            let host = meta.allocate(co, &file, ClusterCount(1), &guest)?;
            let allocation = SharedAllocation::new();
            meta.start_subcluster_write(cluster, u32::MAX, allocation.clone());
            return Ok(Plan::Rewrite { host, l2, index, allocation });
        }
        if is_invalid(map, entry & OFFSET_MASK != 0) {
            return Err(describe("a subcluster is allocated and zero, or allocated without data"));
        }
        let (cluster_host, fresh) = match decoded {
            ClusterMapping::Data(host) => {
                let first = geometry.host_cluster_of(host);
                if let Some(hit) = meta.metadata_in(first, ClusterCount(1)) {
                    return Err(overlap::in_place_error(
                        geometry,
                        GuestOffset(guest.0 - in_cluster),
                        hit,
                    ));
                }
                (host, false)
            }
            // Named by the entry once the write has put its data there.
            _ => (meta.allocate(co, &file, ClusterCount(1), &guest)?, true),
        };
        if wanted & !allocated(map) == 0 {
            let host = HostOffset(cluster_host.0 + in_cluster);
            let _writing = self.in_place.begin(host, len);
            return Ok(Plan::InPlace { host, _writing });
        }
        let sub = geometry.subcluster_size();
        let is_allocated = |at: u64| allocated(map) >> (at / sub) & 1 != 0;
        let end = in_cluster + len;
        let from = if is_allocated(in_cluster) { in_cluster } else { in_cluster / sub * sub };
        let to = if is_allocated(end - 1) { end } else { end.next_multiple_of(sub) };
        let _writing = self.in_place.begin(HostOffset(cluster_host.0 + from), to - from);
        let allocation = SharedAllocation::new();
        let in_flight = if fresh { u32::MAX } else { wanted };
        meta.start_subcluster_write(cluster, in_flight, allocation.clone());
        Ok(Plan::Subclusters {
            cluster_host,
            fresh,
            from,
            to,
            l2,
            index,
            mask: wanted,
            allocation,
            _writing,
        })
    }

    /// Fills `data` (the guest bytes from `guest`) with `bytes` at `range` and around it with
    /// what the guest sees there now.
    fn fill_around(
        &self,
        co: &Co,
        guest: GuestOffset,
        data: &mut [u8],
        range: std::ops::Range<usize>,
        bytes: &[IoSlice<'_>],
    ) -> io::Result<()> {
        if range.start > 0 {
            self.read_old(co, guest, &mut data[..range.start])?;
        }
        if range.end < data.len() {
            let after = GuestOffset(guest.0 + range.end as u64);
            self.read_old(co, after, &mut data[range.end..])?;
        }
        gather_into(bytes, &mut data[range]);
        Ok(())
    }

    /// Changes extended L2 entry `index` of the table at `l2` (cached again if need be) and
    /// its bitmap with `change`, which maps `(entry, bitmap)` to their new values.
    fn change_extended_entry(
        &self,
        co: &Co,
        meta: &mut Metadata,
        l2: HostOffset,
        index: usize,
        change: impl FnOnce(u64, u64) -> (u64, u64),
    ) -> io::Result<()> {
        let slot = self.header.geometry.l2_slot(index);
        let (entry, map) = {
            let table = self.l2_table(co, meta, l2)?;
            (table[slot], table[slot + 1])
        };
        let (entry, map) = change(entry, map);
        meta.set_extended_entry(l2, index, entry, map);
        Ok(())
    }
}
