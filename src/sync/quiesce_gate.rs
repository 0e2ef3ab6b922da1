//! Counted entries that a drain waits out while it holds new ones back, across threads (QEMU's
//! `blk_inc_in_flight` / `blk_dec_in_flight` with `bdrv_drained_begin` / `_end`).
//!
//! # Protocol
//!
//! An entering request counts itself in, then looks whether a quiesced section is open; a
//! drainer opens its section, then waits for the count to reach zero. Between its write and its
//! read each side runs one fence of an asymmetric pair (see `asymmetric_fence.rs`): a compiler
//! fence on the request's hot path (its write is a read-modify-write, so `light_after_rmw`), a
//! membarrier on the drainer's rare one. The pair behaves as two `fence(SeqCst)`, so at least
//! one side sees the other's write: a request that counted in after the section opened backs
//! out and waits for the section to end; a request that counted in before is waited for. Never
//! both proceed.
//!
//! No wake-up is lost:
//!
//! * A request that leaves its slot at zero fences (the same pair against the drainer's opening)
//!   and looks for an open section; if it sees one, it wakes the drainers registered under the
//!   waiters lock. A drainer registers under that lock before it reads the counts, so it is
//!   either woken or reads the count after the request's lock release, and so sees it out.
//! * A request that saw a section backs out, then looks again under the waiters lock before it
//!   queues itself there; the section that ends last takes the queue under the same lock. So
//!   the request either sees the end and enters again, or is in the queue the end wakes.
//!
//! Memory: the last section's end releases (and every end before it, through the read-modify-
//! write chain on the section count) what drainers did inside, to the request whose acquiring
//! read sees no section; a request's exit releases what it did to the drainer whose acquiring
//! sum sees it out.
//!
//! The count is kept in per-thread slots (a thread's requests touch its own cache line; the
//! drainer sums them), so that threads entering at once do not fight over one counter. The
//! argument above holds slot by slot.
//!
//! The models in `loom-tests/tests/quiesce_gate.rs` check this code with loom's atomics.

use std::cell::Cell;
use std::sync::PoisonError;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::asymmetric_fence;
use crate::aio::{AioContext, AioHandle, Waker};
use crate::coroutine::{Co, in_coroutine};
use crate::loom::{AtomicU32, AtomicU64, AtomicUsize, Mutex, MutexGuard, thread};

/// Slots per gate; threads share one when there are more threads than this. Under loom, two:
/// enough for requests on slots of their own or sharing one, and a sum the model can afford.
const SLOTS: usize = if cfg!(aiocoro_loom) { 2 } else { 64 };

/// Requests counted in (passing the gate or backing out of it), in a slot's low half.
const GATE: u64 = 1;
/// Requests past the gate and not yet out, in a slot's high half.
const RUNNING: u64 = 1 << 32;
const GATE_MASK: u64 = RUNNING - 1;

/// One thread's counts, alone in its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

/// This thread's slot index, handed out round robin on first use.
#[inline]
fn slot_index() -> usize {
    #[cfg(not(aiocoro_loom))]
    thread_local! {
        static SLOT_INDEX: Cell<Option<usize>> = const { Cell::new(None) };
    }
    #[cfg(not(aiocoro_loom))]
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // A model thread is not an OS thread, and each model execution starts afresh: loom's
    // thread-local and counter hand out the slots the same way in every execution.
    #[cfg(aiocoro_loom)]
    loom::thread_local! {
        static SLOT_INDEX: Cell<Option<usize>> = Cell::new(None);
    }
    #[cfg(aiocoro_loom)]
    loom::lazy_static! {
        static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    }
    SLOT_INDEX.with(|index| {
        index.get().unwrap_or_else(|| {
            let new = NEXT.fetch_add(1, Relaxed) % SLOTS;
            index.set(Some(new));
            new
        })
    })
}

/// Requests that count themselves in and out from any thread, and quiesced sections that wait
/// until none is in and hold new ones back until the sections end (QEMU's in-flight counter
/// and drained sections, for any shared resource).
///
/// Entering is three atomic operations on the calling thread's own cache line, with no fence
/// instruction; quiescing is the slow side (a `membarrier` system call, a lock, a wait).
///
/// ```
/// use aiocoro::aio::AioContext;
/// use aiocoro::sync::QuiesceGate;
/// use std::sync::Arc;
///
/// let ctx = AioContext::new()?;
/// let gate = Arc::new(QuiesceGate::new());
/// let quiesced = gate.quiesce(); // nothing in: returns at once
/// let request = gate.clone();
/// let co = ctx.spawn(move |co| {
///     let _entry = request.enter(co); // waits until the section ends
/// });
/// ctx.poll(false);
/// assert!(!co.is_finished(), "held back while quiesced");
/// drop(quiesced);
/// co.join().unwrap();
/// assert_eq!(gate.in_flight(), 0);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct QuiesceGate {
    /// Per-thread counts: `GATE` per request counted in by `enter` (drainers wait for these
    /// to reach zero; it includes, for a moment, a request that found a section open and is
    /// backing out) and `RUNNING` per request that passed (never one inside a section).
    slots: Box<[Slot]>,
    /// Quiesced sections open now.
    sections: AtomicU32,
    waiters: Mutex<Waiters>,
}

impl std::fmt::Debug for QuiesceGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuiesceGate")
            .field("in_flight", &self.in_flight())
            .field("sections", &self.sections.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for QuiesceGate {
    fn default() -> Self {
        Self::new()
    }
}

/// A request that passed a [`QuiesceGate`]: it counts as in flight, and no quiesced section
/// starts waiting until it is dropped. Made by [`QuiesceGate::enter`].
#[must_use = "the request counts out when this guard is dropped"]
pub struct GateEntry<'a> {
    gate: &'a QuiesceGate,
    slot: usize,
}

