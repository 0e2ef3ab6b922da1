//! Rebuilding the refcount structure from the references a check counted (QEMU's
//! `rebuild_refcount_structure`, run by `qemu-img check -r all` when the stored refcounts
//! cannot be repaired in place: a referenced cluster counted as free, a block outside the
//! image, misaligned or shared).
//!
//! The new blocks and the new table take clusters nobody references (first fit, as the
//! references say, so never a cluster in use), and are counted themselves; the loop places
//! blocks until every range of clusters in use has one, then the table, and again until
//! the table holds every block. Blocks and table are written and flushed before the header
//! names the new table, so a crash leaves the old structure in place. The old structure's
//! clusters are then leaked: the caller frees them as leaks, as QEMU does.

use std::collections::BTreeMap;
use std::io;

use aiocoro::coroutine::Co;

use super::header::{MAX_REFCOUNT_TABLE_BYTES, field};
use super::io::write_at;
use super::offsets::{ClusterCount, Geometry, HostCluster, HostOffset};
use super::refcount::set_entry;
use super::references::References;
use super::refuse;
use super::table::encode_table;
use crate::node::BlockNode;

/// Where a rebuilt refcount table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NewTable {
    /// Its offset.
    pub(crate) offset: HostOffset,
    /// Its clusters.
    pub(crate) clusters: u32,
    /// The end of the last cluster the new structure took.
    pub(crate) end: u64,
}

/// Writes a new refcount structure of `order`-bit refcounts whose counts are `refs` (plus
/// the structure's own clusters, which it adds to `refs`), and points the header at it.
///
/// # Errors
///
/// `Unsupported` if the table would outgrow QEMU's limit; write and flush errors (the header
/// still names the old table unless its own write failed).
pub(crate) fn rebuild_refcounts(
    co: &Co,
    file: &BlockNode,
    geometry: Geometry,
    order: u32,
    refs: &mut References,
) -> io::Result<NewTable> {
    let cluster_size = geometry.cluster_size();
    let per_block = (cluster_size * 8) >> order;
    let mut blocks: BTreeMap<u64, HostCluster> = BTreeMap::new();
    let mut first_free = HostCluster(0);
    let mut table: Option<(HostCluster, ClusterCount)> = None;
    loop {
        // Every range of clusters in use needs a block; a block placed in a range that had
        // none needs one there too, so look until a whole pass places nothing.
        let mut placed = true;
        while placed {
            placed = false;
            for slot in 0..refs.len().0.div_ceil(per_block) {
                let counted = (HostCluster(slot * per_block), ClusterCount(per_block));
                if !blocks.contains_key(&slot) && refs.any_in(counted.0, counted.1) {
                    blocks.insert(slot, refs.allocate(ClusterCount(1), &mut first_free));
                    placed = true;
                }
            }
        }
        let entries = blocks.last_key_value().map_or(1, |(&slot, _)| slot + 1);
        let needed = ClusterCount((entries * 8).div_ceil(cluster_size));
        if geometry.bytes_of(needed) > MAX_REFCOUNT_TABLE_BYTES {
            return Err(refuse(format!(
                "rebuilding the refcounts needs a refcount table of {} clusters, more \
                 than the {MAX_REFCOUNT_TABLE_BYTES} bytes allowed",
                needed.0
            )));
        }
        match table {
            Some((_, clusters)) if clusters >= needed => break,
            Some((start, clusters)) => refs.release(start, clusters),
            None => {}
        }
        table = Some((refs.allocate(needed, &mut first_free), needed));
    }
    let (table_start, table_clusters) = table.expect("qcow2 rebuild: the loop places a table");

    for (&slot, &cluster) in &blocks {
        let mut bytes = vec![0u8; cluster_size as usize];
        for index in 0..per_block {
            let count = refs.get(HostCluster(slot * per_block + index));
            if count != 0 {
                set_entry(&mut bytes, order, index as usize, count);
            }
        }
        write_at(co, file, geometry.host_cluster_start(cluster).0, &bytes)?;
    }
    let mut entries = vec![0u64; (geometry.bytes_of(table_clusters) / 8) as usize];
    for (&slot, &cluster) in &blocks {
        entries[slot as usize] = geometry.host_cluster_start(cluster).0;
    }
    let offset = geometry.host_cluster_start(table_start);
    write_at(co, file, offset.0, &encode_table(&entries))?;
    file.flush(co)?;
    // The table's offset and cluster count, adjacent in the header: one write.
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&offset.0.to_be_bytes());
    fields[field::REFCOUNT_TABLE_CLUSTERS - field::REFCOUNT_TABLE_OFFSET..]
        .copy_from_slice(&(table_clusters.0 as u32).to_be_bytes());
    write_at(co, file, field::REFCOUNT_TABLE_OFFSET as u64, &fields)?;
    file.flush(co)?;
    let table_end = table_start + table_clusters;
    let end = blocks.values().map(|&cluster| cluster + ClusterCount(1)).chain([table_end]).max();
    Ok(NewTable {
        offset,
        clusters: table_clusters.0 as u32,
        end: geometry.host_cluster_start(end.unwrap_or(HostCluster(0))).0,
    })
}
