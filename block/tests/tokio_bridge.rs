//! The workloads of `examples/tokio_bridge.rs`, checked: tokio tasks write and read a qcow2
//! image through coroutines on two IoThreads (awaiting their join handles), and a coroutine
//! awaits a tokio and a `futures` oneshot completed from other threads.

mod common;
#[path = "../examples/tokio_bridge.rs"]
mod example;

use aiocoro::aio::{AioHandle, IoThread};
use aiocoro_block::{BlockBackend, BlockGraph, BlockOptions, IoBuffer};
use common::TempFile;
use example::BLOCK;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap()
}

fn iothreads() -> ([IoThread; 2], Vec<AioHandle>) {
    let threads =
        [IoThread::spawn("bridge-test-0").unwrap(), IoThread::spawn("bridge-test-1").unwrap()];
    let handles = threads.iter().map(|t| t.handle().clone()).collect();
    (threads, handles)
}

/// Reads the whole of the qcow2 image at `path`, opened afresh on this thread.
fn read_image(path: &std::path::Path, len: usize) -> Vec<u8> {
    let path = path.to_owned();
    aiocoro_block::run_in_coroutine(move |co| {
        let mut options = BlockOptions::default();
        options.set("driver", "qcow2").unwrap();
        options.set("file.filename", &path.to_string_lossy()).unwrap();
        let (_, root) = aiocoro_block::open_options(co, &BlockGraph::new(), &options).unwrap();
        let blk = BlockBackend::new(root);
        let mut buffer = IoBuffer::new(len);
        blk.read(co, 0, &mut buffer).unwrap();
        buffer.to_vec()
    })
    .unwrap()
}

#[test]
fn tokio_tasks_write_and_read_qcow2_through_two_iothreads_byte_for_byte() {
    const BLOCKS: usize = 48;
    let image = TempFile::sparse("tokio-bridge", 0);
    let blk = example::create_qcow2(image.path(), 16 << 20).unwrap();
    let (threads, handles) = iothreads();
    let runtime = runtime();
    let written: Vec<Vec<u8>> = (0..BLOCKS as u64).map(example::pattern).collect();
    let read = example::write_then_read(&runtime, &handles, &blk, written.clone()).unwrap();
    assert_eq!(read.len(), BLOCKS);
    for (index, (w, r)) in written.iter().zip(&read).enumerate() {
        assert_eq!(r.len(), BLOCK);
        if let Some(at) = w.iter().zip(r).position(|(a, b)| a != b) {
            panic!("block {index} read back differs at byte {at}");
        }
    }
    // What the IoThreads wrote reached the image: opened afresh, it holds the same bytes,
    // and zeroes after them.
    aiocoro_block::run_in_coroutine(move |co| blk.flush(co)).unwrap().unwrap();
    for thread in threads {
        thread.stop();
    }
    let on_disk = read_image(image.path(), (BLOCKS + 2) * BLOCK);
    assert_eq!(on_disk[..BLOCKS * BLOCK], written.concat()[..]);
    assert!(on_disk[BLOCKS * BLOCK..].iter().all(|&b| b == 0));
}

#[test]
fn an_iothread_coroutine_awaits_a_tokio_and_a_futures_oneshot_sent_from_other_threads() {
    let (threads, handles) = iothreads();
    let runtime = runtime();
    for round in 0..20u64 {
        let text = format!("round {round}");
        let received =
            example::await_channels(&runtime, &handles[1], round * 7, text.clone()).unwrap();
        assert_eq!(received.from_tokio, round * 7);
        assert_eq!(received.from_futures, text);
        let home = Some(String::from("bridge-test-1"));
        assert_eq!(received.threads, (home.clone(), home), "the coroutine left its IoThread");
    }
    for thread in threads {
        thread.stop();
    }
}
