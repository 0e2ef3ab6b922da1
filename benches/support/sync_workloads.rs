//! The lock workloads measured by `benches/sync.rs` (criterion) and `examples/sync_perf.rs` (a
//! quick run), named after the QEMU figures they are compared with. Single-thread workloads
//! run `iterations` operations; multi-thread ones run for a duration and return how many
//! iterations all threads did together.

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::sync::{CoMutex, CoQueue, NoLock};

/// Runs `body` as one coroutine on a fresh context of this thread until it ends.
fn in_coroutine(body: impl FnOnce(&aiocoro::coroutine::Co) + 'static) {
    let ctx = AioContext::current().unwrap_or_else(|| AioContext::new().expect("a context"));
    let co = ctx.spawn(body);
    ctx.wait_while(|| !co.is_ended());
}

/// `comutex/uncontended`: lock + unlock of a CoMutex nobody else wants.
pub fn comutex_uncontended(iterations: u64) {
    let mutex = Rc::new(CoMutex::new(0u64));
    in_coroutine(move |co| {
        for _ in 0..iterations {
            *mutex.lock(co) += 1;
        }
        black_box(&mutex);
    });
}

/// `comutex/handoff_same_thread`: two coroutines of one context pass a CoMutex back and forth;
/// each holder lets the other run (and queue) before it unlocks. One iteration is one hand-over.
pub fn comutex_handoff_same_thread(iterations: u64) {
    let ctx = AioContext::current().unwrap_or_else(|| AioContext::new().expect("a context"));
    let mutex = Rc::new(CoMutex::new(0u64));
    let handoffs = Rc::new(Cell::new(0u64));
    let mut coroutines = Vec::new();
    for _ in 0..2 {
        let (mutex, handoffs) = (mutex.clone(), handoffs.clone());
        coroutines.push(ctx.spawn(move |co| {
            while handoffs.get() < iterations {
                let mut guard = mutex.lock(co);
                *guard += 1;
                handoffs.set(handoffs.get() + 1);
                co.reschedule();
            }
        }));
    }
    ctx.wait_while(|| coroutines.iter().any(|co| !co.is_ended()));
}

/// `coqueue/enter_next_wait`: a coroutine waits on a CoQueue; code outside any coroutine
/// enters it with `enter_next`, and it waits again. One iteration is one round trip.
pub fn coqueue_enter_next_wait(iterations: u64) {
    let ctx = AioContext::current().unwrap_or_else(|| AioContext::new().expect("a context"));
    let state = Rc::new((NoLock::new(false), CoQueue::new()));
    let s = state.clone();
    let waiter = ctx.spawn(move |co| {
        let (lock, queue) = &*s;
        let mut stop = lock.lock(co);
        while !*stop {
            queue.wait(co, &mut stop);
        }
    });
    while ctx.poll(false) {}
    let (lock, queue) = &*state;
    let mut stop = lock.lock_blocking();
    for _ in 0..iterations {
        queue.enter_next(&mut stop);
    }
    *stop = true;
    queue.enter_next(&mut stop);
    drop(stop);
    ctx.wait_while(|| !waiter.is_ended());
}

/// `multi/mutex/*`: `threads` IoThreads, one coroutine each, lock a shared CoMutex, increment a
/// counter, unlock, for `duration` (QEMU's `test_multi_co_mutex`). Returns the iterations.
pub fn multi_comutex(threads: usize, duration: Duration) -> u64 {
    let mutex = Arc::new(CoMutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let iothreads: Vec<_> = (0..threads)
        .map(|i| IoThread::spawn(&format!("bench-io-{i}")).expect("an IoThread"))
        .collect();
    for iothread in &iothreads {
        let (mutex, stop, done, start) = (mutex.clone(), stop.clone(), done.clone(), start.clone());
        let finished = finished.clone();
        iothread
            .handle()
            .spawn(move |co| {
                start.wait();
                let mut count = 0;
                while !stop.load(Ordering::Relaxed) {
                    *mutex.lock(co) += 1;
                    count += 1;
                }
                done.fetch_add(count, Ordering::Relaxed);
                finished.fetch_add(1, Ordering::Release);
            })
            .expect("the IoThread runs");
    }
    start.wait();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    // Every coroutine must be out of the lock's queue before its IoThread stops.
    while finished.load(Ordering::Acquire) < threads as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for iothread in iothreads {
        iothread.stop();
    }
    let total = done.load(Ordering::Relaxed);
    assert_eq!(total, *mutex.try_lock().expect("free at the end"), "every increment counted");
    total
}

/// `multi/mutex/pthread`: the same loop on `threads` plain threads with `std::sync::Mutex`.
pub fn multi_std_mutex(threads: usize, duration: Duration) -> u64 {
    let mutex = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (mutex, stop, start) = (mutex.clone(), stop.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    *mutex.lock().unwrap() += 1;
                    count += 1;
                }
                count
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().map(|worker| worker.join().unwrap()).sum()
}
