//! CoMutex: mutual exclusion across IoThreads, FIFO hand-over, no barging, and the debug check
//! of thread locks held across a yield.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::sync::{CoMutex, ThreadMutex};

/// A counter that is deliberately not atomic: a read, a yield point, a write.
struct Racy(Cell<u64>);
// SAFETY: (a test) only ever touched under the CoMutex that owns it.
unsafe impl Send for Racy {}

#[test]
fn coroutines_on_several_iothreads_never_overlap() {
    const THREADS: usize = 3;
    const COROUTINES: usize = 4;
    const ROUNDS: u64 = 500;
    let shared = Arc::new(CoMutex::new(Racy(Cell::new(0))));
    let inside = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("comutex-{i}")).unwrap()).collect();
    for iothread in &iothreads {
        for _ in 0..COROUTINES {
            let (shared, inside, done_tx) = (shared.clone(), inside.clone(), done_tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    for round in 0..ROUNDS {
                        let guard = shared.lock(co);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        let value = guard.0.get();
                        if round % 7 == 0 {
                            co.sleep(Duration::ZERO); // hold it across a yield now and then
                        }
                        guard.0.set(value + 1);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                    done_tx.send(()).unwrap();
                })
                .unwrap();
        }
    }
    for _ in 0..THREADS * COROUTINES {
        done_rx.recv_timeout(Duration::from_secs(60)).expect("a coroutine never finished");
    }
    for iothread in iothreads {
        iothread.stop();
    }
    let total = Arc::try_unwrap(shared).ok().unwrap().into_inner().0.get();
    assert_eq!(total, (THREADS * COROUTINES) as u64 * ROUNDS);
}

#[test]
fn queued_waiters_get_the_lock_in_fifo_order_and_nobody_barges() {
    let ctx = AioContext::new().unwrap();
    let mutex = Rc::new(CoMutex::new(Vec::new()));
    let holder = {
        let mutex = mutex.clone();
        ctx.spawn(move |co| {
            let mut guard = mutex.lock(co);
            guard.push("holder");
            co.sleep(Duration::from_millis(2)); // everybody else queues meanwhile
        })
    };
    ctx.poll(false);
    for name in ["a", "b", "c", "d"] {
        let mutex = mutex.clone();
        ctx.spawn(move |co| mutex.lock(co).push(name));
        ctx.poll(false);
    }
    assert!(mutex.try_lock().is_none(), "try_lock does not barge past the queue");
    let late = {
        let mutex = mutex.clone();
        ctx.spawn(move |co| mutex.lock(co).push("late"))
    };
    holder.join().unwrap();
    late.join().unwrap();
    while ctx.poll(false) {}
    assert_eq!(*mutex.try_lock().unwrap(), ["holder", "a", "b", "c", "d", "late"]);
}

#[test]
fn an_uncontended_lock_is_free_again_after_the_guard() {
    let ctx = AioContext::new().unwrap();
    let mutex = Rc::new(CoMutex::new(5));
    let m = mutex.clone();
    ctx.spawn(move |co| {
        {
            let mut guard = m.lock(co);
            *guard += 1;
            assert!(m.raw().is_locked());
            assert!(m.try_lock().is_none());
        }
        assert!(!m.raw().is_locked());
    });
    while ctx.poll(false) {}
    assert_eq!(*mutex.try_lock().unwrap(), 6);
}

#[test]
fn a_yield_while_holding_a_thread_lock_panics_in_debug_builds() {
    if !cfg!(debug_assertions) {
        return; // the check is a debug-build one; release builds skip the bookkeeping
    }
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(ThreadMutex::new(()));
    let message = Rc::new(RefCell::new(String::new()));
    let (l, m) = (lock.clone(), message.clone());
    ctx.spawn(move |co| {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = l.lock(co);
            co.sleep(Duration::ZERO);
        }));
        let payload = result.unwrap_err();
        *m.borrow_mut() = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    });
    while ctx.poll(false) {}
    let message = message.borrow();
    assert!(
        message.contains("yielded while holding 1 guard(s) of a thread-blocking lock"),
        "{message}"
    );
    assert!(lock.try_lock().is_some(), "the guard was released by the unwinding");
}

