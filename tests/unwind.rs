//! A panic that unwinds through a `CoQueue` operation, while the caller's lock is released,
//! never leaves a guard that does not hold its lock (rule 5 of `docs/design.md`): the lock is
//! taken back before the panic reaches the caller, or the process aborts naming the rule. Each test
//! checks exclusion itself (a second holder, lost updates), not just that nothing crashed.

mod common;

use std::cell::Cell;
use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::thread;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro::sync::{CoQueue, Lock, NoLock, RawBlockingLock, RawLock, RawThreadMutex, ThreadMutex};

/// Runs `test`'s misbehaving branch in a child and checks that it aborted with a message
/// naming the rule, and never reported a second holder.
fn assert_child_aborts_naming_the_rule(test: &str) {
    let output = common::run_child(test);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("SECOND HOLDER"), "exclusion was broken:\n{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("could not be taken back"), "{stderr}");
    assert!(stderr.contains("A guard always holds its lock"), "{stderr}");
}

/// Shape 1 under `NoLock`: the waker keeps its guard across a yield, so the woken waiter's
/// retake panics ("taken while another holder still has it"), and the waiter catches that
/// panic. Its guard must not survive without the lock.
#[test]
fn a_waiter_whose_retake_panics_under_nolock_cannot_keep_a_guard_without_the_lock() {
    const TEST: &str =
        "a_waiter_whose_retake_panics_under_nolock_cannot_keep_a_guard_without_the_lock";
    if common::is_child(TEST) {
        let ctx = AioContext::new().unwrap();
        let state = Rc::new((NoLock::new(0u32), CoQueue::new()));
        let s = state.clone();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            let caught = panic::catch_unwind(AssertUnwindSafe(|| queue.wait(co, &mut guard)));
            assert!(caught.is_err(), "the retake found the lock held");
            // Here the guard claims the lock while the waker still holds its own guard.
            eprintln!("SECOND HOLDER: the waiter's guard survived without the lock");
        });
        ctx.poll(false);
        let s = state.clone();
        ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            queue.next(&mut guard);
            // Misuse: keeps the NoLock guard across a yield while the waiter wants it.
            co.reschedule();
            *guard += 1;
        });
        let _ = panic::catch_unwind(AssertUnwindSafe(|| {
            for _ in 0..4 {
                ctx.poll(false);
            }
        }));
        std::process::exit(0);
    }
    assert_child_aborts_naming_the_rule(TEST);
}

/// A thread mutex whose `lock` from a coroutine panics (without taking it) while
/// `FAIL_NEXT_LOCK` is set: the `RawLock` contract allows a panicking `lock`, which then leaves
/// the lock free.
struct RawFlakyMutex {
    inner: RawThreadMutex,
}

thread_local! {
    static FAIL_NEXT_LOCK: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: all locking goes to the inner mutex; a `lock` that panics takes nothing.
unsafe impl RawLock for RawFlakyMutex {
    fn new() -> Self {
        RawFlakyMutex { inner: RawThreadMutex::new() }
    }

    const YIELD_SAFE: bool = false;

    fn lock(&self, _co: &Co) {
        assert!(!FAIL_NEXT_LOCK.replace(false), "the flaky mutex refuses this lock");
        self.inner.lock_blocking();
    }

    fn try_lock(&self) -> bool {
        self.inner.try_lock()
    }

    unsafe fn unlock(&self) {
        // SAFETY: the caller holds the lock, which is the inner one.
        unsafe { self.inner.unlock() };
    }
}

// SAFETY: as above.
unsafe impl RawBlockingLock for RawFlakyMutex {
    fn lock_blocking(&self) {
        self.inner.lock_blocking();
    }
}

/// Shape 1 under a thread mutex whose `lock` panics: the waiter catches the retake's panic;
/// the lock is free then, so it is taken back and the guard holds it (another thread cannot
/// take it), and no update is lost.
#[test]
fn a_waiter_whose_retake_panics_under_a_thread_mutex_gets_its_lock_back() {
    let ctx = AioContext::new().unwrap();
    let lock = Arc::new(Lock::<RawFlakyMutex, u64>::new(0));
    let queue = Arc::new(CoQueue::new());
    let held_after_catch = Rc::new(Cell::new(None));
    let (l, q, h) = (lock.clone(), queue.clone(), held_after_catch.clone());
    let waiter = ctx.spawn(move |co| {
        let mut guard = l.lock(co);
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            FAIL_NEXT_LOCK.set(true);
            q.wait(co, &mut guard);
        }));
        assert!(caught.is_err(), "the retake panicked");
        let other = l.clone();
        h.set(Some(thread::spawn(move || other.try_lock().is_some()).join().unwrap()));
        // Read, pause, write: another thread that got in meanwhile would lose an update.
        let before = *guard;
        thread::sleep(std::time::Duration::from_millis(5));
        *guard = before + 1;
    });
    ctx.poll(false);
    {
        let mut guard = lock.lock_blocking();
        assert!(queue.next(&mut guard), "the waiter is queued");
    }
    let other = lock.clone();
    let incrementer = thread::spawn(move || {
        for _ in 0..1000 {
            *other.lock_blocking() += 1;
        }
    });
    waiter.join().unwrap();
    incrementer.join().unwrap();
    assert_eq!(held_after_catch.get(), Some(false), "another thread took the guard's lock");
    assert_eq!(*lock.lock_blocking(), 1001, "an update was lost");
}

