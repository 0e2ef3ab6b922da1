//! Errors of block requests: a driver's EIO reaches the caller with the node and the request
//! named, and the requests around a failing one, on every thread, complete as if it were not
//! there.

mod common;

use std::error::Error;
use std::io::{self, IoSliceMut};
use std::sync::Arc;
use std::sync::mpsc;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro_block::format::{RawDriver, RawOptions};
use aiocoro_block::{
    BlockBackend, BlockGraph, BlockNode, ChildLabel, ChildRole, Op, RequestError, run_in_coroutine,
};
use common::{Counters, HANG, TestDriver, pattern};

const BLOCK: u64 = 4096;
/// The byte whose requests fail: inside block 10.
const BAD: u64 = 10 * BLOCK + 100;

fn request_error(error: &io::Error) -> &RequestError {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RequestError>())
        .unwrap_or_else(|| panic!("not a RequestError: {error:?}"))
}

/// Asserts `error` is the test driver's EIO on node `node` for `op`.
fn assert_eio(error: &io::Error, node: &str, op: Op) {
    let eio = io::Error::from_raw_os_error(libc::EIO);
    assert_eq!(error.kind(), eio.kind(), "{error}");
    let inner = request_error(error);
    assert_eq!((inner.node.as_str(), inner.driver, inner.op), (node, "test", op), "{error}");
    let cause = inner.source().and_then(|source| source.downcast_ref::<io::Error>());
    assert_eq!(cause.and_then(io::Error::raw_os_error), Some(libc::EIO), "{error}");
    let text = error.to_string();
    let expected = format!("node '{node}' (test): {op}: {eio}");
    assert_eq!(text, expected);
}

fn flaky(len: u64) -> (TestDriver, Arc<Counters>) {
    let mut driver = TestDriver::new(len as usize);
    driver.fail_at = Some(BAD);
    let counters = driver.counters.clone();
    (driver, counters)
}

#[test]
fn an_eio_reaches_the_caller_with_the_node_and_the_request_named() {
    run_in_coroutine(|co| {
        let (driver, counters) = flaky(64 * BLOCK);
        let blk = BlockBackend::new(Arc::new(driver.into_node(co, "flaky")));
        let mut buf = vec![0u8; BLOCK as usize];

        let error = blk.read(co, 10 * BLOCK, &mut buf).unwrap_err();
        assert_eio(&error, "flaky", Op::Read { offset: 10 * BLOCK, len: BLOCK });
        assert!(error.to_string().contains("read of 4096 bytes at offset 40960"), "{error}");
        // Any request whose range covers the byte fails; its neighbours do not.
        let error = blk.write(co, BAD, &[1]).unwrap_err();
        assert_eio(&error, "flaky", Op::Write { offset: BAD, len: 1 });
        let big = vec![2u8; 3 * BLOCK as usize];
        let error = blk.write(co, 9 * BLOCK, &big).unwrap_err();
        assert_eio(&error, "flaky", Op::Write { offset: 9 * BLOCK, len: 3 * BLOCK });
        // The default write_zeroes writes, and its error names the write-zeroes request.
        let error = blk.write_zeroes(co, 8 * BLOCK, 4 * BLOCK, false).unwrap_err();
        assert_eio(&error, "flaky", Op::WriteZeroes { offset: 8 * BLOCK, len: 4 * BLOCK });
        let (head, tail) = buf.split_at_mut(100);
        let error = blk
            .readv(co, BAD - 100, &mut [IoSliceMut::new(head), IoSliceMut::new(tail)])
            .unwrap_err();
        assert_eio(&error, "flaky", Op::Read { offset: BAD - 100, len: BLOCK });

        blk.read(co, BAD + 1, &mut buf).unwrap();
        blk.write(co, 0, &vec![3u8; BAD as usize - 1]).unwrap();
        blk.read(co, 9 * BLOCK, &mut buf).unwrap();
        blk.write(co, 11 * BLOCK, &big).unwrap();
        blk.flush(co).unwrap();
        assert_eq!(counters.failed(), 5);
        assert_eq!(counters.entered(), 10, "every request reached the driver once");
        assert_eq!(counters.left(), 10);
        assert_eq!(blk.in_flight(), 0, "failed requests counted themselves out");
    })
    .unwrap();
}

#[test]
fn under_raw_the_error_names_the_innermost_node_and_its_request() {
    run_in_coroutine(|co| {
        let graph = BlockGraph::new();
        let (driver, counters) = flaky(64 * BLOCK);
        let file = graph.add_node(driver.into_node(co, "flaky"));
        let (_, raw) = graph
            .add_node_with(|edges| {
                let child = edges
                    .attach(ChildLabel::new("file", ChildRole::DATA | ChildRole::PRIMARY), file)?;
                let window = RawOptions { offset: 2 * BLOCK, size: Some(32 * BLOCK) };
                BlockNode::new(co, "disk", RawDriver::new(child, window)?, false)
            })
            .unwrap();
        let blk = BlockBackend::new(raw);
        let mut buf = vec![0u8; BLOCK as usize];
        // Block 8 of the raw node is block 10 of its file.
        let error = blk.read(co, 8 * BLOCK, &mut buf).unwrap_err();
        assert_eio(&error, "flaky", Op::Read { offset: 10 * BLOCK, len: BLOCK });
        // The raw node's own refusals name the raw node.
        let error = blk.read(co, 32 * BLOCK, &mut buf).unwrap_err();
        assert_eq!(request_error(&error).node, "disk", "{error}");
        blk.read(co, 7 * BLOCK, &mut buf).unwrap();
        assert_eq!((counters.entered(), counters.failed()), (2, 1));
    })
    .unwrap();
}

