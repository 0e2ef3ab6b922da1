//! Writes that land in clusters whose allocation is in flight are merged into the
//! allocation's one data write (`block/src/qcow2/allocation.rs`). The image lives in a
//! counting, memory-backed test node, so each test sees how many requests reached the file,
//! what they wrote, and (through `qemu-img check`) that the image stays consistent.

mod common;
mod qcow2_support;

use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::{CacheSizes, CreateOptions, Header, Qcow2Driver, create};
use aiocoro_block::{BlockBackend, BlockGraph, BlockNode, ChildLabel, run_in_coroutine};
use common::{Counters, TempFile, TestDriver, pattern};
use qcow2_support::qemu_check;

const CLUSTER: u64 = 64 * 1024;
const PIECE: u64 = 4096;

/// A fresh 4 MiB qcow2 image in a test node (its bytes and request counters returned),
/// optionally over a backing test node holding `backing`.
struct Image {
    blk: BlockBackend,
    file: Arc<Mutex<Vec<u8>>>,
    counters: Arc<Counters>,
}

impl Image {
    fn new(co: &Co, fail_at: Option<u64>, backing: Option<Vec<u8>>) -> io::Result<Image> {
        let graph = BlockGraph::new();
        let scratch = TestDriver::new(0);
        let fresh = scratch.data();
        create(co, &scratch.into_node(co, "scratch"), &CreateOptions::new(4 << 20))?;
        let mut driver = TestDriver::with_contents(&fresh.lock().unwrap());
        let (file, counters) = (driver.data(), driver.counters.clone());
        driver.fail_at = fail_at;
        let file_node = driver.into_node(co, "file");
        let header = Header::read(co, &file_node)?;
        let file_id = graph.add_node(file_node);
        let backing_id = backing.map(|bytes| {
            graph.add_node(TestDriver::with_contents(&bytes).into_node(co, "backing"))
        });
        let (_, node) = graph.add_node_with(|edges| {
            let file = edges.attach(ChildLabel::image_file(), file_id)?;
            let backing =
                backing_id.map(|id| edges.attach(ChildLabel::backing(), id)).transpose()?;
            let driver = Qcow2Driver::open(co, file, backing, header, CacheSizes::default())?;
            BlockNode::new(co, "qcow2", driver, false)
        })?;
        Ok(Image { blk: BlockBackend::new(node), file, counters })
    }

    /// Writes each `(offset, bytes)` from a coroutine of its own, all at once; returns each
    /// write's result.
    fn write_concurrently(&self, co: &Co, writes: &[(u64, Vec<u8>)]) -> Vec<io::Result<()>> {
        let ctx = AioContext::current().expect("tests run in a context");
        let results = Rc::new(std::cell::RefCell::new(Vec::new()));
        let coroutines: Vec<_> = writes
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, (offset, bytes))| {
                let (blk, results) = (self.blk.clone(), results.clone());
                ctx.spawn(move |co| {
                    let result = blk.write(co, offset, &bytes);
                    results.borrow_mut().push((i, result));
                })
            })
            .collect();
        while coroutines.iter().any(|c| !c.is_finished()) {
            co.sleep(std::time::Duration::from_millis(1));
        }
        let mut results = results.take();
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, result)| result).collect()
    }

    fn read(&self, co: &Co, offset: u64, len: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len as usize];
        self.blk.read(co, offset, &mut bytes).unwrap();
        bytes
    }

    /// Flushes, then runs `qemu-img check` on a copy of the file.
    fn check(&self, co: &Co) {
        self.blk.flush(co).unwrap();
        let copy = TempFile::with_contents("merge.qcow2", &self.file.lock().unwrap());
        qemu_check(copy.path());
    }
}

/// 4 KiB pieces of `data` at `base`, in order.
fn pieces(base: u64, data: &[u8]) -> Vec<(u64, Vec<u8>)> {
    data.chunks(PIECE as usize)
        .enumerate()
        .map(|(i, piece)| (base + i as u64 * PIECE, piece.to_vec()))
        .collect()
}

#[test]
fn sixteen_writes_into_a_fresh_cluster_reach_the_file_as_one_write() {
    run_in_coroutine(|co| {
        let image = Image::new(co, None, None).unwrap();
        // The L2 table exists beforehand, so that only the data is left to write.
        image.blk.write(co, 3 * CLUSTER, &[7u8; 512]).unwrap();
        let data = pattern(CLUSTER as usize, 3);
        let before = image.counters.entered();
        let results = image.write_concurrently(co, &pieces(CLUSTER, &data));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(
            image.counters.entered() - before,
            1,
            "the 16 writes of one fresh cluster should reach the file as one request"
        );
        assert_eq!(image.read(co, CLUSTER, CLUSTER), data);
        image.check(co);
    })
    .unwrap();
}

#[test]
fn a_write_running_past_the_allocation_merges_its_first_part_and_writes_the_rest() {
    run_in_coroutine(|co| {
        let image = Image::new(co, None, None).unwrap();
        let first = pattern(PIECE as usize, 1);
        let straddling = pattern(2 * PIECE as usize, 2);
        let writes = [(0, first.clone()), (CLUSTER - PIECE, straddling.clone())];
        let results = image.write_concurrently(co, &writes);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let mut expected = vec![0u8; 2 * CLUSTER as usize];
        expected[..PIECE as usize].copy_from_slice(&first);
        expected[(CLUSTER - PIECE) as usize..][..2 * PIECE as usize].copy_from_slice(&straddling);
        assert_eq!(image.read(co, 0, 2 * CLUSTER), expected);
        image.check(co);
    })
    .unwrap();
}

#[test]
fn the_gaps_between_merged_writes_come_from_the_backing_node() {
    run_in_coroutine(|co| {
        let backing = pattern(4 << 20, 9);
        let image = Image::new(co, None, Some(backing.clone())).unwrap();
        // Every other 1 KiB of a cluster, in 16 concurrent writes.
        let writes: Vec<_> =
            (0..16u64).map(|i| (CLUSTER + i * PIECE + 1024, pattern(1024, i as u8 + 20))).collect();
        let results = image.write_concurrently(co, &writes);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let mut expected = backing[CLUSTER as usize..2 * CLUSTER as usize].to_vec();
        for (offset, bytes) in &writes {
            expected[(offset - CLUSTER) as usize..][..bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(image.read(co, CLUSTER, CLUSTER), expected);
        image.check(co);
    })
    .unwrap();
}

#[test]
fn writes_merged_into_a_failed_allocation_fail_and_leave_the_cluster_unwritten() {
    run_in_coroutine(|co| {
        // A fresh 4 MiB image of 64 KiB clusters: header, refcount table, refcount block and
        // L1 table fill the first four clusters; the first write allocates its L2 table and
        // then its data cluster, which is where the file fails.
        let image = Image::new(co, Some(5 * CLUSTER + 100), None).unwrap();
        let results = image.write_concurrently(co, &pieces(0, &pattern(CLUSTER as usize, 4)));
        assert_eq!(results.len(), 16);
        for (i, result) in results.iter().enumerate() {
            let error = result.as_ref().expect_err("a write whose bytes were never written");
            assert!(error.to_string().contains("Input/output error"), "write {i}: {error}");
        }
        assert!(image.counters.failed() >= 1);
        assert_eq!(image.read(co, 0, CLUSTER), vec![0u8; CLUSTER as usize]);
        image.check(co);
    })
    .unwrap();
}
