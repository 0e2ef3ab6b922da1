//! File I/O for coroutines on io_uring (QEMU's `block/io_uring.c`), with the thread pool as the
//! fallback where the kernel refuses io_uring.
//!
//! Each context gets one ring, made on its first file I/O and kept in a thread-local (a thread
//! has at most one context; the ring remembers which one it serves and is replaced when the
//! thread gets a new context). The ring signals an eventfd that the context watches with an fd
//! handler; the handler reaps completions into the ring's in-flight table and wakes the
//! coroutines waiting for them. A coroutine pushes its request and waits; the requests
//! pushed in one round go to the kernel together, when the context next polls or once
//! [`MAX_BATCH`] of them wait (one `io_uring_enter` for the batch, which lets the kernel merge
//! neighbouring requests).
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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, squeue, types};

use super::arena::{Arena, Key};
use super::context::{AioContext, no_context, with_current, with_current_brief};
use super::fd::FdHandler;
use super::thread_pool::ThreadPool;
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
const MAX_BATCH: usize = 16;

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
/// use std::{cell::RefCell, rc::Rc};
///
/// let path = std::env::temp_dir().join(format!("aiocoro-preadv-doc-{}", std::process::id()));
/// let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// let ctx = AioContext::new()?;
/// let out = Rc::new(RefCell::new(None));
/// let o = out.clone();
/// let co = ctx.spawn(move |co| {
///     let result = (|| {
///         aio::pwritev(co, file.as_fd(), &[IoSlice::new(b"hello, "), IoSlice::new(b"disk")], 0)?;
///         aio::fsync(co, file.as_fd(), true)?;
///         let (mut head, mut tail) = ([0u8; 5], [0u8; 16]);
///         let bufs = &mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)];
///         let read = aio::preadv(co, file.as_fd(), bufs, 0)?;
///         Ok::<_, std::io::Error>((read, head, tail))
///     })();
///     *o.borrow_mut() = Some(result);
/// });
/// ctx.wait_while(|| !co.is_ended());
/// std::fs::remove_file(&path)?;
/// let (read, head, tail) = out.borrow_mut().take().unwrap()?;
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
            let count = rw_args(bufs.len(), offset)?;
            let iov = bufs.as_mut_ptr().cast::<libc::iovec>().cast_const();
            let entry =
                opcode::Readv::new(types::Fd(fd.as_raw_fd()), iov, count).offset(offset).build();
            // SAFETY: the iovec array and the buffers it names (writable: they come from
            // `IoSliceMut`s) are borrowed for this whole call, and `run` neither returns nor
            // lets an unwinding pass before the kernel's completion for them has been reaped.
            completion(unsafe { ring.run(co, &entry) }?)
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
            let count = rw_args(bufs.len(), offset)?;
            let iov = bufs.as_ptr().cast::<libc::iovec>();
            let entry =
                opcode::Writev::new(types::Fd(fd.as_raw_fd()), iov, count).offset(offset).build();
            // SAFETY: the iovec array and the buffers it names are borrowed for this whole
            // call, and `run` neither returns nor lets an unwinding pass before the kernel's
            // completion for them has been reaped. The kernel only reads them.
            completion(unsafe { ring.run(co, &entry) }?)
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
            unsafe { ring.run(co, &entry) }.and_then(completion).map(drop)
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
    /// The in-flight table: one entry per request handed to the kernel, under the key that
    /// is the request's `user_data`.
    ///
    /// The kernel reads and writes the caller's buffers (and iovec array) from the moment the
    /// request is pushed until its completion is posted, while the coroutine that owns them
    /// sleeps. So the entry is made before the request is pushed, and the coroutine's
    /// [`InFlight`] guard, which lives in the frame that borrows the buffers, removes it only
    /// after the completion has been reaped into it (`Op::Done`). If the coroutine is
    /// unwound first, the guard's drop submits a cancel for the request and then blocks,
    /// reaping, until that completion arrives (a cancel that comes too late changes nothing:
    /// the request's completion still comes). Only then can the unwinding go on and free the
    /// buffers. Dropping the ring likewise cancels and waits for everything still in the
    /// kernel first.
    ops: RefCell<Arena<Op>>,
    /// Requests pushed (operations and cancels) whose completion has not been reaped.
    in_kernel: Cell<usize>,
    /// The most operations a coroutine may have in the kernel at once: at most the
    /// submission queue's size, and at most half the completion queue's, so that with one
    /// cancel per operation the completion queue cannot overflow.
    limit: usize,
    /// Coroutines waiting for `in_kernel` to drop below `limit`, oldest first; each reap wakes
    /// as many as it freed places (all when the kernel holds nothing), and they look again.
    room: RefCell<VecDeque<LocalWaker>>,
}

/// An in-flight request.
enum Op {
    /// In the kernel; the waker of the coroutine waiting for it, once it waits.
    Pending(Option<LocalWaker>),
    /// Its completion's result, for the coroutine to take.
    Done(i32),
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
            in_kernel: Cell::new(0),
            limit: sq.min(cq / 2).max(1),
            room: RefCell::default(),
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

    /// Hands `entry` to the kernel and waits until it completes; returns its result.
    ///
    /// # Safety
    ///
    /// Everything `entry` names (buffers, iovec arrays) must stay valid until this call
    /// returns or unwinds past (see the invariant on `ops`).
    unsafe fn run(self: &Rc<Self>, co: &Co, entry: &squeue::Entry) -> io::Result<i32> {
        // SAFETY: forwarded to our caller.
        let op = unsafe { self.start(co, entry) }?;
        Ok(op.finish(co))
    }

