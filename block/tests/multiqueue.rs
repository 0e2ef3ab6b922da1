//! Multiqueue: several IoThreads write through one `BlockBackend` (a clone each) to one file,
//! with the page cache and with `O_DIRECT`. The main thread drains now and then while they
//! run, and checks the file inside each drained section and at the end, byte for byte.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use aiocoro::aio::IoThread;
use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockGraph, IoBuffer, run_in_coroutine};
use common::{HANG, TempFile};

const BLOCK: usize = 4096;
/// IoThreads writing at once.
const THREADS: usize = 4;
/// Coroutines per IoThread (the queue depth of each).
const DEPTH: usize = 4;

/// A block stamped with who wrote it: 16-byte records `[block, thread, seq, !block]`
/// repeated, so a torn or misplaced block cannot pass for a whole one.
fn stamp(block: usize, thread: usize, seq: usize) -> Vec<u8> {
    let record: Vec<u8> = [block as u32, thread as u32, seq as u32, !(block as u32)]
        .iter()
        .flat_map(|word| word.to_le_bytes())
        .collect();
    record.iter().copied().cycle().take(BLOCK).collect()
}

/// The `(thread, seq)` a block was stamped with, or `None` for a block of zeroes; panics on
/// anything else (torn, misplaced, garbage).
fn parse(block: usize, data: &[u8]) -> Option<(usize, usize)> {
    if data.iter().all(|&b| b == 0) {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()) as usize;
    let (thread, seq) = (word(1), word(2));
    assert!(data == stamp(block, thread, seq), "block {block} is not a whole stamp");
    Some((thread, seq))
}

/// Starts the IoThreads and opens `file` with `cache`, for one backend that all share.
fn setup(file: &TempFile, cache: &str) -> (Vec<IoThread>, BlockBackend) {
    let iothreads = (0..THREADS).map(|i| IoThread::spawn(&format!("mq-{i}")).unwrap()).collect();
    let options = format!("driver=raw,file.filename={},file.cache={cache}", file.name());
    let blk = run_in_coroutine(move |co| {
        let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options).unwrap();
        BlockBackend::new(node)
    })
    .unwrap();
    (iothreads, blk)
}

/// Runs `work(co, blk, thread, lane)` in `DEPTH` coroutines on every IoThread; while they
/// run, drains again and again and calls `check` with the file's contents inside each
/// section; returns once all have ended and how many sections were checked.
fn run_phase(
    iothreads: &[IoThread],
    blk: &BlockBackend,
    work: impl Fn(&Co, &BlockBackend, usize, usize) + Send + Sync + 'static,
    mut check: impl FnMut(&[u8]),
    file: &TempFile,
) -> usize {
    let work = Arc::new(work);
    let (tx, rx) = mpsc::channel();
    for (thread, iothread) in iothreads.iter().enumerate() {
        for lane in 0..DEPTH {
            let (blk, tx, work) = (blk.clone(), tx.clone(), work.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    work(co, &blk, thread, lane);
                    tx.send(()).unwrap();
                })
                .unwrap();
        }
    }
    drop(tx);
    let mut sections = 0;
    let mut ended = 0;
    let start = Instant::now();
    while ended < THREADS * DEPTH {
        assert!(start.elapsed() < HANG, "the writers did not end: a hang");
        {
            let _drained = blk.drain();
            assert_eq!(blk.in_flight(), 0, "a request runs inside a drained section");
            check(&file.contents());
            assert_eq!(blk.in_flight(), 0, "a request started inside a drained section");
            sections += 1;
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(()) => ended += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a writer died"),
        }
        ended += rx.try_iter().count();
    }
    sections
}

/// Writes `data` at block `block`, from an aligned buffer or (every third block) a
/// misaligned one, so that `O_DIRECT` bounces some.
fn write_block(co: &Co, blk: &BlockBackend, block: usize, data: &[u8]) {
    let offset = (block * BLOCK) as u64;
    if block.is_multiple_of(3) {
        let mut odd = vec![0u8; BLOCK + 1];
        odd[1..].copy_from_slice(data);
        blk.write(co, offset, &odd[1..]).unwrap();
    } else {
        blk.write(co, offset, &IoBuffer::copy_from(data)).unwrap();
    }
}

