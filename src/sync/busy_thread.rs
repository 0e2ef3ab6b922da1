//! Unit-test support: keeping an IoThread busy, so that the wakes sent to its coroutines wait
//! in its inbox (how the lock tests hold a woken waiter on its way).

use std::sync::mpsc;

use crate::aio::IoThread;

/// Runs a coroutine on `iothread` that blocks the thread until the returned sender sends (or
/// drops): wakes for that thread's coroutines wait in its inbox meanwhile.
pub(super) fn block_thread(iothread: &IoThread) -> mpsc::Sender<()> {
    let (blocked_tx, blocked_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    iothread
        .handle()
        .spawn(move |_co| {
            blocked_tx.send(()).unwrap();
            let _ = go_rx.recv();
        })
        .unwrap();
    blocked_rx.recv().unwrap();
    go_tx
}
