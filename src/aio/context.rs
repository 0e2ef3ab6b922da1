//! `AioContext`: one thread's event loop (QEMU's `AioContext` and `aio_poll`).
//!
//! The context is split by concept into files that use it back, on purpose: it owns the
//! tables of bottom halves (`bh`), fd handlers (`fd`), timers (`timer`), waits and parks
//! (`wait`), deferred signals (`deferred`), handles (`handle`) and its io_uring
//! (`uring::engine`), and each of those reaches the home-thread state (`Local`) to register
//! and schedule; they are one state, as a struct's `impl` spread over files.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::adaptive::AdaptivePolling;
use super::arena::{Arena, Key};
use super::bh::{BhCore, BottomHalf};
use super::deferred::Dispatch;
use super::fd::{FdHandler, FdTable};
use super::handle::AioHandle;
use super::inbox::Inbox;
use super::leak_watch::LeakWatch;
use super::notify::{Blocker, WakeupHandshake};
use super::timer::{Timer, TimerQueue, clock_ns};
use super::uring::FileIo;
use super::wait::{WaitId, WaitState, WakeReason};
use crate::coroutine::{Co, Coroutine, ParkState, in_coroutine};
use crate::sys;

/// How many looks for work a busy poll makes between two reads of the clock.
const LOOKS_PER_CLOCK_READ: u32 = 16;
/// What other threads send a context.
pub(crate) enum Message {
    /// A bottom half became pending.
    Bh(Arc<BhCore>),
    /// A one-shot callback to run.
    Oneshot(Box<dyn FnOnce() + Send>),
    /// A wake for the suspension under this wait key.
    Wake(Key, WakeReason),
    /// A coroutine body to start.
    Spawn(Box<dyn FnOnce(&Co) + Send>),
}

/// Work queued on the home thread for the next bottom-half round, including the messages that
/// other threads sent (moved here before any of them runs).
pub(crate) enum LocalTask {
    Bh(Arc<BhCore>),
    Oneshot(Box<dyn FnOnce()>),
    Wake(Key, WakeReason),
    Spawn(Box<dyn FnOnce(&Co) + Send>),
}

impl From<Message> for LocalTask {
    fn from(message: Message) -> LocalTask {
        match message {
            Message::Bh(bh) => LocalTask::Bh(bh),
            Message::Oneshot(callback) => LocalTask::Oneshot(callback),
            Message::Wake(key, reason) => LocalTask::Wake(key, reason),
            Message::Spawn(body) => LocalTask::Spawn(body),
        }
    }
}

/// Coroutines waiting for the CPU.
pub(crate) enum RunItem {
    /// Enter a new coroutine for the first time.
    Start(Coroutine),
    /// Resume the coroutine whose suspension under this key was woken.
    Resume(Key),
    /// Resume this unparked coroutine (see [`ParkRecord`](super::wait::ParkRecord)).
    Unpark(Coroutine),
}

/// The part of a context that any thread may touch.
pub(crate) struct Shared {
    /// Distinguishes contexts, so a stale local waker cannot reach a later context.
    pub(crate) id: u64,
    pub(crate) inbox: Inbox<Message>,
    pub(crate) notify: WakeupHandshake,
    /// Signalled to wake the home thread from `epoll_wait`.
    eventfd: OwnedFd,
    /// When the event was last signalled (`clock_ns`): the moment work reached a blocked
    /// context, which adaptive polling uses instead of the moment the thread woke up (see
    /// [`AdaptivePolling::record_wait`]).
    signalled_at: std::sync::atomic::AtomicU64,
    /// The joiners waiting for coroutines of this context, told if the shutdown leaks them.
    pub(crate) leak_watch: LeakWatch,
}

impl Shared {
    /// Delivers `message` from any thread and wakes the context if it may be blocked.
    ///
    /// # Errors
    ///
    /// Gives `message` back if the context refuses it: new work (a one-shot, a spawn) once the
    /// context is closed, anything once it has shut down. Wakes and BH schedules serve what the
    /// context holds already, which a closed context keeps running: they are refused only once
    /// it has shut down, so a coroutine accepted before the close can still be woken from
    /// another thread, and a cross-thread BH schedule is not lost with its pending mark left
    /// set (which would keep the BH from ever being queued again).
    pub(crate) fn send(&self, message: Message) -> Result<(), Message> {
        match message {
            Message::Wake(..) | Message::Bh(_) => self.inbox.push_past_close(message)?,
            Message::Oneshot(_) | Message::Spawn(_) => self.inbox.push(message)?,
        };
        self.signal_if_needed();
        Ok(())
    }

    /// Delivers a wake from a running coroutine of another thread: the message goes in at
    /// once, the signal when that coroutine yields or ends (see `deferred`).
    pub(crate) fn send_wake_deferred(self: Arc<Self>, key: Key, reason: WakeReason) {
        // Refused only once the context has shut down: then nobody waits for the signal.
        if self.inbox.push_past_close(Message::Wake(key, reason)).is_ok() {
            super::deferred::defer(self);
        }
    }

    /// Signals the context's event if it may be blocking (the producer's side of the
    /// `notify_me` handshake, for work already visible).
    pub(crate) fn signal_if_needed(&self) {
        if self.notify.needs_signal() {
            self.signal();
        }
    }

    /// Makes the context's current or next blocking poll return (QEMU's `aio_notify` and
    /// `aio_wait_kick`).
    pub(crate) fn kick(&self) {
        if self.notify.kick() {
            self.signal();
        }
    }

    fn signal(&self) {
        self.signalled_at.store(clock_ns(), std::sync::atomic::Ordering::Relaxed);
        // An error here means the eventfd is gone, which only happens once the context is.
        let _ = sys::eventfd_signal(self.eventfd.as_fd());
    }

