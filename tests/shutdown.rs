//! Shutting a context down with coroutines still suspended is a defined path (see
//! `AioContext`'s shutdown): no panic in the caller, the waits are cancelled (the coroutines
//! unwind, their destructors run), locks stay usable, and misuse panics name the misuse.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, CANCELLED, IoThread, JoinHandle, Sleeper, WakeReason};
use aiocoro::sync::{CoMutex, CoQueue, CoRwLock, NoLock, ThreadMutex};

/// Counts its drop: proof that a cancelled coroutine's destructors ran.
struct Dropped(Arc<AtomicUsize>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Spawns `body` on `iothread` and waits until it reported (through `started`) that it is
/// about to suspend; then polls the IoThread once more by a round trip.
fn spawn_and_settle(
    iothread: &IoThread,
    body: impl FnOnce(&aiocoro::coroutine::Co, mpsc::Sender<()>) + Send + 'static,
) {
    let (started, ready) = mpsc::channel();
    iothread.handle().spawn(move |co| body(co, started)).unwrap();
    ready.recv_timeout(Duration::from_secs(10)).expect("the coroutine started");
    let (done, settled) = mpsc::channel();
    iothread.handle().schedule_oneshot(move || done.send(()).unwrap()).unwrap();
    settled.recv_timeout(Duration::from_secs(10)).expect("the IoThread polled again");
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[test]
fn stopping_an_iothread_with_a_comutex_waiter_cancels_it_and_the_lock_stays_usable() {
    let iothread = IoThread::spawn("stop-comutex").unwrap();
    let mutex = Arc::new(CoMutex::new(0u32));
    let drops = Arc::new(AtomicUsize::new(0));
    let guard = mutex.try_lock().unwrap();
    let (m, d) = (mutex.clone(), drops.clone());
    spawn_and_settle(&iothread, move |co, started| {
        let _dropped = Dropped(d);
        started.send(()).unwrap();
        *m.lock(co) += 1;
    });
    assert!(mutex.raw().is_locked());
    iothread.stop();
    assert_eq!(drops.load(Ordering::SeqCst), 1, "the waiter was unwound, its destructors ran");
    // The waiter left the queue: the unlock frees the lock instead of handing it to the dead
    // waiter, and any other thread can take it.
    drop(guard);
    let m = mutex.clone();
    assert!(thread::spawn(move || m.try_lock().is_some()).join().unwrap(), "the lock is stuck");
    assert_eq!(*mutex.try_lock().unwrap(), 0, "the cancelled waiter never got the lock");
}

#[test]
fn stopping_an_iothread_with_comutex_waiters_of_both_kinds_hands_the_lock_on() {
    // On the IoThread: a holder that sleeps with the lock, a waiter parked behind it (same
    // thread), and a waiter from another thread queued behind those.
    let iothread = IoThread::spawn("stop-chain").unwrap();
    let mutex = Arc::new(CoMutex::new(Vec::new()));
    let m = mutex.clone();
    spawn_and_settle(&iothread, move |co, started| {
        let mut guard = m.lock(co);
        guard.push("holder");
        started.send(()).unwrap();
        co.sleep(Duration::from_secs(3600));
        guard.push("holder woke");
    });
    let m = mutex.clone();
    spawn_and_settle(&iothread, move |co, started| {
        started.send(()).unwrap();
        m.lock(co).push("parked waiter");
    });
    let ctx = AioContext::new().unwrap();
    let m = mutex.clone();
    let remote = ctx.spawn(move |co| m.lock(co).push("remote waiter"));
    ctx.poll(false);
    assert!(!remote.is_finished());
    let started = Instant::now();
    iothread.stop();
    assert!(started.elapsed() < Duration::from_secs(60), "the sleep was cancelled");
    remote.join().unwrap();
    assert_eq!(
        *mutex.try_lock().unwrap(),
        ["holder", "parked waiter", "remote waiter"],
        "the cancelled holder handed the lock to the parked waiter, which ran until its \
         critical section ended, then to the waiter of the other thread"
    );
}

#[test]
fn stopping_an_iothread_with_coqueue_waiters_cancels_them_and_leaves_the_queue_empty() {
    let iothread = IoThread::spawn("stop-coqueue").unwrap();
    let thread_locked = Arc::new((ThreadMutex::new(0u32), CoQueue::new()));
    let co_locked = Arc::new((CoMutex::new(0u32), CoQueue::new()));
    let drops = Arc::new(AtomicUsize::new(0));
    let (s, d) = (thread_locked.clone(), drops.clone());
    spawn_and_settle(&iothread, move |co, started| {
        let _dropped = Dropped(d);
        let (lock, queue) = &*s;
        let mut guard = lock.lock(co);
        started.send(()).unwrap();
        while *guard == 0 {
            queue.wait(co, &mut guard);
        }
    });
    let (s, d) = (co_locked.clone(), drops.clone());
    spawn_and_settle(&iothread, move |co, started| {
        let _dropped = Dropped(d);
        let (lock, queue) = &*s;
        let mut guard = lock.lock(co);
        started.send(()).unwrap();
        while *guard == 0 {
            queue.wait(co, &mut guard);
        }
    });
    iothread.stop();
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both waiters were unwound");
    let (lock, queue) = &*thread_locked;
    let guard = lock.try_lock().expect("the cancelled waiter's guard released the lock");
    assert!(queue.is_empty(&guard), "the cancelled waiter left the queue");
    let (lock, queue) = &*co_locked;
    let guard = lock.try_lock().expect("the cancelled waiter's guard released the lock");
    assert!(queue.is_empty(&guard), "the cancelled waiter left the queue");
}

#[test]
fn a_cancelled_coqueue_waiter_that_was_woken_already_passes_the_wake_on() {
    // Two consumers wait, the first on a context that shuts down. Its cancelled wait must
    // take the lock back, which the producer holds; meanwhile the producer's `next` pops the
    // cancelled consumer. The wake must not be lost with it: it goes to the second consumer.
    let ctx = AioContext::new().unwrap();
    let state = Arc::new((ThreadMutex::new(0u32), CoQueue::new()));
    let s = state.clone();
    let (queued, first_queued) = mpsc::channel();
    let (shut, shut_down) = mpsc::channel::<()>();
    let doomed = thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            queued.send(()).unwrap();
            while *guard == 0 {
                queue.wait(co, &mut guard);
            }
            *guard -= 1;
        });
        ctx.poll(false);
        shut_down.recv().unwrap();
        drop(ctx);
    });
    first_queued.recv().unwrap();
    let s = state.clone();
    let survivor = ctx.spawn(move |co| {
        let (lock, queue) = &*s;
        let mut guard = lock.lock(co);
        while *guard == 0 {
            queue.wait(co, &mut guard);
        }
        *guard -= 1;
    });
    // The doomed consumer queued first (it held the lock until it waited).
    ctx.poll(false);
    let (lock, queue) = &*state;
    let mut guard = lock.lock_blocking();
    shut.send(()).unwrap();
    // Let the shutdown cancel the doomed consumer, which then blocks taking the lock back.
    thread::sleep(Duration::from_millis(200));
    *guard += 1;
    assert!(queue.next(&mut guard), "the doomed consumer is still in the queue");
    drop(guard);
    doomed.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !survivor.is_finished() && Instant::now() < deadline {
        ctx.poll(false);
        thread::sleep(Duration::from_millis(1));
    }
    assert!(survivor.is_finished(), "the wake was lost with the cancelled consumer");
    assert_eq!(*state.0.lock_blocking(), 0, "the item was consumed once");
}

