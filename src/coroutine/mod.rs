//! Stackful coroutines with QEMU's semantics, on `corosensei`.
//!
//! | QEMU                         | aiocoro                                   |
//! |------------------------------|-------------------------------------------|
//! | `qemu_coroutine_create`      | [`Coroutine::new`], [`Coroutine::builder`] |
//! | `qemu_coroutine_enter`       | [`Coroutine::enter`]                      |
//! | `qemu_coroutine_yield`       | [`Co::yield_now`]                         |
//! | `qemu_coroutine_self`        | [`Co::current`], [`current()`]            |
//! | `qemu_in_coroutine`          | [`in_coroutine`]                          |
//! | `coroutine_fn` annotation    | a `&Co` parameter                         |
//! | coroutine pool               | [`pool`]                                  |
//!
//! A coroutine runs on the thread that created it, from its first entry to its end; other
//! threads can never enter it (its handle is not `Send`). Entering from inside a coroutine nests,
//! and a yield returns to whoever entered. A panic in a body ends the coroutine and continues in
//! its enterer with the original payload.
//!
//! ```
//! use aiocoro::coroutine::Coroutine;
//! use std::{cell::Cell, rc::Rc};
//!
//! let depth = Rc::new(Cell::new(0));
//! let d = depth.clone();
//! let outer = Coroutine::new(move |co| {
//!     let d2 = d.clone();
//!     let inner = Coroutine::new(move |co| {
//!         d2.set(2);
//!         co.yield_now(); // back to `outer`, not to the thread
//!         d2.set(3);
//!     });
//!     inner.enter();
//!     assert_eq!(d.get(), 2);
//!     co.yield_now(); // back to the thread
//!     inner.enter();
//! });
//! outer.enter();
//! assert_eq!(depth.get(), 2);
//! outer.enter();
//! assert_eq!(depth.get(), 3);
//! assert!(outer.is_ended());
//! ```

mod co;
mod current;
mod guard;
mod handle;
mod overflow;
pub mod pool;
mod reservation;
pub(crate) mod shared_pool;
mod slot;
mod stack;

pub(crate) use co::Cancelled;
pub use co::Co;
#[cfg(debug_assertions)]
pub(crate) use current::id as current_id;
pub use current::{current, in_coroutine};
pub use handle::{Builder, Coroutine};
pub(crate) use slot::ParkState;
pub use stack::{DEFAULT_STACK_SIZE, MIN_STACK_SIZE};