    /// Whether the context refuses new work (it was closed or shut down).
    pub(crate) fn is_closed(&self) -> bool {
        self.inbox.is_closed()
    }

    /// Whether the context has shut down: the coroutines still suspended in it never run
    /// again.
    pub(crate) fn is_down(&self) -> bool {
        self.inbox.is_shut()
    }

    /// Queues a pending BH: on the home thread in the local queue, elsewhere through the inbox
    /// (a context that has shut down drops it).
    pub(crate) fn enqueue_bh(&self, bh: Arc<BhCore>) {
        // SAFETY: queueing the task runs no user code and drops nothing.
        match unsafe { home_local(self) } {
            Some(local) => local.tasks.borrow_mut().push_back(LocalTask::Bh(bh)),
            None => drop(self.send(Message::Bh(bh))),
        }
    }
}

/// The home-thread state of a context.
pub(crate) struct Local {
    pub(crate) shared: Arc<Shared>,
    epoll: OwnedFd,
    /// Reused buffer for `epoll_wait`; a nested poll finds it taken and uses its own.
    events: Cell<Vec<libc::epoll_event>>,
    /// The number of live `AioContext` handles.
    handles: Cell<usize>,
    pub(crate) bhs: RefCell<Arena<Rc<dyn Fn()>>>,
    pub(crate) tasks: RefCell<VecDeque<LocalTask>>,
    pub(crate) timers: RefCell<TimerQueue>,
    pub(crate) fds: RefCell<FdTable>,
    pub(crate) waits: RefCell<Arena<WaitState>>,
    /// Coroutines of this context in a park, woken or not (see
    /// [`ParkRecord`](super::wait::ParkRecord)): suspended like those of `waits`.
    pub(crate) parked: Cell<usize>,
    pub(crate) run_queue: RefCell<VecDeque<RunItem>>,
    pub(crate) adaptive: RefCell<Option<AdaptivePolling>>,
    /// The context's file-I/O engine (its io_uring, or the thread pool), chosen on its first
    /// file I/O and ended when it shuts down.
    pub(crate) file_io: FileIo,
    /// Where the context is in its life (see [`Phase`]).
    phase: Cell<Phase>,
    /// How many [`Co::run_uncancellable`] sections of its coroutines are in progress: the
    /// shutdown waits for them, whether they wait or park (a reschedule, a lock hand-over).
    pub(crate) sections: Cell<usize>,
}

/// Where a context is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Running: some `AioContext` handle is alive.
    Running,
    /// The last handle is gone and [`Local::shut_down`] finishes the suspended coroutines;
    /// from the moment it starts cancelling them, a new cancellable wait is cancelled at once.
    Draining { cancelling: bool },
    /// Shut down.
    Down,
}

thread_local! {
    /// The context of this thread, or null.
    ///
    /// Invariant: non-null only between `AioContext::new` and the drop of its last handle, and
    /// then it points to that context's `Local`, which those handles keep alive.
    static CURRENT: Cell<*const Local> = const { Cell::new(ptr::null()) };
}

/// The epoll token of the context's own eventfd; file descriptors use their number.
const NOTIFY_TOKEN: u64 = u64::MAX;

/// How many coroutines one poll enters at most before it looks at its other sources again.
const RUN_BUDGET: usize = 1024;

/// How many polls in a row a shutdown makes that finish no suspended coroutine before it
/// moves on (from draining to cancelling, from cancelling to leaking what is left).
const STALL_POLLS: u32 = 64;

/// Runs the coroutines woken on this thread now, if this thread has a context and the caller
/// is not itself a coroutine (for [`CoQueue::enter_next`](crate::sync::CoQueue::enter_next)).
pub(crate) fn run_woken_coroutines() {
    if in_coroutine() {
        return;
    }
    // SAFETY: the check runs no other code.
    let busy = unsafe { with_current_brief(|local| !local.run_queue.borrow().is_empty()) };
    if busy == Some(true) {
        // The coroutines may drop the last context handle: hold one of our own while they run.
        with_current(|local| local.run_coroutines());
    }
}

/// Runs `f` with this thread's context, or returns `None` when it has none, without taking a
/// handle of our own (no reference-count round trip): for short bookkeeping.
///
/// # Safety
///
/// `f` must not drop a handle of the context (it runs no user code and drops no coroutine),
/// so that the context outlives the call.
#[inline]
pub(crate) unsafe fn with_current_brief<R>(f: impl FnOnce(&Local) -> R) -> Option<R> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer is this thread's live `Local`,
    // which the caller's `f` cannot drop.
    unsafe { local.as_ref() }.map(f)
}

/// The number of this thread's context, if it has one.
pub(crate) fn current_context_id() -> Option<u64> {
    // SAFETY: reading the number runs no other code.
    unsafe { with_current_brief(|local| local.shared.id) }
}

/// Delivers a wake to the suspension under `key` if this thread's context is the one numbered
/// `context` (for local wakers); otherwise does nothing.
pub(crate) fn deliver_here(context: u64, key: Key, reason: WakeReason) {
    // SAFETY: `deliver` runs no other code and drops nothing.
    unsafe {
        with_current_brief(|local| {
            if local.shared.id == context {
                local.deliver(key, reason);
            }
        })
    };
}

/// This thread's context, if `shared` is its shared half.
///
/// The reference holds no count: it is valid until the context's last handle is dropped, which
/// any user code (a callback, a coroutine) may do. Where the context must outlive a call into
/// user code, use [`home_rc`] or [`with_current`].
///
/// # Safety
///
/// The caller uses the reference only for bookkeeping that runs no user code and drops no
/// coroutine, and not after such a call: the returned lifetime is not checked against the
/// context's (a `Shared` outlives its `Local` in wakers).
pub(crate) unsafe fn home_local(shared: &Shared) -> Option<&Local> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer is a live `Local` of this
    // thread, and it stays alive until its last handle is dropped, which only user code can
    // do; the caller runs none while it uses the reference (the contract).
    let local = unsafe { local.as_ref() }?;
    ptr::eq(Arc::as_ptr(&local.shared), shared).then_some(local)
}

