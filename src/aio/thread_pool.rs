//! A pool of worker threads for blocking calls (QEMU's `util/thread-pool.c` and
//! `thread_pool_submit_co`): a coroutine hands a closure to a worker and sleeps; the worker runs
//! it and wakes the coroutine, which picks the result up in its own context.
//!
//! Two small protocols cross threads here, each under one lock:
//!
//! * the pool's queue ([`State`]): who runs a queued job, when a worker starts, when it exits;
//! * one job's ticket ([`Ticket`]): how the result (or the job itself, when the coroutine gives
//!   up first) passes between the coroutine and the worker, and why a job may borrow from the
//!   coroutine's stack.

// Its `pub` items are re-exported to the loom models (`loom_exports`, loom builds only).
#![cfg_attr(not(aiocoro_loom), allow(unreachable_pub))]

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use super::wait::Waker;
use crate::coroutine::Co;
use crate::loom::{Condvar, Mutex};

#[cfg(aiocoro_loom)]
use loom::thread;
#[cfg(not(aiocoro_loom))]
use std::thread;

/// Locks a shim mutex. No code panics while holding one of this module's locks (jobs run
/// outside them, under `catch_unwind`), so a poisoned lock still holds consistent state.
macro_rules! lock {
    ($mutex:expr) => {
        $mutex.lock().unwrap_or_else(PoisonError::into_inner)
    };
}

/// The name of the pool's worker threads.
const WORKER_NAME: &str = "aiocoro-pool";

/// How a [`ThreadPool`] sizes itself (QEMU's `thread-pool-min` / `thread-pool-max` and its
/// 10-second idle timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadPoolConfig {
    /// Workers that stay alive when idle, once started. Workers start only when jobs need
    /// them, so fewer may run.
    pub min_workers: usize,
    /// The most workers that run at once; more jobs wait in the queue.
    pub max_workers: usize,
    /// How long a worker above `min_workers` waits for a job before it exits.
    pub idle_timeout: Duration,
}

impl Default for ThreadPoolConfig {
    /// QEMU's values: no minimum, at most 64 workers, 10 seconds of idleness.
    fn default() -> ThreadPoolConfig {
        ThreadPoolConfig { min_workers: 0, max_workers: 64, idle_timeout: Duration::from_secs(10) }
    }
}

/// Worker threads that run blocking closures for coroutines (QEMU's `ThreadPool`).
///
/// [`ThreadPool::run`] queues a closure and suspends the calling coroutine; a worker runs the
/// closure and wakes the coroutine, which gets the result in its own context, on its own
/// thread. Workers start when a job finds none idle (up to
/// [`max_workers`](ThreadPoolConfig::max_workers)) and exit after
/// [`idle_timeout`](ThreadPoolConfig::idle_timeout) without work, down to
/// [`min_workers`](ThreadPoolConfig::min_workers). Clones share one pool; when the last clone
/// is dropped, the workers finish the queued jobs and exit.
///
/// [`Co::run_blocking`] uses the process-wide [`ThreadPool::global`].
///
/// ```
/// use aiocoro::aio::{AioContext, ThreadPool, ThreadPoolConfig};
///
/// let ctx = AioContext::new()?;
/// let pool = ThreadPool::new(ThreadPoolConfig { max_workers: 2, ..Default::default() });
/// let sum = ctx.run(move |co| pool.run(co, || (1..=10u64).sum::<u64>()));
/// assert_eq!(sum, 55);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct ThreadPool {
    handle: Arc<PoolHandle>,
}

/// What the clones of one [`ThreadPool`] share; dropping it closes the pool. The workers hold
/// the [`Inner`] directly, so that an idle pool with no handles left can tell them to exit.
struct PoolHandle {
    inner: Arc<Inner>,
}

struct Inner {
    config: ThreadPoolConfig,
    state: Mutex<State>,
    /// Signalled once per queued job, and to all workers when the pool closes.
    work: Condvar,
}