/// Disjoint ranges: thread `t` owns blocks `t * PER_THREAD ..`, and its coroutines write each
/// of them `ROUNDS` times with a growing sequence number. Inside every drained section each
/// block holds zeroes or one of its own writes, at least as new as the last one known done;
/// at the end each holds its last write.
fn disjoint(cache: &str) {
    const PER_THREAD: usize = 96;
    const ROUNDS: usize = 3;
    let blocks = THREADS * PER_THREAD;
    let file = TempFile::with_contents("mq-disjoint", &vec![0; blocks * BLOCK]);
    let (iothreads, blk) = setup(&file, cache);
    // done[block][round]: the write of `round` to `block` has returned.
    let done: Arc<Vec<[AtomicBool; ROUNDS]>> =
        Arc::new((0..blocks).map(|_| Default::default()).collect());
    let marks = done.clone();
    let work = move |co: &Co, blk: &BlockBackend, thread: usize, lane: usize| {
        for round in 0..ROUNDS {
            for i in (lane..PER_THREAD).step_by(DEPTH) {
                let block = thread * PER_THREAD + i;
                write_block(co, blk, block, &stamp(block, thread, round));
                marks[block][round].store(true, Ordering::SeqCst);
            }
        }
    };
    let check = |image: &[u8]| {
        for (block, data) in image.chunks(BLOCK).enumerate() {
            // Read the marks after the image: every mark set now was set before the section.
            let newest_done = (0..ROUNDS).rev().find(|&r| done[block][r].load(Ordering::SeqCst));
            match parse(block, data) {
                None => assert_eq!(newest_done, None, "block {block}: a done write is missing"),
                Some((thread, round)) => {
                    assert_eq!(thread, block / PER_THREAD, "block {block}: another thread's write");
                    assert!(round < ROUNDS, "block {block}: round {round}");
                    let newest = newest_done.unwrap_or(0);
                    assert!(round >= newest, "block {block}: round {round} after {newest} done");
                }
            }
        }
    };
    run_phase(&iothreads, &blk, work, check, &file);
    iothreads.into_iter().for_each(IoThread::stop);

    let _drained = blk.drain();
    assert_eq!(blk.in_flight(), 0);
    let mut shadow = Vec::with_capacity(blocks * BLOCK);
    for block in 0..blocks {
        shadow.extend(stamp(block, block / PER_THREAD, ROUNDS - 1));
    }
    assert!(file.contents() == shadow, "the file differs from the shadow");
}

/// Overlapping ranges: every coroutine writes `WRITES` blocks chosen (deterministically)
/// from one shared range, stamped `(thread, seq)`. Inside every drained section and after
/// the phase each block holds zeroes (afterwards: only if no write targeted it) or one of
/// the writes that targeted it. Then, after all have ended (the barrier), each thread
/// rewrites the blocks it owns (`block % THREADS`), and the file must match the shadow.
fn overlapping(cache: &str) {
    const BLOCKS: usize = 48;
    const WRITES: usize = 40;
    const FINAL: usize = usize::MAX >> 40;
    let file = TempFile::with_contents("mq-overlap", &vec![0; BLOCKS * BLOCK]);
    let (iothreads, blk) = setup(&file, cache);
    let target = |thread: usize, lane: usize, i: usize| {
        let mut x = (thread * 7919 + lane * 104_729 + i * 1_299_709) as u64;
        x ^= x >> 7;
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (x >> 33) as usize % BLOCKS
    };
    // The candidates of each block: every (thread, seq) that targets it.
    let mut candidates: HashMap<usize, HashSet<(usize, usize)>> = HashMap::new();
    for thread in 0..THREADS {
        for lane in 0..DEPTH {
            for i in 0..WRITES {
                let seq = lane * WRITES + i;
                candidates.entry(target(thread, lane, i)).or_default().insert((thread, seq));
            }
        }
    }
    let check = |image: &[u8]| {
        for (block, data) in image.chunks(BLOCK).enumerate() {
            if let Some(writer) = parse(block, data) {
                let targeted = candidates.get(&block).is_some_and(|set| set.contains(&writer));
                assert!(targeted, "block {block} holds {writer:?}, which never targeted it");
            }
        }
    };
    let work = move |co: &Co, blk: &BlockBackend, thread: usize, lane: usize| {
        for i in 0..WRITES {
            let block = target(thread, lane, i);
            write_block(co, blk, block, &stamp(block, thread, lane * WRITES + i));
        }
    };
    run_phase(&iothreads, &blk, work, check, &file);
    {
        let _drained = blk.drain();
        let image = file.contents();
        check(&image);
        for (block, data) in image.chunks(BLOCK).enumerate() {
            let written = candidates.contains_key(&block);
            assert_eq!(parse(block, data).is_some(), written, "block {block}");
        }
    }

    // Phase 2, after the barrier: each thread rewrites its own blocks, one lane each.
    let rewrite = move |co: &Co, blk: &BlockBackend, thread: usize, lane: usize| {
        for block in (0..BLOCKS).filter(|b| b % THREADS == thread && b / THREADS % DEPTH == lane) {
            write_block(co, blk, block, &stamp(block, thread, FINAL));
        }
    };
    let mixed = |image: &[u8]| {
        for (block, data) in image.chunks(BLOCK).enumerate() {
            match parse(block, data) {
                Some((thread, FINAL)) => assert_eq!(thread, block % THREADS, "block {block}"),
                Some(writer) => {
                    let targeted = candidates.get(&block).is_some_and(|set| set.contains(&writer));
                    assert!(targeted, "block {block} holds {writer:?}, which never targeted it");
                }
                None => assert!(!candidates.contains_key(&block), "block {block} lost its data"),
            }
        }
    };
    run_phase(&iothreads, &blk, rewrite, mixed, &file);
    iothreads.into_iter().for_each(IoThread::stop);
    let _drained = blk.drain();
    let shadow: Vec<u8> =
        (0..BLOCKS).flat_map(|block| stamp(block, block % THREADS, FINAL)).collect();
    assert!(file.contents() == shadow, "the file differs from the shadow");
}

#[test]
fn disjoint_ranges_through_the_page_cache() {
    disjoint("writeback");
}

#[test]
fn disjoint_ranges_with_o_direct() {
    disjoint("none");
}

#[test]
fn overlapping_ranges_through_the_page_cache() {
    overlapping("writeback");
}

#[test]
fn overlapping_ranges_with_o_direct() {
    overlapping("none");
}
