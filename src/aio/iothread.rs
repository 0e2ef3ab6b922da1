//! `IoThread`: a thread that owns a context and runs it until asked to stop (QEMU's
//! `IOThread`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::adaptive::AdaptivePolling;
use super::context::AioContext;
use super::handle::AioHandle;

/// The busy-polling window limit of an IoThread's context: QEMU's default `poll-max-ns` for
/// IOThreads (32 µs).
pub const DEFAULT_POLL_MAX_NS: u64 = 32_768;

/// A thread running an [`AioContext`], with adaptive busy polling up to
/// [`DEFAULT_POLL_MAX_NS`] as QEMU's IOThreads have by default, paused while the thread keeps
/// being preempted ([`AdaptivePolling::pause_while_preempted`]: with more runnable threads than
/// CPUs, polling would take the CPU from the threads whose work it waits for).
///
/// Work reaches it through [`IoThread::handle`]. [`IoThread::stop`] (or dropping it) asks the
/// thread to finish: it runs what was already scheduled, drops its context and exits, and the
/// caller joins it. Coroutines still suspended then are finished by the context's shutdown
/// (drained, then cancelled: see [`AioContext`]'s shutdown), never a panic. A panic on the
/// thread (a coroutine that panics by itself) reaches the caller of `stop`.
pub struct IoThread {
    handle: AioHandle,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread").field("running", &self.thread.is_some()).finish_non_exhaustive()
    }
}

impl IoThread {
    /// Starts a thread named `name` with a context of its own.
    ///
    /// # Errors
    ///
    /// If the thread or its context cannot be created.
    pub fn spawn(name: &str) -> io::Result<IoThread> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let running = Arc::new(AtomicBool::new(true));
        let keep_running = running.clone();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let ctx = match AioContext::new() {
                Ok(ctx) => ctx,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let polling = AdaptivePolling::new(DEFAULT_POLL_MAX_NS).pause_while_preempted();
            ctx.set_adaptive_polling(Some(polling));
            let _ = ready_tx.send(Ok(ctx.handle()));
            while keep_running.load(Ordering::Acquire) {
                ctx.poll(true);
            }
            // Refuse new work, then run everything accepted before (bounded: a coroutine that
            // keeps itself busy is cancelled by the context's shutdown instead).
            ctx.close();
            ctx.poll_until_settled();
        })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| io::Error::other("aiocoro: the IoThread died while starting"))??;
        Ok(IoThread { handle, running, thread: Some(thread) })
    }

    /// A handle to the thread's context.
    pub fn handle(&self) -> &AioHandle {
        &self.handle
    }

    /// Asks the thread to stop, lets it run what is already scheduled, and joins it.
    ///
    /// The thread refuses new work, polls until nothing is left to run (or until 64 polls in a
    /// row leave no less to do: a coroutine that reschedules itself or awaits a future that
    /// wakes itself forever, a BH that schedules itself, does not hold the stop up), and drops
    /// its context, which cancels the coroutines still suspended there (waiting for a
    /// `CoMutex`, a `CoQueue`, a sleep, a thread-pool job, rescheduling, ...): they unwind from
    /// their waits, their joiners get the cancellation, their destructors run,
    /// and the locks they waited for stay usable by everybody else (see [`AioContext`]'s
    /// shutdown). The join waits for that, including a thread-pool job that is running, a
    /// [`Co::run_uncancellable`](crate::coroutine::Co::run_uncancellable) section in progress
    /// (it ends whole), and a lock that a cancelled `CoQueue` waiter must take back for its
    /// caller's guard: do not hold such a lock, or what such a section waits for, while
    /// stopping the thread whose coroutine waits under it.
    ///
    /// Called on the thread itself (by one of its coroutines, or a callback), or when the
    /// thread drops its own `IoThread`, the stop cannot wait for the thread: it only asks, and
    /// returns. The thread stops as above once the caller has returned to its poll (a
    /// coroutine, at its next wait, where the shutdown then cancels it), and a panic there
    /// reaches nobody.
    ///
    /// # Panics
    ///
    /// With the thread's panic, if it panicked.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        // The flag is cleared by a message that the thread runs in its own poll, so the
        // request cannot slip past a poll that is about to block. An error means the context
        // is gone already: the thread is exiting anyway.
        let running = self.running.clone();
        let _ = self.handle.schedule_oneshot(move || running.store(false, Ordering::Release));
        if thread.thread().id() == std::thread::current().id() {
            // Asked by the thread itself (one of its coroutines), which cannot wait for itself:
            // it stops once the caller is back in its poll.
            return;
        }
        if let Err(panic) = thread.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
