//! The lock workloads measured by `benches/sync.rs` (criterion) and `examples/sync_perf.rs` (a
//! quick run), named after the QEMU figures they are compared with. Single-thread workloads
//! run `iterations` operations; multi-thread ones run for a duration and return how many
//! iterations all threads did together.

use std::cell::Cell;
use std::collections::VecDeque;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::sync::{CoMutex, CoQueue, CoRwLock, NoLock};

/// Runs `body` as one coroutine on a fresh context of this thread until it ends.
fn in_coroutine(body: impl FnOnce(&aiocoro::coroutine::Co) + 'static) {
    let ctx = AioContext::current().unwrap_or_else(|| AioContext::new().expect("a context"));
    ctx.run(body);
}

/// `comutex/uncontended`: lock + unlock of a CoMutex nobody else wants.
pub(crate) fn comutex_uncontended(iterations: u64) {
    let mutex = Rc::new(CoMutex::new(0u64));
    in_coroutine(move |co| {
        for _ in 0..iterations {
            *mutex.lock(co) += 1;
        }
        black_box(&mutex);
    });
}

/// `corwlock/read`: read lock + unlock of a CoRwLock nobody writes.
pub(crate) fn corwlock_read(iterations: u64) {
    let lock = Rc::new(CoRwLock::new(0u64));
    in_coroutine(move |co| {
        let mut sum = 0;
        for _ in 0..iterations {
            sum += *lock.read(co);
        }
        black_box(sum);
    });
}

/// `corwlock/write`: write lock + unlock of a CoRwLock nobody else wants.
pub(crate) fn corwlock_write(iterations: u64) {
    let lock = Rc::new(CoRwLock::new(0u64));
    in_coroutine(move |co| {
        for _ in 0..iterations {
            *lock.write(co) += 1;
        }
        black_box(&lock);
    });
}

/// `comutex/handoff_same_thread`: two coroutines of one context pass a CoMutex back and forth;
/// each holder lets the other run (and queue) before it unlocks. One iteration is one hand-over.
pub(crate) fn comutex_handoff_same_thread(iterations: u64) {
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
    for co in coroutines {
        co.join().unwrap();
    }
}

/// `coqueue/enter_next_wait`: a coroutine waits on a CoQueue; code outside any coroutine
/// enters it with `enter_next`, and it waits again. One iteration is one round trip.
pub(crate) fn coqueue_enter_next_wait(iterations: u64) {
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
    waiter.join().unwrap();
}

/// What a multi-thread workload did.
pub(crate) struct Outcome {
    /// Iterations by all threads together.
    pub iterations: u64,
    /// From the start signal to the last thread's end.
    pub elapsed: Duration,
}

impl Outcome {
    /// Iterations per second.
    pub(crate) fn rate(&self) -> f64 {
        self.iterations as f64 / self.elapsed.as_secs_f64()
    }
}

/// The shared bookkeeping of one multi-thread run: when to stop, and what the workers did.
struct Race {
    stop: AtomicBool,
    done: AtomicU64,
    finished: AtomicU64,
    start: Barrier,
}

impl Race {
    fn new(threads: usize) -> Arc<Race> {
        Arc::new(Race {
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            start: Barrier::new(threads + 1),
        })
    }

    /// One worker's loop: waits for the start, then runs `iteration` until the time is up.
    fn work(&self, mut iteration: impl FnMut()) {
        self.start.wait();
        let mut count = 0;
        while !self.stop.load(Ordering::Relaxed) {
            iteration();
            count += 1;
        }
        self.done.fetch_add(count, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Release);
    }

    /// The starter's side: releases the workers, lets them race for `duration`, stops them all
    /// at once (so that no thread ever runs alone), and waits until every worker is out of its
    /// loop (and so out of the lock's queue).
    fn run(&self, threads: usize, duration: Duration) -> Outcome {
        self.start.wait();
        let started = std::time::Instant::now();
        std::thread::sleep(duration);
        self.stop.store(true, Ordering::Relaxed);
        while self.finished.load(Ordering::Acquire) < threads as u64 {
            std::thread::yield_now();
        }
        Outcome { iterations: self.done.load(Ordering::Relaxed), elapsed: started.elapsed() }
    }
}

