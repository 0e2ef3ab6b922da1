//! A closed context (`AioContext::close`) refuses new work from other threads, but keeps
//! polling what it accepted before: the wakes and bottom-half schedules that this work needs
//! from other threads must still get through until the context shuts down.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::thread;

use aiocoro::aio::{AioContext, WakeReason, Waker};

fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

#[test]
fn a_coroutine_of_a_closed_context_can_still_be_woken_from_another_thread() {
    let ctx = AioContext::new().unwrap();
    let parked: Rc<RefCell<Option<Waker>>> = Rc::default();
    let p = parked.clone();
    let woken = Rc::new(Cell::new(None));
    let w = woken.clone();
    let co = ctx.spawn(move |co| {
        let wait = co.prepare_wait();
        *p.borrow_mut() = Some(wait.waker());
        w.set(Some(wait.wait()));
    });
    drain(&ctx);
    ctx.close();
    let waker = parked.borrow_mut().take().unwrap();
    thread::spawn(move || waker.wake()).join().unwrap();
    drain(&ctx);
    assert_eq!(woken.get(), Some(WakeReason::Woken), "the wake from another thread was lost");
    assert!(co.is_ended());
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn a_bottom_half_scheduled_from_another_thread_after_close_runs_and_stays_usable() {
    let ctx = AioContext::new().unwrap();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let bh = ctx.new_bh(move || r.set(r.get() + 1));
    let handle = bh.handle();
    ctx.close();
    thread::spawn(move || handle.schedule()).join().unwrap();
    drain(&ctx);
    assert_eq!(runs.get(), 1, "the schedule from another thread was lost");
    bh.schedule();
    drain(&ctx);
    assert_eq!(runs.get(), 2, "the BH no longer runs when scheduled from its home thread");
}
