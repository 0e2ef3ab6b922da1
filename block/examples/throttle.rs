//! A filter driver written outside the crate: a throttle (QEMU's `throttle` filter, reduced
//! to one bytes-per-second limit) over a qcow2 image, driven from 2 IoThreads through one
//! `BlockBackend`. `block/docs/filter-driver.md` walks through it.
//!
//! ```text
//! cargo run --release -p aiocoro-block --example throttle
//! ```
//!
//! It makes a temporary 16 MiB qcow2 image, puts a throttle of 32 MiB/s over it, and has 4
//! coroutines on each IoThread write their own 1 MiB region with unaligned requests, read it
//! back and check every byte; then it checks that the run took at least as long as the
//! limit allows and that block status passes through the filter. The last line is the
//! verdict; the exit status is 0 only for `verdict: PASS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use example_cli::CommandLine;

// The runtime through the block crate's re-export: one version for both.
use aiocoro_block::aiocoro::aio::IoThread;
use aiocoro_block::aiocoro::coroutine::Co;
use aiocoro_block::qcow2::{CreateOptions, create_file};
use aiocoro_block::{
    Allocation, BlockBackend, BlockDriver, BlockGraph, BlockNode, BlockStatus, Child, ChildLabel,
    run_in_coroutine,
};

/// The limit the throttle keeps to.
const BYTES_PER_SECOND: u64 = 32 << 20;
/// What may pass at once before the limit bites (QEMU's `bps-total-max` burst).
const BURST: u64 = 1 << 20;
const IOTHREADS: usize = 2;
const WORKERS_PER_THREAD: usize = 4;
/// Each worker's region of the image.
const REGION: u64 = 1 << 20;
/// Request sizes, none a multiple of 512, so requests start and end anywhere.
const REQUEST_SIZES: [usize; 3] = [3001, 65_537, 777];

/// A token bucket shared by every thread: `tokens` bytes may pass now; it refills at
/// [`BYTES_PER_SECOND`] up to [`BURST`].
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The throttle filter: every request that moves data first takes its length from the
/// bucket, sleeping (the coroutine, not the thread) until there is enough.
struct Throttle {
    /// The filtered child: every request goes here, at the same offset.
    file: Child,
    bucket: Mutex<Bucket>,
}

impl Throttle {
    fn new(file: Child) -> Throttle {
        let bucket = Bucket { tokens: BURST as f64, refilled: Instant::now() };
        Throttle { file, bucket: Mutex::new(bucket) }
    }

    /// Waits until `bytes` may pass, then takes them. The thread lock is held only to look
    /// at the bucket, never across the sleep (a thread lock held across a yield would stall
    /// the context: the runtime's rule 3).
    fn take(&self, co: &Co, bytes: u64) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let earned = now.duration_since(bucket.refilled).as_secs_f64();
                bucket.tokens =
                    (bucket.tokens + earned * BYTES_PER_SECOND as f64).min(BURST as f64);
                bucket.refilled = now;
                // A request larger than the burst passes once the bucket is full.
                let need = (bytes as f64).min(BURST as f64);
                if bucket.tokens >= need {
                    bucket.tokens -= bytes as f64;
                    return;
                }
                Duration::from_secs_f64((need - bucket.tokens) / BYTES_PER_SECOND as f64)
            };
            co.sleep(wait);
        }
    }
}

impl BlockDriver for Throttle {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    // No `alignment`: the default asks for the child's (and through it, for every node
    // below), so requests reach the filter already fit to pass on as they are.

    fn length(&self, _co: &Co) -> io::Result<u64> {
        Ok(self.file.node().length())
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.take(co, bufs.iter().map(|buf| buf.len() as u64).sum());
        self.file.node().read(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.take(co, bufs.iter().map(|buf| buf.len() as u64).sum());
        self.file.node().write(co, offset, bufs)
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        self.file.node().flush(co)
    }

    fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        self.file.node().discard(co, offset, len)
    }

    fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.file.node().write_zeroes(co, offset, len, may_unmap)
    }

    /// A filter shows its child's contents, so it shows its child's status too (the
    /// default would call everything data).
    fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.file.node().block_status(co, offset, len)
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        self.file.node().truncate(co, len)
    }
}

/// The byte at `offset` of the worker `worker`'s data.
fn byte(worker: usize, offset: u64) -> u8 {
    (offset.wrapping_mul(131) >> 3) as u8 ^ (worker as u8).wrapping_mul(37)
}

