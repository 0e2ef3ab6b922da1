//! Several IoThreads write pieces of the same fresh clusters of one qcow2 image (so that their
//! writes wait for, or merge into, each other's allocations) while the filter node under the image
//! fails one write with `EIO`: the requests around the failing one lose nothing. Also with the
//! clusters shared with an internal snapshot (copied on write), and as subclusters of clusters with
//! extended L2 entries. After a final flush every acknowledged piece is there, every failed one
//! reads as before or as written, and `qemu-img check` finds no corruption.
//!
//! `QCOW2_CONCURRENT_FAULTS=N` runs N failure points (default 24).

mod common;
mod qcow2_support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use aiocoro::aio::AioContext;
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

/// Runs all writers on `image`, failing the `n`-th write; returns each piece's outcome
/// `(writer, piece, acknowledged)`.
fn run(image: &Path, cluster_size: u64, n: u64) -> Vec<(usize, usize, bool)> {
    let path = image.to_path_buf();
    let (graph, blk, faults) = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        // Two L2 tables: the writers evict each other's.
        let caches = CacheSizes { l2_bytes: 2 * cluster_size, refcount_bytes: 0 };
        let (node, faults) = open_faulty_qcow2_with(co, &graph, &path, caches);
        (graph, BlockBackend::new(node), faults)
    })
    .unwrap();
    faults.stop_flushes_here();
    faults.fail_write_number(n, libc::EIO);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (blk, outcomes) = (blk.clone(), outcomes.clone());
            std::thread::spawn(move || {
                let ctx = AioContext::new().unwrap();
                let coroutines: Vec<_> = (0..COROUTINES)
                    .map(|c| {
                        let (blk, outcomes) = (blk.clone(), outcomes.clone());
                        let w = t * COROUTINES + c;
                        ctx.spawn(move |co| {
                            for p in 0..PIECES {
                                let bytes = pattern(PIECE as usize, (w * PIECES + p) as u8 | 1);
                                let result = blk.write(co, piece_at(w, p), &bytes);
                                if let Err(error) = &result {
                                    let text = error.to_string();
                                    assert!(text.contains("Input/output error"), "{text}");
                                }
                                outcomes.lock().unwrap().push((w, p, result.is_ok()));
                            }
                        })
                    })
                    .collect();
                ctx.wait_while(|| coroutines.iter().any(|co| !co.is_finished()));
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a writer panicked");
    }
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
    let points: u64 = std::env::var("QCOW2_CONCURRENT_FAULTS")
        .map(|value| value.parse().expect("QCOW2_CONCURRENT_FAULTS is a number"))
        .unwrap_or(24);
    let image = scratch.path("image.qcow2");
    for n in 0..points {
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
