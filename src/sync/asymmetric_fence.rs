//! An asymmetric pair of sequentially consistent fences: a [`light`] one for a fast path that
//! runs all the time, and a [`heavy`] one for a slow path that rarely runs against it (the
//! Linux `membarrier(2)` idiom; folly calls the pair `asymmetricLightBarrier` /
//! `asymmetricHeavyBarrier`).
//!
//! # Contract
//!
//! A `light()` and a `heavy()` behave towards each other as two `fence(SeqCst)` would: they are
//! ordered in one total order, and for a store sequenced before the earlier of the two and a
//! load sequenced after the later, the load sees that store (or a later one). That is the
//! store-buffering guarantee that a Dekker-style handshake needs. Two `light()` fences promise
//! nothing to each other beyond a compiler fence; two `heavy()` fences are ordered like
//! `fence(SeqCst)`.
//!
//! # How
//!
//! * Normally `light()` is a compiler fence, no instruction at all, and `heavy()` is
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: the kernel makes every CPU that runs a
//!   thread of this process execute a full memory barrier before the call returns (a thread
//!   that is not running passed one when it was switched out). So whatever point a light
//!   fence's thread has reached, the kernel's barrier on its CPU falls either after its store
//!   (which is then visible to the heavy side's later load) or before its load (which then
//!   sees the heavy side's earlier store): exactly the contract above.
//! * The expedited command needs a registration, done once per process by [`prepare`]. If the
//!   kernel refuses it (too old, or a seccomp filter), both fences are `fence(SeqCst)`. Users
//!   call [`prepare`] before any fence can run (when they are created), so every thread that
//!   reaches a fence sees the mode settled: the flag is written once, inside a `Once`, before
//!   the object whose code fences exists.
//! * Under `--cfg aiocoro_loom` both are loom's `fence(SeqCst)`: the contract above is what a
//!   model checker can express, and it is exactly what membarrier gives, so the models check
//!   the algorithm that ships with its fences at the strength it relies on.

#[cfg(not(aiocoro_loom))]
use std::sync::Once;
#[cfg(not(aiocoro_loom))]
use std::sync::atomic::{AtomicBool, Ordering, compiler_fence, fence};

/// Whether the kernel accepted the membarrier registration: `light` is then a compiler fence
/// and `heavy` a membarrier. Written once, inside `REGISTER`; read by every `light`, so it
/// sits in cache lines of its own: a neighbour written often (the statics the linker puts
/// next to it) would make each of those reads a cache miss.
#[cfg(not(aiocoro_loom))]
static ASYMMETRIC: ReadMostly = ReadMostly(AtomicBool::new(false));

/// A flag alone in a 128-byte block (two cache lines: CPUs that fetch lines in pairs would
/// otherwise still share it).
#[cfg(not(aiocoro_loom))]
#[repr(align(128))]
struct ReadMostly(AtomicBool);

/// Runs the registration once per process.
#[cfg(not(aiocoro_loom))]
static REGISTER: Once = Once::new();

/// Settles which fences the process uses (registers with the kernel the first time). Call it
/// before any [`light`] or [`heavy`] can run, e.g. when creating the object whose code fences;
/// after the first call it is one load. The registration takes the kernel ~20 µs in a
/// single-threaded process, but ~16 ms once the process has other threads (it waits for an
/// RCU grace period), once per process.
#[inline]
pub(crate) fn prepare() {
    #[cfg(not(aiocoro_loom))]
    REGISTER.call_once(|| {
        if crate::sys::membarrier_register().is_ok() {
            ASYMMETRIC.0.store(true, Ordering::Relaxed);
        }
    });
}

/// The fast side of the pair: a compiler fence (or `fence(SeqCst)` without membarrier).
#[inline(always)]
pub(crate) fn light() {
    #[cfg(not(aiocoro_loom))]
    {
        // Relaxed is enough: the flag was settled before the caller's object existed (see the
        // module doc), so this thread cannot see it change.
        if ASYMMETRIC.0.load(Ordering::Relaxed) {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }
    #[cfg(aiocoro_loom)]
    loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// [`light`] for a caller whose last atomic access was a read-modify-write (of any ordering):
/// on x86-64 a compiler fence alone, with no look at which fences the process uses, since a
/// read-modify-write is a `lock`-prefixed instruction there, which is a full barrier already
/// (crossbeam-epoch's pin relies on the same); elsewhere [`light`].
#[inline(always)]
pub(crate) fn light_after_rmw() {
    #[cfg(all(target_arch = "x86_64", not(aiocoro_loom)))]
    compiler_fence(Ordering::SeqCst);
    #[cfg(not(all(target_arch = "x86_64", not(aiocoro_loom))))]
    light();
}

/// The slow side of the pair: a membarrier system call (or `fence(SeqCst)` without it).
///
/// Never unwinds (lock code runs it between queueing a waiter and waiting, where an unwinding
/// would leave the record behind): if the kernel refuses the membarrier after accepting the
/// registration (which it does not do), the light fences of other threads would order
/// nothing, and the process aborts with a message saying so.
#[cold]
pub(crate) fn heavy() {
    #[cfg(not(aiocoro_loom))]
    {
        if ASYMMETRIC.0.load(Ordering::Relaxed) {
            if let Err(error) = crate::sys::membarrier() {
                eprintln!(
                    "aiocoro: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after the \
                     process registered for it ({error}); the lock fences that rely on it \
                     would order nothing: aborting"
                );
                std::process::abort();
            }
        } else {
            fence(Ordering::SeqCst);
        }
    }
    #[cfg(aiocoro_loom)]
    loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}
