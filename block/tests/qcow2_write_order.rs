//! The order in which a qcow2 image's metadata reaches the disk (the write-back order that
//! `metadata`'s module docs set out), seen from a filter node under the image that logs
//! every write and flush:
//!
//! 1. changed refcount blocks are written and flushed before an L2 table that needs them;
//! 2. data is flushed before the L2 entry naming it is written;
//! 3. a new L2 table is written and flushed before the L1 entry naming it;
//! 4. a cluster an L2 entry stopped naming loses its reference only after the table without
//!    it is flushed.

mod common;
mod qcow2_support;

use aiocoro_block::qcow2::Header;
use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use common::faults::{FileEvent, open_faulty_qcow2};
use common::pattern;
use qcow2_support::*;

/// The image's cluster size.
const CLUSTER: u64 = 65536;
/// The bits of an L1 or L2 entry that hold an offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Whether `event` is a write that touches byte `at`.
fn writes(event: &FileEvent, at: u64) -> bool {
    matches!(*event, FileEvent::Write { offset, len } if offset <= at && at < offset + len)
}

/// The position in `log` of the first (or last) write that touches byte `at`.
fn write_to(log: &[FileEvent], at: u64, last: bool, what: &str) -> usize {
    let found = if last {
        log.iter().rposition(|event| writes(event, at))
    } else {
        log.iter().position(|event| writes(event, at))
    };
    found.unwrap_or_else(|| panic!("no write of {what} (byte {at:#x}) in {log:?}"))
}

/// Asserts that `earlier` comes before `later` in `log` with a flush between them.
fn assert_flushed_between(log: &[FileEvent], earlier: usize, later: usize, rule: &str) {
    assert!(earlier < later, "{rule}: written in the wrong order ({earlier}, {later}) in {log:?}");
    assert!(
        log[earlier..later].contains(&FileEvent::Flush),
        "{rule}: no flush between events {earlier} and {later} in {log:?}"
    );
}

#[test]
fn metadata_reaches_the_disk_in_the_documented_order() {
    let scratch = Scratch::new("write-order");
    let image = scratch.path("image.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=64k", "1G");
    let file_len = std::fs::metadata(&image).unwrap().len();
    let header = Header::parse(&peek(&image, 0, CLUSTER as usize), file_len).unwrap();
    let (l1, refcount_table) = (header.l1_table_offset.0, header.refcount_table_offset.0);
    let path = image.clone();
    let (allocating, data, discarding) = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        faults.take_log();
        blk.write(co, 0, &pattern(4096, 1)).unwrap();
        blk.flush(co).unwrap();
        let allocating = faults.take_log();
        let l2 = peek_u64(&path, l1) & OFFSET_MASK;
        let data = peek_u64(&path, l2) & OFFSET_MASK;
        blk.discard(co, 0, CLUSTER).unwrap();
        blk.flush(co).unwrap();
        (allocating, data, faults.take_log())
    })
    .unwrap();
    let l2 = peek_u64(&image, l1) & OFFSET_MASK;
    let block = peek_u64(&image, refcount_table) & OFFSET_MASK;
    assert!(l2 != 0 && data != 0 && block != 0, "L2 table {l2:#x}, data {data:#x}");
    assert_eq!(peek_u64(&image, l2), 0, "the discard clears the L2 entry");

    let log = &allocating;
    let new_table = write_to(log, l2, false, "the new L2 table");
    let block_before = write_to(&log[..new_table], block, true, "the refcount block");
    assert_flushed_between(log, block_before, new_table, "refcounts before the L2 table");
    let l1_entry = write_to(log, l1, true, "the L1 entry");
    assert_flushed_between(log, new_table, l1_entry, "a new L2 table before its L1 entry");
    let data_write = write_to(log, data, false, "the data");
    let table_with_entry = write_to(log, l2, true, "the L2 table with the entry");
    assert_flushed_between(log, data_write, table_with_entry, "data before the entry naming it");

    let log = &discarding;
    let table_without = write_to(log, l2, true, "the L2 table without the entry");
    let freed = write_to(log, block, true, "the refcount block freeing the data cluster");
    assert_flushed_between(log, table_without, freed, "a free after the table without it");
}
