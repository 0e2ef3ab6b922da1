//! One I/O error at every point of a qcow2 workload: a filter node under the image fails the n-th
//! write (`EIO`; or tears it: its first half lands), the n-th flush, the n-th read (`EIO`: of a
//! metadata table loaded again, of data copied on write), every request from the n-th write on (the
//! device is gone), or every write past a file length (`ENOSPC`: the disk is full), for n and
//! lengths over all the workload reaches. The workload mixes what allocates and moves metadata:
//! partial writes into new clusters, in-place writes, zero writes, discards, compressed writes
//! (packed two to a cluster, then copied on write), a write that outgrows the refcount table, a
//! grow that moves the L1 table; over an image qemu-io filled, with metadata caches small enough to
//! evict. Variants: an internal snapshot (writes copy shared clusters and L2 tables), and extended
//! L2 entries (subclusters; compressed clusters there have no bitmap).
//!
//! After each run the image must be consistent for `qemu-img check` (leaks allowed, never a
//! corruption), read back alike by us and by qemu-img, and hold, at every byte, what the writes
//! allow: an acknowledged write that a later flush made stable is there; a failed request's bytes
//! are either the old or the new ones; after a transient error, the driver keeps working and the
//! final flush succeeds.
//!
//! Each kind of fault is tried at `QCOW2_FAULT_POINTS` points spread over the workload (default 3,
//! to keep the test to seconds; `QCOW2_FAULT_POINTS=all` tries every one: minutes).

mod common;
mod qcow2_support;

use std::io;
use std::path::{Path, PathBuf};

use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::{CacheSizes, Repair, check_image_file};
use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use common::faults::{Faults, open_faulty_qcow2_with};
use common::pattern;
use qcow2_support::*;

/// A unit of the workload's offsets: the smallest cluster size.
const CLUSTER: u64 = 512;
/// The virtual size at the start.
const SIZE: u64 = 4 << 20;
/// The virtual size after the workload's grow.
const GROWN: u64 = 8 << 20;

/// One request of the workload.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `len` bytes of pattern `seed` at the offset.
    Write(u64, usize, u8),
    /// Zeroes `len` bytes at the offset.
    Zeroes(u64, u64),
    /// Discards `len` bytes at the offset (they read as zeroes: no backing file).
    Discard(u64, u64),
    /// One cluster of pattern `seed`, compressed, into the n-th cluster from 3 MiB.
    Compressed(u64, u8),
    /// Grows the virtual size.
    Grow(u64),
    Flush,
}

/// The workload, after qemu-io wrote pattern 0x5a over the first 1800 KiB (3720 clusters
/// of the 4096 the first refcount table cluster counts, with 64-bit refcounts).
const WORKLOAD: &[Op] = &[
    Op::Write((2 << 20) + 100, 3000, 1),
    Op::Write(100 * CLUSTER + 7, 200, 2),
    Op::Flush,
    Op::Zeroes((2 << 20) + 4096, 8192),
    Op::Zeroes(1000, 2048),
    Op::Discard(8192, 4096),
    Op::Compressed(0, 3),
    Op::Compressed(1, 4),
    Op::Write((3 << 20) + 256, 100, 5),
    Op::Flush,
    // 512 clusters: past what the refcount table counts.
    Op::Write((5 << 19) + 1, 256 << 10, 6),
    Op::Flush,
    // 256 L1 entries instead of 128: the L1 table moves.
    Op::Grow(GROWN),
    Op::Write(7 << 20, 4096, 7),
    Op::Write((2 << 20) + 50, 100, 8),
    Op::Write(20 * CLUSTER, 3 * CLUSTER as usize, 9),
    Op::Flush,
];

/// The header field of the incompatible feature bits, and its dirty and corrupt bits.
const INCOMPATIBLE_FEATURES: u64 = 72;
const MARKS: u64 = 0b11;

/// How a run fails.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Write number n fails with this errno, writing nothing; the device then works again.
    Write(u64, i32),
    /// Write number n is torn (its first half lands) and fails with `EIO`; the device then
    /// works again.
    Torn(u64),
    /// Flush number n fails (the writes before it landed); the device then works again.
    Flush(u64),
    /// Read number n fails with `EIO` (metadata or data the workload reads back); the
    /// device then works again.
    Read(u64),
    /// From write number n on, every request fails: the device is gone.
    Dead(u64),
    /// Writes past this file length fail with `ENOSPC` until the workload ends; then the
    /// disk has room again.
    Full(u64),
}