/// The pool's queue and head counts, under `Inner::state`.
///
/// The whole protocol:
///
/// * A submitter pushes its job; then, if the queued jobs outnumber the idle workers and fewer
///   than `max_workers` run, it counts a new worker in `workers` (under the lock) and starts it
///   (after unlocking); then it signals `work` once.
/// * A worker takes jobs while the queue has any. With the queue empty it counts itself in
///   `idle` and waits on `work`, at most `idle_timeout`. Back from the wait, for whatever
///   reason, it uncounts itself from `idle` and looks at the queue again. It exits (uncounting
///   itself from `workers`) only with the queue empty: when its wait timed out and more than
///   `min_workers` run, or when the pool is closed.
///
/// So every queued job is seen by a worker: one that is busy (it looks at the queue before it
/// waits), one that is idle (each of those returns from its wait, at the latest at its timeout,
/// and looks before it exits), or one just started. Jobs beyond the idle workers start new
/// workers, so with `max_workers` not reached no job waits for another job to finish.
struct State {
    queue: VecDeque<Arc<dyn Job>>,
    /// Workers started and not yet exited (counted from just before they start).
    workers: usize,
    /// Workers waiting on `work`.
    idle: usize,
    /// No handle is left: workers exit once the queue is empty.
    closed: bool,
}

/// A queued job, as a worker sees it.
pub trait Job: Send + Sync {
    /// Runs the job, unless its coroutine gave up on it; then wakes the coroutine.
    fn run(&self);
}

/// Tells a job's submitter that the job is done: a coroutine's [`Waker`] in production, a
/// model of it under loom.
pub trait JobDone: Send + Sync {
    /// Called once, after the result is in the ticket.
    fn notify(&self);
}

impl JobDone for Waker {
    fn notify(&self) {
        self.wake();
    }
}

/// The two halves of one job's hand-off: the [`Ticket`] a worker runs and the [`Pending`] its
/// submitter keeps.
pub(crate) type Handoff<F, R, N> = (Arc<Ticket<F, R, N>>, Pending<F, R, N>);

/// Makes the two halves of one job's hand-off.
pub fn ticket<F, R, N>(job: F, notify: N) -> Handoff<F, R, N>
where
    F: FnOnce() -> R + Send,
    R: Send,
    N: JobDone,
{
    let ticket = Arc::new(Ticket {
        state: Mutex::new(TicketState::Queued(job)),
        finished: Condvar::new(),
        notify,
    });
    (ticket.clone(), Pending { ticket, closed: false })
}

