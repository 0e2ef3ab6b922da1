//! The hand-over of a spawned coroutine's result to its [`JoinHandle`](super::JoinHandle): a
//! one-shot cell with one writer ([`Promise`], held by the coroutine) and one reader
//! ([`Claim`], held by the handle), in one small block (recycled per thread, see
//! `small_blocks.rs`) with one atomic word and no lock.
//!
//! The word's bits say who may touch which part:
//!
//! * `COMPLETE`: the result is in (the promise writes the result, then sets this, once);
//! * `WAKER`: the waker cell holds the reader's waker, which the promise wakes when it
//!   completes. Only the claim sets it, and it clears it only while `COMPLETE` is not set, so a
//!   promise that saw it at completion may read the cell until it sets `PROMISE_GONE`; the
//!   claim writes the cell only while the bit is clear;
//! * `PROMISE_GONE`: a promise that completed with `WAKER` set is done with the cell (a
//!   promise that completed without it was done at once; if the claim sets `WAKER` just after
//!   that, it sets this bit too);
//! * `CLAIM_GONE`: the claim was dropped.
//!
//! Each bit is set at most once, and only while it is clear (`WAKER` may be cleared and set
//! again, by its only writer), so the code sets bits with `fetch_add`, one `lock xadd` on x86
//! where a `fetch_or` whose old value is used is a compare-and-swap loop.
//!
//! Whichever side is done last frees the cell. A coroutine joined on its own thread completes
//! before its claim is first polled: one atomic read-modify-write in all, on the promise's side.

// Its `pub` items are re-exported to the loom models (`loom_exports`, loom builds only).
#![cfg_attr(not(aiocoro_loom), allow(unreachable_pub))]

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire};
use std::task::{Context, Poll, Waker};
use std::thread;

use super::small_blocks;
use crate::loom::AtomicUsize;

/// The payload of the error a joiner gets for a coroutine that its context's shutdown
/// cancelled (or that never ran): the error this cell completes with for it.
pub const CANCELLED: &str = "aiocoro: the coroutine was cancelled by its context's shutdown";

const COMPLETE: usize = 1;
const WAKER: usize = 2;
const PROMISE_GONE: usize = 4;
const CLAIM_GONE: usize = 8;

/// Whether the promise side has let go of the cell, by the state word `state`.
fn promise_done(state: usize) -> bool {
    state & PROMISE_GONE != 0 || (state & COMPLETE != 0 && state & WAKER == 0)
}

/// The cell both sides point to.
struct Cell<T> {
    state: AtomicUsize,
    /// Written by the promise before `COMPLETE`; read by the claim after it.
    result: UnsafeCell<Option<thread::Result<T>>>,
    /// The reader's waker; see the module's rules.
    waker: UnsafeCell<Option<Waker>>,
}

/// Drops and frees the cell.
///
/// # Safety
///
/// Both sides are done with `cell` (made by [`completion`]), and nothing uses it after.
unsafe fn free<T>(cell: NonNull<Cell<T>>) {
    // SAFETY: the caller's contract: we are its last user, and it was initialised in
    // `completion` in a block from `small_blocks::allocate`.
    unsafe {
        cell.drop_in_place();
        small_blocks::release(cell);
    }
}

/// A new cell: the coroutine's [`Promise`] and the handle's [`Claim`].
pub fn completion<T>() -> (Promise<T>, Claim<T>) {
    let cell = small_blocks::allocate::<Cell<T>>();
    // SAFETY: a fresh block for a `Cell<T>`, which nothing else points to yet.
    unsafe {
        cell.write(Cell {
            state: AtomicUsize::new(0),
            result: UnsafeCell::new(None),
            waker: UnsafeCell::new(None),
        })
    };
    (Promise { cell, _owns: PhantomData }, Claim { cell, taken: false, _owns: PhantomData })
}

/// The writing side: completes the cell once. Dropped unfulfilled (its coroutine never ran),
/// it completes the cell with the [`CANCELLED`] error, so that no joiner waits forever.
pub struct Promise<T> {
    /// Invariant: a live cell whose `COMPLETE` bit is not set.
    cell: NonNull<Cell<T>>,
    _owns: PhantomData<thread::Result<T>>,
}

impl<T> std::fmt::Debug for Promise<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promise").finish_non_exhaustive()
    }
}

// SAFETY: the promise moves a `T` to the claim's thread (hence `T: Send`); everything else it
// shares goes through the atomic state word, and wakers are `Send + Sync`.
unsafe impl<T: Send> Send for Promise<T> {}

