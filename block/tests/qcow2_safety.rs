//! Data safety of qcow2 images on I/O errors and on close: a flush that fails (once,
//! injected by a filter node) in the middle of a table move must not make later
//! acknowledged writes vanish after a reopen; dropping the last handle without a flush,
//! wherever the drop happens, writes the cached metadata back; `close` reports a failed
//! flush. Every image must then read back as written (ours and qemu-img) and be clean for
//! `qemu-img check`.

mod common;
mod qcow2_support;

use std::cell::RefCell;
use std::error::Error;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
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

/// How a grow's header write that names the moved L1 table fails.
#[derive(Clone, Copy, Debug)]
enum HeaderFault {
    /// The write lands, the flush after it fails: the header names the new table.
    Flush,
    /// The write fails and lands nowhere: the header still names the old table.
    Write,
}

/// Grows an image so that its L1 table moves, with the header write failing as `fault`
/// says, then writes through new L1 entries, flushes and closes; the writes must all be
/// there after reopening.
fn grow_with_failing_header(fault: HeaderFault) {
    let scratch = Scratch::new(&format!("grow-{fault:?}"));
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

        match fault {
            HeaderFault::Flush => faults.fail_flush_after_write_to(L1_TABLE_OFFSET_FIELD),
            HeaderFault::Write => faults.fail_next_write_to(L1_TABLE_OFFSET_FIELD),
        }
        let error = blk.truncate(co, 8 << 20).unwrap_err();
        assert!(is_eio(&error), "{error}");
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
fn a_failed_flush_while_the_l1_table_moves_loses_no_acknowledged_write() {
    grow_with_failing_header(HeaderFault::Flush);
}

#[test]
fn a_failed_header_write_while_the_l1_table_moves_loses_no_acknowledged_write() {
    grow_with_failing_header(HeaderFault::Write);
}

#[test]
fn a_failed_flush_while_the_refcount_table_moves_loses_no_acknowledged_write() {
    refcount_table_move_with_failing_header(HeaderFault::Flush);
}

#[test]
fn a_failed_header_write_while_the_refcount_table_moves_loses_no_acknowledged_write() {
    refcount_table_move_with_failing_header(HeaderFault::Write);
}

/// Writes enough to move the refcount table, with the header write failing as `fault`
/// says (the write that needed the move fails, and is written again), flushes and closes;
/// the writes must all be there after reopening.
fn refcount_table_move_with_failing_header(fault: HeaderFault) {
    let scratch = Scratch::new(&format!("refcount-table-{fault:?}"));
    let image = scratch.path("image.qcow2");
    // 512-byte clusters of 16-bit refcounts: one refcount table cluster (64 blocks of 256
    // clusters) counts 8 MiB of file; 10 MiB of data outgrows it.
    create_qcow2(image.to_str().unwrap(), "cluster_size=512", "16M");
    let path = image.clone();
    let writes = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        match fault {
            HeaderFault::Flush => faults.fail_flush_after_write_to(REFCOUNT_TABLE_OFFSET_FIELD),
            HeaderFault::Write => faults.fail_next_write_to(REFCOUNT_TABLE_OFFSET_FIELD),
        }
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
        assert_eq!(failed, 1, "one write saw the failed header update");
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

/// A fresh 1 MiB qcow2 image (64 KiB clusters) in `scratch`.
fn fresh_image(scratch: &Scratch) -> PathBuf {
    let image = scratch.path("image.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    image
}

/// Opens `image` read-write and writes `(offset, bytes)` without flushing; returns the
/// graph and the backend, for the caller to drop.
fn write_unflushed(co: &Co, image: &Path, writes: &[(u64, Vec<u8>)]) -> (BlockGraph, BlockBackend) {
    let graph = BlockGraph::new();
    let (_, node) = aiocoro_block::open(co, &graph, &qcow2_rw_options(image)).unwrap();
    let blk = BlockBackend::new(node);
    for (offset, bytes) in writes {
        blk.write(co, *offset, bytes).unwrap();
    }
    (graph, blk)
}

/// Writes that need new L2 tables and refcounts (cached until written back).
fn some_writes() -> Vec<(u64, Vec<u8>)> {
    vec![(0, pattern(4096, 1)), (300 << 10, pattern(70_000, 2)), ((1 << 20) - 512, pattern(512, 3))]
}

#[test]
fn dropping_the_last_handle_outside_a_coroutine_writes_metadata_back() {
    let scratch = Scratch::new("drop-outside");
    let image = fresh_image(&scratch);
    let path = image.clone();
    let handles = run_in_coroutine(move |co| write_unflushed(co, &path, &some_writes())).unwrap();
    // This thread has no context any more: the drop makes one for its flush.
    drop(handles);
    assert_image_holds(&image, &expected(1 << 20, &some_writes()));
}

#[test]
fn dropping_the_last_handle_inside_a_coroutine_writes_metadata_back_before_it_returns() {
    let scratch = Scratch::new("drop-inside");
    let image = fresh_image(&scratch);
    let path = image.clone();
    run_in_coroutine(move |co| {
        drop(write_unflushed(co, &path, &some_writes()));
        // Still inside the coroutine: the image is complete once the drop returned.
        assert_same_bytes(&qemu_raw(&path), &expected(1 << 20, &some_writes()), "qemu-img");
        qemu_check(&path);
    })
    .unwrap();
    assert_image_holds(&image, &expected(1 << 20, &some_writes()));
}

#[test]
fn dropping_the_last_handle_in_a_callback_of_a_polling_context_writes_metadata_back() {
    let scratch = Scratch::new("drop-callback");
    let image = fresh_image(&scratch);
    let path = image.clone();
    std::thread::spawn(move || {
        let context = AioContext::new().unwrap();
        let handles = Rc::new(RefCell::new(None));
        let slot = handles.clone();
        let writer = context.spawn(move |co| {
            *slot.borrow_mut() = Some(write_unflushed(co, &path, &some_writes()));
        });
        context.wait_while(|| !writer.is_finished());
        // Dropped by a one-shot that this context's poll runs: the flush polls it nested.
        context.schedule_oneshot(move || drop(handles.borrow_mut().take()));
        context.poll(false);
    })
    .join()
    .unwrap();
    assert_image_holds(&image, &expected(1 << 20, &some_writes()));
}

#[test]
fn dropping_the_last_handle_while_the_thread_unwinds_writes_metadata_back() {
    let scratch = Scratch::new("drop-unwinding");
    let image = scratch.path("image.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    let path = image.clone();
    let panicked = std::thread::spawn(move || {
        let _handles =
            run_in_coroutine(move |co| write_unflushed(co, &path, &some_writes())).unwrap();
        panic!("a panic with the handles on the stack");
    })
    .join();
    assert!(panicked.is_err());
    assert_image_holds(&image, &expected(1 << 20, &some_writes()));
}

#[test]
fn close_reports_a_failed_flush_and_keeps_the_node_open_until_one_succeeds() {
    let scratch = Scratch::new("close-eio");
    let image = fresh_image(&scratch);
    let path = image.clone();
    let writes = some_writes();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        blk.write(co, writes[0].0, &writes[0].1).unwrap();
        faults.fail_next_flushes(1);
        let error = blk.close(co).unwrap_err();
        assert!(is_eio(&error), "{error}");
        // The innermost node's context: the filter's flush failed.
        assert!(error.to_string().contains("node 'faults' (fault-filter): flush:"), "{error}");
        // Still open: more writes, then a close that works.
        for (offset, bytes) in &writes[1..] {
            blk.write(co, *offset, bytes).unwrap();
        }
        blk.close(co).unwrap();
        assert_eq!(faults.failed_flushes(), 1);
        let error = blk.write(co, 0, &[0u8; 512]).unwrap_err();
        assert!(error.to_string().ends_with("the node is closed"), "{error}");
        let error = blk.flush(co).unwrap_err();
        assert!(error.to_string().ends_with("the node is closed"), "{error}");
        blk.close(co).unwrap();
    })
    .unwrap();
    assert_image_holds(&image, &expected(1 << 20, &some_writes()));
}

/// Makes this test binary the child of
/// `a_flush_that_fails_on_drop_is_said_on_stderr_and_leaves_the_image_consistent`; the
/// value is the image's path.
const FAILING_DROP_CHILD: &str = "AIOCORO_QCOW2_FAILING_DROP_CHILD";

#[test]
fn a_flush_that_fails_on_drop_is_said_on_stderr_and_leaves_the_image_consistent() {
    if let Some(image) = std::env::var_os(FAILING_DROP_CHILD) {
        run_in_coroutine(move |co| {
            let graph = BlockGraph::new();
            let (node, faults) = open_faulty_qcow2(co, &graph, Path::new(&image));
            let blk = BlockBackend::new(node);
            blk.write(co, 0, &pattern(4096, 1)).unwrap();
            faults.fail_next_flushes(u64::MAX);
        })
        .unwrap();
        return;
    }
    let scratch = Scratch::new("drop-eio");
    let image = fresh_image(&scratch);
    let test = "a_flush_that_fails_on_drop_is_said_on_stderr_and_leaves_the_image_consistent";
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(FAILING_DROP_CHILD, &image)
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the child failed: {stderr}");
    let said = "aiocoro-block: node 'image' (qcow2) was dropped with writes not flushed, and \
                the flush on drop failed: node 'faults' (fault-filter): flush: Input/output \
                error (os error 5)";
    assert!(stderr.contains(said), "not said on stderr: {stderr}");
    // What did reach the file is consistent on its own: leaks at worst.
    let (status, text) = check_status(&image);
    assert!(status == 0 || status == 3, "qemu-img check: {status}\n{text}");
}
