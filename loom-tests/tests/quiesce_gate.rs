//! The quiesce gate (`src/sync/quiesce_gate.rs`, behind `BlockBackend::drain`) on the production
//! code, with loom's atomics, lock and thread parking: requests are loom threads holding model
//! `Co`s (a held-back request parks until woken), drainers are plain loom threads (they park
//! until the last request out unparks them). The state the gate protects is a loom
//! `UnsafeCell`, so loom itself reports a request and a drainer touching it unordered: a
//! request running inside a section, or an ordering too weak to carry its writes across.
//! A wake-up that never comes leaves a thread parked: loom reports a deadlock.
//!
//! * `a_request_entering_while_a_drain_begins_runs_before_or_after_the_section`: a request
//!   enters while a drain begins; either the drainer sees it and waits for it to leave, or it
//!   sees the section and waits for its end. Never both proceed.
//! * `the_last_section_end_wakes_every_held_request`: two requests arrive while a section is
//!   open (one racing its end); both run once it ends, after what the drainer did inside.
//! * `overlapping_drains_on_two_threads_hold_a_request_until_both_end`: two threads drain at
//!   once while a request enters: no drainer returns while it runs, and the first section's
//!   end does not let it run inside the second.
//! * `a_nested_section_end_keeps_requests_held`: the inner of two nested sections ends while a
//!   request waits; it runs only after the outer one ends.
//!
//! Checked to fail with the code weakened, one change at a time (R: loom reports a race on the
//! cell, D: a deadlock; models in the order above):
//!
//! | change to `src/sync/quiesce_gate.rs` | enter/drain | last end | overlap | nested |
//! |---|---|---|---|---|
//! | no light fence in `enter` | R | | R | |
//! | no heavy fence in `quiesce` | R | | R | |
//! | no light fence on the last exit | D | | D | |
//! | the exit's `fetch_sub` `Relaxed` | R | | R | |
//! | the drainer's sum `Relaxed` | R | | R | |
//! | `enter`'s look at the sections `Relaxed` | R | R | R | R |
//! | the section end's `fetch_sub` `Relaxed` | R | R | R | R |
//! | no second look under the waiters lock | D | D | D | D |
//! | a woken request passes without looking again | | | R | |
//! | the last exit does not wake the drainers | D | | D | D |
//! | a section end wakes only the first held request | | D | | |
//! | a section end closes every section (`swap(0)`) | | | R | R |
//!
//! (Waking the held requests at every section end, not only the last, is no mistake: a woken
//! request looks again and waits for the next end. The models pass it.)

#![cfg(aiocoro_loom)]

use aiocoro::coroutine::Co;
use aiocoro::sync::QuiesceGate;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// A gate and the state it guards: requests write it while they are in, drainers inside their
/// sections.
#[derive(Default)]
struct Guarded {
    gate: QuiesceGate,
    state: UnsafeCell<u32>,
}

// SAFETY: the cell is shared on purpose: the gate is what should order the threads' accesses to
// it, and loom reports any two that it does not order.
unsafe impl Sync for Guarded {}

impl Guarded {
    /// A request: enters, adds `amount` to the state, leaves.
    fn request(&self, amount: u32) {
        let co = Co::model();
        let _entry = self.gate.enter(&co);
        // SAFETY: inside the gate, no section is open; loom checks that the gate orders this
        // write against every drainer's access.
        self.state.with_mut(|state| unsafe { *state += amount });
    }

    /// Reads the state; call it where the gate excludes requests (inside a section, or after
    /// joining them).
    fn read(&self) -> u32 {
        // SAFETY: no request is in (the caller's section, or every request joined); loom checks.
        self.state.with(|state| unsafe { *state })
    }
}

/// Runs `body` in every interleaving with up to `preemptions` preemptions. Two model threads
/// need four for some of the weakened orderings to show (an exit's write racing a drainer that
/// summed before the exit's fence), in about a second; three threads take loom minutes at
/// four, and two preemptions already cover each step of the gate against the other threads.
/// The bound for models of three threads (see [`model`]).
const THREE: usize = 3;

fn model(preemptions: usize, body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(body);
}

#[test]
fn a_request_entering_while_a_drain_begins_runs_before_or_after_the_section() {
    model(4, || {
        let guarded = Arc::new(Guarded::default());
        let request = {
            let guarded = guarded.clone();
            thread::spawn(move || guarded.request(1))
        };
        {
            let _quiesced = guarded.gate.quiesce();
            assert_eq!(guarded.gate.in_flight(), 0, "a request is in inside the section");
            // SAFETY: inside the section; loom checks that no request runs meanwhile.
            guarded.state.with_mut(|state| unsafe { *state += 10 });
        }
        request.join().unwrap();
        assert_eq!(guarded.read(), 11);
    });
}

#[test]
fn the_last_section_end_wakes_every_held_request() {
    model(THREE, || {
        let guarded = Arc::new(Guarded::default());
        let quiesced = guarded.gate.quiesce();
        let requests: Vec<_> = (0..2)
            .map(|_| {
                let guarded = guarded.clone();
                // Each reads what the drainer wrote inside its section: the end published it.
                thread::spawn(move || {
                    let co = Co::model();
                    let _entry = guarded.gate.enter(&co);
                    assert_eq!(guarded.read(), 10, "a request ran before the section's end");
                })
            })
            .collect();
        // SAFETY: inside the section; loom checks that no request runs meanwhile.
        guarded.state.with_mut(|state| unsafe { *state = 10 });
        drop(quiesced);
        requests.into_iter().for_each(|request| request.join().unwrap());
        assert_eq!(guarded.gate.in_flight(), 0);
    });
}

#[test]
fn overlapping_drains_on_two_threads_hold_a_request_until_both_end() {
    model(THREE, || {
        let guarded = Arc::new(Guarded::default());
        let request = {
            let guarded = guarded.clone();
            thread::spawn(move || guarded.request(1))
        };
        let drain = |guarded: &Guarded| {
            let _quiesced = guarded.gate.quiesce();
            assert_eq!(guarded.gate.in_flight(), 0, "a request is in inside the section");
            guarded.read()
        };
        let other = {
            let guarded = guarded.clone();
            thread::spawn(move || drain(&guarded))
        };
        let seen = drain(&guarded);
        let seen_by_other = other.join().unwrap();
        request.join().unwrap();
        assert!(seen <= 1 && seen_by_other <= 1);
        assert_eq!(guarded.read(), 1);
    });
}

#[test]
fn a_nested_section_end_keeps_requests_held() {
    model(4, || {
        let guarded = Arc::new(Guarded::default());
        let outer = guarded.gate.quiesce();
        let request = {
            let guarded = guarded.clone();
            thread::spawn(move || guarded.request(1))
        };
        drop(guarded.gate.quiesce());
        // SAFETY: inside the outer section; loom checks that the request is still held.
        guarded.state.with_mut(|state| unsafe { *state = 10 });
        drop(outer);
        request.join().unwrap();
        assert_eq!(guarded.read(), 11);
    });
}
