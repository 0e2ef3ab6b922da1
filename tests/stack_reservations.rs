//! Coroutine stacks are carved from a few large reservations: the number of mappings does not
//! grow with the number of suspended coroutines, and the stacks that the pool does not keep give
//! their memory back. The tests measure the whole process, so they take turns.

#[path = "../benches/support/process_memory.rs"]
#[allow(dead_code, reason = "these tests need only some of the figures")]
mod process_memory;

use std::hint::black_box;
use std::sync::Mutex;

use aiocoro::coroutine::pool::{self, PoolConfig};
use aiocoro::coroutine::{Co, Coroutine};
use process_memory::{mapping_count, resident_kib};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Starts `count` coroutines running `body` and returns them once each has yielded.
fn suspend(count: usize, body: fn(&Co)) -> Vec<Coroutine> {
    (0..count)
        .map(|_| {
            let co = Coroutine::new(body);
            co.enter();
            assert!(!co.is_ended(), "the body yields");
            co
        })
        .collect()
}

/// Enters every coroutine once more, to its end.
fn finish(coroutines: Vec<Coroutine>) {
    for co in &coroutines {
        co.enter();
        assert!(co.is_ended());
    }
}

#[test]
fn ten_thousand_suspended_coroutines_add_a_handful_of_mappings() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = mapping_count();
    let first = suspend(1_000, |co| co.yield_now());
    let at_1_000 = mapping_count();
    let rest = suspend(9_000, |co| co.yield_now());
    let at_10_000 = mapping_count();
    // A stack of its own costs two mappings (stack and guard page): +20 000 here.
    assert!(
        at_10_000.saturating_sub(before) < 40,
        "{before} mappings before, {at_1_000} with 1 000 suspended, {at_10_000} with 10 000"
    );
    // Ten times the coroutines: a few more reservations, each twice as big as the last.
    assert!(
        at_10_000.saturating_sub(at_1_000) <= 10,
        "{at_1_000} mappings with 1 000 suspended, {at_10_000} with 10 000"
    );
    finish(first);
    finish(rest);
}

#[test]
fn stacks_the_pool_does_not_keep_give_their_memory_back() {
    const COROUTINES: u64 = 2_000;
    const TOUCHED_KIB: u64 = 64;
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    pool::configure(PoolConfig { thread_cache: 16, shared_capacity: 0, ..PoolConfig::DEFAULT });
    let before = resident_kib();
    let coroutines = suspend(COROUTINES as usize, |co| {
        let mut buffer = [1u8; TOUCHED_KIB as usize * 1024];
        black_box(&mut buffer);
        co.yield_now();
    });
    let suspended = resident_kib().saturating_sub(before);
    assert!(
        suspended >= COROUTINES * TOUCHED_KIB * 9 / 10,
        "{COROUTINES} stacks with {TOUCHED_KIB} KiB touched each take {suspended} KiB"
    );
    finish(coroutines);
    // The pool keeps 16 stacks (1 MiB); the other 1 984 went back to their reservations.
    let left = resident_kib().saturating_sub(before);
    pool::configure(PoolConfig::DEFAULT);
    assert!(
        left < suspended / 10,
        "{suspended} KiB resident while suspended, {left} KiB still resident after they ended"
    );
}
