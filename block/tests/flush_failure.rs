//! A failed flush is not forgotten: after one `fdatasync` of a file node fails, every later
//! flush of it fails too, naming the first failure (QEMU's `page_cache_inconsistent`).
//!
//! The failure is injected by `tests/fault/fail_sync.c`, an `LD_PRELOAD` shim this test
//! builds with `cc`: it fails the second flush of one file with `EIO`, either in libc's
//! `fdatasync` (the thread-pool engine) or by rewriting the `IORING_OP_FSYNC` submission
//! (the io_uring engine). `LD_PRELOAD` only acts when a process starts, so this test (no
//! libtest harness) runs itself again as the child that does the I/O.

mod common;
#[path = "fault/shim.rs"]
mod shim;

use std::io;
use std::path::Path;
use std::process::Command;

use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockGraph, open, run_in_coroutine};
use common::{TempFile, pattern};

/// Set in the child: the aio engine to use (`threads` or `io_uring`).
const CHILD_ENGINE: &str = "FLUSH_FAILURE_ENGINE";
/// Set in the child: the file to write.
const CHILD_FILE: &str = "FLUSH_FAILURE_FILE";
/// Set in the child: the cache mode (`writeback` or `none`).
const CHILD_CACHE: &str = "FLUSH_FAILURE_CACHE";

fn main() {
    if let Ok(engine) = std::env::var(CHILD_ENGINE) {
        let file = std::env::var(CHILD_FILE).expect("the parent names the file");
        let cache = std::env::var(CHILD_CACHE).expect("the parent names the cache mode");
        child(&engine, &cache, &file);
        return;
    }
    let shim =
        shim::build_shim(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fault/fail_sync.c"));
    for (engine, via) in [("threads", "libc"), ("io_uring", "io_uring")] {
        for cache in ["writeback", "none"] {
            every_flush_after_a_failed_one_fails(&shim, engine, via, cache);
            println!("test flush_failure {engine} cache={cache} ... ok");
        }
    }
}

fn every_flush_after_a_failed_one_fails(shim: &Path, engine: &str, via: &str, cache: &str) {
    let file = TempFile::with_contents("flush-failure", &vec![0; 1 << 20]);
    let target = file.path().canonicalize().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .env("LD_PRELOAD", shim)
        .env("FAIL_SYNC_PATH", &target)
        .env("FAIL_SYNC_NTH", "2")
        .env("FAIL_SYNC_VIA", via)
        .env(CHILD_ENGINE, engine)
        .env(CHILD_CACHE, cache)
        .env(CHILD_FILE, file.path())
        .output()
        .expect("cannot run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let what = format!("{engine} cache={cache}:\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(output.status.success(), "the child failed: {what}");
    let injected = stderr.matches("fail_sync: injected EIO").count();
    assert_eq!(injected, 1, "the shim must fail exactly one flush, through {via}: {what}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{what}");
    assert_eq!(lines[0], "flush 1: ok", "{what}");
    assert!(lines[1].starts_with("flush 2: error: "), "the injected failure: {what}");
    assert!(lines[1].contains("Input/output error"), "{what}");
    for later in &lines[2..] {
        assert!(
            later.contains("error: ") && later.contains("an earlier flush failed"),
            "a flush after the failed one must fail too, saying why: {what}"
        );
        assert!(later.contains("Input/output error"), "it names the first failure: {what}");
        assert!(later.contains(&file.name()), "it names the file: {what}");
    }
}

/// Writes and flushes four times, printing each flush's outcome.
fn child(engine: &str, cache: &str, file: &str) {
    let options = format!("driver=file,node-name=disk,filename={file},aio={engine},cache={cache}");
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = open(co, &graph, &options).expect("cannot open the file node");
        let blk = BlockBackend::new(node);
        for round in 1..=4u8 {
            write_round(co, &blk, round).expect("writes keep working after a failed flush");
            match blk.flush(co) {
                Ok(()) => println!("flush {round}: ok"),
                Err(error) => println!("flush {round}: error: {error}"),
            }
        }
    })
    .expect("cannot make an AioContext");
}

fn write_round(co: &Co, blk: &BlockBackend, round: u8) -> io::Result<()> {
    let data = aiocoro_block::IoBuffer::copy_from(&pattern(64 << 10, round));
    blk.write(co, u64::from(round) * (64 << 10), &data)
}
