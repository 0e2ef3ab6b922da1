//! Races between qcow2 requests, and failures of the child, made deterministic: the image
//! lies in a memory node whose gate holds one request in the middle of the child while the
//! test runs others, or which fails the requests that touch a chosen byte.

mod common;
mod qcow2_support;

use std::io::{self, IoSliceMut};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::{CacheSizes, CreateOptions, Header, Qcow2Driver};
use aiocoro_block::{BlockBackend, BlockGraph, BlockNode, ChildLabel, run_in_coroutine};
use common::{Gate, TestDriver};
use qcow2_support::*;

const CLUSTER: u64 = 64 << 10;
/// The memory node's size: the image's free clusters lie inside it.
const FILE: usize = 4 << 20;

/// Reads `len` bytes at `offset` of `node`.
fn read_node(co: &Co, node: &BlockNode, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    node.read(co, offset, &mut [IoSliceMut::new(&mut bytes)])?;
    Ok(bytes)
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap())
}

/// The host offset of guest cluster 0 in the qcow2 image in `file`.
fn host_of_cluster_0(co: &Co, file: &BlockNode) -> io::Result<u64> {
    let mask = 0x00ff_ffff_ffff_fe00;
    let l1 = be_u64(&read_node(co, file, 40, 8)?);
    let l2 = be_u64(&read_node(co, file, l1, 8)?) & mask;
    Ok(be_u64(&read_node(co, file, l2, 8)?) & mask)
}

/// Makes a new 1 MiB image of 64 KiB clusters in the file at `path`; returns where its
/// first free cluster starts (its length).
fn make(co: &Co, path: &Path) -> io::Result<u64> {
    let options = CreateOptions { cluster_size: CLUSTER, ..CreateOptions::new(1 << 20) };
    aiocoro_block::qcow2::create_file(co, path, &options)?;
    Ok(std::fs::metadata(path)?.len())
}

/// The image in the file at `path` in a memory node that fails the requests touching
/// `fail_at`, opened read-write; returns the backend, the memory node and its gate.
fn open_in_memory(
    co: &Co,
    path: &Path,
    fail_at: Option<u64>,
) -> io::Result<(BlockBackend, Arc<BlockNode>, Arc<Gate>)> {
    let mut bytes = std::fs::read(path)?;
    bytes.resize(FILE, 0);
    let mut driver = TestDriver::with_contents(&bytes);
    driver.fail_at = fail_at;
    let gate = driver.gate.clone();
    let graph = BlockGraph::new();
    let file_id = graph.add_node(driver.into_node(co, "memory"));
    let file = graph.node(file_id).expect("just added");
    let header = Header::read(co, &file)?;
    let (_, node) = graph.add_node_with(|edges| {
        let child = edges.attach(ChildLabel::image_file(), file_id)?;
        let qcow2 = Qcow2Driver::open(co, child, None, header, CacheSizes::default())?;
        BlockNode::new(co, "qcow2", qcow2, false)
    })?;
    Ok((BlockBackend::new(node), file, gate))
}

