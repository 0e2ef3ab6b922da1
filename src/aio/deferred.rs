//! Cross-thread wakes issued by a coroutine that a context dispatches signal their context when
//! that coroutine yields or ends, not at once.
//!
//! A coroutine that wakes a waiter of another thread usually does it under a lock (a
//! `CoQueue::next` takes the guard), and the wake's message reaches the other context's inbox
//! at once. What waits is only the signal of a context that is blocked in its poll (the
//! eventfd write): written at once, it lets the woken thread preempt the waker on a busy CPU
//! while the waker still holds the lock, and the woken coroutine then finds the lock held by a
//! thread that does not run. Written when the waker yields, it wakes the other thread once per
//! batch of wakes, after the lock was let go. A context that is not blocked (running, or busy
//! polling) sees the message as soon as it looks, signal or not.
//!
//! The rule: a signal is deferred only while a [`Dispatch`] runs on the thread (a context
//! entering the coroutines of its run queue, or a `CoQueue` entering the waiters it woke), and
//! every signal deferred is written when the dispatch gets control back from the coroutine it
//! entered, also when that coroutine panics; so nothing is left unsignalled when the thread
//! goes back to its poll or to any other code. A coroutine entered by hand with
//! `Coroutine::enter` outside a dispatch signals at once, which keeps the coroutine switch free
//! of this bookkeeping. The cost: a dispatched coroutine that runs on for long after such a
//! wake without yielding delays the wake-up of a sleeping context by as much, as it delays the
//! coroutines it wakes on its own thread.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Arc;

use super::context::Shared;
use crate::coroutine::{Coroutine, in_coroutine};

thread_local! {
    /// The contexts this thread's coroutines sent wakes to since the last flush, each once.
    static PENDING: RefCell<Vec<Arc<Shared>>> = const { RefCell::new(Vec::new()) };
    /// [`PENDING_BIT`] when `PENDING` may be non-empty (a cheap check for the common case),
    /// plus [`ONE_DISPATCH`] for every [`Dispatch`] running on this thread (one inside a
    /// coroutine that another dispatched counts again). One word, so that a dispatch's start
    /// and end touch one thread-local.
    static STATE: Cell<u32> = const { Cell::new(0) };
}

/// The bit of `STATE` that says a signal may be waiting.
const PENDING_BIT: u32 = 1;
/// What a running [`Dispatch`] adds to `STATE`.
const ONE_DISPATCH: u32 = 2;

/// Remembers that `shared` received a message whose signal waits for the next [`flush`].
/// Only called when [`may_defer`] said so.
pub(crate) fn defer(shared: Arc<Shared>) {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if !pending.iter().any(|known| Arc::ptr_eq(known, &shared)) {
            pending.push(shared);
        }
    });
    STATE.set(STATE.get() | PENDING_BIT);
}

/// Whether a wake's signal may wait for a [`flush`]: the caller is a coroutine that a running
/// [`Dispatch`] entered (directly, or through coroutines it entered), so the dispatch flushes
/// when control comes back to it.
#[inline]
pub(crate) fn may_defer() -> bool {
    STATE.get() >= ONE_DISPATCH && in_coroutine()
}

/// Signals every context a wake was deferred for (those that may be blocked).
#[cold]
#[inline(never)]
fn flush() {
    STATE.set(STATE.get() & !PENDING_BIT);
    // Taken out first: signalling runs no user code, but keep the borrow short anyway.
    let pending = PENDING.with(|pending| std::mem::take(&mut *pending.borrow_mut()));
    for shared in pending {
        shared.signal_if_needed();
    }
}

/// The runtime entering coroutines on a context's behalf: while a dispatch lives, the
/// cross-thread wakes of the coroutines it enters (and of those they enter) defer their
/// signals, which the dispatch writes once the coroutine is back from each entry, or when a
/// panic unwinds through it.
pub(crate) struct Dispatch {
    _not_send: PhantomData<*const ()>,
}

impl Dispatch {
    /// Starts a dispatch on this thread.
    #[inline(always)]
    pub(crate) fn begin() -> Dispatch {
        STATE.set(STATE.get() + ONE_DISPATCH);
        Dispatch { _not_send: PhantomData }
    }

    /// Enters `coroutine`, then writes the signals it deferred.
    #[inline(always)]
    pub(crate) fn enter(&self, coroutine: &Coroutine) {
        coroutine.enter();
        if STATE.get() & PENDING_BIT != 0 {
            flush();
        }
    }
}

