//! Images with extended L2 entries (`extended_l2=on`, 32 subclusters a cluster), both ways:
//! we read what `qemu-io` wrote in subcluster patterns, `qemu-io` and `qemu-img` read what we
//! wrote (over a backing file too), `qemu-img check` finds no error or leak after our
//! writes, zero writes and discards, and our writes allocate only the subclusters they
//! touch. Compressed overwrites racing subcluster writes on another IoThread
//! (`QCOW2_COMPRESSED_RACE_ROUNDS=N` rounds of 8 clusters, default 4) leave a serial result.

mod common;
mod qcow2_support;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::{CreateOptions, Repair, check_image_file, create_file};
use aiocoro_block::{Allocation, BlockBackend, BlockGraph, run_in_coroutine};
use common::faults::open_faulty_qcow2;
use qcow2_support::*;

const K: u64 = 1024;
/// The image size: 2 MiB, of 64 KiB clusters with 2 KiB subclusters.
const SIZE: u64 = 2 << 20;

/// What a step does to the guest, applied to our image and the shadow alike.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    /// Discards (over a backing file: zeroes) the whole 2 KiB subclusters inside.
    Discard(u64, u64),
}

impl Op {
    /// Applies the op to `shadow` (the guest's bytes).
    fn mirror(self, shadow: &mut [u8]) {
        let (range, byte) = match self {
            Op::Write(offset, len, byte) => (offset..offset + len, byte),
            Op::Zero(offset, len) => (offset..offset + len, 0),
            Op::Discard(offset, len) => {
                (offset.next_multiple_of(2 * K)..(offset + len) / (2 * K) * (2 * K), 0)
            }
        };
        if range.start < range.end {
            shadow[range.start as usize..range.end as usize].fill(byte);
        }
    }
}

/// `base.raw` in `scratch`: `SIZE` bytes of 0xa1.
fn filled_base(scratch: &Scratch) -> PathBuf {
    let base = scratch.path("base.raw");
    std::fs::write(&base, vec![0xa1; SIZE as usize]).unwrap();
    base
}

/// An extended-L2 image `name` of 64 KiB clusters over `base.raw`, made by `qemu-img`.
fn qemu_image_over_base(scratch: &Scratch, name: &str) -> PathBuf {
    let image = scratch.path(name);
    create_qcow2_over(image.to_str().unwrap(), "extended_l2=on", "base.raw", "raw", "2M");
    image
}

/// Runs `ops` through our driver, then flushes.
fn ours(image: &Path, ops: Vec<Op>) {
    with_image(&qcow2_rw_options(image), move |co, blk| {
        for op in &ops {
            match *op {
                Op::Write(offset, len, byte) => blk.write(co, offset, &vec![byte; len as usize])?,
                Op::Zero(offset, len) => blk.write_zeroes(co, offset, len, true)?,
                Op::Discard(offset, len) => blk.discard(co, offset, len)?,
            }
        }
        blk.flush(co)
    })
    .unwrap();
}

/// Asserts that our driver, `qemu-img convert` and `qemu-img compare` all see `shadow` in
/// `image`, and that `qemu-img check` finds nothing.
fn assert_everyone_sees(image: &Path, shadow: &[u8], what: &str) {
    qemu_check(image);
    assert_same_bytes(&read_ours(image, 3000).unwrap(), shadow, &format!("{what}, ours"));
    assert_same_bytes(&read_ours(image, 1 << 20).unwrap(), shadow, &format!("{what}, ours"));
    assert_same_bytes(&qemu_raw(image), shadow, &format!("{what}, qemu-img"));
    let raw = image.with_extension("shadow.raw");
    std::fs::write(&raw, shadow).unwrap();
    qemu_compare(image, &raw);
}

