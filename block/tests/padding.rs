//! Padded (read-modify-write) writes under `O_DIRECT` run alone among the writes: an aligned
//! write racing a padded one into the same block is never overwritten with old bytes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use aiocoro::aio::IoThread;
use aiocoro_block::{BlockBackend, BlockGraph, IoBuffer, run_in_coroutine};
use common::{HANG, TempFile};

/// Whole-block writes by one IoThread, each filling block 0 with its round number.
const ROUNDS: u8 = 250;

#[test]
fn an_aligned_write_racing_a_padded_one_is_not_lost() {
    let file = TempFile::with_contents("rmw", &[0u8; 8192]);
    let options = format!("driver=raw,file.filename={},file.cache=none", file.name());
    let blk = run_in_coroutine(move |co| {
        let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options).unwrap();
        BlockBackend::new(node)
    })
    .unwrap();
    assert!(blk.root().alignment().request > 1, "O_DIRECT needs aligned requests");
    let threads = [IoThread::spawn("aligned").unwrap(), IoThread::spawn("padded").unwrap()];
    let (done, ended) = mpsc::channel();
    // Set once every whole-block write is done; the padded writer races them until then.
    let aligned_done = Arc::new(AtomicBool::new(false));
    let (b, d, a) = (blk.clone(), done.clone(), aligned_done.clone());
    threads[0]
        .handle()
        .spawn(move |co| {
            let mut block = IoBuffer::new(4096);
            let mut reverted = 0;
            for round in 1..=ROUNDS {
                block.fill(round);
                b.write(co, 0, &block).unwrap();
                // Only this coroutine writes whole blocks, so the bytes around the padded
                // range hold this round until it writes the next, unless a padded write
                // that read them before this write put older bytes back.
                b.read(co, 0, &mut block).unwrap();
                if block[..10].iter().chain(&block[110..]).any(|&byte| byte != round) {
                    reverted += 1;
                }
            }
            a.store(true, Ordering::SeqCst);
            d.send(reverted).unwrap();
        })
        .unwrap();
    let b = blk.clone();
    threads[1]
        .handle()
        .spawn(move |co| {
            // At least four padded writes per round, and the last one after the last
            // whole-block write (the lock does not promise which thread goes first: a
            // running writer may take it past a woken one).
            let mut writes = 0;
            loop {
                let last = aligned_done.load(Ordering::SeqCst);
                b.write(co, 10, &[0xFF; 100]).unwrap();
                writes += 1;
                if last && writes >= u32::from(ROUNDS) * 4 {
                    break;
                }
            }
            done.send(0).unwrap();
        })
        .unwrap();
    let reverted: u32 = (0..2).map(|_| ended.recv_timeout(HANG).expect("the writers end")).sum();
    assert_eq!(reverted, 0, "rounds whose whole-block write a padded write undid");
    for thread in threads {
        thread.stop();
    }
    let contents = file.contents();
    assert_eq!(&contents[10..110], &[0xFF; 100][..], "the padded write's bytes");
    let stale = contents[..10].iter().chain(&contents[110..4096]).position(|&b| b != ROUNDS);
    assert_eq!(stale, None, "every byte around the padded write holds the last whole write");
}
