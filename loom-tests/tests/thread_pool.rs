//! One thread-pool job's hand-off between the coroutine that submitted it and the worker that
//! runs it (`src/aio/thread_pool.rs`: `Ticket`, `Pending`), on the production code with loom's
//! mutex and condition variable. The coroutine's waker is modelled by a flag the submitter
//! waits on.
//!
//! * `the_result_is_in_the_ticket_when_the_submitter_is_woken`: the submitter, once notified,
//!   always finds the result (never "woken before it ran"), and is notified exactly once.
//! * `giving_up_never_lets_the_job_run_after_the_borrow_ends`: a submitter that gives up (drops
//!   its `Pending`, as an unwinding coroutine does) while a worker picks the job up concurrently
//!   either takes the job back unrun, or waits until the worker is done with it: the job never
//!   runs after the give-up returned, which is what makes borrowing from the coroutine's stack
//!   sound.

#![cfg(aiocoro_loom)]

use std::sync::atomic::Ordering;

use aiocoro::loom_exports::{Job, JobDone, ticket};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// A coroutine's waker: counts notifications and lets the submitter block until the first.
#[derive(Default)]
struct WakerState {
    notified: Mutex<usize>,
    changed: Condvar,
}

/// What the ticket holds: a shared handle on the waker state.
#[derive(Clone, Default)]
struct ModelWaker(Arc<WakerState>);

impl JobDone for ModelWaker {
    fn notify(&self) {
        *self.0.notified.lock().unwrap() += 1;
        self.0.changed.notify_all();
    }
}

impl std::ops::Deref for ModelWaker {
    type Target = WakerState;
    fn deref(&self) -> &WakerState {
        &self.0
    }
}

impl WakerState {
    fn wait(&self) -> usize {
        let mut notified = self.notified.lock().unwrap();
        while *notified == 0 {
            notified = self.changed.wait(notified).unwrap();
        }
        *notified
    }
}

#[test]
fn the_result_is_in_the_ticket_when_the_submitter_is_woken() {
    loom::model(|| {
        let waker = ModelWaker::default();
        let (job, pending) = ticket(|| 42u32, waker.clone());
        let worker = thread::spawn(move || job.run());
        assert_eq!(waker.wait(), 1);
        assert_eq!(pending.finish().ok(), Some(42));
        worker.join().unwrap();
        assert_eq!(*waker.notified.lock().unwrap(), 1, "notified exactly once");
    });
}

#[test]
fn giving_up_never_lets_the_job_run_after_the_borrow_ends() {
    loom::model(|| {
        let borrow_ended = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicUsize::new(0));
        let waker = ModelWaker::default();
        let (job, pending) = {
            let (borrow_ended, runs) = (borrow_ended.clone(), runs.clone());
            ticket(
                move || {
                    assert!(
                        !borrow_ended.load(Ordering::Acquire),
                        "the job ran after its submitter gave up and let go of the borrow"
                    );
                    runs.fetch_add(1, Ordering::Relaxed);
                },
                waker.clone(),
            )
        };
        let worker = thread::spawn(move || job.run());
        drop(pending);
        borrow_ended.store(true, Ordering::Release);
        worker.join().unwrap();
        let runs = runs.load(Ordering::Relaxed);
        let notified = *waker.notified.lock().unwrap();
        assert!(runs <= 1);
        assert_eq!(notified, runs, "a job that ran notifies; one taken back does not");
    });
}
