//! Compressed writes (QEMU's `qcow2_co_pwritev_compressed_part`): whole guest clusters,
//! each compressed with the image's compression type (on a worker of the thread pool) and
//! packed into host clusters after the compressed data written before it; a cluster that
//! does not compress is written as an ordinary one.
//!
//! The compressed data of a cluster is packed at byte granularity (as QEMU packs it), or,
//! on a file with a request alignment (`O_DIRECT`), rounded up to whole blocks, so that
//! packed data never shares a block with other data: no write of it reads and rewrites a
//! neighbour's bytes. A cluster whose rounded data would fill a whole cluster is written
//! uncompressed. A guest cluster that already maps somewhere is
//! overwritten: its entry names the new data, the old cluster is released at the next flush
//! as for an allocating write (QEMU instead refuses to compress over allocated clusters).
//!
//! With extended L2 entries the compressed cluster's subcluster bitmap is zero (the spec
//! reserves it: a compressed cluster has no subclusters), whatever the cluster's subclusters
//! were before: allocated, zero, or the backing file's, the whole cluster is the new data.
//! The write is in flight for the whole cluster, as an allocation is: it waits for any
//! write that changes the cluster's entry or bitmap (a subcluster write in flight for
//! some subclusters of it included), and such writes wait for it; so no subcluster write
//! ever marks subclusters allocated in the compressed entry that replaced its cluster.

use std::io::{self, IoSlice};

use aiocoro::coroutine::Co;

use super::allocation::SharedAllocation;
use super::compressed::compress_cluster;
use super::driver::Qcow2Driver;
use super::header::SECTOR_SIZE;
use super::io::gather;
use super::mapping::COMPRESSED;
use super::offsets::{ClusterCount, Geometry, GuestOffset, HostOffset};
use crate::buffer::IoBuffer;
use crate::error::invalid_input;

impl Qcow2Driver {
    /// Writes `bufs` at `offset` compressed, cluster by cluster: `offset` must start a
    /// cluster and the bytes must be whole clusters, except that the last may end at the
    /// end of the image (the rest of that cluster is zeroes).
    ///
    /// # Errors
    ///
    /// `InvalidInput` naming the rule for a request that is not whole clusters; a write's or
    /// an allocation's error.
    pub(super) fn write_compressed_clusters(
        &self,
        co: &Co,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<()> {
        use crate::driver::BlockDriver;
        let cluster_size = self.header.geometry.cluster_size();
        let total: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
        let end = offset + total;
        if !offset.is_multiple_of(cluster_size)
            || (!end.is_multiple_of(cluster_size) && end != self.length(co)?)
        {
            return Err(invalid_input(format!(
                "qcow2: a compressed write must cover whole {cluster_size}-byte clusters (the \
                 last may end at the end of the image), not {total} bytes at {offset}"
            )));
        }
        let mut done = 0;
        while done < total {
            let len = (total - done).min(cluster_size);
            let bytes = gather(bufs, done as usize, len as usize);
            // A short last cluster is compressed as a whole one, zeroes after its end.
            let mut whole = vec![0u8; cluster_size as usize];
            whole[..bytes.len()].copy_from_slice(&bytes);
            let guest = GuestOffset(offset + done);
            // Compressed data rounded up to a whole cluster saves nothing.
            let unit = self.file.node().alignment().request;
            // On a worker thread, as QEMU compresses in its thread pool: this thread's other
            // requests run meanwhile, and concurrent requests compress in parallel.
            let compression = self.header.compression;
            match co
                .run_blocking(move || compress_cluster(compression, &whole))
                .filter(|packed| (packed.len() as u64).next_multiple_of(unit) < cluster_size)
            {
                Some(packed) => self.write_compressed_cluster(co, guest, &packed, unit)?,
                None => self.write_guest(co, guest, &[IoSlice::new(&bytes)])?,
            }
            done += len;
        }
        Ok(())
    }

    /// Writes the compressed data `packed` of the guest cluster at `guest` and points its L2
    /// entry at it. The data takes whole units of `unit` bytes (the file's request
    /// alignment).
    fn write_compressed_cluster(
        &self,
        co: &Co,
        guest: GuestOffset,
        packed: &[u8],
        unit: u64,
    ) -> io::Result<()> {
        let geometry = self.header.geometry;
        let file = self.file.node();
        let len = (packed.len() as u64).next_multiple_of(unit);
        let cluster = geometry.cluster_of(guest);
        let position = geometry.position(cluster);
        let (host, l2, allocation) = {
            let mut meta = self.metadata.lock(co);
            loop {
                meta.check_writable()?;
                let Some(in_flight) = meta.overlapping(cluster, ClusterCount(1)) else { break };
                let allocation = in_flight.allocation().clone();
                allocation.wait(co, &mut meta);
            }
            let l2 = match self.writable_l2(co, &mut meta, position.l1_index)? {
                Some(l2) => l2,
                None => self.allocate_l2(co, &mut meta, position.l1_index)?,
            };
            let purpose = format_args!("the compressed data of {guest}");
            let host = meta.allocate_bytes(co, &file, len, &purpose)?;
            let allocation = SharedAllocation::new();
            meta.start_allocation(cluster, ClusterCount(1), allocation.clone(), false);
            (host, l2, allocation)
        };
        let mut data = IoBuffer::zeroed(len as usize);
        data[..packed.len()].copy_from_slice(packed);
        let written = file.write(co, host.0, &[IoSlice::new(&data)]);
        let mut meta = self.metadata.lock(co);
        let linked = written.and_then(|()| {
            // Cached (loaded if need be), then changed in place.
            drop(self.l2_table(co, &mut meta, l2)?);
            let entry = compressed_entry(geometry, host, packed.len() as u64);
            if geometry.has_subclusters() {
                // A compressed cluster has no subclusters: its bitmap is reserved (zero),
                // whatever the old entry's subclusters were.
                meta.set_extended_entry(l2, position.l2_index, entry, 0);
            } else {
                meta.set_l2_entries(l2, position.l2_index, 1, |_| entry);
            }
            self.last_inflated.forget(host);
            Ok(())
        });
        if linked.is_err() {
            meta.free_unnamed(co, &file, host, len);
        }
        meta.end_allocation(&allocation);
        allocation.finish(linked.is_ok(), &mut meta);
        linked
    }
}

/// The L2 entry of a compressed cluster whose `len` bytes of data start at `host`: the
/// offset in the low 62 - (cluster_bits - 8) bits, the count of sectors after the first one
/// the data touches in the bits above, up to bit 61.
fn compressed_entry(geometry: Geometry, host: HostOffset, len: u64) -> u64 {
    let offset_bits = 62 - (geometry.cluster_bits() - 8);
    let extra_sectors = (host.0 + len - 1) / SECTOR_SIZE - host.0 / SECTOR_SIZE;
    COMPRESSED | (extra_sectors << offset_bits) | host.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::mapping::compressed_extent;

    #[test]
    fn entries_decode_to_the_sectors_the_data_touches() {
        for bits in [9, 12, 16, 21] {
            let geometry = Geometry::new(bits);
            let cluster = 1u64 << bits;
            for (host, len) in [(3 * cluster, 1), (3 * cluster, 511), (3 * cluster + 512, 513)] {
                let len = len.min(cluster - 1);
                let entry = compressed_entry(geometry, HostOffset(host), len);
                let (offset, bound) = compressed_extent(entry, geometry);
                assert_eq!(offset, HostOffset(host), "{bits} bits, {len} bytes");
                assert!(
                    bound >= len && bound < len + SECTOR_SIZE,
                    "{bits} bits: {bound} for {len}"
                );
            }
        }
    }
}
