//! The pool's bounds and stack size are configurable. This binary changes the process-wide
//! configuration, so it holds a single test.

#[path = "common/nesting.rs"]
mod nesting;

use aiocoro::coroutine::Coroutine;
use aiocoro::coroutine::pool::{self, PoolConfig};
use nesting::nest;

#[test]
fn bounds_and_stack_size_follow_the_configuration() {
    assert_eq!(pool::config(), PoolConfig::DEFAULT);

    let small = PoolConfig { stack_size: 32 * 1024, thread_cache: 4, shared_capacity: 8 };
    pool::configure(small);
    assert_eq!(pool::config(), small);

    // 20 levels need 20 stacks; afterwards at most 4 stay with this thread, 8 go to the shared
    // pool, and the rest are unmapped.
    let before = pool::thread_stats();
    nest(0, 20);
    let after = pool::thread_stats();
    assert_eq!(after.allocated - before.allocated, 20, "{before:?} -> {after:?}");
    assert!(after.cached <= 4, "{after:?}");
    assert_eq!(pool::global_stats().shared, 8);
    assert_eq!(after.freed - before.freed, 20 - 8 - after.cached as u64, "{after:?}");

    // A second round finds the pooled stacks and maps the rest.
    let pooled = 8 + after.cached as u64;
    let before = after;
    nest(0, 20);
    let after = pool::thread_stats();
    assert_eq!(after.reused - before.reused, pooled, "{before:?} -> {after:?}");
    assert_eq!(after.allocated - before.allocated, 20 - pooled, "{before:?} -> {after:?}");

    // A body can use the configured stack size.
    Coroutine::new(|_co| {
        let mut buffer = [0u8; 12 * 1024];
        std::hint::black_box(&mut buffer);
    })
    .enter();

    // Growing the stacks makes the cached small ones stale: they are unmapped when met, and a
    // coroutine gets a stack of the new size.
    let bigger = PoolConfig { stack_size: 256 * 1024, ..small };
    pool::configure(bigger);
    let before = pool::thread_stats();
    Coroutine::new(|_co| {
        let mut buffer = [0u8; 100 * 1024];
        std::hint::black_box(&mut buffer);
    })
    .enter();
    let after = pool::thread_stats();
    assert_eq!(after.allocated - before.allocated, 1, "{before:?} -> {after:?}");
    assert!(after.freed > before.freed, "a stale cached stack was unmapped: {after:?}");

    // Shrinking the shared pool unmaps what no longer fits.
    pool::configure(PoolConfig { shared_capacity: 0, ..bigger });
    assert_eq!(pool::global_stats().shared, 0);
}