#[test]
fn we_read_what_qemu_io_wrote_in_subcluster_patterns() {
    let scratch = Scratch::new("extl2-read");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "a.qcow2");
    let mut shadow = vec![0xa1; SIZE as usize];
    let ops = [
        ("write -P 0x11 0 2k", Op::Write(0, 2 * K, 0x11)),
        ("write -P 0x22 5k 3k", Op::Write(5 * K, 3 * K, 0x22)),
        ("write -P 0x23 11k 100", Op::Write(11 * K, 100, 0x23)),
        ("write -z 64k 6k", Op::Zero(64 * K, 6 * K)),
        ("write -P 0x33 66k 1k", Op::Write(66 * K, K, 0x33)),
        ("write -P 0x44 190k 140k", Op::Write(190 * K, 140 * K, 0x44)),
        ("write -z 512k 64k", Op::Zero(512 * K, 64 * K)),
        ("write -P 0x55 1000k 64k", Op::Write(1000 * K, 64 * K, 0x55)),
        ("write -z 1002k 2k", Op::Zero(1002 * K, 2 * K)),
        ("discard 256k 64k", Op::Zero(256 * K, 64 * K)),
    ];
    let commands: Vec<&str> = ops.iter().map(|(command, _)| *command).collect();
    qemu_io("qcow2", &image, &commands);
    for (_, op) in ops {
        op.mirror(&mut shadow);
    }
    assert_same_bytes(&qemu_raw(&image), &shadow, "qemu-img's view of its own writes");
    assert_same_bytes(&read_ours(&image, 1000).unwrap(), &shadow, "ours, 1000-byte reads");
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &shadow, "ours, 1 MiB reads");
    // Block status goes subcluster by subcluster: 0..2k data, 2k..4k unallocated (backing).
    let status = status_ours(&image).unwrap();
    assert_eq!(status[0], (0, 2 * K, Allocation::Data), "{status:?}");
    assert_eq!(status[1], (2 * K, 2 * K, Allocation::Unallocated), "{status:?}");
    // 64k..70k zeroed, then 1k written at 66k: subcluster 1 holds data between zeroes.
    let cluster_1 = [
        (64 * K, 2 * K, Allocation::Zero),
        (66 * K, 2 * K, Allocation::Data),
        (68 * K, 2 * K, Allocation::Zero),
    ];
    assert!(status.windows(3).any(|runs| runs == cluster_1), "{status:?}");
    // A run goes on across clusters: one answer for the unallocated rest of the image.
    let rest = with_image(&qcow2_options(&image), |co, blk| {
        blk.block_status(co, 1100 * K, SIZE - 1100 * K)
    })
    .unwrap();
    assert_eq!((rest.len, rest.allocation), (SIZE - 1100 * K, Allocation::Unallocated));
}

#[test]
fn qemu_reads_what_we_wrote_over_a_backing_file() {
    let scratch = Scratch::new("extl2-write");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "b.qcow2");
    let mut shadow = vec![0xa1; SIZE as usize];
    let ops = vec![
        Op::Write(0, 2 * K, 0x11),          // one whole subcluster
        Op::Write(5 * K, 3 * K, 0x22),      // a partial subcluster, then a whole one
        Op::Write(11 * K + 7, 100, 0x23),   // inside one subcluster: copied on write
        Op::Write(11 * K + 500, 10, 0x24),  // in place, into an allocated subcluster
        Op::Write(63 * K, 3 * K, 0x25),     // across two clusters
        Op::Write(200 * K, 200 * K, 0x26),  // whole clusters and partial ones
        Op::Zero(204 * K, 6 * K),           // zero subclusters of an allocated cluster
        Op::Zero(210 * K + 1, 2 * K),       // partial subclusters: zero bytes written
        Op::Write(205 * K, 100, 0x27),      // into a zero subcluster
        Op::Discard(300 * K + 512, 10 * K), // discard whole subclusters only
        Op::Zero(320 * K, 64 * K),          // a whole cluster
        Op::Discard(1024 * K, 64 * K),      // an unallocated cluster
        Op::Zero(1100 * K, 4 * K),          // subclusters of an unallocated cluster
        Op::Write(1101 * K, 10, 0x28),      // into one of them
        Op::Write(SIZE - 3, 3, 0x29),       // the last bytes
    ];
    for op in &ops {
        op.mirror(&mut shadow);
    }
    ours(&image, ops);
    assert_everyone_sees(&image, &shadow, "after our writes");

    // And back: qemu-io writes in between, we read and write again.
    let theirs =
        [("write -P 0x31 6k 1k", Op::Write(6 * K, K, 0x31)), ("write -z 0 1k", Op::Zero(0, K))];
    let commands: Vec<&str> = theirs.iter().map(|(command, _)| *command).collect();
    qemu_io("qcow2", &image, &commands);
    for (_, op) in theirs {
        op.mirror(&mut shadow);
    }
    let ops = vec![Op::Write(500, 10, 0x41), Op::Write(6 * K + 1000, 2000, 0x42)];
    for op in &ops {
        op.mirror(&mut shadow);
    }
    ours(&image, ops);
    assert_everyone_sees(&image, &shadow, "after qemu-io's writes and ours");
    qemu_io("qcow2", &image, &["read -q -P 0x41 500 10", "read -q -P 0xa1 16k 1k"]);
}

