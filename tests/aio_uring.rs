//! File I/O from coroutines: io_uring where the kernel allows it, the thread pool where it does
//! not (or where `AIOCORO_IO_URING=off` says so). Every check runs on both engines: directly
//! in this process, and again in a child process with the switch off.

// `run_child` is not used: the fallback child needs one more environment variable.
#[allow(dead_code)]
mod common;

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aiocoro::aio::{self, AioContext, IoEngine, IoThread};
use aiocoro::coroutine::Co;

/// A file in the temporary directory with a unique name, removed when dropped.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(tag: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("aiocoro-uring-{}-{tag}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        File::create(&path).unwrap();
        TempFile { path }
    }

    fn open_rw(&self) -> File {
        OpenOptions::new().read(true).write(true).open(&self.path).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `body` in a coroutine of a fresh context on this thread and returns what it returned.
fn in_coroutine<T: 'static>(body: impl FnOnce(&Co) -> T + 'static) -> T {
    let ctx = AioContext::new().unwrap();
    let out = ctx.run(body);
    assert_eq!(ctx.suspended_coroutines(), 0);
    out
}

/// The byte at `position` of the test pattern `seed`.
fn pattern(seed: u64, position: u64) -> u8 {
    (position.wrapping_mul(31).wrapping_add(seed.wrapping_mul(17)) % 251) as u8
}

fn patterned(seed: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(seed, start + i)).collect()
}

/// The engine this process should use, given the switch and what the kernel allows.
fn expected_engine() -> IoEngine {
    let off = std::env::var_os("AIOCORO_IO_URING").is_some_and(|v| v.eq_ignore_ascii_case("off"));
    if !off && io_uring::IoUring::new(4).is_ok() { IoEngine::IoUring } else { IoEngine::ThreadPool }
}

fn check_engine() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(aio::io_engine(), expected_engine());
    drop(ctx);
}

/// Writes patterns with several buffers at several offsets, reads them back split
/// differently, syncs, and compares with what is on disk.
fn check_round_trip_at_several_offsets() {
    let file = TempFile::new("round-trip");
    let handle = file.open_rw();
    let offsets = [0u64, 16_384, 65_536 + 17, (1 << 20) + 5];
    let sizes = [100usize, 4096, 3000];
    let total: usize = sizes.iter().sum();
    in_coroutine(move |co| {
        for (seed, &offset) in offsets.iter().enumerate() {
            let seed = seed as u64;
            let whole = patterned(seed, offset, total);
            let (a, rest) = whole.split_at(sizes[0]);
            let (b, c) = rest.split_at(sizes[1]);
            let bufs = [IoSlice::new(a), IoSlice::new(b), IoSlice::new(c)];
            let written = aio::pwritev(co, handle.as_fd(), &bufs, offset).unwrap();
            assert_eq!(written, total, "pwritev at {offset}");
        }
        aio::fsync(co, handle.as_fd(), false).unwrap();
        aio::fsync(co, handle.as_fd(), true).unwrap();
        for (seed, &offset) in offsets.iter().enumerate() {
            let (mut p, mut q, mut r, mut s) =
                (vec![0u8; 1], vec![0u8; 2000], vec![0u8; 5000], vec![0u8; total - 7001]);
            let mut bufs = [
                IoSliceMut::new(&mut p),
                IoSliceMut::new(&mut q),
                IoSliceMut::new(&mut r),
                IoSliceMut::new(&mut s),
            ];
            let read = aio::preadv(co, handle.as_fd(), &mut bufs, offset).unwrap();
            assert_eq!(read, total, "preadv at {offset}");
            let got: Vec<u8> = [p, q, r, s].concat();
            assert!(got == patterned(seed as u64, offset, total), "data read back at {offset}");
        }
    });
    let disk = std::fs::read(&file.path).unwrap();
    assert_eq!(disk.len() as u64, (1 << 20) + 5 + total as u64);
    for (seed, &offset) in offsets.iter().enumerate() {
        let at = offset as usize;
        assert!(disk[at..at + total] == patterned(seed as u64, offset, total), "disk at {offset}");
    }
    assert!(disk[total..16_384].iter().all(|&b| b == 0), "the hole between writes stays zero");
}

