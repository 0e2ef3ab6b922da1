//! Waking a context that may be blocked, without waking one that is busy (QEMU's `notify_me`
//! / `notified` handshake).
//!
//! A context about to block raises `notify_me` and then looks for work; a producer makes its
//! work visible and then reads `notify_me`. With a full fence on both sides, at least one of
//! them sees the other: either the context finds the work and does not block, or the producer
//! sees `notify_me` and signals the context's event (its eventfd). A busy context never raises
//! `notify_me`, so producers never touch the eventfd. `notified` collapses the signals of many
//! producers into one until the context accepts it.

// Its `pub` items are re-exported to the loom models (`loom_exports`, loom builds only).
#![cfg_attr(not(aiocoro_loom), allow(unreachable_pub))]

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::loom::{AtomicBool, AtomicU32, AtomicU64, fence};

/// The shared half of the handshake.
#[derive(Default)]
pub struct WakeupHandshake {
    /// Non-zero while the home thread may block (in units of 2, as in QEMU, so that nested
    /// polls can count themselves).
    notify_me: AtomicU32,
    /// Set by the producer that signalled the event; cleared by the context when it accepts.
    notified: AtomicBool,
    /// How many times the event was signalled, for tests and statistics.
    signals: AtomicU64,
    /// Set by [`WakeupHandshake::kick`]: the next wait returns at once even with no work queued
    /// (QEMU's `aio_wait_kick` schedules a dummy BH for the same purpose).
    kicked: AtomicBool,
}

impl std::fmt::Debug for WakeupHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeupHandshake").finish_non_exhaustive()
    }
}

/// What the context blocks in: production epoll with the eventfd in its set, or a model event
/// under loom.
pub trait Blocker {
    /// Waits up to `timeout` (`None`: no limit) for the event or other sources; returns whether
    /// the event is signalled.
    fn block(&mut self, timeout: Option<Duration>) -> bool;
    /// Resets the signalled event.
    fn reset_event(&mut self);
}

impl WakeupHandshake {
    /// Creates the state of a context that is not blocking.
    pub fn new() -> Self {
        Self::default()
    }

    /// Producer side, after its work is visible (pushed to the inbox): returns whether the
    /// caller must signal the event. True at most once until the context accepts.
    pub fn needs_signal(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.notify_me.load(Ordering::Relaxed) == 0 {
            return false;
        }
        if self.notified.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.signals.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Producer side: makes the context's current or next wait return, for a waiter whose
    /// condition lives outside the context (`wait_while`). Returns whether the caller must
    /// signal the event.
    pub fn kick(&self) -> bool {
        // A read-modify-write, not a store: every kick then belongs to the release sequence
        // that the wait's clearing swap acquires, so a waiter that consumes one kick also sees
        // what every earlier kicker published before kicking.
        self.kicked.swap(true, Ordering::Release);
        self.needs_signal()
    }

    /// Context side: one poll's wait. When `may_block`, raises `notify_me`, re-checks
    /// `has_work` and blocks up to `timeout` only if there is none; otherwise only collects what
    /// is ready. Afterwards accepts any signal and resets the event if it fired.
    pub fn wait<B: Blocker>(
        &self,
        blocker: &mut B,
        may_block: bool,
        timeout: Option<Duration>,
        has_work: impl Fn() -> bool,
    ) {
        let fired = if may_block {
            self.notify_me.fetch_add(2, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let ready = has_work() || self.kicked.load(Ordering::Acquire);
            let timeout = if ready { Some(Duration::ZERO) } else { timeout };
            let fired = blocker.block(timeout);
            self.notify_me.fetch_sub(2, Ordering::Release);
            fired
        } else {
            blocker.block(Some(Duration::ZERO))
        };
        // Reset the event first, then accept. In the other order a producer could set
        // `notified` after the accept and write the event just before the reset: its write
        // would be drained while `notified` stayed set, and every later producer would skip
        // the signal, leaving a blocked context deaf. This way a late producer's write stays
        // pending and wakes the next wait. Accepting before the caller looks at the work keeps
        // the other guarantee: a producer that saw `notified` set published its work before
        // this swap, so the caller will see it. A kick has done its job once the wait
        // returned: the caller re-checks its condition next. Clearing it must acquire the
        // kick it clears, so it is a swap: a plain store could overwrite a kick that landed
        // after the check above (its kicker reading `notify_me` already lowered, so writing no
        // eventfd) without this thread ever synchronising with the kicker, whose condition
        // change the caller could then miss before blocking for good.
        if fired {
            blocker.reset_event();
        }
        self.notified.swap(false, Ordering::AcqRel);
        self.kicked.swap(false, Ordering::Acquire);
    }

    /// How many times producers signalled the event.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }
}