impl Drop for Dispatch {
    /// Ends the dispatch, writing the signals still deferred (after a panic).
    #[inline(always)]
    fn drop(&mut self) {
        let state = STATE.get() - ONE_DISPATCH;
        STATE.set(state);
        if state & PENDING_BIT != 0 {
            flush();
        }
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::rc::Rc;
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use crate::aio::{AioContext, AioHandle, IoThread};
    use crate::coroutine::{Co, Coroutine};
    use crate::sync::presence::{self, Seen};
    use crate::sync::{CoMutex, CoQueue, NoLock};

    type Flag = Arc<(CoMutex<bool>, CoQueue)>;

    /// An IoThread blocked in its poll, with a coroutine there waiting for `flag`.
    struct BlockedWaiter {
        iothread: IoThread,
        flag: Flag,
        /// Gets a message when the waiter has seen the flag set.
        woken: mpsc::Receiver<()>,
        /// The IoThread's eventfd writes once it was blocked.
        before: u64,
    }

    impl BlockedWaiter {
        fn new(name: &str) -> BlockedWaiter {
            let iothread = IoThread::spawn(name).unwrap();
            let flag: Flag = Arc::new((CoMutex::new(false), CoQueue::new()));
            let (tx, woken) = mpsc::channel();
            let (thread_tx, thread_rx) = mpsc::channel();
            let f = flag.clone();
            let waiter = move |co: &Co| {
                thread_tx.send(presence::this_thread()).unwrap();
                let (set, queue) = &*f;
                let mut set = set.lock(co);
                while !*set {
                    queue.wait(co, &mut set);
                }
                tx.send(()).unwrap();
            };
            iothread.handle().spawn(waiter).unwrap();
            let thread = thread_rx.recv().unwrap();
            while presence::seen(thread) != Seen::Blocked {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Past the last look for work, into `epoll_wait` (nothing else wakes it).
            std::thread::sleep(Duration::from_millis(20));
            let before = iothread.handle().eventfd_writes();
            BlockedWaiter { iothread, flag, woken, before }
        }

        fn handle(&self) -> AioHandle {
            self.iothread.handle().clone()
        }

        /// Checks that the waiter saw the flag, and stops the IoThread.
        fn finish(self) {
            self.woken.recv_timeout(Duration::from_secs(30)).expect("the waiter was never woken");
            self.iothread.stop();
        }
    }

    /// Sets `flag` and wakes its waiter, holding the flag's mutex meanwhile.
    fn raise(co: &Co, flag: &Flag) {
        let (set, queue) = &**flag;
        let mut set = set.lock(co);
        *set = true;
        assert!(queue.next(&mut set), "the waiter was not queued");
    }

    #[test]
    fn a_coqueue_wake_signals_a_blocked_context_when_the_waker_yields_not_under_the_lock() {
        let blocked = BlockedWaiter::new("deferred-yield");
        let (flag, handle, before) = (blocked.flag.clone(), blocked.handle(), blocked.before);
        let ctx = AioContext::new().unwrap();
        let waker = ctx.spawn(move |co| {
            raise(co, &flag);
            assert_eq!(handle.eventfd_writes(), before, "signalled before the waker yielded");
            co.reschedule();
            assert_eq!(handle.eventfd_writes(), before + 1, "not signalled when it yielded");
        });
        // The assertions run in the coroutine: its panic is the join's error.
        waker.join().expect("the waker's checks failed");
        blocked.finish();
    }

    #[test]
    fn a_coqueue_wake_signals_a_blocked_context_when_the_waker_panics() {
        let blocked = BlockedWaiter::new("deferred-panic");
        let flag = blocked.flag.clone();
        let ctx = AioContext::new().unwrap();
        // Detached, so that its panic unwinds out of the coroutine and on from the poll.
        drop(ctx.spawn(move |co| {
            raise(co, &flag);
            panic!("the waker fails after its wake");
        }));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ctx.wait_while(|| true);
        }));
        assert!(outcome.is_err(), "the waker's panic reaches the poll");
        blocked.finish();
    }

    #[test]
    fn a_wake_from_a_coroutine_entered_by_hand_is_signalled_at_once() {
        let blocked = BlockedWaiter::new("deferred-by-hand");
        let (flag, handle, before) = (blocked.flag.clone(), blocked.handle(), blocked.before);
        let waker = Coroutine::new(move |co| {
            raise(co, &flag);
            // No dispatch runs this coroutine, so nothing would write a deferred signal.
            assert_eq!(handle.eventfd_writes(), before + 1, "the wake's signal was deferred");
            co.yield_now();
        });
        waker.enter();
        blocked.finish();
        drop(waker);
    }

    #[test]
    fn a_coroutine_entered_by_coqueue_enter_next_defers_its_wakes_until_it_yields() {
        let blocked = BlockedWaiter::new("deferred-enter-next");
        let (flag, handle, before) = (blocked.flag.clone(), blocked.handle(), blocked.before);
        let ctx = AioContext::new().unwrap();
        let local = Rc::new((NoLock::new(()), CoQueue::new()));
        let l = local.clone();
        let waker = ctx.spawn(move |co| {
            let (lock, local_queue) = &*l;
            let mut guard = lock.lock(co);
            local_queue.wait(co, &mut guard);
            drop(guard);
            raise(co, &flag);
            assert_eq!(handle.eventfd_writes(), before, "signalled before the waker yielded");
        });
        while ctx.poll(false) {}
        let (lock, local_queue) = &*local;
        let mut guard = lock.lock_blocking();
        assert!(local_queue.enter_next(&mut guard));
        drop(guard);
        assert!(waker.is_finished());
        waker.join().expect("the waker's checks failed");
        assert_eq!(
            blocked.handle().eventfd_writes(),
            before + 1,
            "not signalled when the coroutine enter_next entered ended"
        );
        blocked.finish();
    }

    #[test]
    fn a_wake_from_a_destructor_of_a_coroutine_dropped_while_suspended_is_signalled_at_once() {
        /// Sets the flag and wakes its waiter when dropped.
        struct WakeOnDrop<'a>(&'a Co, Flag);
        impl Drop for WakeOnDrop<'_> {
            fn drop(&mut self) {
                raise(self.0, &self.1);
            }
        }
        let blocked = BlockedWaiter::new("deferred-drop");
        let (flag, before) = (blocked.flag.clone(), blocked.before);
        let waker = Coroutine::new(move |co| {
            let _wake = WakeOnDrop(co, flag);
            co.yield_now();
        });
        waker.enter();
        // The last handle: the stack unwinds, the destructor wakes the waiter, and control is
        // back outside every coroutine, so the signal must have been written.
        drop(waker);
        assert_eq!(blocked.handle().eventfd_writes(), before + 1, "the wake was left unsignalled");
        blocked.finish();
    }
}
