//! The event loop coroutines live in: one [`AioContext`] per thread, as in QEMU
//! (`util/async.c`, `util/aio-posix.c`, `include/block/aio.h`).
//!
//! | QEMU | aiocoro |
//! |---|---|
//! | `AioContext`, `aio_context_new` | [`AioContext`], [`AioContext::new`] |
//! | `aio_poll(ctx, blocking)` | [`AioContext::poll`] |
//! | `qemu_get_current_aio_context` | [`AioContext::current`] |
//! | `aio_bh_new` / `qemu_bh_schedule` / `qemu_bh_cancel` / `qemu_bh_delete` | [`AioContext::new_bh`], [`BottomHalf`], [`BhHandle`] |
//! | `aio_bh_schedule_oneshot` | [`AioContext::schedule_oneshot`], [`AioHandle::schedule_oneshot`] |
//! | `aio_notify` | [`AioHandle::kick`] |
//! | `aio_set_fd_handler` | [`AioContext::set_fd_handler`] with an [`FdHandler`] |
//! | `timer_new_ns` / `timer_mod` / `timer_del` | [`AioContext::new_timer`], [`Timer`] |
//! | `qemu_co_sleep_ns`, `qemu_co_sleep_ns_wakeable` / `qemu_co_sleep_wake` | [`Co::sleep`](crate::coroutine::Co::sleep), [`Co::sleep_wakeable`](crate::coroutine::Co::sleep_wakeable) / [`Sleeper::wake`] |
//! | `aio_co_enter` / `aio_co_schedule` (same context) | [`AioContext::spawn`] |
//! | `aio_co_schedule` (another context) | [`AioHandle::spawn`] |
//! | `qemu_coroutine_yield` + `aio_co_wake` | [`Co::prepare_wait`](crate::coroutine::Co::prepare_wait) → [`Wait`], [`Waker`] / [`LocalWaker`] |
//! | a coroutine awaiting a Rust `Future` (QEMU's Rust block layer bridge) | [`Co::block_on`](crate::coroutine::Co::block_on) |
//! | the result of a spawned coroutine | [`JoinHandle`], [`AioContext::run`] |
//! | `AIO_WAIT_WHILE`, `aio_wait_kick` | [`AioContext::wait_while`], [`AioHandle::kick`] |
//! | `IOThread` | [`IoThread`] |
//! | `poll-max-ns`, `poll-grow`, `poll-shrink` | [`AdaptivePolling`] |
//! | `thread_pool_submit_co` | [`Co::run_blocking`](crate::coroutine::Co::run_blocking), [`ThreadPool::run`] |
//! | `io_uring` (`block/io_uring.c`) | [`preadv`], [`pwritev`], [`fsync`] (thread-pool fallback: [`io_engine`]) |
//!
//! # Order of work in one poll
//!
//! 1. Bottom halves: first the messages from other threads (scheduled BHs, one-shots,
//!    coroutine wakes and spawns) in the order they arrived, then the BHs and one-shots the
//!    home thread scheduled, in schedule order. A BH scheduled while BHs run waits for the next
//!    poll; a BH scheduled again while pending runs once.
//! 2. Ready file-descriptor handlers, in the order epoll reports them (read, then write).
//! 3. Expired timers, earliest deadline first; timers due at the same time in the order they
//!    were armed.
//! 4. The coroutines woken by all of the above (and spawned), in wake order. A wake never
//!    enters a coroutine on the spot: coroutines woken from inside a running coroutine or a
//!    callback run after it yields or returns.

//!
//! # Shutdown
//!
//! Dropping a context's last handle, or stopping an [`IoThread`], shuts the context down along
//! a defined path (documented on [`AioContext`]): it drains what is ready, then cancels the
//! waits still pending (each cancelled coroutine unwinds from its wait, after leaving every
//! lock queue it was in and passing on a lock or a wake it had been handed), and leaks only
//! what it cannot reach. It never panics for coroutines that are merely suspended.

mod adaptive;
mod arena;
mod bh;
pub(crate) mod completion;
mod context;
mod deferred;
mod fd;
mod future;
mod handle;
pub(crate) mod inbox;
mod iothread;
mod join;
mod leak_watch;
pub(crate) mod notify;
mod sleep;
mod small_blocks;
pub(crate) mod thread_pool;
mod timer;
mod uncancellable;
mod uring;
mod wait;
#[cfg(aiocoro_loom)]
mod wait_model;

pub use adaptive::AdaptivePolling;
pub use bh::{BhHandle, BottomHalf};
pub use completion::CANCELLED;
pub use context::AioContext;
pub(crate) use context::run_woken_coroutines;
pub use fd::FdHandler;
pub use handle::{AioHandle, ContextClosed};
pub use iothread::{DEFAULT_POLL_MAX_NS, IoThread};
pub use join::JoinHandle;
pub use sleep::Sleeper;
pub use thread_pool::{ThreadPool, ThreadPoolConfig};
pub use timer::{Timer, clock_ns};
pub use uring::{IoEngine, fsync, io_engine, preadv, pwritev};
pub(crate) use wait::{Abandon, OnLeak, ParkRecord, PendingWake, WaitId, WaitRef};
pub use wait::{LocalWaker, Wait, WakeReason, Waker};
