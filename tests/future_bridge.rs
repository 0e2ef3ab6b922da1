//! Futures and coroutines, both ways: a coroutine awaits a `Future` with `Co::block_on`, and a
//! spawned coroutine's `JoinHandle` is joined by a thread, a coroutine or async code.

use std::cell::Cell;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::Duration;

use aiocoro::aio::{AioContext, CANCELLED, IoThread};
use aiocoro::sync::{CoQueue, NoLock};

/// A future that counts its polls, keeps a clone of each poll's waker, and is ready once
/// `ready` is set; it wakes its own waker during poll number `wake_in_poll`, if any.
#[derive(Clone, Default)]
struct Probe {
    polls: Arc<AtomicUsize>,
    wakers: Arc<Mutex<Vec<Waker>>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    wake_in_poll: Option<usize>,
}

impl Future for Probe {
    type Output = usize;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        let polls = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.ready.load(Ordering::SeqCst) {
            return Poll::Ready(polls);
        }
        self.wakers.lock().unwrap().push(cx.waker().clone());
        if self.wake_in_poll == Some(polls) {
            self.ready.store(true, Ordering::SeqCst);
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[test]
fn a_future_completed_from_another_thread_resumes_the_coroutine_on_its_home_thread() {
    let ctx = AioContext::new().unwrap();
    let home = thread::current().id();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let value = ctx.run(move |co| {
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send(7u32).unwrap();
        });
        let value = co.block_on(rx).unwrap();
        assert_eq!(thread::current().id(), home, "resumed on another thread");
        value
    });
    assert_eq!(value, 7);
}

#[test]
fn a_ready_future_is_polled_once_and_never_suspends() {
    let ctx = AioContext::new().unwrap();
    let probe = Probe::default();
    probe.ready.store(true, Ordering::SeqCst);
    let p = probe.clone();
    let done = ctx.handle().spawn(move |co| co.block_on(p)).unwrap();
    assert!(ctx.poll(false));
    assert!(done.is_finished(), "a ready future suspended the coroutine");
    assert_eq!(done.join().unwrap(), 1);
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn a_wake_during_poll_polls_again_within_the_same_context_poll() {
    let ctx = AioContext::new().unwrap();
    let probe = Probe { wake_in_poll: Some(1), ..Probe::default() };
    let p = probe.clone();
    let done = ctx.handle().spawn(move |co| co.block_on(p)).unwrap();
    ctx.poll(false);
    assert!(done.is_finished(), "the coroutine waited for a wake it had already received");
    assert_eq!(done.join().unwrap(), 2);
}

#[test]
fn a_future_that_wakes_itself_on_every_poll_leaves_the_other_coroutines_their_turns() {
    // A spin on a flag that another coroutine of the same context sets: a yield-like future.
    // Polled again at once after each self-wake, it would never let the setter run.
    const GIVE_UP_AFTER: u32 = 100_000;
    let ctx = AioContext::new().unwrap();
    let flag = Rc::new(Cell::new(false));
    let f = flag.clone();
    let spinner = ctx.spawn(move |co| {
        let mut polls = 0;
        co.block_on(std::future::poll_fn(|cx| {
            polls += 1;
            if f.get() || polls == GIVE_UP_AFTER {
                return Poll::Ready(polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }))
    });
    let f = flag.clone();
    let setter = ctx.spawn(move |_| f.set(true));
    let polls = spinner.join().unwrap();
    assert!(polls < GIVE_UP_AFTER, "the spinning coroutine starved the one it waited for");
    assert_eq!(polls, 2, "the setter, queued behind the spinner, ran after its first poll");
    setter.join().unwrap();
}

#[test]
fn late_and_duplicate_wakes_do_nothing() {
    let ctx = AioContext::new().unwrap();
    let probe = Probe::default();
    let p = probe.clone();
    let done = ctx.handle().spawn(move |co| co.block_on(p)).unwrap();
    ctx.poll(false);
    assert_eq!(probe.polls.load(Ordering::SeqCst), 1);
    let first = probe.wakers.lock().unwrap()[0].clone();
    // A wake from another thread resumes it: it polls again, and waits again.
    let w = first.clone();
    thread::spawn(move || w.wake()).join().unwrap();
    ctx.wait_while(|| probe.polls.load(Ordering::SeqCst) < 2);
    assert_eq!(ctx.suspended_coroutines(), 1);
    // The first poll's waker is stale now: waking it (twice, from two threads) does nothing.
    let w = first.clone();
    thread::spawn(move || w.wake_by_ref()).join().unwrap();
    first.wake_by_ref();
    while ctx.poll(false) {}
    assert_eq!(probe.polls.load(Ordering::SeqCst), 2, "a stale waker resumed the coroutine");
    // The second poll's waker, woken twice, resumes it once.
    probe.ready.store(true, Ordering::SeqCst);
    let second = probe.wakers.lock().unwrap()[1].clone();
    second.wake_by_ref();
    second.wake_by_ref();
    assert_eq!(done.join().unwrap(), 3);
    while ctx.poll(false) {}
    assert_eq!(probe.polls.load(Ordering::SeqCst), 3);
    // Wakes after the coroutine ended, and after its context is gone, do nothing.
    second.wake_by_ref();
    drop(ctx);
    let wakers = probe.wakers.lock().unwrap().clone();
    thread::spawn(move || wakers.into_iter().for_each(Waker::wake)).join().unwrap();
}

#[test]
fn tokio_awaits_the_join_handle_of_a_coroutine_on_an_iothread() {
    let iothread = IoThread::spawn("bridge").unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<u64>();
    let handle = iothread
        .handle()
        .spawn(move |co| {
            let name = thread::current().name().map(String::from);
            (co.block_on(rx).unwrap() * 2, name)
        })
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (value, name) = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            thread::sleep(Duration::from_millis(10));
            tx.send(21).unwrap();
        });
        handle.await
    });
    assert_eq!(value, 42);
    assert_eq!(name.as_deref(), Some("bridge"));
    iothread.stop();
}