impl std::fmt::Debug for GateEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateEntry").field("slot", &self.slot).finish_non_exhaustive()
    }
}

impl Drop for GateEntry<'_> {
    #[inline]
    fn drop(&mut self) {
        self.gate.count_out(&self.gate.slots[self.slot].0, GATE + RUNNING);
    }
}

/// A quiesced section of a [`QuiesceGate`]: no request is in while it lives, and new ones wait
/// for the end of the last open section. Made by [`QuiesceGate::quiesce`].
#[must_use = "the section ends when this guard is dropped"]
pub struct Quiesced<'a> {
    gate: &'a QuiesceGate,
}

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiesced").finish_non_exhaustive()
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.gate.end_section();
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
    Thread(thread::Thread),
}

impl Drainer {
    fn wake(&self) {
        match self {
            Drainer::Context(handle) => handle.kick(),
            Drainer::Thread(thread) => thread.unpark(),
        }
    }
}

/// A drainer's registration, taken back when it stops waiting (also by an unwinding).
struct Registered<'a> {
    gate: &'a QuiesceGate,
    ticket: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.gate.waiters().drainers.retain(|(ticket, _)| *ticket != self.ticket);
    }
}

impl QuiesceGate {
    /// A gate with no request in and no section open.
    pub fn new() -> Self {
        asymmetric_fence::prepare();
        QuiesceGate {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            sections: AtomicU32::new(0),
            waiters: Mutex::default(),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests in now, on every thread (past the gate; not the ones backing out of it).
    pub fn in_flight(&self) -> u64 {
        self.slots.iter().map(|slot| slot.0.load(Relaxed) / RUNNING).sum()
    }

    /// Requests counted in, those backing out included: what a drainer waits for. Acquires
    /// what the requests that counted out did.
    fn counted_in(&self) -> u64 {
        self.slots.iter().map(|slot| slot.0.load(Acquire) & GATE_MASK).sum()
    }

    /// Counts a request in, first waiting (the coroutine sleeps) while a section is open; it
    /// counts out when the returned guard is dropped. Sees everything the drainers did inside
    /// the sections that ended before it passed.
    #[inline]
    pub fn enter(&self, co: &Co) -> GateEntry<'_> {
        let index = slot_index();
        let slot = &self.slots[index].0;
        loop {
            slot.fetch_add(GATE, Relaxed);
            // Against the drainer's heavy fence between opening and summing (module docs).
            asymmetric_fence::light_after_rmw();
            if self.sections.load(Acquire) == 0 {
                slot.fetch_add(RUNNING, Relaxed);
                return GateEntry { gate: self, slot: index };
            }
            self.count_out(slot, GATE);
            let wait = co.prepare_wait();
            {
                let mut waiters = self.waiters();
                if self.sections.load(Relaxed) == 0 {
                    continue;
                }
                waiters.held.push(wait.waker());
            }
            wait.wait();
        }
    }

    /// Takes `amount` off `slot`, releasing what the request did; the last request out of a
    /// slot wakes the drainers (they sum the slots again).
    #[inline]
    fn count_out(&self, slot: &AtomicU64, amount: u64) {
        let before = slot.fetch_sub(amount, Release);
        if before & GATE_MASK == GATE {
            // Against the drainer's heavy fence between opening and summing (module docs).
            asymmetric_fence::light_after_rmw();
            if self.sections.load(Relaxed) != 0 {
                self.waiters().drainers.iter().for_each(|(_, drainer)| drainer.wake());
            }
        }
    }

    /// Opens a quiesced section and waits until no request is in; the section ends when the
    /// returned guard is dropped. On a thread with an [`AioContext`] the context runs
    /// meanwhile (its own requests finish too). Sections may nest and overlap, on one thread
    /// or several: requests wait for the end of the last one.
    ///
    /// # Panics
    ///
    /// Inside a coroutine: its own context could not run the requests it waits for. And as a
    /// coroutine or callback that this thread's context runs meanwhile panics (the section is
    /// closed again on the way out).
    pub fn quiesce(&self) -> Quiesced<'_> {
        assert!(
            !in_coroutine(),
            "aiocoro: QuiesceGate::quiesce called inside a coroutine; quiesce from outside any \
             coroutine (the thread's event loop level)"
        );
        self.sections.fetch_add(1, Relaxed);
        // Closes the section again if the wait below unwinds (running the context may panic),
        // or every later request would wait for good.
        let section = Quiesced { gate: self };
        // Against the requests' light fences between counting and looking (module docs).
        asymmetric_fence::heavy();
        let context = AioContext::current();
        let drainer = match &context {
            Some(context) => Drainer::Context(context.handle()),
            None => Drainer::Thread(thread::current()),
        };
        let _registered = self.register(drainer);
        match &context {
            Some(context) => context.wait_while(|| self.counted_in() != 0),
            None => {
                while self.counted_in() != 0 {
                    thread::park();
                }
            }
        }
        section
    }

    fn register(&self, drainer: Drainer) -> Registered<'_> {
        let mut waiters = self.waiters();
        let ticket = waiters.next_ticket;
        waiters.next_ticket += 1;
        waiters.drainers.push((ticket, drainer));
        Registered { gate: self, ticket }
    }

    /// Closes a section, releasing what its drainer did; when the last one closes, held
    /// requests go on.
    fn end_section(&self) {
        if self.sections.fetch_sub(1, Release) == 1 {
            let held = std::mem::take(&mut self.waiters().held);
            held.iter().for_each(Waker::wake);
        }
    }
}
