//! SharedResource: the count never goes past the total under contention from coroutines on
//! several IoThreads and a plain thread releasing; every waiter gets its units in the end (no
//! lost wake-up); permits; misuse panics with a clear message.

#[path = "common/sync_helpers.rs"]
mod sync_helpers;

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;
use sync_helpers::{collect, pass_turn};

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Coroutine;
use aiocoro::sync::SharedResource;

/// Runs everything runnable on `ctx`.
fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

#[test]
fn allocations_never_exceed_the_total_across_iothreads_and_a_releasing_thread() {
    const TOTAL: u64 = 5;
    const THREADS: usize = 3;
    const COROUTINES: usize = 4;
    const ROUNDS: u64 = 300;
    let resource = Arc::new(SharedResource::new(TOTAL));
    // Units between a successful allocation and their release, counted by the users.
    let in_use = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));

    // A plain thread that releases units handed to it.
    let (release_tx, release_rx) = mpsc::channel::<u64>();
    let releaser = {
        let (resource, in_use) = (resource.clone(), in_use.clone());
        thread::spawn(move || {
            let mut released = 0;
            for units in release_rx {
                in_use.fetch_sub(units, Ordering::SeqCst);
                resource.release(units);
                released += units;
            }
            released
        })
    };

    let (done_tx, done_rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("shres-{i}")).unwrap()).collect();
    for (t, iothread) in iothreads.iter().enumerate() {
        for c in 0..COROUTINES {
            let (resource, in_use, most) = (resource.clone(), in_use.clone(), most.clone());
            let (release_tx, done_tx) = (release_tx.clone(), done_tx.clone());
            let seed = (t * COROUTINES + c) as u64;
            iothread
                .handle()
                .spawn(move |co| {
                    let mut handed_off = 0;
                    for round in 0..ROUNDS {
                        let units = 1 + (round + seed) % 3;
                        resource.allocate(co, units);
                        let now = in_use.fetch_add(units, Ordering::SeqCst) + units;
                        most.fetch_max(now, Ordering::SeqCst);
                        assert!(now <= TOTAL, "{now} units in use of {TOTAL}");
                        pass_turn(co); // use them for a while
                        if round % 2 == 0 {
                            in_use.fetch_sub(units, Ordering::SeqCst);
                            resource.release(units);
                        } else {
                            release_tx.send(units).unwrap();
                            handed_off += units;
                        }
                    }
                    done_tx.send(handed_off).unwrap();
                })
                .unwrap();
        }
    }
    drop(release_tx);
    let handed_off: u64 = collect(&done_rx, THREADS * COROUTINES).into_iter().sum();
    for iothread in iothreads {
        iothread.stop();
    }
    let released = releaser.join().unwrap();
    assert_eq!(released, handed_off, "the plain thread released what it was handed");
    assert!(released > 0);
    let most = most.load(Ordering::SeqCst);
    assert!(most <= TOTAL, "{most} units were in use at once, of {TOTAL}");
    assert!(most > 1, "the coroutines never held units at the same time");
    assert_eq!(resource.available(), TOTAL, "every unit came back");
}

#[test]
fn every_waiter_on_several_iothreads_gets_its_units_in_the_end() {
    const TOTAL: u64 = 4;
    const THREADS: usize = 3;
    const COROUTINES: usize = 8;
    let resource = Arc::new(SharedResource::new(TOTAL));
    // The test holds everything while all the coroutines queue, then lets go.
    assert!(resource.try_allocate(TOTAL));
    let waiting = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("shres-wait-{i}")).unwrap()).collect();
    for (t, iothread) in iothreads.iter().enumerate() {
        for c in 0..COROUTINES {
            let (resource, waiting, done_tx) = (resource.clone(), waiting.clone(), done_tx.clone());
            // More than half of the total: mostly one holder at a time.
            let units = 3 + ((t + c) % 2) as u64;
            iothread
                .handle()
                .spawn(move |co| {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let permit = resource.allocate_permit(co, units);
                    assert_eq!(permit.units(), units);
                    co.sleep(Duration::from_micros(50));
                    drop(permit);
                    done_tx.send(units).unwrap();
                })
                .unwrap();
        }
    }
    while waiting.load(Ordering::SeqCst) < (THREADS * COROUTINES) as u64 {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(resource.available(), 0);
    resource.release(TOTAL); // from a plain thread
    let served = collect(&done_rx, THREADS * COROUTINES);
    for iothread in iothreads {
        iothread.stop();
    }
    assert_eq!(served.len(), THREADS * COROUTINES);
    assert_eq!(resource.available(), TOTAL);
}

