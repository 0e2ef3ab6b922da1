//! File I/O for coroutines on io_uring (QEMU's `block/io_uring.c`), with the thread pool as the
//! fallback where the kernel refuses io_uring.
//!
//! Each context owns one ring ([`engine`](mod@engine)), made on its first file I/O and ended when
//! the context shuts down. The ring ([`ring`]) signals an eventfd that the context watches with an
//! fd handler; the handler reaps completions into the ring's in-flight table and wakes the
//! coroutines waiting for them. A coroutine queues its request and waits; the requests queued in
//! one round go to the kernel together, when the context next polls or once
//! [`MAX_BATCH`](merge::MAX_BATCH) of them wait (one `io_uring_enter` for the batch, which lets the
//! kernel merge neighbouring requests).
//!
//! Neighbours in that queue that read (or write) one file at contiguous offsets go to the
//! kernel as one `readv` (`writev`) over the concatenation of their iovecs (QEMU virtio-blk's
//! request merging): one block-layer request instead of up to [`MAX_BATCH`](merge::MAX_BATCH). Merging never
//! changes a result: each member gets its own length when the merged request moves all of its
//! bytes; members not covered whole by a short or failed merged request go to the kernel again
//! alone, and their own completions decide (see [`merge`], which plans the merges).
//!
//! When the ring cannot be made (an old kernel, seccomp, `io_uring_disabled`, `ENOSYS`,
//! `EPERM`, ...), the context uses [`ThreadPool::global`](crate::aio::ThreadPool::global) instead, running the same calls with
//! `preadv(2)`, `pwritev(2)`, `fsync(2)` and `fdatasync(2)` on a worker; the process says so
//! once on stderr. `AIOCORO_IO_URING=off` in the environment (read once per process) chooses
//! the fallback from the start, quietly.
//!
//! The files: [`engine`](mod@engine) (the choice and the fallback, owned by the context), [`ring`]
//! (one context's io_uring), [`request_guard`] (what keeps a request's memory borrowed until the
//! kernel is done with it), [`merge`] (which neighbours go as one) and [`op_error`] (errors that
//! name the call).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types};

use self::engine::{Engine, engine};
use self::merge::Kind;
use self::op_error::with_context;
use self::request_guard::RequestGuard;
use self::ring::{Request, VectoredIo};
use super::thread_pool::ThreadPool;
use crate::coroutine::Co;
use crate::sys;

mod engine;
mod merge;
mod op_error;
mod request_guard;
mod ring;

pub(crate) use engine::FileIo;
pub use engine::{IoEngine, io_engine};

impl IoEngine {
    /// [`preadv`] on this engine rather than the context's choice. `IoUring` where the
    /// context has no ring (see [`io_engine`]) falls back to the thread pool, as [`preadv`]
    /// does.
    ///
    /// # Errors
    ///
    /// As [`preadv`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](crate::aio::AioContext).
    pub fn preadv(
        self,
        co: &Co,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        vectored_on(self.resolve(), co, fd, Buffers::Read(bufs), offset)
    }

    /// [`pwritev`] on this engine (see [`IoEngine::preadv`]).
    ///
    /// # Errors
    ///
    /// As [`pwritev`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](crate::aio::AioContext).
    pub fn pwritev(
        self,
        co: &Co,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        vectored_on(self.resolve(), co, fd, Buffers::Write(bufs), offset)
    }

    /// [`fsync`] on this engine (see [`IoEngine::preadv`]).
    ///
    /// # Errors
    ///
    /// As [`fsync`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](crate::aio::AioContext).
    pub fn fsync(self, co: &Co, fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
        fsync_on(self.resolve(), co, fd, data_only)
    }
}

/// Reads from `fd` at `offset` into `bufs`, in order, while the coroutine sleeps (one
/// `preadv(2)`, on io_uring or on the thread pool; see [`io_engine`]). Returns how many bytes
/// were read: fewer than asked at the end of the file, 0 at or past it.
///
/// ```
/// use aiocoro::aio::{self, AioContext};
/// use std::io::{IoSlice, IoSliceMut};
/// use std::os::fd::AsFd;
///
/// let path = std::env::temp_dir().join(format!("aiocoro-preadv-doc-{}", std::process::id()));
/// let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// let ctx = AioContext::new()?;
/// let result = ctx.run(move |co| {
///     aio::pwritev(co, file.as_fd(), &[IoSlice::new(b"hello, "), IoSlice::new(b"disk")], 0)?;
///     aio::fsync(co, file.as_fd(), true)?;
///     let (mut head, mut tail) = ([0u8; 5], [0u8; 16]);
///     let bufs = &mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)];
///     let read = aio::preadv(co, file.as_fd(), bufs, 0)?;
///     Ok::<_, std::io::Error>((read, head, tail))
/// });
/// std::fs::remove_file(&path)?;
/// let (read, head, tail) = result?;
/// assert_eq!(read, 11);
/// assert_eq!(&head, b"hello");
/// assert_eq!(&tail[..6], b", disk");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The system call's error, with what was asked in front: `preadv(fd 7, offset 4096): Bad file
/// descriptor (os error 9)`; the error's [`source`](std::error::Error::source) is the bare OS
/// error. Offsets past `i64::MAX` and more than `u32::MAX` buffers are `EINVAL`.
///
/// # Panics
///
/// If this thread has no [`AioContext`](crate::aio::AioContext).
pub fn preadv(
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    vectored_on(engine(), co, fd, Buffers::Read(bufs), offset)
}