impl ThreadPool {
    /// Creates a pool with no workers yet; they start when jobs need them.
    ///
    /// # Panics
    ///
    /// If `max_workers` is 0 or `min_workers` exceeds `max_workers`.
    pub fn new(config: ThreadPoolConfig) -> ThreadPool {
        assert!(
            config.max_workers > 0,
            "aiocoro: a ThreadPool needs max_workers >= 1 to run anything (got 0)"
        );
        assert!(
            config.min_workers <= config.max_workers,
            "aiocoro: a ThreadPool's min_workers ({}) exceeds its max_workers ({})",
            config.min_workers,
            config.max_workers
        );
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State { queue: VecDeque::new(), workers: 0, idle: 0, closed: false }),
            work: Condvar::new(),
        });
        ThreadPool { handle: Arc::new(PoolHandle { inner }) }
    }

    /// The process-wide pool with [`ThreadPoolConfig::default`], created on first use; the one
    /// [`Co::run_blocking`] and the thread-pool fallback of file I/O use.
    pub fn global() -> &'static ThreadPool {
        static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();
        GLOBAL.get_or_init(|| ThreadPool::new(ThreadPoolConfig::default()))
    }

    /// The configuration the pool was created with.
    pub fn config(&self) -> &ThreadPoolConfig {
        &self.handle.inner.config
    }

    /// How many workers run now (busy or idle).
    pub fn workers(&self) -> usize {
        lock!(self.handle.inner.state).workers
    }

    /// How many workers wait for a job now.
    pub fn idle_workers(&self) -> usize {
        lock!(self.handle.inner.state).idle
    }

    /// Runs `job` on a worker while the calling coroutine sleeps, and returns its result in
    /// the coroutine's context (QEMU's `thread_pool_submit_co`). Other coroutines of the
    /// context run meanwhile.
    ///
    /// If `job` panics, the panic continues in the coroutine, with its original payload.
    ///
    /// # Panics
    ///
    /// As `job` does; if this thread has no [`AioContext`](super::AioContext); if no worker
    /// runs and none can be started.
    pub fn run<R, F>(&self, co: &Co, job: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        // SAFETY: `job` and `R` are `'static`: they borrow nothing that could be freed.
        unsafe { self.run_borrowed(co, job) }
    }

    /// Like [`ThreadPool::run`], but `job` (and its result) may borrow from the calling
    /// coroutine, for example buffers on its stack.
    ///
    /// This call does not return, and does not let an unwinding of the coroutine pass it,
    /// before the pool is done with `job`: a job that a worker runs is waited for (blocking
    /// the thread if the coroutine is being unwound), and a job still queued is taken back and
    /// dropped here, never run.
    ///
    /// # Safety
    ///
    /// Everything `job` and `R` borrow must stay valid until this call returns or unwinds
    /// past. Borrows of the calling coroutine's stack, and of what its frames own or borrow,
    /// meet this: a coroutine's stack is freed or reused only after it has been unwound
    /// (which runs the guard in here first) or has ended. Memory that can be freed while the
    /// coroutine stays suspended (say, behind a raw pointer that another owner frees) does not.
    pub(crate) unsafe fn run_borrowed<'a, R, F>(&self, co: &Co, job: F) -> R
    where
        F: FnOnce() -> R + Send + 'a,
        R: Send + 'a,
    {
        let wait = co.prepare_wait();
        // SAFETY: the caller keeps what `job` borrows valid until this call returns or unwinds,
        // and `pending` lives until then: it is finished below, or dropped by the unwinding.
        let pending = unsafe { self.submit(wait.waker(), job) };
        wait.wait();
        match pending.finish() {
            Ok(result) => result,
            Err(payload) => panic::resume_unwind(payload),
        }
    }

    /// Queues `job`; `waker` is woken when it has run. The caller gets the result with
    /// [`Pending::finish`] or gives up by dropping the [`Pending`].
    ///
    /// # Safety
    ///
    /// What `job` and `R` borrow must stay valid until the returned [`Pending`] is finished
    /// or dropped (its drop waits for a running job, so that holds when the borrowed memory
    /// outlives the `Pending`).
    unsafe fn submit<'a, R, F>(&self, waker: Waker, job: F) -> Pending<F, R, Waker>
    where
        F: FnOnce() -> R + Send + 'a,
        R: Send + 'a,
    {
        let (ticket, pending) = ticket(job, waker);
        let job: Arc<dyn Job + 'a> = ticket;
        // SAFETY: only the lifetime bound changes (same layout). The queue and the worker may
        // keep this reference past `'a`, and that is sound because of the ticket invariant:
        // `pending` closes the ticket before the caller's borrows end (the caller's contract),
        // and once closed the ticket holds neither the closure nor its result, so the worker's
        // late use of it (running nothing, dropping the `Arc`) touches no borrowed memory.
        let job = unsafe { std::mem::transmute::<Arc<dyn Job + 'a>, Arc<dyn Job>>(job) };
        self.handle.inner.push(job);
        pending
    }
}

impl Inner {
    /// Queues `job` and makes sure a worker will take it (see [`State`]).
    fn push(self: &Arc<Self>, job: Arc<dyn Job>) {
        let start_worker = {
            let mut state = lock!(self.state);
            state.queue.push_back(job);
            let start = state.queue.len() > state.idle && state.workers < self.config.max_workers;
            if start {
                state.workers += 1;
            }
            start
        };
        self.work.notify_one();
        if start_worker && let Err(error) = self.start_worker() {
            let workers = {
                let mut state = lock!(self.state);
                state.workers -= 1;
                state.workers
            };
            // With another worker alive the job still runs; with none, it never would.
            // The submitter's `Pending` takes the job back as this panic unwinds it.
            assert!(workers > 0, "aiocoro: the thread pool cannot start a worker: {error}");
        }
    }

    fn start_worker(self: &Arc<Self>) -> io::Result<()> {
        let inner = self.clone();
        thread::Builder::new().name(WORKER_NAME.to_owned()).spawn(move || inner.work()).map(drop)
    }

    /// A worker's life (see [`State`]).
    fn work(&self) {
        let mut state = lock!(self.state);
        loop {
            if let Some(job) = state.queue.pop_front() {
                drop(state);
                job.run();
                drop(job);
                state = lock!(self.state);
                continue;
            }
            if state.closed {
                break;
            }
            state.idle += 1;
            let (relocked, timeout) = self
                .work
                .wait_timeout(state, self.config.idle_timeout)
                .unwrap_or_else(PoisonError::into_inner);
            state = relocked;
            state.idle -= 1;
            if timeout.timed_out()
                && state.queue.is_empty()
                && state.workers > self.config.min_workers
            {
                break;
            }
        }
        state.workers -= 1;
    }
}

