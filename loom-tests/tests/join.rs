//! The hand-over of a coroutine's result to its join handle (`src/aio/completion.rs`: a
//! `Promise` the coroutine fulfils, a `Claim` the handle polls), on the production code with
//! loom's atomics.
//!
//! * `the_reader_gets_the_result_and_no_wake_is_lost`: a reader that polls (leaving a waker)
//!   while the writer fulfils either finds the result at once or is woken, and then finds it.
//! * `a_new_waker_left_during_the_fulfil_is_woken_or_finds_the_result`: the reader swaps its
//!   waker for another while the writer fulfils; the wake never goes only to the old one.
//! * `a_result_nobody_takes_is_dropped_exactly_once`: the reader drops its claim while the
//!   writer fulfils; the result is dropped once, whoever is last.

#![cfg(aiocoro_loom)]

use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Wake, Waker};

use aiocoro::loom_exports::completion;
use loom::sync::Arc;
use loom::sync::atomic::AtomicUsize;
use loom::thread;

/// Counts its wakes.
struct Flag(Arc<AtomicUsize>);

impl Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn flag() -> (Arc<AtomicUsize>, Waker) {
    let count = Arc::new(AtomicUsize::new(0));
    (count.clone(), Waker::from(std::sync::Arc::new(Flag(count))))
}

/// Waits (yielding to the other model threads) until `count` is non-zero.
fn wait_for(count: &AtomicUsize) {
    while count.load(Ordering::SeqCst) == 0 {
        thread::yield_now();
    }
}

#[test]
fn the_reader_gets_the_result_and_no_wake_is_lost() {
    loom::model(|| {
        let (promise, mut claim) = completion::<u32>();
        let writer = thread::spawn(move || promise.fulfil(Ok(5)));
        let (woken, waker) = flag();
        let mut cx = Context::from_waker(&waker);
        let value = match claim.poll(&mut cx) {
            Poll::Ready(result) => result.unwrap(),
            Poll::Pending => {
                wait_for(&woken);
                match claim.poll(&mut cx) {
                    Poll::Ready(result) => result.unwrap(),
                    Poll::Pending => panic!("woken, but the result is not in"),
                }
            }
        };
        assert_eq!(value, 5);
        writer.join().unwrap();
        assert!(woken.load(Ordering::SeqCst) <= 1, "woken more than once");
    });
}

#[test]
fn a_new_waker_left_during_the_fulfil_is_woken_or_finds_the_result() {
    loom::model(|| {
        let (promise, mut claim) = completion::<u32>();
        let (old, old_waker) = flag();
        assert!(claim.poll(&mut Context::from_waker(&old_waker)).is_pending());
        let writer = thread::spawn(move || promise.fulfil(Ok(9)));
        let (new, new_waker) = flag();
        let mut cx = Context::from_waker(&new_waker);
        let value = match claim.poll(&mut cx) {
            Poll::Ready(result) => result.unwrap(),
            Poll::Pending => {
                wait_for(&new);
                match claim.poll(&mut cx) {
                    Poll::Ready(result) => result.unwrap(),
                    Poll::Pending => panic!("woken, but the result is not in"),
                }
            }
        };
        assert_eq!(value, 9);
        writer.join().unwrap();
        assert!(old.load(Ordering::SeqCst) + new.load(Ordering::SeqCst) <= 1);
    });
}

/// Counts its drops.
struct Dropped(Arc<AtomicUsize>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_result_nobody_takes_is_dropped_exactly_once() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let (promise, mut claim) = completion::<Dropped>();
        let (_woken, waker) = flag();
        let _ = claim.poll(&mut Context::from_waker(&waker));
        let result = Dropped(drops.clone());
        let writer = thread::spawn(move || promise.fulfil(Ok(result)));
        drop(claim);
        writer.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}