impl<T> Promise<T> {
    /// Whether the claim was dropped (nobody will take the result).
    pub fn is_abandoned(&self) -> bool {
        // SAFETY: the cell is live while the promise is (invariant).
        unsafe { self.cell.as_ref() }.state.load(Acquire) & CLAIM_GONE != 0
    }

    /// Puts `result` in and wakes the reader's waker, if it left one.
    pub fn fulfil(self, result: thread::Result<T>) {
        let cell = self.cell;
        std::mem::forget(self);
        // SAFETY: the cell is live (invariant) and, `COMPLETE` being clear, only we touch
        // `result`.
        let fields = unsafe { cell.as_ref() };
        // SAFETY: as above.
        unsafe { *fields.result.get() = Some(result) };
        let before = fields.state.fetch_add(COMPLETE, AcqRel);
        if before & WAKER == 0 {
            if before & CLAIM_GONE != 0 {
                // SAFETY: the claim is gone and we are done with the cell.
                unsafe { free(cell) };
            }
            return;
        }
        // SAFETY: `WAKER` was set when we completed, so the claim no longer writes the cell
        // until we set `PROMISE_GONE`; reading it alongside the claim's reads is fine.
        if let Some(waker) = unsafe { &*fields.waker.get() } {
            waker.wake_by_ref();
        }
        if fields.state.fetch_add(PROMISE_GONE, AcqRel) & CLAIM_GONE != 0 {
            // SAFETY: the claim is gone and we are done with the cell.
            unsafe { free(cell) };
        }
    }
}

impl<T> Drop for Promise<T> {
    fn drop(&mut self) {
        let promise = Promise { cell: self.cell, _owns: PhantomData };
        promise.fulfil(Err(Box::new(CANCELLED)));
    }
}

/// The reading side: takes the result once it is in.
pub struct Claim<T> {
    /// Invariant: a live cell whose `CLAIM_GONE` bit is not set.
    cell: NonNull<Cell<T>>,
    /// Whether the result was taken.
    taken: bool,
    _owns: PhantomData<thread::Result<T>>,
}

impl<T> std::fmt::Debug for Claim<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").finish_non_exhaustive()
    }
}

// SAFETY: the claim receives a `T` from the promise's thread (hence `T: Send`); its shared
// state goes through the atomic state word.
unsafe impl<T: Send> Send for Claim<T> {}
// SAFETY: `&Claim` only reads the atomic state word.
unsafe impl<T: Send> Sync for Claim<T> {}
// Nothing in a claim is pinned: the result moves out by value.
impl<T> Unpin for Claim<T> {}

impl<T> Claim<T> {
    fn fields(&self) -> &Cell<T> {
        // SAFETY: the cell is live while the claim is (invariant).
        unsafe { self.cell.as_ref() }
    }

    /// Whether the result is in, or was taken.
    pub fn is_complete(&self) -> bool {
        self.taken || self.fields().state.load(Acquire) & COMPLETE != 0
    }

    /// The result if it is in; otherwise leaves `cx`'s waker to be woken when it is.
    ///
    /// # Panics
    ///
    /// If the result was taken already.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<thread::Result<T>> {
        assert!(!self.taken, "aiocoro: a JoinHandle was polled after it returned its result");
        let fields = self.fields();
        let mut state = fields.state.load(Acquire);
        if state & COMPLETE == 0 {
            if state & WAKER != 0 {
                // SAFETY: the promise only reads the cell while `WAKER` is set.
                let same = unsafe { &*fields.waker.get() }
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()));
                if same {
                    return Poll::Pending;
                }
                // Take the cell back to change the waker, unless the promise completes first.
                match fields.state.compare_exchange(state, state & !WAKER, Acquire, Acquire) {
                    Ok(_) => state &= !WAKER,
                    Err(now) => state = now,
                }
            }
            if state & (COMPLETE | WAKER) == 0 {
                // SAFETY: `WAKER` is clear, so the promise does not touch the cell.
                unsafe { *fields.waker.get() = Some(cx.waker().clone()) };
                state = fields.state.fetch_add(WAKER, AcqRel);
                if state & COMPLETE != 0 {
                    // The promise completed without seeing the waker, so it is done; say so,
                    // or `COMPLETE | WAKER` would have the claim wait for it forever.
                    fields.state.fetch_add(PROMISE_GONE, AcqRel);
                }
            }
            if state & COMPLETE == 0 {
                return Poll::Pending;
            }
        }
        self.taken = true;
        let fields = self.fields();
        // SAFETY: `COMPLETE` is set (acquired), so the promise wrote the result and no longer
        // touches it.
        let result = unsafe { (*fields.result.get()).take() };
        Poll::Ready(result.expect("aiocoro: a completed cell holds its result until taken"))
    }
}