impl Drop for PoolHandle {
    /// The last handle is gone: idle workers exit, busy ones once the queue is empty.
    fn drop(&mut self) {
        lock!(self.inner.state).closed = true;
        self.inner.work.notify_all();
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock!(self.handle.inner.state);
        f.debug_struct("ThreadPool")
            .field("config", &self.handle.inner.config)
            .field("workers", &state.workers)
            .field("idle_workers", &state.idle)
            .field("queued", &state.queue.len())
            .finish()
    }
}

/// One job's hand-off between its coroutine and the worker that runs it.
///
/// `state` moves `Queued → Running → Done → Closed`, or `Queued → Closed` when the coroutine
/// gives up before a worker took the job. Only a worker leaves `Queued` for `Running` and
/// `Running` for `Done` (signalling `finished`, then waking the coroutine with `waker`); only
/// the coroutine's [`Pending`] moves to `Closed`, taking the closure back from `Queued` or the
/// result from `Done`, and waiting on `finished` while `Running`.
///
/// The invariant that lets a job borrow from the coroutine: the `Pending` does not let go (the
/// call does not return, an unwinding does not pass it) before the ticket is `Closed`, and a
/// closed ticket holds neither the closure nor its result. So whatever the worker still does
/// with the ticket after that (waking a finished wait, which is ignored; dropping its `Arc`)
/// touches none of the coroutine's memory.
pub struct Ticket<F, R, N> {
    state: Mutex<TicketState<F, R>>,
    /// Signalled when the state becomes `Done`, for a coroutine blocked in an unwinding.
    finished: Condvar,
    /// Wakes the coroutine's wait once the result is in.
    notify: N,
}

impl<F, R, N> std::fmt::Debug for Ticket<F, R, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").finish_non_exhaustive()
    }
}

enum TicketState<F, R> {
    Queued(F),
    Running,
    Done(std::thread::Result<R>),
    Closed,
}

impl<F, R, N> Job for Ticket<F, R, N>
where
    F: FnOnce() -> R + Send,
    R: Send,
    N: JobDone,
{
    fn run(&self) {
        let job = {
            let mut state = lock!(self.state);
            match std::mem::replace(&mut *state, TicketState::Running) {
                TicketState::Queued(job) => job,
                // The coroutine took the job back: nothing to run, nobody to wake.
                other => {
                    *state = other;
                    return;
                }
            }
        };
        let result = panic::catch_unwind(AssertUnwindSafe(job));
        *lock!(self.state) = TicketState::Done(result);
        self.finished.notify_all();
        self.notify.notify();
    }
}

/// The coroutine's side of a [`Ticket`]; dropping it before [`Pending::finish`] gives up on
/// the job and waits until the worker is done with the coroutine's memory.
pub struct Pending<F, R, N> {
    ticket: Arc<Ticket<F, R, N>>,
    /// The ticket is `Closed`: nothing is left to take back or wait for.
    closed: bool,
}

impl<F, R, N> std::fmt::Debug for Pending<F, R, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl<F, R, N> Pending<F, R, N> {
    /// The job's outcome, once its waker has woken the coroutine.
    pub fn finish(mut self) -> std::thread::Result<R> {
        match self.close() {
            Some(result) => result,
            None => unreachable!("aiocoro: a thread-pool job was woken before it ran"),
        }
    }

