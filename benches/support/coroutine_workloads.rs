//! The coroutine workloads measured by `benches/coroutine.rs` (criterion) and
//! `examples/coroutine_perf.rs` (a quick run), shaped after QEMU's `tests/unit/test-coroutine -m
//! perf` so that the figures line up. Each function runs `iterations` operations.

use std::hint::black_box;

use aiocoro::coroutine::{Co, Coroutine};
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine as RawCoroutine, CoroutineResult};

/// QEMU's `perf_lifecycle`: create a coroutine and enter it; the body returns at once.
pub(crate) fn lifecycle(iterations: u64) {
    for _ in 0..iterations {
        Coroutine::new(|co| {
            black_box(co);
        })
        .enter();
    }
}

/// QEMU's `perf_nesting`: `cycles` times, a chain of `depth` coroutines, each entering the next.
pub(crate) fn nesting(cycles: u64, depth: u32) {
    fn nest(level: u32, depth: u32) {
        if level < depth {
            Coroutine::new(move |_co| nest(level + 1, depth)).enter();
        }
    }
    for _ in 0..cycles {
        nest(0, black_box(depth));
    }
}

/// QEMU's `perf_yield`: enter a coroutine that yields `iterations` times.
pub(crate) fn yield_round_trips(iterations: u64) {
    let co = Coroutine::new(move |co| {
        for _ in 0..iterations {
            co.yield_now();
        }
    });
    while !co.is_ended() {
        co.enter();
    }
}

/// QEMU's `perf_baseline`: a call of a function that is not inlined.
pub(crate) fn function_call(iterations: u64) {
    #[inline(never)]
    fn callee(value: &mut u64) {
        *black_box(value) += 1;
    }
    let mut counter = 0;
    for _ in 0..iterations {
        callee(&mut counter);
    }
    black_box(counter);
}

/// QEMU's `perf_cost`: create a coroutine, enter it, it yields, enter it again to the end.
pub(crate) fn cost(iterations: u64) {
    for _ in 0..iterations {
        let co = Coroutine::new(|co| co.yield_now());
        co.enter();
        co.enter();
    }
}

/// The body of the coroutines that [`suspend_all`] suspends: a 1 KiB local (a small request
/// handler's worth), one yield. Each touches less than a page of its stack.
fn handler(co: &Co) {
    let request = black_box([0u8; 1024]);
    co.yield_now();
    black_box(request);
}

/// Creates `count` coroutines and enters each until it yields: `count` suspended at once.
pub(crate) fn suspend_all(count: u64) -> Vec<Coroutine> {
    (0..count)
        .map(|_| {
            let co = Coroutine::new(handler);
            co.enter();
            co
        })
        .collect()
}

/// Enters each coroutine [`suspend_all`] made once more, to its end.
pub(crate) fn finish_all(coroutines: Vec<Coroutine>) {
    for co in &coroutines {
        co.enter();
    }
    debug_assert!(coroutines.iter().all(Coroutine::is_ended));
}

/// `count` coroutines suspended at once, then each resumed to its end: a server with `count`
/// connections waiting for requests.
pub(crate) fn suspended(count: u64) {
    finish_all(suspend_all(count));
}

/// [`yield_round_trips`] on bare `corosensei`, the same program: the body counts its yields,
/// the caller resumes it until it returns.
pub(crate) fn raw_corosensei_yield(iterations: u64) {
    let mut co = RawCoroutine::new(move |yielder, ()| {
        for _ in 0..iterations {
            yielder.suspend(());
        }
    });
    while let CoroutineResult::Yield(()) = co.resume(()) {}
}

/// The raw `corosensei` cycle under [`lifecycle`]: create on a reused stack, run to the end, take
/// the stack back.
pub(crate) fn raw_corosensei_lifecycle(iterations: u64) {
    let mut stack = DefaultStack::new(1024 * 1024).expect("cannot map a stack");
    for _ in 0..iterations {
        let mut co = RawCoroutine::with_stack(stack, |yielder, ()| {
            black_box(yielder);
        });
        let result: CoroutineResult<(), ()> = co.resume(());
        black_box(result);
        stack = co.into_stack();
    }
}