#[test]
fn a_panic_in_the_coroutine_reaches_every_kind_of_joiner() {
    let iothread = IoThread::spawn("panics").unwrap();
    // A thread's join returns the payload.
    let handle = iothread.handle().spawn(|_| -> u32 { panic!("boom from a coroutine") }).unwrap();
    let payload = handle.join().unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom from a coroutine"));
    // So does a coroutine's join (here on another context).
    let ctx = AioContext::new().unwrap();
    let remote = iothread.handle().clone();
    let message = ctx.run(move |co| {
        let handle = remote.spawn(|_| -> u32 { panic!("boom again") }).unwrap();
        *co.join(handle).unwrap_err().downcast_ref::<&str>().unwrap()
    });
    assert_eq!(message, "boom again");
    // Awaiting the handle resumes the panic in the awaiting task.
    let handle = iothread.handle().spawn(|_| -> u32 { panic!("boom in tokio") }).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let payload = panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(handle))).unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in tokio"));
    // The IoThread survived all three.
    assert_eq!(iothread.handle().spawn(|_| 5).unwrap().join().unwrap(), 5);
    iothread.stop();
}

#[test]
fn a_coroutine_joins_one_of_its_own_context() {
    let ctx = AioContext::new().unwrap();
    let here = ctx.handle();
    let sum = ctx.run(move |co| {
        let handles: Vec<_> = (0..4u32)
            .map(|i| {
                here.spawn(move |co| {
                    co.reschedule();
                    i * 10
                })
                .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| co.join(h).unwrap()).sum::<u32>()
    });
    assert_eq!(sum, 60);
}

#[test]
fn dropping_the_handle_detaches_the_coroutine() {
    let iothread = IoThread::spawn("detached").unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let handle = iothread
        .handle()
        .spawn(move |co| {
            co.block_on(go_rx).unwrap();
            done_tx.send("ran to its end").unwrap();
            "result nobody takes"
        })
        .unwrap();
    assert!(!handle.is_finished());
    drop(handle);
    go_tx.send(()).unwrap();
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok("ran to its end"));
    iothread.stop();
}

