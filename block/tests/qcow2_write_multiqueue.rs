//! One fresh qcow2 image written from 4 IoThreads x 8 coroutines through one `BlockBackend`,
//! with an L2 cache of two tables (dirty tables are written back on eviction while other
//! requests run). Phase one: random overlapping allocating writes to the first half. Phase
//! two, after every phase-one write ended: every 6000-byte block of the whole disk is
//! written by the one coroutine that owns it, in two unaligned pieces, so neighbours
//! allocate the clusters they share at the same time and the result is deterministic. Then
//! drain, flush, and compare byte for byte with the expected contents; `qemu-img check`
//! must be clean.

mod qcow2_support;

use std::sync::mpsc;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro_block::qcow2::CreateOptions;
use aiocoro_block::{BlockBackend, run_in_coroutine};
use qcow2_support::*;

const THREADS: usize = 4;
const COROUTINES: usize = 8;
const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 6000;
const PHASE_ONE_WRITES: u64 = 40;

/// The final byte `i` of block `block`.
fn expected_byte(block: u64, i: u64) -> u8 {
    ((block * 7 + i * 13) % 251) as u8
}

/// Runs `work(blk, lane)` in a coroutine for each of the 32 lanes (8 per IoThread) and
/// waits until all ended; a failed request panics the test.
fn run_lanes(
    threads: &[IoThread],
    blk: &BlockBackend,
    work: fn(&aiocoro::coroutine::Co, &BlockBackend, usize),
) {
    let (done_tx, done_rx) = mpsc::channel();
    for (t, thread) in threads.iter().enumerate() {
        for c in 0..COROUTINES {
            let (blk, done) = (blk.clone(), done_tx.clone());
            let lane = t * COROUTINES + c;
            thread
                .handle()
                .schedule_oneshot(move || {
                    let ctx = AioContext::current().expect("an IoThread has a context");
                    ctx.spawn(move |co| {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            work(co, &blk, lane)
                        }));
                        done.send(result.is_ok()).unwrap();
                    });
                })
                .unwrap();
        }
    }
    drop(done_tx);
    let results: Vec<bool> = done_rx.iter().collect();
    assert_eq!(results.len(), THREADS * COROUTINES);
    assert!(results.iter().all(|&ok| ok), "a lane failed (see its panic above)");
}

fn phase_one(co: &aiocoro::coroutine::Co, blk: &BlockBackend, lane: usize) {
    let mut rng = Rng(lane as u64 * 0x9e37_79b9 + 7);
    for n in 0..PHASE_ONE_WRITES {
        let len = 1 + rng.below(20_000);
        let offset = rng.below(SIZE / 2 - len);
        blk.write(co, offset, &vec![(lane as u64 + n) as u8; len as usize]).unwrap();
    }
}

fn phase_two(co: &aiocoro::coroutine::Co, blk: &BlockBackend, lane: usize) {
    let blocks = SIZE.div_ceil(BLOCK);
    let lanes = (THREADS * COROUTINES) as u64;
    let mut rng = Rng(lane as u64 + 99);
    for block in (lane as u64..blocks).step_by(lanes as usize) {
        let start = block * BLOCK;
        let len = BLOCK.min(SIZE - start);
        let bytes: Vec<u8> = (0..len).map(|i| expected_byte(block, i)).collect();
        let split = rng.below(len) as usize;
        blk.write(co, start + split as u64, &bytes[split..]).unwrap();
        blk.write(co, start, &bytes[..split]).unwrap();
    }
}

#[test]
fn four_iothreads_write_one_fresh_image() {
    let scratch = Scratch::new("write-multiqueue");
    let image = scratch.path("mq.qcow2");
    let options = CreateOptions { cluster_size: 4096, ..CreateOptions::new(SIZE) };
    create_ours(&image, options);

    let options = format!("driver=qcow2,l2-cache-size=8k,file.filename={}", image.display());
    let blk = open_backend(&options);
    let threads: Vec<IoThread> =
        (0..THREADS).map(|n| IoThread::spawn(&format!("qcow2-write-{n}")).unwrap()).collect();
    run_lanes(&threads, &blk, phase_one);
    run_lanes(&threads, &blk, phase_two);
    drop(blk.drain());
    assert_eq!(blk.in_flight(), 0);
    let flushing = blk.clone();
    run_in_coroutine(move |co| flushing.flush(co)).unwrap().unwrap();
    for thread in threads {
        thread.stop();
    }
    drop(blk);

    let expected: Vec<u8> = (0..SIZE).map(|at| expected_byte(at / BLOCK, at % BLOCK)).collect();
    let shadow = scratch.path("expected.raw");
    std::fs::write(&shadow, &expected).unwrap();
    qemu_check(&image);
    qemu_compare(&image, &shadow);
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &expected, "our read-back");
}