/// What one worker did: requests that succeeded, requests that failed (each checked), and
/// the data of its blocks as it read them back.
struct Report {
    worker: usize,
    succeeded: u64,
    failed: u64,
    wrong: Vec<String>,
}

/// Worker `worker` of `workers`: writes each block it owns (`block % workers == worker`)
/// with its pattern and reads it back, and reads the bad block between blocks; checks every
/// outcome and reports.
fn work(co: &Co, blk: &BlockBackend, worker: usize, workers: usize, blocks: u64) -> Report {
    let mut report = Report { worker, succeeded: 0, failed: 0, wrong: Vec::new() };
    let note = |result: io::Result<()>, must_fail: Option<Op>, report: &mut Report| match (
        result, must_fail,
    ) {
        (Ok(()), None) => report.succeeded += 1,
        (Err(error), Some(op)) => {
            let inner = request_error(&error);
            if (inner.node.as_str(), inner.op) != ("flaky", op) {
                report.wrong.push(format!("wrong error for {op}: {error}"));
            }
            report.failed += 1;
        }
        (Ok(()), Some(op)) => report.wrong.push(format!("{op} succeeded")),
        (Err(error), None) => report.wrong.push(format!("unexpected error: {error}")),
    };
    let bad_block = BAD / BLOCK;
    for block in (0..blocks).filter(|block| *block as usize % workers == worker) {
        let offset = block * BLOCK;
        let touches = block == bad_block;
        let data = pattern(BLOCK as usize, block as u8);
        let op = Op::Write { offset, len: BLOCK };
        note(blk.write(co, offset, &data), touches.then_some(op), &mut report);
        let mut back = vec![0u8; BLOCK as usize];
        let op = Op::Read { offset, len: BLOCK };
        note(blk.read(co, offset, &mut back), touches.then_some(op), &mut report);
        if !touches && back != data {
            report.wrong.push(format!("block {block} read back wrong"));
        }
        let mut bad = vec![0u8; 512];
        let op = Op::Read { offset: BAD - 300, len: 512 };
        note(blk.read(co, BAD - 300, &mut bad), Some(op), &mut report);
    }
    report
}

#[test]
fn concurrent_requests_around_a_failing_one_lose_nothing() {
    let blocks = 96;
    let per_thread = 3;
    let iothreads: Vec<IoThread> =
        (0..2).map(|i| IoThread::spawn(&format!("errors-{i}")).unwrap()).collect();
    let workers = (iothreads.len() + 1) * per_thread;

    let context = AioContext::new().unwrap();
    let (driver, counters) = flaky(blocks * BLOCK);
    let blk =
        run_in_coroutine(move |co| BlockBackend::new(Arc::new(driver.into_node(co, "flaky"))))
            .unwrap();
    let (tx, rx) = mpsc::channel();
    let mut worker = 0;
    for iothread in &iothreads {
        for _ in 0..per_thread {
            let (blk, tx) = (blk.clone(), tx.clone());
            let me = worker;
            iothread
                .handle()
                .spawn(move |co| tx.send(work(co, &blk, me, workers, blocks)).unwrap())
                .unwrap();
            worker += 1;
        }
    }
    // This thread's context runs workers too.
    let mut local = Vec::new();
    for _ in 0..per_thread {
        let (blk, tx) = (blk.clone(), tx.clone());
        let me = worker;
        local.push(context.spawn(move |co| tx.send(work(co, &blk, me, workers, blocks)).unwrap()));
        worker += 1;
    }
    context.wait_while(|| local.iter().any(|coroutine| !coroutine.is_finished()));
    let mut reports: Vec<Report> =
        (0..workers).map(|_| rx.recv_timeout(HANG).expect("a worker never reported")).collect();
    reports.sort_by_key(|report| report.worker);
    iothreads.into_iter().for_each(IoThread::stop);

    let (mut succeeded, mut failed) = (0, 0);
    for report in &reports {
        assert!(report.wrong.is_empty(), "worker {}: {:?}", report.worker, report.wrong);
        succeeded += report.succeeded;
        failed += report.failed;
    }
    // Each block: a write, a read, a read of the bad byte; the bad block's own two fail.
    assert_eq!(failed, blocks + 2);
    assert_eq!(succeeded, 2 * blocks - 2);
    assert_eq!(counters.entered(), 3 * blocks, "each request reached the driver once");
    assert_eq!(counters.left(), 3 * blocks);
    assert_eq!(counters.failed(), failed);
    assert_eq!(blk.in_flight(), 0);
    // Every block but the bad one holds its pattern; the bad one was never written.
    let image = run_in_coroutine(move |co| {
        let mut image = vec![0u8; (blocks * BLOCK) as usize];
        let (head, rest) = image.split_at_mut((10 * BLOCK) as usize);
        let (_bad, tail) = rest.split_at_mut(BLOCK as usize);
        blk.read(co, 0, head).unwrap();
        blk.read(co, 11 * BLOCK, tail).unwrap();
        image
    })
    .unwrap();
    for block in (0..blocks).filter(|&block| block != 10) {
        let at = (block * BLOCK) as usize;
        let data = &image[at..at + BLOCK as usize];
        assert!(data == pattern(BLOCK as usize, block as u8), "block {block}");
    }
    drop(context);
}
