//! A lock-free multi-producer, single-consumer inbox: how other threads reach a context.

use std::ptr;
use std::sync::atomic::Ordering;

use crate::loom::AtomicPtr;

/// A list that any thread may push to and one thread (the context's home thread) takes whole.
///
/// Pushing is one allocation and one compare-and-swap; taking is one compare-and-swap. Items
/// come out in the order their pushes took effect. Once closed, the inbox refuses pushes, so a
/// sender learns that its item will not be taken instead of losing it silently.
pub struct Inbox<T> {
    /// The most recently pushed node; each node points to the one pushed before it. The lowest
    /// bit of the address is the closed mark (nodes are at least 2-aligned, so it is free).
    ///
    /// Invariant: every node reachable from `head` (mark removed) came from `Box::into_raw` in
    /// `push` and is owned by the list until `take_all` or `drop` takes it back; once set, the
    /// mark stays set.
    head: AtomicPtr<Node<T>>,
}

/// The closed mark in the low bit of `head`.
const CLOSED: usize = 1;

fn is_marked<T>(head: *mut Node<T>) -> bool {
    head.addr() & CLOSED != 0
}

fn unmarked<T>(head: *mut Node<T>) -> *mut Node<T> {
    head.map_addr(|addr| addr & !CLOSED)
}

/// An empty list, closed or not.
fn empty<T>(closed: bool) -> *mut Node<T> {
    if closed { ptr::without_provenance_mut(CLOSED) } else { ptr::null_mut() }
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
        let node = Box::into_raw(Box::new(Node { value, next: ptr::null_mut() }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            if is_marked(head) {
                // SAFETY: the node was never published; we still own it.
                return Err(unsafe { Box::from_raw(node) }.value);
            }
            // SAFETY: `node` is ours until the compare-and-swap publishes it.
            unsafe { (*node).next = head };
            match self.head.compare_exchange_weak(head, node, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(head.is_null()),
                Err(current) => head = current,
            }
        }
    }

    /// Refuses every later push. Items already pushed stay to be taken.
    pub fn close(&self) {
        let mut head = self.head.load(Ordering::Relaxed);
        while !is_marked(head) {
            let marked = head.map_addr(|addr| addr | CLOSED);
            match self.head.compare_exchange_weak(head, marked, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Whether [`Inbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        is_marked(self.head.load(Ordering::Acquire))
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
            let emptied = empty(is_marked(head));
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
