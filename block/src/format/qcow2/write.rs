//! Guest writes (QEMU's `qcow2_co_pwritev_part` and `qcow2-cluster.c`'s allocation): a
//! cluster whose entry says it may be written in place is written there; any other cluster
//! (unallocated, zero, compressed, shared) gets a new host cluster, with the part of it the
//! request does not cover copied from what the guest read there before.
//!
//! Allocation takes the metadata lock to choose clusters and record the request as in
//! flight, writes the data without the lock, and takes the lock again to link the clusters
//! into the L2 table. A request for a guest cluster that an in-flight allocation covers
//! has its bytes merged into that allocation while it still takes them (see `allocation`),
//! or else waits for it and looks again; other allocations run in parallel.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro::coroutine::Co;

use super::allocation::SharedAllocation;
use super::corrupt;
use super::driver::Qcow2Driver;
use super::in_place::Writing;
use super::io::{gather, sub_slices_ref};
use super::mapping::{COPIED, OFFSET_MASK, decode_l1, decode_l2, is_writable_in_place};
use super::metadata::Metadata;
use super::offsets::{ClusterCount, GuestOffset, HostOffset};
use super::overlap;
use crate::buffer::IoBuffer;

/// What the first cluster of a write step needs.
enum Step<'a> {
    /// `len` bytes go in place at this host offset (recorded as being written).
    InPlace { host: HostOffset, len: u64, _writing: Writing<'a> },
    /// `count` guest clusters from the step's first get new host clusters from `host`; the
    /// L2 table is at `l2`.
    Allocated {
        host: HostOffset,
        count: ClusterCount,
        len: u64,
        l2: HostOffset,
        allocation: Arc<SharedAllocation>,
    },
    /// `len` bytes were merged into an in-flight allocation, which wrote and linked them.
    Merged { len: u64 },
}

impl Qcow2Driver {
    /// Writes `bufs` at guest `offset`, one step (a run of clusters mapped alike, inside one
    /// L2 table) at a time.
    pub(super) fn write_guest(
        &self,
        co: &Co,
        GuestOffset(offset): GuestOffset,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
        let mut done = 0;
        while done < total {
            done += self.write_step(co, GuestOffset(offset + done), bufs, done, total - done)?;
        }
        Ok(())
    }

    /// Writes the start of the `len` bytes of `bufs` from byte `start` on at `guest`; returns
    /// how many bytes it wrote. The bytes are cut out of `bufs` once, for the step's size.
    fn write_step(
        &self,
        co: &Co,
        guest: GuestOffset,
        bufs: &[IoSlice<'_>],
        start: u64,
        len: u64,
    ) -> io::Result<u64> {
        let geometry = self.header.geometry;
        if geometry.has_subclusters() {
            return self.write_subclusters(co, guest, bufs, start, len);
        }
        let step = {
            let mut meta = self.metadata.lock(co);
            loop {
                meta.check_writable()?;
                let one = ClusterCount(1);
                let Some(in_flight) = meta.overlapping(geometry.cluster_of(guest), one) else {
                    break self.plan(co, &mut meta, guest, len)?;
                };
                let allocation = in_flight.allocation().clone();
                let bytes = |len: u64| gather(bufs, start as usize, len as usize);
                let Some(len) = in_flight.merge(geometry, guest, len, bytes) else {
                    allocation.wait(co, &mut meta);
                    continue;
                };
                if allocation.wait_outcome(co, &mut meta) {
                    break Step::Merged { len };
                }
                // Abandoned, our bytes with it: write them on our own.
            }
        };
        match step {
            Step::InPlace { host, len, _writing } => {
                let bytes = sub_slices_ref(bufs, start as usize, len as usize);
                self.file.node().write(co, host.0, &bytes)?;
                Ok(len)
            }
            Step::Merged { len } => Ok(len),
            Step::Allocated { host, count, len, l2, allocation } => {
                let bytes = sub_slices_ref(bufs, start as usize, len as usize);
                let written =
                    self.write_allocated(co, guest, &bytes, len, host, count, &allocation);
                let mut meta = self.metadata.lock(co);
                let linked = match written {
                    Ok(()) => self.link(co, &mut meta, guest, host, count, l2),
                    Err(error) => Err(error),
                };
                if linked.is_err() {
                    let len = geometry.bytes_of(count);
                    meta.free_unnamed(co, &self.file.node(), host, len);
                }
                meta.end_allocation(&allocation);
                allocation.finish(linked.is_ok(), &mut meta);
                linked.map(|()| len)
            }
        }
    }

    /// Decides, under the lock, how the clusters from `guest` are written, allocating and
    /// recording them as in flight if they need new clusters.
    fn plan<'a>(
        &'a self,
        co: &Co,
        meta: &mut Metadata,
        guest: GuestOffset,
        len: u64,
    ) -> io::Result<Step<'a>> {
        let geometry = self.header.geometry;
        let cluster_size = geometry.cluster_size();
        let cluster = geometry.cluster_of(guest);
        let span = geometry.table_span(guest, len);
        let (position, in_cluster, clusters) = (span.position, span.in_cluster, span.clusters.0);