#[test]
fn a_small_write_into_a_fresh_cluster_allocates_only_its_subclusters() {
    let scratch = Scratch::new("extl2-bitmap");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "c.qcow2");
    // 4 KiB at 6 KiB: subclusters 3 and 4 of cluster 0.
    ours(&image, vec![Op::Write(6 * K, 4 * K, 0x5a), Op::Write(65 * K, 10, 0x5b)]);
    let entry = l2_entry_at(&image, 0);
    // The second entry (index 1) is 16 bytes further: extended entries.
    let (first, bitmap) = (peek_u64(&image, entry), peek_u64(&image, entry + 8));
    assert_ne!(first & 0x00ff_ffff_ffff_fe00, 0, "cluster 0 has a host cluster");
    assert_eq!(bitmap, 0b11000, "only subclusters 3 and 4 are allocated");
    // 10 bytes at 65k: subcluster 0 of cluster 1, copied on write from the backing file.
    assert_eq!(peek_u64(&image, entry + 24), 1);
    let map = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
    assert!(map.contains("\"start\": 6144, \"length\": 4096"), "{map}");
    let mut shadow = vec![0xa1; SIZE as usize];
    Op::Write(6 * K, 4 * K, 0x5a).mirror(&mut shadow);
    Op::Write(65 * K, 10, 0x5b).mirror(&mut shadow);
    assert_everyone_sees(&image, &shadow, "two small writes");
}

#[test]
fn random_writes_zeroes_and_discards_match_a_shadow() {
    let scratch = Scratch::new("extl2-random");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "d.qcow2");
    let mut shadow = vec![0xa1; SIZE as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let ops: Vec<Op> = (0..400)
        .map(|i| {
            let offset = rng.below(SIZE - 1);
            let len = (rng.below(12 * K) + 1).min(SIZE - offset);
            match rng.below(10) {
                0 => Op::Zero(offset, len),
                1 => Op::Discard(offset, len),
                _ => Op::Write(offset, len, (i % 250) as u8 + 1),
            }
        })
        .collect();
    for op in &ops {
        op.mirror(&mut shadow);
    }
    ours(&image, ops);
    assert_everyone_sees(&image, &shadow, "400 random ops");
}

#[test]
fn concurrent_writes_into_the_same_subclusters_keep_each_others_bytes() {
    // Coroutines on two threads write interleaved 700-byte pieces (so most pieces share a
    // subcluster with another coroutine's, and are copied on write) into the same clusters.
    const WRITERS: u64 = 8;
    const PIECE: u64 = 700;
    let scratch = Scratch::new("extl2-concurrent");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "e.qcow2");
    let options = qcow2_rw_options(&image);
    let blk = open_backend(&options);
    let pieces = 256 * K / PIECE;
    let writers = |t: u64| -> Vec<Body> {
        (0..WRITERS / 2)
            .map(|c| {
                let (blk, writer) = (blk.clone(), t * WRITERS / 2 + c);
                Box::new(move |co: &Co| {
                    for piece in (writer..pieces).step_by(WRITERS as usize) {
                        let data = vec![piece as u8 | 1; PIECE as usize];
                        blk.write(co, piece * PIECE, &data).unwrap();
                    }
                }) as Body
            })
            .collect()
    };
    on_two_iothreads([writers(0), writers(1)]);
    run_in_coroutine(move |co| blk.flush(co)).unwrap().unwrap();
    let mut shadow = vec![0xa1; SIZE as usize];
    for piece in 0..pieces {
        Op::Write(piece * PIECE, PIECE, piece as u8 | 1).mirror(&mut shadow);
    }
    assert_everyone_sees(&image, &shadow, "concurrent interleaved writes");
}

