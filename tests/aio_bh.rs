//! Bottom halves and one-shots: scheduling from any thread, coalescing, cancel, delete, order,
//! and the notify_me handshake that keeps a busy context free of eventfd writes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;

use aiocoro::aio::AioContext;

fn counter() -> (Rc<Cell<u32>>, impl Fn() + 'static) {
    let count = Rc::new(Cell::new(0));
    let c = count.clone();
    (count, move || c.set(c.get() + 1))
}

fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

#[test]
fn a_bh_runs_once_per_schedule_and_schedules_coalesce() {
    let ctx = AioContext::new().unwrap();
    let (runs, bump) = counter();
    let bh = ctx.new_bh(bump);
    assert!(!ctx.poll(false), "nothing is scheduled yet");
    bh.schedule();
    assert!(bh.is_scheduled());
    bh.schedule();
    bh.handle().schedule();
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 1, "three schedules while pending run once");
    assert!(!bh.is_scheduled());
    bh.schedule();
    drain(&ctx);
    assert_eq!(runs.get(), 2);
}

#[test]
fn cancel_unschedules_and_a_new_schedule_revives() {
    let ctx = AioContext::new().unwrap();
    let (runs, bump) = counter();
    let bh = ctx.new_bh(bump);
    bh.schedule();
    bh.cancel();
    assert!(!bh.is_scheduled());
    drain(&ctx);
    assert_eq!(runs.get(), 0);
    bh.schedule();
    drain(&ctx);
    assert_eq!(runs.get(), 1);
}

#[test]
fn a_deleted_bh_never_runs_and_its_handles_do_nothing() {
    let ctx = AioContext::new().unwrap();
    let (runs, bump) = counter();
    let bh = ctx.new_bh(bump);
    let remote = bh.handle();
    bh.schedule();
    drop(bh);
    drain(&ctx);
    assert_eq!(runs.get(), 0, "the pending run was dropped with the BH");
    thread::spawn(move || {
        remote.schedule();
        assert!(!remote.is_scheduled());
    })
    .join()
    .unwrap();
    drain(&ctx);
    assert_eq!(runs.get(), 0);
    // A new BH may reuse the deleted one's place; the old handle must not reach it.
    let (new_runs, bump) = counter();
    let _new = ctx.new_bh(bump);
    drain(&ctx);
    assert_eq!(new_runs.get(), 0);
}

#[test]
fn a_bh_scheduled_from_another_thread_runs_on_the_home_thread() {
    let ctx = AioContext::new().unwrap();
    let ran_on = Rc::new(RefCell::new(None));
    let r = ran_on.clone();
    let bh = ctx.new_bh(move || *r.borrow_mut() = Some(thread::current().id()));
    let remote = bh.handle();
    thread::spawn(move || remote.schedule()).join().unwrap();
    ctx.wait_while(|| ran_on.borrow().is_none());
    assert_eq!(*ran_on.borrow(), Some(thread::current().id()));
}

#[test]
fn home_thread_bhs_and_oneshots_run_in_schedule_order() {
    let ctx = AioContext::new().unwrap();
    let order = Rc::new(RefCell::new(Vec::new()));
    let bhs: Vec<_> = (0..3)
        .map(|i| {
            let o = order.clone();
            ctx.new_bh(move || o.borrow_mut().push(format!("bh{i}")))
        })
        .collect();
    bhs[2].schedule();
    let o = order.clone();
    ctx.schedule_oneshot(move || o.borrow_mut().push("oneshot".into()));
    bhs[0].schedule();
    bhs[1].schedule();
    drain(&ctx);
    assert_eq!(*order.borrow(), ["bh2", "oneshot", "bh0", "bh1"]);
}

#[test]
fn oneshots_from_another_thread_run_in_arrival_order_before_local_ones() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.handle();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = order.clone();
    ctx.schedule_oneshot(move || o.lock().unwrap().push(100));
    thread::spawn({
        let order = order.clone();
        move || {
            for i in 0..5 {
                let o = order.clone();
                handle.schedule_oneshot(move || o.lock().unwrap().push(i)).unwrap();
            }
        }
    })
    .join()
    .unwrap();
    drain(&ctx);
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 100]);
}

#[test]
fn a_bh_scheduled_while_bhs_run_waits_for_the_next_poll() {
    let ctx = AioContext::new().unwrap();
    let (runs, bump) = counter();
    let again = Rc::new(RefCell::new(None::<aiocoro::aio::BhHandle>));
    let a = again.clone();
    let bh = ctx.new_bh(move || {
        bump();
        if let Some(handle) = a.borrow().as_ref() {
            handle.schedule();
        }
    });
    *again.borrow_mut() = Some(bh.handle());
    bh.schedule();
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 1, "the BH rescheduled itself but ran once in this poll");
    assert!(ctx.poll(false));
    assert_eq!(runs.get(), 2);
    bh.cancel();
}

