//! The stack pool reuses stacks with no system call: counters prove it.
//!
//! The shared pool is process-wide, so the tests of this binary take turns.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;

#[path = "common/nesting.rs"]
mod nesting;

use aiocoro::coroutine::pool::{self, PoolStats};
use aiocoro::coroutine::{Coroutine, DEFAULT_STACK_SIZE};
use nesting::nest;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn delta(before: PoolStats) -> PoolStats {
    let after = pool::thread_stats();
    PoolStats {
        allocated: after.allocated - before.allocated,
        reused: after.reused - before.reused,
        freed: after.freed - before.freed,
        cached: after.cached,
    }
}

#[test]
fn a_million_lifecycles_allocate_a_handful_of_stacks() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = pool::thread_stats();
    for _ in 0..1_000_000 {
        Coroutine::new(|co| {
            std::hint::black_box(co);
        })
        .enter();
    }
    let used = delta(before);
    assert!(used.allocated <= 1, "{used:?}");
    assert_eq!(used.allocated + used.reused, 1_000_000, "{used:?}");
    assert_eq!(used.freed, 0, "{used:?}");
}

#[test]
fn nesting_1000_deep_100_times_allocates_about_1000_stacks() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = pool::thread_stats();
    for _ in 0..100 {
        nest(0, 1000);
    }
    let used = delta(before);
    assert!(used.allocated <= 1000, "one stack per level at most: {used:?}");
    assert_eq!(used.allocated + used.reused, 100_000, "{used:?}");
    assert!(used.reused >= 99_000, "later rounds reuse the first round's stacks: {used:?}");
    assert_eq!(used.freed, 0, "the default pool holds 1000 stacks: {used:?}");
}

/// Runs `cycles` coroutines made by `make` through `finish` and checks that each took a pooled
/// stack and gave it back.
fn assert_every_stack_is_reused(
    cycles: u64,
    make: impl Fn() -> Coroutine,
    finish: impl Fn(Coroutine),
) {
    // Warm the pool so that the first coroutine takes a pooled stack too.
    Coroutine::new(|_co| {}).enter();
    let before = pool::thread_stats();
    for _ in 0..cycles {
        finish(make());
    }
    let used = delta(before);
    assert_eq!((used.allocated, used.reused, used.freed), (0, cycles, 0), "{used:?}");
}

#[test]
fn a_panicking_coroutine_gives_its_stack_back() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_every_stack_is_reused(
        100,
        || Coroutine::new(|_co| panic!("on purpose")),
        |co| {
            assert!(panic::catch_unwind(AssertUnwindSafe(|| co.enter())).is_err());
            assert!(co.is_ended());
        },
    );
}

#[test]
fn a_dropped_suspended_coroutine_gives_its_stack_back() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_every_stack_is_reused(
        100,
        || Coroutine::new(|co| co.yield_now()),
        |co| {
            co.enter();
            assert!(!co.is_ended());
            drop(co);
        },
    );
}

#[test]
fn a_stack_of_another_size_is_mapped_and_unmapped() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = pool::thread_stats();
    let co = Coroutine::builder().stack_size(DEFAULT_STACK_SIZE * 2).build(|_co| {}).unwrap();
    co.enter();
    drop(co);
    let used = delta(before);
    assert_eq!((used.allocated, used.reused, used.freed), (1, 0, 1), "{used:?}");
}