/// A counted handle to this thread's context, if `shared` is its shared half.
pub(crate) fn home_rc(shared: &Shared) -> Option<Rc<Local>> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    if local.is_null() {
        return None;
    }
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer is this thread's live `Local`;
    // only its `shared` field is read.
    if !ptr::eq(Arc::as_ptr(unsafe { &(*local).shared }), shared) {
        return None;
    }
    // SAFETY: by the invariant on `CURRENT`, the pointer came from `Rc::as_ptr` of a live
    // `Rc<Local>`; bumping the count makes a handle of our own.
    Some(unsafe {
        Rc::increment_strong_count(local);
        Rc::from_raw(local)
    })
}

/// Runs `f` with this thread's context, or returns `None` when it has none.
pub(crate) fn with_current<R>(f: impl FnOnce(&Rc<Local>) -> R) -> Option<R> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    if local.is_null() {
        return None;
    }
    // SAFETY: by the invariant on `CURRENT`, the pointer came from `Rc::as_ptr` of a live
    // `Rc<Local>`; bumping the count makes a handle of our own for the call.
    let local = unsafe {
        Rc::increment_strong_count(local);
        Rc::from_raw(local)
    };
    Some(f(&local))
}

/// A handle to this thread's context, for code that cannot run without one.
pub(crate) fn current_local(what: &str) -> Rc<Local> {
    let local = CURRENT.try_with(Cell::get).unwrap_or(ptr::null());
    if local.is_null() {
        no_context(what);
    }
    // SAFETY: by the invariant on `CURRENT`, the pointer came from `Rc::as_ptr` of a live
    // `Rc<Local>`; bumping the count makes a handle of our own.
    unsafe {
        Rc::increment_strong_count(local);
        Rc::from_raw(local)
    }
}

#[cold]
#[inline(never)]
pub(crate) fn no_context(what: &str) -> ! {
    panic!("aiocoro: {what} needs an AioContext on this thread (create one with AioContext::new)")
}

/// An event loop owned by one thread (QEMU's `AioContext`).
///
/// A context runs bottom halves, file-descriptor handlers, timers and coroutines, all on its
/// home thread: the thread that created it, which is the only one that can hold it (it is not
/// `Send`). Other threads reach it through an [`AioHandle`]. A thread has at most one context.
///
/// # Shutdown
///
/// Dropping the last handle (clones share one context) shuts the context down. That never
/// panics for coroutines that are merely suspended; it finishes them, in three steps:
///
/// 1. **Drain.** New work from other threads is refused (as after [`AioContext::close`]), and
///    while coroutines are suspended the context polls without blocking as long as that makes
///    progress: what is ready runs, so a wake that already arrived is not lost. The drain is
///    bounded: it moves on after 64 polls in a row that finish no suspended coroutine (a
///    coroutine that reschedules itself forever does not hold it up).
/// 2. **Cancel.** Every wait still pending is cancelled: the coroutine resumes in it and
///    unwinds from there (a [`Wait::wait`](super::Wait::wait), [`Co::sleep`], a thread-pool
///    job, a `CoMutex` lock, a `CoQueue` wait), so its destructors run; a wait that starts while
///    the context cancels is cancelled at once, and so is a [`Co::reschedule`] (a coroutine
///    that keeps itself busy without ever waiting ends too). Before it unwinds, a cancelled
///    wait undoes what it set up: a `CoMutex` waiter leaves the lock's queue, or passes the
///    lock on to the next waiter if it had been handed it already (a lock is never left with a
///    coroutine that will not run, and stays usable by every other thread); a `CoQueue` waiter
///    takes its caller's lock back (its guard must hold it while the unwinding drops it),
///    leaves the queue, and
///    passes on a wake it had received. The context polls until the cancelled coroutines have
///    ended; it blocks only for waits that cannot be cancelled: a cancelled `CoQueue` waiter
///    taking its lock back, a `CoRwLock` waiter (it gets the lock in its turn and is cancelled
///    at its next wait), a section of [`Co::run_uncancellable`] in progress, whether it waits
///    or parks (reschedules) meanwhile (a storage request of `aiocoro-block`: it ends whole,
///    and the coroutine is cancelled where its next section would start), a wait in a destructor that runs while its coroutine unwinds (from
///    its cancellation or a panic of its own: a cancellation there could not unwind, and would
///    abort the process). The non-blocking polls here are bounded as in the drain. So a shutdown waits
///    for a lock that such a coroutine needs and another thread holds; if the thread that drops
///    the context holds it, that is a deadlock, as in QEMU's drain. A shutdown run by a
///    coroutine of the context (it dropped the last handle) does not block at all: it could
///    wait for itself, so it leaves those waits to step 3. A running thread-pool job is
///    waited for (it may use the coroutine's memory); a queued one is dropped unrun.
/// 3. **Down.** What is left is leaked, never resumed and never unwound: coroutines parked
///    where the shutdown cannot reach them (a `CoQueue` waiter under a
///    [`NoLock`](crate::sync::NoLock), a `CoMutex` waiter behind a holder outside every
///    coroutine of this context), waits that could not be cancelled and were not waited for
///    (above), and coroutines that keep waiting after catching their cancellation.
///    Their park records are skipped by the lock operations that find them later. A lock
///    never waits for a leaked coroutine: a `CoMutex` or `CoRwLock` waiter still queued is
///    taken out of the queue, and one that an unlock had popped already gives up what it was
///    given (its turn to take the lock, or the lock itself, which goes to the next waiter), as
///    a cancelled waiter does; so the lock stays usable by every other thread. A `CoQueue`
///    record left by a leaked waiter (cancelled, then leaked while it took its lock back) is
///    dropped by the queue's next wake, which goes to the next waiter instead; only a wake
///    that pops it while this shutdown is still running is lost with it. A leaked coroutine
///    never ends, so once the context is down its [`JoinHandle`](super::JoinHandle) reports
///    [`CANCELLED`](super::CANCELLED) instead (a worker parked on a `CoQueue` under a `NoLock`
///    when its IoThread stops does not leave its joiner waiting), unless a coroutine of the
///    context ran the shutdown. Messages and callbacks still queued are dropped, and so are
///    coroutines spawned but never started (their joiners get `CANCELLED` too).
///
/// A coroutine that panics (other than by its cancellation) during the shutdown has its panic
/// continue from the drop once the context is down. Cancellation is a panic with a private
/// payload that the context catches (no panic hook runs for it); a coroutine that catches it
/// should let it go on. Data a coroutine was told is written stays written: a cancelled
/// coroutine's own operation either completed before (and returned) or never reported
/// completion. Entering a cancelled coroutine by hand panics saying it was cancelled.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use std::{rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// // Not `Send`: the coroutine never leaves this thread.
/// let shared = Rc::new("done");
/// let s = shared.clone();
/// let sleeper = ctx.spawn(move |co| {
///     co.sleep(Duration::from_millis(1));
///     *s
/// });
/// assert_eq!(sleeper.join().unwrap(), "done");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// ```compile_fail,E0277
/// // A context stays on its home thread; other threads use an `AioHandle`.
/// let ctx = aiocoro::aio::AioContext::new().unwrap();
/// std::thread::spawn(move || ctx.poll(false));
/// ```
pub struct AioContext {
    local: Rc<Local>,
}