/// `multi/mutex/contended` (5 threads) and `multi/mutex/handoff` (2): `threads` IoThreads, one
/// coroutine each, lock a shared CoMutex, increment a counter, unlock (QEMU's
/// `test_multi_co_mutex`).
pub(crate) fn multi_comutex(threads: usize, duration: Duration) -> Outcome {
    let mutex = Arc::new(CoMutex::new(0u64));
    let race = Race::new(threads);
    let iothreads: Vec<_> = (0..threads)
        .map(|i| IoThread::spawn(&format!("bench-io-{i}")).expect("an IoThread"))
        .collect();
    for iothread in &iothreads {
        let (mutex, race) = (mutex.clone(), race.clone());
        iothread
            .handle()
            .spawn(move |co| race.work(|| *mutex.lock(co) += 1))
            .expect("the IoThread runs");
    }
    let outcome = race.run(threads, duration);
    for iothread in iothreads {
        iothread.stop();
    }
    assert_eq!(outcome.iterations, *mutex.try_lock().expect("free at the end"));
    outcome
}

/// `multi/mutex/pthread`: the same loop on `threads` plain threads with `std::sync::Mutex`.
pub(crate) fn multi_std_mutex(threads: usize, duration: Duration) -> Outcome {
    let mutex = Arc::new(Mutex::new(0u64));
    let race = Race::new(threads);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (mutex, race) = (mutex.clone(), race.clone());
            std::thread::spawn(move || race.work(|| *mutex.lock().unwrap() += 1))
        })
        .collect();
    let outcome = race.run(threads, duration);
    for worker in workers {
        worker.join().unwrap();
    }
    outcome
}

/// Peer of `comutex/uncontended`: `std::sync::Mutex` lock + unlock on one thread.
pub(crate) fn std_mutex_uncontended(iterations: u64) {
    let mutex = Mutex::new(0u64);
    for _ in 0..iterations {
        *black_box(&mutex).lock().unwrap() += 1;
    }
}

/// Peer of `comutex/uncontended`: `tokio::sync::Mutex` lock + unlock in one task of a
/// current-thread runtime.
pub(crate) fn tokio_mutex_uncontended(iterations: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let mutex = tokio::sync::Mutex::new(0u64);
    runtime.block_on(async {
        for _ in 0..iterations {
            *black_box(&mutex).lock().await += 1;
        }
    });
}

/// Peer of `comutex/handoff_same_thread`: two tokio tasks on a current-thread runtime pass a
/// `tokio::sync::Mutex` back and forth, yielding while they hold it.
pub(crate) fn tokio_mutex_handoff(iterations: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let mutex = Rc::new(tokio::sync::Mutex::new(0u64));
    let handoffs = Rc::new(Cell::new(0u64));
    let local = tokio::task::LocalSet::new();
    for _ in 0..2 {
        let (mutex, handoffs) = (mutex.clone(), handoffs.clone());
        local.spawn_local(async move {
            while handoffs.get() < iterations {
                let mut guard = mutex.lock().await;
                *guard += 1;
                handoffs.set(handoffs.get() + 1);
                tokio::task::yield_now().await;
            }
        });
    }
    runtime.block_on(local);
}

/// The shape of `multi/oversubscribed_queue`: producers, consumers, the queue's capacity.
const PRODUCERS: u64 = 4;
const CONSUMERS: u64 = 3;
const CAPACITY: usize = 8;

/// What the producers have put in and the consumers taken out of a bounded queue.
#[derive(Default)]
struct Bounded {
    items: VecDeque<u64>,
    /// How many items the consumers took so far; they stop at the total.
    taken: u64,
    /// The sum of the items taken, to check that each arrived once.
    sum: u64,
}