#[test]
fn a_blocked_context_always_wakes_for_a_cross_thread_bh() {
    let ctx = AioContext::new().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let bh = ctx.new_bh(move || {
        h.fetch_add(1, Ordering::Relaxed);
    });
    let remote = bh.handle();
    let (go, go_rx) = mpsc::channel::<()>();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let producer = thread::spawn(move || {
        for round in 1..=500 {
            go_rx.recv().unwrap();
            remote.schedule();
            while s.load(Ordering::Acquire) < round {
                thread::yield_now();
            }
        }
    });
    for round in 1..=500 {
        go.send(()).unwrap();
        // Blocks until the BH arrives: a lost wake-up would hang here.
        ctx.wait_while(|| hits.load(Ordering::Relaxed) < round);
        seen.store(round, Ordering::Release);
    }
    producer.join().unwrap();
    assert!(ctx.handle().eventfd_writes() >= 1, "a blocked context needs the eventfd");
}

#[test]
fn a_busy_context_gets_cross_thread_bhs_without_eventfd_writes() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.handle();
    let ran = Rc::new(Cell::new(0usize));
    let r = ran.clone();
    let bh = ctx.new_bh(move || r.set(r.get() + 1));
    let remote = bh.handle();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let start = Arc::new(Barrier::new(2));
    let s = start.clone();
    let producer = thread::spawn(move || {
        s.wait();
        for _ in 0..20_000 {
            remote.schedule();
        }
        d.store(true, Ordering::Release);
    });
    start.wait();
    // Busy: never block, just keep polling until the producer is done.
    while !done.load(Ordering::Acquire) {
        ctx.poll(false);
    }
    producer.join().unwrap();
    drain(&ctx);
    assert!(ran.get() >= 1);
    assert_eq!(handle.eventfd_writes(), 0, "nobody had to wake a context that never blocked");
}

#[test]
fn a_kick_always_ends_a_blocking_wait_while() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.handle();
    let round = Arc::new(AtomicUsize::new(0));
    let r = round.clone();
    let worker = thread::spawn(move || {
        for n in 1..=500 {
            // Let the main thread get into (or close to) its blocking poll, then release it.
            thread::yield_now();
            r.store(n, Ordering::Release);
            handle.kick();
        }
    });
    for n in 1..=500 {
        // The condition lives outside the context: only the kick can end the blocking poll.
        ctx.wait_while(|| round.load(Ordering::Acquire) < n);
    }
    worker.join().unwrap();
}

#[test]
fn a_closed_context_refuses_new_work_and_still_runs_what_it_accepted() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    handle
        .schedule_oneshot(move || {
            r.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    ctx.close();
    assert!(handle.is_closed());
    let r = ran.clone();
    let refused = handle.schedule_oneshot(move || {
        r.fetch_add(100, Ordering::Relaxed);
    });
    assert_eq!(refused, Err(aiocoro::aio::ContextClosed));
    let error = std::io::Error::from(refused.unwrap_err());
    assert!(error.get_ref().is_some_and(|inner| inner.is::<aiocoro::aio::ContextClosed>()));
    assert!(error.to_string().contains("closed"), "{error}");
    assert!(handle.spawn(|_co| {}).is_err());
    drain(&ctx);
    assert_eq!(ran.load(Ordering::Relaxed), 1, "accepted work ran, refused work did not");
}

#[test]
fn dropping_a_bottom_half_whose_callback_owns_another_bottom_half() {
    // A BH that schedules another owns it; dropping the first drops the second with it.
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let second = ctx.new_bh(move || r.set(r.get() + 1));
    let first = ctx.new_bh(move || second.schedule());
    first.schedule();
    drain(&ctx);
    drain(&ctx);
    assert_eq!(runs.get(), 1);
    drop(first);
    // A new BH after the drop (which may take the freed slots) runs alone.
    let third_runs = Rc::new(Cell::new(0));
    let t = third_runs.clone();
    let third = ctx.new_bh(move || t.set(t.get() + 1));
    third.schedule();
    drain(&ctx);
    assert_eq!(third_runs.get(), 1, "the BH made after the drop did not run");
    assert_eq!(runs.get(), 1, "the dropped second BH ran again");
}
