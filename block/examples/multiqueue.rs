//! Random 4 KiB reads and writes from every IoThread through one `BlockBackend`, every read
//! checked against a shadow copy (multiqueue, as a guest with several queues drives a disk).
//!
//! ```text
//! cargo run --release -p aiocoro-block --example multiqueue -- [--image PATH] [--format qcow2|raw]
//!     [--size 64M] [--count 100000] [--reads 50] [--iothreads N] [--depth 16]
//!     [--cache writeback|none] [--aio io_uring|threads]
//! ```
//!
//! `--image PATH` names a new image file to make and keep (it must not exist). With no
//! options it makes a temporary 64 MiB qcow2 image, runs 100 000 requests (half reads)
//! from one IoThread per available core, 16 in flight on each, and removes the image. Each
//! 4 KiB block has a version under a `CoMutex`: a write takes the block's lock, writes the
//! pattern of the next version and records it; a read takes the lock and checks the pattern
//! of the recorded version. At the end the backend is drained and flushed, the image closed
//! and opened again, and every block read back and checked once more; a qcow2 image then
//! goes through `qemu-img check` when `qemu-img` is installed (errors or leaked clusters fail
//! the run; without `qemu-img` the run says `qemu-img check: skipped` and why). The last
//! line is the verdict; the exit status is 0 only for `verdict: PASS`.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro::sync::CoMutex;
use aiocoro_block::{BlockBackend, BlockGraph, BlockOptions, IoBuffer};
use example_cli::Arg::Long;
use example_cli::{CommandLine, Stop};

/// The request size, and the unit the shadow tracks.
const BLOCK: usize = 4096;

struct Args {
    image: Option<PathBuf>,
    format: String,
    size: u64,
    count: u64,
    read_percent: u64,
    iothreads: usize,
    depth: usize,
    cache: String,
    aio: String,
}

const USAGE: &str = "\
usage: multiqueue [--image PATH] [--format qcow2|raw] [--size SIZE] [--count N] [--reads PERCENT]
                  [--iothreads N] [--depth D] [--cache writeback|none] [--aio io_uring|threads]

Random 4 KiB reads and writes from N IoThreads through one BlockBackend, every read checked,
then the image reopened and checked (and qemu-img check run on a qcow2 image). Numbers as
qemu-img reads them: decimal, 0x hex or 0 octal; SIZE also with a unit k, M, G, T (B: bytes).

  -h, --help              print this help and exit
  --image PATH            make and keep this image (it must not exist; default: a temporary one)
  --format FMT            qcow2 (default) or raw
  --size SIZE             the image size, a multiple of 4 KiB (default 64M)
  --count N               requests to send (default 100000)
  --reads PERCENT         the share of reads, 0 to 100 (default 50)
  --iothreads N           IoThreads (default: one per available core)
  --depth D               requests in flight per IoThread (default 16)
  --cache MODE            writeback (default) or none (O_DIRECT)
  --aio AIO               io_uring (default) or threads";

fn parse_args(line: &mut CommandLine) -> Result<Args, Stop> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut args = Args {
        image: None,
        format: "qcow2".into(),
        size: 64 << 20,
        count: 100_000,
        read_percent: 50,
        iothreads: cores,
        depth: 16,
        cache: "writeback".into(),
        aio: "io_uring".into(),
    };
    while let Some(arg) = line.next_arg()? {
        match arg {
            Long("image") => args.image = Some(line.value()?.into()),
            Long("format") => args.format = line.value()?,
            Long("size") => args.size = line.size("image size", BLOCK as u64..=i64::MAX as u64)?,
            Long("count") => args.count = line.integer("request count", 0..=i64::MAX)? as u64,
            Long("reads") => args.read_percent = line.integer("read percentage", 0..=100)? as u64,
            Long("iothreads") => {
                args.iothreads = line.integer("number of IoThreads", 1..=1024)? as usize
            }
            Long("depth") => args.depth = line.integer("queue depth", 1..=1 << 20)? as usize,
            Long("cache") => args.cache = line.value()?,
            Long("aio") => args.aio = line.value()?,
            arg => return Err(arg.unexpected().into()),
        }
    }
    if !args.size.is_multiple_of(BLOCK as u64) {
        return Err(format!("--size must be a multiple of {BLOCK}").into());
    }
    if args.format != "raw" && args.format != "qcow2" {
        return Err(format!("format '{}' is not supported (qcow2 or raw)", args.format).into());
    }
    Ok(args)
}

/// A small fast generator (splitmix64) for offsets, choices and block patterns.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The contents of `block` at `version`: zeroes for version 0 (a new image), else words
/// derived from both.
fn fill_pattern(buf: &mut [u8], block: u64, version: u64) {
    if version == 0 {
        buf.fill(0);
        return;
    }
    let seed = mix(block ^ (version << 32));
    for (index, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(seed ^ index as u64).to_le_bytes());
    }
}