impl std::fmt::Debug for AioContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioContext").field("id", &self.local.shared.id).finish_non_exhaustive()
    }
}

impl AioContext {
    /// Creates the context of the calling thread.
    ///
    /// # Errors
    ///
    /// If the thread already has a context, or epoll or the eventfd cannot be created.
    pub fn new() -> io::Result<AioContext> {
        if with_current(|_| ()).is_some() {
            return Err(io::Error::other("aiocoro: this thread already has an AioContext"));
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let eventfd = sys::eventfd()?;
        let epoll = sys::epoll_create()?;
        sys::epoll_ctl(
            epoll.as_fd(),
            libc::EPOLL_CTL_ADD,
            std::os::fd::AsRawFd::as_raw_fd(&eventfd),
            libc::EPOLLIN as u32,
            NOTIFY_TOKEN,
        )?;
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            inbox: Inbox::new(),
            notify: WakeupHandshake::new(),
            eventfd,
            signalled_at: std::sync::atomic::AtomicU64::new(0),
            leak_watch: LeakWatch::default(),
        });
        let local = Rc::new(Local {
            shared,
            epoll,
            events: Cell::new(Vec::with_capacity(64)),
            handles: Cell::new(1),
            bhs: RefCell::default(),
            tasks: RefCell::default(),
            timers: RefCell::default(),
            fds: RefCell::default(),
            waits: RefCell::default(),
            parked: Cell::new(0),
            run_queue: RefCell::default(),
            adaptive: RefCell::default(),
            file_io: FileIo::default(),
            phase: Cell::new(Phase::Running),
            sections: Cell::new(0),
        });
        CURRENT.with(|current| current.set(Rc::as_ptr(&local)));
        Ok(AioContext { local })
    }

    /// A handle to this thread's context, if it has one (QEMU's
    /// `qemu_get_current_aio_context`).
    pub fn current() -> Option<AioContext> {
        with_current(|local| {
            local.handles.set(local.handles.get() + 1);
            AioContext { local: local.clone() }
        })
    }

    /// A `Send + Sync` handle that reaches this context from any thread.
    pub fn handle(&self) -> AioHandle {
        AioHandle::new(self.local.shared.clone())
    }

    /// Runs what is ready: bottom halves (and one-shots and cross-thread wakes), then ready
    /// file-descriptor handlers, then expired timers, then the coroutines woken by all of
    /// these, in wake order. With `blocking`, first waits until something is ready, at most
    /// until the nearest timer deadline. Returns whether any callback or coroutine ran
    /// (QEMU's `aio_poll`).
    ///
    /// # Panics
    ///
    /// If called from inside a coroutine: the coroutine's own context would block under it.
    pub fn poll(&self, blocking: bool) -> bool {
        assert!(
            !in_coroutine(),
            "aiocoro: AioContext::poll was called from inside a coroutine; a coroutine waits \
             with its Co (sleep, wait_readable, wakers), it never polls its own context"
        );
        self.local.poll(blocking)
    }

    /// Polls (blocking) until `condition` returns false (QEMU's `AIO_WAIT_WHILE`).
    ///
    /// Use it on a thread that waits for work done elsewhere, for example the main thread
    /// waiting for IoThreads: they make the condition false and then [`AioHandle::kick`] this
    /// context (or schedule a one-shot on it), which ends the blocking poll.
    pub fn wait_while(&self, mut condition: impl FnMut() -> bool) {
        while condition() {
            self.poll(true);
        }
    }

    /// Creates a coroutine that runs `body` in this context, from its next poll, and returns
    /// the [`JoinHandle`](super::JoinHandle) of its result (drop it to detach the coroutine).
    /// The body need not be `Send`: it never leaves this thread.
    pub fn spawn<T: 'static>(&self, body: impl FnOnce(&Co) -> T + 'static) -> super::JoinHandle<T> {
        let (body, handle) = super::join::joinable(body, self.local.shared.clone());
        self.local.spawn(body);
        handle
    }

    /// Runs `body` in a coroutine of this context to its end and returns its result; the
    /// context polls meanwhile (its other work runs too), as [`AioContext::wait_while`]. For
    /// tools, tests and `main`: code outside any coroutine that needs one.
    ///
    /// ```
    /// let ctx = aiocoro::aio::AioContext::new()?;
    /// let sum = ctx.run(|co| {
    ///     co.reschedule(); // other coroutines of the context may run here
    ///     2 + 2
    /// });
    /// assert_eq!(sum, 4);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// Inside a coroutine (the context could not run while the caller waits: call `body`
    /// there directly, or spawn and [`Co::join`]), or as `body` panics: its panic continues
    /// here with its payload.
    pub fn run<R: 'static>(&self, body: impl FnOnce(&Co) -> R + 'static) -> R {
        assert!(
            !in_coroutine(),
            "aiocoro: AioContext::run called inside a coroutine; call the body directly there"
        );
        self.spawn(body).join().unwrap_or_else(|payload| std::panic::resume_unwind(payload))
    }

    /// Creates a bottom half that runs `callback` on this thread each time it is scheduled.
    pub fn new_bh(&self, callback: impl Fn() + 'static) -> BottomHalf {
        BottomHalf::new(self.local.clone(), Rc::new(callback))
    }

    /// Runs `callback` once, in the next poll's bottom-half round.
    pub fn schedule_oneshot(&self, callback: impl FnOnce() + 'static) {
        self.local.tasks.borrow_mut().push_back(LocalTask::Oneshot(Box::new(callback)));
    }

    /// Creates a disarmed timer that runs `callback` on this thread when it fires.
    pub fn new_timer(&self, callback: impl Fn() + 'static) -> Timer {
        Timer::new(self.local.clone(), Rc::new(callback))
    }

    /// Sets (replaces) the handlers of `fd` (QEMU's `aio_set_fd_handler`); a handler with
    /// neither callback removes them. May be called from inside a handler. The caller keeps
    /// `fd` open while handlers are set.
    ///
    /// # Errors
    ///
    /// If epoll refuses the descriptor (closed, or a kind epoll cannot watch, such as a regular
    /// file); the error names the descriptor.
    pub fn set_fd_handler(&self, fd: std::os::fd::RawFd, handler: FdHandler) -> io::Result<()> {
        self.local.set_fd_handler(fd, handler)
    }

    /// Removes the handlers of `fd`; coroutines waiting on it keep waiting.
    pub fn remove_fd_handler(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.local.set_fd_handler(fd, FdHandler::new())
    }

    /// Turns adaptive busy polling on (`Some`) or off (`None`, the default): before blocking,
    /// `poll` spins for a window of up to `max_ns` checking for work, and grows or shrinks the
    /// window as QEMU does.
    pub fn set_adaptive_polling(&self, polling: Option<AdaptivePolling>) {
        *self.local.adaptive.borrow_mut() = polling;
    }

    /// The current busy-polling window in nanoseconds (0 when off).
    pub fn polling_window_ns(&self) -> u64 {
        self.local.adaptive.borrow().as_ref().map_or(0, AdaptivePolling::window_ns)
    }

    /// Stops accepting new work from other threads: from now on their one-shots and spawns are
    /// refused ([`ContextClosed`](super::ContextClosed)). What was accepted before still runs
    /// in the following polls, and the wakes and BH schedules it needs from other threads still
    /// get through until the context shuts down, so `close` and then polling until idle loses
    /// nothing; [`IoThread`](super::IoThread) stops this way.
    pub fn close(&self) {
        self.local.shared.inbox.close();
    }

    /// How many coroutines are suspended in a wait of this context.
    pub fn suspended_coroutines(&self) -> usize {
        self.local.suspended()
    }

    /// Polls without blocking until nothing is left to run, or until [`STALL_POLLS`] polls in
    /// a row leave no less to do than before (suspended coroutines, runnable ones, queued
    /// tasks): what keeps itself busy forever (a coroutine that reschedules itself, a future
    /// that wakes itself, a BH that schedules itself) does not hold it up. For a stop that runs
    /// what was accepted before it, then drops the context (whose shutdown cancels the rest).
    pub(crate) fn poll_until_settled(&self) {
        let mut stall = Stall::new(self.local.backlog());
        while !stall.given_up() && self.poll(false) {
            stall.record(self.local.backlog());
        }
    }
}

