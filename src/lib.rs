//! # aiocoro
//!
//! The machinery under QEMU's block layer, in Rust, made safe by the type system:
//!
//! - [`coroutine`]: stackful coroutines with a stack pool and guard pages, as cheap to create,
//!   switch and end as raw `corosensei`;
//! - [`aio`]: a QEMU-style [`AioContext`](aio::AioContext) event loop per thread (bottom halves,
//!   fd handlers, timers, cross-thread wakes that touch an eventfd only when the context
//!   sleeps, adaptive busy polling), [`IoThread`](aio::IoThread)s, a thread pool, io_uring file
//!   I/O, join handles, and a bridge to Rust `Future`s both ways
//!   ([`Co::block_on`](coroutine::Co::block_on); a [`JoinHandle`](aio::JoinHandle) is a
//!   `Future`);
//! - [`sync`]: coroutine-aware locks that own their data: [`CoMutex`](sync::CoMutex),
//!   [`CoRwLock`](sync::CoRwLock), a [`SharedResource`](sync::SharedResource) semaphore, and one
//!   [`CoQueue`](sync::CoQueue) that works under every lock kind.
//!
//! The block layer on top (drivers, a node graph, a multiqueue `BlockBackend`, qcow2) is the
//! crate `aiocoro-block`; an NBD server is `aiocoro-nbd`.
//!
//! A coroutine body receives a `&Co`: QEMU's `coroutine_fn` annotation as a type. Code that may
//! yield takes `&Co`, so calling it outside a coroutine is a compile error, and because neither a
//! [`Coroutine`](coroutine::Coroutine) nor a `Co` is `Send`, a coroutine never moves to another
//! thread. These and the other rules the code keeps (and cites by number, "rule 3") are in
//! `docs/design.md`; `docs/architecture.md` says how the parts fit and maps QEMU's names to ours.
//!
//! ## A coroutine
//!
//! ```
//! use aiocoro::coroutine::Coroutine;
//! use std::{cell::RefCell, rc::Rc};
//!
//! let out = Rc::new(RefCell::new(String::new()));
//! let o = out.clone();
//! let producer = Coroutine::new(move |co| {
//!     for word in ["hello", "from", "a", "coroutine"] {
//!         o.borrow_mut().push_str(word);
//!         co.yield_now();
//!     }
//! });
//! while !producer.is_ended() {
//!     producer.enter();
//!     out.borrow_mut().push(' ');
//! }
//! assert_eq!(out.borrow().trim_end(), "hello from a coroutine");
//! ```
//!
//! ## IoThreads and a lock
//!
//! Coroutines on two [`IoThread`](aio::IoThread)s add to one counter under a
//! [`CoMutex`](sync::CoMutex), holding it across a yield (waiting for a `CoMutex` suspends the
//! coroutine, not the thread); the main thread joins them through their join handles.
//!
//! ```
//! use aiocoro::aio::IoThread;
//! use aiocoro::sync::CoMutex;
//! use std::sync::Arc;
//!
//! let counter = Arc::new(CoMutex::new(0u64));
//! let threads = [IoThread::spawn("worker-0")?, IoThread::spawn("worker-1")?];
//! let mut joins = Vec::new();
//! for thread in &threads {
//!     for _ in 0..4 {
//!         let counter = counter.clone();
//!         let body = move |co: &aiocoro::coroutine::Co| {
//!             for _ in 0..100 {
//!                 let mut count = counter.lock(co);
//!                 *count += 1;
//!                 co.reschedule(); // others queue on the lock meanwhile
//!             }
//!         };
//!         joins.push(thread.handle().spawn(body).expect("the IoThread runs"));
//!     }
//! }
//! for join in joins {
//!     join.join().expect("no coroutine panicked");
//! }
//! for thread in threads {
//!     thread.stop();
//! }
//! assert_eq!(*counter.try_lock().expect("every coroutine has ended"), 800);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ## Platform
//!
//! Linux only (other targets fail to build with a message saying so). The kernel features
//! used, and what happens without them:
//!
//! | feature | used for | without it |
//! |---|---|---|
//! | epoll, eventfd, futex | the event loop, cross-thread wakes, `ThreadMutex` | (required) |
//! | `epoll_pwait2` (5.11) | timers with nanosecond timeouts | `epoll_wait`, millisecond timeouts |
//! | io_uring (5.1; cooperative task running 5.19) | file I/O of coroutines | the thread pool runs `preadv` / `pwritev` / `fsync` (said once on stderr; `AIOCORO_IO_URING=off` chooses it) |
//! | `membarrier` private expedited (4.14) | the `CoMutex` fast path's asymmetric fence | a `SeqCst` fence on both sides |
//! | guard regions, `MADV_GUARD_INSTALL` (6.13) | coroutine stack guards without splitting mappings | `PROT_NONE` guard pages: two mappings per stack, so ~30 000 stacks under the default `vm.max_map_count` |
//!
//! `aiocoro-block` adds `O_DIRECT` (`cache=none`) and OFD locks (QEMU's image locking; where
//! the file system refuses them, `locking=auto` opens without).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "aiocoro runs on Linux only: it is built on epoll, eventfd, futex, io_uring and membarrier \
     (see the crate docs, \"Platform\")"
);

pub mod aio;
pub mod coroutine;
mod loom;
pub mod sync;
mod sys;

/// Internals that `loom-tests/` model-checks; present only in a `--cfg aiocoro_loom` build.
#[cfg(aiocoro_loom)]
#[doc(hidden)]
pub mod loom_exports {
    pub use crate::aio::completion::{Claim, Promise, completion};
    pub use crate::aio::inbox::Inbox;
    pub use crate::aio::notify::{Blocker, WakeupHandshake};
    pub use crate::aio::thread_pool::{Job, JobDone, Pending, Ticket, ticket};
    pub use crate::coroutine::shared_pool::SharedPool;
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