/// Whether `buf` holds `block` at `version`.
fn matches_pattern(buf: &[u8], block: u64, version: u64) -> bool {
    let mut expected = [0u8; BLOCK];
    fill_pattern(&mut expected, block, version);
    buf == expected
}

/// What every thread shares.
struct Shared {
    blk: BlockBackend,
    /// The version of each block; the lock is held across the block's I/O.
    versions: Vec<CoMutex<u64>>,
    next: AtomicU64,
    count: u64,
    read_percent: u64,
    mismatches: AtomicU64,
    reads_checked: AtomicU64,
    errors: AtomicU64,
}

/// One request: a read (checked) or a write of the next version, of a random block.
fn request(co: &Co, shared: &Shared, buffer: &mut IoBuffer, random: u64) -> io::Result<()> {
    let block = random % shared.versions.len() as u64;
    let offset = block * BLOCK as u64;
    let mut version = shared.versions[block as usize].lock(co);
    if (random >> 40) % 100 < shared.read_percent {
        shared.blk.read(co, offset, buffer)?;
        shared.reads_checked.fetch_add(1, Ordering::Relaxed);
        if !matches_pattern(buffer, block, *version) {
            shared.mismatches.fetch_add(1, Ordering::Relaxed);
            eprintln!("multiqueue: block {block} does not hold version {}", *version);
        }
    } else {
        fill_pattern(buffer, block, *version + 1);
        shared.blk.write(co, offset, buffer)?;
        *version += 1;
    }
    Ok(())
}

/// Runs requests until the count is used up; returns the latencies in ns.
fn worker(co: &Co, shared: &Shared, seed: u64) -> Vec<u32> {
    let mut buffer = IoBuffer::new(BLOCK);
    let mut latencies = Vec::new();
    let mut state = seed;
    while shared.next.fetch_add(1, Ordering::Relaxed) < shared.count {
        state = mix(state);
        let started = Instant::now();
        if let Err(error) = request(co, shared, &mut buffer, state) {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("multiqueue: {error}");
        }
        latencies.push(started.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    latencies
}

/// Starts `depth` workers on the calling IoThread; the last to end sends every latency.
fn start_lane(shared: &Arc<Shared>, lane: usize, depth: usize, done: mpsc::Sender<Vec<u32>>) {
    let ctx = AioContext::current().expect("an IoThread has a context");
    let collected = std::rc::Rc::new(std::cell::RefCell::new((depth, Vec::new())));
    for slot in 0..depth {
        let (shared, collected, done) = (shared.clone(), collected.clone(), done.clone());
        ctx.spawn(move |co| {
            let latencies = worker(co, &shared, mix((lane * 1000 + slot) as u64 + 1));
            let mut collected = collected.borrow_mut();
            collected.0 -= 1;
            collected.1.extend(latencies);
            if collected.0 == 0 {
                let _ = done.send(std::mem::take(&mut collected.1));
            }
        });
    }
}

/// Reads the whole image and checks every block against its last version.
/// Opens the image `options` describe.
fn open_image(options: &BlockOptions) -> io::Result<BlockBackend> {
    let options = options.clone();
    let graph = BlockGraph::new();
    let root = aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::open_options(co, &graph, &options).map(|(_, node)| node)
    })??;
    Ok(BlockBackend::new(root))
}

/// Reads the whole image through `blk` and counts the blocks that do not hold their last
/// version.
fn verify_all(blk: BlockBackend, versions: Vec<CoMutex<u64>>) -> io::Result<u64> {
    aiocoro_block::run_in_coroutine(move |co| {
        let mut buffer = IoBuffer::new(BLOCK);
        let mut bad = 0;
        for (block, version) in versions.into_iter().enumerate() {
            blk.read(co, (block * BLOCK) as u64, &mut buffer)?;
            if !matches_pattern(&buffer, block as u64, version.into_inner()) {
                bad += 1;
            }
        }
        Ok(bad)
    })?
}

fn percentile(sorted: &[u32], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    Duration::from_nanos(sorted.get(index).copied().unwrap_or(0).into())
}

fn run(args: &Args) -> io::Result<bool> {
    let (path, temporary) = match &args.image {
        Some(path) => (path.clone(), false),
        None => (
            std::env::temp_dir().join(format!("aiocoro-multiqueue-{}.img", std::process::id())),
            true,
        ),
    };
    let file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|error| {
            io::Error::new(error.kind(), format!("cannot create {}: {error}", path.display()))
        })?;
    let result = make_image(args, file, &path).and_then(|()| run_on(args, &path));
    if temporary {
        let _ = std::fs::remove_file(&path);
    }
    result
}

/// Makes the new (empty) `file` at `path` an image of the asked format and size.
fn make_image(args: &Args, file: std::fs::File, path: &std::path::Path) -> io::Result<()> {
    if args.format == "raw" {
        return file.set_len(args.size);
    }
    drop(file);
    let (path, size) = (path.to_owned(), args.size);
    aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::qcow2::create_file(
            co,
            &path,
            &aiocoro_block::qcow2::CreateOptions::new(size),
        )
    })?
}