    /// Moves the ticket to `Closed`: takes the job back if it is still queued (and drops it
    /// here, unrun), waits for it if a worker runs it, and returns its outcome if it ran.
    fn close(&mut self) -> Option<std::thread::Result<R>> {
        self.closed = true;
        let mut state = lock!(self.ticket.state);
        loop {
            match std::mem::replace(&mut *state, TicketState::Closed) {
                TicketState::Running => {
                    *state = TicketState::Running;
                    state =
                        self.ticket.finished.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
                TicketState::Done(result) => return Some(result),
                TicketState::Queued(job) => {
                    drop(state);
                    drop(job);
                    return None;
                }
                TicketState::Closed => return None,
            }
        }
    }
}

impl<F, R, N> Drop for Pending<F, R, N> {
    fn drop(&mut self) {
        if !self.closed {
            // Given up (the coroutine is unwinding, or `finish` was never reached): the job's
            // borrows must end before this frame's do. A result, if any, is dropped here too.
            drop(self.close());
        }
    }
}

impl Co {
    /// Runs the blocking closure `job` on a worker of [`ThreadPool::global`] while this
    /// coroutine sleeps, and returns its result here, in this coroutine's context (QEMU's
    /// `thread_pool_submit_co`). A panic in `job` continues here with its original payload.
    ///
    /// ```
    /// use aiocoro::aio::AioContext;
    ///
    /// let ctx = AioContext::new()?;
    /// let entries =
    ///     ctx.run(|co| co.run_blocking(|| std::fs::read_dir(".").map(|dir| dir.count())));
    /// assert!(entries? > 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// As `job` does, or if this thread has no [`AioContext`](super::AioContext).
    pub fn run_blocking<R, F>(&self, job: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        ThreadPool::global().run(self, job)
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;
    use crate::aio::AioContext;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    fn pool(max_workers: usize) -> ThreadPool {
        ThreadPool::new(ThreadPoolConfig {
            min_workers: 0,
            max_workers,
            idle_timeout: Duration::from_secs(60),
        })
    }

    /// Runs `body` in a coroutine of a fresh context on this thread until it ends.
    fn in_coroutine(body: impl FnOnce(&Co) + 'static) {
        AioContext::new().unwrap().run(body);
    }

    #[test]
    fn a_borrowed_job_writes_into_the_coroutines_stack() {
        let pool = pool(2);
        in_coroutine(move |co| {
            let mut buffer = [0u8; 64];
            let slice = &mut buffer[8..16];
            // SAFETY: `buffer` lives on this coroutine's stack until after the call.
            let written = unsafe {
                pool.run_borrowed(co, || {
                    slice.fill(0xab);
                    slice.len()
                })
            };
            assert_eq!(written, 8);
            assert!(buffer[8..16].iter().all(|&b| b == 0xab));
            assert!(buffer[..8].iter().chain(&buffer[16..]).all(|&b| b == 0));
        });
    }

    #[test]
    fn giving_up_on_a_running_job_waits_until_the_worker_is_done() {
        let pool = pool(1);
        in_coroutine(move |co| {
            let mut buffer = vec![0u8; 4096];
            let (started_tx, started_rx) = mpsc::channel();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            let wait = co.prepare_wait();
            let slice = &mut buffer[..];
            // SAFETY: `buffer` outlives `pending`, which is dropped below.
            let pending = unsafe {
                pool.submit(wait.waker(), move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    slice.fill(7);
                })
            };
            started_rx.recv().unwrap();
            let releaser = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                release_tx.send(()).unwrap();
            });
            // What an unwinding of this coroutine does: drop the `Pending` mid-flight.
            drop(pending);
            assert!(
                buffer.iter().all(|&b| b == 7),
                "the drop returned before the worker finished writing into the buffer"
            );
            releaser.join().unwrap();
            drop(wait);
        });
    }

    #[test]
    fn giving_up_on_a_queued_job_drops_it_here_unrun() {
        struct DropFlag(Arc<AtomicBool>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }

        let pool = pool(1);
        let probe = pool.clone();
        let ran = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let finished = Rc::new(Cell::new(false));
        let (r, d, f) = (ran.clone(), dropped.clone(), finished.clone());
        in_coroutine(move |co| {
            let (release_tx, release_rx) = mpsc::channel::<()>();
            let (started_tx, started_rx) = mpsc::channel();
            let blocker_wait = co.prepare_wait();
            // SAFETY: the closure borrows nothing.
            let blocker = unsafe {
                pool.submit(blocker_wait.waker(), move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
            };
            started_rx.recv().unwrap();
            let wait = co.prepare_wait();
            let flag = DropFlag(d.clone());
            let ran = r.clone();
            // SAFETY: the closure borrows nothing.
            let queued = unsafe {
                pool.submit(wait.waker(), move || {
                    let _flag = flag;
                    ran.store(true, Ordering::SeqCst);
                })
            };
            assert_eq!(probe.workers(), 1, "max_workers is 1: the second job waits in the queue");
            drop(queued);
            assert!(d.load(Ordering::SeqCst), "the queued closure was dropped by the give-up");
            release_tx.send(()).unwrap();
            blocker_wait.wait();
            assert!(blocker.finish().is_ok());
            // One worker takes jobs in order: once a third job has run, the worker has been
            // through the abandoned ticket.
            assert_eq!(pool.run(co, || 3), 3);
            f.set(true);
            drop(wait);
        });
        assert!(finished.get());
        assert!(dropped.load(Ordering::SeqCst));
        assert!(!ran.load(Ordering::SeqCst), "an abandoned job must never run");
    }
}