impl Clone for AioContext {
    fn clone(&self) -> AioContext {
        self.local.handles.set(self.local.handles.get() + 1);
        AioContext { local: self.local.clone() }
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        let handles = self.local.handles.get() - 1;
        self.local.handles.set(handles);
        if handles == 0 {
            self.local.shut_down();
        }
    }
}

impl Local {
    /// [`AioContext::poll`], for a caller outside every coroutine (or the shutdown).
    fn poll(&self, blocking: bool) -> bool {
        let mut events = self.events.take();
        if events.capacity() == 0 {
            events.reserve(64);
        }
        let started = clock_ns();
        let submitted = self.file_io.submit_queued();
        let may_block = blocking && submitted && !self.busy_poll();
        let timeout = if may_block { self.timeout() } else { Some(Duration::ZERO) };
        {
            let mut blocker = EpollBlocker { local: self, events: &mut events };
            if may_block {
                crate::sync::presence::blocking();
            }
            self.shared.notify.wait(&mut blocker, may_block, timeout, || self.has_work());
            crate::sync::presence::running();
        }
        if blocking {
            self.adapt_polling(started);
        }
        let mut progress = self.run_bottom_halves();
        progress |= self.dispatch_fds(&events);
        progress |= self.run_timers();
        progress |= self.run_coroutines();
        events.clear();
        self.events.set(events);
        progress
    }

