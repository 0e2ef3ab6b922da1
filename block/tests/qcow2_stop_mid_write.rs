//! An IoThread stopped while its coroutines are in the middle of qcow2 writes into an image
//! that another IoThread keeps writing through the same `BlockBackend`: the stop cancels
//! those coroutines at their waits (see `AioContext`'s shutdown), and then
//! - the other thread's writers go on and end (no lock, queue or in-flight allocation is
//!   left with a coroutine that will never run);
//! - every byte of the image holds what the last acknowledged write of it wrote, or what the
//!   write in flight when the thread stopped wrote (a cancelled write never reported
//!   completion, so it may have reached the disk in part, as on a real disk);
//! - `qemu-img check` finds no corruption (clusters a cancelled allocation had taken may
//!   leak, as after a crash).
//!
//! Plain and extended L2 images, on io_uring and on the thread pool, with an L2 cache of two
//! tables so that table write-backs are among the waits cancelled. `QCOW2_STOP_ROUNDS` (default
//! 2) sets the rounds per kind.

mod qcow2_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::CreateOptions;
use aiocoro_block::{BlockBackend, run_in_coroutine};
use qcow2_support::*;

const COROUTINES: usize = 8;
/// Two IoThreads, one writer coroutine per lane.
const LANES: usize = 2 * COROUTINES;
/// Writes are whole blocks, which straddle clusters (4 KiB) and subclusters (2 KiB).
const BLOCK: u64 = 6000;
/// Each lane writes only its own blocks, so it knows what they must hold; neighbouring blocks
/// belong to lanes of different threads, so that the two threads allocate the clusters they
/// share at the same time (see [`block_of`]).
const BLOCKS_PER_LANE: u64 = 64;
const SIZE: u64 = BLOCK * BLOCKS_PER_LANE * LANES as u64;

/// Per block: the value of its last acknowledged write, and of the write in flight, if any.
type Ledger = Arc<Mutex<Vec<(u8, Option<u8>)>>>;

/// Block `k` of `lane`: blocks alternate between the threads' lanes (thread 0's lane `c`,
/// thread 1's lane `c`, thread 0's lane `c + 1`, ...).
fn block_of(lane: usize, k: u64) -> u64 {
    let (thread, coroutine) = ((lane / COROUTINES) as u64, (lane % COROUTINES) as u64);
    k * LANES as u64 + coroutine * 2 + thread
}

/// Writes random blocks of `lane` until `stop`, keeping the ledger.
fn write_until(co: &Co, blk: &BlockBackend, lane: usize, ledger: &Ledger, stop: &AtomicBool) {
    let mut rng = Rng(lane as u64 * 77 + 5);
    let mut value = 0u8;
    while !stop.load(Ordering::Relaxed) {
        let block = block_of(lane, rng.below(BLOCKS_PER_LANE));
        value = value.wrapping_add(1).max(1);
        ledger.lock().unwrap()[block as usize].1 = Some(value);
        blk.write(co, block * BLOCK, &vec![value; BLOCK as usize]).unwrap();
        ledger.lock().unwrap()[block as usize] = (value, None);
    }
}

/// One round: both threads write, the first is stopped, the second goes on, then ends.
fn round(name: &str, extended_l2: bool, aio: &str, seed: u64) {
    let scratch = Scratch::new(&format!("stop-mid-write-{name}-{seed}"));
    let image = scratch.path("stop.qcow2");
    let size = SIZE.next_multiple_of(512);
    if extended_l2 {
        create_qcow2(image.to_str().unwrap(), "extended_l2=on,cluster_size=64k", &size.to_string());
    } else {
        create_ours(&image, CreateOptions { cluster_size: 4096, ..CreateOptions::new(size) });
    }
    let options =
        format!("driver=qcow2,l2-cache-size=8k,file.aio={aio},file.filename={}", image.display());
    let blk = open_backend(&options);
    let ledger: Ledger = Arc::new(Mutex::new(vec![(0, None); (SIZE / BLOCK) as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<IoThread> =
        (0..2).map(|n| IoThread::spawn(&format!("stop-mid-write-{n}")).unwrap()).collect();
    let (ended_tx, ended_rx) = mpsc::channel();
    for (t, thread) in threads.iter().enumerate() {
        for c in 0..COROUTINES {
            let lane = t * COROUTINES + c;
            let (blk, ended, ledger, stop) =
                (blk.clone(), ended_tx.clone(), ledger.clone(), stop.clone());
            let start = move || {
                let ctx = AioContext::current().expect("an IoThread has a context");
                ctx.spawn(move |co| {
                    write_until(co, &blk, lane, &ledger, &stop);
                    ended.send(lane).unwrap();
                });
            };
            thread.handle().schedule_oneshot(start).unwrap();
        }
    }
    drop(ended_tx);
    std::thread::sleep(Duration::from_millis(30 + seed * 17 % 50));
    let mut threads = threads.into_iter();
    threads.next().unwrap().stop();
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let mut ended: Vec<usize> =
        std::iter::from_fn(|| ended_rx.recv_timeout(Duration::from_secs(30)).ok()).collect();
    ended.sort_unstable();
    assert_eq!(
        ended,
        (COROUTINES..LANES).collect::<Vec<_>>(),
        "{name}: the second thread's writers must all end, and none of the stopped thread's"
    );
    drop(blk.drain());
    let flushing = blk.clone();
    run_in_coroutine(move |co| flushing.flush(co)).unwrap().unwrap();
    threads.for_each(IoThread::stop);
    drop(blk);

    let (status, report) = check_status(&image);
    assert!(status == 0 || status == 3, "{name}: qemu-img check found corruption:\n{report}");
    let bytes = read_ours(&image, 1 << 20).unwrap();
    let ledger = ledger.lock().unwrap();
    for (block, &(acknowledged, in_flight)) in ledger.iter().enumerate() {
        let start = block * BLOCK as usize;
        for (at, &byte) in bytes[start..start + BLOCK as usize].iter().enumerate() {
            assert!(
                byte == acknowledged || Some(byte) == in_flight,
                "{name}: byte {at} of block {block} holds {byte}: neither the acknowledged \
                 {acknowledged} nor the in-flight {in_flight:?}"
            );
        }
    }
}

#[test]
fn an_iothread_stopped_mid_write_leaves_the_image_consistent_and_the_others_writing() {
    let rounds: u64 = std::env::var("QCOW2_STOP_ROUNDS")
        .map(|rounds| rounds.parse().expect("QCOW2_STOP_ROUNDS: a number of rounds"))
        .unwrap_or(2);
    for seed in 0..rounds {
        round("plain-io_uring", false, "io_uring", seed);
        round("plain-threads", false, "threads", seed);
        round("extended-l2", true, "io_uring", seed);
    }
}
