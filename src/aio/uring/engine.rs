//! Which engine carries a context's file I/O: its own io_uring, or the thread pool where the
//! kernel refuses io_uring (or `AIOCORO_IO_URING=off` asks for the pool).
//!
//! The context owns the choice ([`FileIo`], a field of its home-thread state, as QEMU's
//! `AioContext` holds its `LuringState`): made on the context's first file I/O, and ended
//! when the context shuts down. This module and `aio::context` use each other on purpose:
//! the context holds its engine and asks it to submit and reap around each wait, and the
//! engine finds the calling coroutine's context, and has it watch the ring's eventfd.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::ring::Ring;
use crate::aio::context::{Local, no_context, with_current, with_current_brief};
use crate::aio::fd::FdHandler;

/// The environment variable that, set to `off`, makes file I/O use the thread pool.
const ENV_SWITCH: &str = "AIOCORO_IO_URING";

/// What carries a context's file I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoEngine {
    /// An io_uring of the context's own.
    IoUring,
    /// Blocking system calls on the workers of [`ThreadPool::global`](crate::aio::ThreadPool::global).
    ThreadPool,
}

/// What carries this thread's context's file I/O: io_uring, or the thread-pool fallback. The
/// first call in a context decides (making the context's ring if it can).
///
/// # Panics
///
/// If this thread has no [`AioContext`](crate::aio::AioContext).
pub fn io_engine() -> IoEngine {
    match engine() {
        Engine::Uring(_) => IoEngine::IoUring,
        Engine::Pool => IoEngine::ThreadPool,
    }
}

impl IoEngine {
    /// The engine to run one request on: this one, unless it is `IoUring` where the
    /// context has no ring (then the thread pool, as the context's own choice would be).
    pub(super) fn resolve(self) -> Engine {
        match self {
            IoEngine::IoUring => engine(),
            IoEngine::ThreadPool => {
                // Still a context's I/O: refuse a thread without one, as the ring would.
                // SAFETY: the closure runs no code at all.
                if unsafe { with_current_brief(|_| ()) }.is_none() {
                    no_context("file I/O");
                }
                Engine::Pool
            }
        }
    }
}

/// What carries a context's file I/O, once chosen.
#[derive(Clone)]
pub(super) enum Engine {
    /// The context's ring.
    Uring(Rc<Ring>),
    /// The thread pool.
    Pool,
}

/// A context's file-I/O engine, chosen on the context's first file I/O (see the module docs).
#[derive(Default)]
pub(crate) struct FileIo {
    /// `None` until the first file I/O of the context, and again once it shut down.
    engine: RefCell<Option<Engine>>,
}

impl FileIo {
    /// Hands the requests that the context's coroutines queued on its ring since the last
    /// call to the kernel; the context calls it before each wait for events. Returns false if
    /// some stay queued because the kernel is busy (the caller should not block then).
    pub(crate) fn submit_queued(&self) -> bool {
        // Out of the cell first: submitting reaps, and reaping wakes coroutines.
        let ring = match &*self.engine.borrow() {
            Some(Engine::Uring(ring)) => ring.clone(),
            _ => return true,
        };
        ring.submit_queued()
    }

    /// Whether the ring has completions to reap, or completed requests whose completions the
    /// kernel will post when the thread next enters it (cooperative task running); a look at
    /// the ring, no system call. For busy polling: the poll that follows makes the call.
    pub(crate) fn completions_ready(&self) -> bool {
        match &*self.engine.borrow() {
            Some(Engine::Uring(ring)) => ring.completions_ready(),
            _ => false,
        }
    }

    /// Ends the engine as its context shuts down: the context stops watching the ring's
    /// eventfd, and the ring goes, once the kernel is done with whatever it still holds (the
    /// requests of coroutines that never finished). A ring that a leaked coroutine still
    /// names lives on with that coroutine.
    pub(crate) fn close(&self, context: &Local) {
        let engine = self.engine.borrow_mut().take();
        if let Some(Engine::Uring(ring)) = engine {
            let _ = context.set_fd_handler(ring.eventfd().as_raw_fd(), FdHandler::new());
        }
    }
}

/// The engine of this thread's context, chosen (and its ring made) on first use.
///
/// # Panics
///
/// If this thread has no [`AioContext`](crate::aio::AioContext).
pub(super) fn engine() -> Engine {
    // SAFETY: cloning the engine (an `Rc`, or nothing) runs no other code and drops nothing.
    let chosen = unsafe { with_current_brief(|local| local.file_io.engine.borrow().clone()) };
    match chosen {
        None => no_context("file I/O"),
        Some(Some(engine)) => engine,
        Some(None) => choose(),
    }
}

/// Chooses the engine of this thread's context, which has none yet.
fn choose() -> Engine {
    let engine = if forced_off() {
        Engine::Pool
    } else {
        match Ring::new() {
            Ok(ring) => Engine::Uring(ring),
            Err(error) => {
                report_fallback(&error);
                Engine::Pool
            }
        }
    };
    with_current(|local| *local.file_io.engine.borrow_mut() = Some(engine.clone()));
    engine
}

/// Whether `AIOCORO_IO_URING=off` was set when the process first asked.
pub(super) fn forced_off() -> bool {
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
