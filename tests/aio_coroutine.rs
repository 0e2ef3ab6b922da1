//! Coroutines in contexts: spawning here and elsewhere, waking from any thread, stale and
//! duplicate wakes, wake order, IoThreads, wait-while, and misuse.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread, WakeReason, Waker};
use aiocoro::coroutine::Coroutine;

type Log = Rc<RefCell<Vec<String>>>;

fn log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

#[test]
fn a_spawned_coroutine_runs_at_the_next_poll_on_the_home_thread() {
    let ctx = AioContext::new().unwrap();
    let seen = log();
    let s = seen.clone();
    let co = ctx.spawn(move |_co| s.borrow_mut().push(format!("{:?}", thread::current().id())));
    assert!(seen.borrow().is_empty(), "spawn does not run the body on the spot");
    assert!(ctx.poll(false));
    assert!(co.is_finished());
    assert_eq!(*seen.borrow(), [format!("{:?}", thread::current().id())]);
}

#[test]
fn a_waker_resumes_its_coroutine_from_another_thread() {
    let ctx = AioContext::new().unwrap();
    let (tx, rx) = mpsc::channel::<Waker>();
    let steps = log();
    let s = steps.clone();
    let co = ctx.spawn(move |co| {
        let wait = co.prepare_wait();
        tx.send(wait.waker()).unwrap();
        s.borrow_mut().push("waiting".into());
        assert_eq!(wait.wait(), WakeReason::Woken);
        s.borrow_mut().push(format!("resumed on {:?}", thread::current().id()));
    });
    ctx.poll(false);
    assert_eq!(ctx.suspended_coroutines(), 1);
    let waker = rx.recv().unwrap();
    thread::spawn(move || waker.wake()).join().unwrap();
    co.join().unwrap();
    assert_eq!(
        *steps.borrow(),
        ["waiting".to_string(), format!("resumed on {:?}", thread::current().id())]
    );
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn duplicate_and_concurrent_wakes_resume_once() {
    let ctx = AioContext::new().unwrap();
    let resumes = Rc::new(RefCell::new(0));
    let r = resumes.clone();
    let (tx, rx) = mpsc::channel::<Waker>();
    let co = ctx.spawn(move |co| {
        let wait = co.prepare_wait();
        tx.send(wait.waker()).unwrap();
        wait.wait();
        *r.borrow_mut() += 1;
        // A second wait that nobody wakes: the duplicates of the first must not end it.
        let second = co.prepare_wait();
        tx.send(second.waker()).unwrap();
        second.wait();
        *r.borrow_mut() += 1;
    });
    ctx.poll(false);
    let first = rx.recv().unwrap();
    let wakers: Vec<_> = (0..4)
        .map(|_| {
            let waker = first.clone();
            thread::spawn(move || waker.wake())
        })
        .collect();
    for waker in wakers {
        waker.join().unwrap();
    }
    first.wake();
    ctx.wait_while(|| *resumes.borrow() < 1);
    let second = rx.recv().unwrap();
    first.wake(); // stale: its suspension is over
    drain(&ctx);
    assert_eq!(*resumes.borrow(), 1, "stale wakes did not end the second wait");
    assert!(!co.is_finished());
    second.wake();
    drain(&ctx);
    assert_eq!(*resumes.borrow(), 2);
    assert!(co.is_finished());
}

#[test]
fn a_stray_enter_does_not_end_a_wait() {
    let ctx = AioContext::new().unwrap();
    let (tx, rx) = mpsc::channel::<Waker>();
    let done = Rc::new(RefCell::new(false));
    let d = done.clone();
    let coroutine = Rc::new(RefCell::new(None));
    let c = coroutine.clone();
    ctx.spawn(move |co| {
        *c.borrow_mut() = Some(co.current());
        let wait = co.prepare_wait();
        tx.send(wait.waker()).unwrap();
        wait.wait();
        *d.borrow_mut() = true;
    });
    ctx.poll(false);
    coroutine.borrow().as_ref().unwrap().enter(); // not a wake
    assert!(!*done.borrow(), "the coroutine went back to waiting");
    rx.recv().unwrap().wake();
    drain(&ctx);
    assert!(*done.borrow());
}

#[test]
fn coroutines_woken_inside_a_coroutine_run_after_it_yields_in_wake_order() {
    let ctx = AioContext::new().unwrap();
    let order = log();
    let wakers = Rc::new(RefCell::new(Vec::new()));
    for name in ["a", "b", "c"] {
        let o = order.clone();
        let w = wakers.clone();
        ctx.spawn(move |co| {
            let wait = co.prepare_wait();
            w.borrow_mut().push((name, wait.local_waker()));
            wait.wait();
            o.borrow_mut().push(name.to_string());
        });
    }
    drain(&ctx);
    let o = order.clone();
    let w = wakers.clone();
    let waker = ctx.spawn(move |co| {
        let by_name =
            |wanted: &str| w.borrow().iter().find(|(name, _)| *name == wanted).unwrap().1.clone();
        by_name("c").wake();
        by_name("a").wake();
        by_name("b").wake();
        o.borrow_mut().push("waker still running".into());
        co.sleep(Duration::ZERO);
        o.borrow_mut().push("waker after its yield".into());
    });
    waker.join().unwrap();
    assert_eq!(*order.borrow(), ["waker still running", "c", "a", "b", "waker after its yield"]);
}

#[test]
fn a_timeout_ends_a_wait_nobody_wakes() {
    let ctx = AioContext::new().unwrap();
    let outcome = ctx.run(|co| {
        let wait = co.prepare_wait();
        let waker = wait.waker();
        let outcome = wait.wait_timeout(Duration::from_millis(2));
        waker.wake(); // stale now: harmless
        outcome
    });
    assert_eq!(outcome, WakeReason::TimedOut);
    drain(&ctx);
}

#[test]
fn a_coroutine_spawned_on_an_iothread_runs_there_and_wakes_across_threads() {
    let iothread = IoThread::spawn("aio-test-io").unwrap();
    let main = AioContext::new().unwrap();
    let main_handle = main.handle();
    let finished = Arc::new(AtomicUsize::new(0));
    for i in 0..10 {
        let finished = finished.clone();
        let main_handle = main_handle.clone();
        iothread
            .handle()
            .spawn(move |co| {
                assert_eq!(thread::current().name(), Some("aio-test-io"));
                co.sleep(Duration::from_micros(100 * i));
                finished.fetch_add(1, Ordering::AcqRel);
                main_handle.kick();
            })
            .unwrap();
    }
    // The main thread waits for the IoThread's work (AIO_WAIT_WHILE).
    main.wait_while(|| finished.load(Ordering::Acquire) < 10);
    iothread.stop();
}

#[test]
fn stopping_an_iothread_runs_what_was_already_scheduled() {
    let iothread = IoThread::spawn("aio-test-stop").unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let ran = ran.clone();
        iothread
            .handle()
            .schedule_oneshot(move || {
                ran.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
    }
    let handle = iothread.handle().clone();
    iothread.stop();
    assert_eq!(ran.load(Ordering::Relaxed), 100);
    assert!(handle.is_closed());
    assert!(handle.schedule_oneshot(|| {}).is_err(), "a stopped context refuses work");
}

#[test]
fn a_panic_on_an_iothread_reaches_stop() {
    let iothread = IoThread::spawn("aio-test-panic").unwrap();
    iothread.handle().spawn(|_co| panic!("boom in a coroutine")).unwrap();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| iothread.stop())).unwrap_err();
    let message = caught.downcast_ref::<&str>().copied().unwrap_or_default();
    assert_eq!(message, "boom in a coroutine");
}