/// Counts its drop.
struct Dropped(Arc<AtomicUsize>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn block_on_cancelled_at_shutdown_drops_the_future_and_later_wakes_do_nothing() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let ctx = AioContext::new().unwrap();
    let d = drops.clone();
    let handle = ctx
        .handle()
        .spawn(move |co| {
            let guard = Dropped(d.clone());
            let pending = async move {
                let _in_future = Dropped(d);
                rx.await
            };
            let value = co.block_on(pending);
            drop(guard);
            value.unwrap()
        })
        .unwrap();
    ctx.poll(false);
    assert_eq!(ctx.suspended_coroutines(), 1);
    drop(ctx);
    assert_eq!(drops.load(Ordering::SeqCst), 2, "the future or the coroutine's frame leaked");
    let payload = handle.join().unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&CANCELLED));
    // The future is gone, with its receiver: the send fails and wakes nothing.
    assert_eq!(tx.send(1), Err(1));
}

#[test]
fn a_waker_kept_past_the_shutdown_is_harmless() {
    let probe = Probe::default();
    let ctx = AioContext::new().unwrap();
    let p = probe.clone();
    let handle = ctx.handle().spawn(move |co| co.block_on(p)).unwrap();
    ctx.poll(false);
    drop(ctx);
    assert_eq!(handle.join().unwrap_err().downcast_ref::<&str>(), Some(&CANCELLED));
    let wakers = probe.wakers.lock().unwrap().clone();
    assert_eq!(wakers.len(), 1);
    thread::spawn(move || wakers.into_iter().for_each(Waker::wake)).join().unwrap();
}

#[test]
fn run_returns_the_value_and_resumes_a_panic() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(
        ctx.run(|co| {
            co.sleep(Duration::from_millis(1));
            String::from("done")
        }),
        "done"
    );
    let payload =
        panic::catch_unwind(AssertUnwindSafe(|| ctx.run(|_| panic!("run boom")))).unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"run boom"));
    assert_eq!(ctx.run(|_| 1), 1, "the context is still usable");
}

#[test]
fn a_tokio_task_awaiting_a_panicking_coroutine_ends_with_the_coroutines_panic() {
    let iothread = IoThread::spawn("tokio-panic").unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<u32>();
    let handle = iothread
        .handle()
        .spawn(move |co| -> u32 {
            let n = co.block_on(go_rx).unwrap();
            panic!("coroutine panic number {n}")
        })
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let outcome = runtime.block_on(async move {
        // As a tokio task awaiting a tokio task that panics: its JoinHandle reports the panic.
        let task = tokio::spawn(async move { handle.await + 1 });
        tokio::task::yield_now().await;
        go_tx.send(7).unwrap();
        task.await
    });
    let error = outcome.expect_err("the awaiting task did not end with the coroutine's panic");
    assert!(error.is_panic(), "{error}");
    let payload = error.into_panic();
    assert_eq!(
        payload.downcast_ref::<String>().map(String::as_str),
        Some("coroutine panic number 7")
    );
    assert_eq!(iothread.handle().spawn(|_| 3).unwrap().join().unwrap(), 3, "the IoThread died");
    iothread.stop();
}

#[test]
fn aborting_a_tokio_task_that_awaits_a_coroutine_detaches_the_coroutine() {
    let iothread = IoThread::spawn("tokio-detach").unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let d = drops.clone();
    let handle = iothread
        .handle()
        .spawn(move |co| {
            co.block_on(go_rx).unwrap();
            done_tx.send(thread::current().name().map(String::from)).unwrap();
            Dropped(d)
        })
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let aborted = runtime.block_on(async move {
        let task = tokio::spawn(async move {
            let _result = handle.await;
            unreachable!("the coroutine ended while its awaiting task was aborted")
        });
        // Let the task poll the handle (leaving its waker) before it is aborted.
        tokio::task::yield_now().await;
        task.abort();
        task.await
    });
    assert!(aborted.expect_err("the task was not aborted").is_cancelled());
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    // The handle is gone with the task; the coroutine runs on to its end, and its result,
    // which nobody takes, is dropped once.
    go_tx.send(()).unwrap();
    let ran_on = done_rx.recv_timeout(Duration::from_secs(10)).expect("the coroutine ran on");
    assert_eq!(ran_on.as_deref(), Some("tokio-detach"));
    iothread.handle().spawn(|_| ()).unwrap().join().unwrap();
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "the detached coroutine's result was not dropped once"
    );
    iothread.stop();
}

