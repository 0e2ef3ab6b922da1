//! In-flight request counting and drained sections (QEMU's `blk_inc_in_flight`,
//! `bdrv_drained_begin` / `_end`), across threads.
//!
//! A request counts itself in, then looks whether a drained section is open; a drainer opens
//! its section, then waits for the count to reach zero. Both steps are sequentially
//! consistent, so at least one side sees the other: a request that started after the
//! section opened backs out and waits for the section to end; a request that started before
//! is waited for.
//!
//! The count is kept in per-thread slots (a thread's requests touch its own cache line; the
//! drainer sums them), so that IoThreads submitting at once do not fight over one counter.
//! The argument above holds slot by slot: every count-in is ordered before or after the
//! section's opening in the single order of sequentially consistent operations.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};

use aiocoro::aio::{AioContext, AioHandle, Waker};
use aiocoro::coroutine::{self, Co};

/// Slots per backend; threads share one when there are more threads than this.
const SLOTS: usize = 64;

/// Requests counted in (through the gate or backing out of it), in a slot's low half.
const GATE: u64 = 1;
/// Requests past the gate and not yet out, in a slot's high half.
const RUNNING: u64 = 1 << 32;
const GATE_MASK: u64 = RUNNING - 1;

/// One thread's counts, alone in its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

thread_local! {
    /// This thread's slot index, handed out round robin on first use.
    static SLOT_INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

fn slot_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SLOT_INDEX.with(|index| {
        index.get().unwrap_or_else(|| {
            let new = NEXT.fetch_add(1, SeqCst) % SLOTS;
            index.set(Some(new));
            new
        })
    })
}

/// The in-flight count of one backend and its drained sections.
pub(crate) struct RequestGate {
    /// Per-thread counts: `GATE` per request counted in by `enter` (drainers wait for these
    /// to reach zero; it includes, for a moment, a request that found a section open and is
    /// backing out) and `RUNNING` per request that passed (never one inside a section).
    slots: Box<[Slot]>,
    /// Drained sections open now.
    sections: AtomicU32,
    waiters: Mutex<Waiters>,
}

impl Default for RequestGate {
    fn default() -> Self {
        RequestGate {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            sections: AtomicU32::new(0),
            waiters: Mutex::default(),
        }
    }
}

/// A request that passed the gate; give it back to [`RequestGate::leave`].
pub(crate) struct Passed {
    slot: usize,
}

/// A section `begin_drain` opened and has not handed to its caller yet: dropped only by an
/// unwinding, it closes the section again.
struct OpenSection<'a> {
    gate: &'a RequestGate,
    ticket: u64,
}

impl Drop for OpenSection<'_> {
    fn drop(&mut self) {
        self.gate.forget_drainer(self.ticket);
        self.gate.end_drain();
    }
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
        self.slots.iter().map(|slot| slot.0.load(SeqCst) / RUNNING).sum()
    }

    /// Requests counted in, those backing out included: what a drainer waits for.
    fn counted_in(&self) -> u64 {
        self.slots.iter().map(|slot| slot.0.load(SeqCst) & GATE_MASK).sum()
    }

    /// Counts a request in, first waiting (the coroutine sleeps) while a section is open.
    pub(crate) fn enter(&self, co: &Co) -> Passed {
        let index = slot_index();
        let slot = &self.slots[index].0;
        loop {
            slot.fetch_add(GATE, SeqCst);
            if self.sections.load(SeqCst) == 0 {
                slot.fetch_add(RUNNING, SeqCst);
                return Passed { slot: index };
            }
            self.count_out(slot, GATE);
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
    pub(crate) fn leave(&self, passed: &Passed) {
        self.count_out(&self.slots[passed.slot].0, GATE + RUNNING);
    }

    /// Takes `amount` off `slot`; the last request out of a slot wakes the drainers (they
    /// sum the slots again).
    fn count_out(&self, slot: &AtomicU64, amount: u64) {
        let before = slot.fetch_sub(amount, SeqCst);
        if before & GATE_MASK == GATE && self.sections.load(SeqCst) != 0 {
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
        // Running the context may panic (a coroutine or callback of this thread fails): the
        // section must not outlive the unwinding, or every later request waits for good.
        let opened = OpenSection { gate: self, ticket };
        match &context {
            Some(context) => context.wait_while(|| self.counted_in() != 0),
            None => {
                while self.counted_in() != 0 {
                    thread::park();
                }
            }
        }
        std::mem::forget(opened);
        self.forget_drainer(ticket);
    }

    fn forget_drainer(&self, ticket: u64) {
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