    /// Whether the context cancels its suspended coroutines (it is shutting down): a new
    /// cancellable wait is cancelled at once.
    pub(crate) fn is_cancelling(&self) -> bool {
        self.phase.get() == Phase::Draining { cancelling: true }
    }

    fn spawn(self: &Rc<Self>, body: impl FnOnce(&Co) + 'static) {
        self.run_queue.borrow_mut().push_back(RunItem::Start(Coroutine::new(body)));
    }

    /// How many coroutines are suspended in a wait or a park of this context.
    fn suspended(&self) -> usize {
        self.waits.borrow().len() + self.parked.get()
    }

    /// Marks the suspension under `key` woken, if it still waits, and queues its coroutine.
    pub(crate) fn deliver(&self, key: Key, reason: WakeReason) {
        let mut waits = self.waits.borrow_mut();
        if let Some(state) = waits.get_mut(key)
            && state.deliver(reason)
        {
            self.run_queue.borrow_mut().push_back(RunItem::Resume(key));
        }
    }

    /// Marks the suspension under `key` woken, if it still waits, and returns its coroutine
    /// for the caller to enter right away instead of queueing it (QEMU's `aio_co_wake` outside
    /// any coroutine). For callers outside every coroutine, which must not use this `Local`
    /// after the enter: the coroutine may drop the context's last handle and free it.
    pub(crate) fn deliver_for_enter(&self, key: Key, reason: WakeReason) -> Option<Coroutine> {
        let mut waits = self.waits.borrow_mut();
        let state = waits.get_mut(key)?;
        state.deliver(reason).then(|| state.coroutine.clone())
    }

    pub(crate) fn set_fd_handler(
        &self,
        fd: std::os::fd::RawFd,
        handler: FdHandler,
    ) -> io::Result<()> {
        let (unset, result) = self.fds.borrow_mut().set_handler(self.epoll.as_fd(), fd, handler);
        // Dropped after the table's borrow ends: its callbacks may own values whose drops set
        // handlers too.
        drop(unset);
        result
    }

    pub(crate) fn add_fd_waiter(
        &self,
        fd: std::os::fd::RawFd,
        writable: bool,
        waker: super::wait::LocalWaker,
    ) -> io::Result<()> {
        self.fds.borrow_mut().add_waiter(self.epoll.as_fd(), fd, writable, waker)
    }

    pub(crate) fn new_timer(self: &Rc<Self>, callback: Rc<dyn Fn()>) -> Timer {
        Timer::new(self.clone(), callback)
    }

    /// Whether a poll would make progress without waiting.
    fn has_work(&self) -> bool {
        !self.shared.inbox.is_empty()
            || !self.tasks.borrow().is_empty()
            || !self.run_queue.borrow().is_empty()
            || self.timers.borrow_mut().next_deadline().is_some_and(|d| d <= clock_ns())
    }

    /// How long a blocking poll may wait: until the nearest timer, or forever.
    fn timeout(&self) -> Option<Duration> {
        let deadline = self.timers.borrow_mut().next_deadline()?;
        Some(Duration::from_nanos(deadline.saturating_sub(clock_ns())))
    }

    /// Spins for the adaptive window; returns whether work showed up. With
    /// [`AdaptivePolling::pause_while_preempted`], spins not at all while the thread keeps
    /// being preempted.
    ///
    /// While this thread spins, its own code runs nothing, so its bottom halves, run queue and
    /// timers cannot change: the spin looks only at what other threads and the kernel can
    /// bring (the inbox and io_uring completions), and reads the clock (a vDSO call that costs
    /// as much as many looks) only every [`LOOKS_PER_CLOCK_READ`] looks, for the window and the
    /// nearest timer both.
    fn busy_poll(&self) -> bool {
        let window = match self.adaptive.borrow_mut().as_mut() {
            Some(polling) if polling.window_ns() > 0 => {
                if polling.watches_preemptions()
                    && polling.record_preemptions(sys::involuntary_switches())
                {
                    return false;
                }
                polling.window_ns()
            }
            _ => return false,
        };
        if self.has_work() {
            return true;
        }
        let start = clock_ns();
        let timer_due = self.timers.borrow_mut().next_deadline();
        loop {
            for _ in 0..LOOKS_PER_CLOCK_READ {
                if !self.shared.inbox.is_empty() || self.file_io.completions_ready() {
                    return true;
                }
                std::hint::spin_loop();
            }
            let now = clock_ns();
            if timer_due.is_some_and(|due| due <= now) {
                return true;
            }
            if now - start >= window {
                return false;
            }
        }
    }

    /// Adapts the polling window to the poll that started at `started` (`clock_ns`).
    fn adapt_polling(&self, started: u64) {
        if let Some(polling) = self.adaptive.borrow_mut().as_mut() {
            let blocked_ns = clock_ns().saturating_sub(started);
            // A signal from an earlier poll says nothing about this one.
            let signalled_at = self.shared.signalled_at.load(std::sync::atomic::Ordering::Relaxed);
            let work_after_ns = signalled_at.checked_sub(started);
            polling.record_wait(blocked_ns, work_after_ns);
        }
    }

