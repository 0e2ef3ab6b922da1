//! One CoQueue under every lock kind: CoMutex, ThreadMutex (also held by a plain thread that
//! wakes coroutines), SpinLock and NoLock.

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::sync::{CoMutex, CoQueue, NoLock, SpinLock, ThreadMutex};

/// A bounded producer/consumer hand-off written once for any lock: `$lock` protects a counter
/// of available items; consumers wait on the queue until an item is there.
macro_rules! produce_consume {
    ($lock:ty, $make:expr) => {{
        let ctx = AioContext::new().unwrap();
        let state = Rc::new(($make, CoQueue::new()));
        let consumed = Rc::new(std::cell::Cell::new(0));
        let mut consumers = Vec::new();
        for _ in 0..5 {
            let (state, consumed) = (state.clone(), consumed.clone());
            consumers.push(ctx.spawn(move |co| {
                let (lock, queue): &($lock, CoQueue) = &*state;
                for _ in 0..20 {
                    let mut items = lock.lock(co);
                    while *items == 0 {
                        queue.wait(co, &mut items);
                    }
                    *items -= 1;
                    consumed.set(consumed.get() + 1);
                }
            }));
        }
        let s = state.clone();
        let producer = ctx.spawn(move |co| {
            let (lock, queue): &($lock, CoQueue) = &*s;
            for _ in 0..100 {
                {
                    let mut items = lock.lock(co);
                    *items += 1;
                    queue.next(&mut items);
                }
                co.sleep(Duration::ZERO);
            }
        });
        producer.join().unwrap();
        for c in consumers {
            c.join().unwrap();
        }
        assert_eq!(consumed.get(), 100);
        assert!(state.1.is_empty(&state.0.lock_for_test()));
    }};
}

/// Locks for the final emptiness check from outside a coroutine.
trait LockForTest {
    type Guard<'a>
    where
        Self: 'a;
    fn lock_for_test(&self) -> Self::Guard<'_>;
}

macro_rules! blocking_lock_for_test {
    ($($ty:ty),*) => {$(
        impl LockForTest for $ty {
            type Guard<'a> = aiocoro::sync::LockGuard<'a, <$ty as RawOf>::Raw, u32>;
            fn lock_for_test(&self) -> Self::Guard<'_> {
                self.lock_blocking()
            }
        }
    )*};
}

trait RawOf {
    type Raw: aiocoro::sync::RawLock;
}
impl<R: aiocoro::sync::RawLock> RawOf for aiocoro::sync::Lock<R, u32> {
    type Raw = R;
}

blocking_lock_for_test!(ThreadMutex<u32>, SpinLock<u32>, NoLock<u32>);

impl LockForTest for CoMutex<u32> {
    type Guard<'a> = aiocoro::sync::CoMutexGuard<'a, u32>;
    fn lock_for_test(&self) -> Self::Guard<'_> {
        self.try_lock().expect("nobody holds it at the end")
    }
}

#[test]
fn under_a_comutex() {
    produce_consume!(CoMutex<u32>, CoMutex::new(0u32));
}

#[test]
fn under_a_thread_mutex() {
    produce_consume!(ThreadMutex<u32>, ThreadMutex::new(0u32));
}

#[test]
fn under_a_spinlock() {
    produce_consume!(SpinLock<u32>, SpinLock::new(0u32));
}

#[test]
fn under_no_lock() {
    produce_consume!(NoLock<u32>, NoLock::new(0u32));
}

#[test]
fn a_plain_thread_holding_a_thread_mutex_wakes_coroutines_on_iothreads() {
    let state = Arc::new((ThreadMutex::new(0u32), CoQueue::new()));
    let woke = Arc::new(AtomicUsize::new(0));
    let (waiting_tx, waiting_rx) = mpsc::channel();
    let iothreads: Vec<_> = (0..2).map(|i| IoThread::spawn(&format!("coq-{i}")).unwrap()).collect();
    for iothread in &iothreads {
        for _ in 0..3 {
            let (state, woke, waiting_tx) = (state.clone(), woke.clone(), waiting_tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    let (lock, queue) = &*state;
                    let mut go = lock.lock(co);
                    waiting_tx.send(()).unwrap();
                    while *go == 0 {
                        queue.wait(co, &mut go);
                    }
                    woke.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
    }
    for _ in 0..6 {
        waiting_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    // A plain thread: no coroutine, no context. It holds the thread mutex and wakes them all.
    std::thread::spawn({
        let state = state.clone();
        move || {
            let (lock, queue) = &*state;
            let mut go = lock.lock_blocking();
            *go = 1;
            assert_eq!(queue.restart_all(&mut go), 6);
        }
    })
    .join()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while woke.load(Ordering::SeqCst) < 6 {
        assert!(std::time::Instant::now() < deadline, "a wake-up was lost");
        std::thread::sleep(Duration::from_millis(1));
    }
    for iothread in iothreads {
        iothread.stop();
    }
}

#[test]
fn enter_next_runs_the_waiter_at_once_from_outside_a_coroutine() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(Vec::new()), CoQueue::new()));
    for name in ["first", "second"] {
        let s = state.clone();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut log = lock.lock(co);
            queue.wait(co, &mut log);
            log.push(name);
        });
    }
    while ctx.poll(false) {}
    let (lock, queue) = &*state;
    let mut log = lock.lock_blocking();
    assert!(queue.enter_next(&mut log));
    assert_eq!(*log, ["first"], "the waiter ran inside enter_next");
    assert_eq!(queue.enter_all(&mut log), 1);
    assert_eq!(*log, ["first", "second"]);
    assert!(!queue.enter_next(&mut log));
}

