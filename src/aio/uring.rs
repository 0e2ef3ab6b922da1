//! File I/O for coroutines on io_uring (QEMU's `block/io_uring.c`), with the thread pool as the
//! fallback where the kernel refuses io_uring.
//!
//! Each context gets one ring, made on its first file I/O and kept in a thread-local (a thread
//! has at most one context; the ring remembers which one it serves and is replaced when the
//! thread gets a new context). The ring signals an eventfd that the context watches with an fd
//! handler; the handler reaps completions into the ring's in-flight table and wakes the
//! coroutines waiting for them. A coroutine queues its request and waits; the requests
//! queued in one round go to the kernel together, when the context next polls or once
//! [`MAX_BATCH`] of them wait (one `io_uring_enter` for the batch, which lets the kernel merge
//! neighbouring requests).
//!
//! Neighbours in that queue that read (or write) one file at contiguous offsets go to the
//! kernel as one `readv` (`writev`) over the concatenation of their iovecs (QEMU virtio-blk's
//! request merging): one block-layer request instead of up to [`MAX_BATCH`]. Merging never
//! changes a result: each member gets its own length when the merged request moves all of its
//! bytes; members not covered whole by a short or failed merged request go to the kernel again
//! alone, and their own completions decide (see `uring_merge`, which plans the merges).
//!
//! When the ring cannot be made (an old kernel, seccomp, `io_uring_disabled`, `ENOSYS`,
//! `EPERM`, ...), the context uses [`ThreadPool::global`] instead, running the same calls with
//! `preadv(2)`, `pwritev(2)`, `fsync(2)` and `fdatasync(2)` on a worker; the process says so
//! once on stderr. `AIOCORO_IO_URING=off` in the environment (read once per process) chooses
//! the fallback from the start, quietly.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::error::Error;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, squeue, types};

use super::arena::{Arena, Key};
use super::context::{AioContext, no_context, with_current, with_current_brief};
use super::fd::FdHandler;
use super::thread_pool::ThreadPool;
use super::uring_merge::{self, Kind, Piece, Share};
use super::wait::LocalWaker;
use crate::coroutine::Co;
use crate::sys;

/// The environment variable that, set to `off`, makes file I/O use the thread pool.
const ENV_SWITCH: &str = "AIOCORO_IO_URING";

/// Submission-queue slots of each ring (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 128;

/// Requests queued in one round are handed to the kernel as soon as this many wait (QEMU's
/// `aio-max-batch`), the rest when the context next polls. Batches let the kernel merge
/// neighbouring requests; several batches in flight keep the device busy meanwhile. 16 did
/// best for sequential 4 KiB `O_DIRECT` reads at depth 64 on a virtio disk (8: 5% slower,
/// 64: 15% slower).
pub(super) const MAX_BATCH: usize = 16;

/// The `user_data` of cancel requests, whose own completions carry nothing to deliver. No
/// in-flight key has it (that would take 2^32 table places).
const CANCEL_USER_DATA: u64 = u64::MAX;

/// What carries a context's file I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoEngine {
    /// An io_uring of the context's own.
    IoUring,
    /// Blocking system calls on the workers of [`ThreadPool::global`].
    ThreadPool,
}