#[test]
fn a_thread_has_one_context_and_can_make_a_new_one_after_dropping_it() {
    let ctx = AioContext::new().unwrap();
    let error = AioContext::new().expect_err("a second context on one thread");
    assert!(error.to_string().contains("already has an AioContext"), "{error}");
    let same = AioContext::current().expect("the current context");
    drop(same);
    drop(ctx);
    assert!(AioContext::current().is_none());
    let again = AioContext::new().unwrap();
    drop(again);
}

#[test]
fn dropping_a_context_with_a_suspended_coroutine_cancels_it() {
    thread::spawn(|| {
        let ctx = AioContext::new().unwrap();
        let co = ctx.spawn(|co| {
            co.prepare_wait().wait();
            unreachable!("nobody wakes the wait");
        });
        ctx.poll(false);
        drop(ctx);
        assert!(co.is_finished(), "the wait was cancelled and the coroutine unwound");
    })
    .join()
    .unwrap();
}

#[test]
fn poll_from_inside_a_coroutine_panics_naming_the_rule() {
    let ctx = AioContext::new().unwrap();
    let ctx2 = ctx.clone();
    let co = Coroutine::new(move |_co| {
        ctx2.poll(false);
    });
    let payload = panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err();
    let message = payload.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(message.contains("called from inside a coroutine"), "{message}");
}

#[test]
fn waiting_without_a_context_panics_naming_the_rule() {
    thread::spawn(|| {
        let co = Coroutine::new(|co| co.sleep(Duration::from_millis(1)));
        let payload = panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err();
        let message = payload.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("needs an AioContext on this thread"), "{message}");
    })
    .join()
    .unwrap();
}

#[test]
fn reschedule_lets_the_other_coroutines_run_first() {
    let ctx = AioContext::new().unwrap();
    let order = log();
    let mut coroutines = Vec::new();
    for name in ["a", "b"] {
        let o = order.clone();
        coroutines.push(ctx.spawn(move |co| {
            for round in 0..2 {
                o.borrow_mut().push(format!("{name}{round}"));
                co.reschedule();
            }
        }));
    }
    for co in coroutines {
        co.join().unwrap();
    }
    assert_eq!(*order.borrow(), ["a0", "b0", "a1", "b1"], "each reschedule let the other run");
}