impl<T> Claim<T> {
    /// Gives up on the result: the promise will never be fulfilled (its coroutine was
    /// leaked). Like a taken result, a later poll panics.
    pub fn give_up(&mut self) {
        self.taken = true;
    }
}

impl<T> Drop for Claim<T> {
    fn drop(&mut self) {
        let fields = self.fields();
        let state = fields.state.load(Acquire);
        // Once the promise is done, nobody else touches the cell: no need to say we leave.
        if promise_done(state) || promise_done(fields.state.fetch_add(CLAIM_GONE, AcqRel)) {
            // SAFETY: both sides are done (the promise is, and we are dropping).
            unsafe { free(self.cell) };
        }
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    use super::{CANCELLED, completion};

    /// Counts its wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Counts its drops.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn noop() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn a_result_put_in_before_the_first_poll_is_ready_at_once() {
        let (promise, mut claim) = completion();
        assert!(!claim.is_complete());
        promise.fulfil(Ok(7));
        assert!(claim.is_complete());
        assert!(matches!(claim.poll(&mut noop()), Poll::Ready(Ok(7))));
        assert!(claim.is_complete(), "a taken result still counts as complete");
    }

    #[test]
    fn only_the_last_waker_left_is_woken_and_once() {
        let (promise, mut claim) = completion::<u8>();
        let first = Arc::new(CountingWaker::default());
        let second = Arc::new(CountingWaker::default());
        let first_waker = Waker::from(first.clone());
        let second_waker = Waker::from(second.clone());
        assert!(claim.poll(&mut Context::from_waker(&first_waker)).is_pending());
        assert!(claim.poll(&mut Context::from_waker(&first_waker)).is_pending());
        assert!(claim.poll(&mut Context::from_waker(&second_waker)).is_pending());
        promise.fulfil(Ok(1));
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(matches!(claim.poll(&mut noop()), Poll::Ready(Ok(1))));
    }

    #[test]
    fn a_result_nobody_takes_is_dropped_once_whichever_side_goes_first() {
        let drops = Arc::new(AtomicUsize::new(0));
        // The claim goes first.
        let (promise, claim) = completion();
        drop(claim);
        assert!(promise.is_abandoned());
        promise.fulfil(Ok(Dropped(drops.clone())));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        // The promise goes first, after a waker was left.
        let (promise, mut claim) = completion();
        assert!(claim.poll(&mut noop()).is_pending());
        assert!(!promise.is_abandoned());
        promise.fulfil(Ok(Dropped(drops.clone())));
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped while the claim could take it");
        drop(claim);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_promise_dropped_unfulfilled_completes_with_cancelled() {
        let (promise, mut claim) = completion::<u8>();
        let waker = Arc::new(CountingWaker::default());
        assert!(claim.poll(&mut Context::from_waker(&Waker::from(waker.clone()))).is_pending());
        drop(promise);
        assert_eq!(waker.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(Err(payload)) = claim.poll(&mut noop()) else {
            panic!("the claim of a dropped promise is not complete with an error")
        };
        assert_eq!(payload.downcast_ref::<&str>(), Some(&CANCELLED));
    }

    #[test]
    #[should_panic(expected = "polled after it returned its result")]
    fn polling_after_the_result_was_taken_panics() {
        let (promise, mut claim) = completion();
        promise.fulfil(Ok(()));
        let _ = claim.poll(&mut noop());
        let _ = claim.poll(&mut noop());
    }

    #[test]
    fn results_cross_threads_while_the_reader_polls_and_parks() {
        for round in 0..2000u32 {
            let (promise, mut claim) = completion();
            let writer = std::thread::spawn(move || promise.fulfil(Ok(round)));
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let value = loop {
                match claim.poll(&mut Context::from_waker(&waker)) {
                    Poll::Ready(result) => break result.unwrap(),
                    Poll::Pending => std::thread::park(),
                }
            };
            assert_eq!(value, round);
            writer.join().unwrap();
        }
    }

    /// Unparks a thread.
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
}