#[test]
fn stopping_an_iothread_under_busy_coroutines_ends_the_tokio_tasks_awaiting_them() {
    // Two coroutines that never wait for anything outside: one reschedules itself forever, one
    // awaits a future that wakes itself on every poll. The stop must neither hang on them nor
    // leave their joiners pending: both are cancelled, and the awaiting tasks end with that.
    let iothread = IoThread::spawn("busy").unwrap();
    let (running_tx, running) = mpsc::channel();
    let r = running_tx.clone();
    let rescheduler = iothread
        .handle()
        .spawn(move |co| -> u32 {
            r.send(()).unwrap();
            loop {
                co.reschedule();
            }
        })
        .unwrap();
    let spinner = iothread
        .handle()
        .spawn(move |co| -> u32 {
            running_tx.send(()).unwrap();
            co.block_on(std::future::poll_fn(|cx| {
                cx.waker().wake_by_ref();
                Poll::Pending
            }))
        })
        .unwrap();
    // The tokio runtime and the stop each run on a thread of their own, so that a hang fails
    // the test instead of blocking it.
    let (outcomes_tx, outcomes) = mpsc::channel();
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async move {
            let tasks = [tokio::spawn(rescheduler), tokio::spawn(spinner)];
            for task in tasks {
                outcomes_tx.send(task.await).unwrap();
            }
        });
    });
    for _ in 0..2 {
        running.recv_timeout(Duration::from_secs(10)).expect("the coroutine runs");
    }
    let (stopped_tx, stopped) = mpsc::channel();
    thread::spawn(move || {
        iothread.stop();
        stopped_tx.send(()).unwrap();
    });
    stopped.recv_timeout(Duration::from_secs(30)).expect("IoThread::stop hung on a busy coroutine");
    for _ in 0..2 {
        let outcome = outcomes.recv_timeout(Duration::from_secs(30)).expect("a task hung");
        let error = outcome.expect_err("a task awaiting a cancelled coroutine ended normally");
        assert_eq!(error.into_panic().downcast_ref::<&str>(), Some(&CANCELLED));
    }
}

#[test]
fn a_thread_that_joins_a_remote_coroutine_keeps_its_own_context_running() {
    // This thread's context runs a coroutine that the IoThread's coroutine waits for; joining
    // the latter must poll this context (as QEMU's AIO_WAIT_WHILE does), or both wait forever.
    let iothread = IoThread::spawn("remote-join").unwrap();
    let remote = iothread.handle().clone();
    let (joined_tx, joined) = mpsc::channel();
    thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let local = ctx.spawn(move |co| {
            co.reschedule();
            tx.send(20).unwrap();
        });
        let waiting = remote.spawn(move |co| co.block_on(rx).unwrap() + 1).unwrap();
        joined_tx.send(waiting.join().unwrap()).unwrap();
        local.join().unwrap();
    });
    let value = joined.recv_timeout(Duration::from_secs(30)).expect("the join deadlocked");
    assert_eq!(value, 21);
    iothread.stop();
}

/// Counts its wakes.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_join_handle_polled_by_two_executors_in_turn_wakes_only_the_last_and_panics_if_polled_again() {
    let iothread = IoThread::spawn("two-executors").unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let mut handle = iothread.handle().spawn(move |co| co.block_on(rx).unwrap()).unwrap();
    let (first, second) = (Arc::new(CountingWaker::default()), Arc::new(CountingWaker::default()));
    let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
    let mut poll_with = |waker: &Waker| Pin::new(&mut handle).poll(&mut Context::from_waker(waker));
    assert!(poll_with(&first_waker).is_pending());
    assert!(poll_with(&second_waker).is_pending());
    tx.send(5).unwrap();
    while second.0.load(Ordering::SeqCst) == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(first.0.load(Ordering::SeqCst), 0, "the replaced waker was woken");
    assert_eq!(poll_with(&second_waker), Poll::Ready(5));
    let again = panic::catch_unwind(AssertUnwindSafe(|| poll_with(&second_waker))).unwrap_err();
    assert_eq!(
        again.downcast_ref::<&str>(),
        Some(&"aiocoro: a JoinHandle was polled after it returned its result")
    );
    assert_eq!(second.0.load(Ordering::SeqCst), 1);
    iothread.stop();
}

