//! Stopping an IoThread with coroutines still waiting closes every descriptor the thread and its
//! coroutines held (its epoll instance, its eventfd, its io_uring): a storage daemon stops and
//! starts IoThreads for as long as it runs.
//!
//! Mappings are not counted: under load the thread pool keeps more idle workers and glibc more
//! malloc arenas for a while, whose mappings come and go with the load, not with the stops. (The
//! coroutine stacks' mappings are counted in `tests/stack_reservations.rs`.)
//!
//! One test in its own binary, so that no other test opens descriptors while it counts them.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use aiocoro::aio::IoThread;
use aiocoro::sync::{CoMutex, CoQueue};

/// The coroutines each round leaves waiting when it stops its IoThread.
const WAITERS: usize = 20;

/// The process's open descriptors.
fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("cannot list /proc/self/fd").count()
}

/// The smallest value `count` takes over 100 ms: a thread that just ended a round may drop its
/// last reference to a context (and so close its eventfd) a moment after the stop returned.
fn settled(count: fn() -> usize) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            count()
        })
        .min()
        .unwrap()
}

/// Waits up to 10 s for `count` to come back to `baseline` or below; returns its last value.
fn back_to(baseline: usize, count: fn() -> usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = count();
        if now <= baseline || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns an IoThread, leaves [`WAITERS`] coroutines waiting on it (for a `CoMutex` someone
/// else holds, on a `CoQueue`, in a long sleep, after a thread-pool job), and stops it.
fn stop_with_waiters(held: &Arc<CoMutex<u32>>, queue: &Arc<(CoMutex<u32>, CoQueue)>) {
    let iothread = IoThread::spawn("stop-leaks").unwrap();
    let (started, ready) = mpsc::channel();
    for kind in 0..WAITERS {
        let (held, queue, started) = (held.clone(), queue.clone(), started.clone());
        iothread
            .handle()
            .spawn(move |co| {
                started.send(()).unwrap();
                match kind % 4 {
                    0 => *held.lock(co) += 1,
                    1 => {
                        let mut guard = queue.0.lock(co);
                        queue.1.wait(co, &mut guard);
                    }
                    2 => co.sleep(Duration::from_secs(3600)),
                    _ => {
                        co.run_blocking(|| std::thread::sleep(Duration::from_millis(1)));
                        co.sleep(Duration::from_secs(3600));
                    }
                }
            })
            .unwrap();
    }
    for _ in 0..WAITERS {
        ready.recv_timeout(Duration::from_secs(10)).expect("a coroutine started");
    }
    iothread.stop();
}

#[test]
fn stopping_iothreads_with_waiting_coroutines_leaks_no_descriptor() {
    let held = Arc::new(CoMutex::new(0u32));
    let queue = Arc::new((CoMutex::new(0u32), CoQueue::new()));
    let _guard = held.try_lock().unwrap();
    // The thread pool's workers, the stack pool's reservations and caches settle first.
    for _ in 0..20 {
        stop_with_waiters(&held, &queue);
    }
    let before = settled(descriptors);
    for _ in 0..50 {
        stop_with_waiters(&held, &queue);
    }
    assert_eq!(back_to(before, descriptors), before, "descriptors leaked by 50 stops");
}