/// Sleeps until `condition` holds.
fn sleep_until(co: &Co, mut condition: impl FnMut() -> bool) {
    while !condition() {
        co.sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_discarded_cluster_is_not_reallocated_while_an_in_place_write_to_it_runs() {
    let scratch = Scratch::new("race-in-place-discard");
    let (made, dump) = (scratch.path("made.qcow2"), scratch.path("dump.qcow2"));
    let path = dump.clone();
    run_in_coroutine(move |co| -> io::Result<()> {
        make(co, &made)?;
        let (blk, file, gate) = open_in_memory(co, &made, None)?;
        blk.write(co, 0, &[0x11; CLUSTER as usize])?;
        blk.flush(co)?;
        // Guest cluster 0 is at `host` with the copied flag: the next write to it goes in
        // place, looked up under the metadata lock and written outside it.
        let host = host_of_cluster_0(co, &file)?;
        gate.arm(host);
        let writer = {
            let blk = blk.clone();
            AioContext::current().unwrap().spawn(move |co| {
                blk.write(co, 0, &[0xaa; 4096]).expect("the in-place write");
            })
        };
        sleep_until(co, || gate.is_holding());
        // While that write is held in the child: discard the cluster, flush (which would
        // give `host` back), and allocate a cluster for guest cluster 1 (first fit: `host`,
        // if it were free).
        blk.discard(co, 0, CLUSTER)?;
        blk.flush(co)?;
        blk.write(co, CLUSTER, &[0x22; CLUSTER as usize])?;
        blk.flush(co)?;
        gate.open();
        sleep_until(co, || writer.is_finished());
        blk.flush(co)?;
        let mut cluster_1 = vec![0u8; CLUSTER as usize];
        blk.read(co, CLUSTER, &mut cluster_1)?;
        assert!(
            cluster_1.iter().all(|&b| b == 0x22),
            "guest cluster 1 took the in-place write meant for discarded guest cluster 0"
        );
        std::fs::write(&path, read_node(co, &file, 0, FILE)?)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
    // The discarded cluster was given back once the write had landed: no leak.
    qemu_check(&dump);
}

#[test]
fn a_compressed_overwrite_waits_for_a_subcluster_write_in_flight_in_its_cluster() {
    // With extended L2 entries, a write into an unallocated subcluster of an allocated
    // cluster marks it allocated once its data is written. A compressed overwrite of the
    // cluster meanwhile must wait for it: linked first, its entry would get that bit.
    const SUBCLUSTER: u64 = CLUSTER / 32;
    let scratch = Scratch::new("race-compressed-subcluster");
    let (made, dump) = (scratch.path("made.qcow2"), scratch.path("dump.qcow2"));
    let path = dump.clone();
    let text: String = (0..20000).map(|n| format!("{n} ")).collect();
    let compressed = text.as_bytes()[..CLUSTER as usize].to_vec();
    let expected = compressed.clone();
    run_in_coroutine(move |co| -> io::Result<()> {
        let options = CreateOptions {
            cluster_size: CLUSTER,
            extended_l2: true,
            ..CreateOptions::new(1 << 20)
        };
        aiocoro_block::qcow2::create_file(co, &made, &options)?;
        let (blk, file, gate) = open_in_memory(co, &made, None)?;
        blk.write(co, 0, &[0x11; SUBCLUSTER as usize])?;
        blk.flush(co)?;
        // Subcluster 10's data write is held in the child, the write in flight.
        gate.arm(host_of_cluster_0(co, &file)? + 10 * SUBCLUSTER);
        let ctx = AioContext::current().unwrap();
        let writer = {
            let blk = blk.clone();
            ctx.spawn(move |co| {
                blk.write(co, 10 * SUBCLUSTER, &[0x22; 100]).expect("the subcluster write");
            })
        };
        sleep_until(co, || gate.is_holding());
        let overwrite = {
            let blk = blk.clone();
            ctx.spawn(move |co| {
                blk.write_compressed(co, 0, &compressed).expect("the compressed write");
            })
        };
        // Time to compress and reach the wait; a compressed write that did not wait would
        // finish meanwhile.
        co.sleep(Duration::from_millis(300));
        assert!(!overwrite.is_finished(), "the compressed write did not wait");
        gate.open();
        sleep_until(co, || writer.is_finished() && overwrite.is_finished());
        blk.flush(co)?;
        let l1 = be_u64(&read_node(co, &file, 40, 8)?);
        let l2 = be_u64(&read_node(co, &file, l1, 8)?) & 0x00ff_ffff_ffff_fe00;
        let entry = read_node(co, &file, l2, 16)?;
        assert_eq!(be_u64(&entry[..8]) >> 62, 0b01, "cluster 0 is compressed");
        assert_eq!(be_u64(&entry[8..]), 0, "a compressed cluster's bitmap is zero");
        let mut back = vec![0u8; CLUSTER as usize];
        blk.read(co, 0, &mut back)?;
        assert!(back == expected, "cluster 0 reads as the compressed data");
        std::fs::write(&path, read_node(co, &file, 0, FILE)?)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
    qemu_check(&dump);
}

#[test]
fn a_new_table_that_cannot_be_written_is_given_back() {
    // An L2 table for the first write; an L1 table of two clusters (more than 8192 entries)
    // for growing to 5 TiB. Each goes to the first free cluster, which fails.
    for (what, grow) in [("L2 table", false), ("L1 table", true)] {
        let scratch = Scratch::new("fail-table");
        let (made, dump) = (scratch.path("made.qcow2"), scratch.path("dump.qcow2"));
        let path = dump.clone();
        run_in_coroutine(move |co| -> io::Result<()> {
            let first_free = make(co, &made)?;
            let (blk, file, _) = open_in_memory(co, &made, Some(first_free))?;
            let result =
                if grow { blk.truncate(co, 5 << 40) } else { blk.write(co, 0, &[0x11; 4096]) };
            let error = result.err().unwrap_or_else(|| {
                panic!("{what}: succeeded; writing the new table should have failed")
            });
            assert!(error.to_string().contains("Input/output error"), "{what}: {error}");
            blk.flush(co)?;
            // Nothing was written past the metadata: the rest reads as zeroes (and the
            // failing cluster cannot be read).
            let mut bytes = read_node(co, &file, 0, first_free as usize)?;
            bytes.resize(FILE, 0);
            std::fs::write(&path, bytes)?;
            Ok(())
        })
        .unwrap()
        .unwrap();
        // Nothing names the table: its clusters are free again, not leaked.
        qemu_check(&dump);
    }
}

#[test]
fn a_free_that_fails_at_a_flush_leaves_the_frees_after_it_for_the_next_flush() {
    // 512-byte clusters: a refcount block counts 256 clusters (128 KiB of file), so 300 KiB
    // of data spans three blocks. The second block cannot be read. Discarding a cluster it
    // counts, then one the first block counts, and flushing: the first free fails (its
    // cluster leaks), the second stays pending and the next flush does it.
    let scratch = Scratch::new("fail-pending-free");
    let (made, dump) = (scratch.path("made.qcow2"), scratch.path("dump.qcow2"));
    create_qcow2(made.to_str().unwrap(), "cluster_size=512", "1M");
    qemu_io("qcow2", &made, &["write -P 0x33 0 300k"]);
    let block_2 = peek_u64(&made, peek_u64(&made, 48) + 8);
    let original = std::fs::read(&made).unwrap();
    let path = dump.clone();
    run_in_coroutine(move |co| -> io::Result<()> {
        let (blk, file, _) = open_in_memory(co, &made, Some(block_2))?;
        blk.discard(co, 400 * 512, 512)?; // host cluster ~400: the second block's
        blk.discard(co, 0, 512)?; // host cluster 5: the first block's
        let error = blk.flush(co).expect_err("the second refcount block cannot be read");
        assert!(error.to_string().contains("Input/output error"), "{error}");
        blk.flush(co)?;
        // Nothing could read or write the second block: it is as it was made.
        let end = block_2 as usize + 512;
        let mut bytes = read_node(co, &file, 0, block_2 as usize)?;
        bytes.extend_from_slice(&original[block_2 as usize..end]);
        bytes.extend(read_node(co, &file, end as u64, FILE - end)?);
        std::fs::write(&path, bytes)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
    let (status, text) = check_status(&dump);
    assert_eq!(status, 3, "leaks only: {text}");
    assert!(text.contains("1 leaked cluster"), "only the failed free leaks: {text}");
}
