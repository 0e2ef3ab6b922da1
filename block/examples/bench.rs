//! A peer of `qemu-img bench`: the same flags and defaults, run through `aiocoro-block`.
//!
//! ```text
//! cargo run --release -p aiocoro-block --example bench -- [-f FMT | --image-opts] [-t CACHE]
//!     [-c COUNT] [-d DEPTH] [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO]
//!     [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]
//!     [--iothreads N] [--json] [-q] FILENAME
//! ```
//!
//! Requests go to offsets `OFFSET`, `OFFSET + STEP`, ... (wrapping before the end of the
//! image), `DEPTH` at a time per thread: `DEPTH` coroutines each submit a request, wait for
//! it, and submit the next. With `--iothreads N` (default 1: the main thread's own context)
//! N IoThreads share the `COUNT` requests through one `BlockBackend`, each with `DEPTH`
//! coroutines. `--json` adds one last line `{"requests":..,"seconds":..,"iops":..,
//! "iothreads":..}`.
//!
//! `--flush-interval N` flushes after every N-th request; the flush waits for the requests
//! still in flight first unless `--no-drain` is given (as `qemu-img bench` does). A write run
//! ends with a flush, outside the timed part (qemu-img flushes when it closes the image), so
//! a qcow2 image's cached metadata reaches the file.

use std::cell::Cell;
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockGraph, BlockOptions, ImageArgs, IoBuffer};
use example_cli::Arg::{Long, Short, Value};
use example_cli::{CommandLine, Stop, ValueExt};

/// What to run, from the command line.
#[derive(Debug)]
struct Args {
    filename: String,
    format: Option<String>,
    image_opts: bool,
    cache: String,
    aio: String,
    count: u64,
    depth: usize,
    offset: u64,
    buffer_size: usize,
    step: Option<u64>,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain_on_flush: bool,
    iothreads: usize,
    json: bool,
    quiet: bool,
}