/// Writes `bufs`, in order, to `fd` at `offset` while the coroutine sleeps (one `pwritev(2)`,
/// on io_uring or on the thread pool; see [`io_engine`]). Returns how many bytes were written.
///
/// # Errors
///
/// As [`preadv`]: `pwritev(fd 7, offset 0): Bad file descriptor (os error 9)` for a
/// descriptor opened read-only, for example.
///
/// # Panics
///
/// If this thread has no [`AioContext`](crate::aio::AioContext).
pub fn pwritev(
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<usize> {
    vectored_on(engine(), co, fd, Buffers::Write(bufs), offset)
}

/// The buffers of one vectored read (the kernel writes them) or write (it reads them).
enum Buffers<'a, 'b> {
    Read(&'a mut [IoSliceMut<'b>]),
    Write(&'a [IoSlice<'b>]),
}

/// [`preadv`] or [`pwritev`] on `engine`.
fn vectored_on(
    engine: Engine,
    co: &Co,
    fd: BorrowedFd<'_>,
    mut buffers: Buffers<'_, '_>,
    offset: u64,
) -> io::Result<usize> {
    let (kind, iov, count, len) = match &mut buffers {
        Buffers::Read(bufs) => (
            Kind::Read,
            // Through `as_mut_ptr`: the kernel writes into these buffers.
            bufs.as_mut_ptr().cast::<libc::iovec>().cast_const(),
            bufs.len(),
            bufs.iter().map(|buf| buf.len() as u64).sum(),
        ),
        Buffers::Write(bufs) => (
            Kind::Write,
            bufs.as_ptr().cast::<libc::iovec>(),
            bufs.len(),
            bufs.iter().map(|buf| buf.len() as u64).sum(),
        ),
    };
    let result = match engine {
        Engine::Uring(ring) => (|| {
            let request = VectoredIo {
                kind,
                fd: fd.as_raw_fd(),
                offset,
                iov,
                count: rw_args(count, offset)?,
                len,
                alone: false,
            };
            // SAFETY: the iovec array and the buffers it names (writable for a read: they come
            // from `IoSliceMut`s) are borrowed for this whole call, and `run` neither returns
            // nor lets an unwinding pass before the kernel is done with them (alone or merged).
            completion(unsafe { RequestGuard::run(&ring, co, Request::Vectored(request)) })
        })(),
        Engine::Pool => match buffers {
            Buffers::Read(bufs) => {
                // SAFETY: `fd` and `bufs` are borrows that outlive this call; see
                // `run_borrowed`: whatever owns them lives on this coroutine's stack or
                // outlives it.
                unsafe { ThreadPool::global().run_borrowed(co, || sys::preadv(fd, bufs, offset)) }
            }
            Buffers::Write(bufs) => {
                // SAFETY: as for the read above.
                unsafe { ThreadPool::global().run_borrowed(co, || sys::pwritev(fd, bufs, offset)) }
            }
        },
    };
    let name = match kind {
        Kind::Read => "preadv",
        Kind::Write => "pwritev",
    };
    result.map_err(|error| {
        with_context(error, format!("{name}(fd {}, offset {offset})", fd.as_raw_fd()))
    })
}

/// Flushes `fd` to stable storage while the coroutine sleeps: its data and metadata
/// (`fsync(2)`), or with `data_only` its data and only the metadata needed to read it back
/// (`fdatasync(2)`); on io_uring or on the thread pool (see [`io_engine`]).
///
/// # Errors
///
/// As [`preadv`], named `fsync(fd N)` or `fdatasync(fd N)`.
///
/// # Panics
///
/// If this thread has no [`AioContext`](crate::aio::AioContext).
pub fn fsync(co: &Co, fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    fsync_on(engine(), co, fd, data_only)
}

fn fsync_on(engine: Engine, co: &Co, fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    let result = match engine {
        Engine::Uring(ring) => {
            let flags =
                if data_only { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
            let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd())).flags(flags).build();
            // SAFETY: the request names no memory, only a descriptor borrowed for the call.
            completion(unsafe { RequestGuard::run(&ring, co, Request::Other(entry)) }).map(drop)
        }
        Engine::Pool => {
            let sync = move || if data_only { sys::fdatasync(fd) } else { sys::fsync(fd) };
            // SAFETY: `fd` is a borrow that outlives this call (see `preadv`).
            unsafe { ThreadPool::global().run_borrowed(co, sync) }
        }
    };
    let name = if data_only { "fdatasync" } else { "fsync" };
    result.map_err(|error| with_context(error, format!("{name}(fd {})", fd.as_raw_fd())))
}

/// Checks what io_uring and `preadv`/`pwritev` would read differently: an offset of `-1`
/// means "the file position" to io_uring, and the buffer count is a `u32` there.
fn rw_args(buffers: usize, offset: u64) -> io::Result<u32> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    i64::try_from(offset).map_err(|_| einval())?;
    u32::try_from(buffers).map_err(|_| einval())
}

/// A completion's result: a count, or a negated `errno`.
fn completion(result: i32) -> io::Result<usize> {
    match usize::try_from(result) {
        Ok(count) => Ok(count),
        Err(_) => Err(io::Error::from_raw_os_error(-result)),
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;

    #[test]
    fn completions_map_to_counts_and_os_errors() {
        assert_eq!(completion(7).unwrap(), 7);
        assert_eq!(completion(-libc::EBADF).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(rw_args(3, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(rw_args(3, i64::MAX as u64).unwrap(), 3);
    }
}