#[test]
fn a_panic_in_the_futures_poll_reaches_the_joiner_with_its_payload() {
    let iothread = IoThread::spawn("poll-panics").unwrap();
    let handle = iothread
        .handle()
        .spawn(|co| -> u32 {
            co.block_on(std::future::poll_fn(|_| -> Poll<u32> { panic::panic_any(1234u64) }))
        })
        .unwrap();
    assert_eq!(handle.join().unwrap_err().downcast_ref::<u64>(), Some(&1234));
    assert_eq!(iothread.handle().spawn(|_| 1).unwrap().join().unwrap(), 1, "the IoThread died");
    iothread.stop();
}

#[test]
fn block_on_nested_in_a_futures_poll_resumes_both_in_order() {
    // The outer wait stays registered while the inner one suspends the coroutine; a stray
    // resume for either cannot end the other early.
    let ctx = AioContext::new().unwrap();
    let value = ctx.run(|co| {
        let (inner_tx, inner_rx) = tokio::sync::oneshot::channel::<u32>();
        let (tx, mut outer_rx) = tokio::sync::oneshot::channel::<u32>();
        let mut outer_tx = Some(tx);
        let mut inner_rx = Some(inner_rx);
        thread::spawn(move || inner_tx.send(1).unwrap());
        co.block_on(std::future::poll_fn(|cx| {
            if let Some(inner) = inner_rx.take() {
                let first = co.block_on(inner).unwrap();
                let tx = outer_tx.take().unwrap();
                thread::spawn(move || tx.send(first + 1).unwrap());
            }
            Pin::new(&mut outer_rx).poll(cx).map(Result::unwrap)
        }))
    });
    assert_eq!(value, 2);
}

/// How many wakes each thread of the wake storm makes (`AIOCORO_WAKE_STORM`; short in CI).
fn wake_storm_rounds() -> usize {
    std::env::var("AIOCORO_WAKE_STORM").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

#[test]
fn a_storm_of_wakes_from_many_threads_is_harmless_before_and_after_the_stop() {
    // Eight threads wake the latest waker the coroutine left, then wakers of a coroutine that
    // ended on an IoThread that stopped: no panic on a waking thread (the scope would resume
    // it), the coroutine resumes for the wake that finds it done, and valgrind (CI) sees no
    // invalid access.
    let iothread = IoThread::spawn("storm").unwrap();
    let latest: Arc<Mutex<Option<Waker>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (l, d) = (latest.clone(), done.clone());
    let handle = iothread
        .handle()
        .spawn(move |co| {
            let mut polls = 0usize;
            co.block_on(std::future::poll_fn(|cx| {
                polls += 1;
                if d.load(Ordering::SeqCst) {
                    return Poll::Ready(polls);
                }
                *l.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }))
        })
        .unwrap();
    let wake_all = |waker_of: &(dyn Fn() -> Option<Waker> + Sync), rounds: usize| {
        thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| (0..rounds).filter_map(|_| waker_of()).for_each(Waker::wake));
            }
        });
    };
    let rounds = wake_storm_rounds();
    wake_all(&|| latest.lock().unwrap().clone(), rounds);
    done.store(true, Ordering::SeqCst);
    latest.lock().unwrap().clone().unwrap().wake();
    assert!(handle.join().unwrap() >= 2, "the last wake did not resume the coroutine");
    let kept = latest.lock().unwrap().take().unwrap();
    iothread.stop();
    // Woken again and again after the coroutine ended and its context is gone.
    wake_all(&|| Some(kept.clone()), rounds);
}