const USAGE: &str = "\
usage: bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET]
             [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
             [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]
             [--iothreads N] [--json] [-q] FILENAME

A peer of qemu-img bench: COUNT requests of BUFFER_SIZE bytes, DEPTH at a time, from OFFSET
on in steps of STEP_SIZE (wrapping before the end of the image). Numbers as qemu-img reads
them: decimal, 0x hex or 0 octal; sizes also with a unit k, M, G, T (B: bytes).

  -h, --help                  print this help and exit
  -q, --quiet                 print nothing but errors (and --json's line)
  -f, --format FMT            the image format (qcow2, raw; probed by default)
  --image-opts                FILENAME is a complete image specification (not with -f)
  -t, --cache CACHE           writeback (default) or none (O_DIRECT)
  -c, --count COUNT           requests to send (default 75000)
  -d, --depth DEPTH           requests in flight per thread (default 64)
  -o, --offset OFFSET         the first request's offset (default 0)
  -s, --buffer-size SIZE      bytes per request (default 4096)
  -S, --step-size SIZE        offset increment per request (default BUFFER_SIZE)
  -i, --aio AIO               threads (default) or io_uring (native is refused)
  -n, --native                the same as -i native (refused: no Linux AIO)
  -w, --write                 write (default: read)
  --pattern PATTERN           the byte to write (default 0)
  --flush-interval INTERVAL   flush after every INTERVAL requests (at least DEPTH)
  --no-drain                  do not wait for requests in flight before a flush
  -U, --force-share           accepted and ignored (no image locks are taken)
  --iothreads N               N IoThreads share the requests (default 1: this thread)
  --json                      a last line {\"requests\":..,\"seconds\":..,\"iops\":..,\"iothreads\":..}";

/// The largest count, depth, request size or step `qemu-img bench` takes (C's `INT_MAX`).
const INT_MAX: u64 = i32::MAX as u64;

fn parse_args(line: &mut CommandLine) -> Result<Args, Stop> {
    let mut args = Args {
        filename: String::new(),
        format: None,
        image_opts: false,
        cache: "writeback".into(),
        aio: "threads".into(),
        count: 75_000,
        depth: 64,
        offset: 0,
        buffer_size: 4096,
        step: None,
        write: false,
        pattern: 0,
        flush_interval: 0,
        drain_on_flush: true,
        iothreads: 1,
        json: false,
        quiet: false,
    };
    let int = 1..=INT_MAX as i64;
    let mut filename = None;
    while let Some(arg) = line.next_arg()? {
        match arg {
            Short('f') | Long("format") => args.format = Some(line.value()?),
            Long("image-opts") => args.image_opts = true,
            Short('t') | Long("cache") => args.cache = line.value()?,
            Short('c') | Long("count") => {
                args.count = line.integer("request count", int.clone())? as u64
            }
            Short('d') | Long("depth") => {
                args.depth = line.integer("queue depth", int.clone())? as usize
            }
            Short('o') | Long("offset") => {
                args.offset = line.size("offset", 0..=i64::MAX as u64)?
            }
            Short('s') | Long("buffer-size") => {
                args.buffer_size = line.size("buffer size", 1..=INT_MAX)? as usize
            }
            Short('S') | Long("step-size") => {
                args.step = Some(line.size("step size", 0..=INT_MAX)?)
            }
            Short('i') | Long("aio") => args.aio = line.value()?,
            Short('n') | Long("native") => args.aio = "native".into(),
            Short('w') | Long("write") => args.write = true,
            Long("pattern") => args.pattern = line.integer("pattern byte", 0..=255)? as u8,
            Long("flush-interval") => {
                args.flush_interval = line.integer("flush interval", 0..=INT_MAX as i64)? as u64
            }
            Long("no-drain") => args.drain_on_flush = false,
            Long("iothreads") => {
                args.iothreads = line.integer("number of IoThreads", 1..=1024)? as usize
            }
            Long("json") => args.json = true,
            Short('q') | Long("quiet") => args.quiet = true,
            Short('U') | Long("force-share") => {}
            Value(value) if filename.is_none() => filename = Some(value.string()?),
            Value(_) => return Err("Expecting one image file name".into()),
            arg => return Err(arg.unexpected().into()),
        }
    }
    args.filename = filename.ok_or("Expecting one image file name")?;
    if args.image_opts && args.format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    if args.flush_interval != 0 && !args.write {
        return Err("--flush-interval is only available in write tests".into());
    }
    if args.flush_interval != 0 && args.flush_interval < args.depth as u64 {
        return Err("Flush interval can't be smaller than depth".into());
    }
    Ok(args)
}

/// The options of the image to open.
fn image_options(args: &Args) -> io::Result<BlockOptions> {
    ImageArgs {
        image: &args.filename,
        format: args.format.as_deref(),
        image_opts: args.image_opts,
        cache: &args.cache,
        aio: &args.aio,
        read_only: false,
    }
    .options()
}

/// The request sequence, shared by every thread: request `i` goes to `offset(i)`.
struct Plan {
    count: u64,
    /// The first index no thread has claimed yet; threads claim [`CLAIM`] at a time.
    next: Unshared<AtomicU64>,
    start: u64,
    step: u64,
    /// Offsets wrap modulo this (0: every request at the start offset).
    wrap: u64,
    buffer_size: usize,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain_on_flush: bool,
}

impl Plan {
    fn offset(&self, index: u64) -> u64 {
        if index == 0 || self.wrap == 0 {
            return if self.wrap == 0 { 0 } else { self.start };
        }
        ((u128::from(self.start) + u128::from(index) * u128::from(self.step))
            % u128::from(self.wrap)) as u64
    }
}

/// How many request indices a thread claims from the shared sequence at once: one shared
/// read-modify-write per this many requests, not per request (with `null-co` a request costs
/// about as much as moving that counter's cache line between CPUs).
const CLAIM: u64 = 64;

/// A value alone in its cache line, so that writing it does not evict what the other
/// threads read next to it.
#[repr(align(128))]
struct Unshared<T>(T);

impl<T> std::ops::Deref for Unshared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The state of one thread's `DEPTH` coroutines, for flushes that wait for the others.
struct Lane {
    busy: Cell<usize>,
    flushing: Cell<bool>,
    /// The indices this thread claimed and has not started yet.
    claimed: Cell<std::ops::Range<u64>>,
}

impl Lane {
    /// The index of this thread's next request, claiming more from `plan` when its claim is
    /// used up; `None` once the plan is.
    fn next_index(&self, plan: &Plan) -> Option<u64> {
        let mut claimed = self.claimed.take();
        if claimed.is_empty() {
            let start = plan.next.fetch_add(CLAIM, Ordering::Relaxed);
            claimed = start.min(plan.count)..start.saturating_add(CLAIM).min(plan.count);
        }
        let index = claimed.next();
        self.claimed.set(claimed);
        index
    }
}

/// Runs requests until the plan is used up; returns the first error.
fn worker(co: &Co, blk: &BlockBackend, plan: &Plan, lane: &Lane) -> io::Result<()> {
    let mut buffer = IoBuffer::new(plan.buffer_size);
    buffer.fill(plan.pattern);
    loop {
        while lane.flushing.get() {
            co.reschedule();
        }
        let Some(index) = lane.next_index(plan) else { return Ok(()) };
        let offset = plan.offset(index);
        lane.busy.set(lane.busy.get() + 1);
        let result = if plan.write {
            blk.write(co, offset, &buffer)
        } else {
            blk.read(co, offset, &mut buffer)
        };
        lane.busy.set(lane.busy.get() - 1);
        result?;
        if plan.flush_interval != 0 && (index + 1).is_multiple_of(plan.flush_interval) {
            if plan.drain_on_flush {
                lane.flushing.set(true);
                while lane.busy.get() != 0 {
                    co.reschedule();
                }
            }
            let flushed = blk.flush(co);
            lane.flushing.set(false);
            flushed?;
        }
    }
}

/// Starts `depth` workers on this thread's context; the last one to end calls `done` with
/// the first error, if any.
fn start_lane(
    ctx: &AioContext,
    blk: &BlockBackend,
    plan: &Arc<Plan>,
    depth: usize,
    done: impl FnOnce(io::Result<()>) + 'static,
) {
    let lane =
        Rc::new(Lane { busy: Cell::new(0), flushing: Cell::new(false), claimed: Cell::new(0..0) });
    let outcome = Rc::new(Outcome { running: Cell::new(depth), error: Cell::new(None) });
    let done = Rc::new(Cell::new(Some(done)));
    for _ in 0..depth {
        let (blk, plan, lane) = (blk.clone(), plan.clone(), lane.clone());
        let (outcome, done) = (outcome.clone(), done.clone());
        ctx.spawn(move |co| {
            if let Err(failed) = worker(co, &blk, &plan, &lane) {
                // Stop the others too (each after the indices it already claimed); keep the first
                // error.
                plan.next.store(plan.count, Ordering::Relaxed);
                let first = outcome.error.take().unwrap_or(failed);
                outcome.error.set(Some(first));
            }
            outcome.running.set(outcome.running.get() - 1);
            if outcome.running.get() == 0 {
                let done = done.take().expect("the last worker ends once");
                done(outcome.error.take().map_or(Ok(()), Err));
            }
        });
    }
}

/// How a lane's workers ended.
struct Outcome {
    running: Cell<usize>,
    error: Cell<Option<io::Error>>,
}

fn run(args: &Args) -> io::Result<(Duration, u64)> {
    let options = image_options(args)?;
    let ctx = AioContext::new()?;
    let graph = BlockGraph::new();
    let root = aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::open_options(co, &graph, &options).map(|(_, node)| node)
    })??;
    let blk = BlockBackend::new(root);
    let size = blk.length();
    let buffer = args.buffer_size as u64;
    if size < buffer {
        return Err(aiocoro_block::invalid_input(format!(
            "the image ({size} bytes) is smaller than one request ({buffer} bytes)"
        )));
    }
    let plan = Arc::new(Plan {
        count: args.count,
        next: Unshared(AtomicU64::new(0)),
        start: args.offset,
        step: args.step.unwrap_or(buffer),
        wrap: size - buffer,
        buffer_size: args.buffer_size,
        write: args.write,
        pattern: args.pattern,
        flush_interval: args.flush_interval,
        drain_on_flush: args.drain_on_flush,
    });
    if !args.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step \
             size {})",
            args.count,
            if args.write { "write" } else { "read" },
            args.buffer_size,
            args.depth * args.iothreads,
            args.offset,
            plan.step
        );
        if args.flush_interval != 0 {
            println!("Sending flush every {} requests", args.flush_interval);
        }
    }
    let started = Instant::now();
    if args.iothreads == 1 {
        let result = Rc::new(Cell::new(None));
        let slot = result.clone();
        start_lane(&ctx, &blk, &plan, args.depth, move |outcome| slot.set(Some(outcome)));
        loop {
            match result.take() {
                Some(outcome) => break outcome?,
                None => {
                    ctx.poll(true);
                }
            }
        }
    } else {
        let threads: Vec<IoThread> = (0..args.iothreads)
            .map(|n| IoThread::spawn(&format!("bench-{n}")))
            .collect::<io::Result<_>>()?;
        let (done, results) = mpsc::channel();
        for thread in &threads {
            let (blk, plan, done, depth) = (blk.clone(), plan.clone(), done.clone(), args.depth);
            thread
                .handle()
                .schedule_oneshot(move || {
                    let ctx = AioContext::current().expect("an IoThread has a context");
                    start_lane(&ctx, &blk, &plan, depth, move |outcome| {
                        let _ = done.send(outcome);
                    });
                })
                .map_err(io::Error::other)?;
        }
        drop(done);
        let outcomes: Vec<io::Result<()>> = results.iter().collect();
        for thread in threads {
            thread.stop();
        }
        outcomes.into_iter().collect::<io::Result<()>>()?;
    }
    let elapsed = started.elapsed();
    // Close the image as qemu-img does, outside the timed run: what was written, metadata
    // included, reaches the file.
    if args.write {
        aiocoro_block::run_in_coroutine(move |co| blk.flush(co))??;
    }
    Ok((elapsed, args.count))
}

fn main() -> ExitCode {
    let args = CommandLine::from_env("bench", USAGE).parse(parse_args);
    match run(&args) {
        Ok((elapsed, requests)) => {
            let seconds = elapsed.as_secs_f64();
            if !args.quiet {
                println!("Run completed in {seconds:.3} seconds.");
            }
            if args.json {
                let iops = requests as f64 / seconds;
                println!(
                    "{{\"requests\":{requests},\"seconds\":{seconds:.6},\"iops\":{iops:.0},\
                     \"iothreads\":{}}}",
                    args.iothreads
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("bench: {error}");
            ExitCode::FAILURE
        }
    }
}