/// The sum of `0..items`, what the consumers of `items` items must have summed.
fn expected_sum(items: u64) -> u64 {
    items * items.saturating_sub(1) / 2
}

/// The items producer `producer` of `PRODUCERS` puts in: every `PRODUCERS`-th, from its number.
fn produced_by(producer: u64, items: u64) -> impl Iterator<Item = u64> {
    (producer..items).step_by(PRODUCERS as usize)
}

/// `multi/oversubscribed_queue`: a bounded producer / consumer queue built from a CoMutex and
/// two CoQueues (as in `CoQueue`'s documentation), 4 producer coroutines on one IoThread and 3
/// consumers on another, capacity 8, passing `items` items. With the main thread and anything
/// else running, the threads outnumber the cores of a small machine, so a lock holder is often
/// not running: the lock must not spin against it.
pub(crate) fn oversubscribed_queue(items: u64) {
    let state = Arc::new((CoMutex::new(Bounded::default()), CoQueue::new(), CoQueue::new()));
    let producers = IoThread::spawn("bench-producers").expect("an IoThread");
    let consumers = IoThread::spawn("bench-consumers").expect("an IoThread");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for producer in 0..PRODUCERS {
        let (state, done) = (state.clone(), done_tx.clone());
        let body = move |co: &aiocoro::coroutine::Co| {
            let (lock, not_full, not_empty) = &*state;
            for item in produced_by(producer, items) {
                let mut queue = lock.lock(co);
                while queue.items.len() == CAPACITY {
                    not_full.wait(co, &mut queue);
                }
                queue.items.push_back(item);
                not_empty.next(&mut queue);
            }
            done.send(()).expect("the runner waits");
        };
        producers.handle().spawn(body).expect("the IoThread runs");
    }
    for _ in 0..CONSUMERS {
        let (state, done) = (state.clone(), done_tx.clone());
        let body = move |co: &aiocoro::coroutine::Co| {
            let (lock, not_full, not_empty) = &*state;
            let mut queue = lock.lock(co);
            loop {
                while queue.items.is_empty() && queue.taken < items {
                    not_empty.wait(co, &mut queue);
                }
                let Some(item) = queue.items.pop_front() else { break };
                queue.taken += 1;
                queue.sum += item;
                not_full.next(&mut queue);
            }
            // The last item is taken: let the other consumers see it.
            not_empty.restart_all(&mut queue);
            drop(queue);
            done.send(()).expect("the runner waits");
        };
        consumers.handle().spawn(body).expect("the IoThread runs");
    }
    for _ in 0..PRODUCERS + CONSUMERS {
        done_rx.recv().expect("every coroutine reports its end");
    }
    producers.stop();
    consumers.stop();
    let queue = state.0.try_lock().expect("free at the end");
    assert_eq!((queue.taken, queue.sum), (items, expected_sum(items)), "each item arrives once");
}