/// Shape 2 under `ThreadMutex`: the coroutine that `enter_next` enters panics, and the caller
/// catches it. Its guard must hold the lock again: another thread neither takes it meanwhile
/// nor loses updates.
#[test]
fn a_panic_of_the_coroutine_enter_next_entered_leaves_the_callers_thread_mutex_held() {
    let ctx = AioContext::new().unwrap();
    let lock = Arc::new(ThreadMutex::new(0u64));
    let queue = Arc::new(CoQueue::new());
    let (l, q) = (lock.clone(), queue.clone());
    ctx.spawn(move |co| {
        let mut guard = l.lock(co);
        q.wait(co, &mut guard);
        drop(guard);
        panic!("handler failed");
    });
    ctx.poll(false);
    let mut guard = lock.lock_blocking();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| queue.enter_next(&mut guard)));
    assert!(caught.is_err(), "the entered coroutine's panic reaches the caller");
    let other = lock.clone();
    assert!(
        thread::spawn(move || other.try_lock().is_none()).join().unwrap(),
        "after the caught panic, another thread took the lock the caller's guard claims"
    );
    let other = lock.clone();
    let incrementer = thread::spawn(move || {
        for _ in 0..1000 {
            *other.lock_blocking() += 1;
        }
    });
    for _ in 0..100 {
        let before = *guard;
        thread::yield_now();
        *guard = before + 1;
    }
    drop(guard);
    incrementer.join().unwrap();
    assert_eq!(*lock.lock_blocking(), 1100, "an update was lost");
}

/// Shape 2 under `NoLock`, with `enter_all`: the first entered coroutine panics; the caller
/// that catches it holds its lock again, and the second waiter, popped already, is not lost.
#[test]
fn a_panic_of_a_coroutine_enter_all_entered_leaves_the_nolock_held_and_wakes_the_rest() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new((NoLock::new(0u32), CoQueue::new()));
    let mut waiters = Vec::new();
    for fails in [true, false] {
        let s = state.clone();
        let waiter = ctx.spawn(move |co| {
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            queue.wait(co, &mut guard);
            assert!(!fails, "handler failed");
            *guard += 1;
        });
        // The failing one is detached: a held join handle would take its panic.
        if !fails {
            waiters.push(waiter);
        }
    }
    ctx.poll(false);
    let (lock, queue) = &*state;
    let mut guard = lock.try_lock().unwrap();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| queue.enter_all(&mut guard)));
    assert!(caught.is_err(), "the entered coroutine's panic reaches the caller");
    assert!(lock.try_lock().is_none(), "a second guard of the NoLock was handed out");
    *guard += 10;
    drop(guard);
    for waiter in waiters {
        waiter.join().unwrap();
    }
    assert_eq!(*lock.try_lock().unwrap(), 11, "the second waiter was lost or an update was");
}

