//! A closed context (`AioContext::close`) refuses new work from other threads, but keeps
//! polling what it accepted before: the wakes and bottom-half schedules that this work needs
//! from other threads must still get through until the context shuts down.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use aiocoro::aio::{AioContext, WakeReason, Waker};
use aiocoro::sync::{CoQueue, NoLock};

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
    assert!(co.is_finished());
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

/// `CoQueue::enter_next` enters the woken coroutine at once; that coroutine may drop the last
/// handle of its context, which then shuts down and is freed while `enter_next` is still on
/// the stack. Nothing of the context may be used after the enter (this passes either way in a
/// normal build; it pins the path that a reference held across the enter made unsound).
#[test]
fn a_coroutine_entered_by_enter_next_may_drop_the_last_context_handle() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(0), CoQueue::new()));
    let s = state.clone();
    let own = ctx.clone();
    let co = ctx.spawn(move |co| {
        let own = own;
        let (lock, queue) = &*s;
        let mut guard = lock.lock(co);
        queue.wait(co, &mut guard);
        *guard += 1;
        drop(guard);
        drop(own);
    });
    drain(&ctx);
    drop(ctx);
    let (lock, queue) = &*state;
    let mut guard = lock.lock_blocking();
    assert!(queue.enter_next(&mut guard));
    assert_eq!(*guard, 1);
    assert!(co.is_finished());
    assert!(AioContext::current().is_none(), "the coroutine's handle was the last one");
}

/// A callback that panics inside `poll` ends that poll, but must not take down the other
/// messages that arrived with it from other threads: a caller that catches the panic and keeps
/// polling still gets every wake, BH and one-shot.
#[test]
fn a_panicking_callback_loses_none_of_the_messages_that_arrived_with_it() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.handle();
    let runs = Rc::new(Cell::new(0));
    let r = runs.clone();
    let bh = ctx.new_bh(move || r.set(r.get() + 1));
    let bh_handle = bh.handle();
    let parked: Rc<RefCell<Option<Waker>>> = Rc::default();
    let p = parked.clone();
    let co = ctx.spawn(move |co| {
        let wait = co.prepare_wait();
        *p.borrow_mut() = Some(wait.waker());
        wait.wait();
    });
    drain(&ctx);
    let waker = parked.borrow_mut().take().unwrap();
    let oneshots = Arc::new(AtomicUsize::new(0));
    let o = oneshots.clone();
    thread::spawn(move || {
        handle.schedule_oneshot(|| panic!("boom in a one-shot")).unwrap();
        bh_handle.schedule();
        waker.wake();
        handle
            .schedule_oneshot(move || {
                o.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
    })
    .join()
    .unwrap();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| ctx.poll(false)));
    assert!(caught.is_err(), "the one-shot's panic reaches the poll");
    drain(&ctx);
    assert_eq!(runs.get(), 1, "the BH was lost");
    assert_eq!(oneshots.load(Ordering::Relaxed), 1, "the one-shot was lost");
    assert!(co.is_finished(), "the wake was lost");
}