impl Fault {
    fn is_transient(self) -> bool {
        !matches!(self, Fault::Dead(_))
    }
}

/// The bytes a request's outcome allows, per guest byte.
struct Model {
    /// The bytes the guest must see where no uncertain request says otherwise.
    bytes: Vec<u8>,
    /// For each byte, the number of the last request that certainly wrote it.
    certain_since: Vec<usize>,
    /// `(request number, offset, bytes)` of requests that may or may not have landed.
    uncertain: Vec<(usize, u64, Vec<u8>)>,
    /// The virtual sizes the image may have.
    sizes: Vec<u64>,
}

impl Model {
    fn new(prefill: &[u8]) -> Model {
        let mut bytes = prefill.to_vec();
        bytes.resize(GROWN as usize, 0);
        Model {
            bytes,
            certain_since: vec![0; GROWN as usize],
            uncertain: Vec::new(),
            sizes: vec![SIZE],
        }
    }

    /// Request number `n` wrote `data` at `offset`, certainly or not.
    fn wrote(&mut self, n: usize, offset: u64, data: Vec<u8>, certain: bool) {
        let range = offset as usize..offset as usize + data.len();
        if certain {
            self.bytes[range.clone()].copy_from_slice(&data);
            self.certain_since[range].fill(n);
        } else {
            self.uncertain.push((n, offset, data));
        }
    }