#[test]
fn stopping_an_iothread_with_a_sleeper_and_a_thread_pool_job_cancels_both() {
    let iothread = IoThread::spawn("stop-sleep-pool").unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let job_done = Arc::new(AtomicBool::new(false));
    let d = drops.clone();
    spawn_and_settle(&iothread, move |co, started| {
        let _dropped = Dropped(d);
        started.send(()).unwrap();
        co.sleep(Duration::from_secs(3600));
    });
    let (d, done) = (drops.clone(), job_done.clone());
    let (job_started, job_running) = mpsc::channel();
    spawn_and_settle(&iothread, move |co, started| {
        let _dropped = Dropped(d);
        started.send(()).unwrap();
        co.run_blocking(move || {
            job_started.send(()).unwrap();
            thread::sleep(Duration::from_millis(100));
            done.store(true, Ordering::SeqCst);
        });
    });
    // A job still queued would be dropped unrun; this one runs when the thread stops.
    job_running.recv_timeout(Duration::from_secs(10)).expect("a worker runs the job");
    let started = Instant::now();
    iothread.stop();
    assert!(started.elapsed() < Duration::from_secs(60), "the sleep was cancelled");
    assert_eq!(drops.load(Ordering::SeqCst), 2, "both coroutines were unwound");
    assert!(job_done.load(Ordering::SeqCst), "the running job was waited for, not abandoned");
}

