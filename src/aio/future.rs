//! A coroutine awaiting a [`Future`]: [`Co::block_on`].
//!
//! The coroutine polls the future itself, on its own stack. When the future is `Pending` the
//! coroutine suspends in a [`Wait`](super::Wait) of its context; the [`std::task::Waker`] the
//! future got wakes that wait, so the coroutine resumes on its home context, from whichever
//! thread the future is completed on (a wake from another thread is one push onto the
//! context's inbox, and an eventfd write only if the context may be blocked). Every poll gets
//! a fresh wait, so a wake that arrives after the poll it was made for is stale and does
//! nothing, a second wake is a duplicate and does nothing, and a wake during the poll queues
//! the coroutine to poll again behind the coroutines already runnable (as an executor requeues
//! a task that woke itself), so a future that keeps waking itself cannot starve its context.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Wake};

use super::wait::Waker;
use crate::coroutine::Co;

impl Co {
    /// Runs `future` to completion on this coroutine and returns its output: polls it, and
    /// while it is `Pending` suspends the coroutine until the future's waker is woken (from
    /// any thread). Every poll gets a fresh wait, so a wake made for an earlier poll is stale
    /// and does nothing, a second wake does nothing, and a wake during the poll makes the
    /// coroutine poll again without waiting for anything, but only after the coroutines already
    /// runnable in its context have run (a future that wakes itself on every poll, such as a
    /// yield or a spin on a flag another coroutine sets, leaves them their turns, as
    /// [`Co::reschedule`] does).
    ///
    /// ```
    /// use aiocoro::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// let sum = ctx.run(move |co| {
    ///     std::thread::spawn(move || tx.send(40).unwrap());
    ///     co.block_on(rx).unwrap() + 2
    /// });
    /// assert_eq!(sum, 42);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// The future is polled on this coroutine's stack and dropped there. If the context shuts
    /// down while the coroutine waits, the wait is cancelled: this does not return, the
    /// coroutine unwinds (dropping the future) as from any other wait (see
    /// [`AioContext`](super::AioContext)). Wakers the future handed out may outlive the
    /// coroutine: waking them then does nothing.
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext), or as the future's `poll`
    /// panics.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let mut future = pin!(future);
        loop {
            let wait = self.prepare_wait();
            let waker = wait.waker();
            // The waker the future sees borrows `waker`: nothing is allocated unless the future
            // keeps a clone of it.
            // SAFETY: `borrowed_waker`'s vtable only reads `waker` through the pointer, and
            // clones of it own what they need; `waker` outlives `task_waker`, which is never
            // dropped (its drop is a no-op anyway).
            let task_waker = ManuallyDrop::new(unsafe {
                std::task::Waker::from_raw(RawWaker::new(
                    std::ptr::from_ref(&waker).cast(),
                    &BORROWED_VTABLE,
                ))
            });
            let polled = future.as_mut().poll(&mut Context::from_waker(&task_waker));
            if let Poll::Ready(output) = polled {
                return output;
            }
            // A wake during the poll (a future that woke itself) queued this coroutine behind
            // the others that are runnable: it polls again when its turn comes.
            wait.wait_in_turn();
        }
    }
}

/// An owned task waker: what a clone of the borrowed one becomes.
struct OwnedWaker(Waker);

impl Wake for OwnedWaker {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

/// The vtable of the task waker [`Co::block_on`] lends a poll: its data is a `*const Waker`
/// that lives for the poll.
static BORROWED_VTABLE: RawWakerVTable =
    RawWakerVTable::new(clone_borrowed, wake_borrowed, wake_borrowed, drop_borrowed);

/// Makes an owned task waker from the borrowed one.
unsafe fn clone_borrowed(data: *const ()) -> RawWaker {
    // SAFETY: `data` is the `&Waker` of a poll that is running (the vtable's contract: the
    // borrowed waker is only reachable through the poll's `Context`).
    let waker = unsafe { &*data.cast::<Waker>() };
    let owned = std::task::Waker::from(Arc::new(OwnedWaker(waker.clone())));
    let raw = RawWaker::new(owned.data(), owned.vtable());
    // Ownership of the `Arc` passes to the returned `RawWaker`.
    std::mem::forget(owned);
    raw
}

/// Wakes through the borrowed waker (`wake` and `wake_by_ref` alike: it owns nothing).
unsafe fn wake_borrowed(data: *const ()) {
    // SAFETY: as in `clone_borrowed`; `Waker` is `Sync`, so any thread may wake through it.
    unsafe { &*data.cast::<Waker>() }.wake();
}

/// The borrowed waker owns nothing.
unsafe fn drop_borrowed(_: *const ()) {}
