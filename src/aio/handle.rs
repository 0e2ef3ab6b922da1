//! `AioHandle`: a context as seen from other threads.

use std::fmt;
use std::sync::Arc;

use super::context::{Message, Shared, home_local};
use super::join::{JoinHandle, joinable};
use crate::coroutine::Co;

/// The error of handing new work to a context that was closed or has shut down. It converts
/// into an [`std::io::Error`] (kind `Other`, this error inside), so `?` takes it in
/// `io::Result` code:
///
/// ```
/// use aiocoro::aio::{AioContext, ContextClosed};
///
/// fn start(ctx: &AioContext) -> std::io::Result<()> {
///     ctx.handle().schedule_oneshot(|| {})?;
///     Ok(())
/// }
///
/// let ctx = AioContext::new()?;
/// ctx.close();
/// let error = start(&ctx).unwrap_err();
/// assert!(error.get_ref().is_some_and(|inner| inner.is::<ContextClosed>()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextClosed;

impl fmt::Display for ContextClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("aiocoro: the AioContext is closed or has shut down; it takes no new work")
    }
}

impl std::error::Error for ContextClosed {}

impl From<ContextClosed> for std::io::Error {
    fn from(error: ContextClosed) -> std::io::Error {
        std::io::Error::other(error)
    }
}

/// Reaches an [`AioContext`](super::AioContext) from any thread: schedules one-shot callbacks,
/// starts coroutines, wakes it.
///
/// ```
/// use aiocoro::aio::IoThread;
///
/// let iothread = IoThread::spawn("worker")?;
/// let coroutine = iothread.handle().spawn(move |co| {
///     co.sleep(std::time::Duration::from_millis(1));
///     std::thread::current().name().map(String::from)
/// })?;
/// assert_eq!(coroutine.join().unwrap().as_deref(), Some("worker"));
/// iothread.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct AioHandle {
    shared: Arc<Shared>,
}

impl AioHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> AioHandle {
        AioHandle { shared }
    }

    /// Runs `callback` once on the context's thread, in its next bottom-half round (QEMU's
    /// `aio_bh_schedule_oneshot`).
    ///
    /// # Errors
    ///
    /// If the context was closed or has shut down; `callback` is dropped unrun.
    pub fn schedule_oneshot(
        &self,
        callback: impl FnOnce() + Send + 'static,
    ) -> Result<(), ContextClosed> {
        self.send(Message::Oneshot(Box::new(callback)))
    }

    /// Starts a coroutine running `body` on the context's thread (QEMU's
    /// `qemu_coroutine_create` + `aio_co_schedule`) and returns the [`JoinHandle`] of its
    /// result (drop it to detach the coroutine). The body must be `Send` to get there; once
    /// there, it never moves again.
    ///
    /// # Errors
    ///
    /// If the context was closed or has shut down; `body` is dropped unrun.
    pub fn spawn<T: Send + 'static>(
        &self,
        body: impl FnOnce(&Co) -> T + Send + 'static,
    ) -> Result<JoinHandle<T>, ContextClosed> {
        let (body, handle) = joinable(body, self.shared.clone());
        self.send(Message::Spawn(Box::new(body)))?;
        Ok(handle)
    }

    /// Wakes the context if it is blocked in `poll`, so that it re-checks its work (QEMU's
    /// `aio_notify`, and `aio_wait_kick` for a thread in [`wait_while`]).
    ///
    /// [`wait_while`]: super::AioContext::wait_while
    pub fn kick(&self) {
        self.shared.kick();
    }

    /// Whether the caller runs on the context's home thread.
    pub fn is_home_thread(&self) -> bool {
        // SAFETY: the reference is only compared with `None`.
        unsafe { home_local(&self.shared) }.is_some()
    }

    /// Whether the context refuses new work: it was closed
    /// ([`AioContext::close`](super::AioContext::close)) or has shut down.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// How many times other threads had to write the context's eventfd to wake it. Work sent
    /// to a context that is busy (not blocked in `poll`) costs no eventfd write.
    pub fn eventfd_writes(&self) -> u64 {
        self.shared.notify.signals()
    }

    fn send(&self, message: Message) -> Result<(), ContextClosed> {
        self.shared.send(message).map_err(|_| ContextClosed)
    }
}

impl fmt::Debug for AioHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioHandle").field("context", &self.shared.id).finish()
    }
}