#[test]
fn dropping_a_context_drains_what_is_ready_before_it_cancels() {
    let ctx = AioContext::new().unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    ctx.spawn(move |co| {
        co.reschedule();
        l.borrow_mut().push("ready work ran");
        co.sleep(Duration::from_secs(3600));
        l.borrow_mut().push("woke");
    });
    ctx.poll(false);
    drop(ctx);
    assert_eq!(*log.borrow(), ["ready work ran"]);
}

#[test]
fn a_coroutine_cancelled_at_shutdown_reports_it_when_entered() {
    let ctx = AioContext::new().unwrap();
    let coroutine = Rc::new(RefCell::new(None));
    let c = coroutine.clone();
    let handle = ctx.spawn(move |co| {
        *c.borrow_mut() = Some(co.current());
        co.sleep(Duration::from_secs(3600));
    });
    ctx.poll(false);
    drop(ctx);
    assert!(handle.is_finished(), "the shutdown cancelled it");
    let co = coroutine.borrow_mut().take().unwrap();
    let message = panic_message(panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err());
    assert!(message.contains("after its AioContext cancelled it"), "{message}");
}

#[test]
fn a_coroutine_parked_where_shutdown_cannot_reach_it_is_left_suspended_not_unwound() {
    // A waiter on a CoQueue under a NoLock parks; a shutdown cannot find parks to cancel, so
    // the coroutine stays suspended for good (leaked), and nothing unwinds it later; its join
    // handle reports it cancelled.
    thread::spawn(|| {
        let ctx = AioContext::new().unwrap();
        let state = Rc::new((NoLock::new(false), CoQueue::new()));
        let unwound = Rc::new(Cell::new(false));
        let (s, u) = (state.clone(), unwound.clone());
        let co = ctx.spawn(move |co| {
            struct Flag(Rc<Cell<bool>>);
            impl Drop for Flag {
                fn drop(&mut self) {
                    self.0.set(true);
                }
            }
            let _flag = Flag(u);
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            queue.wait(co, &mut guard);
        });
        ctx.poll(false);
        drop(ctx);
        assert!(!unwound.get());
        // Its joiner is not left waiting: the handle reports the cancellation.
        assert!(co.is_finished());
        let payload = co.join().unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&CANCELLED));
        let (lock, queue) = &*state;
        let mut guard = lock.try_lock().unwrap();
        assert!(!queue.next(&mut guard));
        assert!(!unwound.get());
    })
    .join()
    .unwrap();
}

#[test]
fn waking_a_forgotten_wait_panics_naming_that_misuse() {
    let ctx = AioContext::new().unwrap();
    let co = ctx.spawn(move |co| {
        let wait = co.prepare_wait();
        let waker = wait.waker();
        std::mem::forget(wait);
        (co.current().id(), waker)
    });
    ctx.poll(false);
    assert!(co.is_finished());
    let (id, waker) = co.join().unwrap();
    waker.wake();
    let message =
        panic_message(panic::catch_unwind(AssertUnwindSafe(|| ctx.poll(false))).unwrap_err());
    assert!(message.contains("the Wait was leaked"), "{message}");
    assert!(message.contains(&format!("coroutine #{id}")), "{message}");
}

#[test]
fn a_sleeper_whose_sleep_was_cancelled_can_be_slept_on_again() {
    let sleeper = Arc::new(Sleeper::new());
    let iothread = IoThread::spawn("stop-sleeper").unwrap();
    let s = sleeper.clone();
    spawn_and_settle(&iothread, move |co, started| {
        started.send(()).unwrap();
        co.sleep_wakeable(Duration::from_secs(3600), &s);
    });
    iothread.stop();
    assert!(!sleeper.wake(), "the cancelled sleep left its waker behind");
    let ctx = AioContext::new().unwrap();
    let s = sleeper.clone();
    let co = ctx.spawn(move |co| {
        assert_eq!(co.sleep_wakeable(Duration::from_millis(1), &s), WakeReason::TimedOut);
    });
    co.join().unwrap();
}