    /// Asserts that `image` (what a reader saw: `seen`) is allowed.
    fn assert_allows(&self, seen: &[u8], what: &str) {
        let size = seen.len() as u64;
        assert!(self.sizes.contains(&size), "{what}: size {size}, allowed {:?}", self.sizes);
        const PAGE: usize = 4096;
        let differing = seen
            .chunks(PAGE)
            .zip(self.bytes.chunks(PAGE))
            .enumerate()
            .filter(|(_, (seen, expected))| seen != expected)
            .flat_map(|(page, _)| page * PAGE..((page + 1) * PAGE).min(seen.len()));
        for at in differing {
            let byte = seen[at];
            if byte == self.bytes[at] {
                continue;
            }
            let allowed = self.uncertain.iter().any(|(n, offset, data)| {
                *n > self.certain_since[at]
                    && (*offset as usize..*offset as usize + data.len()).contains(&at)
                    && data[at - *offset as usize] == byte
            });
            assert!(
                allowed,
                "{what}: guest byte {at:#x} reads {byte:#04x}; expected {:#04x} (certain since \
                 request {}), or what an uncertain request wrote there: {:?}",
                self.bytes[at],
                self.certain_since[at],
                self.uncertain
                    .iter()
                    .filter(|(_, offset, data)| (*offset as usize..*offset as usize + data.len())
                        .contains(&at))
                    .map(|(n, offset, data)| (n, data[at - *offset as usize]))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// The image an ops runs on: made by `qemu-img create -o OPTIONS`, of `cluster`-byte
/// clusters.
#[derive(Clone, Copy, Debug)]
struct Shape {
    options: &'static str,
    cluster: u64,
}

/// 512-byte clusters of 64-bit refcounts: many tables and blocks, one refcount table cluster
/// counts 4096 clusters.
const SMALL: Shape = Shape { options: "cluster_size=512,refcount_bits=64", cluster: 512 };
/// Extended L2 entries: 32 subclusters of 512 bytes a cluster.
const EXTENDED: Shape = Shape { options: "cluster_size=16k,extended_l2=on", cluster: 16 << 10 };

/// Where compressed cluster `n` (see [`Op::Compressed`]) goes.
fn compressed_at(shape: Shape, n: u64) -> u64 {
    (3 << 20) + n * shape.cluster
}

/// The bytes an op leaves in its range, and where.
fn effect(shape: Shape, op: Op) -> Option<(u64, Vec<u8>)> {
    match op {
        Op::Write(offset, len, seed) => Some((offset, pattern(len, seed))),
        Op::Zeroes(offset, len) | Op::Discard(offset, len) => Some((offset, vec![0; len as usize])),
        Op::Compressed(n, seed) => {
            Some((compressed_at(shape, n), pattern(shape.cluster as usize, seed)))
        }
        Op::Grow(_) | Op::Flush => None,
    }
}

fn run_op(co: &Co, blk: &BlockBackend, shape: Shape, op: Op) -> io::Result<()> {
    match op {
        Op::Write(offset, len, seed) => blk.write(co, offset, &pattern(len, seed)),
        Op::Zeroes(offset, len) => blk.write_zeroes(co, offset, len, true),
        Op::Discard(offset, len) => blk.discard(co, offset, len),
        Op::Compressed(n, seed) => blk.write_compressed(
            co,
            compressed_at(shape, n),
            &pattern(shape.cluster as usize, seed),
        ),
        Op::Grow(len) => blk.truncate(co, len),
        Op::Flush => blk.flush(co),
    }
}

/// What a run of the workload did.
struct Outcome {
    /// Each request's result (`None`: not sent, its range was past the size).
    results: Vec<Option<io::Result<()>>>,
    /// The writes, flushes and reads the filter saw.
    seen: (u64, u64, u64),
    /// The final flush's result (transient faults only).
    final_flush: Option<io::Result<()>>,
}

/// Runs the workload on `image` over a filter that fails as `fault` says.
fn run_workload(image: &Path, shape: Shape, fault: Fault) -> Outcome {
    let path = image.to_path_buf();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        // Four L2 tables and four refcount blocks: the workload evicts both.
        let caches = CacheSizes { l2_bytes: 4 * shape.cluster, refcount_bytes: 0 };
        let (node, faults) = open_faulty_qcow2_with(co, &graph, &path, caches);
        faults.stop_flushes_here();
        arm(&faults, fault);
        let blk = BlockBackend::new(node);
        let mut results = Vec::new();
        for &op in WORKLOAD {
            let fits = effect(shape, op)
                .is_none_or(|(offset, data)| offset + data.len() as u64 <= blk.length());
            results.push(fits.then(|| run_op(co, &blk, shape, op)));
        }
        let seen = (faults.seen().0, faults.seen().1, faults.reads_seen());
        let final_flush = fault.is_transient().then(|| {
            faults.heal();
            blk.flush(co)
        });
        Outcome { results, seen, final_flush }
    })
    .unwrap()
}

fn arm(faults: &Faults, fault: Fault) {
    match fault {
        Fault::None => {}
        Fault::Write(n, errno) => faults.fail_write_number(n, errno),
        Fault::Torn(n) => faults.tear_write_number(n),
        Fault::Flush(n) => faults.fail_flush_number(n),
        Fault::Read(n) => faults.fail_read_number(n),
        Fault::Dead(n) => faults.die_at_write_number(n),
        Fault::Full(len) => faults.fill_disk_at(len),
    }
}

/// The image the workload starts from: 4 MiB of 512-byte clusters with 64-bit refcounts,
/// 1800 KiB written by qemu-io; with an internal snapshot if `snapshot`.
struct Case {
    scratch: Scratch,
    shape: Shape,
    /// The image each run copies.
    base: PathBuf,
    /// Its guest bytes.
    prefill: Vec<u8>,
}

impl Case {
    fn new(name: &str, shape: Shape, snapshot: bool) -> Case {
        let scratch = Scratch::new(name);
        let base = scratch.path("base.qcow2");
        let image = base.to_str().unwrap();
        create_qcow2(image, shape.options, "4M");
        qemu_io("qcow2", &base, &["write -P 0x5a 0 1800k"]);
        let mut prefill = vec![0x5a; 1800 << 10];
        prefill.resize(SIZE as usize, 0);
        if snapshot {
            qemu_img(&["snapshot", "-c", "kept", image]);
        }
        Case { scratch, shape, base, prefill }
    }

    /// The image of the last run.
    fn image(&self) -> PathBuf {
        self.scratch.path("image.qcow2")
    }
}

/// Runs the workload on a copy of the case's image failing as `fault` says, then checks the
/// image.
fn one_run(case: &Case, fault: Fault) -> Outcome {
    let image = case.image();
    std::fs::copy(&case.base, &image).unwrap();
    let outcome = run_workload(&image, case.shape, fault);
    let what = format!("{:?} {fault:?}", case.shape.options);
    if let Some(flush) = &outcome.final_flush {
        assert!(flush.is_ok(), "{what}: the flush after a transient fault failed: {flush:?}");
    }
    let mut model = Model::new(&case.prefill);
    let last_flush = WORKLOAD
        .iter()
        .zip(&outcome.results)
        .rposition(|(op, result)| matches!(op, Op::Flush) && matches!(result, Some(Ok(()))));
    for (n, (&op, result)) in WORKLOAD.iter().zip(&outcome.results).enumerate() {
        let n = n + 1;
        let Some(result) = result else { continue };
        if let Err(error) = result {
            assert_clear(error, fault, &what);
        }
        // An acknowledged request is stable if a flush after it succeeded.
        let stable = result.is_ok()
            && (fault.is_transient() || last_flush.is_some_and(|flush| flush + 1 > n));
        if let Op::Grow(len) = op {
            // A grow writes the size through: acknowledged, it is stable.
            if result.is_ok() {
                model.sizes = vec![len];
            } else {
                model.sizes.push(len);
            }
        }
        if let Some((offset, data)) = effect(case.shape, op) {
            model.wrote(n, offset, data, stable);
        }
    }
    let (status, report) = check_status(&image);
    assert!(status == 0 || status == 3, "{what}: qemu-img check finds the image broken: {report}");
    let ours = check_image_file(&image, Repair::None).unwrap();
    assert_eq!(ours.exit_code() as i32, status, "{what}: our check says otherwise: {ours:#?}");
    let incompatible = peek_u64(&image, INCOMPATIBLE_FEATURES);
    assert_eq!(incompatible & MARKS, 0, "{what}: an I/O error marked the image dirty or corrupt");
    let ours = read_ours(&image, 1 << 20).unwrap_or_else(|error| panic!("{what}: {error}"));
    model.assert_allows(&ours, &format!("{what}, read by us"));
    let theirs = qemu_raw(&image);
    assert_same_bytes(&ours, &theirs, &format!("{what}: ours and qemu-img's reads"));
    outcome
}

/// An error a faulted request returns names what failed.
fn assert_clear(error: &io::Error, fault: Fault, what: &str) {
    let expected = match fault {
        Fault::Full(_) => io::ErrorKind::StorageFull,
        Fault::Write(_, errno) if errno == libc::ENOSPC => io::ErrorKind::StorageFull,
        _ => io::ErrorKind::Other,
    };
    if expected == io::ErrorKind::StorageFull {
        assert_eq!(error.kind(), expected, "{what}: {error}");
        assert!(error.to_string().contains("No space left on device"), "{what}: {error}");
    } else {
        assert!(error.to_string().contains("Input/output error"), "{what}: {error}");
    }
}

/// Points from 1 to `count`, evenly spread, first and last included: as many as
/// `QCOW2_FAULT_POINTS` says (default 3; `all` for every one).
fn points(count: u64) -> Vec<u64> {
    let wanted = match std::env::var("QCOW2_FAULT_POINTS").as_deref() {
        Ok("all") => count,
        Ok(number) => number.parse().expect("QCOW2_FAULT_POINTS is a number or 'all'"),
        Err(_) => 3,
    };
    let wanted = wanted.clamp(1, count.max(1));
    let mut points: Vec<u64> =
        (0..wanted).map(|n| 1 + n * (count - 1) / (wanted - 1).max(1)).collect();
    points.dedup();
    points
}

fn every_fault(case: &Case) {
    let clean = one_run(case, Fault::None);
    assert!(clean.results.iter().all(|result| !matches!(result, Some(Err(_)))));
    // The second compressed cluster stays compressed (the first is written into).
    let (_, report) = check_status(&case.image());
    assert!(!report.contains(" 0.00% compressed"), "no compressed cluster: {report}");
    let (writes, flushes, reads) = clean.seen;
    let base_len = std::fs::metadata(&case.base).unwrap().len();
    let grown = std::fs::metadata(case.image()).unwrap().len();
    for n in points(writes) {
        one_run(case, Fault::Write(n, libc::EIO));
        one_run(case, Fault::Torn(n));
        one_run(case, Fault::Dead(n));
    }
    for n in points(flushes) {
        one_run(case, Fault::Flush(n));
    }
    for n in points(reads) {
        one_run(case, Fault::Read(n));
    }
    // The last limit leaves out the workload's last cluster.
    let cluster = case.shape.cluster;
    for len in points(((grown - base_len) / cluster).max(2) - 1) {
        let outcome = one_run(case, Fault::Full(base_len + len * cluster));
        assert!(
            outcome.results.iter().any(|result| matches!(result, Some(Err(_)))),
            "a full disk failed no request"
        );
    }
}

#[test]
fn one_io_error_anywhere_leaves_a_consistent_image_with_every_stable_write() {
    every_fault(&Case::new("io-faults", SMALL, false));
}

#[test]
fn one_io_error_anywhere_keeps_an_internal_snapshot_and_every_stable_write() {
    every_fault(&Case::new("io-faults-snapshot", SMALL, true));
}

#[test]
fn one_io_error_anywhere_with_extended_l2_entries() {
    every_fault(&Case::new("io-faults-extended", EXTENDED, false));
}
