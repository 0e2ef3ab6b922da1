//! Several IoThreads write pieces of the same fresh clusters of one qcow2 image (so that their
//! writes wait for, or merge into, each other's allocations) while the filter node under the image
//! fails one write with `EIO`: the requests around the failing one lose nothing. Also with the
//! clusters shared with an internal snapshot (copied on write), and as subclusters of clusters with
//! extended L2 entries. After a final flush every acknowledged piece is there, every failed one
//! reads as before or as written, and `qemu-img check` finds no corruption. And requests of
//! every kind at random (discards, zero writes, compressed writes and flushes among the writes)
//! over clusters shared with a snapshot, around a failing write: the image stays consistent and
//! qemu-img reads what we read.
//!
//! `QCOW2_CONCURRENT_FAULTS=N` runs N failure points per test (default 24).

mod common;
mod qcow2_support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::CacheSizes;
use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use common::faults::{Faults, open_faulty_qcow2_with};
use common::pattern;
use qcow2_support::*;

/// What the writers share, piece by piece: a cluster (a subcluster with extended L2 entries).
const CLUSTER: u64 = 512;
const THREADS: usize = 2;
const COROUTINES: usize = 4;
/// Each coroutine writes this many pieces.
const PIECES: usize = 24;
/// A piece: a fixed slot of each cluster per writer, so that the final bytes are known.
const PIECE: u64 = CLUSTER / (THREADS * COROUTINES) as u64;

/// Where writer `w`'s piece `p` goes: slot `w` of a cluster that every writer writes.
fn piece_at(w: usize, p: usize) -> u64 {
    let cluster = (p as u64 * 7919) % 2048;
    cluster * CLUSTER + w as u64 * PIECE
}

/// Opens `image` (of `cluster_size`-byte clusters) over a fault filter whose flushes stop
/// there, with two L2 tables cached (the writers evict each other's).
fn open(image: &Path, cluster_size: u64) -> (BlockGraph, BlockBackend, Arc<Faults>) {
    let path = image.to_path_buf();
    let opened = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let caches = CacheSizes { l2_bytes: 2 * cluster_size, refcount_bytes: 0 };
        let (node, faults) = open_faulty_qcow2_with(co, &graph, &path, caches);
        faults.stop_flushes_here();
        (graph, BlockBackend::new(node), faults)
    });
    opened.unwrap()
}