#[test]
fn images_we_create_with_extended_l2_entries_are_qemus() {
    let scratch = Scratch::new("extl2-create");
    let image = scratch.path("f.qcow2");
    let options = CreateOptions {
        extended_l2: true,
        cluster_size: 32 * K,
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(SIZE)
    };
    filled_base(&scratch);
    let path = image.clone();
    run_in_coroutine(move |co| create_file(co, &path, &options)).unwrap().unwrap();
    let info = qemu_img(&["info", image.to_str().unwrap()]);
    assert!(info.contains("extended l2: true"), "{info}");
    qemu_check(&image);
    let mut shadow = vec![0xa1; SIZE as usize];
    let ops = vec![Op::Write(K, 100, 0x61), Op::Write(40 * K, 30 * K, 0x62), Op::Zero(96 * K, K)];
    for op in &ops {
        op.mirror(&mut shadow);
    }
    ours(&image, ops);
    assert_everyone_sees(&image, &shadow, "our own extended-L2 image");
    // 32 KiB clusters have 1 KiB subclusters: the write of 100 bytes at 1k allocated one.
    assert_eq!(peek_u64(&image, l2_entry_at(&image, 0) + 8), 0b10);

    let small =
        CreateOptions { extended_l2: true, cluster_size: 8 * K, ..CreateOptions::new(SIZE) };
    let path = scratch.path("small.qcow2");
    let error = run_in_coroutine(move |co| create_file(co, &path, &small)).unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("16K"), "{error}");
}

#[test]
fn extended_l2_entries_need_16k_clusters() {
    let scratch = Scratch::new("extl2-small");
    let image = scratch.path("g.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=4k", "1M");
    // Incompatible feature bit 4 on a 4 KiB-cluster image: subclusters of 128 bytes.
    poke(&image, 72, &(1u64 << 4).to_be_bytes());
    let error = open_error(&image);
    assert_eq!(error.kind(), ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("extended L2"), "{error}");
    assert!(error.to_string().contains("16384"), "{error}");
}

#[test]
fn our_check_agrees_with_qemu_img_check_on_extended_entries() {
    let scratch = Scratch::new("extl2-check");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "h.qcow2");
    ours(
        &image,
        vec![Op::Write(K, 100, 1), Op::Write(100 * K, 300 * K, 2), Op::Zero(128 * K, 8 * K)],
    );
    let name = image.to_str().unwrap();
    let report = check_image_file(&image, Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    assert_eq!(report.human(), qemu_img(&["check", name]), "the same counts of clusters");

    // Subcluster 0 of cluster 0 allocated and zero at once, and subcluster 1 of the
    // unallocated cluster 10 allocated: invalid entries for both of us.
    let entry_at = l2_entry_at(&image, 0);
    poke(&image, entry_at + 8, &(1u64 << 32 | 1).to_be_bytes());
    poke(&image, entry_at + 10 * 16 + 8, &2u64.to_be_bytes());
    let report = check_image_file(&image, Repair::None).unwrap();
    let (status, text) = check_status(&image);
    assert_eq!((report.exit_code() as i32, status), (2, 2), "{report:#?}\nqemu-img: {text}");
    assert_eq!(report.corruptions, 2, "{report:#?}\nqemu-img: {text}");
    for message in &report.messages {
        assert!(text.contains(message.as_str()), "qemu-img says '{message}' too: {text}");
    }
    assert_eq!(report.messages.len(), 2, "{report:#?}");
    let error = read_ours(&image, 1 << 20).unwrap_err();
    assert!(error.to_string().contains("both allocated and zero"), "{error}");
}

