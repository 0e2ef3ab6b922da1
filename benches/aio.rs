//! Event-loop benchmarks, shaped after QEMU's `tests/unit/test-aio` (`test_bh_schedule`,
//! `test_timer_schedule`), `tests/unit/test-aio-multithread` (`test_multi_co_schedule`) and
//! `tests/unit/test-thread-pool` (`test_submit_co`). `cargo bench --bench aio`.
//!
//! * `bh/schedule_run`: schedule one bottom half and run it with a non-blocking poll, on one
//!   thread.
//! * `wake/ping_pong`: two coroutines on two IoThreads wake each other in turn; one iteration is
//!   a round trip, that is two cross-thread wakes (inbox push, eventfd write when the other side
//!   sleeps, and the resume on its home thread).
//! * `timer/arm_fire`: arm a timer for now and poll until it has fired.
//! * `thread_pool/round_trip`: a coroutine hands a trivial closure to a worker of the global
//!   thread pool with `Co::run_blocking` and sleeps until the result is back in its context.
//! * `future/ready`, `future/cross_thread_wake`, `join/spawn_join`, `join/await_from_tokio`: the
//!   Future bridge and join handles (see `support/future_workloads.rs`);
//!   `future/cross_thread_wake_tokio`: tokio awaiting the futures of `cross_thread_wake`, its peer.

#[path = "support/future_workloads.rs"]
mod future_workloads;

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use aiocoro::aio::{AioContext, IoThread, Waker};
use aiocoro::coroutine::Co;
use criterion::{Criterion, criterion_group, criterion_main};

/// Times `run`.
fn timed(run: impl FnOnce()) -> Duration {
    let start = Instant::now();
    run();
    start.elapsed()
}

fn bh(c: &mut Criterion) {
    let ctx = AioContext::new().expect("an AioContext for the bench thread");
    let runs = Rc::new(Cell::new(0u64));
    let counter = runs.clone();
    let bh = ctx.new_bh(move || counter.set(counter.get() + 1));
    let mut group = c.benchmark_group("bh");
    group.bench_function("schedule_run", |b| {
        b.iter_custom(|n| {
            let before = runs.get();
            let elapsed = timed(|| {
                for _ in 0..n {
                    bh.schedule();
                    ctx.poll(false);
                }
            });
            assert_eq!(runs.get() - before, n, "every schedule ran the BH once");
            elapsed
        })
    });
    group.finish();
}

/// A wake-up that one coroutine leaves for another, from any thread; a wake-up that comes
/// before the wait is kept, so none is lost.
#[derive(Default)]
struct Event {
    state: Mutex<EventState>,
}

#[derive(Default)]
struct EventState {
    /// Notified with nobody waiting: the next wait returns at once.
    pending: bool,
    /// The waiting coroutine's waker.
    waiter: Option<Waker>,
}

impl Event {
    fn notify(&self) {
        let waiter = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let waiter = state.waiter.take();
            state.pending = waiter.is_none();
            waiter
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }

    fn wait(&self, co: &Co) {
        let wait = co.prepare_wait();
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if std::mem::take(&mut state.pending) {
                return;
            }
            state.waiter = Some(wait.waker());
        }
        wait.wait();
    }
}

fn wake(c: &mut Criterion) {
    let ping_thread = IoThread::spawn("ping").expect("an IoThread");
    let pong_thread = IoThread::spawn("pong").expect("an IoThread");
    let mut group = c.benchmark_group("wake");
    group.bench_function("ping_pong", |b| {
        b.iter_custom(|n| {
            let ping = Arc::new(Event::default());
            let pong = Arc::new(Event::default());
            {
                let (ping, pong) = (ping.clone(), pong.clone());
                pong_thread
                    .handle()
                    .spawn(move |co| {
                        for _ in 0..n {
                            pong.wait(co);
                            ping.notify();
                        }
                    })
                    .expect("the pong thread runs");
            }
            let (done_tx, done_rx) = mpsc::channel();
            timed(|| {
                ping_thread
                    .handle()
                    .spawn(move |co| {
                        for _ in 0..n {
                            pong.notify();
                            ping.wait(co);
                        }
                        done_tx.send(()).expect("the bench waits for the rounds");
                    })
                    .expect("the ping thread runs");
                done_rx.recv().expect("the ping coroutine finished its rounds");
            })
        })
    });
    group.finish();
    ping_thread.stop();
    pong_thread.stop();
}

fn timer(c: &mut Criterion) {
    let ctx = AioContext::new().expect("an AioContext for the bench thread");
    let fired = Rc::new(Cell::new(0u64));
    let counter = fired.clone();
    let timer = ctx.new_timer(move || counter.set(counter.get() + 1));
    let mut group = c.benchmark_group("timer");
    group.bench_function("arm_fire", |b| {
        b.iter_custom(|n| {
            timed(|| {
                for _ in 0..n {
                    let before = fired.get();
                    timer.arm_after(Duration::ZERO);
                    while fired.get() == before {
                        ctx.poll(false);
                    }
                }
            })
        })
    });
    group.finish();
}

fn thread_pool(c: &mut Criterion) {
    let ctx = AioContext::new().expect("an AioContext for the bench thread");
    let mut group = c.benchmark_group("thread_pool");
    group.bench_function("round_trip", |b| {
        b.iter_custom(|n| {
            let mut done = 0;
            let elapsed = timed(|| {
                done = ctx.run(move |co| {
                    for i in 0..n {
                        let result = co.run_blocking(move || black_box(i) + 1);
                        assert_eq!(result, i + 1);
                    }
                    n
                });
            });
            assert_eq!(done, n, "every job came back");
            elapsed
        })
    });
    group.finish();
}

fn bridge(c: &mut Criterion) {
    let bridge = future_workloads::Bridge::new();
    let mut group = c.benchmark_group("future");
    group.bench_function("ready", |b| b.iter_custom(|n| timed(|| bridge.ready(n))));
    group.bench_function("cross_thread_wake", |b| {
        b.iter_custom(|n| timed(|| bridge.cross_thread_wake(n)))
    });
    group.bench_function("cross_thread_wake_tokio", |b| {
        b.iter_custom(|n| timed(|| bridge.tokio_cross_thread_wake(n)))
    });
    group.finish();
    let mut group = c.benchmark_group("join");
    group.bench_function("spawn_join", |b| b.iter_custom(|n| timed(|| bridge.spawn_join(n))));
    group.bench_function("await_from_tokio", |b| {
        b.iter_custom(|n| timed(|| bridge.await_from_tokio(n)))
    });
    group.finish();
}

criterion_group!(benches, bh, wake, timer, thread_pool, bridge);
criterion_main!(benches);
