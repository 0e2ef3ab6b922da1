//! The thread pool for blocking calls: results come back in the submitting context, panics
//! carry their payload, and the pool keeps to its worker bounds.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, IoThread, ThreadPool, ThreadPoolConfig};

static_assertions::assert_impl_all!(ThreadPool: Send, Sync, Clone);

/// How long a test waits for something that should happen long before; past it, it fails.
const DEADLINE: Duration = Duration::from_secs(30);

fn thread_name() -> Option<String> {
    thread::current().name().map(String::from)
}

/// A gate that jobs wait at until the test opens it (with a deadline, so that a bug fails
/// the test instead of hanging it).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn wait(&self) -> bool {
        let open = self.open.lock().unwrap();
        let (open, _) = self.changed.wait_timeout_while(open, DEADLINE, |open| !*open).unwrap();
        *open
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

/// Counts arrivals; `arrive` waits (up to the deadline) until `n` have arrived.
struct Rendezvous {
    arrived: Mutex<usize>,
    changed: Condvar,
    n: usize,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous { arrived: Mutex::new(0), changed: Condvar::new(), n }
    }

    fn arrive(&self) -> bool {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.changed.notify_all();
        let (arrived, _) = self
            .changed
            .wait_timeout_while(arrived, DEADLINE, |arrived| *arrived < self.n)
            .unwrap();
        *arrived >= self.n
    }
}

/// Polls `condition` until it holds, failing the test past the deadline.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "gave up waiting until {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_result_arrives_in_the_submitting_context() {
    let iothread = IoThread::spawn("submitter").unwrap();
    let (tx, rx) = mpsc::channel();
    iothread
        .handle()
        .spawn(move |co| {
            let before = thread_name();
            let job_thread = co.run_blocking(thread_name);
            let after = thread_name();
            tx.send((before, job_thread, after)).unwrap();
        })
        .unwrap();
    let (before, job_thread, after) = rx.recv_timeout(DEADLINE).unwrap();
    iothread.stop();
    assert_eq!(before.as_deref(), Some("submitter"));
    assert_eq!(job_thread.as_deref(), Some("aiocoro-pool"), "the job ran on a worker");
    assert_eq!(after.as_deref(), Some("submitter"), "the coroutine resumed on its own thread");
}

#[test]
fn a_hundred_coroutines_each_get_their_own_result() {
    let ctx = AioContext::new().unwrap();
    let home = thread::current().id();
    let coroutines: Vec<_> = (0..100u64)
        .map(|i| {
            ctx.spawn(move |co| {
                let (square, worker) = co.run_blocking(move || {
                    // Vary how long jobs take, so that they finish out of order.
                    thread::sleep(Duration::from_micros((i * 37) % 500));
                    (i * i, thread::current().id())
                });
                assert_ne!(worker, home, "job {i} ran on the context's thread");
                assert_eq!(thread::current().id(), home);
                square
            })
        })
        .collect();
    for (i, coroutine) in coroutines.into_iter().enumerate() {
        let square = coroutine.join().unwrap();
        assert_eq!(square, (i * i) as u64, "coroutine {i} got someone else's result");
    }
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[derive(Debug, PartialEq)]
struct Payload(u32);

#[test]
fn a_panic_in_the_job_continues_in_the_coroutine_with_its_payload() {
    let ctx = AioContext::new().unwrap();
    let mut caught = ctx.run(move |co| {
        let first = panic::catch_unwind(AssertUnwindSafe(|| {
            co.run_blocking(|| -> u32 { panic::panic_any(Payload(42)) })
        }));
        let second = panic::catch_unwind(AssertUnwindSafe(|| {
            co.run_blocking(|| -> u32 {
                panic!("disk on fire at block {}", std::hint::black_box(7))
            })
        }));
        // The worker survived its panics and the pool goes on.
        assert_eq!(co.run_blocking(|| 5), 5);
        vec![first.unwrap_err(), second.unwrap_err()]
    });
    let message = caught.pop().unwrap();
    let message = match message.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().expect("a message payload").to_string(),
    };
    assert_eq!(message, "disk on fire at block 7");
    let payload = caught.pop().unwrap();
    assert_eq!(payload.downcast_ref::<Payload>(), Some(&Payload(42)));
}

#[test]
fn a_pool_never_runs_more_than_max_workers() {
    let pool = ThreadPool::new(ThreadPoolConfig {
        min_workers: 0,
        max_workers: 2,
        idle_timeout: Duration::from_secs(60),
    });
    assert_eq!(pool.workers(), 0, "workers start lazily");
    let gate = Arc::new(Gate::default());
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let ctx = AioContext::new().unwrap();
    let mut coroutines = Vec::new();
    for i in 0..10 {
        let (pool, gate, running, most) =
            (pool.clone(), gate.clone(), running.clone(), most.clone());
        coroutines.push(ctx.spawn(move |co| {
            pool.run(co, move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let opened = gate.wait();
                running.fetch_sub(1, Ordering::SeqCst);
                opened.then_some(i)
            })
        }));
    }
    ctx.poll(false); // every coroutine submits its job and sleeps
    eventually("two jobs run", || running.load(Ordering::SeqCst) == 2);
    for _ in 0..20 {
        assert_eq!(pool.workers(), 2, "exactly max_workers run while ten jobs wait");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(running.load(Ordering::SeqCst), 2, "queued jobs did not start beyond the bound");
    gate.open();
    let done: Vec<_> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
    assert_eq!(done, (0..10).map(Some).collect::<Vec<_>>(), "every job ran, none timed out");
    assert_eq!(most.load(Ordering::SeqCst), 2);
    assert!(pool.workers() <= 2);
}

#[test]
fn idle_workers_above_the_minimum_exit() {
    let pool = ThreadPool::new(ThreadPoolConfig {
        min_workers: 1,
        max_workers: 4,
        idle_timeout: Duration::from_millis(50),
    });
    let ctx = AioContext::new().unwrap();
    let rendezvous = Arc::new(Rendezvous::new(4));
    let coroutines: Vec<_> = (0..4)
        .map(|_| {
            let (pool, rendezvous) = (pool.clone(), rendezvous.clone());
            // Four jobs that each wait for the other three need four workers at once.
            ctx.spawn(move |co| pool.run(co, move || rendezvous.arrive()))
        })
        .collect();
    let met: Vec<bool> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
    assert_eq!(met, [true; 4], "the pool ran four jobs at once");
    eventually("idle workers shrink to min_workers", || pool.workers() == 1);
    eventually("the remaining worker is idle", || pool.idle_workers() == 1);
    // The minimum stays: the last worker's wait times out again and again, but it stays.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.workers(), 1);
    // The shrunk pool still works.
    let again = ctx.spawn({
        let pool = pool.clone();
        move |co| assert_eq!(pool.run(co, || 6 * 7), 42)
    });
    again.join().unwrap();
}

#[test]
fn the_global_pool_is_one_pool_with_qemus_defaults() {
    let pool = ThreadPool::global();
    assert!(std::ptr::eq(pool, ThreadPool::global()));
    assert_eq!(
        *pool.config(),
        ThreadPoolConfig { min_workers: 0, max_workers: 64, idle_timeout: Duration::from_secs(10) }
    );
    assert_eq!(ThreadPoolConfig::default(), *pool.config());
}