#[test]
fn writes_into_compressed_clusters_copy_them_whole() {
    let scratch = Scratch::new("extl2-compressed");
    filled_base(&scratch);
    let image = qemu_image_over_base(&scratch, "i.qcow2");
    qemu_io("qcow2", &image, &["write -c -P 0x77 0 64k", "write -c -P 0x79 128k 64k"]);
    let mut shadow = vec![0xa1; SIZE as usize];
    Op::Write(0, 64 * K, 0x77).mirror(&mut shadow);
    Op::Write(128 * K, 64 * K, 0x79).mirror(&mut shadow);
    assert_same_bytes(&read_ours(&image, 5000).unwrap(), &shadow, "compressed clusters");
    let ops = vec![
        Op::Write(100, 10, 0x78), // a compressed cluster becomes a whole data cluster
        Op::Discard(128 * K + 2 * K, 4 * K), // part of one: zeroes are written instead
    ];
    for op in &ops {
        op.mirror(&mut shadow);
    }
    ours(&image, ops);
    let entry = l2_entry_at(&image, 0);
    assert_eq!(peek_u64(&image, entry) >> 62, 0b10, "a copied data cluster, not compressed");
    assert_eq!(peek_u64(&image, entry + 8), u64::from(u32::MAX), "all subclusters allocated");
    assert_eq!(peek_u64(&image, entry + 40), u64::from(u32::MAX), "all subclusters allocated");
    assert_everyone_sees(&image, &shadow, "compressed clusters written here");
}

#[test]
fn a_failed_subcluster_write_marks_nothing_allocated() {
    let scratch = Scratch::new("extl2-failed-write");
    let image = scratch.path("j.qcow2");
    create_qcow2(image.to_str().unwrap(), "extended_l2=on", "2M");
    let path = image.clone();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        blk.write(co, 0, &[0x11; 2048]).unwrap();
        blk.flush(co).unwrap();
        let host = peek_u64(&path, l2_entry_at(&path, 0)) & 0x00ff_ffff_ffff_fe00;
        // Subcluster 2 (4k..6k): its data write fails, so it stays unallocated.
        faults.fail_next_write_to(host + 4096);
        blk.write(co, 4096, &[0x22; 2048]).expect_err("the data write fails");
        blk.flush(co).unwrap();
        assert_eq!(peek_u64(&path, l2_entry_at(&path, 0) + 8), 1, "only subcluster 0");
        let mut back = [0xffu8; 2048];
        blk.read(co, 4096, &mut back).unwrap();
        assert_eq!(back, [0; 2048], "the failed write left no data");
        // Written again, it lands.
        blk.write(co, 4096, &[0x23; 2048]).unwrap();
        blk.flush(co).unwrap();
        assert_eq!(peek_u64(&path, l2_entry_at(&path, 0) + 8), 0b101);
    })
    .unwrap();
    let mut shadow = vec![0; SIZE as usize];
    Op::Write(0, 2 * K, 0x11).mirror(&mut shadow);
    Op::Write(4 * K, 2 * K, 0x23).mirror(&mut shadow);
    assert_everyone_sees(&image, &shadow, "after a failed write and its retry");
}

#[test]
fn a_write_into_a_fresh_cluster_that_fails_names_no_cluster_past_the_end_of_the_file() {
    let scratch = Scratch::new("extl2-full-disk");
    let image = scratch.path("k.qcow2");
    create_qcow2(image.to_str().unwrap(), "extended_l2=on", "2M");
    let path = image.clone();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (node, faults) = open_faulty_qcow2(co, &graph, &path);
        let blk = BlockBackend::new(node);
        blk.write(co, 0, &[0x11; 2048]).unwrap();
        blk.flush(co).unwrap();
        // The disk is full: the data of a new cluster cannot go past the end of the file.
        faults.fill_disk_at(std::fs::metadata(&path).unwrap().len());
        let error = blk.write(co, 1 << 20, &[0x22; 2048]).expect_err("the disk is full");
        assert_eq!(error.kind(), std::io::ErrorKind::StorageFull, "{error}");
        // Metadata still fits inside the file: the flush writes it back.
        blk.flush(co).unwrap();
        let mut back = [0xffu8; 2048];
        blk.read(co, 1 << 20, &mut back).unwrap();
        assert_eq!(back, [0; 2048], "the failed write left no data");
    })
    .unwrap();
    let (status, report) = check_status(&image);
    assert!(status == 0 || status == 3, "qemu-img check: only leaks may be left: {report}");
    let mut shadow = vec![0; SIZE as usize];
    Op::Write(0, 2 * K, 0x11).mirror(&mut shadow);
    assert_everyone_sees(&image, &shadow, "after a write that found the disk full");
}