        let l2 = self.writable_l2(co, meta, position.l1_index)?;
        let table = match l2 {
            Some(offset) => Some(self.l2_table(co, meta, offset)?),
            None => None,
        };
        let entry = |n: u64| table.as_ref().map_or(0, |t| t[position.l2_index + n as usize]);
        let first = entry(0);
        if is_writable_in_place(first) {
            // The entry says where the data goes: checked as a read checks it, not trusted.
            decode_l2(first, geometry, self.header.version, meta.image_end()).map_err(|why| {
                corrupt(format!(
                    "{guest}: L2 entry {} ({first:#018x}) of the L2 table of L1 entry {}: {why}",
                    position.l2_index, position.l1_index
                ))
            })?;
            let start = first & OFFSET_MASK;
            let mut count = 1;
            while count < clusters
                && is_writable_in_place(entry(count))
                && entry(count) & OFFSET_MASK == start + count * cluster_size
                && start + count * cluster_size < meta.image_end()
            {
                count += 1;
            }
            let len = span.len_in(ClusterCount(count));
            let first_host = geometry.host_cluster_of(HostOffset(start));
            if let Some(hit) = meta.metadata_in(first_host, ClusterCount(count)) {
                let skipped = hit.0 - first_host;
                let at = GuestOffset(guest.0 - in_cluster + geometry.bytes_of(skipped));
                return Err(overlap::in_place_error(geometry, at, hit));
            }
            let host = HostOffset(start + in_cluster);
            let _writing = self.in_place.begin(host, len);
            return Ok(Step::InPlace { host, len, _writing });
        }
        let max_run = meta.max_allocation_run().0;
        let mut count = 1;
        while count < clusters.min(max_run)
            && !is_writable_in_place(entry(count))
            && meta.overlapping(cluster + ClusterCount(count), ClusterCount(1)).is_none()
        {
            count += 1;
        }
        let count = ClusterCount(count);
        let len = span.len_in(count);
        let l2 = match l2 {
            Some(offset) => offset,
            None => self.allocate_l2(co, meta, position.l1_index)?,
        };
        let file = self.file.node();
        let host = meta.allocate(co, &file, count, &guest)?;
        let allocation = SharedAllocation::new();
        let merging = takes_merges(in_cluster, len, geometry.bytes_of(count));
        meta.start_allocation(cluster, count, allocation.clone(), merging);
        Ok(Step::Allocated { host, count, len, l2, allocation })
    }

    /// The L2 table L1 entry `l1_index` names, `None` if none (shared with a snapshot or
    /// not: see `writable_l2` for writing).
    pub(super) fn l2_offset(
        &self,
        meta: &Metadata,
        l1_index: u64,
    ) -> io::Result<Option<HostOffset>> {
        let Some(raw) = meta.l1_entry(l1_index) else {
            return Err(corrupt(format!(
                "L1 entry {l1_index} is past the {} of the L1 table",
                meta.l1_len()
            )));
        };
        let offset = decode_l1(raw, self.header.geometry, meta.image_end())
            .map_err(|why| corrupt(format!("L1 entry {l1_index} ({raw:#018x}): {why}")))?;
        Ok(offset)
    }

    /// Allocates an empty L2 table for L1 entry `l1_index`: its refcount is made stable,
    /// the table written and flushed, then the L1 entry written (see
    /// [`Metadata::install_l2`]).
    pub(super) fn allocate_l2(
        &self,
        co: &Co,
        meta: &mut Metadata,
        l1_index: u64,
    ) -> io::Result<HostOffset> {
        let table: Arc<[u64]> = vec![0u64; self.header.geometry.l2_words()].into();
        let purpose = format_args!("a new L2 table (L1 entry {l1_index})");
        meta.install_l2(co, &self.file.node(), l1_index, table, None, &purpose)
    }

    /// Writes `count` new clusters at `host`: the request's bytes (`bytes`, `len` of them),
    /// the bytes merged into `allocation`, and around them what the guest read before (from
    /// this image's old mapping, the backing node, or zeroes).
    #[allow(clippy::too_many_arguments, reason = "one allocation's coordinates")]
    fn write_allocated(
        &self,
        co: &Co,
        guest: GuestOffset,
        bytes: &[IoSlice<'_>],
        len: u64,
        host: HostOffset,
        count: ClusterCount,
        allocation: &Arc<SharedAllocation>,
    ) -> io::Result<()> {
        let geometry = self.header.geometry;
        let in_cluster = geometry.offset_in_cluster(guest);
        let start = guest.0 - in_cluster;
        let total = geometry.bytes_of(count);
        let merged = if takes_merges(in_cluster, len, total) {
            // Let the requests this thread already has in hand merge into the allocation.
            co.reschedule();
            self.metadata.lock(co).stop_merging(allocation)
        } else {
            Vec::new()
        };
        let mut data = IoBuffer::new(total as usize);
        let mut covered: Vec<(u64, u64)> = merged
            .iter()
            .map(|piece| (piece.at, piece.at + piece.data.len() as u64))
            .chain([(in_cluster, in_cluster + len)])
            .collect();
        covered.sort_unstable();
        let mut from = 0;
        for (gap_end, next) in covered.iter().copied().chain([(total, total)]) {
            if from < gap_end {
                let old = GuestOffset(start + from);
                self.read_old(co, old, &mut data[from as usize..gap_end as usize])?;
            }
            from = from.max(next);
        }
        let mut at = in_cluster as usize;
        for piece in bytes {
            data[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        for piece in &merged {
            data[piece.at as usize..][..piece.data.len()].copy_from_slice(&piece.data);
        }
        self.file.node().write(co, host.0, &[IoSlice::new(&data)])
    }

    /// Reads what the guest sees at `offset` now, into `buf` (the part of a cluster being
    /// allocated that the write does not cover). Past the virtual size it reads zeroes.
    pub(super) fn read_old(
        &self,
        co: &Co,
        GuestOffset(offset): GuestOffset,
        buf: &mut [u8],
    ) -> io::Result<()> {
        use crate::driver::BlockDriver;
        let size = self.length(co)?;
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside > 0 {
            self.read(co, offset, &mut [IoSliceMut::new(&mut buf[..inside])])?;
        }
        Ok(())
    }

    /// Points the L2 entries of `count` guest clusters from `guest` at the new clusters
    /// from `host`; the clusters they named before are freed at the next flush.
    fn link(
        &self,
        co: &Co,
        meta: &mut Metadata,
        guest: GuestOffset,
        host: HostOffset,
        count: ClusterCount,
        l2: HostOffset,
    ) -> io::Result<()> {
        let geometry = self.header.geometry;
        let index = geometry.position(geometry.cluster_of(guest)).l2_index;
        // Cached (loaded if need be), then changed in place.
        drop(self.l2_table(co, meta, l2)?);
        let cluster_size = geometry.cluster_size();
        meta.set_l2_entries(l2, index, count.0 as usize, |n| (host.0 + n * cluster_size) | COPIED);
        Ok(())
    }
}

/// Whether an allocation of `total` bytes whose own request covers `len` bytes from
/// `in_cluster` leaves room for other writes to merge into it.
fn takes_merges(in_cluster: u64, len: u64, total: u64) -> bool {
    in_cluster > 0 || in_cluster + len < total
}