    /// Pushes and submits `entry` (waiting for room first); the returned guard waits for it.
    ///
    /// # Safety
    ///
    /// Everything `entry` names must stay valid until the returned [`InFlight`] has finished
    /// or been dropped.
    unsafe fn start(self: &Rc<Self>, co: &Co, entry: &squeue::Entry) -> io::Result<InFlight> {
        self.wait_for_room(co);
        let key = self.ops.borrow_mut().insert(Op::Pending(None));
        let entry = entry.clone().user_data(key.to_bits());
        // SAFETY: the caller keeps what `entry` names valid until the `InFlight` made right
        // below is finished or dropped, and nothing between the push and it can unwind.
        if let Err(error) = unsafe { self.push(&entry) } {
            self.ops.borrow_mut().remove(key);
            return Err(error);
        }
        let op = InFlight { ring: self.clone(), key, finished: false };
        // Submitted with the others queued in this round, when the context next polls
        // (`submit_queued`): one `io_uring_enter` per round, not per request.
        if self.uring.borrow_mut().submission().len() >= MAX_BATCH {
            self.submit_queued();
        }
        Ok(op)
    }

    fn wait_for_room(&self, co: &Co) {
        while self.in_kernel.get() >= self.limit {
            let wait = co.prepare_wait();
            self.room.borrow_mut().push_back(wait.local_waker());
            wait.wait();
        }
    }

    /// Puts `entry` in the submission queue.
    ///
    /// # Safety
    ///
    /// Everything `entry` names must stay valid until its completion has been reaped.
    unsafe fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        // SAFETY: forwarded to our caller.
        unsafe { uring.submission().push(entry) }
            .map_err(|_| io::Error::other("aiocoro: the io_uring submission queue is full"))?;
        self.in_kernel.set(self.in_kernel.get() + 1);
        Ok(())
    }

    /// Hands the queued requests to the kernel. Returns false if the kernel is too busy to
    /// take them now (they stay queued for the next poll).
    ///
    /// # Panics
    ///
    /// If the kernel refuses for good: the coroutines waiting for the queued requests could
    /// never be woken.
    fn submit_queued(&self) -> bool {
        if self.uring.borrow_mut().submission().is_empty() {
            return true;
        }
        match self.enter(0) {
            Ok(()) => true,
            Err(error) if is_transient(&error) => {
                self.reap();
                false
            }
            Err(error) => panic!("aiocoro: io_uring_enter could not submit: {error}"),
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
    /// those waiting for room).
    fn reap(&self) {
        let mut woken = Vec::new();
        let mut reaped = 0;
        {
            let mut uring = self.uring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            for cqe in uring.completion() {
                reaped += 1;
                if cqe.user_data() == CANCEL_USER_DATA {
                    continue;
                }
                if let Some(op) = ops.get_mut(Key::from_bits(cqe.user_data())) {
                    if let Op::Pending(waker) = op {
                        woken.extend(waker.take());
                        *op = Op::Done(cqe.result());
                    }
                }
            }
        }
        if reaped == 0 {
            return;
        }
        self.in_kernel.set(self.in_kernel.get() - reaped);
        {
            // One waiter per freed place; all of them once the kernel holds nothing, so that
            // a stale waker (its coroutine gave up) cannot leave the others asleep for good.
            let mut room = self.room.borrow_mut();
            let n = if self.in_kernel.get() == 0 { room.len() } else { reaped.min(room.len()) };
            woken.extend(room.drain(..n));
        }
        for waker in woken {
            waker.wake();
        }
    }

    /// Blocks the thread until the request under `key` has completed, asking the kernel to
    /// cancel it first; then forgets it. For a coroutine that cannot wait any more.
    fn cancel_and_wait(&self, key: Key) {
        let cancel = opcode::AsyncCancel::new(key.to_bits()).build().user_data(CANCEL_USER_DATA);
        // SAFETY: a cancel request names no memory. If it cannot be queued, the request still
        // ends by itself; the wait below just takes longer.
        let _ = unsafe { self.push(&cancel) };
        loop {
            self.reap();
            {
                let mut ops = self.ops.borrow_mut();
                if !matches!(ops.get(key), Some(Op::Pending(_))) {
                    ops.remove(key);
                    return;
                }
            }
            self.block_for_completion();
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
        if self.in_kernel.get() > 0 {
            // Requests of coroutines that will never run again (leaked): cancel them all
            // (Linux 5.19+; older kernels refuse, and the wait takes as long as the requests)
            // and wait for the kernel to be done with their memory.
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_USER_DATA);
            // SAFETY: a cancel request names no memory.
            let _ = unsafe { self.push(&cancel) };
            loop {
                self.reap();
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

/// A request in the kernel, owned by the coroutine frame that borrows its memory. It must be
/// finished; dropping it unfinished (an unwinding) cancels the request and blocks until the
/// kernel is done with it (see the invariant on `Ring::ops`).
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
            if let Some(Op::Pending(waker)) = self.ring.ops.borrow_mut().get_mut(self.key) {
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
            Some(Op::Pending(_)) => None,
            None => unreachable!("aiocoro: an io_uring request left the in-flight table early"),
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
        let co = ctx.spawn(|co| {
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
            let op = unsafe { ring.start(co, &read) }.unwrap();
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
            let result = unsafe { ring.run(co, &read) }.unwrap();
            assert_eq!(completion(result).unwrap(), 5);
            assert_eq!(&buffer[..5], b"after");
        });
        ctx.wait_while(|| !co.is_ended());
    }

    #[test]
    fn completions_map_to_counts_and_os_errors() {
        assert_eq!(completion(7).unwrap(), 7);
        assert_eq!(completion(-libc::EBADF).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(rw_args(3, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(rw_args(3, i64::MAX as u64).unwrap(), 3);
    }
}
