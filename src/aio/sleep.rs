//! Sleeping that another party can cut short (QEMU's `QemuCoSleep`).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::wait::{WakeReason, Waker};
use crate::coroutine::Co;

/// Where a sleeping coroutine can be woken early, from any thread (QEMU's `QemuCoSleep`).
///
/// ```
/// use aiocoro::aio::{AioContext, Sleeper, WakeReason};
/// use std::{rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let sleeper = Rc::new(Sleeper::new());
/// let s = sleeper.clone();
/// let co = ctx.spawn(move |co| {
///     assert_eq!(co.sleep_wakeable(Duration::from_secs(3600), &s), WakeReason::Woken);
/// });
/// ctx.poll(false); // the coroutine starts sleeping
/// assert!(sleeper.wake());
/// co.join().unwrap(); // runs the woken coroutine to its end
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Default)]
pub struct Sleeper {
    /// The waker of the coroutine sleeping now, if one is.
    current: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for Sleeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleeper").finish_non_exhaustive()
    }
}

impl Sleeper {
    /// A sleeper nobody sleeps on yet.
    pub fn new() -> Sleeper {
        Sleeper::default()
    }

    /// Wakes the coroutine sleeping on this sleeper, if any; returns whether there was one
    /// (QEMU's `qemu_co_sleep_wake`).
    pub fn wake(&self) -> bool {
        let waker = self.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        waker.map(|waker| waker.wake()).is_some()
    }
}

impl Co {
    /// Sleeps for `duration` unless `sleeper` wakes this coroutine first; says which happened.
    ///
    /// # Panics
    ///
    /// If another coroutine is sleeping on `sleeper`, or this thread has no
    /// [`AioContext`](super::AioContext).
    pub fn sleep_wakeable(&self, duration: Duration, sleeper: &Sleeper) -> WakeReason {
        let wait = self.prepare_wait();
        {
            let mut current = sleeper.current.lock().unwrap_or_else(PoisonError::into_inner);
            assert!(current.is_none(), "aiocoro: two coroutines sleep on one Sleeper");
            *current = Some(wait.waker());
        }
        /// Clears the sleeper's waker however the sleep ends, also when it is cancelled by the
        /// context's shutdown (which unwinds from the wait): a waker left behind would make the
        /// next sleep on this sleeper panic as a second sleeper.
        struct Clear<'a>(&'a Sleeper);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.current.lock().unwrap_or_else(PoisonError::into_inner).take();
            }
        }
        let _clear = Clear(sleeper);
        wait.wait_timeout(duration)
    }
}
