//! A tokio program driving coroutine I/O, and coroutines awaiting tokio and `futures`.
//!
//! ```text
//! cargo run --release -p aiocoro-block --example tokio_bridge
//! ```
//!
//! On a tokio multi-thread runtime, tasks write 64 KiB blocks to a temporary 64 MiB qcow2
//! image and read them back: each request runs in a coroutine spawned on one of two
//! IoThreads (`AioHandle::spawn`), and the task `.await`s the coroutine's `JoinHandle`. Then
//! a coroutine on an IoThread awaits (`Co::block_on`) a tokio `oneshot` that a tokio task
//! completes and a `futures::channel::oneshot` that a plain thread completes. Every block is
//! compared byte for byte and every value checked; the last line is the verdict, and the exit
//! status is 0 only for `verdict: PASS`. `tests/tokio_bridge.rs` runs the same workloads.

// `tests/tokio_bridge.rs` includes this file as a module and uses its `pub` items.
#![allow(unreachable_pub)]
use example_cli::CommandLine;
use std::io;
use std::path::Path;
use std::process::ExitCode;

use aiocoro::aio::{AioHandle, IoThread};
use aiocoro_block::{BlockBackend, BlockGraph, BlockOptions, IoBuffer};

/// The size of each request.
pub const BLOCK: usize = 64 * 1024;

/// Makes a qcow2 image of `size` bytes at `path` (replacing any file there) and opens it.
pub fn create_qcow2(path: &Path, size: u64) -> io::Result<BlockBackend> {
    let path = path.to_owned();
    aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::qcow2::create_file(
            co,
            &path,
            &aiocoro_block::qcow2::CreateOptions::new(size),
        )?;
        let mut options = BlockOptions::default();
        options.set("driver", "qcow2")?;
        options.set("file.filename", &path.to_string_lossy())?;
        let (_, root) = aiocoro_block::open_options(co, &BlockGraph::new(), &options)?;
        Ok(BlockBackend::new(root))
    })?
}

/// The bytes the example writes to block `index`: no two blocks alike, no byte run longer
/// than a few bytes.
pub fn pattern(index: u64) -> Vec<u8> {
    (0..BLOCK as u64)
        .map(|i| (i.wrapping_mul(31) ^ index.wrapping_mul(131) ^ (i >> 8)) as u8)
        .collect()
}

/// Writes `data` at `offset` in a coroutine on `iothread`; the returned future is that
/// coroutine's join handle, awaited.
pub async fn write_on(
    iothread: &AioHandle,
    blk: &BlockBackend,
    offset: u64,
    data: Vec<u8>,
) -> io::Result<()> {
    let blk = blk.clone();
    let joined = iothread.spawn(move |co| {
        let mut buffer = IoBuffer::new(data.len());
        buffer.copy_from_slice(&data);
        blk.write(co, offset, &buffer)
    });
    joined.map_err(io::Error::other)?.await
}

/// Reads `len` bytes at `offset` in a coroutine on `iothread`, awaiting its join handle.
pub async fn read_on(
    iothread: &AioHandle,
    blk: &BlockBackend,
    offset: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let blk = blk.clone();
    let joined = iothread.spawn(move |co| {
        let mut buffer = IoBuffer::new(len);
        blk.read(co, offset, &mut buffer).map(|()| buffer.to_vec())
    });
    joined.map_err(io::Error::other)?.await
}

/// On `runtime`, one tokio task per block writes `blocks[i]` at `i * BLOCK` through the
/// IoThreads in turn, all concurrently; once all are written, one task per block reads it
/// back (through the other IoThread). Returns what was read, block by block.
pub fn write_then_read(
    runtime: &tokio::runtime::Runtime,
    iothreads: &[AioHandle],
    blk: &BlockBackend,
    blocks: Vec<Vec<u8>>,
) -> io::Result<Vec<Vec<u8>>> {
    runtime.block_on(async {
        let writes: Vec<_> = blocks
            .into_iter()
            .enumerate()
            .map(|(i, data)| {
                let (iothread, blk) = (iothreads[i % iothreads.len()].clone(), blk.clone());
                tokio::spawn(
                    async move { write_on(&iothread, &blk, (i * BLOCK) as u64, data).await },
                )
            })
            .collect();
        let count = writes.len();
        for write in writes {
            write.await.map_err(io::Error::other)??;
        }
        let reads: Vec<_> = (0..count)
            .map(|i| {
                let (iothread, blk) = (iothreads[(i + 1) % iothreads.len()].clone(), blk.clone());
                tokio::spawn(
                    async move { read_on(&iothread, &blk, (i * BLOCK) as u64, BLOCK).await },
                )
            })
            .collect();
        let mut read = Vec::with_capacity(count);
        for task in reads {
            read.push(task.await.map_err(io::Error::other)??);
        }
        Ok(read)
    })
}

