//! `AioContext`: one thread's event loop (QEMU's `AioContext` and `aio_poll`).

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
use super::fd::{FdHandler, FdTable};
use super::handle::AioHandle;
use super::inbox::Inbox;
use super::notify::{Blocker, NotifyState};
use super::timer::{Timer, TimerQueue, clock_ns};
use super::wait::{WaitState, WakeReason};
use crate::coroutine::{Co, Coroutine, Park, in_coroutine};
use crate::sys;

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
    /// Resume this unparked coroutine (see [`Parked`](super::wait::Parked)).
    Unpark(Coroutine),
}

/// The part of a context that any thread may touch.
pub(crate) struct Shared {
    /// Distinguishes contexts, so a stale local waker cannot reach a later context.
    pub(crate) id: u64,
    pub(crate) inbox: Inbox<Message>,
    pub(crate) notify: NotifyState,
    /// Signalled to wake the home thread from `epoll_wait`.
    eventfd: OwnedFd,
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
        // An error here means the eventfd is gone, which only happens once the context is.
        let _ = sys::eventfd_signal(self.eventfd.as_fd());
    }

    /// Whether the context refuses new work (it was closed or shut down).
    pub(crate) fn is_closed(&self) -> bool {
        self.inbox.is_closed()
    }

    /// Queues a pending BH: on the home thread in the local queue, elsewhere through the inbox
    /// (a context that has shut down drops it).
    pub(crate) fn enqueue_bh(&self, bh: Arc<BhCore>) {
        match home_local(self) {
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
    /// [`Parked`](super::wait::Parked)): suspended like those of `waits`.
    pub(crate) parked: Cell<usize>,
    pub(crate) run_queue: RefCell<VecDeque<RunItem>>,
    pub(crate) adaptive: RefCell<Option<AdaptivePolling>>,
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
pub(crate) unsafe fn with_current_brief<R>(f: impl FnOnce(&Local) -> R) -> Option<R> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer is this thread's live `Local`,
    // which the caller's `f` cannot drop.
    unsafe { local.as_ref() }.map(f)
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
/// any user code (a callback, a coroutine) may do. Callers use it only for bookkeeping that
/// runs no user code, and never after such a call; where the context must outlive a call into
/// user code, take a counted handle with [`with_current`].
pub(crate) fn home_local(shared: &Shared) -> Option<&Local> {
    let local = CURRENT.try_with(Cell::get).ok()?;
    // SAFETY: by the invariant on `CURRENT`, a non-null pointer is a live `Local` of this
    // thread, and it stays alive until its last handle is dropped, which only user code can
    // do; callers run none while they use the reference (see above). `shared` does not keep
    // it alive (a `Shared` outlives its `Local` in wakers): the lifetime only ties the
    // reference to the caller's short use.
    let local = unsafe { local.as_ref() }?;
    ptr::eq(Arc::as_ptr(&local.shared), shared).then_some(local)
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
/// Dropping the last handle (clones share one context) shuts the context down; that panics if
/// coroutines are still suspended in it, because they could never be resumed. Messages that
/// other threads sent and no poll ran yet are dropped then; [`AioContext::close`] and a last
/// round of polls avoid that.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use std::{cell::Cell, rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let done = Rc::new(Cell::new(false));
/// let d = done.clone();
/// ctx.spawn(move |co| {
///     co.sleep(Duration::from_millis(1));
///     d.set(true);
/// });
/// ctx.wait_while(|| !done.get());
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
            notify: NotifyState::new(),
            eventfd,
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
        let local = &*self.local;
        let mut events = local.events.take();
        if events.capacity() == 0 {
            events.reserve(64);
        }
        let started = clock_ns();
        let submitted = super::uring::submit_queued();
        let may_block = blocking && submitted && !local.busy_poll();
        let timeout = if may_block { local.timeout() } else { Some(Duration::ZERO) };
        {
            let mut blocker = EpollBlocker { local, events: &mut events };
            if may_block {
                crate::sync::presence::blocking();
            }
            local.shared.notify.wait(&mut blocker, may_block, timeout, || local.has_work());
            crate::sync::presence::running();
        }
        if blocking {
            local.adapt_polling(clock_ns() - started);
        }
        let mut progress = local.run_bottom_halves();
        progress |= local.dispatch_fds(&events);
        progress |= local.run_timers();
        progress |= local.run_coroutines();
        events.clear();
        local.events.set(events);
        progress
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
    /// a handle to it. The body need not be `Send`: it never leaves this thread.
    pub fn spawn(&self, body: impl FnOnce(&Co) + 'static) -> Coroutine {
        self.local.spawn(body)
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
    fn spawn(self: &Rc<Self>, body: impl FnOnce(&Co) + 'static) -> Coroutine {
        let coroutine = Coroutine::new(body);
        self.run_queue.borrow_mut().push_back(RunItem::Start(coroutine.clone()));
        coroutine
    }

    /// How many coroutines are suspended in a wait or a park of this context.
    fn suspended(&self) -> usize {
        self.waits.borrow().len() + self.parked.get()
    }

    /// Marks the suspension under `key` woken, if it still waits, and queues its coroutine.
    pub(crate) fn deliver(&self, key: Key, reason: WakeReason) {
        let mut waits = self.waits.borrow_mut();
        if let Some(state) = waits.get_mut(key) {
            if state.deliver(reason) {
                self.run_queue.borrow_mut().push_back(RunItem::Resume(key));
            }
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

    fn set_fd_handler(&self, fd: std::os::fd::RawFd, handler: FdHandler) -> io::Result<()> {
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
        let start = clock_ns();
        while clock_ns() - start < window {
            if self.has_work() || super::uring::completions_ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    fn adapt_polling(&self, blocked_ns: u64) {
        if let Some(polling) = self.adaptive.borrow_mut().as_mut() {
            polling.record_block(blocked_ns);
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
        for _ in 0..RUN_BUDGET {
            let Some(item) = self.run_queue.borrow_mut().pop_front() else { break };
            let coroutine = match item {
                RunItem::Start(coroutine) => coroutine,
                RunItem::Resume(key) => match self.waits.borrow().get(key) {
                    Some(state) if state.delivered.is_some() => state.coroutine.clone(),
                    _ => continue,
                },
                RunItem::Unpark(coroutine) => {
                    // Ending the park here, and only here, keeps a stray `enter` from ending it
                    // early (the parked coroutine yields again until it finds `Idle`).
                    let park = coroutine.park_state();
                    debug_assert_eq!(
                        park.get(),
                        Park::Woken,
                        "aiocoro: a parked coroutine's run item found it not Woken: a Parked \
                         record goes Parked -> Woken (one unpark, one run item) -> Idle"
                    );
                    park.set(Park::Idle);
                    self.parked.set(self.parked.get() - 1);
                    coroutine
                }
            };
            coroutine.enter();
            entered = true;
        }
        entered
    }

    /// The last `AioContext` handle is gone.
    fn shut_down(&self) {
        CURRENT.with(|current| {
            if ptr::eq(current.get(), self) {
                current.set(ptr::null());
            }
        });
        self.shared.inbox.shut();
        let suspended = self.suspended();
        // Unstarted coroutines and pending callbacks are dropped with the queues.
        drop(std::mem::take(&mut *self.run_queue.borrow_mut()));
        drop(std::mem::take(&mut *self.tasks.borrow_mut()));
        drop(self.shared.inbox.take_all());
        if suspended > 0 && !std::thread::panicking() {
            panic!(
                "aiocoro: an AioContext was dropped with {suspended} coroutine(s) still \
                 suspended in it; they could never be resumed (wake them and poll until they \
                 end before dropping the context)"
            );
        }
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
