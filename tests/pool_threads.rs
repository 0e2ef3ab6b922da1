//! Stacks move between threads through the shared pool. The shared pool is process-wide and
//! exiting test threads fill it, so this binary holds a single test.

#[path = "common/nesting.rs"]
mod nesting;

use aiocoro::coroutine::pool;
use nesting::nest;

#[test]
fn an_exiting_thread_leaves_its_stacks_to_the_others() {
    let shared_before = pool::global_stats().shared;
    let made = std::thread::spawn(|| {
        nest(0, 50);
        pool::thread_stats()
    })
    .join()
    .unwrap();
    let shared_after = pool::global_stats().shared;
    assert_eq!(made.allocated + made.reused, 50, "{made:?}");
    assert_eq!(made.freed, 0, "{made:?}");
    assert_eq!(
        shared_after,
        shared_before + made.allocated as usize,
        "every stack the thread took or mapped went to the shared pool when it exited"
    );
    // And another thread takes them from there instead of mapping new ones.
    let second = std::thread::spawn(|| {
        nest(0, 50);
        pool::thread_stats()
    })
    .join()
    .unwrap();
    assert_eq!((second.allocated, second.reused), (0, 50), "{second:?}");
}
