//! The cross-thread half of the `AioContext`: other threads push messages (scheduled BHs,
//! one-shots, coroutine wakes, spawns) onto the context's lock-free [`Inbox`] and then write
//! its eventfd only if [`WakeupHandshake::needs_signal`] says the context may be blocking (QEMU's
//! `notify_me` handshake); the home thread polls through [`WakeupHandshake::wait`], which blocks
//! only when the inbox is empty after announcing that it may block.
//!
//! The inbox and the handshake are aiocoro's production code, built on loom's atomics. What
//! production gets from the kernel is modelled here: the eventfd is a counter under a loom
//! mutex, and `epoll_wait` on it is [`ModelBlocker`], which waits on a condition variable
//! until the counter is non-zero (no timeout) or only looks at it (zero timeout). A wake-up
//! that the handshake loses leaves the home thread blocked for ever, which loom reports as a
//! deadlock; so every model that passes proves, for every interleaving within the preemption
//! bound:
//!
//! * `a_message_from_another_thread_wakes_a_blocking_poll` and
//!   `two_producers_wake_a_blocking_poll`: a message sent while the home thread polls with
//!   `blocking = true` always ends the poll (no lost wake-up, also when one producer's signal
//!   covers both, and for a second message after the first signal was accepted), and every
//!   message comes out exactly once, in the order it was sent by its producer. A final
//!   non-blocking poll accepts and resets any leftover signal, so a signal cannot stay pending
//!   and keep a later poll from blocking.
//! * `a_busy_context_costs_producers_no_eventfd_write`: a home thread that only polls with
//!   `blocking = false` never announces that it may block, so producers never write the
//!   eventfd (`signals() == 0`), and it still receives the message.
//! * `a_late_signal_is_not_swallowed`: a producer's signal that lands between the home thread's
//!   accept and its reset of the eventfd is not lost (a regression model for a bug found here).
//! * `concurrent_wakes_of_one_wait_resume_it_once`: two threads waking the same suspension
//!   concurrently resume its coroutine exactly once and lose no wake-up; the late wake, which
//!   finds the suspension delivered or over, neither resumes it again nor ends the next
//!   suspension that reuses its place in the wait table. The wait table is the home thread's
//!   own, outside loom's view, so it is modelled here with the first-wins rule of
//!   `WaitState::deliver` (src/aio/wait.rs) and the generation-checked keys of the wait arena.
//! * `a_kick_ends_a_wait_while_whose_condition_lives_elsewhere` and
//!   `a_kick_during_a_poll_that_does_not_block_is_not_erased`: a kick always ends the
//!   `wait_while` it was meant for, also when it lands while a poll is not blocking (a
//!   regression model for a kick that clearing the flag with a plain store could erase).

#![cfg(aiocoro_loom)]

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use aiocoro::loom_exports::{Blocker, Inbox, WakeupHandshake};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// A context's eventfd: signals add to a counter; a reset zeroes it.
struct EventFd {
    counter: Mutex<u64>,
    readable: Condvar,
}

impl EventFd {
    fn new() -> EventFd {
        EventFd { counter: Mutex::new(0), readable: Condvar::new() }
    }

    /// `write(eventfd, 1)`.
    fn signal(&self) {
        *self.counter.lock().unwrap() += 1;
        self.readable.notify_all();
    }

    fn counter(&self) -> u64 {
        *self.counter.lock().unwrap()
    }
}

/// `epoll_wait` on a set that holds only the context's eventfd.
struct ModelBlocker {
    event: Arc<EventFd>,
}

impl Blocker for ModelBlocker {
    fn block(&mut self, timeout: Option<Duration>) -> bool {
        let mut counter = self.event.counter.lock().unwrap();
        match timeout {
            None => {
                while *counter == 0 {
                    counter = self.event.readable.wait(counter).unwrap();
                }
            }
            // The models arm no timers, so the only finite timeout is "do not block".
            Some(timeout) => assert_eq!(timeout, Duration::ZERO, "the model has no clock"),
        }
        *counter > 0
    }

    fn reset_event(&mut self) {
        *self.event.counter.lock().unwrap() = 0;
    }
}

/// The part of a context that other threads touch, with the model eventfd.
struct Home<T> {
    inbox: Inbox<T>,
    notify: WakeupHandshake,
    event: Arc<EventFd>,
}

impl<T> Home<T> {
    fn new() -> Home<T> {
        Home {
            inbox: Inbox::new(),
            notify: WakeupHandshake::new(),
            event: Arc::new(EventFd::new()),
        }
    }

    /// What another thread does to reach the context (`Shared::send`): publish the message,
    /// then write the eventfd if the context may be blocking.
    fn send(&self, message: T) {
        assert!(self.inbox.push(message).is_ok(), "the model never closes its inbox");
        if self.notify.needs_signal() {
            self.event.signal();
        }
    }

