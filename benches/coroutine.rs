//! Coroutine benchmarks named after QEMU's `tests/unit/test-coroutine -m perf`, with raw
//! `corosensei` baselines in the same run. `cargo bench --bench coroutine`.

#[path = "support/coroutine_workloads.rs"]
mod workloads;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Times `iterations` operations of a workload.
fn timed(run: impl FnOnce()) -> Duration {
    let start = Instant::now();
    run();
    start.elapsed()
}

fn coroutine(c: &mut Criterion) {
    c.bench_function("lifecycle", |b| b.iter_custom(|n| timed(|| workloads::lifecycle(n))));
    c.bench_function("yield", |b| b.iter_custom(|n| timed(|| workloads::yield_round_trips(n))));
    c.bench_function("function_call", |b| b.iter_custom(|n| timed(|| workloads::function_call(n))));
    c.bench_function("cost", |b| b.iter_custom(|n| timed(|| workloads::cost(n))));

    const DEPTH: u32 = 1000;
    let mut nesting = c.benchmark_group("nesting");
    // One element per level, so criterion reports the time per level next to QEMU's figure.
    nesting.throughput(Throughput::Elements(u64::from(DEPTH)));
    nesting.bench_function("depth_1000", |b| {
        b.iter_custom(|n| timed(|| workloads::nesting(n, DEPTH)))
    });
    nesting.finish();

    const SUSPENDED: u64 = 10_000;
    let mut suspended = c.benchmark_group("suspended");
    // One element per coroutine: the time to suspend one among 10 000 and resume it to its end.
    suspended.throughput(Throughput::Elements(SUSPENDED));
    suspended.bench_function("10000", |b| {
        b.iter_custom(|n| timed(|| (0..n).for_each(|_| workloads::suspended(SUSPENDED))))
    });
    suspended.finish();

    let mut raw = c.benchmark_group("raw_corosensei");
    raw.bench_function("yield", |b| {
        b.iter_custom(|n| timed(|| workloads::raw_corosensei_yield(n)))
    });
    raw.bench_function("lifecycle", |b| {
        b.iter_custom(|n| timed(|| workloads::raw_corosensei_lifecycle(n)))
    });
    raw.finish();
}

criterion_group!(benches, coroutine);
criterion_main!(benches);
