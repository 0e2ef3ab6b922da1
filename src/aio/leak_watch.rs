//! Telling joiners that their coroutine's context went down without ending it.
//!
//! A shutdown leaks the coroutines it cannot reach (step 3 of
//! [`AioContext`](super::AioContext)'s shutdown: a waiter parked on a `CoQueue` under a
//! `NoLock`, say). Their code never runs again, so their promises are never fulfilled and
//! their [`JoinHandle`](super::JoinHandle)s would wait forever. Instead, a joiner that waits
//! leaves its waker here too; once the context is down and every coroutine it did not leak
//! has ended (or was dropped unstarted), the context *settles* this watch and wakes them all.
//! A joiner that then still finds no result knows its coroutine was leaked.
//!
//! The wakers sit in slots under a mutex, touched only by joiners that wait (one lock per
//! new waker, one to leave), never by a coroutine joined before it is polled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;

/// The wakers of a context's waiting joiners, woken once when the context settles.
#[derive(Default)]
pub(crate) struct LeakWatch {
    /// Set once the context is down and everything it did not leak has ended.
    settled: AtomicBool,
    slots: Mutex<Slots>,
}

/// Waker slots, reused through a free list.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// A joiner's place in a [`LeakWatch`]: its slot and the waker it left there.
pub(crate) struct Watching {
    slot: usize,
    waker: Waker,
}

impl LeakWatch {
    /// Whether the context has settled: a coroutine of it that has not ended never will.
    pub(crate) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Leaves `waker` to be woken when the context settles, in place of the waker `watching`
    /// left (if another); returns whether the context has settled already.
    pub(crate) fn watch(&self, watching: &mut Option<Watching>, waker: &Waker) -> bool {
        if let Some(left) = watching
            && left.waker.will_wake(waker)
        {
            // Left earlier under the lock: the settling wakes it, and this load sees it.
            return self.is_settled();
        }
        // Cloned, and the replaced wakers dropped, outside the lock: that is executor code.
        let (for_slot, for_joiner) = (waker.clone(), waker.clone());
        let mut slots = self.lock();
        // Read under the lock: a settling that took the lock first is seen here; one that
        // takes it later finds the waker.
        if self.is_settled() {
            return true;
        }
        let (slot, replaced) = match watching {
            Some(left) => (left.slot, slots.wakers[left.slot].replace(for_slot)),
            None => (slots.insert(for_slot), None),
        };
        drop(slots);
        drop(replaced);
        *watching = Some(Watching { slot, waker: for_joiner });
        false
    }

    /// Takes the waker `watching` left (if any) back out.
    pub(crate) fn unwatch(&self, watching: &mut Option<Watching>) {
        let Some(left) = watching.take() else { return };
        let mut slots = self.lock();
        let waker = slots.wakers[left.slot].take();
        slots.free.push(left.slot);
        drop(slots);
        drop(waker);
    }

    /// The context is down and everything it did not leak has ended: wakes every joiner that
    /// waits, and tells those that come later.
    pub(crate) fn settle(&self) {
        self.settled.store(true, Ordering::Release);
        // Their slots stay taken until each joiner leaves.
        let wakers: Vec<Waker> = self.lock().wakers.iter_mut().filter_map(Option::take).collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The slots. No executor code runs under the lock, so nothing can poison it halfway.
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Slots {
    /// Puts `waker` in a free slot and returns the slot.
    fn insert(&mut self, waker: Waker) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.wakers[slot] = Some(waker);
                slot
            }
            None => {
                self.wakers.push(Some(waker));
                self.wakers.len() - 1
            }
        }
    }
}