/// Writes the worker's region in unaligned requests, reads it back in others, and checks it.
fn work(co: &Co, blk: &BlockBackend, worker: usize) -> io::Result<()> {
    let start = worker as u64 * REGION;
    let expected: Vec<u8> = (start..start + REGION).map(|at| byte(worker, at)).collect();
    let mut done = 0;
    for size in REQUEST_SIZES.iter().cycle() {
        let len = (*size as u64).min(REGION - done) as usize;
        blk.write(co, start + done, &expected[done as usize..done as usize + len])?;
        done += len as u64;
        if done == REGION {
            break;
        }
    }
    let mut back = vec![0u8; REGION as usize];
    for (chunk, at) in back.chunks_mut(40_000).zip((0..).step_by(40_000)) {
        blk.read(co, start + at, chunk)?;
    }
    match back.iter().zip(&expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(io::Error::other(format!("worker {worker}: byte {at} read back wrong"))),
    }
}

/// The temporary image, removed however the run ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run() -> io::Result<()> {
    let image = std::env::temp_dir().join(format!("aiocoro-throttle-{}.qcow2", std::process::id()));
    let _scratch = Scratch(image.clone());
    let size = (IOTHREADS * WORKERS_PER_THREAD) as u64 * REGION * 2;
    let blk = run_in_coroutine(move |co| {
        create_file(co, &image, &CreateOptions::new(size))?;
        let graph = BlockGraph::new();
        let options = format!("driver=qcow2,file.filename={}", image.display());
        let (qcow2_id, _) = aiocoro_block::open(co, &graph, &options)?;
        let (_, throttle) = graph.add_node_with(|children| {
            let file = children.attach(ChildLabel::filtered_file(), qcow2_id)?;
            BlockNode::new(co, "throttle", Throttle::new(file), false)
        })?;
        io::Result::Ok(BlockBackend::new(throttle))
    })??;

    let threads: Vec<IoThread> = (0..IOTHREADS)
        .map(|i| IoThread::spawn(&format!("throttle-{i}")))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for (t, thread) in threads.iter().enumerate() {
        for w in 0..WORKERS_PER_THREAD {
            let blk = blk.clone();
            let worker = t * WORKERS_PER_THREAD + w;
            // A closed context is an `io::Error` too (`ContextClosed` converts).
            workers.push(thread.handle().spawn(move |co| work(co, &blk, worker))?);
        }
    }
    for worker in workers {
        worker.join().map_err(|_| io::Error::other("a worker panicked"))??;
    }
    let elapsed = started.elapsed();
    for thread in threads {
        thread.stop();
    }

    let moved = 2 * (IOTHREADS * WORKERS_PER_THREAD) as u64 * REGION;
    let least =
        Duration::from_secs_f64(moved.saturating_sub(BURST) as f64 / BYTES_PER_SECOND as f64);
    let rate = moved as f64 / elapsed.as_secs_f64() / f64::from(1 << 20);
    println!(
        "{moved} bytes through the throttle from {IOTHREADS} IoThreads in {:.3} s \
         ({rate:.1} MiB/s, limit {} MiB/s)",
        elapsed.as_secs_f64(),
        BYTES_PER_SECOND >> 20
    );
    if elapsed < least {
        return Err(io::Error::other(format!("the limit needs at least {least:?}: not throttled")));
    }

    let status = run_in_coroutine(move |co| {
        let written = blk.block_status(co, 0, 4096)?;
        let last = blk.length() - 4096;
        let untouched = blk.block_status(co, last, 4096)?;
        blk.close(co)?;
        io::Result::Ok((written, untouched))
    })??;
    println!(
        "block status through the filter: written {:?}, never written {:?}",
        status.0, status.1
    );
    if status.0.allocation != Allocation::Data || status.1.allocation == Allocation::Data {
        return Err(io::Error::other(format!("block status did not pass through: {status:?}")));
    }
    Ok(())
}

/// What `--help` prints.
const USAGE: &str = "\
usage: throttle [-h]

Moves 16 MiB through a throttling filter over a fresh qcow2 image from 2 IoThreads, checks every
byte and the rate, and prints `verdict: PASS` or `verdict: FAIL`.

Options:
  -h, --help  print this help and exit
";

fn main() -> ExitCode {
    CommandLine::from_env("throttle", USAGE).parse(|line| match line.next_arg()? {
        None => Ok(()),
        Some(arg) => Err(arg.unexpected().into()),
    });
    match run() {
        Ok(()) => {
            println!("verdict: PASS");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("throttle: {error}");
            println!("verdict: FAIL");
            ExitCode::FAILURE
        }
    }
}