    /// Runs the messages from other threads, then the home thread's own BHs and one-shots.
    fn run_bottom_halves(self: &Local) -> bool {
        // The messages go to the front of the local queue before any of them runs, and each
        // task leaves the queue only as it runs: a callback that panics ends this poll but
        // takes no other message with it (a lost wake would strand its coroutine, a lost BH
        // message would leave the BH pending for good).
        let messages = self.shared.inbox.take_all();
        if !messages.is_empty() {
            let mut tasks = self.tasks.borrow_mut();
            let own = tasks.len();
            tasks.extend(messages.into_iter().map(LocalTask::from));
            tasks.rotate_left(own);
        }
        let mut progress = false;
        let queued = self.tasks.borrow().len();
        for _ in 0..queued {
            let Some(task) = self.tasks.borrow_mut().pop_front() else { break };
            match task {
                LocalTask::Bh(bh) => progress |= self.run_bh(&bh),
                LocalTask::Oneshot(callback) => {
                    callback();
                    progress = true;
                }
                LocalTask::Wake(key, reason) => self.deliver(key, reason),
                LocalTask::Spawn(body) => {
                    let coroutine = Coroutine::new(move |co| body(co));
                    self.run_queue.borrow_mut().push_back(RunItem::Start(coroutine));
                }
            }
        }
        progress
    }

    fn run_bh(&self, bh: &BhCore) -> bool {
        let Some(key) = bh.take() else { return false };
        let callback = self.bhs.borrow().get(key).cloned();
        match callback {
            Some(callback) => {
                callback();
                true
            }
            None => false,
        }
    }

    fn dispatch_fds(&self, events: &[libc::epoll_event]) -> bool {
        let mut progress = false;
        for event in events {
            let (token, flags) = (event.u64, event.events);
            if token == NOTIFY_TOKEN {
                continue;
            }
            let ready = self.fds.borrow_mut().take_ready(self.epoll.as_fd(), token, flags);
            progress |= ready.run(self);
        }
        progress
    }

    fn run_timers(&self) -> bool {
        let now = clock_ns();
        let mut progress = false;
        loop {
            let callback = self.timers.borrow_mut().pop_expired(now);
            let Some(callback) = callback else { break };
            callback();
            progress = true;
        }
        progress
    }

    /// Enters queued coroutines in queue order, including those they wake, until the queue is
    /// empty or [`RUN_BUDGET`] coroutines ran (so that a chain of wakes cannot starve the
    /// other sources).
    pub(crate) fn run_coroutines(&self) -> bool {
        let mut entered = false;
        let dispatch = Dispatch::begin();
        for _ in 0..RUN_BUDGET {
            let Some(item) = self.run_queue.borrow_mut().pop_front() else { break };
            let coroutine = match item {
                // Nobody else holds a coroutine the context has not started (spawning returns a
                // `JoinHandle`), so nothing can have entered it by hand.
                RunItem::Start(coroutine) => coroutine,
                RunItem::Resume(key) => {
                    let coroutine = match self.waits.borrow().get(key) {
                        Some(state) if state.delivered.is_some() => state.coroutine.clone(),
                        _ => continue,
                    };
                    if coroutine.is_ended() {
                        // A wait of it is still in the table, so its `Wait` was never dropped.
                        self.forgotten_wait(coroutine);
                    }
                    coroutine
                }
                RunItem::Unpark(coroutine) => {
                    // Ending the park here, and only here, keeps a stray `enter` from ending it
                    // early (the parked coroutine yields again until it finds `Idle`).
                    let park = coroutine.park_state();
                    debug_assert_eq!(
                        park.get(),
                        ParkState::Woken,
                        "aiocoro: a parked coroutine's run item found it not Woken: a ParkRecord \
                         goes Parked -> Woken (one unpark, one run item) -> Idle"
                    );
                    park.set(ParkState::Idle);
                    self.parked.set(self.parked.get() - 1);
                    coroutine
                }
            };
            dispatch.enter(&coroutine);
            entered = true;
        }
        entered
    }

    /// A wake reached a wait whose coroutine has ended: the `Wait` was leaked. Drops its
    /// entries (they hold the coroutine) and panics naming the misuse.
    #[cold]
    #[inline(never)]
    fn forgotten_wait(&self, coroutine: Coroutine) -> ! {
        let stale = self.waits.borrow_mut().remove_where(|state| state.coroutine == coroutine);
        drop(stale);
        panic!(
            "aiocoro: coroutine #{} ended while a Wait of it was still registered (the Wait was \
             leaked, e.g. with mem::forget), and a waker then woke that Wait; a Wait must be \
             waited on or dropped by the coroutine that prepared it",
            coroutine.id()
        );
    }

    /// The last `AioContext` handle is gone: finishes the suspended coroutines (see
    /// [`AioContext`]'s shutdown), then drops what is still queued. A coroutine that panicked
    /// meanwhile (other than by its cancellation) has its panic continue here, once the
    /// context is down.
    fn shut_down(&self) {
        if self.phase.get() != Phase::Running {
            // A handle made and dropped while the context shuts down.
            return;
        }
        // No new work from other threads; wakes still get in.
        self.shared.inbox.close();
        let panic = self.finish_suspended();
        self.phase.set(Phase::Down);
        CURRENT.with(|current| {
            if ptr::eq(current.get(), self) {
                current.set(ptr::null());
            }
        });
        self.shared.inbox.shut();
        // Unstarted coroutines and pending callbacks are dropped with the queues, except the
        // run items of coroutines handed a park (a coroutine left there can never run: its item
        // is leaked, see `ParkRecord::unpark`).
        let run_queue = std::mem::take(&mut *self.run_queue.borrow_mut());
        for item in run_queue {
            match item {
                RunItem::Unpark(coroutine) => std::mem::forget(coroutine),
                other => drop(other),
            }
        }
        drop(std::mem::take(&mut *self.tasks.borrow_mut()));
        drop(self.shared.inbox.take_all());
        self.abandon_leaked_waits();
        // Every coroutine has ended now, or was dropped unstarted, or is leaked: the joiners
        // still waiting wait for leaked ones. Not from inside a coroutine of the context,
        // which has yet to end (and so may the coroutines that entered it).
        if !in_coroutine() {
            self.shared.leak_watch.settle();
        }
        // The ring goes with its context, once the kernel is done with what it still holds.
        self.file_io.close(self);
        if let Some(panic) = panic
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }

