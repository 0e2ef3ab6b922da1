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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use super::{AioContext, AioHandle, run_woken_coroutines};
use crate::coroutine::{Cancelled, Co, in_coroutine};

/// The payload of the error a joiner gets for a coroutine that its context's shutdown
/// cancelled.
pub const CANCELLED: &str = "aiocoro: the coroutine was cancelled by its context's shutdown";

/// Owns the result of a spawned coroutine ([`AioHandle::spawn`], [`AioContext::spawn`]).
///
/// * [`JoinHandle::join`] blocks a thread until the coroutine ends (on the coroutine's own
///   thread it polls the context meanwhile);
/// * [`Co::join`] suspends a coroutine until then;
/// * as a [`Future`] with `Output = T`, async code `.await`s it.
///
/// **Panics.** If the coroutine panics, `join` and `Co::join` return `Err` with the panic's
/// payload, as [`std::thread::JoinHandle::join`] does, and awaiting the handle resumes the
/// panic in the awaiting task (so `.await` yields `T`). A coroutine that its context's shutdown
/// cancelled reports `Err` with the payload [`CANCELLED`] (a `&'static str`); its unwinding
/// itself goes on to the context, as for any coroutine.
///
/// **Detaching.** Dropping the handle detaches the coroutine: it runs on, and its result is
/// dropped. A detached coroutine that panics has its panic continue from the poll that ran it
/// (as a coroutine spawned without a handle would); a handle still held when the coroutine
/// panics takes the panic instead.
pub struct JoinHandle<T> {
    completion: Arc<Completion<T>>,
    context: AioHandle,
}

/// What the coroutine and its handle share.
struct Completion<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    /// The coroutine's result, until a joiner takes it.
    result: Option<thread::Result<T>>,
    /// Whether a joiner took the result.
    taken: bool,
    /// Whom to wake when the result is in.
    waker: Option<std::task::Waker>,
}

impl<T> Completion<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // A poisoned lock only means a waker panicked; the state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finish(&self, result: thread::Result<T>) {
        let waker = {
            let mut state = self.state();
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Wraps `body` so that its result (or panic) goes to the returned handle; `context` is the
/// context it will run on.
pub(crate) fn joinable<T>(
    body: impl FnOnce(&Co) -> T,
    context: AioHandle,
) -> (impl FnOnce(&Co), JoinHandle<T>) {
    let completion = Arc::new(Completion {
        state: Mutex::new(State { result: None, taken: false, waker: None }),
    });
    let ours = completion.clone();
    let wrapped = move |co: &Co| match catch_unwind(AssertUnwindSafe(|| body(co))) {
        Ok(value) => ours.finish(Ok(value)),
        Err(payload) if payload.is::<Cancelled>() => {
            ours.finish(Err(Box::new(CANCELLED)));
            // The context catches its cancellation.
            resume_unwind(payload)
        }
        // Detached: nobody can take the panic, so it goes on as it would without a handle.
        Err(payload) if Arc::strong_count(&ours) == 1 => resume_unwind(payload),
        Err(payload) => ours.finish(Err(payload)),
    };
    (wrapped, JoinHandle { completion, context })
}

impl<T> JoinHandle<T> {
    /// Whether the coroutine has ended (returned, panicked or was cancelled).
    pub fn is_finished(&self) -> bool {
        let state = self.completion.state();
        state.result.is_some() || state.taken
    }

    /// Blocks this thread until the coroutine ends and returns its result, or `Err` with the
    /// payload of its panic (see [`JoinHandle`]). On the coroutine's own thread it runs the
    /// coroutines already queued there, then polls the context (as
    /// [`AioContext::wait_while`]) until the coroutine ends.
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
        if self.context.is_home_thread() {
            // Coroutines already queued (this one, just spawned, say) run first, without a poll.
            run_woken_coroutines();
            if !self.is_finished()
                && let Some(context) = AioContext::current()
            {
                context.wait_while(|| !self.is_finished());
            }
        }
        if let Poll::Ready(result) = self.poll_result(&mut Context::from_waker(Waker::noop())) {
            return result;
        }
        let waker = std::task::Waker::from(Arc::new(Unparker(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            match self.poll_result(&mut cx) {
                Poll::Ready(result) => return result,
                Poll::Pending => thread::park(),
            }
        }
    }

    /// The result if the coroutine has ended; otherwise registers `cx`'s waker.
    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<thread::Result<T>> {
        let mut state = self.completion.state();
        if let Some(result) = state.result.take() {
            state.taken = true;
            return Poll::Ready(result);
        }
        assert!(!state.taken, "aiocoro: a JoinHandle was polled after it returned its result");
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    /// Ready with the coroutine's result once it ends; resumes its panic here if it panicked.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `JoinHandle` is `Unpin`: no field is pinned.
        self.get_mut().poll_result(cx).map(|result| result.unwrap_or_else(|p| resume_unwind(p)))
    }
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("context", &self.context)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Co {
    /// Suspends this coroutine until the coroutine of `handle` ends, and returns its result or
    /// `Err` with the payload of its panic (see [`JoinHandle`]). The coroutine may run on any
    /// context, this one included.
    ///
    /// # Panics
    ///
    /// As [`Co::block_on`].
    pub fn join<T>(&self, mut handle: JoinHandle<T>) -> thread::Result<T> {
        self.block_on(std::future::poll_fn(|cx| handle.poll_result(cx)))
    }
}

/// Wakes a thread blocked in [`JoinHandle::join`].
struct Unparker(Thread);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}
