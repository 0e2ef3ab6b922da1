//! Data safety of qcow2 metadata updates under I/O errors: a flush that fails (once,
//! injected by a filter node) in the middle of a table move must not make later
//! acknowledged writes vanish after a reopen, and the image stays clean for `qemu-img check`.

mod common;
mod qcow2_support;

use std::error::Error;
use std::io;
use std::path::Path;

use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use common::faults::open_faulty_qcow2;
use common::pattern;
use qcow2_support::*;

/// The header field with the L1 table's offset, and the one with the refcount table's.
const L1_TABLE_OFFSET_FIELD: u64 = 40;
const REFCOUNT_TABLE_OFFSET_FIELD: u64 = 48;

/// Whether `error`, or an error it wraps, is EIO.
fn is_eio(error: &io::Error) -> bool {
    let mut cause: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) == Some(libc::EIO) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Guest bytes expected after the writes `(offset, bytes)`, over zeroes.
fn expected(size: u64, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut all = vec![0u8; size as usize];
    for (offset, bytes) in writes {
        all[*offset as usize..][..bytes.len()].copy_from_slice(bytes);
    }
    all
}

/// Reads `image` back through our driver and through qemu-img, both against `expected`,
/// and checks it with qemu-img (no errors, no leaks).
fn assert_image_holds(image: &Path, expected: &[u8]) {
    assert_same_bytes(&read_ours(image, 1 << 20).unwrap(), expected, "read back by us");
    assert_same_bytes(&qemu_raw(image), expected, "read back by qemu-img");
    qemu_check(image);
}

#[test]
fn a_failed_flush_while_the_l1_table_moves_loses_no_acknowledged_write() {
    let scratch = Scratch::new("grow-flush-eio");
    let image = scratch.path("image.qcow2");
    // 512-byte clusters: one L2 table maps 32 KiB, so 1 MiB needs 32 L1 entries (one
    // cluster) and 8 MiB needs 256 (four clusters, somewhere else).
    create_qcow2(image.to_str().unwrap(), "cluster_size=512", "1M");
    let path = image.clone();
    let writes = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        let mut writes = Vec::new();
        let mut write = |offset: u64, seed: u8| {
            let bytes = pattern(4096, seed);
            blk.write(co, offset, &bytes).unwrap();
            writes.push((offset, bytes));
        };
        write(0, 1);
        blk.flush(co).unwrap();

        // The header is rewritten to name the moved L1 table; the flush after it fails.
        faults.fail_flush_after_write_to(L1_TABLE_OFFSET_FIELD);
        let error = blk.truncate(co, 8 << 20).unwrap_err();
        assert!(is_eio(&error), "{error}");
        assert_eq!(faults.failed_flushes(), 1);
        assert_eq!(blk.length(), 1 << 20, "a failed grow leaves the length as it was");

        // Writes that need new L2 tables, so new L1 entries, are acknowledged and flushed.
        write(512 << 10, 2);
        write(900 << 10, 3);
        blk.flush(co).unwrap();
        writes
    })
    .unwrap();
    assert_image_holds(&image, &expected(1 << 20, &writes));
}

#[test]
fn a_failed_flush_while_the_refcount_table_moves_loses_no_acknowledged_write() {
    let scratch = Scratch::new("refcount-table-flush-eio");
    let image = scratch.path("image.qcow2");
    // 512-byte clusters of 16-bit refcounts: one refcount table cluster (64 blocks of 256
    // clusters) counts 8 MiB of file; 10 MiB of data outgrows it.
    create_qcow2(image.to_str().unwrap(), "cluster_size=512", "16M");
    let path = image.clone();
    let writes = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        faults.fail_flush_after_write_to(REFCOUNT_TABLE_OFFSET_FIELD);
        let mut acknowledged = Vec::new();
        let mut failed = 0;
        const CHUNK: u64 = 64 << 10;
        for n in 0..(10 << 20) / CHUNK {
            let bytes = pattern(CHUNK as usize, n as u8);
            match blk.write(co, n * CHUNK, &bytes) {
                Ok(()) => acknowledged.push((n * CHUNK, bytes)),
                Err(error) => {
                    assert!(is_eio(&error), "{error}");
                    failed += 1;
                }
            }
        }
        assert_eq!((failed, faults.failed_flushes()), (1, 1), "one write saw the failed flush");
        // The failed write is written again: its range is then defined.
        let retry = failed_range(&acknowledged, CHUNK);
        let bytes = pattern(CHUNK as usize, (retry / CHUNK) as u8);
        blk.write(co, retry, &bytes).unwrap();
        acknowledged.push((retry, bytes));
        blk.flush(co).unwrap();
        acknowledged
    })
    .unwrap();
    assert_image_holds(&image, &expected(16 << 20, &writes));
}

/// The offset of the one `chunk`-sized write missing from `acknowledged` (in order).
fn failed_range(acknowledged: &[(u64, Vec<u8>)], chunk: u64) -> u64 {
    let missing =
        acknowledged.iter().enumerate().find(|(n, (offset, _))| *offset != *n as u64 * chunk);
    missing.map_or(acknowledged.len() as u64 * chunk, |(n, _)| n as u64 * chunk)
}
