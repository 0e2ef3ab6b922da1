//! A bounded, deterministic fuzz test: small valid images (zlib or zstd, with or without a
//! snapshot) with their header, extensions, L1, L2, refcount and snapshot tables mutated
//! (seeded RNG, a few thousand cases) must open and read every cluster, or open read-write
//! and take writes, compressed writes, discards, zero writes, growing and flushes, with `Ok`
//! or `Err`, never a panic or a hang.

mod qcow2_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use qcow2_support::*;

const CASES_PER_IMAGE: usize = 1500;
const SEED: u64 = 0x5eed_c0de_2024_0001;

/// xorshift64*: small, deterministic, good enough to pick bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The byte ranges worth mutating: the header cluster, the refcount table, the L1 table,
/// every L2 table the L1 table points at, and the snapshot table's start.
fn metadata_regions(image: &[u8]) -> Vec<(usize, usize)> {
    let u64_at = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_be_bytes(image[at..at + 4].try_into().unwrap());
    let cluster = 1usize << u32_at(20);
    let l1 = u64_at(40) as usize;
    let l1_len = u32_at(36) as usize * 8;
    let mut regions = vec![(0, 112), (0, cluster), (u64_at(48) as usize, cluster), (l1, l1_len)];
    if u32_at(60) > 0 {
        regions.push((u64_at(64) as usize, 256)); // The snapshot table.
    }
    for entry in (l1..l1 + l1_len).step_by(8) {
        let l2 = (u64_at(entry) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 != 0 {
            regions.push((l2, cluster));
        }
    }
    regions
}

/// Interesting values for a field: edges, the file's length and cluster multiples.
fn interesting(rng: &mut Rng, file_len: u64) -> u64 {
    let choices = [
        0,
        1,
        u64::MAX,
        u64::from(u32::MAX),
        1 << 63,
        1 << 62,
        (1 << 63) | file_len,
        file_len,
        file_len + 512,
        file_len.saturating_sub(512),
        1 << rng.below(64),
        512 * rng.below(64),
        (1 << 63) | (512 * rng.below(64)),
        (1 << 62) | rng.below(file_len + 4096),
    ];
    choices[rng.below(choices.len() as u64) as usize]
}

fn mutate(rng: &mut Rng, original: &[u8], regions: &[(usize, usize)]) -> Vec<u8> {
    let mut image = original.to_vec();
    let file_len = image.len() as u64;
    for _ in 0..1 + rng.below(4) {
        let (start, len) = regions[rng.below(regions.len() as u64) as usize];
        let len = len.min(image.len().saturating_sub(start)).max(1);
        let at = (start + rng.below(len as u64) as usize).min(image.len() - 1);
        match rng.below(5) {
            0 => image[at] = rng.next() as u8,
            1 => image[at] ^= 1 << rng.below(8),
            2 => {
                let at = (at & !3).min(image.len() - 4);
                let value = interesting(rng, file_len) as u32;
                image[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ => {
                let at = (at & !7).min(image.len() - 8);
                let value = interesting(rng, file_len);
                image[at..at + 8].copy_from_slice(&value.to_be_bytes());
            }
        }
    }
    // Sometimes cut the file short.
    if rng.below(20) == 0 {
        let keep = rng.below(image.len() as u64) as usize;
        image.truncate(keep);
    }
    image
}

/// How a case opens its image, and what it does with it: the results do not matter, only
/// that they come back.
struct Mode {
    /// The options before `file.filename`.
    options: &'static str,
    /// Runs requests on the image (given the span to read) and counts how many succeeded
    /// and how many failed.
    exercise: fn(&Co, &BlockBackend, u64, &mut Rng) -> (usize, usize),
}

const READ: Mode = Mode { options: "driver=qcow2,read-only=on", exercise: reads };
/// Two tables of L2 cache: dirty tables are written back on eviction.
const WRITE: Mode = Mode { options: "driver=qcow2,l2-cache-size=1k", exercise: writes };

/// Reads each cluster-sized piece of the first `span` bytes, some random ranges and the
/// block status.
fn reads(co: &Co, blk: &BlockBackend, span: u64, rng: &mut Rng) -> (usize, usize) {
    let len = blk.length();
    let (mut ok, mut err) = (0, 0);
    let mut count = |result: std::io::Result<()>| match result {
        Ok(()) => ok += 1,
        Err(_) => err += 1,
    };
    let mut buf = vec![0u8; 65536];
    let end = len.min(span);
    let mut at = 0;
    while at < end {
        let n = (end - at).min(4096);
        count(blk.read(co, at, &mut buf[..n as usize]));
        count(blk.block_status(co, at, n).map(drop));
        at += n;
    }
    for _ in 0..8 {
        if len == 0 {
            break;
        }
        let offset = rng.below(len);
        let n = rng.below(65536).min(len - offset) + u64::from(offset == len);
        let n = n.min(len - offset);
        count(blk.read(co, offset, &mut buf[..n as usize]));
        count(blk.block_status(co, offset, n.max(1).min(len - offset)).map(drop));
    }
    (ok, err)
}

/// Random writes, compressed writes, discards, zero writes, growing and flushes, and a last
/// flush.
fn writes(co: &Co, blk: &BlockBackend, _span: u64, rng: &mut Rng) -> (usize, usize) {
    let (mut ok, mut err) = (0, 0);
    let mut count = |result: std::io::Result<()>| match result {
        Ok(()) => ok += 1,
        Err(_) => err += 1,
    };
    let buf = vec![0x77u8; 20_000];
    for _ in 0..12 {
        let len = blk.length();
        if len == 0 {
            break;
        }
        let offset = rng.below(len);
        let n = rng.below(buf.len() as u64).min(len - offset);
        match rng.below(7) {
            0 => count(blk.discard(co, offset, n)),
            1 => count(blk.write_zeroes(co, offset, n, true)),
            2 => count(blk.flush(co)),
            3 => count(blk.truncate(co, len + rng.below(1 << 20))),
            4 => {
                // Whole clusters of up to 4 KiB, or the image's last bytes.
                let offset = offset & !4095;
                let n = (len - offset).min(4096) as usize;
                count(blk.write_compressed(co, offset, &buf[..n]));
            }
            _ => count(blk.write(co, offset, &buf[..n as usize])),
        }
    }
    count(blk.flush(co));
    (ok, err)
}

/// Opens `path` as `mode` says and runs its requests.
fn open_and_exercise(
    co: &Co,
    path: &Path,
    mode: &Mode,
    span: u64,
    rng: &mut Rng,
) -> (usize, usize) {
    let graph = BlockGraph::new();
    let options = format!("{},file.filename={}", mode.options, path.display());
    let Ok((_, node)) = aiocoro_block::open(co, &graph, &options) else {
        return (0, 0);
    };
    (mode.exercise)(co, &BlockBackend::new(node), span, rng)
}

/// Runs the cases on `base` (its backing files beside it) in a thread, as `mode` says,
/// failing if they do not finish in time.
fn fuzz(name: &str, scratch: &Scratch, base: PathBuf, seed: u64, mode: &'static Mode) {
    let original = std::fs::read(&base).unwrap();
    let regions = metadata_regions(&original);
    let span = 4 * u64::from_be_bytes(original[24..32].try_into().unwrap());
    let target = scratch.path(&format!("{name}-case.qcow2"));
    let progress = Arc::new(AtomicUsize::new(0));
    let seen = progress.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let totals = run_in_coroutine(move |co| {
            let mut rng = Rng(seed);
            let (mut ok, mut err) = (0, 0);
            for case in 0..CASES_PER_IMAGE {
                seen.store(case, Ordering::Relaxed);
                let image = mutate(&mut rng, &original, &regions);
                std::fs::write(&target, &image).unwrap();
                let (o, e) = open_and_exercise(co, &target, mode, span, &mut rng);
                ok += o;
                err += e;
            }
            (ok, err)
        })
        .unwrap();
        let _ = done_tx.send(totals);
    });
    match done_rx.recv_timeout(Duration::from_secs(120)) {
        Ok((ok, err)) => {
            eprintln!("{name}: {CASES_PER_IMAGE} cases, {ok} requests ok, {err} failed");
            assert!(ok > 0, "{name}: no request ever succeeded: the mutations are too wild");
        }
        Err(_) => {
            let case = progress.load(Ordering::Relaxed);
            if worker.is_finished() {
                let _ = worker.join();
                panic!("{name}: case {case} (seed {seed:#x}) panicked");
            }
            panic!("{name}: case {case} (seed {seed:#x}) did not finish in 120 s (a hang?)");
        }
    }
    worker.join().unwrap();
}

/// A v3 image of 512 B clusters with compressed, zero and data clusters.
fn v3_base(scratch: &Scratch) -> PathBuf {
    let src = scratch.path("src.raw");
    let mut data = vec![0u8; 64 << 10];
    for (i, byte) in data.iter_mut().enumerate().take(40 << 10) {
        *byte = (i / 300) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let base = scratch.path("base.qcow2");
    let options = "compat=1.1,cluster_size=512";
    compress_to_qcow2(src.to_str().unwrap(), base.to_str().unwrap(), options);
    qemu_io("qcow2", &base, &["write -P 0xab 8k 3k", "write -z 20k 2k", "write -P 0xcd 60k 4k"]);
    base
}

/// A v3 image of 512 B clusters compressed with zstd, with an internal snapshot that
/// shares its clusters and L2 tables, then writes after it.
fn zstd_snapshot_base(scratch: &Scratch) -> PathBuf {
    let src = scratch.path("zsrc.raw");
    let data: Vec<u8> = (0..64u32 << 10).map(|i| (i / 300) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let base = scratch.path("zbase.qcow2");
    let options = "compat=1.1,cluster_size=512,compression_type=zstd";
    compress_to_qcow2(src.to_str().unwrap(), base.to_str().unwrap(), options);
    qemu_img(&["snapshot", "-c", "s", base.to_str().unwrap()]);
    qemu_io("qcow2", &base, &["write -P 0xab 8k 3k", "write -z 20k 2k"]);
    base
}

/// A v2 image of 1 KiB clusters over a raw backing file shorter than it.
fn v2_base(scratch: &Scratch) -> PathBuf {
    let backing = scratch.path("b.raw");
    std::fs::write(&backing, vec![0x42u8; 48 << 10]).unwrap();
    let base = scratch.path("base.qcow2");
    let options = "compat=0.10,cluster_size=1k";
    create_qcow2_over(base.to_str().unwrap(), options, "b.raw", "raw", "64k");
    qemu_io(
        "qcow2",
        &base,
        &["write -P 0xab 0 5k", "write -P 0xcd 30k 2k", "write -P 0xef 63k 1k"],
    );
    base
}

#[test]
fn mutated_v3_images_with_compressed_and_zero_clusters_never_panic_or_hang() {
    let scratch = Scratch::new("fuzz-v3");
    fuzz("v3", &scratch, v3_base(&scratch), SEED, &READ);
}

#[test]
fn mutated_v2_images_over_a_raw_backing_file_never_panic_or_hang() {
    let scratch = Scratch::new("fuzz-v2");
    fuzz("v2", &scratch, v2_base(&scratch), SEED ^ 0xffff, &READ);
}

#[test]
fn mutated_zstd_images_with_a_snapshot_never_panic_or_hang() {
    let scratch = Scratch::new("fuzz-zstd");
    let base = zstd_snapshot_base(&scratch);
    fuzz("zstd", &scratch, base.clone(), SEED ^ 0x2222, &READ);
    fuzz("zstd-write", &scratch, base, SEED ^ 0x3333, &WRITE);
}

#[test]
fn mutated_images_opened_for_writing_never_panic_or_hang() {
    let scratch = Scratch::new("fuzz-write");
    let base = v3_base(&scratch);
    fuzz("v3-write", &scratch, base, SEED, &WRITE);
    let base = v2_base(&scratch);
    fuzz("v2-write", &scratch, base, SEED ^ 0xffff, &WRITE);
}