/// What [`await_channels`]'s coroutine received, and where it ran.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    /// The value from the tokio `oneshot`.
    pub from_tokio: u64,
    /// The value from the `futures::channel::oneshot`.
    pub from_futures: String,
    /// The name of the thread the coroutine ran on, before and after its awaits.
    pub threads: (Option<String>, Option<String>),
}

/// A coroutine on `iothread` awaits a tokio `oneshot`, which a task of `runtime` completes
/// with `to_tokio`, and a `futures::channel::oneshot`, which a plain thread completes with
/// `to_futures`; both senders wait a little first, so that the coroutine really suspends.
pub fn await_channels(
    runtime: &tokio::runtime::Runtime,
    iothread: &AioHandle,
    to_tokio: u64,
    to_futures: String,
) -> io::Result<Received> {
    let (tokio_tx, tokio_rx) = tokio::sync::oneshot::channel();
    let (futures_tx, futures_rx) = futures_channel::oneshot::channel();
    let coroutine = iothread
        .spawn(move |co| {
            let before = std::thread::current().name().map(String::from);
            let from_tokio = co.block_on(tokio_rx);
            let from_futures = co.block_on(futures_rx);
            let after = std::thread::current().name().map(String::from);
            (from_tokio, from_futures, (before, after))
        })
        .map_err(io::Error::other)?;
    runtime.spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        tokio_tx.send(to_tokio)
    });
    let sender = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(10));
        futures_tx.send(to_futures)
    });
    let (from_tokio, from_futures, threads) = runtime.block_on(coroutine);
    sender
        .join()
        .map_err(|_| io::Error::other("the sending thread panicked"))?
        .map_err(|_| io::Error::other("the futures oneshot's receiver was gone before the send"))?;
    Ok(Received {
        from_tokio: from_tokio.map_err(io::Error::other)?,
        from_futures: from_futures.map_err(io::Error::other)?,
        threads,
    })
}

/// How many blocks the example writes and reads.
const BLOCKS: u64 = 256;

fn run(path: &Path) -> io::Result<bool> {
    let blk = create_qcow2(path, 64 << 20)?;
    let iothreads = [IoThread::spawn("bridge-0")?, IoThread::spawn("bridge-1")?];
    let handles: Vec<AioHandle> = iothreads.iter().map(|t| t.handle().clone()).collect();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build()?;
    let written: Vec<Vec<u8>> = (0..BLOCKS).map(pattern).collect();
    let started = std::time::Instant::now();
    let read = write_then_read(&runtime, &handles, &blk, written.clone())?;
    let elapsed = started.elapsed();
    let bad = written.iter().zip(&read).filter(|(w, r)| w != r).count();
    println!(
        "{BLOCKS} writes and {BLOCKS} reads of {} KiB through 2 IoThreads from tokio tasks: \
         {:.1} ms, {bad} blocks differ",
        BLOCK / 1024,
        elapsed.as_secs_f64() * 1e3
    );
    let received = await_channels(&runtime, &handles[0], 42, "from a plain thread".into())?;
    println!(
        "coroutine on {:?} received {} (tokio oneshot) and {:?} (futures oneshot), resumed on {:?}",
        received.threads.0, received.from_tokio, received.from_futures, received.threads.1
    );
    let channels_ok = received
        == Received {
            from_tokio: 42,
            from_futures: "from a plain thread".into(),
            threads: (Some("bridge-0".into()), Some("bridge-0".into())),
        };
    aiocoro_block::run_in_coroutine(move |co| blk.flush(co))??;
    for iothread in iothreads {
        iothread.stop();
    }
    Ok(bad == 0 && channels_ok)
}

// The test that shares this file's workloads has a `main` of its own.
/// What `--help` prints.
#[cfg_attr(test, allow(dead_code))]
const USAGE: &str = "\
usage: tokio_bridge [-h]

Tokio tasks on a multi-thread runtime write and read a fresh qcow2 image through coroutines on 2
IoThreads by awaiting their join handles, and an IoThread coroutine awaits a tokio oneshot and a
futures-channel oneshot sent from other threads; every byte and value is checked, and the run
prints `verdict: PASS` or `verdict: FAIL`.

Options:
  -h, --help  print this help and exit
";

#[cfg_attr(test, allow(dead_code))]
fn main() -> ExitCode {
    CommandLine::from_env("tokio_bridge", USAGE).parse(|line| match line.next_arg()? {
        None => Ok(()),
        Some(arg) => Err(arg.unexpected().into()),
    });
    let path =
        std::env::temp_dir().join(format!("aiocoro-tokio-bridge-{}.qcow2", std::process::id()));
    let result = run(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(true) => {
            println!("verdict: PASS");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("verdict: FAIL");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("tokio_bridge: {error}");
            println!("verdict: FAIL");
            ExitCode::FAILURE
        }
    }
}
