//! QuiesceGate on real threads: a plain thread's sections never see a request of the IoThreads'
//! coroutines inside, and the requests go on after each section; quiescing inside a coroutine
//! panics with a clear message. (The interleavings are model-checked by
//! `loom-tests/tests/quiesce_gate.rs`; `block/tests/drain.rs` drives the gate through
//! `BlockBackend::drain`.)

#[path = "common/sync_helpers.rs"]
mod sync_helpers;

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;
use sync_helpers::{collect, pass_turn};

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::sync::QuiesceGate;

/// What the requests and the drainer share.
#[derive(Default)]
struct Shared {
    gate: QuiesceGate,
    /// Requests between entering and leaving, counted by the requests themselves.
    inside: AtomicU64,
    /// Requests that have left.
    done: AtomicU64,
    stop: AtomicBool,
}

/// Stops the requests when dropped, also by a failing assertion: the IoThreads' drop joins
/// their threads, which would otherwise wait for the requests' loops for good.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn sections_from_a_plain_thread_never_see_a_request_of_the_iothreads_inside() {
    const THREADS: usize = 2;
    const COROUTINES: usize = 4;
    const SECTIONS: usize = 50;
    let shared = Arc::new(Shared::default());
    let (done_tx, done_rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("quiesce-{i}")).unwrap()).collect();
    for iothread in &iothreads {
        for _ in 0..COROUTINES {
            let (shared, done_tx) = (shared.clone(), done_tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    while !shared.stop.load(Ordering::SeqCst) {
                        let entry = shared.gate.enter(co);
                        shared.inside.fetch_add(1, Ordering::SeqCst);
                        // Stays in across a suspension, as a request waiting for I/O does.
                        pass_turn(co);
                        shared.inside.fetch_sub(1, Ordering::SeqCst);
                        drop(entry);
                        shared.done.fetch_add(1, Ordering::SeqCst);
                        pass_turn(co);
                    }
                    done_tx.send(()).unwrap();
                })
                .unwrap();
        }
    }
    let stop = StopOnDrop(shared.clone());
    for _ in 0..SECTIONS {
        let before = shared.done.load(Ordering::SeqCst);
        {
            let _quiesced = shared.gate.quiesce();
            assert_eq!(shared.inside.load(Ordering::SeqCst), 0, "a request runs in a section");
            assert_eq!(shared.gate.in_flight(), 0);
            thread::sleep(Duration::from_micros(200));
            assert_eq!(shared.inside.load(Ordering::SeqCst), 0, "a request got in meanwhile");
        }
        // The requests go on: some leave after the section (the deadline only turns a
        // request held for good into a failure).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while shared.done.load(Ordering::SeqCst) == before {
            assert!(std::time::Instant::now() < deadline, "no request passed after a section");
            thread::yield_now();
        }
    }
    drop(stop);
    collect(&done_rx, THREADS * COROUTINES);
    iothreads.into_iter().for_each(IoThread::stop);
    assert_eq!(shared.gate.in_flight(), 0);
}

#[test]
fn quiescing_inside_a_coroutine_is_a_clear_panic() {
    let ctx = AioContext::new().unwrap();
    let gate = Arc::new(QuiesceGate::new());
    let inner = gate.clone();
    let message = ctx
        .spawn(move |_co| {
            let panic = panic::catch_unwind(AssertUnwindSafe(|| drop(inner.quiesce())))
                .expect_err("quiesce inside a coroutine returned");
            let text = panic.downcast_ref::<&str>().map(|s| s.to_string());
            text.or(panic.downcast_ref::<String>().cloned()).unwrap_or_default()
        })
        .join()
        .unwrap();
    assert!(message.contains("QuiesceGate::quiesce called inside a coroutine"), "{message}");
    // The section was never opened: requests pass.
    ctx.spawn(move |co| drop(gate.enter(co))).join().unwrap();
}
