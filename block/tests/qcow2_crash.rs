//! Crash consistency: a child process writing to a qcow2 image through our driver is killed
//! with SIGKILL at a random point, many times (images with and without lazy refcounts, and
//! with extended L2 entries).
//! Every time, `qemu-img check` must find no corruption (leaked clusters are allowed), and
//! everything the child had flushed before the kill must read back.

mod qcow2_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qcow2_support::*;

/// The environment variable that turns this test binary into the writing child; its value
/// is the image's path.
const CHILD: &str = "AIOCORO_QCOW2_CRASH_CHILD";
/// Kills per test run.
const ROUNDS: u64 = 24;
/// The image: 16 MiB of 64 KiB clusters, written in 4 KiB blocks.
const IMAGE_SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
/// The child flushes after this many writes and then reports how far it got.
const FLUSH_EVERY: u64 = 16;

/// A small generator (splitmix64): the child and the parent derive the same writes from it.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Write number `seq` of the child: which block, and the byte it fills the block with
/// (never 0, so a block that was written never reads as an unwritten one).
fn write_of(seq: u64) -> (u64, u8) {
    let random = mix(seq);
    let block = random % (IMAGE_SIZE / BLOCK as u64);
    let byte = 1 + (random >> 32) as u8 % 255;
    (block, byte)
}

/// The child: writes forever, flushing every `FLUSH_EVERY` writes and printing
/// `flushed <n>` once the first `n` writes are stable.
fn child(image: &str) {
    let options = format!("driver=qcow2,file.filename={image}");
    with_image(&options, |co, blk| {
        let mut buffer = vec![0u8; BLOCK];
        for seq in 0.. {
            let (block, byte) = write_of(seq);
            buffer.fill(byte);
            blk.write(co, block * BLOCK as u64, &buffer)?;
            if (seq + 1) % FLUSH_EVERY == 0 {
                blk.flush(co)?;
                println!("flushed {}", seq + 1);
            }
        }
        Ok(())
    })
    .expect("the child's writes");
}

/// What each block may hold after a kill once the first `flushed` writes were stable: the
/// byte of its last stable write (or 0 if none), or that of any later write to it.
fn allowed(flushed: u64, attempted: u64) -> Vec<Vec<u8>> {
    let blocks = (IMAGE_SIZE / BLOCK as u64) as usize;
    let mut allowed = vec![vec![0u8]; blocks];
    for seq in 0..attempted {
        let (block, byte) = write_of(seq);
        let entry = &mut allowed[block as usize];
        if seq < flushed {
            *entry = vec![byte];
        } else {
            entry.push(byte);
        }
    }
    allowed
}

fn one_round(scratch: &Scratch, round: u64) {
    let image = scratch.path(&format!("crash-{round}.qcow2"));
    // One image in three has lazy refcounts (which this driver keeps exact anyway), one
    // extended L2 entries (4 KiB writes allocate 2 KiB subclusters).
    let options = [
        "cluster_size=64k",
        "cluster_size=64k,lazy_refcounts=on",
        "cluster_size=64k,extended_l2=on",
    ][round as usize % 3];
    create_qcow2(image.to_str().unwrap(), options, "16M");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_killed_writer_leaves_a_consistent_image", "--nocapture"])
        .env(CHILD, &image)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().unwrap();
    let (reports, reported) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("flushed ").and_then(|n| n.parse::<u64>().ok()) {
                let _ = reports.send(n);
            }
        }
    });
    // Kill after a random number of flushes (0 to 40), at a random moment after it.
    let flushes = mix(round ^ 0xabcd) % 41;
    let mut flushed = 0;
    for _ in 0..flushes {
        flushed = reported.recv_timeout(Duration::from_secs(60)).expect("the child reports");
    }
    std::thread::sleep(Duration::from_micros(mix(round) % 3000));
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    wait_until_unlocked(&image);
    // Reports that arrived before the kill count too.
    flushed = reported.try_iter().fold(flushed, u64::max);
    check_after_kill(&image, flushed, round);
}

fn check_after_kill(image: &Path, flushed: u64, round: u64) {
    let output = Command::new("qemu-img")
        .args(["check", "--output=human", image.to_str().unwrap()])
        .output()
        .expect("qemu-img runs (install qemu-utils)");
    let report = String::from_utf8_lossy(&output.stdout);
    // 0: clean; 3: leaked clusters only. 2 (corruption) or anything else fails.
    let code = output.status.code();
    assert!(
        matches!(code, Some(0 | 3)),
        "round {round}: qemu-img check found corruption ({code:?}):\n{report}"
    );
    let data = qemu_raw(image);
    // Past the last report the child wrote at most one batch, flushed it (the report may
    // have died with it), and began the next.
    let allowed = allowed(flushed, flushed + 2 * FLUSH_EVERY);
    for (block, bytes) in data.chunks(BLOCK).enumerate() {
        let first = bytes[0];
        assert!(
            bytes.iter().all(|&b| b == first),
            "round {round}: block {block} is torn (a 4 KiB write is all one byte)"
        );
        assert!(
            allowed[block].contains(&first),
            "round {round}: block {block} holds {first:#x}, but after {flushed} stable writes it \
             may hold only {:?}",
            allowed[block]
        );
    }
}

#[test]
fn a_killed_writer_leaves_a_consistent_image() {
    if let Some(image) = std::env::var_os(CHILD) {
        child(image.to_str().unwrap());
        return;
    }
    let scratch = Scratch::new("crash");
    for round in 0..ROUNDS {
        one_round(&scratch, round);
    }
}

/// The environment variable that makes this test binary write without flushing and exit.
const DROP_CHILD: &str = "AIOCORO_QCOW2_DROP_CHILD";

#[test]
fn a_process_that_exits_without_flushing_keeps_its_writes() {
    if let Some(image) = std::env::var_os(DROP_CHILD) {
        let options = format!("driver=qcow2,file.filename={}", image.to_str().unwrap());
        with_image(&options, |co, blk| blk.write(co, 0, &[7u8; BLOCK])).unwrap();
        return;
    }
    let scratch = Scratch::new("drop");
    let image = scratch.path("unflushed.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_process_that_exits_without_flushing_keeps_its_writes", "--nocapture"])
        .env(DROP_CHILD, &image)
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the child failed: {stderr}");
    assert!(!stderr.contains("aiocoro-block:"), "a warning on stderr: {stderr}");
    // Closing wrote the metadata back: the write is there and nothing leaks.
    qemu_check(&image);
    let data = read_ours(&image, 1 << 20).unwrap();
    assert!(data[..BLOCK].iter().all(|&b| b == 7), "the write was lost");
    assert!(data[BLOCK..].iter().all(|&b| b == 0));
}