/// A read across the end of the file is short; at or past the end it reads nothing.
fn check_short_read_at_eof() {
    let file = TempFile::new("eof");
    std::fs::write(&file.path, patterned(9, 0, 100)).unwrap();
    let handle = File::open(&file.path).unwrap();
    in_coroutine(move |co| {
        let (mut a, mut b) = ([0u8; 30], [0u8; 64]);
        let read = aio::preadv(
            co,
            handle.as_fd(),
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
            50,
        )
        .unwrap();
        assert_eq!(read, 50, "100-byte file read from 50");
        assert_eq!(a[..], patterned(9, 50, 30)[..]);
        assert_eq!(b[..20], patterned(9, 80, 20)[..]);
        assert!(b[20..].iter().all(|&x| x == 0), "nothing written past what was read");
        for offset in [100, 4096, 1 << 40] {
            let read = aio::preadv(co, handle.as_fd(), &mut [IoSliceMut::new(&mut a)], offset);
            assert_eq!(read.unwrap(), 0, "read at {offset}, at or past the end");
        }
    });
}

/// The OS error under a context error.
fn os_error(error: &io::Error) -> Option<i32> {
    let source = error.source()?.downcast_ref::<io::Error>()?;
    source.raw_os_error()
}

/// Failed calls say which call, on which descriptor, at which offset, and keep the OS error.
fn check_errors_name_the_call() {
    let file = TempFile::new("errors");
    let read_only = File::open(&file.path).unwrap();
    let write_only = OpenOptions::new().write(true).open(&file.path).unwrap();
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    in_coroutine(move |co| {
        let fd = read_only.as_raw_fd();
        let error = aio::pwritev(co, read_only.as_fd(), &[IoSlice::new(b"nope")], 512).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with(&format!("pwritev(fd {fd}, offset 512): ")), "{message}");
        assert_eq!(os_error(&error), Some(libc::EBADF), "{message}");

        let fd = write_only.as_raw_fd();
        let mut buf = [0u8; 8];
        let error =
            aio::preadv(co, write_only.as_fd(), &mut [IoSliceMut::new(&mut buf)], 0).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with(&format!("preadv(fd {fd}, offset 0): ")), "{message}");
        assert_eq!(os_error(&error), Some(libc::EBADF), "{message}");

        let error = aio::preadv(co, read_only.as_fd(), &mut [IoSliceMut::new(&mut buf)], u64::MAX)
            .unwrap_err();
        assert_eq!(os_error(&error), Some(libc::EINVAL), "{error}");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains(&format!("offset {}", u64::MAX)), "{error}");

        let fd = socket.as_raw_fd();
        for (data_only, name) in [(false, "fsync"), (true, "fdatasync")] {
            let error = aio::fsync(co, socket.as_fd(), data_only).unwrap_err();
            let message = error.to_string();
            assert!(message.starts_with(&format!("{name}(fd {fd}): ")), "{message}");
            assert_eq!(
                os_error(&error),
                Some(libc::EINVAL),
                "a socket cannot be synced: {message}"
            );
        }
    });
}

/// Many coroutines of one context do I/O at once (more than the ring takes at a time), each
/// on its own block, and each reads back its own data.
fn check_many_concurrent_coroutines() {
    const COROUTINES: u64 = 300;
    const BLOCK: usize = 4096;
    let file = TempFile::new("concurrent");
    let handle = Rc::new(file.open_rw());
    let ctx = AioContext::new().unwrap();
    let mut coroutines = Vec::new();
    for i in 0..COROUTINES {
        let handle = handle.clone();
        coroutines.push(ctx.spawn(move |co| {
            let offset = i * BLOCK as u64;
            let data = patterned(i, offset, BLOCK);
            let (head, tail) = data.split_at(1000);
            let written =
                aio::pwritev(co, handle.as_fd(), &[IoSlice::new(head), IoSlice::new(tail)], offset)
                    .unwrap();
            assert_eq!(written, BLOCK);
            let mut back = vec![0u8; BLOCK];
            let read =
                aio::preadv(co, handle.as_fd(), &mut [IoSliceMut::new(&mut back)], offset).unwrap();
            assert_eq!(read, BLOCK);
            assert!(back == data, "coroutine {i} read someone else's data");
            if i % 50 == 0 {
                aio::fsync(co, handle.as_fd(), i % 100 == 0).unwrap();
            }
        }));
    }
    for coroutine in coroutines {
        coroutine.join().unwrap();
    }
    assert_eq!(ctx.suspended_coroutines(), 0);
    drop(ctx);
    let disk = std::fs::read(&file.path).unwrap();
    assert_eq!(disk.len(), COROUTINES as usize * BLOCK);
    for (i, block) in disk.chunks(BLOCK).enumerate() {
        let i = i as u64;
        assert!(block == patterned(i, i * BLOCK as u64, BLOCK), "block {i} on disk");
    }
}

