//! Timers, sleeping and wakeable sleeps.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, Sleeper, WakeReason, clock_ns};

#[test]
fn timers_fire_in_deadline_order_and_only_when_armed() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(RefCell::new(Vec::new()));
    let make = |name: &'static str| {
        let f = fired.clone();
        ctx.new_timer(move || f.borrow_mut().push(name))
    };
    let (late, early, cancelled, rearmed) =
        (make("late"), make("early"), make("cancelled"), make("rearmed"));
    let now = clock_ns();
    late.arm_at(now + 3_000_000);
    early.arm_at(now + 1_000_000);
    cancelled.arm_at(now + 500_000);
    cancelled.cancel();
    rearmed.arm_at(now + 100_000);
    rearmed.arm_at(now + 2_000_000); // re-arming moves the deadline
    assert!(late.is_armed() && !cancelled.is_armed());
    assert_eq!(rearmed.deadline_ns(), Some(now + 2_000_000));
    ctx.wait_while(|| fired.borrow().len() < 3);
    assert_eq!(*fired.borrow(), ["early", "rearmed", "late"]);
    assert!(!late.is_armed());
    while ctx.poll(false) {}
    assert_eq!(fired.borrow().len(), 3, "the cancelled timer never fired");
}

#[test]
fn a_blocking_poll_returns_when_the_nearest_timer_is_due() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(RefCell::new(false));
    let f = fired.clone();
    let timer = ctx.new_timer(move || *f.borrow_mut() = true);
    let deadline = clock_ns() + 2_000_000;
    timer.arm_at(deadline);
    // With nothing else to do, one blocking poll sleeps until the deadline and runs the timer.
    while !*fired.borrow() {
        ctx.poll(true);
    }
    assert!(clock_ns() >= deadline);
}

#[test]
fn a_dropped_timer_never_fires() {
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(RefCell::new(false));
    let f = fired.clone();
    let timer = ctx.new_timer(move || *f.borrow_mut() = true);
    timer.arm_after(Duration::ZERO);
    drop(timer);
    while ctx.poll(false) {}
    assert!(!*fired.borrow());
}

#[test]
fn sleep_suspends_for_at_least_its_duration() {
    let ctx = AioContext::new().unwrap();
    let slept = ctx.run(move |co| {
        let start = Instant::now();
        co.sleep(Duration::from_millis(3));
        start.elapsed()
    });
    assert!(slept >= Duration::from_millis(3));
}

#[test]
fn many_sleepers_wake_in_deadline_order() {
    let ctx = AioContext::new().unwrap();
    let order = Rc::new(RefCell::new(Vec::new()));
    let sleepers: Vec<_> = [5u64, 1, 4, 2, 3]
        .into_iter()
        .map(|delay| {
            let o = order.clone();
            ctx.spawn(move |co| {
                co.sleep(Duration::from_millis(delay));
                o.borrow_mut().push(delay);
            })
        })
        .collect();
    for sleeper in sleepers {
        sleeper.join().unwrap();
    }
    assert_eq!(*order.borrow(), [1, 2, 3, 4, 5]);
}

#[test]
fn a_sleeper_is_woken_early_from_another_thread() {
    let ctx = AioContext::new().unwrap();
    let sleeper = Arc::new(Sleeper::new());
    let s = sleeper.clone();
    let outcome = ctx.spawn(move |co| co.sleep_wakeable(Duration::from_secs(3600), &s));
    ctx.poll(false);
    assert!(!Sleeper::new().wake(), "nobody sleeps on a fresh sleeper");
    let remote = sleeper.clone();
    assert!(thread::spawn(move || remote.wake()).join().unwrap());
    assert_eq!(outcome.join().unwrap(), WakeReason::Woken);
    assert!(!sleeper.wake(), "the sleep is over");
}

#[test]
fn a_wakeable_sleep_times_out_when_nobody_wakes_it() {
    let ctx = AioContext::new().unwrap();
    let sleeper = Rc::new(Sleeper::new());
    let s = sleeper.clone();
    let outcome = ctx.run(move |co| co.sleep_wakeable(Duration::from_millis(1), &s));
    assert_eq!(outcome, WakeReason::TimedOut);
    assert!(!sleeper.wake());
}

#[test]
fn timers_due_at_the_same_time_fire_in_the_order_they_were_armed() {
    // As QEMU's timer_mod: a timer goes behind every timer armed before it for the same
    // deadline, however often each was armed before.
    let ctx = AioContext::new().unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let timer = |name: &'static str| {
        let log = log.clone();
        ctx.new_timer(move || log.borrow_mut().push(name))
    };
    let (a, b, c) = (timer("a"), timer("b"), timer("c"));
    let deadline = clock_ns();
    // `a` was armed often before, `b` once, `c` never: that must not move `c` or `b` ahead.
    for _ in 0..3 {
        a.arm_at(deadline + 1_000_000_000);
    }
    b.arm_at(deadline + 1_000_000_000);
    a.arm_at(deadline);
    b.arm_at(deadline);
    c.arm_at(deadline);
    while ctx.poll(false) {}
    assert_eq!(*log.borrow(), ["a", "b", "c"]);
}

#[test]
fn dropping_a_timer_whose_callback_owns_another_timer() {
    // A timer that re-arms a second one owns it; dropping the first drops the second with it.
    let ctx = AioContext::new().unwrap();
    let fired = Rc::new(RefCell::new(Vec::new()));
    let f = fired.clone();
    let second = ctx.new_timer(move || f.borrow_mut().push("second"));
    let first = ctx.new_timer(move || second.arm_at(0));
    first.arm_at(0);
    while ctx.poll(false) {}
    assert_eq!(*fired.borrow(), ["second"]);
    drop(first);
    // A new timer after the drop (which may take the freed slots) fires alone.
    let f = fired.clone();
    let third = ctx.new_timer(move || f.borrow_mut().push("third"));
    third.arm_at(0);
    while ctx.poll(false) {}
    assert_eq!(*fired.borrow(), ["second", "third"], "only the timer made after the drop fires");
}