#[test]
fn a_release_wakes_every_waiter_and_those_that_fit_take_their_units() {
    let ctx = AioContext::new().unwrap();
    let resource = Arc::new(SharedResource::new(4));
    assert!(resource.try_allocate(4));
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut waiters = Vec::new();
    for (name, units) in [("B", 2), ("C", 3), ("D", 1)] {
        let (resource, log) = (resource.clone(), log.clone());
        waiters.push(ctx.spawn(move |co| {
            resource.allocate(co, units);
            log.borrow_mut().push(name);
        }));
    }
    drain(&ctx);
    assert!(log.borrow().is_empty(), "nothing is free");
    assert_eq!(ctx.suspended_coroutines(), 3);

    // Released by a plain thread: every waiter re-checks, in the order they queued.
    let r = resource.clone();
    thread::spawn(move || r.release(4)).join().unwrap();
    drain(&ctx);
    assert_eq!(*log.borrow(), ["B", "D"], "C needs 3 of the 2 left after B");
    assert_eq!(resource.available(), 1);
    assert!(!waiters[1].is_finished());

    resource.release(2); // B's units
    drain(&ctx);
    assert_eq!(*log.borrow(), ["B", "D", "C"]);
    assert_eq!(resource.available(), 0);
    assert!(waiters.iter().all(aiocoro::aio::JoinHandle::is_finished));
    resource.release(4);
    assert_eq!(resource.available(), resource.total());
}

#[test]
fn try_allocate_takes_only_what_is_free() {
    let resource = SharedResource::new(3);
    assert_eq!(resource.total(), 3);
    assert!(resource.try_allocate(2));
    assert!(!resource.try_allocate(2), "only one unit is left");
    assert_eq!(resource.available(), 1, "a refused request takes nothing");
    assert!(resource.try_allocate(1));
    assert!(!resource.try_allocate(1));
    assert!(resource.try_allocate(0), "nothing is always available");
    resource.release(3);
    assert_eq!(resource.available(), 3);
}

#[test]
fn permits_give_their_units_back_when_dropped_on_any_thread() {
    let resource = SharedResource::new(4);
    let permit = resource.try_allocate_permit(3).expect("all units are free");
    assert_eq!(permit.units(), 3);
    assert_eq!(resource.available(), 1);
    assert!(resource.try_allocate_permit(2).is_none());
    assert_eq!(resource.available(), 1, "a refused permit takes and gives nothing");
    thread::scope(|s| {
        s.spawn(move || drop(permit));
    });
    assert_eq!(resource.available(), 4);
}

#[test]
fn allocating_more_than_the_total_panics_with_a_clear_message() {
    let resource = Rc::new(SharedResource::new(4));
    let r = resource.clone();
    let panic = panic::catch_unwind(AssertUnwindSafe(|| {
        Coroutine::new(move |co| r.allocate(co, 5)).enter();
    }))
    .expect_err("a request larger than the resource must panic");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(
        message.contains("SharedResource::allocate asked for 5 unit(s)")
            && message.contains("only 4 in total"),
        "unclear message: {message}"
    );
    assert_eq!(resource.available(), 4, "the refused request took nothing");
}

#[test]
#[should_panic(expected = "SharedResource::try_allocate asked for 9 unit(s) of a resource that \
                           has only 8 in total")]
fn try_allocating_more_than_the_total_panics() {
    SharedResource::new(8).try_allocate(9);
}

#[test]
fn releasing_more_than_was_allocated_panics_and_changes_nothing() {
    let resource = SharedResource::new(4);
    assert!(resource.try_allocate(1));
    let panic = panic::catch_unwind(AssertUnwindSafe(|| resource.release(2)))
        .expect_err("releasing more than was allocated must panic");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(
        message.contains(
            "SharedResource::release gave back 2 unit(s), but only 1 of its 4 are \
                          allocated"
        ),
        "unclear message: {message}"
    );
    assert_eq!(resource.available(), 3, "the count is unchanged");
    // Still usable: the lock was not left held.
    resource.release(1);
    assert_eq!(resource.available(), 4);
}

#[test]
#[should_panic(expected = "but only 0 of its 2 are allocated")]
fn releasing_an_absurd_amount_panics_instead_of_overflowing() {
    SharedResource::new(2).release(u64::MAX);
}