    /// Tells the locks that queued the waits still registered here (their coroutines will never
    /// run again) to abandon them (see [`Abandon`](super::wait::Abandon)), so that no lock waits
    /// for one of them: once the context is down, when no wake can reach them any more.
    ///
    /// A wake such a wait received already (its run item was dropped unrun) is voided: what it
    /// was for (a turn, a lock) is given up by the abandon, so the wait must never end. Nothing
    /// delivers to a context that is down, so a stray `enter` of its coroutine finds it still
    /// waiting and yields at once.
    fn abandon_leaked_waits(&self) {
        let leaked = self.waits.borrow_mut().keys_where(|state| state.on_leak.is_some());
        for key in leaked {
            let on_leak = self.waits.borrow_mut().get_mut(key).and_then(|state| {
                state.delivered = None;
                state.on_leak.take()
            });
            if let Some(on_leak) = on_leak {
                on_leak.abandon(WaitId::Context { shared: Arc::as_ptr(&self.shared), key });
            }
        }
    }

    /// Drains, then cancels, the coroutines suspended in this context; returns the first
    /// panic (other than a cancellation) that a coroutine raised meanwhile.
    fn finish_suspended(&self) -> Option<Box<dyn std::any::Any + Send>> {
        let mut panic = None;
        // Drain: run what is ready.
        self.phase.set(Phase::Draining { cancelling: false });
        self.poll_while_finishing(&mut panic);
        if self.suspended() == 0 {
            return panic;
        }
        // Cancel: every cancellable wait, and every one that starts from now on, unwinds its
        // coroutine. Coroutines parked on a lock hand-over get the lock when its holder
        // unwinds, and are cancelled at their next wait.
        self.phase.set(Phase::Draining { cancelling: true });
        let cancelled = self.waits.borrow_mut().keys_where(|state| state.cancel());
        self.run_queue.borrow_mut().extend(cancelled.into_iter().map(RunItem::Resume));
        loop {
            self.poll_while_finishing(&mut panic);
            // Stuck without waiting. Only uncancellable waits (locks that unwinding coroutines
            // retake for their callers' guards, ...) and sections in progress (which may park
            // rather than wait: a section that reschedules until another thread's work is done)
            // are worth waiting for; a blocking poll from inside a coroutine could wait for
            // that very coroutine.
            if self.suspended() == 0
                || (self.uncancellable_waits() == 0 && self.sections.get() == 0)
                || in_coroutine()
            {
                return panic;
            }
            self.poll_for_shutdown(true, &mut panic);
        }
    }

    /// Polls without blocking while coroutines are suspended and that makes progress, but
    /// gives up after [`STALL_POLLS`] polls in a row that finished no suspended coroutine (one
    /// that reschedules itself forever must not hold the shutdown up).
    fn poll_while_finishing(&self, panic: &mut Option<Box<dyn std::any::Any + Send>>) {
        let mut stall = Stall::new(self.suspended());
        while stall.fewest > 0 && !stall.given_up() && self.poll_for_shutdown(false, panic) {
            stall.record(self.suspended());
        }
    }

    /// What is left to do: suspended coroutines, runnable ones and queued tasks.
    fn backlog(&self) -> usize {
        self.suspended() + self.run_queue.borrow().len() + self.tasks.borrow().len()
    }

    /// One poll during the shutdown; a coroutine's panic is caught (a cancellation's for
    /// good, any other kept in `panic` if it is the first) and counts as progress.
    fn poll_for_shutdown(
        &self,
        blocking: bool,
        panic: &mut Option<Box<dyn std::any::Any + Send>>,
    ) -> bool {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll(blocking))) {
            Ok(progress) => progress,
            Err(payload) => {
                if !payload.is::<crate::coroutine::Cancelled>() && panic.is_none() {
                    *panic = Some(payload);
                }
                true
            }
        }
    }

    /// How many waits the shutdown cannot cancel that still wait.
    fn uncancellable_waits(&self) -> usize {
        self.waits.borrow().count_where(|state| state.delivered.is_none() && !state.cancellable)
    }
}

/// The polls in a row that left a measure of outstanding work no lower than it had been: a
/// bounded drain gives up after [`STALL_POLLS`] of them.
struct Stall {
    /// The lowest the measure has been.
    fewest: usize,
    /// Polls since it last fell.
    polls: u32,
}

impl Stall {
    fn new(now: usize) -> Stall {
        Stall { fewest: now, polls: 0 }
    }

    /// Counts a poll after which the measure is `now`.
    fn record(&mut self, now: usize) {
        if now < self.fewest {
            self.fewest = now;
            self.polls = 0;
        } else {
            self.polls += 1;
        }
    }

    fn given_up(&self) -> bool {
        self.polls >= STALL_POLLS
    }
}

/// Blocks in `epoll_wait` on the context's descriptors and its eventfd.
struct EpollBlocker<'a> {
    local: &'a Local,
    events: &'a mut Vec<libc::epoll_event>,
}

impl Blocker for EpollBlocker<'_> {
    fn block(&mut self, timeout: Option<Duration>) -> bool {
        let capacity = self.events.capacity();
        self.events.resize(capacity, libc::epoll_event { events: 0, u64: 0 });
        let ready = sys::epoll_wait(self.local.epoll.as_fd(), self.events, timeout)
            .unwrap_or_else(|error| panic!("aiocoro: epoll_wait failed: {error}"));
        self.events.truncate(ready);
        self.events.iter().any(|event| event.u64 == NOTIFY_TOKEN)
    }

    fn reset_event(&mut self) {
        let _ = sys::eventfd_drain(self.local.shared.eventfd.as_fd());
    }
}
