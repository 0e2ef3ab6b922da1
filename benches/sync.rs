//! Lock benchmarks, named after the QEMU figures they are compared with (small programs linked
//! against QEMU's util library, and `tests/unit/test-aio-multithread -m slow` with 5 IoThreads):
//! `comutex/uncontended`, `corwlock/read`, `corwlock/write`, `comutex/handoff_same_thread`,
//! `coqueue/enter_next_wait`,
//! `multi/mutex/contended`, `multi/mutex/handoff`, `multi/mutex/pthread`; with
//! `std::sync::Mutex` and `tokio::sync::Mutex` as peers where the operation makes sense. And
//! `multi/oversubscribed_queue` (a bounded producer / consumer queue on CoMutex + CoQueue, 4
//! producers and 3 consumers on two IoThreads) with `multi/oversubscribed_queue_std` (the same
//! on `std::sync::Mutex` + `Condvar` and seven threads) as its peer; `multi/rwlock_cross_thread`
//! (one CoRwLock, 3 coroutines on each of two IoThreads, one operation in four a write) with
//! `multi/rwlock_cross_thread_std` (the same on `std::sync::RwLock` and six threads).
//! `cargo bench --bench sync`.

#[path = "support/sync_workloads.rs"]
#[allow(dead_code, reason = "shared by the bench and the example, which each use a part")]
mod workloads;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use workloads::Outcome;

fn timed(run: impl FnOnce()) -> Duration {
    let start = Instant::now();
    run();
    start.elapsed()
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("comutex");
    group.bench_function("uncontended", |b| {
        b.iter_custom(|n| timed(|| workloads::comutex_uncontended(n)))
    });
    group.bench_function("handoff_same_thread", |b| {
        b.iter_custom(|n| timed(|| workloads::comutex_handoff_same_thread(n)))
    });
    group.finish();

    let mut group = c.benchmark_group("corwlock");
    group.bench_function("read", |b| b.iter_custom(|n| timed(|| workloads::corwlock_read(n))));
    group.bench_function("write", |b| b.iter_custom(|n| timed(|| workloads::corwlock_write(n))));
    group.finish();

    let mut group = c.benchmark_group("coqueue");
    group.bench_function("enter_next_wait", |b| {
        b.iter_custom(|n| timed(|| workloads::coqueue_enter_next_wait(n)))
    });
    group.finish();

    let mut group = c.benchmark_group("std_mutex");
    group.bench_function("uncontended", |b| {
        b.iter_custom(|n| timed(|| workloads::std_mutex_uncontended(n)))
    });
    group.finish();

    let mut group = c.benchmark_group("tokio_mutex");
    group.bench_function("uncontended", |b| {
        b.iter_custom(|n| timed(|| workloads::tokio_mutex_uncontended(n)))
    });
    group.bench_function("handoff_same_thread", |b| {
        b.iter_custom(|n| timed(|| workloads::tokio_mutex_handoff(n)))
    });
    group.finish();
}

/// Each sample runs the threads for a fixed time and reports the rate it measured as the time of
/// criterion's iteration count, so criterion prints the time per iteration and, with one element
/// per iteration, the iterations per second.
fn multi_thread(c: &mut Criterion) {
    const SAMPLE: Duration = Duration::from_millis(200);
    let mut group = c.benchmark_group("multi/mutex");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    type Workload = fn(Duration) -> Outcome;
    let workloads: [(&str, Workload); 3] = [
        ("contended", |duration| workloads::multi_comutex(5, duration)),
        ("handoff", |duration| workloads::multi_comutex(2, duration)),
        ("pthread", |duration| workloads::multi_std_mutex(5, duration)),
    ];
    for (name, run) in workloads {
        group.bench_function(name, |b| {
            b.iter_custom(|n| {
                // A sample races the threads for a fixed time (stopping them all at once, so
                // that no thread ever runs alone) and reports the time of `n` iterations at the
                // rate it measured.
                let outcome = run(SAMPLE);
                Duration::from_secs_f64(n as f64 / outcome.rate())
            })
        });
    }
    group.finish();
}

/// Each sample runs a workload once on its item count (its threads started and stopped with
/// it: 200 000 queue items, 300 000 lock operations) and reports the time of criterion's `n`
/// items at the rate it measured.
fn oversubscribed(c: &mut Criterion) {
    let mut group = c.benchmark_group("multi");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    type Workload = fn(u64);
    let workloads: [(&str, Workload, u64); 4] = [
        ("oversubscribed_queue", workloads::oversubscribed_queue, 200_000),
        ("oversubscribed_queue_std", workloads::oversubscribed_queue_std, 200_000),
        ("rwlock_cross_thread", workloads::rwlock_cross_thread, 300_000),
        ("rwlock_cross_thread_std", workloads::rwlock_cross_thread_std, 300_000),
    ];
    for (name, run, items) in workloads {
        group.bench_function(name, |b| {
            b.iter_custom(|n| timed(|| run(items)).mul_f64(n as f64 / items as f64))
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, multi_thread, oversubscribed);
criterion_main!(benches);