/// A counter under a `NoLock` and the queue of its waiters.
type Guarded = (NoLock<u32>, CoQueue);

/// Leaves `waiters` coroutines waiting in `CoQueue::wait` under a `NoLock`, orphaned: their
/// context is dropped (its old "still suspended" panic is caught). Returns the lock and the
/// queue, and a count of the waiters' destructors that ran.
fn orphaned_nolock_waiters(waiters: usize) -> (Rc<Guarded>, Rc<Cell<u32>>) {
    let state = Rc::new((NoLock::new(0u32), CoQueue::new()));
    let drops = Rc::new(Cell::new(0));
    let ctx = AioContext::new().unwrap();
    for _ in 0..waiters {
        let (s, d) = (state.clone(), drops.clone());
        ctx.spawn(move |co| {
            struct Flag(Rc<Cell<u32>>);
            impl Drop for Flag {
                fn drop(&mut self) {
                    self.0.set(self.0.get() + 1);
                }
            }
            let _flag = Flag(d);
            let (lock, queue) = &*s;
            let mut guard = lock.lock(co);
            queue.wait(co, &mut guard);
        });
    }
    ctx.poll(false);
    let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(ctx)));
    (state, drops)
}

/// Shape 3: a later `next` pops an orphaned park record (see `orphaned_nolock_waiters`). That
/// must not unwind the waiter, whose guard would release the lock the caller now holds.
#[test]
fn an_orphaned_park_record_never_unwinds_its_waiter_into_the_callers_lock() {
    thread::spawn(|| {
        let (state, drops) = orphaned_nolock_waiters(1);
        let (lock, queue) = &*state;
        let mut guard = lock.try_lock().expect("the waiter released the lock when it waited");
        assert!(!queue.next(&mut guard), "a waiter whose context is gone cannot be woken");
        assert!(lock.try_lock().is_none(), "the orphan's guard released the caller's lock");
        *guard += 1;
        assert_eq!(drops.get(), 0, "the orphaned waiter was unwound");
    })
    .join()
    .unwrap();
}

/// `restart_all` over orphaned park records: it wakes nobody and runs no destructor of theirs
/// while it holds the queue's list (one could touch the same queue).
#[test]
fn restart_all_over_orphaned_park_records_runs_none_of_their_code() {
    thread::spawn(|| {
        let (state, drops) = orphaned_nolock_waiters(2);
        let (lock, queue) = &*state;
        let mut guard = lock.try_lock().expect("the waiters released the lock when they waited");
        assert_eq!(queue.restart_all(&mut guard), 0, "a waiter whose context is gone was woken");
        assert!(queue.is_empty(&guard));
        assert!(lock.try_lock().is_none(), "an orphan's guard released the caller's lock");
        assert_eq!(drops.get(), 0, "an orphaned waiter was unwound");
    })
    .join()
    .unwrap();
}

/// A `RawLock::unlock` that panics: the contract forbids it, and aiocoro aborts naming that
/// rather than leave guards that do not know whether they hold their lock.
#[test]
fn a_panicking_unlock_aborts_naming_the_contract() {
    const TEST: &str = "a_panicking_unlock_aborts_naming_the_contract";
    if common::is_child(TEST) {
        struct RawBadUnlock(Cell<bool>);
        // SAFETY: one holder at a time (`try_lock` fails while held); the unlock panics
        // without releasing, which is the misuse under test.
        unsafe impl RawLock for RawBadUnlock {
            fn new() -> Self {
                RawBadUnlock(Cell::new(false))
            }
            const YIELD_SAFE: bool = true;
            fn lock(&self, _co: &Co) {
                assert!(self.try_lock());
            }
            fn try_lock(&self) -> bool {
                !self.0.replace(true)
            }
            unsafe fn unlock(&self) {
                panic!("unlock failed");
            }
        }
        let lock = Lock::<RawBadUnlock, u32>::new(0);
        let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(lock.try_lock().unwrap())));
        eprintln!("SECOND HOLDER: the panicking unlock was caught");
        std::process::exit(0);
    }
    let output = common::run_child(TEST);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("RawLock::unlock panicked"), "{stderr}");
}