#[test]
fn assert_locked_passes_for_the_holder_and_panics_for_others() {
    let ctx = AioContext::new().unwrap();
    let mutex = Rc::new(CoMutex::new(()));
    let m = mutex.clone();
    let holder = ctx.spawn(move |co| {
        let _guard = m.lock(co);
        m.assert_locked();
        co.sleep(Duration::from_millis(1));
    });
    ctx.poll(false);
    let m = mutex.clone();
    let other = ctx.spawn(move |_co| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.assert_locked())).is_err()
    });
    let caught = other.join().unwrap();
    holder.join().unwrap();
    assert_eq!(
        caught,
        cfg!(debug_assertions),
        "debug builds catch a non-holder; release builds only check that somebody holds it"
    );
    let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mutex.assert_locked()))
        .unwrap_err();
    let message = payload.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(message.contains("not locked"), "{message}");
}

#[test]
fn a_waiter_parked_behind_a_holder_of_its_thread_counts_as_suspended_and_ignores_stray_entries() {
    let ctx = AioContext::new().unwrap();
    let mutex = Rc::new(CoMutex::new(Vec::new()));
    let release = Rc::new(Cell::new(false));
    let (m, r) = (mutex.clone(), release.clone());
    let holder = ctx.spawn(move |co| {
        let mut guard = m.lock(co);
        guard.push("holder");
        while !r.get() {
            co.sleep(Duration::from_millis(1));
        }
    });
    ctx.poll(false);
    let m = mutex.clone();
    let coroutine = Rc::new(RefCell::new(None));
    let c = coroutine.clone();
    let waiter = ctx.spawn(move |co| {
        *c.borrow_mut() = Some(co.current());
        m.lock(co).push("waiter");
    });
    ctx.poll(false);
    assert_eq!(ctx.suspended_coroutines(), 2, "the holder sleeps, the waiter is parked");
    coroutine.borrow().as_ref().unwrap().enter(); // a stray entry: the waiter must stay parked, without the lock
    assert!(!waiter.is_finished());
    assert_eq!(ctx.suspended_coroutines(), 2);
    release.set(true);
    holder.join().unwrap();
    waiter.join().unwrap();
    assert_eq!(ctx.suspended_coroutines(), 0);
    assert_eq!(*mutex.try_lock().unwrap(), ["holder", "waiter"]);
}

/// A lock that must queue behind a holder on another thread, from a coroutine that may not
/// yield (a thread-lock guard held, caught in debug builds), panics before it queues: the
/// holder's unlock then frees the lock instead of handing it to a waiter that is gone.
#[test]
fn a_cross_thread_wait_that_may_not_yield_leaves_no_waiter_behind() {
    if !cfg!(debug_assertions) {
        return; // the check is a debug-build one
    }
    let mutex = Arc::new(CoMutex::new(0u32));
    let holder = IoThread::spawn("holder").unwrap();
    let (locked, is_locked) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let (unlocked, is_unlocked) = mpsc::channel();
    let m = mutex.clone();
    holder
        .handle()
        .spawn(move |co| {
            let guard = m.lock(co);
            locked.send(()).unwrap();
            while released.try_recv().is_err() {
                co.sleep(Duration::from_millis(1));
            }
            drop(guard);
            unlocked.send(()).unwrap();
        })
        .unwrap();
    is_locked.recv().unwrap();
    let ctx = AioContext::new().unwrap();
    let m = mutex.clone();
    let waiter = ctx.spawn(move |co| {
        let thread_lock = ThreadMutex::new(());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _thread_guard = thread_lock.lock(co);
            drop(m.lock(co));
        }));
        assert!(result.is_err(), "the wait should have panicked: a thread-lock guard is held");
    });
    while ctx.poll(false) {}
    assert!(waiter.is_finished());
    assert_eq!(ctx.suspended_coroutines(), 0);
    release.send(()).unwrap();
    is_unlocked.recv().unwrap();
    holder.stop();
    assert!(mutex.try_lock().is_some(), "the holder's unlock left the lock free");
}