#[test]
fn a_coroutine_that_reschedules_forever_does_not_hold_a_shutdown_up() {
    // It never waits: the bounded drain moves on, and its next reschedule is cancelled, as the
    // sleeper's wait is. Left parked on the run queue instead, it would be leaked, and its
    // joiner would wait forever.
    thread::spawn(|| {
        let ctx = AioContext::new().unwrap();
        let spins = Rc::new(Cell::new(0u64));
        let drops = Arc::new(AtomicUsize::new(0));
        let (s, d) = (spins.clone(), drops.clone());
        let spinner = ctx.spawn(move |co| {
            let _guard = Dropped(d);
            loop {
                s.set(s.get() + 1);
                co.reschedule();
            }
        });
        let sleeper = ctx.spawn(|co| co.sleep(Duration::from_secs(3600)));
        ctx.poll(false);
        drop(ctx);
        assert!(sleeper.is_finished(), "the sleeper was cancelled");
        assert!(spins.get() > 1, "the drain ran the rescheduling coroutine");
        assert!(spinner.is_finished(), "the rescheduling coroutine was leaked, not cancelled");
        assert_eq!(drops.load(Ordering::SeqCst), 1, "it did not unwind");
        let payload = spinner.join().unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&CANCELLED));
    })
    .join()
    .unwrap();
}

