//! In-flight request counting and drained sections (QEMU's `blk_inc_in_flight`,
//! `bdrv_drained_begin` / `_end`), across threads.
//!
//! A request counts itself in, then looks whether a drained section is open; a drainer opens
//! its section, then waits for the count to reach zero. Both steps are sequentially
//! consistent, so at least one side sees the other: a request that started after the
//! section opened backs out and waits for the section to end; a request that started before
//! is waited for.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};

use aiocoro::aio::{AioContext, AioHandle, Waker};
use aiocoro::coroutine::{self, Co};

/// The in-flight count of one backend and its drained sections.
#[derive(Default)]
pub(crate) struct RequestGate {
    /// Requests counted in by `enter`, out by `leave`; drainers wait for zero. It includes,
    /// for a moment, a request that found a section open and is backing out.
    in_flight: AtomicU64,
    /// Requests that passed the gate and have not left: never one inside a section.
    running: AtomicU64,
    /// Drained sections open now.
    sections: AtomicU32,
    waiters: Mutex<Waiters>,
}

/// Who waits for what. Invariant: `held` is empty while no section is open, except for
/// entries pushed by requests that saw a section under this lock and are woken by the
/// next section's end.
#[derive(Default)]
struct Waiters {
    /// Drainers waiting for the count to reach zero, by ticket.
    drainers: Vec<(u64, Drainer)>,
    next_ticket: u64,
    /// Requests held back until the sections end.
    held: Vec<Waker>,
}

/// How to wake a drainer: kick its context (it waits in `wait_while`), or unpark its thread.
enum Drainer {
    Context(AioHandle),
    Thread(Thread),
}

impl Drainer {
    fn wake(&self) {
        match self {
            Drainer::Context(handle) => handle.kick(),
            Drainer::Thread(thread) => thread.unpark(),
        }
    }
}

impl RequestGate {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests running now (past the gate; not the ones backing out of it).
    pub(crate) fn in_flight(&self) -> u64 {
        self.running.load(SeqCst)
    }

    /// Counts a request in, first waiting (the coroutine sleeps) while a section is open.
    pub(crate) fn enter(&self, co: &Co) {
        loop {
            self.in_flight.fetch_add(1, SeqCst);
            if self.sections.load(SeqCst) == 0 {
                self.running.fetch_add(1, SeqCst);
                return;
            }
            self.count_out();
            let wait = co.prepare_wait();
            {
                let mut waiters = self.waiters();
                if self.sections.load(SeqCst) == 0 {
                    continue;
                }
                waiters.held.push(wait.waker());
            }
            wait.wait();
        }
    }

    /// Counts out a request that `enter` let through.
    pub(crate) fn leave(&self) {
        self.running.fetch_sub(1, SeqCst);
        self.count_out();
    }

    /// Counts a request out of `in_flight`; the last one out wakes the drainers.
    fn count_out(&self) {
        if self.in_flight.fetch_sub(1, SeqCst) == 1 && self.sections.load(SeqCst) != 0 {
            self.waiters().drainers.iter().for_each(|(_, drainer)| drainer.wake());
        }
    }

    /// Opens a drained section and waits until no request runs. On a thread with an
    /// [`AioContext`] the context runs meanwhile (its own requests finish too).
    ///
    /// # Panics
    ///
    /// Inside a coroutine: its own context could not run the requests it waits for.
    pub(crate) fn begin_drain(&self) {
        assert!(
            !coroutine::in_coroutine(),
            "aiocoro-block: BlockBackend::drain called inside a coroutine; drain from outside \
             any coroutine (the thread's event loop level)"
        );
        self.sections.fetch_add(1, SeqCst);
        let context = AioContext::current();
        let drainer = match &context {
            Some(context) => Drainer::Context(context.handle()),
            None => Drainer::Thread(thread::current()),
        };
        let ticket = {
            let mut waiters = self.waiters();
            let ticket = waiters.next_ticket;
            waiters.next_ticket += 1;
            waiters.drainers.push((ticket, drainer));
            ticket
        };
        match &context {
            Some(context) => context.wait_while(|| self.in_flight.load(SeqCst) != 0),
            None => {
                while self.in_flight.load(SeqCst) != 0 {
                    thread::park();
                }
            }
        }
        self.waiters().drainers.retain(|(t, _)| *t != ticket);
    }

    /// Closes a drained section; when the last one closes, held requests go on.
    pub(crate) fn end_drain(&self) {
        if self.sections.fetch_sub(1, SeqCst) == 1 {
            let held = std::mem::take(&mut self.waiters().held);
            held.iter().for_each(Waker::wake);
        }
    }
}
