//! Helpers for the lock tests.

use std::sync::mpsc;
use std::time::Duration;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;

/// Lets the other runnable coroutines of this context run, then continues: a one-shot of the
/// next poll wakes this coroutine, so whatever is runnable now runs first, in order.
pub(crate) fn pass_turn(co: &Co) {
    let wait = co.prepare_wait();
    let waker = wait.local_waker();
    AioContext::current().expect("coroutines run in a context").schedule_oneshot(move || {
        waker.wake();
    });
    wait.wait();
}

/// Waits for `n` reports from coroutines on other threads; a missing one means a deadlock or a
/// lost wake-up (the deadline only turns a hang into a failure).
pub(crate) fn collect<T>(rx: &mpsc::Receiver<T>, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(120))
                .expect("a coroutine never finished: deadlock or lost wake-up")
        })
        .collect()
}