/// What carries this thread's context's file I/O: io_uring, or the thread-pool fallback. The
/// first call in a context decides (making the context's ring if it can).
///
/// # Panics
///
/// If this thread has no [`AioContext`].
pub fn io_engine() -> IoEngine {
    match engine() {
        Engine::Uring(_) => IoEngine::IoUring,
        Engine::Pool => IoEngine::ThreadPool,
    }
}

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
    /// If this thread has no [`AioContext`].
    pub fn preadv(
        self,
        co: &Co,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        preadv_on(self.resolve(), co, fd, bufs, offset)
    }

    /// [`pwritev`] on this engine (see [`IoEngine::preadv`]).
    ///
    /// # Errors
    ///
    /// As [`pwritev`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`].
    pub fn pwritev(
        self,
        co: &Co,
        fd: BorrowedFd<'_>,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        pwritev_on(self.resolve(), co, fd, bufs, offset)
    }

    /// [`fsync`] on this engine (see [`IoEngine::preadv`]).
    ///
    /// # Errors
    ///
    /// As [`fsync`].
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`].
    pub fn fsync(self, co: &Co, fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
        fsync_on(self.resolve(), co, fd, data_only)
    }

    fn resolve(self) -> Engine {
        match self {
            IoEngine::IoUring => engine(),
            IoEngine::ThreadPool => {
                // Still a context's I/O: refuse a thread without one, as the ring would.
                engine_context();
                Engine::Pool
            }
        }
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
/// If this thread has no [`AioContext`].
pub fn preadv(
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    preadv_on(engine(), co, fd, bufs, offset)
}

fn preadv_on(
    engine: Engine,
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let result = match engine {
        Engine::Uring(ring) => (|| {
            let rw = Rw {
                kind: Kind::Read,
                fd: fd.as_raw_fd(),
                offset,
                iov: bufs.as_mut_ptr().cast::<libc::iovec>().cast_const(),
                count: rw_args(bufs.len(), offset)?,
                len: bufs.iter().map(|buf| buf.len() as u64).sum(),
                alone: false,
            };
            // SAFETY: the iovec array and the buffers it names (writable: they come from
            // `IoSliceMut`s) are borrowed for this whole call, and `run` neither returns nor
            // lets an unwinding pass before the kernel is done with them (alone or merged).
            completion(unsafe { ring.run(co, Request::Rw(rw)) })
        })(),
        Engine::Pool => {
            // SAFETY: `fd` and `bufs` are borrows that outlive this call; see `run_borrowed`:
            // whatever owns them lives on this coroutine's stack or outlives it.
            unsafe { ThreadPool::global().run_borrowed(co, || sys::preadv(fd, bufs, offset)) }
        }
    };
    result.map_err(|error| {
        with_context(error, format!("preadv(fd {}, offset {offset})", fd.as_raw_fd()))
    })
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
/// If this thread has no [`AioContext`].
pub fn pwritev(
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<usize> {
    pwritev_on(engine(), co, fd, bufs, offset)
}

fn pwritev_on(
    engine: Engine,
    co: &Co,
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<usize> {
    let result = match engine {
        Engine::Uring(ring) => (|| {
            let rw = Rw {
                kind: Kind::Write,
                fd: fd.as_raw_fd(),
                offset,
                iov: bufs.as_ptr().cast::<libc::iovec>(),
                count: rw_args(bufs.len(), offset)?,
                len: bufs.iter().map(|buf| buf.len() as u64).sum(),
                alone: false,
            };
            // SAFETY: the iovec array and the buffers it names are borrowed for this whole
            // call, and `run` neither returns nor lets an unwinding pass before the kernel is
            // done with them (alone or merged). The kernel only reads them.
            completion(unsafe { ring.run(co, Request::Rw(rw)) })
        })(),
        Engine::Pool => {
            // SAFETY: `fd` and `bufs` are borrows that outlive this call (see `preadv`).
            unsafe { ThreadPool::global().run_borrowed(co, || sys::pwritev(fd, bufs, offset)) }
        }
    };
    result.map_err(|error| {
        with_context(error, format!("pwritev(fd {}, offset {offset})", fd.as_raw_fd()))
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
/// If this thread has no [`AioContext`].
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
            completion(unsafe { ring.run(co, Request::Other(entry)) }).map(drop)
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

/// An I/O error with the call that failed in front of it.
#[derive(Debug)]
struct OpError {
    op: String,
    source: io::Error,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.source)
    }
}

impl Error for OpError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

fn with_context(error: io::Error, op: String) -> io::Error {
    io::Error::new(error.kind(), OpError { op, source: error })
}

/// What carries a context's file I/O.
#[derive(Clone)]
enum Engine {
    Uring(Rc<Ring>),
    Pool,
}

thread_local! {
    /// The engine of this thread's context, under that context's id. A thread has at most one
    /// context at a time; an entry for an earlier one is replaced on first use by the next.
    static ENGINE: RefCell<Option<(u64, Engine)>> = const { RefCell::new(None) };
}

/// The engine of this thread's context, chosen (and its ring made) on first use.
fn engine() -> Engine {
    let context = engine_context();
    let cached = ENGINE.with_borrow(|engine| match engine {
        Some((id, engine)) if *id == context => Some(engine.clone()),
        _ => None,
    });
    if let Some(engine) = cached {
        return engine;
    }
    let engine = if forced_off() {
        Engine::Pool
    } else {
        match Ring::new(context) {
            Ok(ring) => Engine::Uring(ring),
            Err(error) => {
                report_fallback(&error);
                Engine::Pool
            }
        }
    };
    // A ring of an earlier context of this thread goes now (its drop waits for whatever it
    // still has in flight), outside the thread-local's borrow.
    drop(ENGINE.replace(Some((context, engine.clone()))));
    engine
}

/// The id of this thread's context.
fn engine_context() -> u64 {
    // SAFETY: reading the id runs no other code and drops no handle.
    let context = unsafe { with_current_brief(|local| local.shared.id) };
    context.unwrap_or_else(|| no_context("file I/O"))
}

/// Hands the requests that this thread's coroutines queued on its ring since the last call
/// to the kernel; the context calls it before each wait for events. Returns false if some
/// stay queued because the kernel is busy (the caller should not block then).
pub(crate) fn submit_queued() -> bool {
    ENGINE.with_borrow(|engine| match engine {
        Some((_, Engine::Uring(ring))) => ring.submit_queued(),
        _ => true,
    })
}

/// Whether this thread's ring has completions to reap, or completed requests whose
/// completions the kernel will post when the thread next enters it (cooperative task
/// running); a look at the ring, no system call. For busy polling: the poll that follows
/// makes the system call.
pub(crate) fn completions_ready() -> bool {
    ENGINE.with_borrow(|engine| match engine {
        Some((_, Engine::Uring(ring))) if ring.in_kernel.get() != 0 => {
            let mut uring = ring.uring.borrow_mut();
            !uring.completion().is_empty() || uring.submission().taskrun()
        }
        _ => false,
    })
}

/// Whether `AIOCORO_IO_URING=off` was set when the process first asked.
fn forced_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os(ENV_SWITCH).is_some_and(|v| v.eq_ignore_ascii_case("off")))
}

/// Says once per process that file I/O falls back to the thread pool, and why.
fn report_fallback(error: &io::Error) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if !REPORTED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "aiocoro: io_uring unavailable ({error}), file I/O falls back to the thread pool"
        );
    }
}

/// One context's io_uring.
struct Ring {
    /// The id of the context whose epoll watches `eventfd`.
    context: u64,
    uring: RefCell<IoUring>,
    /// Signalled by the kernel for each completion; the context's fd handler reaps then.
    eventfd: OwnedFd,
    /// The in-flight table: one `Op::Pending` entry per request a coroutine made and has not
    /// got the result of, and one `Op::Merged` entry per merged request in the kernel. The
    /// key of a request in the kernel alone, or of a merged request, is its `user_data`.
    ///
    /// The kernel reads and writes the caller's buffers (and iovec array) from the moment the
    /// request is pushed until its completion is posted, while the coroutine that owns them
    /// sleeps. So the entry is made before the request is staged, and the coroutine's
    /// [`InFlight`] guard, which lives in the frame that borrows the buffers, removes it only
    /// after the result has been reaped into it (`Op::Done`). A member of a merged request is
    /// not done before the merged completion has been reaped: then it gets its length, or it
    /// is staged again alone and waits for that request's completion. If the coroutine is
    /// unwound first, the guard's drop takes the request out of `staged` if it is there, or
    /// else submits a cancel for the request in the kernel that covers its buffers (its own,
    /// or the merged one) and blocks, reaping, until that completion arrives (a cancel that
    /// comes too late changes nothing: the request's completion still comes). Only then can
    /// the unwinding go on and free the buffers. Dropping the ring likewise cancels and waits
    /// for everything still in the kernel first.
    ///
    /// A merged request's iovec array is the ring's: it lives in the `Op::Merged` entry,
    /// unchanged, from before the request is pushed until its completion has been reaped.
    ops: RefCell<Arena<Op>>,
    /// Requests made and not yet in the submission queue, in the order they were made (each
    /// one's entry is `Op::Pending` at `At::Staged`); `flush_staged` moves them there, runs of
    /// contiguous neighbours merged. The iovec arrays and buffers they name are valid for as
    /// long as they are here (the owner's `InFlight` takes them out before it lets go).
    staged: RefCell<VecDeque<Staged>>,
    /// Requests pushed (single, merged, cancels) whose completion has not been reaped.
    in_kernel: Cell<usize>,
    /// Requests owed a result (the `Op::Pending` entries): staged, in the kernel alone or
    /// merged, or staged again after their merged request fell short.
    owed: Cell<usize>,
    /// Cancel requests pushed whose completion has not been reaped.
    cancels: Cell<usize>,
    /// The most requests coroutines may have owed at once: at most the submission queue's
    /// size, and at most half the completion queue's, so that with one request in the kernel
    /// per owed request (a merged one stands for several) and one cancel each, the completion
    /// queue cannot overflow.
    limit: usize,
    /// Coroutines waiting for `owed + cancels` to drop below `limit`, oldest first; each reap
    /// wakes as many as it freed places (all when nothing is owed), and they look again.
    room: RefCell<VecDeque<LocalWaker>>,
    /// What merging did, for tests and curious readers.
    stats: Cell<MergeStats>,
    /// Tests merge requests on sockets (where a read waits until data comes) too.
    #[cfg(test)]
    merge_any_fd: Cell<bool>,
}

/// Counts of what request merging did on one ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MergeStats {
    /// Merged requests handed to the kernel.
    merged: u64,
    /// Requests that went to the kernel inside a merged request.
    members: u64,
    /// Members that a short or failed merged request sent to the kernel again alone.
    again: u64,
}

/// A request owed a result.
enum Op {
    /// Not done; where it is, and the waker of the coroutine waiting for it, once it waits.
    Pending { waker: Option<LocalWaker>, at: At },
    /// Its result, for the coroutine to take.
    Done(i32),
    /// A merged request in the kernel (not owed to any coroutine).
    Merged(Merged),
}

impl Op {
    /// Makes a pending request done with `result` and adds its waiter's waker, if it waits, to
    /// `woken`; whether it was pending (a done or merged entry is left as it is).
    fn complete(&mut self, result: i32, woken: &mut Vec<LocalWaker>) -> bool {
        let Op::Pending { waker, .. } = self else { return false };
        woken.extend(waker.take());
        *self = Op::Done(result);
        true
    }
}

/// Where a pending request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// In `Ring::staged`, not yet pushed.
    Staged,
    /// In the kernel, alone: its key is the `user_data`.
    Kernel,
    /// In the kernel inside the merged request under this key.
    Merged(Key),
}

/// A merged request in the kernel.
struct Merged {
    /// The members' keys and requests, in queue order (the order of their bytes).
    members: Vec<(Key, Rw)>,
    /// The concatenation of the members' iovec arrays: what the kernel reads as the request's
    /// iovec array until its completion is reaped (never changed, never dropped before).
    iovecs: Vec<libc::iovec>,
}

/// A request waiting to be pushed.
struct Staged {
    key: Key,
    request: Request,
}

impl Staged {
    fn piece(&self) -> Option<Piece> {
        match &self.request {
            Request::Rw(rw) => Some(rw.piece()),
            Request::Other(_) => None,
        }
    }
}

/// A request as a coroutine makes it.
enum Request {
    /// A read or write at an offset, which may be merged with its neighbours.
    Rw(Rw),
    /// Anything else (an fsync, ...): goes alone, in its place in the queue.
    Other(squeue::Entry),
}

/// A `preadv` / `pwritev`: the caller's iovec array, and what merging needs to know of it.
#[derive(Clone, Copy, Debug)]
struct Rw {
    kind: Kind,
    fd: RawFd,
    offset: u64,
    iov: *const libc::iovec,
    count: u32,
    /// The sum of the iovecs' lengths.
    len: u64,
    /// Must go alone (staged again after its merged request fell short).
    alone: bool,
}

impl Rw {
    fn piece(&self) -> Piece {
        Piece {
            kind: self.kind,
            fd: self.fd,
            offset: self.offset,
            len: self.len,
            iovecs: self.count as usize,
            alone: self.alone,
        }
    }

    /// The submission entry for this request at its offset, over `count` iovecs at `iov`.
    fn entry(&self, iov: *const libc::iovec, count: u32) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match self.kind {
            Kind::Read => opcode::Readv::new(fd, iov, count).offset(self.offset).build(),
            Kind::Write => opcode::Writev::new(fd, iov, count).offset(self.offset).build(),
        }
    }
}

impl Ring {
    /// Makes a ring for the context `context` (this thread's) and has the context watch its
    /// eventfd.
    fn new(context: u64) -> io::Result<Rc<Ring>> {
        let uring = sys::uring_new(RING_ENTRIES)?;
        let eventfd = sys::eventfd()?;
        sys::uring_register_eventfd(&uring, eventfd.as_fd())?;
        let params = uring.params();
        let sq = params.sq_entries() as usize;
        let cq = params.cq_entries() as usize;
        let ring = Rc::new(Ring {
            context,
            uring: RefCell::new(uring),
            eventfd,
            ops: RefCell::default(),
            staged: RefCell::default(),
            in_kernel: Cell::new(0),
            owed: Cell::new(0),
            cancels: Cell::new(0),
            limit: sq.min(cq / 2).max(1),
            room: RefCell::default(),
            stats: Cell::default(),
            #[cfg(test)]
            merge_any_fd: Cell::new(false),
        });
        let ctx = AioContext::current().ok_or_else(|| {
            io::Error::other("aiocoro: the thread lost its AioContext while making its io_uring")
        })?;
        let weak = Rc::downgrade(&ring);
        let handler = FdHandler::new().on_readable(move || {
            if let Some(ring) = weak.upgrade() {
                // Drain first, then reap: a completion posted after the drain signals again.
                let _ = sys::eventfd_drain(ring.eventfd.as_fd());
                ring.reap();
            }
        });
        ctx.set_fd_handler(ring.eventfd.as_raw_fd(), handler)?;
        Ok(ring)
    }

    /// Hands `request` to the kernel and waits until it completes; returns its result.
    ///
    /// # Safety
    ///
    /// Everything `request` names (buffers, iovec arrays) must stay valid until this call
    /// returns or unwinds past (see the invariant on `ops`).
    unsafe fn run(self: &Rc<Self>, co: &Co, request: Request) -> i32 {
        // SAFETY: forwarded to our caller.
        let op = unsafe { self.start(co, request) };
        op.finish(co)
    }

    /// Stages `request` (waiting for room first); the returned guard waits for it. Submits
    /// what is staged once a batch is.
    ///
    /// # Safety
    ///
    /// Everything `request` names must stay valid until the returned [`InFlight`] has
    /// finished or been dropped.
    unsafe fn start(self: &Rc<Self>, co: &Co, request: Request) -> InFlight {
        self.wait_for_room(co);
        let key = self.ops.borrow_mut().insert(Op::Pending { waker: None, at: At::Staged });
        self.owed.set(self.owed.get() + 1);
        let staged = {
            let mut staged = self.staged.borrow_mut();
            staged.push_back(Staged { key, request });
            staged.len()
        };
        // The guard is made before anything else can run: from here on, what the request
        // names stays valid until the guard is finished or dropped (our caller's promise),
        // and the guard's drop takes the request out of the queue or waits for the kernel.
        let op = InFlight { ring: self.clone(), key, finished: false };
        // Submitted with the others staged in this round, when the context next polls
        // (`submit_queued`): one `io_uring_enter` per round, not per request.
        if staged >= MAX_BATCH {
            self.submit_queued();
        }
        op
    }

    fn wait_for_room(&self, co: &Co) {
        while self.owed.get() + self.cancels.get() >= self.limit {
            let wait = co.prepare_wait();
            self.room.borrow_mut().push_back(wait.local_waker());
            wait.wait();
        }
    }

    /// Moves the staged requests into the submission queue, in order, each run of mergeable
    /// neighbours as one merged request. Returns false if some stay staged because the
    /// submission queue is full.
    fn flush_staged(&self) -> bool {
        let mut staged = self.staged.borrow_mut();
        if staged.is_empty() {
            return true;
        }
        let mut uring = self.uring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        let mut sq = uring.submission();
        let mut stats = self.stats.get();
        while !staged.is_empty() {
            if sq.is_full() {
                self.stats.set(stats);
                return false;
            }
            let mut run = uring_merge::first_run(staged.make_contiguous(), Staged::piece);
            if run > 1 {
                let Request::Rw(first) = &staged[0].request else {
                    unreachable!("aiocoro: first_run merged a request that is not a read or write")
                };
                if !self.may_merge_on(first.fd) {
                    run = 1;
                }
            }
            let entry = if run == 1 {
                let Staged { key, request } = staged.pop_front().expect("not empty");
                if let Some(Op::Pending { at, .. }) = ops.get_mut(key) {
                    *at = At::Kernel;
                }
                let entry = match request {
                    Request::Rw(rw) => rw.entry(rw.iov, rw.count),
                    Request::Other(entry) => entry,
                };
                entry.user_data(key.to_bits())
            } else {
                // The merged request's entry first, so that its key is known while the
                // members are taken from the queue; it is complete before anything is pushed.
                let group =
                    ops.insert(Op::Merged(Merged { members: Vec::new(), iovecs: Vec::new() }));
                let mut members = Vec::with_capacity(run);
                for Staged { key, request } in staged.drain(..run) {
                    let Request::Rw(rw) = request else {
                        unreachable!("only reads and writes are merged")
                    };
                    if let Some(Op::Pending { at, .. }) = ops.get_mut(key) {
                        *at = At::Merged(group);
                    }
                    members.push((key, rw));
                }
                let count: usize = members.iter().map(|(_, rw)| rw.count as usize).sum();
                let mut iovecs = Vec::with_capacity(count);
                for (_, rw) in &members {
                    // SAFETY: a staged request's iovec array is valid while it is staged (the
                    // invariant on `staged`: its owner's guard waits for the merged request
                    // now), and `count` is its length (from a slice).
                    iovecs.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(rw.iov, rw.count as usize)
                    });
                }
                // The planner kept the total within IOV_MAX iovecs.
                let count = u32::try_from(count).expect("at most IOV_MAX iovecs");
                // Moving the Vec into the table below does not move its heap array, which
                // is what the entry names.
                let entry = members[0].1.entry(iovecs.as_ptr(), count);
                stats.merged += 1;
                stats.members += members.len() as u64;
                *ops.get_mut(group).expect("just inserted") =
                    Op::Merged(Merged { members, iovecs });
                entry.user_data(group.to_bits())
            };
            // SAFETY: what a single entry names is its staged request's memory, valid until
            // that request's `InFlight` is done, which waits for this entry's completion (the
            // invariant on `ops`). A merged entry names the `Op::Merged` entry's iovec array,
            // removed only when its completion is reaped, and its members' buffers, each valid
            // until its member is done, which comes after that completion is reaped.
            unsafe { sq.push(&entry) }.expect("the submission queue has room (checked above)");
            self.in_kernel.set(self.in_kernel.get() + 1);
        }
        self.stats.set(stats);
        true
    }

    /// Whether reads and writes on `fd` may be merged: done again alone, a request must have
    /// the same effect (a regular file or block device, not appending).
    fn may_merge_on(&self, fd: RawFd) -> bool {
        #[cfg(test)]
        if self.merge_any_fd.get() {
            return true;
        }
        // SAFETY: `fd` is borrowed by the staged request's caller until its request is done.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        sys::redoable_at_offset(fd).unwrap_or(false)
    }

    /// Puts the cancel `entry` in the submission queue; whether it went in.
    fn push_cancel(&self, entry: &squeue::Entry) -> bool {
        let entry = entry.clone().user_data(CANCEL_USER_DATA);
        let mut uring = self.uring.borrow_mut();
        // SAFETY: a cancel request names no memory.
        if unsafe { uring.submission().push(&entry) }.is_err() {
            return false;
        }
        self.in_kernel.set(self.in_kernel.get() + 1);
        self.cancels.set(self.cancels.get() + 1);
        true
    }

    /// Hands the staged and queued requests to the kernel. Returns false if the kernel is too
    /// busy to take them now (they stay queued for the next poll).
    ///
    /// # Panics
    ///
    /// If the kernel refuses for good: the coroutines waiting for the queued requests could
    /// never be woken.
    fn submit_queued(&self) -> bool {
        loop {
            let all = self.flush_staged();
            if self.uring.borrow_mut().submission().is_empty() {
                return true;
            }
            match self.enter(0) {
                Ok(()) if all => return true,
                // The submission queue was full: now it is empty, stage the rest.
                Ok(()) => {}
                Err(error) if is_transient(&error) => {
                    self.reap();
                    return false;
                }
                Err(error) => panic!("aiocoro: io_uring_enter could not submit: {error}"),
            }
        }
    }

    /// Hands every queued request to the kernel and, with `want > 0`, blocks the thread until
    /// that many completions are ready. Retries when interrupted.
    fn enter(&self, want: usize) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        loop {
            match sys::uring_enter(&uring, want) {
                Ok(_) if uring.submission().is_empty() => return Ok(()),
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Moves the posted completions into the in-flight table and wakes their coroutines (and
    /// those waiting for room). The members of a merged request get their lengths, or are
    /// staged again alone (see [`uring_merge::split`]).
    fn reap(&self) {
        let mut woken = Vec::new();
        let (mut reaped, mut cancels, mut done) = (0, 0, 0);
        {
            let mut uring = self.uring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            let mut staged = self.staged.borrow_mut();
            let mut stats = self.stats.get();
            for cqe in uring.completion() {
                reaped += 1;
                if cqe.user_data() == CANCEL_USER_DATA {
                    cancels += 1;
                    continue;
                }
                let key = Key::from_bits(cqe.user_data());
                match ops.get_mut(key) {
                    Some(Op::Merged(_)) => {
                        let Some(Op::Merged(merged)) = ops.remove(key) else {
                            unreachable!("just seen")
                        };
                        let lens = merged.members.iter().map(|(_, rw)| rw.len);
                        let shares = uring_merge::split(cqe.result(), lens);
                        for (&(member, rw), share) in merged.members.iter().zip(shares) {
                            let Some(op) = ops.get_mut(member) else { continue };
                            match (share, op) {
                                (Share::Done(result), op) => {
                                    done += usize::from(op.complete(result, &mut woken));
                                }
                                (Share::Again, Op::Pending { at, .. }) => {
                                    *at = At::Staged;
                                    let request = Request::Rw(Rw { alone: true, ..rw });
                                    staged.push_back(Staged { key: member, request });
                                    stats.again += 1;
                                }
                                (Share::Again, _) => {}
                            }
                        }
                        // The kernel is done with the merged iovec array (its completion was
                        // just reaped): it may go.
                        drop(merged.iovecs);
                    }
                    Some(op) => done += usize::from(op.complete(cqe.result(), &mut woken)),
                    None => {}
                }
            }
            self.stats.set(stats);
        }
        if reaped == 0 {
            return;
        }
        self.in_kernel.set(self.in_kernel.get() - reaped);
        self.cancels.set(self.cancels.get() - cancels);
        self.owed.set(self.owed.get() - done);
        self.wake_room(done + cancels, &mut woken);
        for waker in woken {
            waker.wake();
        }
    }

    /// Adds to `woken` one waiter for room per place of the `freed`; all of them once nothing
    /// is owed, so that a stale waker (its coroutine gave up) cannot leave the others asleep
    /// for good.
    fn wake_room(&self, freed: usize, woken: &mut Vec<LocalWaker>) {
        let mut room = self.room.borrow_mut();
        let all = self.owed.get() + self.cancels.get() == 0;
        let n = if all { room.len() } else { freed.min(room.len()) };
        woken.extend(room.drain(..n));
    }

    /// Blocks the thread until the kernel is done with the request under `key`, asking it to
    /// cancel the request (or the merged request that holds it) first; then forgets it. A
    /// request not yet pushed is just taken out of the queue. For a coroutine that cannot
    /// wait any more.
    fn cancel_and_wait(&self, key: Key) {
        let mut cancelled = None;
        loop {
            self.reap();
            let at = match self.ops.borrow().get(key) {
                Some(Op::Pending { at, .. }) => Some(*at),
                _ => None,
            };
            let target = match at {
                None => {
                    // Done (or never there): the kernel is not using its memory.
                    self.ops.borrow_mut().remove(key);
                    return;
                }
                Some(At::Staged) => {
                    self.unstage(key);
                    return;
                }
                Some(At::Kernel) => key,
                // Cancelling the merged request fails it for every member: the others go
                // again alone when it is reaped, this one leaves the queue then.
                Some(At::Merged(group)) => group,
            };
            // If a cancel cannot be queued, the request still ends by itself; the wait just
            // takes longer (and the next round tries again).
            if cancelled != Some(target)
                && self.push_cancel(&opcode::AsyncCancel::new(target.to_bits()).build())
            {
                cancelled = Some(target);
            }
            self.block_for_completion();
        }
    }

    /// Takes the staged request under `key` out of the queue and forgets it.
    fn unstage(&self, key: Key) {
        {
            let mut staged = self.staged.borrow_mut();
            let place = staged.iter().position(|staged| staged.key == key);
            staged.remove(place.expect("aiocoro: a staged io_uring request left the queue"));
        }
        self.ops.borrow_mut().remove(key);
        self.owed.set(self.owed.get() - 1);
        let mut woken = Vec::new();
        self.wake_room(1, &mut woken);
        for waker in woken {
            waker.wake();
        }
    }

    /// Submits what is queued and blocks until a completion is ready, or aborts the process:
    /// a caller that cannot wait for the kernel could not keep its memory safe.
    fn block_for_completion(&self) {
        match self.enter(1) {
            Ok(()) => {}
            Err(error) if is_transient(&error) => std::thread::yield_now(),
            Err(error) => {
                eprintln!(
                    "aiocoro: cannot wait for io_uring requests to finish ({error}); aborting, \
                     because the kernel may still write into memory that is about to be freed"
                );
                std::process::abort();
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Staged requests never reached the kernel: nothing to wait for.
        self.staged.get_mut().clear();
        if self.in_kernel.get() > 0 {
            // Requests of coroutines that will never run again (leaked): cancel them all
            // (Linux 5.19+; older kernels refuse, and the wait takes as long as the requests)
            // and wait for the kernel to be done with their memory.
            self.push_cancel(&opcode::AsyncCancel2::new(types::CancelBuilder::any()).build());
            loop {
                self.reap();
                // Members of failed merged requests, staged again: they stay out.
                self.staged.borrow_mut().clear();
                if self.in_kernel.get() == 0 {
                    break;
                }
                self.block_for_completion();
            }
        }
        if with_current(|local| local.shared.id) == Some(self.context) {
            if let Some(ctx) = AioContext::current() {
                let _ = ctx.remove_fd_handler(self.eventfd.as_raw_fd());
            }
        }
    }
}

/// Errors after which submitting again may work: the kernel lacked memory for the request,
/// or its completion queue was full.
fn is_transient(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
}

/// A request staged or in the kernel, owned by the coroutine frame that borrows its memory. It
/// must be finished; dropping it unfinished (an unwinding) takes a staged request out of the
/// queue, or cancels the request in the kernel that covers it and blocks until the kernel is
/// done with it (see the invariant on `Ring::ops`).
struct InFlight {
    ring: Rc<Ring>,
    key: Key,
    /// The completion was taken; nothing is left in the kernel.
    finished: bool,
}

impl InFlight {
    /// Waits until the request completes; returns its result.
    fn finish(mut self, co: &Co) -> i32 {
        loop {
            if let Some(result) = self.take_result() {
                self.finished = true;
                return result;
            }
            let wait = co.prepare_wait();
            if let Some(Op::Pending { waker, .. }) = self.ring.ops.borrow_mut().get_mut(self.key) {
                *waker = Some(wait.local_waker());
            }
            wait.wait();
        }
    }

    fn take_result(&self) -> Option<i32> {
        let mut ops = self.ring.ops.borrow_mut();
        match ops.get(self.key) {
            Some(Op::Done(result)) => {
                let result = *result;
                ops.remove(self.key);
                Some(result)
            }
            Some(Op::Pending { .. }) => None,
            Some(Op::Merged(_)) | None => {
                unreachable!("aiocoro: an io_uring request left the in-flight table early")
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.ring.cancel_and_wait(self.key);
        }
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dropping_an_in_flight_read_cancels_it_and_waits_for_its_completion() {
        let ctx = AioContext::new().unwrap();
        ctx.run(|co| {
            let Engine::Uring(ring) = engine() else {
                // No ring here: that must be because the kernel (or the switch) refuses.
                assert!(forced_off() || IoUring::new(4).is_err(), "io_uring works but went unused");
                return;
            };
            let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut buffer = [0u8; 16];
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let read =
                opcode::Readv::new(types::Fd(reader.as_raw_fd()), iov.as_mut_ptr().cast(), 1)
                    .offset(u64::MAX)
                    .build();
            // SAFETY: `buffer` and `iov` outlive `op`, which is dropped right below.
            let op = unsafe { ring.start(co, Request::Other(read.clone())) };
            assert_eq!(ring.ops.borrow().len(), 1);
            // The socket is empty: only the cancel can end this read, so a drop that did not
            // cancel would hang here, and one that did not wait would leave the entry.
            drop(op);
            assert_eq!(
                ring.ops.borrow().len(),
                0,
                "the request was forgotten after its completion"
            );
            // The ring goes on working: the same read now finds data.
            writer.write_all(b"after").unwrap();
            // SAFETY: `buffer` and `iov` outlive the call.
            let result = unsafe { ring.run(co, Request::Other(read)) };
            assert_eq!(completion(result).unwrap(), 5);
            assert_eq!(&buffer[..5], b"after");
        });
    }

    /// This thread's ring, or `None` where the kernel (or the switch) refuses io_uring.
    fn this_ring() -> Option<Rc<Ring>> {
        match engine() {
            Engine::Uring(ring) => Some(ring),
            Engine::Pool => {
                assert!(forced_off() || IoUring::new(4).is_err(), "io_uring works but went unused");
                None
            }
        }
    }

    /// A file in the temporary directory, removed on drop.
    struct TempFile {
        path: std::path::PathBuf,
        file: Rc<std::fs::File>,
    }

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "aiocoro-uring-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, contents).unwrap();
            let file = std::fs::File::options().read(true).write(true).open(&path).unwrap();
            TempFile { path, file: Rc::new(file) }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Bytes that differ from one 4 KiB block to the next.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 * 31 + i % 251) as u8).collect()
    }

    const LEN: usize = 4096;

    /// Spawns one coroutine per offset in `offsets`, each reading `LEN` bytes there into two
    /// buffers with one `preadv`; runs them and returns what each read, in order.
    fn read_from_coroutines(
        ctx: &AioContext,
        file: &Rc<std::fs::File>,
        offsets: impl Iterator<Item = usize>,
    ) -> Vec<(usize, Vec<u8>)> {
        // All are spawned before the first join runs them, so that their reads can merge.
        let coroutines: Vec<_> = offsets
            .map(|offset| {
                let file = file.clone();
                ctx.spawn(move |co| {
                    let (mut head, mut tail) = (vec![0u8; 1000], vec![0u8; LEN - 1000]);
                    let bufs = &mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)];
                    let read = preadv(co, file.as_fd(), bufs, offset as u64).unwrap();
                    head.extend_from_slice(&tail);
                    (read, head)
                })
            })
            .collect();
        coroutines.into_iter().map(|co| co.join().unwrap()).collect()
    }

    #[test]
    fn contiguous_reads_of_several_coroutines_are_merged_and_each_gets_its_bytes() {
        const N: usize = 64;
        let data = pattern(N * LEN);
        let temp = TempFile::new("merged-reads", &data);
        let ctx = AioContext::new().unwrap();
        let Some(ring) = this_ring() else { return };
        let results = read_from_coroutines(&ctx, &temp.file, (0..N).map(|i| i * LEN));
        for (i, (read, bytes)) in results.iter().enumerate() {
            assert_eq!(*read, LEN, "request {i}");
            assert!(*bytes == data[i * LEN..][..LEN], "request {i} got the wrong bytes");
        }
        let stats = ring.stats.get();
        assert!(stats.merged >= 1 && stats.members >= 2 * stats.merged, "{stats:?}");
        assert_eq!(stats.again, 0, "{stats:?}");
        assert_eq!((ring.ops.borrow().len(), ring.owed.get(), ring.in_kernel.get()), (0, 0, 0));
    }

    #[test]
    fn contiguous_writes_of_several_coroutines_are_merged_and_land_in_place() {
        const N: usize = 48;
        let data = pattern(N * LEN);
        let temp = TempFile::new("merged-writes", &[]);
        let ctx = AioContext::new().unwrap();
        let Some(ring) = this_ring() else { return };
        let coroutines: Vec<_> = (0..N)
            .map(|i| {
                let (file, data) = (temp.file.clone(), data.clone());
                ctx.spawn(move |co| {
                    let block = &data[i * LEN..][..LEN];
                    let bufs = [IoSlice::new(&block[..100]), IoSlice::new(&block[100..])];
                    pwritev(co, file.as_fd(), &bufs, (i * LEN) as u64).unwrap()
                })
            })
            .collect();
        let written: Vec<usize> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
        assert_eq!(written, vec![LEN; N]);
        assert!(std::fs::read(&temp.path).unwrap() == data, "the file reads back different");
        let stats = ring.stats.get();
        assert!(stats.merged >= 1 && stats.members >= 2 * stats.merged, "{stats:?}");
        assert_eq!(stats.again, 0, "{stats:?}");
    }

    #[test]
    fn a_merged_read_across_the_end_of_the_file_gives_each_member_what_it_alone_gets() {
        let size = 3 * LEN + 1000;
        let data = pattern(size);
        let temp = TempFile::new("merged-eof", &data);
        let ctx = AioContext::new().unwrap();
        let Some(ring) = this_ring() else { return };
        let results = read_from_coroutines(&ctx, &temp.file, (0..6).map(|i| i * LEN));
        let counts: Vec<usize> = results.iter().map(|(read, _)| *read).collect();
        assert_eq!(counts, [LEN, LEN, LEN, 1000, 0, 0]);
        for (i, (read, bytes)) in results.iter().enumerate() {
            let expected = data.get(i * LEN..).unwrap_or_default();
            assert!(bytes[..*read] == expected[..*read], "request {i} got the wrong bytes");
            assert!(bytes[*read..].iter().all(|&b| b == 0), "request {i} got bytes past the end");
        }
        let stats = ring.stats.get();
        // The merged request came back short: the three members it did not cover went again.
        assert!(stats.merged >= 1 && stats.again >= 3, "{stats:?}");
        assert_eq!((ring.ops.borrow().len(), ring.owed.get(), ring.in_kernel.get()), (0, 0, 0));
    }

    #[test]
    fn a_failed_merged_read_sends_each_member_again_alone_for_its_own_error() {
        let temp = TempFile::new("merged-error", &pattern(4 * LEN));
        // Write-only: every read fails with EBADF, merged or alone.
        let file = Rc::new(std::fs::File::options().write(true).open(&temp.path).unwrap());
        let ctx = AioContext::new().unwrap();
        let Some(ring) = this_ring() else { return };
        let coroutines: Vec<_> = (0..4)
            .map(|i| {
                let file = file.clone();
                ctx.spawn(move |co| {
                    let mut buf = vec![0u8; LEN];
                    let error =
                        preadv(co, file.as_fd(), &mut [IoSliceMut::new(&mut buf)], i * 4096)
                            .unwrap_err();
                    // The OS error under the call's name.
                    let os = error.get_ref().and_then(|error| error.source());
                    let os = os.and_then(|os| os.downcast_ref::<io::Error>());
                    os.and_then(io::Error::raw_os_error)
                })
            })
            .collect();
        let errors: Vec<_> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
        assert_eq!(errors, [Some(libc::EBADF); 4]);
        let stats = ring.stats.get();
        assert!(stats.merged >= 1 && stats.again == stats.members, "{stats:?}");
    }

    /// Stages a read of `buf` at `offset` of `fd` on `ring`.
    ///
    /// # Safety
    ///
    /// `iov` (and the buffer it names) must outlive the returned guard.
    unsafe fn stage_read(
        ring: &Rc<Ring>,
        co: &Co,
        fd: RawFd,
        iov: &mut [IoSliceMut<'_>; 1],
        offset: u64,
    ) -> InFlight {
        let rw = Rw {
            kind: Kind::Read,
            fd,
            offset,
            iov: iov.as_mut_ptr().cast::<libc::iovec>().cast_const(),
            count: 1,
            len: iov[0].len() as u64,
            alone: false,
        };
        // SAFETY: forwarded to our caller.
        unsafe { ring.start(co, Request::Rw(rw)) }
    }

    #[test]
    fn unwinding_a_member_of_a_merged_read_in_the_kernel_leaves_the_others_correct() {
        let ctx = AioContext::new().unwrap();
        ctx.run(|co| {
            let Some(ring) = this_ring() else { return };
            // A socket read waits for data, so the merged read is surely in the kernel when
            // its member goes.
            ring.merge_any_fd.set(true);
            let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
            let fd = reader.as_raw_fd();
            // What a lone read at offset 16 of a socket with data gets (Linux refuses offsets
            // on sockets where it reads them: ESPIPE).
            let alone_at_16 = {
                let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
                writer.write_all(b"89abcdef").unwrap();
                let mut buf = [0u8; 8];
                let mut iov = [IoSliceMut::new(&mut buf)];
                // SAFETY: the iovec and buffer outlive the guard, finished right here.
                unsafe { stage_read(&ring, co, reader.as_raw_fd(), &mut iov, 16) }.finish(co)
            };
            let (mut a, mut b, mut c) = ([0u8; 8], [0u8; 8], [0u8; 8]);
            {
                let mut iov_a = [IoSliceMut::new(&mut a)];
                let mut iov_b = [IoSliceMut::new(&mut b)];
                let mut iov_c = [IoSliceMut::new(&mut c)];
                // SAFETY: the iovecs and buffers outlive the guards (dropped in this block).
                let (op_a, op_b, op_c) = unsafe {
                    (
                        stage_read(&ring, co, fd, &mut iov_a, 0),
                        stage_read(&ring, co, fd, &mut iov_b, 8),
                        stage_read(&ring, co, fd, &mut iov_c, 16),
                    )
                };
                assert!(ring.submit_queued());
                assert_eq!(ring.stats.get().merged, 1);
                assert_eq!(ring.in_kernel.get(), 1, "one merged request for three");
                // The middle member unwinds: its merged request is cancelled and waited for.
                drop(op_b);
                assert_eq!(ring.owed.get(), 2);
                assert_eq!(ring.stats.get().again, 3, "all three went back to the queue");
                assert_eq!(ring.stats.get().merged, 1);
                assert_eq!(ring.staged.borrow().len(), 2, "the dropped one left it");
                // The others go again alone and get their own results, not ECANCELED.
                writer.write_all(b"0123456789abcdef").unwrap();
                assert_eq!(op_a.finish(co), 8);
                assert_eq!(op_c.finish(co), alone_at_16);
            }
            assert_ne!(alone_at_16, -libc::ECANCELED);
            assert_eq!(&a, b"01234567");
            if alone_at_16 == 8 {
                assert_eq!(&c, b"89abcdef");
            }
            assert_eq!(b, [0; 8], "the unwound member's buffer was left alone");
            assert_eq!((ring.ops.borrow().len(), ring.owed.get()), (0, 0));
        });
    }

    #[test]
    fn unwinding_a_staged_member_takes_it_out_of_the_queue() {
        let data = pattern(3 * LEN);
        let temp = TempFile::new("staged-unwind", &data);
        let ctx = AioContext::new().unwrap();
        let file = temp.file.clone();
        ctx.run(move |co| {
            let Some(ring) = this_ring() else { return };
            let fd = file.as_raw_fd();
            let (mut a, mut b, mut c) = (vec![0u8; LEN], vec![0u8; LEN], vec![0u8; LEN]);
            {
                let mut iov_a = [IoSliceMut::new(&mut a)];
                let mut iov_b = [IoSliceMut::new(&mut b)];
                let mut iov_c = [IoSliceMut::new(&mut c)];
                // SAFETY: the iovecs and buffers outlive the guards (dropped in this block).
                let (op_a, op_b, op_c) = unsafe {
                    (
                        stage_read(&ring, co, fd, &mut iov_a, 0),
                        stage_read(&ring, co, fd, &mut iov_b, LEN as u64),
                        stage_read(&ring, co, fd, &mut iov_c, 2 * LEN as u64),
                    )
                };
                drop(op_b);
                assert_eq!(ring.staged.borrow().len(), 2);
                assert_eq!(ring.in_kernel.get(), 0, "nothing went to the kernel for it");
                assert_eq!(op_a.finish(co), LEN as i32);
                assert_eq!(op_c.finish(co), LEN as i32);
            }
            assert!(a == data[..LEN] && c == data[2 * LEN..], "wrong bytes");
            assert_eq!(b, vec![0; LEN]);
            assert_eq!(ring.stats.get().merged, 0, "the two left are not neighbours");
            assert_eq!((ring.ops.borrow().len(), ring.owed.get()), (0, 0));
        });
    }

    #[test]
    fn completions_map_to_counts_and_os_errors() {
        assert_eq!(completion(7).unwrap(), 7);
        assert_eq!(completion(-libc::EBADF).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(rw_args(3, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(rw_args(3, i64::MAX as u64).unwrap(), 3);
    }
}
