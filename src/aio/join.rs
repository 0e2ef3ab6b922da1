//! [`JoinHandle`]: the result of a spawned coroutine, for a thread, a coroutine or a `Future`
//! executor (tokio, smol, `futures::executor`).
//!
//! ```
//! use aiocoro::aio::IoThread;
//!
//! let iothread = IoThread::spawn("worker")?;
//! let handle = iothread.handle().spawn(|co| {
//!     co.reschedule();
//!     6 * 7
//! })?;
//! // From a thread: `join`. From a coroutine: `co.join(handle)`. From async code: `.await`.
//! let answer = tokio::runtime::Builder::new_current_thread().build()?.block_on(handle);
//! assert_eq!(answer, 42);
//! iothread.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use super::completion::{CANCELLED, Claim, completion};
use super::context::{Shared, current_context_id};
use super::leak_watch::Watching;
use super::run_woken_coroutines;
use crate::coroutine::{Cancelled, Co, in_coroutine};

/// Owns the result of a spawned coroutine ([`AioHandle::spawn`](super::AioHandle::spawn),
/// [`AioContext::spawn`](super::AioContext::spawn)).
///
/// * [`JoinHandle::join`] blocks a thread until the coroutine ends (on the coroutine's own
///   thread it polls the context meanwhile);
/// * [`Co::join`] suspends a coroutine until then;
/// * as a [`Future`] with `Output = T`, async code `.await`s it.
///
/// **Panics.** If the coroutine panics, `join` and `Co::join` return `Err` with the panic's
/// payload, as [`std::thread::JoinHandle::join`] does, and awaiting the handle resumes the
/// panic in the awaiting task (so `.await` yields `T`; a tokio task that awaited it ends with
/// a panicked `JoinError` carrying the payload, as if the panic were its own). A coroutine that
/// its context's shutdown cancelled reports `Err` with the payload [`CANCELLED`] (a
/// `&'static str`); its unwinding itself goes on to the context, as for any coroutine.
///
/// **Shutdown.** A context's shutdown cancels its coroutines (see
/// [`AioContext`](super::AioContext)), and a coroutine spawned but never started is dropped:
/// both report [`CANCELLED`], so a joiner of an [`IoThread`](super::IoThread) that stops does
/// not wait forever. So does a coroutine the shutdown leaks (step 3 there: parked where the
/// shutdown cannot reach it, or waiting where it cannot be cancelled): it never runs again,
/// and once the context is down its waiting joiners are woken and get [`CANCELLED`]. The
/// exception is a shutdown run by a coroutine of the context itself (it dropped the last
/// handle): that one cannot tell a leaked coroutine from one still running, so joiners of the
/// coroutines it leaks wait for good.
///
/// **Polled once more.** Like tokio's, a handle polled again after it returned its result
/// panics (`join` and [`Co::join`] consume it, so only a `Future` poll can).
///
/// **Detaching.** Dropping the handle detaches the coroutine: it runs on, and its result is
/// dropped. A detached coroutine that panics has its panic continue from the poll that ran it
/// (as a coroutine spawned without a handle would); a handle still held when the coroutine
/// panics takes the panic instead.
///
/// The result travels in one allocation with one atomic word (no lock): a coroutine joined on
/// its own context costs one atomic operation on top of its spawn and run, plus two for the
/// handle's counted reference to the context.
pub struct JoinHandle<T> {
    claim: Claim<T>,
    /// The shared half of the coroutine's context.
    context: Arc<Shared>,
    /// Where this handle, while it waits, left a waker in the context's
    /// [`LeakWatch`](super::leak_watch::LeakWatch).
    watching: Option<Watching>,
}

/// Wraps `body` so that its result (or panic) goes to the returned handle; `context` is the
/// context it will run on.
pub(crate) fn joinable<T>(
    body: impl FnOnce(&Co) -> T,
    context: Arc<Shared>,
) -> (impl FnOnce(&Co), JoinHandle<T>) {
    let (promise, claim) = completion();
    let wrapped = move |co: &Co| match catch_unwind(AssertUnwindSafe(|| body(co))) {
        Ok(value) => promise.fulfil(Ok(value)),
        Err(payload) if payload.is::<Cancelled>() => {
            promise.fulfil(Err(Box::new(CANCELLED)));
            // The context catches its cancellation.
            resume_unwind(payload)
        }
        // Detached: nobody can take the panic, so it goes on as it would without a handle.
        Err(payload) if promise.is_abandoned() => {
            drop(promise);
            resume_unwind(payload)
        }
        Err(payload) => promise.fulfil(Err(payload)),
    };
    (wrapped, JoinHandle { claim, context, watching: None })
}