#[test]
fn join_in_a_callback_on_the_coroutines_own_iothread_polls_it_instead_of_deadlocking() {
    let iothread = IoThread::spawn("join-at-home").unwrap();
    let (joined_tx, joined) = mpsc::channel();
    let here = iothread.handle().clone();
    iothread
        .handle()
        .schedule_oneshot(move || {
            let handle = here
                .spawn(|co| {
                    co.sleep(Duration::from_millis(5));
                    thread::current().name().map(String::from)
                })
                .unwrap();
            joined_tx.send(handle.join().unwrap()).unwrap();
        })
        .unwrap();
    let ran_on = joined.recv_timeout(Duration::from_secs(30)).expect("the join deadlocked");
    assert_eq!(ran_on.as_deref(), Some("join-at-home"));
    iothread.stop();
}

#[test]
fn block_on_cancelled_by_an_iothread_stop_drops_the_future_on_that_thread() {
    /// Sends the name of the thread that drops it.
    struct ReportsDrop(mpsc::Sender<Option<String>>);

    impl Drop for ReportsDrop {
        fn drop(&mut self) {
            let _ = self.0.send(thread::current().name().map(String::from));
        }
    }

    let iothread = IoThread::spawn("drops-here").unwrap();
    let (dropped_tx, dropped) = mpsc::channel();
    let (started_tx, started) = mpsc::channel();
    let (_never_tx, never) = tokio::sync::oneshot::channel::<()>();
    let handle = iothread
        .handle()
        .spawn(move |co| {
            let report = ReportsDrop(dropped_tx);
            started_tx.send(()).unwrap();
            co.block_on(async move {
                let _report = report;
                never.await
            })
        })
        .unwrap();
    started.recv_timeout(Duration::from_secs(10)).expect("the coroutine started");
    iothread.stop();
    let on = dropped.recv_timeout(Duration::from_secs(10)).expect("the future was leaked");
    assert_eq!(on.as_deref(), Some("drops-here"));
    assert_eq!(handle.join().unwrap_err().downcast_ref::<&str>(), Some(&CANCELLED));
}

#[test]
fn joiners_of_a_coroutine_the_stop_leaks_get_cancelled_instead_of_waiting_forever() {
    // Workers parked on a CoQueue under a NoLock: the shutdown cannot reach such a park, so it
    // leaks them (they never run again). Their joiners (a thread, a tokio task, a coroutine of
    // another context) must hear of it once the context is down.
    let iothread = IoThread::spawn("leaks-workers").unwrap();
    let (parked_tx, parked) = mpsc::channel();
    let mut workers = (0..3).map(|_| {
        let parked_tx = parked_tx.clone();
        iothread
            .handle()
            .spawn(move |co| -> u32 {
                let state = Rc::new((NoLock::new(false), CoQueue::new()));
                let (lock, queue) = &*state;
                let mut guard = lock.lock(co);
                parked_tx.send(()).unwrap();
                while !*guard {
                    queue.wait(co, &mut guard);
                }
                1
            })
            .unwrap()
    });
    let (by_thread, by_tokio, by_coroutine) =
        (workers.next().unwrap(), workers.next().unwrap(), workers.next().unwrap());
    for _ in 0..3 {
        parked.recv_timeout(Duration::from_secs(10)).expect("the worker parks");
    }
    let (outcome_tx, outcomes) = mpsc::channel::<(&str, Option<&'static str>)>();
    let payload = |error: Box<dyn std::any::Any + Send>| error.downcast_ref::<&str>().copied();
    let tx = outcome_tx.clone();
    thread::spawn(move || tx.send(("thread", by_thread.join().err().and_then(payload))).unwrap());
    let tx = outcome_tx.clone();
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let joined = runtime.block_on(async move { tokio::spawn(by_tokio).await });
        tx.send(("tokio", joined.err().map(|error| error.into_panic()).and_then(payload))).unwrap()
    });
    thread::spawn(move || {
        let ctx = AioContext::new().unwrap();
        let joined = ctx.run(move |co| co.join(by_coroutine).err().and_then(payload));
        outcome_tx.send(("coroutine", joined)).unwrap()
    });
    iothread.stop();
    for _ in 0..3 {
        let (joiner, outcome) =
            outcomes.recv_timeout(Duration::from_secs(30)).expect("a joiner waits forever");
        assert_eq!(outcome, Some(CANCELLED), "the {joiner} joiner");
    }
}