/// `qemu-img check` of a qcow2 image: whether it is clean (no errors, no leaks) and the
/// first line of its report; `None` where `qemu-img` is not installed.
/// `qemu-img check` of the image at `path`: whether it is clean and its first line; an error
/// when `qemu-img` cannot be run (not installed).
fn qemu_img_check(path: &std::path::Path) -> io::Result<(bool, String)> {
    let output = std::process::Command::new("qemu-img").arg("check").arg(path).output()?;
    let report = String::from_utf8_lossy(&output.stdout);
    let first = report.lines().next().unwrap_or("(no output)").to_owned();
    Ok((output.status.success(), first))
}

fn run_on(args: &Args, path: &std::path::Path) -> io::Result<bool> {
    let mut options = BlockOptions::default();
    options.set("driver", &args.format)?;
    options.set("file.filename", &path.to_string_lossy())?;
    options.set("file.cache", &args.cache)?;
    options.set("file.aio", &args.aio)?;
    let blk = open_image(&options)?;
    let blocks = (args.size / BLOCK as u64) as usize;
    let shared = Arc::new(Shared {
        blk,
        versions: (0..blocks).map(|_| CoMutex::new(0)).collect(),
        next: AtomicU64::new(0),
        count: args.count,
        read_percent: args.read_percent,
        mismatches: AtomicU64::new(0),
        reads_checked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    println!(
        "multiqueue: {} requests ({}% reads) of {BLOCK} bytes on a {} MiB {} image ({}, \
         cache={}, aio={}), {} IoThreads x {} in flight",
        args.count,
        args.read_percent,
        args.size >> 20,
        args.format,
        path.display(),
        args.cache,
        args.aio,
        args.iothreads,
        args.depth
    );
    let threads: Vec<IoThread> = (0..args.iothreads)
        .map(|n| IoThread::spawn(&format!("multiqueue-{n}")))
        .collect::<io::Result<_>>()?;
    let started = Instant::now();
    let (done, results) = mpsc::channel();
    for (lane, thread) in threads.iter().enumerate() {
        let (shared, done, depth) = (shared.clone(), done.clone(), args.depth);
        thread
            .handle()
            .schedule_oneshot(move || start_lane(&shared, lane, depth, done))
            .map_err(io::Error::other)?;
    }
    drop(done);
    let progress = io::stderr().is_terminal();
    let mut latencies = Vec::with_capacity(args.count as usize);
    let mut finished = 0;
    while finished < threads.len() {
        match results.recv_timeout(Duration::from_millis(200)) {
            Ok(lane) => {
                latencies.extend(lane);
                finished += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("an IoThread ended without reporting"));
            }
        }
        if progress {
            let done = shared.next.load(Ordering::Relaxed).min(args.count);
            eprint!("\r{done}/{} requests", args.count);
            let _ = io::stderr().flush();
        }
    }
    let elapsed = started.elapsed();
    if progress {
        eprintln!();
    }
    drop(shared.blk.drain());
    for thread in threads {
        thread.stop();
    }
    // Flush, close the image (drop every node), open it again and check every block: what
    // the run wrote must be in the file, not only in a cache.
    let Ok(shared) = Arc::try_unwrap(shared) else {
        return Err(io::Error::other("the image is still open elsewhere"));
    };
    let blk = shared.blk;
    aiocoro_block::run_in_coroutine(move |co| blk.flush(co))??;
    let (mismatches, errors) = (shared.mismatches.into_inner(), shared.errors.into_inner());
    let reads_checked = shared.reads_checked.into_inner();
    let unreadable = verify_all(open_image(&options)?, shared.versions)?;
    let checked = (args.format == "qcow2").then(|| qemu_img_check(path));
    latencies.sort_unstable();
    println!(
        "{} requests in {:.3} s: {:.0} IOPS, latency p50 {:?} p99 {:?}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    println!("checked {} reads during the run and {blocks} blocks after it", reads_checked);
    let clean = match &checked {
        Some(Ok((clean, report))) => {
            println!("qemu-img check: {report}");
            Some(*clean)
        }
        Some(Err(error)) if error.kind() == io::ErrorKind::NotFound => {
            println!("qemu-img check: skipped (qemu-img is not installed)");
            None
        }
        Some(Err(error)) => {
            println!("qemu-img check: skipped (cannot run qemu-img: {error})");
            None
        }
        None => None,
    };
    let pass = mismatches == 0 && errors == 0 && unreadable == 0 && clean != Some(false);
    if pass {
        println!("verdict: PASS");
    } else {
        let check = if clean == Some(false) { ", qemu-img check not clean" } else { "" };
        println!(
            "verdict: FAIL ({mismatches} reads mismatched, {errors} requests failed, \
             {unreadable} blocks wrong at the end{check})"
        );
    }
    Ok(pass)
}

fn main() -> ExitCode {
    let args = CommandLine::from_env("multiqueue", USAGE).parse(parse_args);
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("multiqueue: {error}");
            println!("verdict: FAIL ({error})");
            ExitCode::FAILURE
        }
    }
}