    fn blocker(&self) -> ModelBlocker {
        ModelBlocker { event: self.event.clone() }
    }

    /// One poll's wait on the home thread, then the messages it found (the first step of
    /// `AioContext::poll`).
    fn poll(&self, blocker: &mut ModelBlocker, blocking: bool) -> Vec<T> {
        self.notify.wait(blocker, blocking, None, || !self.inbox.is_empty());
        self.inbox.take_all()
    }

    /// A last non-blocking poll after every producer is done: takes what is left and accepts
    /// any signal still pending; afterwards the eventfd must be reset.
    fn finish(&self, blocker: &mut ModelBlocker) -> Vec<T> {
        let rest = self.poll(blocker, false);
        assert_eq!(self.event.counter(), 0, "a signal was left pending on the eventfd");
        rest
    }
}

#[test]
fn a_message_from_another_thread_wakes_a_blocking_poll() {
    loom::model(|| {
        let home = Arc::new(Home::new());
        let producer = {
            let home = home.clone();
            thread::spawn(move || {
                home.send(1);
                home.send(2);
            })
        };
        let mut blocker = home.blocker();
        let mut received = Vec::new();
        while received.len() < 2 {
            received.extend(home.poll(&mut blocker, true));
        }
        producer.join().unwrap();
        received.extend(home.finish(&mut blocker));
        assert_eq!(received, [1, 2], "each message arrives once, in order");
        assert!(home.notify.signals() <= 2);
    });
}

#[test]
fn two_producers_wake_a_blocking_poll() {
    loom::model(|| {
        let home = Arc::new(Home::new());
        let producers: Vec<_> = [1, 2]
            .into_iter()
            .map(|message| {
                let home = home.clone();
                thread::spawn(move || home.send(message))
            })
            .collect();
        let mut blocker = home.blocker();
        let mut received = Vec::new();
        while received.len() < 2 {
            received.extend(home.poll(&mut blocker, true));
        }
        for producer in producers {
            producer.join().unwrap();
        }
        received.extend(home.finish(&mut blocker));
        received.sort_unstable();
        assert_eq!(received, [1, 2], "each message arrives exactly once");
    });
}

#[test]
fn a_busy_context_costs_producers_no_eventfd_write() {
    loom::model(|| {
        let home = Arc::new(Home::new());
        let producer = {
            let home = home.clone();
            thread::spawn(move || home.send(1))
        };
        let mut blocker = home.blocker();
        let mut received = home.poll(&mut blocker, false);
        received.extend(home.poll(&mut blocker, false));
        producer.join().unwrap();
        received.extend(home.finish(&mut blocker));
        assert_eq!(received, [1]);
        assert_eq!(home.notify.signals(), 0, "a producer signalled a context that never blocks");
    });
}

/// A wait-table key: an arena place and the generation of the entry in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    index: u32,
    generation: u32,
}

/// One suspension, as in `WaitState` (without the coroutine handle).
#[derive(Debug, PartialEq, Eq)]
enum WaitState {
    Waiting,
    Delivered,
}

impl WaitState {
    /// `WaitState::deliver`: records the first wake; returns whether this was it.
    fn deliver(&mut self) -> bool {
        match self {
            WaitState::Waiting => {
                *self = WaitState::Delivered;
                true
            }
            WaitState::Delivered => false,
        }
    }
}

/// The home thread's wait table (a generational arena, as `Arena<WaitState>`) and run queue.
#[derive(Default)]
struct Waits {
    /// Place index -> (generation, state); `None` is a free place. A key whose generation
    /// differs from its place's is stale.
    table: HashMap<u32, (u32, Option<WaitState>)>,
    run_queue: VecDeque<Key>,
    /// Every key ever put on the run queue.
    queued: Vec<Key>,
    resumed: Vec<Key>,
}

impl Waits {
    /// `Co::prepare_wait`, taking place `index`: the next generation of that place.
    fn prepare(&mut self, index: u32) -> Key {
        let generation = match self.table.get(&index) {
            None => 0,
            Some((generation, None)) => generation + 1,
            Some((_, Some(_))) => panic!("place {index} is taken"),
        };
        self.table.insert(index, (generation, Some(WaitState::Waiting)));
        Key { index, generation }
    }

    fn state_mut(&mut self, key: Key) -> Option<&mut WaitState> {
        match self.table.get_mut(&key.index) {
            Some((generation, state)) if *generation == key.generation => state.as_mut(),
            _ => None,
        }
    }

    fn state(&self, key: Key) -> Option<&WaitState> {
        match self.table.get(&key.index) {
            Some((generation, state)) if *generation == key.generation => state.as_ref(),
            _ => None,
        }
    }

    /// `Local::deliver` for a `Message::Wake` from the inbox.
    fn deliver(&mut self, key: Key) {
        if self.state_mut(key).is_some_and(WaitState::deliver) {
            self.run_queue.push_back(key);
            self.queued.push(key);
        }
    }

