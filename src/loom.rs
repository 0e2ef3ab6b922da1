//! The one seam between production code and the loom model checker.
//!
//! Code that is shared between threads takes its atomics and locks from here. A normal build gets
//! `std`'s; a build with `RUSTFLAGS="--cfg aiocoro_loom"` gets loom's, so that `loom-tests/`
//! model-checks exactly the algorithm that ships.

#[cfg(not(aiocoro_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence,
};
#[cfg(not(aiocoro_loom))]
pub(crate) use std::sync::{Condvar, Mutex};

#[cfg(aiocoro_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence,
};
#[cfg(aiocoro_loom)]
pub(crate) use loom::sync::{Condvar, Mutex};
