//! A lock-free multi-producer, single-consumer inbox: how other threads reach a context.

// Its `pub` items are re-exported to the loom models (`loom_exports`, loom builds only).
#![cfg_attr(not(aiocoro_loom), allow(unreachable_pub))]

use std::ptr;
use std::sync::atomic::Ordering;

use crate::loom::AtomicPtr;

/// A list that any thread may push to and one thread (the context's home thread) takes whole.
///
/// Pushing is one allocation and one compare-and-swap; taking is one compare-and-swap. Items
/// come out in the order their pushes took effect. Once closed, the inbox refuses [`push`]es,
/// so a sender learns that its item will not be taken instead of losing it silently; once shut,
/// it refuses [`push_past_close`]es too.
///
/// [`push`]: Inbox::push
/// [`push_past_close`]: Inbox::push_past_close
pub struct Inbox<T> {
    /// The most recently pushed node; each node points to the one pushed before it. The two
    /// lowest bits of the address are the closed and shut marks (nodes hold a pointer, so they
    /// are at least 4-aligned and those bits are free).
    ///
    /// Invariant: every node reachable from `head` (marks removed) came from `Box::into_raw` in
    /// `push_unless` and is owned by the list until `take_all` or `drop` takes it back; once
    /// set, a mark stays set, and the shut mark is set only with the closed mark.
    head: AtomicPtr<Node<T>>,
}

impl<T> std::fmt::Debug for Inbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// The closed mark in `head`: [`Inbox::push`] is refused.
const CLOSED: usize = 1;
/// The shut mark in `head`: every push is refused.
const SHUT: usize = 2;
const MARKS: usize = CLOSED | SHUT;

fn marks<T>(head: *mut Node<T>) -> usize {
    head.addr() & MARKS
}

fn unmarked<T>(head: *mut Node<T>) -> *mut Node<T> {
    head.map_addr(|addr| addr & !MARKS)
}

/// An empty list with `marks`.
fn empty<T>(marks: usize) -> *mut Node<T> {
    if marks != 0 { ptr::without_provenance_mut(marks) } else { ptr::null_mut() }
}

struct Node<T> {
    value: T,
    next: *mut Node<T>,
}

// SAFETY: the inbox moves `T`s between threads (so `T: Send`) and never shares a `&T`.
unsafe impl<T: Send> Send for Inbox<T> {}
// SAFETY: as above; all shared access to the list goes through the atomic `head`.
unsafe impl<T: Send> Sync for Inbox<T> {}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox { head: AtomicPtr::new(ptr::null_mut()) }
    }
}

impl<T> Inbox<T> {
    /// Creates an empty inbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value`; returns whether the inbox looked empty before (a hint: another thread may
    /// take or push at the same time).
    ///
    /// # Errors
    ///
    /// Gives `value` back if the inbox is closed.
    pub fn push(&self, value: T) -> Result<bool, T> {
        self.push_unless(value, MARKS)
    }

    /// Like [`Inbox::push`], but a closed inbox still takes `value`; only a shut one refuses
    /// it (for items that serve what the taker accepted before it closed).
    ///
    /// # Errors
    ///
    /// Gives `value` back if the inbox is shut.
    pub fn push_past_close(&self, value: T) -> Result<bool, T> {
        self.push_unless(value, SHUT)
    }