    /// `Local::run_coroutines`: each queued coroutine whose wait was delivered resumes and
    /// takes the delivery, which ends the wait and frees its place.
    fn run(&mut self) {
        while let Some(key) = self.run_queue.pop_front() {
            if self.state(key) == Some(&WaitState::Delivered) {
                self.table.insert(key.index, (key.generation, None));
                self.resumed.push(key);
            }
        }
    }
}

#[test]
fn concurrent_wakes_of_one_wait_resume_it_once() {
    loom::model(|| {
        let home = Arc::new(Home::new());
        let mut waits = Waits::default();
        let first = waits.prepare(0);
        let wakers: Vec<_> = (0..2)
            .map(|_| {
                let home = home.clone();
                thread::spawn(move || home.send(first))
            })
            .collect();
        let mut blocker = home.blocker();
        while waits.resumed.is_empty() {
            for key in home.poll(&mut blocker, true) {
                waits.deliver(key);
            }
            waits.run();
        }
        assert_eq!(waits.resumed, [first]);
        // The coroutine suspends again, in the place its first wait left free.
        let second = waits.prepare(0);
        assert_ne!(second, first);
        for waker in wakers {
            waker.join().unwrap();
        }
        for key in home.finish(&mut blocker) {
            waits.deliver(key);
        }
        waits.run();
        assert_eq!(waits.queued, [first], "a wake queued the coroutine again");
        assert_eq!(waits.resumed, [first], "a late wake resumed the coroutine again");
        assert_eq!(waits.state(second), Some(&WaitState::Waiting), "a stale wake ended a new wait");
    });
}

/// `wait_while` on the main thread while another thread makes the condition false and then
/// kicks the context (`AioHandle::kick`, QEMU's `aio_wait_kick`). The condition is not part of
/// the context's work, so only the kick flag in [`WakeupHandshake`] can end a poll that is about to
/// block: without it, the waiter that checked the condition just before the other thread set it
/// would block for ever (loom: deadlock).
#[test]
fn a_kick_ends_a_wait_while_whose_condition_lives_elsewhere() {
    loom::model(|| {
        let home: Arc<Home<()>> = Arc::new(Home::new());
        let done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let worker = {
            let (home, done) = (home.clone(), done.clone());
            thread::spawn(move || {
                done.store(true, std::sync::atomic::Ordering::Release);
                if home.notify.kick() {
                    home.event.signal();
                }
            })
        };
        let mut blocker = home.blocker();
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            home.notify.wait(&mut blocker, true, None, || !home.inbox.is_empty());
        }
        worker.join().unwrap();
    });
}

/// One producer sends 1; another sends 2 and then 3. The second producer can read `notify_me`
/// before the home thread lowers it, set `notified` just after the home thread accepted, and
/// write the eventfd just before the home thread resets it: if the reset came after the accept,
/// that write would be drained with `notified` left set, and message 3 would never be signalled
/// while the home thread blocks (a regression model: this deadlocked before the fix).
#[test]
fn a_late_signal_is_not_swallowed() {
    loom::model(|| {
        let home = Arc::new(Home::new());
        let first = {
            let home = home.clone();
            thread::spawn(move || home.send(1))
        };
        let second = {
            let home = home.clone();
            thread::spawn(move || {
                home.send(2);
                home.send(3);
            })
        };
        let mut blocker = home.blocker();
        let mut received = Vec::new();
        while received.len() < 3 {
            received.extend(home.poll(&mut blocker, true));
        }
        first.join().unwrap();
        second.join().unwrap();
        received.extend(home.finish(&mut blocker));
        received.sort_unstable();
        assert_eq!(received, [1, 2, 3], "every message arrives exactly once");
    });
}

/// Like the model above, but the waiter's first poll does not block, because the context has
/// work of its own (here a message the home thread queued itself; in production any BH, timer
/// or run-queue entry). The worker can then set the kick flag after that poll looked at it and
/// read `notify_me` after the poll lowered it (so it writes no eventfd): if the poll then
/// cleared the flag with a plain store, the kick would be erased without the waiter ever
/// acquiring it, the waiter could still read the condition as true, and its next poll would
/// block for ever (a regression model: this deadlocked before the flag was cleared with a
/// swap, and kicks set it with one).
#[test]
fn a_kick_during_a_poll_that_does_not_block_is_not_erased() {
    loom::model(|| {
        let home: Arc<Home<()>> = Arc::new(Home::new());
        let done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        assert!(home.inbox.push(()).is_ok());
        let worker = {
            let (home, done) = (home.clone(), done.clone());
            thread::spawn(move || {
                done.store(true, std::sync::atomic::Ordering::Release);
                if home.notify.kick() {
                    home.event.signal();
                }
            })
        };
        let mut blocker = home.blocker();
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            home.poll(&mut blocker, true);
        }
        worker.join().unwrap();
        home.finish(&mut blocker);
    });
}