#[test]
fn wait_front_jumps_the_queue() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(Vec::new()), CoQueue::new()));
    for (name, front) in [("back1", false), ("back2", false), ("front", true)] {
        let s = state.clone();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut log = lock.lock(co);
            if front {
                queue.wait_front(co, &mut log);
            } else {
                queue.wait(co, &mut log);
            }
            log.push(name);
        });
    }
    while ctx.poll(false) {}
    let (lock, queue) = &*state;
    let mut log = lock.lock_blocking();
    assert_eq!(queue.enter_all(&mut log), 3);
    assert_eq!(*log, ["front", "back1", "back2"]);
}

#[test]
#[should_panic(expected = "a CoQueue was used with a guard of a different lock")]
fn a_queue_belongs_to_one_lock() {
    let (a, b) = (NoLock::new(()), NoLock::new(()));
    let queue = CoQueue::new();
    assert!(queue.is_empty(&a.lock_blocking()));
    queue.is_empty(&b.lock_blocking());
}

/// Under `NoLock` waiters park (the lock cannot leave the thread): they count as suspended,
/// a stray `enter` leaves them waiting, and `next` / `restart_all` from outside a coroutine
/// queue them to run in the next poll, in order.
#[test]
fn waiters_under_no_lock_count_as_suspended_and_ignore_stray_entries() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(Vec::new()), CoQueue::new()));
    let mut waiters = Vec::new();
    let first = Rc::new(std::cell::RefCell::new(None));
    for name in ["first", "second", "third"] {
        let s = state.clone();
        let f = first.clone();
        waiters.push(ctx.spawn(move |co| {
            f.borrow_mut().get_or_insert_with(|| co.current());
            let (lock, queue) = &*s;
            let mut log = lock.lock(co);
            queue.wait(co, &mut log);
            log.push(name);
        }));
    }
    while ctx.poll(false) {}
    assert_eq!(ctx.suspended_coroutines(), 3);
    first.borrow().as_ref().unwrap().enter(); // a stray entry: the waiter must keep waiting
    assert!(!waiters[0].is_finished());
    assert_eq!(ctx.suspended_coroutines(), 3);
    let (lock, queue) = &*state;
    {
        let mut log = lock.lock_blocking();
        assert!(log.is_empty());
        assert!(queue.next(&mut log));
        assert!(log.is_empty(), "next only queues the waiter");
    }
    while ctx.poll(false) {}
    assert_eq!(*lock.lock_blocking(), ["first"]);
    assert_eq!(ctx.suspended_coroutines(), 2);
    assert_eq!(queue.restart_all(&mut lock.lock_blocking()), 2);
    while ctx.poll(false) {}
    assert_eq!(*lock.lock_blocking(), ["first", "second", "third"]);
    assert_eq!(ctx.suspended_coroutines(), 0);
    assert!(waiters.iter().all(|waiter| waiter.is_finished()));
    assert!(queue.is_empty(&lock.lock_blocking()));
}

/// `enter_next` from inside a coroutine does not nest: the waiter runs after the caller yields.
#[test]
fn enter_next_inside_a_coroutine_runs_the_waiter_after_the_caller_yields() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(Vec::new()), CoQueue::new()));
    let s = state.clone();
    ctx.spawn(move |co| {
        let (lock, queue) = &*s;
        let mut log = lock.lock(co);
        queue.wait(co, &mut log);
        log.push("waiter");
    });
    while ctx.poll(false) {}
    let s = state.clone();
    ctx.spawn(move |co| {
        let (lock, queue) = &*s;
        let mut log = lock.lock(co);
        assert!(queue.enter_next(&mut log));
        log.push("caller");
    });
    while ctx.poll(false) {}
    assert_eq!(*state.0.lock_blocking(), ["caller", "waiter"]);
    assert_eq!(ctx.suspended_coroutines(), 0);
}

/// A wait that cannot suspend (here: a thread-lock guard held, caught in debug builds) panics
/// before it queues anything, so the queue keeps no record of a coroutine that is not waiting.
macro_rules! wait_that_may_not_yield {
    ($make:expr) => {{
        let ctx = AioContext::new().unwrap();
        let state = Rc::new(($make, CoQueue::new(), ThreadMutex::new(())));
        let s = state.clone();
        let waiter = ctx.spawn(move |co| {
            let (lock, queue, thread_lock) = &*s;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _thread_guard = thread_lock.lock(co);
                let mut guard = lock.lock(co);
                queue.wait(co, &mut guard);
            }));
            assert!(result.is_err(), "the wait should have panicked: a thread-lock guard is held");
        });
        while ctx.poll(false) {}
        assert!(waiter.is_finished());
        assert_eq!(ctx.suspended_coroutines(), 0);
        let (lock, queue, _) = &*state;
        assert!(queue.is_empty(&lock.lock_for_test()));
    }};
}

#[test]
fn a_wait_that_may_not_yield_leaves_no_record_behind() {
    if !cfg!(debug_assertions) {
        return; // the check is a debug-build one; release builds skip the bookkeeping
    }
    wait_that_may_not_yield!(NoLock::new(0u32));
    wait_that_may_not_yield!(CoMutex::new(0u32));
    wait_that_may_not_yield!(ThreadMutex::new(0u32));
}