#[test]
fn a_stop_waits_for_an_uncancellable_section_and_cancels_before_the_next() {
    // A coroutine that runs one section after another and waits nowhere else (a storage
    // client issuing requests back to back): the section in progress ends, whole, and the
    // coroutine is cancelled where the next would start, so the stop returns.
    let iothread = IoThread::spawn("sections").unwrap();
    let (started, finished, dropped) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (s, f, d) = (started.clone(), finished.clone(), dropped.clone());
    spawn_and_settle(&iothread, move |co, ready| {
        let _dropped = Dropped(d);
        ready.send(()).unwrap();
        loop {
            co.run_uncancellable(|| {
                s.fetch_add(1, Ordering::SeqCst);
                co.sleep(Duration::from_millis(20));
                f.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let (stopped, stop_returned) = mpsc::channel();
    thread::spawn(move || {
        iothread.stop();
        stopped.send(()).unwrap();
    });
    stop_returned.recv_timeout(Duration::from_secs(10)).expect("the stop returns");
    assert!(started.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
        "the section in progress ran to its end, and no other started"
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the coroutine was cancelled (unwound)");
}

/// Waits in its drop, on a waker it hands out through its channel: a destructor that finishes
/// something (a request guard) while its coroutine unwinds.
struct WaitsOnDrop<'co> {
    co: &'co aiocoro::coroutine::Co,
    wakers: mpsc::Sender<aiocoro::aio::Waker>,
    finished: Arc<AtomicUsize>,
    /// How many waits the destructor makes, one after the other.
    waits: usize,
}

impl Drop for WaitsOnDrop<'_> {
    fn drop(&mut self) {
        for _ in 0..self.waits {
            let wait = self.co.prepare_wait();
            self.wakers.send(wait.waker()).unwrap();
            wait.wait();
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Spawns, on `iothread`, a coroutine that sleeps until its context cancels it, and returns
/// the channel that says so (its destructor ran): the shutdown is cancelling from then on.
fn cancelling_signal(iothread: &IoThread) -> mpsc::Receiver<()> {
    struct Signal(mpsc::Sender<()>);
    impl Drop for Signal {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (cancelled, signal) = mpsc::channel();
    spawn_and_settle(iothread, move |co, ready| {
        let _signal = Signal(cancelled);
        ready.send(()).unwrap();
        co.sleep(Duration::from_secs(3600));
    });
    signal
}

/// Stops `iothread` on a thread of its own; the receiver says the stop returned.
fn stop_in_background(iothread: IoThread) -> mpsc::Receiver<thread::Result<()>> {
    let (stopped, stop_returned) = mpsc::channel();
    thread::spawn(move || stopped.send(panic::catch_unwind(AssertUnwindSafe(|| iothread.stop()))));
    stop_returned
}

/// Spawns on `iothread` a coroutine that panics with "a request failed" while it holds a
/// [`WaitsOnDrop`] making `waits` waits; returns where the destructor sends its wakers, its
/// count of finished destructors, and the coroutine's handle.
fn panic_with_a_destructor_that_waits(
    iothread: &IoThread,
    waits: usize,
) -> (mpsc::Receiver<aiocoro::aio::Waker>, Arc<AtomicUsize>, JoinHandle<()>) {
    let (wakers, waker) = mpsc::channel();
    let finished = Arc::new(AtomicUsize::new(0));
    let f = finished.clone();
    let panicker = iothread
        .handle()
        .spawn(move |co| {
            let _guard = WaitsOnDrop { co, wakers, finished: f, waits };
            panic!("a request failed");
        })
        .unwrap();
    (waker, finished, panicker)
}

#[test]
fn a_destructor_that_waits_while_its_coroutine_panics_is_not_cancelled_by_a_stop() {
    // A cancellation unwinds from the wait; from a destructor that runs during a panic's
    // unwinding, that aborted the process ("panic in a destructor during cleanup").
    let iothread = IoThread::spawn("panicking").unwrap();
    let cancelling = cancelling_signal(&iothread);
    let (waker, finished, panicker) = panic_with_a_destructor_that_waits(&iothread, 1);
    // The destructor waits, registered before the stop.
    let waker = waker.recv_timeout(Duration::from_secs(10)).expect("the destructor waits");
    stop_then_check_the_destructor_waited(iothread, &cancelling, &finished, panicker, || {
        waker.wake()
    });
}

#[test]
fn a_destructor_that_waits_twice_while_its_coroutine_panics_is_not_cancelled_by_a_stop() {
    // Woken from its first wait, the coroutine is entered again while its own panic is still
    // in flight (the thread counts it while the coroutine is suspended): its second wait is
    // still part of its own unwinding, and a cancellation there would abort the process.
    let iothread = IoThread::spawn("panicking twice").unwrap();
    let cancelling = cancelling_signal(&iothread);
    let (waker, finished, panicker) = panic_with_a_destructor_that_waits(&iothread, 2);
    // The first wait ends before the stop; the second starts before it.
    waker.recv_timeout(Duration::from_secs(10)).expect("the destructor waits").wake();
    let second = waker.recv_timeout(Duration::from_secs(10)).expect("the destructor waits again");
    stop_then_check_the_destructor_waited(iothread, &cancelling, &finished, panicker, || {
        second.wake()
    });
}

#[test]
fn a_section_that_panics_while_a_stop_cancels_lets_the_destructors_wait() {
    // The section ends (by its panic) once the shutdown cancels; a destructor outside it that
    // waits then must not be cancelled in the middle of the panic's unwinding.
    let iothread = IoThread::spawn("section panics").unwrap();
    let cancelling = cancelling_signal(&iothread);
    let (wakers, waker) = mpsc::channel();
    let finished = Arc::new(AtomicUsize::new(0));
    let f = finished.clone();
    let (section_wakers, section_waker) = mpsc::channel();
    let panicker = iothread
        .handle()
        .spawn(move |co| {
            let _guard = WaitsOnDrop { co, wakers, finished: f, waits: 1 };
            co.run_uncancellable(|| {
                let wait = co.prepare_wait();
                section_wakers.send(wait.waker()).unwrap();
                wait.wait();
                panic!("a request failed");
            })
        })
        .unwrap();
    let section_waker = section_waker.recv_timeout(Duration::from_secs(10)).expect("in section");
    stop_then_check_the_destructor_waited(iothread, &cancelling, &finished, panicker, || {
        section_waker.wake();
        // The destructor's wait starts while the shutdown cancels: it is not cancelled at once.
        waker.recv_timeout(Duration::from_secs(10)).expect("the destructor waits").wake();
    });
}

/// Stops `iothread` in the background and, once its shutdown cancels (`cancelling`), runs
/// `wake_the_destructor`; then checks that the stop returned without a panic, that the
/// destructor's wait was ended by that wake (`finished`), not cancelled, and that the panic of
/// the coroutine it ran in reached `panicker`.
fn stop_then_check_the_destructor_waited(
    iothread: IoThread,
    cancelling: &mpsc::Receiver<()>,
    finished: &AtomicUsize,
    panicker: JoinHandle<()>,
    wake_the_destructor: impl FnOnce(),
) {
    let stop_returned = stop_in_background(iothread);
    cancelling.recv_timeout(Duration::from_secs(10)).expect("the shutdown cancels");
    wake_the_destructor();
    let stopped = stop_returned.recv_timeout(Duration::from_secs(10)).expect("the stop returns");
    assert!(stopped.is_ok(), "the stop does not panic");
    assert_eq!(finished.load(Ordering::SeqCst), 1, "the destructor's wait ended by its wake");
    assert_eq!(panic_message(panicker.join().unwrap_err()), "a request failed");
}

#[test]
fn a_stop_waits_for_a_section_that_reschedules_until_another_thread_is_done() {
    // A section that parks (reschedules) instead of waiting was left suspended for good by
    // the shutdown, half done, once its polls stopped finishing coroutines; its joiner was told
    // it was cancelled.
    let iothread = IoThread::spawn("section spins").unwrap();
    let cancelling = cancelling_signal(&iothread);
    let done = Arc::new(AtomicBool::new(false));
    let (started, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (d, s, f) = (done.clone(), started.clone(), finished.clone());
    let spinner = iothread
        .handle()
        .spawn(move |co| {
            co.run_uncancellable(|| {
                s.fetch_add(1, Ordering::SeqCst);
                while !d.load(Ordering::SeqCst) {
                    co.reschedule();
                }
                f.fetch_add(1, Ordering::SeqCst);
            })
        })
        .unwrap();
    while started.load(Ordering::SeqCst) == 0 {
        thread::yield_now();
    }
    let stop_returned = stop_in_background(iothread);
    cancelling.recv_timeout(Duration::from_secs(10)).expect("the shutdown cancels");
    let (joined, join_result) = mpsc::channel();
    thread::spawn(move || joined.send(spinner.join().is_ok()).unwrap());
    // Before the other thread is done, the join must not end (it did, with the cancellation).
    let early = join_result.recv_timeout(Duration::from_millis(200)).ok();
    done.store(true, Ordering::SeqCst);
    let stopped = stop_returned.recv_timeout(Duration::from_secs(10)).expect("the stop returns");
    assert!(stopped.is_ok(), "the stop does not panic");
    assert_eq!(early, None, "the section's coroutine ended before its section could");
    assert!(join_result.recv_timeout(Duration::from_secs(10)).expect("the join returns"));
    assert_eq!(finished.load(Ordering::SeqCst), 1, "the section ran to its end");
}
/// Drops the last handle of `ctx` from inside one of its own coroutines: that shutdown cannot
/// block for the waits it cannot cancel, so it leaks them (step 3 of `AioContext`'s shutdown).
fn drop_inside_a_coroutine(ctx: AioContext) {
    let last = ctx.clone();
    let dropper = ctx.spawn(move |_co| drop(last));
    drop(ctx);
    dropper.join().unwrap();
}

/// On a thread of its own, a consumer takes `state`'s mutex and waits on its queue (the mutex
/// is released meanwhile); once `hold` has been called (on this thread, by the caller, which
/// takes the mutex in it), the consumer's context is dropped from inside a coroutine. The
/// cancelled consumer re-takes the mutex for its guard, uncancellably, behind the caller's
/// hold: the shutdown leaks it while it is queued for the mutex.
fn leak_a_comutex_waiter<G>(state: &Arc<(CoMutex<u32>, CoQueue)>, hold: impl FnOnce() -> G) -> G {
    let (waiting, consumer_waits) = mpsc::channel();
    let (held, mutex_held) = mpsc::channel::<()>();
    let s = state.clone();
    let doomed = thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            loop {
                queue.wait(co, &mut guard);
            }
        });
        // Runs the consumer until it waits.
        ctx.poll(false);
        waiting.send(()).unwrap();
        mutex_held.recv().unwrap();
        drop_inside_a_coroutine(ctx);
    });
    consumer_waits.recv_timeout(Duration::from_secs(10)).expect("the consumer waits");
    let guard = hold();
    held.send(()).unwrap();
    doomed.join().unwrap();
    guard
}

/// Spawns a coroutine on `iothread` that adds 1 under `state`'s mutex, and returns once it is
/// about to take the mutex (see `spawn_and_settle`); the receiver is told when it has added.
fn spawn_incrementer(
    iothread: &IoThread,
    state: &Arc<(CoMutex<u32>, CoQueue)>,
) -> mpsc::Receiver<()> {
    let (done, finished) = mpsc::channel();
    let s = state.clone();
    spawn_and_settle(iothread, move |co, started| {
        started.send(()).unwrap();
        *s.0.lock(co) += 1;
        done.send(()).unwrap();
    });
    finished
}

/// Runs a coroutine on `iothread` that blocks the thread until the returned sender sends (or
/// drops): wakes for that thread's coroutines wait in its inbox meanwhile.
fn block_thread(iothread: &IoThread) -> mpsc::Sender<()> {
    let (blocked, is_blocked) = mpsc::channel();
    let (go, resume) = mpsc::channel::<()>();
    iothread
        .handle()
        .spawn(move |_co| {
            blocked.send(()).unwrap();
            let _ = resume.recv();
        })
        .unwrap();
    is_blocked.recv_timeout(Duration::from_secs(10)).expect("the IoThread is blocked");
    go
}

/// Waits until `iothread` has run a poll that started after this call.
fn round_trip(iothread: &IoThread) {
    let (done, polled) = mpsc::channel();
    iothread.handle().schedule_oneshot(move || done.send(()).unwrap()).unwrap();
    polled.recv_timeout(Duration::from_secs(10)).expect("the IoThread polled");
}

#[test]
fn a_comutex_waiter_leaked_by_a_shutdown_is_never_woken_as_the_candidate() {
    // The leaked waiter is first in the mutex's queue, a live one from another thread second.
    // Were the leaked one woken as the candidate when the holder lets go, its wake could never
    // reach it, and nobody would serve the queue again.
    let state = Arc::new((CoMutex::new(0u32), CoQueue::new()));
    let guard = leak_a_comutex_waiter(&state, || state.0.try_lock().expect("released"));
    let iothread = IoThread::spawn("after-leak").unwrap();
    let finished = spawn_incrementer(&iothread, &state);
    drop(guard);
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiter behind the leaked one got the lock");
    iothread.stop();
    assert_eq!(*state.0.try_lock().expect("the lock ends free"), 1);
}

#[test]
fn a_starving_comutex_is_never_handed_to_a_waiter_leaked_by_a_shutdown() {
    // A live waiter of an IoThread queues, then the leaked one behind it. The live one is
    // woken but passed over (its thread is busy while the holder takes the lock back) for
    // longer than the starvation bound, so the lock turns starving and unlocks hand it over
    // without freeing it: to the live waiter, and by its unlock to the next in the queue.
    // Were that the leaked waiter, the lock would stay held by it for every other thread.
    let state = Arc::new((CoMutex::new(0u32), CoQueue::new()));
    let iothread = IoThread::spawn("starving").unwrap();
    let (guard, finished) = leak_a_comutex_waiter(&state, || {
        let guard = state.0.try_lock().expect("released");
        (guard, spawn_incrementer(&iothread, &state))
    });
    let busy = block_thread(&iothread);
    drop(guard);
    let barger = state.0.try_lock().expect("freed for a running locker");
    thread::sleep(Duration::from_millis(5));
    drop(busy);
    // The first poll runs the woken waiter, which finds the lock taken and queues again.
    round_trip(&iothread);
    round_trip(&iothread);
    drop(barger);
    finished.recv_timeout(Duration::from_secs(10)).expect("the live waiter got the lock");
    let (locked, got_it) = mpsc::channel();
    let s = state.clone();
    let other = thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        ctx.run(move |co| *s.0.lock(co) += 1);
        locked.send(()).unwrap();
    });
    got_it
        .recv_timeout(Duration::from_secs(10))
        .expect("the lock was not handed to the leaked waiter");
    other.join().unwrap();
    iothread.stop();
    assert_eq!(*state.0.try_lock().expect("the lock ends free"), 2);
}

#[test]
fn a_corwlock_is_never_granted_to_a_waiter_leaked_by_a_shutdown() {
    // A CoRwLock waiter cannot be cancelled (a hand-over grants it the lock before it runs),
    // so a shutdown from inside a coroutine leaks it while it is queued. Were it granted the
    // lock when the reader lets go, the lock would stay held by it for every other thread.
    let lock = Arc::new(CoRwLock::new(0u32));
    let reader = lock.try_read().unwrap();
    let (queued, writer_queued) = mpsc::channel();
    let l = lock.clone();
    let doomed = thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        ctx.spawn(move |co| {
            queued.send(()).unwrap();
            *l.write(co) += 100;
        });
        ctx.poll(false);
        drop_inside_a_coroutine(ctx);
    });
    writer_queued.recv_timeout(Duration::from_secs(10)).expect("the writer runs");
    doomed.join().unwrap();
    let iothread = IoThread::spawn("after-leak").unwrap();
    let (done, finished) = mpsc::channel();
    let l = lock.clone();
    spawn_and_settle(&iothread, move |co, started| {
        started.send(()).unwrap();
        *l.write(co) += 1;
        done.send(()).unwrap();
    });
    drop(reader);
    if finished.recv_timeout(Duration::from_secs(10)).is_err() {
        // Stopping the IoThread would wait for its writer (a CoRwLock wait is not cancelled).
        std::mem::forget(iothread);
        panic!("the writer behind the leaked one never got the lock");
    }
    iothread.stop();
    assert_eq!(*lock.try_read().expect("the lock ends free"), 1);
}

#[test]
fn a_coqueue_wake_skips_a_consumer_leaked_by_a_shutdown() {
    // The leaked consumer was cancelled in its CoQueue wait and leaked while it took the mutex
    // back, before it could leave the queue: its record is still first there. A producer's
    // wake must go to the live consumer queued behind it, not be lost with the leaked one.
    let state = Arc::new((CoMutex::new(0u32), CoQueue::new()));
    let guard = leak_a_comutex_waiter(&state, || state.0.try_lock().expect("released"));
    drop(guard);
    let iothread = IoThread::spawn("live-consumer").unwrap();
    let (done, finished) = mpsc::channel();
    let s = state.clone();
    spawn_and_settle(&iothread, move |co, started| {
        started.send(()).unwrap();
        let (lock, queue) = &*s;
        let mut guard = lock.lock(co);
        while *guard == 0 {
            queue.wait(co, &mut guard);
        }
        *guard -= 1;
        done.send(()).unwrap();
    });
    {
        let (lock, queue) = &*state;
        let mut guard = lock.try_lock().expect("the live consumer released the mutex");
        *guard += 1;
        assert!(queue.next(&mut guard), "a live consumer waits");
    }
    finished.recv_timeout(Duration::from_secs(10)).expect("the wake reached the live consumer");
    iothread.stop();
    let (lock, queue) = &*state;
    let guard = lock.try_lock().expect("the lock ends free");
    assert_eq!(*guard, 0, "the item was consumed once");
    assert!(queue.is_empty(&guard), "the leaked consumer's record was dropped with the wake");
}

#[test]
fn an_iothread_stopped_by_one_of_its_own_coroutines_stops_without_waiting_for_itself() {
    // The stop joined the calling thread itself: std panicked ("failed to join thread:
    // Resource deadlock avoided"), from a drop of the IoThread too.
    let iothread = IoThread::spawn("stops itself").unwrap();
    let handle = iothread.handle().clone();
    let (give, take) = mpsc::channel::<IoThread>();
    let d = Arc::new(AtomicUsize::new(0));
    let d2 = d.clone();
    let (returned, stop_returned) = mpsc::channel();
    let stopper = handle
        .spawn(move |co| {
            let _dropped = Dropped(d2);
            let iothread = take.recv().unwrap();
            let stopped =
                panic::catch_unwind(AssertUnwindSafe(|| co.run_uncancellable(|| iothread.stop())));
            returned.send(stopped.is_ok()).unwrap();
            // The stop happens once this coroutine yields: it is cancelled at its next wait.
            co.sleep(Duration::from_secs(3600));
        })
        .unwrap();
    give.send(iothread).unwrap();
    let stopped = stop_returned.recv_timeout(Duration::from_secs(10)).expect("the stop returns");
    assert!(stopped, "the stop does not panic");
    let (joined, join_result) = mpsc::channel();
    thread::spawn(move || joined.send(stopper.join().map_err(panic_message)).unwrap());
    let joined = join_result.recv_timeout(Duration::from_secs(10)).expect("the join returns");
    assert_eq!(joined, Err(CANCELLED.to_owned()));
    assert_eq!(d.load(Ordering::SeqCst), 1, "the coroutine was cancelled (unwound)");
}

#[test]
fn a_section_that_panics_lifts_its_shield_so_the_next_wait_is_cancelled() {
    // Nested sections; the inner one panics once the stop cancels, the outer catches it and
    // ends; the wait after them is cancelled at once (no shield is left behind).
    let iothread = IoThread::spawn("shield lifted").unwrap();
    let cancelling = cancelling_signal(&iothread);
    let (wakers, waker) = mpsc::channel();
    let outer_ended = Arc::new(AtomicBool::new(false));
    let ended = outer_ended.clone();
    let sectioned = iothread
        .handle()
        .spawn(move |co| {
            co.run_uncancellable(|| {
                let caught = panic::catch_unwind(AssertUnwindSafe(|| {
                    co.run_uncancellable(|| {
                        let wait = co.prepare_wait();
                        wakers.send(wait.waker()).unwrap();
                        wait.wait();
                        panic!("inner section failed");
                    })
                }));
                assert!(caught.is_err());
            });
            ended.store(true, Ordering::SeqCst);
            co.sleep(Duration::from_secs(3600));
        })
        .unwrap();
    let waker = waker.recv_timeout(Duration::from_secs(10)).expect("in the inner section");
    let stop_returned = stop_in_background(iothread);
    cancelling.recv_timeout(Duration::from_secs(10)).expect("the shutdown cancels");
    waker.wake();
    let stopped = stop_returned.recv_timeout(Duration::from_secs(10)).expect("the stop returns");
    assert!(stopped.is_ok(), "the stop does not panic");
    assert!(outer_ended.load(Ordering::SeqCst), "the outer section ran to its end");
    assert_eq!(panic_message(sectioned.join().unwrap_err()), CANCELLED);
}
