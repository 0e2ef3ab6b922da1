//! A lock-free multi-producer, single-consumer inbox: how other threads reach a context.

use std::ptr;
use std::sync::atomic::Ordering;

use crate::loom::AtomicPtr;

/// A list that any thread may push to and one thread (the context's home thread) takes whole.
///
/// Pushing is one allocation and one compare-and-swap; taking is one swap. Items come out in
/// the order their pushes took effect.
pub struct Inbox<T> {
    /// The most recently pushed node; each node points to the one pushed before it.
    ///
    /// Invariant: every non-null pointer reachable from `head` came from `Box::into_raw` in
    /// `push` and is owned by the list until `take_all` or `drop` takes it back.
    head: AtomicPtr<Node<T>>,
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

    /// Adds `value`. Returns whether the inbox was empty before (a hint: another thread may take
    /// or push at the same time).
    pub fn push(&self, value: T) -> bool {
        let node = Box::into_raw(Box::new(Node { value, next: ptr::null_mut() }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the compare-and-swap publishes it.
            unsafe { (*node).next = head };
            match self.head.compare_exchange_weak(head, node, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return head.is_null(),
                Err(current) => head = current,
            }
        }
    }

    /// Whether the inbox looks empty (a snapshot; ordered after the caller's `SeqCst` fence).
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire).is_null()
    }

    /// Takes every item, oldest first.
    pub fn take_all(&self) -> Vec<T> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut node = self.head.swap(ptr::null_mut(), Ordering::AcqRel);
        let mut items = Vec::new();
        while !node.is_null() {
            // SAFETY: the swap gave this thread sole ownership of the list (type invariant).
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
        assert!(inbox.push(1));
        assert!(!inbox.push(2));
        inbox.push(3);
        assert_eq!(inbox.take_all(), [1, 2, 3]);
        assert!(inbox.is_empty());
        assert!(inbox.take_all().is_empty());
    }

    #[test]
    fn concurrent_pushes_are_all_received() {
        let inbox = Arc::new(Inbox::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        inbox.push(t * 1000 + i);
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
        inbox.push(value.clone());
        inbox.push(value.clone());
        drop(inbox);
        assert_eq!(Arc::strong_count(&value), 1);
    }
}