/// A thread's next context gets an engine of its own, and contexts on several threads do
/// I/O at the same time.
fn check_contexts_on_several_threads() {
    let file = TempFile::new("threads");
    let path = file.path.clone();
    // Two contexts in turn on this thread: the second must not use the first one's ring.
    for round in 0..2u64 {
        let handle = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let read = in_coroutine(move |co| {
            assert_eq!(aio::io_engine(), expected_engine());
            let data = patterned(round, 0, 512);
            aio::pwritev(co, handle.as_fd(), &[IoSlice::new(&data)], 0).unwrap();
            let mut back = vec![0u8; 512];
            aio::preadv(co, handle.as_fd(), &mut [IoSliceMut::new(&mut back)], 0).unwrap();
            back == data
        });
        assert!(read, "round {round}");
    }
    let iothreads: Vec<IoThread> =
        (0..3).map(|i| IoThread::spawn(&format!("io-{i}")).unwrap()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, iothread) in iothreads.iter().enumerate() {
        let (tx, path) = (tx.clone(), path.clone());
        iothread
            .handle()
            .spawn(move |co| {
                let handle = OpenOptions::new().read(true).write(true).open(&path).unwrap();
                let offset = 8192 * (i as u64 + 1);
                let data = patterned(100 + i as u64, offset, 8192);
                let mut ok = true;
                for _ in 0..20 {
                    ok &= aio::pwritev(co, handle.as_fd(), &[IoSlice::new(&data)], offset).unwrap()
                        == data.len();
                    let mut back = vec![0u8; data.len()];
                    let bufs = &mut [IoSliceMut::new(&mut back)];
                    ok &= aio::preadv(co, handle.as_fd(), bufs, offset).unwrap() == data.len();
                    ok &= back == data;
                }
                tx.send((aio::io_engine(), ok)).unwrap();
            })
            .unwrap();
    }
    for _ in 0..iothreads.len() {
        let (engine, ok) = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(engine, expected_engine());
        assert!(ok, "an IoThread read back other data than it wrote");
    }
    for iothread in iothreads {
        iothread.stop();
    }
}

#[test]
fn the_engine_is_io_uring_where_the_kernel_allows_it() {
    check_engine();
}

#[test]
fn writes_read_back_at_several_offsets_with_several_buffers() {
    check_round_trip_at_several_offsets();
}

#[test]
fn a_read_across_the_end_of_the_file_is_short() {
    check_short_read_at_eof();
}

#[test]
fn errors_name_the_call_the_descriptor_and_the_offset() {
    check_errors_name_the_call();
}

#[test]
fn many_coroutines_do_io_at_once() {
    check_many_concurrent_coroutines();
}

#[test]
fn contexts_on_several_threads_each_have_their_own_engine() {
    check_contexts_on_several_threads();
}

#[test]
fn the_thread_pool_fallback_passes_the_same_checks() {
    const TEST: &str = "the_thread_pool_fallback_passes_the_same_checks";
    const DONE: &str = "fallback checks passed";
    if common::is_child(TEST) {
        assert_eq!(expected_engine(), IoEngine::ThreadPool, "the child runs with the switch off");
        check_engine();
        check_round_trip_at_several_offsets();
        check_short_read_at_eof();
        check_errors_name_the_call();
        check_many_concurrent_coroutines();
        check_contexts_on_several_threads();
        println!("{DONE}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(common::CHILD_ENV, TEST)
        .env("AIOCORO_IO_URING", "off")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the fallback child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(DONE), "the child did not run the checks:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("io_uring unavailable"),
        "a fallback chosen with the switch is quiet:\n{stderr}"
    );
}