#[test]
fn a_compressed_cluster_with_subclusters_marked_is_an_error_for_both_checks() {
    let scratch = Scratch::new("extl2-compressed-bitmap");
    let raw = scratch.path("text.raw");
    let text: String = (0..30000).map(|n| format!("line {n}; ")).collect();
    std::fs::write(&raw, &text.as_bytes()[..256 << 10]).unwrap();
    let image = scratch.path("c.qcow2");
    compress_to_qcow2(raw.to_str().unwrap(), image.to_str().unwrap(), "extended_l2=on");
    let report = check_image_file(&image, Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    // Cluster 1's bitmap marks subcluster 0 allocated: the spec reserves it (zero).
    poke(&image, l2_entry_at(&image, 2) + 8, &1u64.to_be_bytes());
    let report = check_image_file(&image, Repair::None).unwrap();
    let (status, text) = check_status(&image);
    assert_eq!((report.exit_code() as i32, status), (2, 2), "{report:#?}\nqemu-img: {text}");
    // As QEMU, the cluster's references are not counted: its host cluster leaks one.
    assert_eq!((report.corruptions, report.leaks), (1, 1), "{report:#?}\nqemu-img: {text}");
    assert!(report.messages[0].contains("non-zero subcluster allocation bitmap"), "{report:#?}");
    for message in &report.messages {
        assert!(text.contains(message.as_str()), "qemu-img says '{message}' too: {text}");
    }
    assert!(text.contains(&report.human()), "the same counts: {report:#?}\nqemu-img: {text}");
}

/// How many rounds the compressed-overwrite race runs: `QCOW2_COMPRESSED_RACE_ROUNDS`
/// (default 4; each round races 8 clusters).
fn race_rounds() -> u64 {
    std::env::var("QCOW2_COMPRESSED_RACE_ROUNDS")
        .map(|value| value.parse().expect("QCOW2_COMPRESSED_RACE_ROUNDS is a number"))
        .unwrap_or(4)
}

/// A coroutine's body, to run on another thread.
type Body = Box<dyn FnOnce(&Co) + Send>;

/// Runs each list of `bodies` as coroutines on a thread (with its own event loop) of its
/// own, both lists starting together, until all are done.
fn on_two_iothreads(bodies: [Vec<Body>; 2]) {
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = bodies
        .into_iter()
        .map(|bodies| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let ctx = AioContext::new().unwrap();
                barrier.wait();
                let coroutines: Vec<_> = bodies.into_iter().map(|body| ctx.spawn(body)).collect();
                ctx.wait_while(|| coroutines.iter().any(|co| !co.is_finished()));
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a coroutine panicked");
    }
}

/// Compressible bytes for a whole cluster, different for each `seed`.
fn cluster_text(seed: u64) -> Vec<u8> {
    let text: String = (0..16000).map(|n| format!("{seed}:{n} ")).collect();
    text.as_bytes()[..64 * K as usize].to_vec()
}

/// Request `n` of the subcluster writer racing a compressed overwrite, as `(offset in the
/// cluster, length, byte)`: in turn, zeroes over a whole subcluster (setting its zero bit),
/// then 1000 bytes inside it (marking it allocated after the data write).
fn race_request(n: usize) -> (usize, usize, u8) {
    let subcluster = (1 + n / 2 % 31) * 2 * K as usize;
    match n % 2 {
        0 => (subcluster, 2 * K as usize, 0),
        _ => (subcluster + 300, 1000, (n % 250) as u8 + 1),
    }
}

#[test]
fn compressed_overwrites_racing_subcluster_writes_leave_no_bitmap_and_a_serial_result() {
    // Each cluster starts partly allocated (subclusters 0-1 data, 10-11 zero, the rest the
    // backing file's). On one IoThread a coroutine per cluster overwrites it compressed;
    // on another a coroutine per cluster changes its subclusters, one request after the
    // other, until the compressed write is done: zero writes, and writes that mark
    // subclusters allocated after their data write (or, once the cluster is compressed,
    // copy it whole). Each cluster must end as if the requests ran one at a time (the
    // compressed data with the requests after it on top), and no compressed entry may have
    // bitmap bits (both checks): a compressed write that did not wait for a subcluster
    // write in flight would leave them (checked: a dozen clusters of the 32 then).
    const PER_ROUND: u64 = 8;
    let rounds = race_rounds();
    let clusters = rounds * PER_ROUND;
    let size = clusters * 64 * K;
    let scratch = Scratch::new("extl2-compressed-race");
    std::fs::write(scratch.path("base.raw"), vec![0xa1; size as usize]).unwrap();
    let image = scratch.path("r.qcow2");
    let name = image.to_str().unwrap();
    create_qcow2_over(name, "extended_l2=on", "base.raw", "raw", &size.to_string());
    let blk = open_backend(&qcow2_rw_options(&image));
    let setup = blk.clone();
    run_in_coroutine(move |co| {
        for cluster in 0..clusters {
            setup.write(co, cluster * 64 * K, &[0x5e; 4 * K as usize])?;
            setup.write_zeroes(co, cluster * 64 * K + 20 * K, 4 * K, true)?;
        }
        setup.flush(co)
    })
    .unwrap()
    .unwrap();
    // How many requests the subcluster writer made in each cluster.
    let requests = Arc::new(Mutex::new(vec![0; clusters as usize]));
    for round in 0..rounds {
        let first = round * PER_ROUND;
        let compressed: Arc<Vec<AtomicBool>> =
            Arc::new((0..PER_ROUND).map(|_| AtomicBool::new(false)).collect());
        let compressing = (0..PER_ROUND).map(|i| {
            let (blk, compressed) = (blk.clone(), compressed.clone());
            Box::new(move |co: &Co| {
                let data = cluster_text(first + i);
                blk.write_compressed(co, (first + i) * 64 * K, &data).unwrap();
                compressed[i as usize].store(true, Ordering::SeqCst);
            }) as Body
        });
        let changing = (0..PER_ROUND).map(|i| {
            let (blk, compressed, requests) = (blk.clone(), compressed.clone(), requests.clone());
            Box::new(move |co: &Co| {
                let mut n = 0;
                while !compressed[i as usize].load(Ordering::SeqCst) {
                    let (at, len, byte) = race_request(n);
                    let at = (first + i) * 64 * K + at as u64;
                    if byte == 0 {
                        blk.write_zeroes(co, at, len as u64, true).unwrap();
                    } else {
                        blk.write(co, at, &vec![byte; len]).unwrap();
                    }
                    n += 1;
                }
                requests.lock().unwrap()[(first + i) as usize] = n;
            }) as Body
        });
        on_two_iothreads([compressing.collect(), changing.collect()]);
    }
    run_in_coroutine(move |co| blk.close(co)).unwrap().unwrap();
    qemu_check(&image);
    let report = check_image_file(&image, Repair::None).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    let seen = read_ours(&image, 1 << 20).unwrap();
    assert_same_bytes(&seen, &qemu_raw(&image), "ours and qemu-img's");
    let requests = requests.lock().unwrap();
    for cluster in 0..clusters {
        let got = &seen[(cluster * 64 * K) as usize..][..64 * K as usize];
        assert!(
            is_compressed_then_requests(got, cluster_text(cluster), requests[cluster as usize]),
            "cluster {cluster}: not the compressed data with a suffix of the {} requests",
            requests[cluster as usize]
        );
    }
}

/// Whether `got` is `compressed` with the last requests (a suffix, maybe none) of the
/// `count` requests of [`race_request`] applied in order on top.
fn is_compressed_then_requests(got: &[u8], mut compressed: Vec<u8>, count: usize) -> bool {
    // From the last request back: each fills what no later one covers.
    let mut covered = vec![false; compressed.len()];
    for n in (0..count).rev() {
        if got == compressed {
            return true;
        }
        let (at, len, byte) = race_request(n);
        for (byte_at, covered) in compressed[at..at + len].iter_mut().zip(&mut covered[at..]) {
            if !*covered {
                (*byte_at, *covered) = (byte, true);
            }
        }
    }
    got == compressed
}