/// `multi/oversubscribed_queue_std`: the same queue on `std::sync::Mutex` and two `Condvar`s,
/// with a thread per producer and per consumer.
pub(crate) fn oversubscribed_queue_std(items: u64) {
    let state = Arc::new((Mutex::new(Bounded::default()), Condvar::new(), Condvar::new()));
    let mut threads = Vec::new();
    for producer in 0..PRODUCERS {
        let state = state.clone();
        threads.push(std::thread::spawn(move || {
            let (lock, not_full, not_empty) = &*state;
            for item in produced_by(producer, items) {
                let mut queue = lock.lock().unwrap();
                while queue.items.len() == CAPACITY {
                    queue = not_full.wait(queue).unwrap();
                }
                queue.items.push_back(item);
                not_empty.notify_one();
            }
        }));
    }
    for _ in 0..CONSUMERS {
        let state = state.clone();
        threads.push(std::thread::spawn(move || {
            let (lock, not_full, not_empty) = &*state;
            let mut queue = lock.lock().unwrap();
            loop {
                while queue.items.is_empty() && queue.taken < items {
                    queue = not_empty.wait(queue).unwrap();
                }
                let Some(item) = queue.items.pop_front() else { break };
                queue.taken += 1;
                queue.sum += item;
                not_full.notify_one();
            }
            not_empty.notify_all();
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    let queue = state.0.lock().unwrap();
    assert_eq!((queue.taken, queue.sum), (items, expected_sum(items)), "each item arrives once");
}

/// The shape of `multi/rwlock_cross_thread`: IoThreads, coroutines on each, and one write in
/// every `RW_WRITE_EVERY` operations.
const RW_THREADS: u64 = 2;
const RW_PER_THREAD: u64 = 3;
const RW_WRITE_EVERY: u64 = 4;

/// One coroutine's (or thread's) share of `multi/rwlock_cross_thread`: `ops` operations on the
/// counter behind `read` / `write`, every `RW_WRITE_EVERY`-th an increment, the others reads.
fn rwlock_ops(ops: u64, mut read: impl FnMut() -> u64, mut write: impl FnMut()) {
    let mut seen = 0;
    for op in 0..ops {
        if op % RW_WRITE_EVERY == 0 {
            write();
        } else {
            seen += read();
        }
    }
    black_box(seen);
}

/// How many increments `multi/rwlock_cross_thread` makes in `ops` operations in all.
fn rwlock_writes(ops: u64) -> u64 {
    let per_worker = ops / (RW_THREADS * RW_PER_THREAD);
    RW_THREADS * RW_PER_THREAD * per_worker.div_ceil(RW_WRITE_EVERY)
}

/// `multi/rwlock_cross_thread`: 2 IoThreads × 3 coroutines share one CoRwLock, `ops`
/// operations in all, one in four a write; nothing yields inside the critical sections. With
/// the main thread and anything else running, the threads outnumber the cores of a small
/// machine, so a holder is often not running: waiters of both threads interleave in the
/// queue unless running lockers can take the lock.
pub(crate) fn rwlock_cross_thread(ops: u64) {
    let lock = Arc::new(CoRwLock::new(0u64));
    let per_worker = ops / (RW_THREADS * RW_PER_THREAD);
    let threads: Vec<IoThread> =
        (0..RW_THREADS).map(|_| IoThread::spawn("bench-rwlock").expect("an IoThread")).collect();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for thread in &threads {
        for _ in 0..RW_PER_THREAD {
            let (lock, done) = (lock.clone(), done_tx.clone());
            let body = move |co: &aiocoro::coroutine::Co| {
                rwlock_ops(per_worker, || *lock.read(co), || *lock.write(co) += 1);
                done.send(()).expect("the runner waits");
            };
            thread.handle().spawn(body).expect("the IoThread runs");
        }
    }
    for _ in 0..RW_THREADS * RW_PER_THREAD {
        done_rx.recv().expect("every coroutine reports its end");
    }
    for thread in threads {
        thread.stop();
    }
    let count = *lock.try_read().expect("free at the end");
    assert_eq!(count, rwlock_writes(ops), "every write lands once");
}

/// `multi/rwlock_cross_thread_std`: the same on `std::sync::RwLock` with a thread per
/// coroutine.
pub(crate) fn rwlock_cross_thread_std(ops: u64) {
    let lock = Arc::new(std::sync::RwLock::new(0u64));
    let per_worker = ops / (RW_THREADS * RW_PER_THREAD);
    let threads: Vec<_> = (0..RW_THREADS * RW_PER_THREAD)
        .map(|_| {
            let lock = lock.clone();
            std::thread::spawn(move || {
                rwlock_ops(per_worker, || *lock.read().unwrap(), || *lock.write().unwrap() += 1)
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(*lock.read().unwrap(), rwlock_writes(ops), "every write lands once");
}