/// Runs `work(co, blk, writer)` in `COROUTINES` coroutines on each of `THREADS` IoThreads
/// (writers `0..THREADS * COROUTINES`), until all are done.
fn on_iothreads(
    blk: &BlockBackend,
    work: impl Fn(&Co, &BlockBackend, usize) + Clone + Send + 'static,
) {
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (blk, work) = (blk.clone(), work.clone());
            std::thread::spawn(move || {
                let ctx = AioContext::new().unwrap();
                let coroutines: Vec<_> = (0..COROUTINES)
                    .map(|c| {
                        let (blk, work) = (blk.clone(), work.clone());
                        ctx.spawn(move |co| work(co, &blk, t * COROUTINES + c))
                    })
                    .collect();
                ctx.wait_while(|| coroutines.iter().any(|co| !co.is_finished()));
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a writer panicked");
    }
}

/// Runs all writers on `image`, failing the `n`-th write; returns each piece's outcome
/// `(writer, piece, acknowledged)`.
fn run(image: &Path, cluster_size: u64, n: u64) -> Vec<(usize, usize, bool)> {
    let (graph, blk, faults) = open(image, cluster_size);
    faults.fail_write_number(n, libc::EIO);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let recorded = outcomes.clone();
    on_iothreads(&blk, move |co, blk, w| {
        for p in 0..PIECES {
            let bytes = pattern(PIECE as usize, (w * PIECES + p) as u8 | 1);
            let result = blk.write(co, piece_at(w, p), &bytes);
            if let Err(error) = &result {
                let text = error.to_string();
                assert!(text.contains("Input/output error"), "{text}");
            }
            recorded.lock().unwrap().push((w, p, result.is_ok()));
        }
    });
    finish(blk, &faults);
    drop(graph);
    Arc::try_unwrap(outcomes).ok().unwrap().into_inner().unwrap()
}

/// Flushes (no fault left) and closes.
fn finish(blk: BlockBackend, faults: &Arc<Faults>) {
    let faults = faults.clone();
    run_in_coroutine(move |co| {
        faults.heal();
        blk.flush(co).expect("the flush after a transient write error");
        blk.close(co).unwrap();
    })
    .unwrap();
}

/// How many failure points a test tries: `QCOW2_CONCURRENT_FAULTS` (default 24).
fn points() -> u64 {
    std::env::var("QCOW2_CONCURRENT_FAULTS")
        .map(|value| value.parse().expect("QCOW2_CONCURRENT_FAULTS is a number"))
        .unwrap_or(24)
}

/// Runs the writers on copies of an image of `cluster_size`-byte clusters made with
/// qemu-img's `options` (zeroes written over it and an internal snapshot taken if
/// `snapshot`), failing a different write each time.
fn around_failing_writes(name: &str, options: &str, cluster_size: u64, snapshot: bool) {
    let scratch = Scratch::new(name);
    let base = scratch.path("base.qcow2");
    create_qcow2(base.to_str().unwrap(), options, "1M");
    if snapshot {
        qemu_io("qcow2", &base, &["write -P 0 0 1M"]);
        qemu_img(&["snapshot", "-c", "kept", base.to_str().unwrap()]);
    }
    let image = scratch.path("image.qcow2");
    for n in 0..points() {
        std::fs::copy(&base, &image).unwrap();
        // Spread over the writes a run makes (a few hundred).
        let outcomes = run(&image, cluster_size, 1 + n * 17 % 300);
        let (status, report) = check_status(&image);
        assert!(status == 0 || status == 3, "point {n}: {report}");
        let seen = read_ours(&image, 1 << 20).unwrap();
        for (w, p, acknowledged) in outcomes {
            let at = piece_at(w, p) as usize;
            let got = &seen[at..at + PIECE as usize];
            let written = pattern(PIECE as usize, (w * PIECES + p) as u8 | 1);
            let old = vec![0u8; PIECE as usize];
            if acknowledged {
                assert!(got == written, "point {n}: writer {w} piece {p} was acknowledged, lost");
            } else {
                assert!(got == written || got == old, "point {n}: writer {w} piece {p}: torn");
            }
        }
    }
}

#[test]
fn concurrent_writers_around_a_failing_write_lose_nothing() {
    around_failing_writes("concurrent-faults", "cluster_size=512", 512, false);
}

#[test]
fn concurrent_copies_of_snapshot_clusters_around_a_failing_write_lose_nothing() {
    around_failing_writes("concurrent-faults-snapshot", "cluster_size=512", 512, true);
}

#[test]
fn concurrent_subcluster_writers_around_a_failing_write_lose_nothing() {
    // The writers' 512-byte "clusters" are subclusters of 16 KiB clusters.
    around_failing_writes(
        "concurrent-faults-extended",
        "cluster_size=16k,extended_l2=on",
        16 << 10,
        false,
    );
}

/// Requests of every kind at random (writes, discards, zero writes, compressed writes of
/// whole clusters, flushes) into the same 64 KiB from every writer while one write fails:
/// whatever the interleaving, the image stays consistent (`qemu-img check`: leaks at worst,
/// no compressed entry with subclusters marked) and qemu-img reads what we read.
fn mixed_requests_around_failing_writes(name: &str, options: &str, cluster_size: u64) {
    let scratch = Scratch::new(name);
    let base = scratch.path("base.qcow2");
    create_qcow2(base.to_str().unwrap(), options, "1M");
    qemu_io("qcow2", &base, &["write -P 9 0 32k"]);
    qemu_img(&["snapshot", "-c", "kept", base.to_str().unwrap()]);
    let image = scratch.path("image.qcow2");
    for n in 0..points() {
        std::fs::copy(&base, &image).unwrap();
        let (graph, blk, faults) = open(&image, cluster_size);
        faults.fail_write_number(1 + n * 7, libc::EIO);
        on_iothreads(&blk, move |co, blk, w| {
            let mut rng = Rng(n * 1000 + w as u64 + 1);
            for _ in 0..60 {
                let at = rng.below(64) * 512 + rng.below(2) * rng.below(512);
                let len = (1 + rng.below(1500)).min((64 << 10) - at);
                // Errors are allowed (the failing write): the image is what is checked.
                let _ = match rng.below(10) {
                    0..=5 => blk.write(co, at, &vec![1 + rng.below(255) as u8; len as usize]),
                    6 => blk.discard(co, at, len),
                    7 => blk.write_zeroes(co, at, len, true),
                    8 => blk.flush(co),
                    _ => {
                        let cluster = at / cluster_size * cluster_size;
                        blk.write_compressed(co, cluster, &pattern(cluster_size as usize, w as u8))
                    }
                };
            }
        });
        finish(blk, &faults);
        drop(graph);
        let (status, report) = check_status(&image);
        assert!(status == 0 || status == 3, "point {n}: {report}");
        let ours = read_ours(&image, 1 << 20).unwrap();
        assert_same_bytes(&ours, &qemu_raw(&image), &format!("point {n}: ours and qemu-img's"));
    }
}

#[test]
fn mixed_requests_around_a_failing_write_leave_a_consistent_image() {
    mixed_requests_around_failing_writes("concurrent-faults-mixed", "cluster_size=512", 512);
}

#[test]
fn mixed_subcluster_requests_around_a_failing_write_leave_a_consistent_image() {
    let options = "cluster_size=16k,extended_l2=on";
    mixed_requests_around_failing_writes("concurrent-faults-mixed-extended", options, 16 << 10);
}
