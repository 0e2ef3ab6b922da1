//! # aiocoro
//!
//! The machinery under QEMU's block layer, in Rust, made safe by the type system: stackful
//! coroutines with a stack pool and guard pages, and (as the project grows) a QEMU-style
//! `AioContext` event loop and coroutine-aware locks.
//!
//! A coroutine body receives a `&Co`: QEMU's `coroutine_fn` annotation as a type. Code that may
//! yield takes `&Co`, so calling it outside a coroutine is a compile error, and because neither a
//! [`Coroutine`](coroutine::Coroutine) nor a `Co` is `Send`, a coroutine never moves to another
//! thread.
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
//! println!("{}", out.borrow().trim_end());
//! assert_eq!(out.borrow().trim_end(), "hello from a coroutine");
//! ```
//!
//! Output:
//!
//! ```text
//! hello from a coroutine
//! ```
//!
//! See `docs/architecture.md` for how the parts fit and how QEMU's names map to ours.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

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
    pub use crate::aio::notify::{Blocker, NotifyState};
    pub use crate::aio::thread_pool::{Job, Notify, Pending, Ticket, ticket};
    pub use crate::coroutine::shared_pool::SharedPool;
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