impl<T> JoinHandle<T> {
    /// Whether the coroutine has ended (returned, panicked or was cancelled), or its context
    /// went down without ending it (it was leaked, see [`JoinHandle`]).
    pub fn is_finished(&self) -> bool {
        self.claim.is_complete() || self.context.leak_watch.is_settled()
    }

    /// The result if the coroutine has ended, [`CANCELLED`] if its context went down without
    /// ending it; otherwise leaves `cx`'s waker to be woken when either happens.
    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<thread::Result<T>> {
        if let Poll::Ready(result) = self.claim.poll(cx) {
            self.context.leak_watch.unwatch(&mut self.watching);
            return Poll::Ready(result);
        }
        if !self.context.leak_watch.watch(&mut self.watching, cx.waker()) {
            return Poll::Pending;
        }
        self.context.leak_watch.unwatch(&mut self.watching);
        // The coroutines that ended did so before the context settled: one that ended just
        // after the first look is found now.
        if let Poll::Ready(result) = self.claim.poll(cx) {
            return Poll::Ready(result);
        }
        self.claim.give_up();
        Poll::Ready(Err(Box::new(CANCELLED)))
    }

    /// Blocks this thread until the coroutine ends and returns its result, or `Err` with the
    /// payload of its panic (see [`JoinHandle`]). On a thread that has a context, the
    /// coroutine's or another, it polls that context meanwhile (as
    /// [`AioContext::wait_while`](super::AioContext::wait_while), QEMU's `AIO_WAIT_WHILE`), so
    /// that what the coroutine waits for there still runs; on the coroutine's own thread it
    /// first runs the coroutines already queued there, without a poll. A thread without a
    /// context parks.
    ///
    /// # Panics
    ///
    /// Inside a coroutine (its thread cannot block: use [`Co::join`]).
    pub fn join(mut self) -> thread::Result<T> {
        assert!(
            !in_coroutine(),
            "aiocoro: JoinHandle::join called inside a coroutine; a coroutine joins with \
             co.join(handle), which suspends it instead of blocking its thread"
        );
        if current_context_id() == Some(self.context.id) {
            // Coroutines already queued (this one, just spawned, say) run first. No handle of
            // the context is held meanwhile: one of them may drop the last.
            run_woken_coroutines();
        }
        if !self.is_finished()
            && let Some(context) = super::AioContext::current()
        {
            // Its end kicks this context out of a blocking poll, from whichever thread.
            let waker = Waker::from(Arc::new(Kicker(context.handle())));
            let mut cx = Context::from_waker(&waker);
            let mut result = None;
            context.wait_while(|| match self.poll_result(&mut cx) {
                Poll::Ready(ended) => {
                    result = Some(ended);
                    false
                }
                Poll::Pending => true,
            });
            return result.expect("aiocoro: wait_while ended before the join had its result");
        }
        if self.is_finished()
            && let Poll::Ready(result) = self.poll_result(&mut Context::from_waker(Waker::noop()))
        {
            return result;
        }
        let waker = Waker::from(Arc::new(Unparker(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            match self.poll_result(&mut cx) {
                Poll::Ready(result) => return result,
                Poll::Pending => thread::park(),
            }
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    /// Ready with the coroutine's result once it ends; resumes its panic here if it panicked.
    ///
    /// # Panics
    ///
    /// As the coroutine panicked, or if polled again after it returned the result.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `JoinHandle` is `Unpin`: no field is pinned.
        self.get_mut().poll_result(cx).map(|result| result.unwrap_or_else(|p| resume_unwind(p)))
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        self.context.leak_watch.unwatch(&mut self.watching);
    }
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("context", &self.context.id)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Co {
    /// Suspends this coroutine until the coroutine of `handle` ends, and returns its result or
    /// `Err` with the payload of its panic (see [`JoinHandle`]). The coroutine may run on any
    /// context, this one included. A coroutine that joins itself (its handle reached it) waits
    /// until its context's shutdown cancels it, as a tokio task that awaits its own handle
    /// waits forever: nothing detects it.
    ///
    /// # Panics
    ///
    /// As [`Co::block_on`].
    pub fn join<T>(&self, mut handle: JoinHandle<T>) -> thread::Result<T> {
        self.block_on(std::future::poll_fn(|cx| handle.poll_result(cx)))
    }
}

/// Wakes a thread that has no context, blocked in [`JoinHandle::join`].
struct Unparker(Thread);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Wakes a thread that polls its context in [`JoinHandle::join`].
struct Kicker(super::AioHandle);

impl Wake for Kicker {
    fn wake(self: Arc<Self>) {
        self.0.kick();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.kick();
    }
}
