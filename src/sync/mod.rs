//! Coroutine-aware synchronisation (QEMU's `util/qemu-coroutine-lock.c`,
//! `include/qemu/lockable.h`, `util/qemu-co-shared-resource.c`), made generic and type-safe.
//!
//! One generic [`Lock<R, T>`] owns its data and hands it out only through a [`LockGuard`]; the
//! raw lock `R` decides how waiting works. Thin aliases name the four kinds:
//!
//! | alias | raw lock | waits by | QEMU |
//! |---|---|---|---|
//! | [`CoMutex<T>`] | [`RawCoMutex`] | suspending the coroutine | `CoMutex` |
//! | [`ThreadMutex<T>`] | [`RawThreadMutex`] | blocking the thread (futex) | `QemuMutex` |
//! | [`SpinLock<T>`] | [`RawSpinLock`] | spinning | `QemuSpin` |
//! | [`NoLock<T>`] | [`RawNoLock`] | never: state private to one context | `NULL` lockable |
//!
//! [`CoQueue`] is written once and works under all four: it takes the guard of whichever lock
//! protects its condition (QEMU's `QemuLockable`).
//!
//! Beside them:
//!
//! | type | what | QEMU |
//! |---|---|---|
//! | [`CoRwLock<T>`] | readers-writer lock for coroutines, eventually fair, with upgrade and downgrade | `CoRwlock` |
//! | [`SharedResource`] | counted units that coroutines wait for: a [`CoQueue`] under a [`ThreadMutex`] | `SharedResource` |
//! | [`QuiesceGate`] | requests counted in and out across threads, and sections that wait for none in while holding new ones back | in-flight counter, `bdrv_drained_begin` / `_end` |
//!
//! The misuse rules the types pin:
//!
//! ```compile_fail,E0277
//! // State private to one context (`NoLock`) cannot be shared with another thread.
//! let state = std::sync::Arc::new(aiocoro::sync::NoLock::new(0u32));
//! let other = state.clone();
//! std::thread::spawn(move || *other.lock_blocking() += 1);
//! ```
//!
//! ```compile_fail,E0277
//! // A guard stays with the thread (and coroutine) that took the lock.
//! let lock = std::sync::Arc::new(aiocoro::sync::ThreadMutex::new(0u32));
//! let guard = lock.lock_blocking();
//! std::thread::spawn(move || drop(guard));
//! ```
//!
//! ```compile_fail,E0505
//! // The data cannot be kept past its guard.
//! let lock = aiocoro::sync::SpinLock::new(vec![1u32]);
//! let guard = lock.lock_blocking();
//! let data: &Vec<u32> = &guard;
//! drop(guard);
//! println!("{data:?}");
//! ```
//!
//! Rule 3 of the design (`docs/design.md`): data is reachable only through its lock, and a
//! guard of a lock that blocks the thread ([`ThreadMutex`], [`SpinLock`]) must not be held
//! across a yield, which would stall the whole context. The type system cannot see yields, so
//! debug builds check it at each yield and panic naming the rule.

mod adaptive_spin;
mod asymmetric_fence;
#[cfg(all(test, not(aiocoro_loom)))]
mod busy_thread;
mod comutex;
mod coqueue;
mod lock;
mod no_lock;
mod patience;
pub(crate) mod presence;
mod quiesce_gate;
mod raw;
mod rwlock;
mod shared_resource;
mod spin;
mod thread_mutex;
pub(crate) mod yield_check;

pub use comutex::RawCoMutex;
pub use coqueue::CoQueue;
pub use lock::{Lock, LockGuard};
pub use no_lock::RawNoLock;
pub use quiesce_gate::{GateEntry, QuiesceGate, Quiesced};
pub use raw::{RawBlockingLock, RawLock};
pub use rwlock::{CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard};
pub use shared_resource::{Permit, SharedResource};
pub use spin::RawSpinLock;
pub use thread_mutex::RawThreadMutex;

/// A mutex for coroutines: waiting suspends the coroutine, not the thread (QEMU's `CoMutex`).
///
/// ```
/// use aiocoro::aio::AioContext;
/// use aiocoro::sync::CoMutex;
/// use std::rc::Rc;
///
/// let ctx = AioContext::new()?;
/// let counter = Rc::new(CoMutex::new(0));
/// for _ in 0..3 {
///     let counter = counter.clone();
///     ctx.spawn(move |co| {
///         let mut value = counter.lock(co);
///         co.sleep(std::time::Duration::from_micros(10)); // held across a yield: fine
///         *value += 1;
///     });
/// }
/// ctx.wait_while(|| counter.try_lock().map_or(true, |value| *value < 3));
/// # Ok::<(), std::io::Error>(())
/// ```
pub type CoMutex<T> = Lock<RawCoMutex, T>;
/// The guard of a [`CoMutex`].
pub type CoMutexGuard<'a, T> = LockGuard<'a, RawCoMutex, T>;

/// A mutex that blocks the thread (QEMU's `QemuMutex`), for short critical sections shared with
/// plain threads. Never hold its guard across a yield.
pub type ThreadMutex<T> = Lock<RawThreadMutex, T>;
/// The guard of a [`ThreadMutex`].
pub type ThreadMutexGuard<'a, T> = LockGuard<'a, RawThreadMutex, T>;

/// A spinlock (QEMU's `QemuSpin`), for critical sections of a few instructions. Never hold its
/// guard across a yield.
pub type SpinLock<T> = Lock<RawSpinLock, T>;
/// The guard of a [`SpinLock`].
pub type SpinLockGuard<'a, T> = LockGuard<'a, RawSpinLock, T>;

/// State private to one context: coroutines of one context are atomic between yields, so no
/// lock is needed, only a check that nobody holds it across a yield while another coroutine
/// wants it. Not `Sync`.
pub type NoLock<T> = Lock<RawNoLock, T>;
/// The guard of a [`NoLock`].
pub type NoLockGuard<'a, T> = LockGuard<'a, RawNoLock, T>;
