//! Timers on a monotonic nanosecond clock (QEMU's `QEMUTimer` on `QEMU_CLOCK_REALTIME`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::arena::{Arena, Key};
use super::context::Local;

/// Nanoseconds on the monotonic clock that timers use (since an arbitrary start).
///
/// ```
/// let before = aiocoro::aio::clock_ns();
/// assert!(aiocoro::aio::clock_ns() >= before);
/// ```
pub fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

struct Entry {
    callback: Rc<dyn Fn()>,
    /// When the timer fires, if armed.
    deadline: Option<u64>,
    /// The queue's arm number of this timer's latest arm, so that heap entries of earlier arms
    /// are recognised as stale.
    arm: u64,
}

/// The timers of one context: an arena of timers and a min-heap of their deadlines.
#[derive(Default)]
pub(crate) struct TimerQueue {
    timers: Arena<Entry>,
    /// `(deadline, arm, key bits)`; an entry whose timer was re-armed or cancelled is skipped
    /// when it reaches the top. Arm numbers grow with every arm of any timer of the queue, so
    /// timers due at the same time fire in the order they were armed (as QEMU's `timer_mod`).
    heap: BinaryHeap<Reverse<(u64, u64, u64)>>,
    /// The number of the latest arm.
    arms: u64,
}

impl TimerQueue {
    pub(crate) fn add(&mut self, callback: Rc<dyn Fn()>) -> Key {
        self.timers.insert(Entry { callback, deadline: None, arm: 0 })
    }

    /// Removes the timer; returns its callback, for the caller to drop once it no longer
    /// borrows the queue (the callback may own other timers, whose drops borrow it too).
    #[must_use = "drop the callback outside the queue's borrow"]
    pub(crate) fn remove(&mut self, key: Key) -> Option<Rc<dyn Fn()>> {
        self.timers.remove(key).map(|entry| entry.callback)
    }

    pub(crate) fn arm(&mut self, key: Key, deadline: u64) {
        if let Some(entry) = self.timers.get_mut(key) {
            self.arms += 1;
            entry.arm = self.arms;
            entry.deadline = Some(deadline);
            self.heap.push(Reverse((deadline, entry.arm, key.to_bits())));
        }
    }

    pub(crate) fn cancel(&mut self, key: Key) {
        if let Some(entry) = self.timers.get_mut(key) {
            entry.deadline = None;
        }
    }

    pub(crate) fn deadline(&self, key: Key) -> Option<u64> {
        self.timers.get(key).and_then(|entry| entry.deadline)
    }

    /// The earliest deadline of an armed timer. Drops stale heap entries on the way.
    pub(crate) fn next_deadline(&mut self) -> Option<u64> {
        while let Some(&Reverse((deadline, arm, key))) = self.heap.peek() {
            if self.is_current(Key::from_bits(key), deadline, arm) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Disarms the earliest timer due at `now` and returns its callback.
    pub(crate) fn pop_expired(&mut self, now: u64) -> Option<Rc<dyn Fn()>> {
        let deadline = self.next_deadline()?;
        if deadline > now {
            return None;
        }
        let Reverse((_, _, key)) = self.heap.pop()?;
        let entry = self.timers.get_mut(Key::from_bits(key))?;
        entry.deadline = None;
        Some(entry.callback.clone())
    }

    fn is_current(&self, key: Key, deadline: u64, arm: u64) -> bool {
        self.timers
            .get(key)
            .is_some_and(|entry| entry.deadline == Some(deadline) && entry.arm == arm)
    }
}

/// A timer of a context (QEMU's `timer_new_ns` / `timer_mod` / `timer_del`).
///
/// Its callback runs on the home thread when the clock reaches the deadline; the nearest
/// deadline bounds how long [`AioContext::poll`](super::AioContext::poll) blocks. Dropping the
/// timer cancels it.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use std::{cell::Cell, rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let fired = Rc::new(Cell::new(false));
/// let f = fired.clone();
/// let timer = ctx.new_timer(move || f.set(true));
/// timer.arm_after(Duration::from_millis(1));
/// while !fired.get() {
///     ctx.poll(true);
/// }
/// assert!(!timer.is_armed());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Timer {
    key: Key,
    local: Rc<Local>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").finish_non_exhaustive()
    }
}

impl Timer {
    pub(crate) fn new(local: Rc<Local>, callback: Rc<dyn Fn()>) -> Timer {
        let key = local.timers.borrow_mut().add(callback);
        Timer { key, local }
    }

    /// Arms (or re-arms) the timer to fire when [`clock_ns`] reaches `deadline_ns`.
    pub fn arm_at(&self, deadline_ns: u64) {
        self.local.timers.borrow_mut().arm(self.key, deadline_ns);
    }

    /// Arms (or re-arms) the timer to fire `delay` from now.
    pub fn arm_after(&self, delay: Duration) {
        let delay = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.arm_at(clock_ns().saturating_add(delay));
    }

    /// Disarms the timer; its callback will not run until it is armed again.
    pub fn cancel(&self) {
        self.local.timers.borrow_mut().cancel(self.key);
    }

    /// Whether the timer is armed.
    pub fn is_armed(&self) -> bool {
        self.deadline_ns().is_some()
    }

    /// The deadline the timer is armed for.
    pub fn deadline_ns(&self) -> Option<u64> {
        self.local.timers.borrow().deadline(self.key)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let callback = self.local.timers.borrow_mut().remove(self.key);
        drop(callback);
    }
}