    /// Pushes `value` unless `head` carries one of the marks in `refuse`.
    fn push_unless(&self, value: T, refuse: usize) -> Result<bool, T> {
        const { assert!(std::mem::align_of::<Node<T>>() > MARKS) };
        let node = Box::into_raw(Box::new(Node { value, next: ptr::null_mut() }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            if marks(head) & refuse != 0 {
                // SAFETY: the node was never published; we still own it.
                return Err(unsafe { Box::from_raw(node) }.value);
            }
            // SAFETY: `node` is ours until the compare-and-swap publishes it.
            // The marks live in `head` only, never in a `next` link.
            unsafe { (*node).next = unmarked(head) };
            // The new node carries the marks on: `head` may be a closed list.
            let new_head = node.map_addr(|addr| addr | marks(head));
            match self.head.compare_exchange_weak(
                head,
                new_head,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(unmarked(head).is_null()),
                Err(current) => head = current,
            }
        }
    }

    /// Refuses every later [`Inbox::push`]. Items already pushed stay to be taken.
    pub fn close(&self) {
        self.mark(CLOSED);
    }

    /// Refuses every later push of either kind. Items already pushed stay to be taken.
    pub fn shut(&self) {
        self.mark(CLOSED | SHUT);
    }

    fn mark(&self, bits: usize) {
        let mut head = self.head.load(Ordering::Relaxed);
        while marks(head) & bits != bits {
            let marked = head.map_addr(|addr| addr | bits);
            match self.head.compare_exchange_weak(head, marked, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Whether [`Inbox::close`] (or [`Inbox::shut`]) was called.
    pub fn is_closed(&self) -> bool {
        marks(self.head.load(Ordering::Acquire)) & CLOSED != 0
    }

    /// Whether [`Inbox::shut`] was called.
    pub fn is_shut(&self) -> bool {
        marks(self.head.load(Ordering::Acquire)) & SHUT != 0
    }

    /// Whether the inbox looks empty (a snapshot; ordered after the caller's `SeqCst` fence).
    pub fn is_empty(&self) -> bool {
        unmarked(self.head.load(Ordering::Acquire)).is_null()
    }

    /// Takes every item, oldest first.
    pub fn take_all(&self) -> Vec<T> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            if unmarked(head).is_null() {
                return Vec::new();
            }
            let emptied = empty(marks(head));
            match self.head.compare_exchange_weak(
                head,
                emptied,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(current) => head = current,
            }
        }
        let mut node = unmarked(head);
        let mut items = Vec::new();
        while !node.is_null() {
            // SAFETY: the compare-and-swap gave this thread sole ownership of the list (type
            // invariant).
            let boxed = unsafe { Box::from_raw(node) };
            node = boxed.next;
            items.push(boxed.value);
        }
        items.reverse();
        items
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        drop(self.take_all());
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn items_come_out_oldest_first_and_once() {
        let inbox = Inbox::new();
        assert_eq!(inbox.push(1), Ok(true));
        assert_eq!(inbox.push(2), Ok(false));
        inbox.push(3).unwrap();
        assert_eq!(inbox.take_all(), [1, 2, 3]);
        assert!(inbox.is_empty());
        assert!(inbox.take_all().is_empty());
    }

    #[test]
    fn a_closed_inbox_refuses_pushes_but_keeps_what_it_has() {
        let inbox = Inbox::new();
        inbox.push(1).unwrap();
        inbox.close();
        assert!(inbox.is_closed());
        assert_eq!(inbox.push(2), Err(2));
        assert!(!inbox.is_empty());
        assert_eq!(inbox.take_all(), [1]);
        assert!(inbox.is_closed(), "taking keeps the mark");
        assert_eq!(inbox.push(3), Err(3));
        inbox.close();
        assert!(inbox.is_empty());
    }

    #[test]
    fn a_closed_inbox_takes_pushes_past_close_until_it_is_shut() {
        let inbox = Inbox::new();
        inbox.close();
        assert_eq!(inbox.push(1), Err(1));
        assert_eq!(inbox.push_past_close(2), Ok(true));
        assert_eq!(inbox.push_past_close(3), Ok(false));
        assert!(inbox.is_closed(), "a push past close keeps the mark");
        assert_eq!(inbox.push(4), Err(4));
        assert_eq!(inbox.take_all(), [2, 3]);
        inbox.push_past_close(5).unwrap();
        inbox.shut();
        assert!(inbox.is_closed());
        assert_eq!(inbox.push_past_close(6), Err(6));
        assert_eq!(inbox.push(7), Err(7));
        assert_eq!(inbox.take_all(), [5], "shutting keeps what was pushed before");
        assert!(inbox.is_empty());
    }

    #[test]
    fn concurrent_pushes_are_all_received() {
        let inbox = Arc::new(Inbox::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        inbox.push(t * 1000 + i).unwrap();
                    }
                })
            })
            .collect();
        let mut received = Vec::new();
        for thread in threads {
            thread.join().unwrap();
        }
        received.extend(inbox.take_all());
        received.sort_unstable();
        assert_eq!(received, (0..4000).collect::<Vec<_>>());
    }

    #[test]
    fn dropping_frees_what_was_not_taken() {
        let value = Arc::new(());
        let inbox = Inbox::new();
        inbox.push(value.clone()).unwrap();
        inbox.push(value.clone()).unwrap();
        inbox.close();
        drop(inbox);
        assert_eq!(Arc::strong_count(&value), 1);
    }
}
