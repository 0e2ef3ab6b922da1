//! The coroutine locks on the production code, with loom's atomics: each "coroutine" is a loom
//! thread holding a model `Co` (`Co::model()`), whose waits park the thread until woken
//! (`src/aio/wait_model.rs`). The protected data is a loom `UnsafeCell`, so loom itself reports
//! any two accesses that are not ordered by the lock.
//!
//! * `comutex_three_parties_exclude_and_hand_over`: three coroutines contend for one CoMutex;
//!   their critical sections never overlap, every increment lands, and no hand-over is lost
//!   (a lost wake-up would leave a parked thread: loom reports a deadlock).
//! * `comutex_release_races_a_waiter_queueing`: the race that the plain-store unlock leaves to
//!   the asymmetric fences: the holder frees the lock (store, light fence, load of the waiter
//!   count) while a coroutine of another thread queues (count, heavy fence, load of the holder
//!   word). Either the unlocker sees the waiter or the waiter sees the lock free, so the lock
//!   always reaches the waiter (a lost hand-over leaves it parked: loom reports a deadlock).
//! * `comutex_candidate_loses_to_a_barger_and_is_served_again`: the holder frees the lock, which
//!   wakes the queued waiter as the candidate, and takes it again at once, barging past it;
//!   the candidate that loses goes back to the front of the queue with the handshake, the lock
//!   turns starving, and the waiter still gets the lock (a lost candidacy leaves it parked: a
//!   deadlock).
//! * `coqueue_under_a_thread_mutex` and `coqueue_under_a_comutex`: a consumer coroutine waits on
//!   a CoQueue for a flag set by a producer (a plain thread holding a ThreadMutex, or another
//!   coroutine holding the CoMutex); the consumer always wakes and sees the flag.
//! * `comutex_waiter_cancelled_while_the_holder_hands_over`: a queued waiter is cancelled (its
//!   context shuts down, `Co::model_cancelled`) while the holder releases and a second waiter
//!   queues: the cancelled one leaves the queue or, if a hand-over popped it already, passes the
//!   lock on; either way the second waiter gets the lock and the lock ends free (a lock handed
//!   to the cancelled waiter and kept would leave the second parked: a deadlock).
//! * `coqueue_waiter_cancelled_while_a_producer_wakes_it`: a consumer's CoQueue wait under a
//!   ThreadMutex is cancelled while a producer's `next` may pop it: it takes the lock back,
//!   leaves the queue (or passes the wake on), and the queue ends empty, the lock free.
//! * `corwlock_release_races_a_writer_queueing`: a reader lets go while a writer of another
//!   thread spins and queues: the queueing (a compare-and-swap that sets the queued flag only
//!   while the lock is held) and the release (which serves the queue when it leaves the lock
//!   free with waiters queued) never both miss each other (a lost wake-up: a deadlock).
//! * `corwlock_candidate_loses_to_a_barger_and_is_served_again`: the holder lets go, which
//!   wakes the queued waiter as the candidate, and takes the lock again at once, barging past
//!   it; the candidate that loses goes back to the front of the queue (or takes the lock if it
//!   came free meanwhile), the lock turns starving, the next release hands it over, and the
//!   waiter still gets the lock.
//! * `corwlock_queued_readers_are_let_in_after_a_writer`: two readers queue behind a writer;
//!   its release lets the first in as the candidate, which lets the second in; both read what
//!   the writer wrote (loom checks the ordering of the data) and nobody is left parked.
//! * `corwlock_upgrade_beside_another_reader_queues_as_a_writer`: an upgrade that finds another
//!   reader gives up its read lock and queues as a writer in one step, and the other reader's
//!   release serves it (or the other reader comes after the upgrade and waits for it).
//! * `corwlock_upgrade_and_downgrade`: an upgrade beside a writer that downgrades.
//! * `comutex_waiter_leaked_while_the_holder_hands_over`,
//!   `comutex_starving_lock_handed_to_a_waiter_leaked_meanwhile`,
//!   `corwlock_waiter_leaked_while_the_reader_hands_over` and
//!   `corwlock_starving_lock_handed_to_a_writer_leaked_meanwhile`: a queued waiter's wait is leaked by
//!   its context's shutdown (`Co::model_leaked`: the waiter never runs again) while the holder
//!   releases, which may pop it (as the candidate, woken or handed the lock): the lock
//!   abandons the wait (the waiter leaves the queue, or its candidacy, and the lock if it was
//!   handed it, are given up for it), and the other waiters and lockers still get the lock (one handed to, or
//!   waited for by, the leaked waiter would leave them parked: a deadlock).

#![cfg(aiocoro_loom)]

use aiocoro::coroutine::Co;
use aiocoro::sync::{CoMutex, CoQueue, CoRwLock, SharedResource, ThreadMutex};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// Spawns a model thread standing in for a coroutine whose wait after `waits_before` normal ones
/// is leaked by its context's shutdown (`Co::model_leaked`), running `body`; its join says
/// whether `body` finished, which it does only if it got the lock before the leak (it may find
/// the lock free before it queues).
fn spawn_leaked(waits_before: u32, body: impl FnOnce(&Co) + 'static) -> thread::JoinHandle<bool> {
    thread::spawn(move || {
        let co = Co::model_leaked(waits_before);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&co))).is_ok()
    })
}

/// Three parties explode loom's search at three preemptions (minutes); two cover every
/// hand-over order between them in well under a second.
fn three_party_model(body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.max_branches = 100_000;
    builder.check(body);
}

#[test]
fn comutex_three_parties_exclude_and_hand_over() {
    three_party_model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let counter = counter.clone();
                thread::spawn(move || {
                    let co = Co::model();
                    let guard = counter.lock(&co);
                    // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                    guard.with_mut(|value| unsafe { *value += 1 });
                })
            })
            .collect();
        {
            let co = Co::model();
            let guard = counter.lock(&co);
            // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
            guard.with_mut(|value| unsafe { *value += 1 });
        }
        for worker in workers {
            worker.join().unwrap();
        }
        let co = Co::model();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        assert_eq!(total, 3);
        assert!(!counter.raw().is_locked());
    });
}

/// Both fences are `fence(SeqCst)` under loom: the contract that membarrier gives a compiler
/// fence and a system call (see `src/sync/asymmetric_fence.rs`). Checked to fail (a deadlock)
/// with the waiter's heavy fence taken out.
#[test]
fn comutex_release_races_a_waiter_queueing() {
    loom::model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = counter.lock(&co);
        let waiter = {
            let counter = counter.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = counter.lock(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        guard.with_mut(|value| unsafe { *value += 1 });
        drop(guard);
        waiter.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        assert_eq!(total, 2);
        assert!(!counter.raw().is_locked());
    });
}

/// Checked to fail (a deadlock) with the candidate's handshake taken out of `requeue`.
#[test]
fn comutex_candidate_loses_to_a_barger_and_is_served_again() {
    loom::model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = counter.lock(&co);
        let waiter = {
            let counter = counter.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = counter.lock(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        drop(guard);
        // Takes the lock again at once: past the waiter if it was woken as the candidate and
        // has not taken the lock yet (it then goes back to the queue, and the lock turns
        // starving: the next unlock hands it over).
        for _ in 0..2 {
            let guard = counter.lock(&co);
            // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
            guard.with_mut(|value| unsafe { *value += 10 });
        }
        waiter.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        assert_eq!(total, 21);
        assert!(!counter.raw().is_locked());
    });
}

#[test]
fn comutex_waiter_cancelled_while_the_holder_hands_over() {
    three_party_model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = counter.lock(&co);
        let cancelled = {
            let counter = counter.clone();
            thread::spawn(move || {
                let co = Co::model_cancelled();
                // Returns whether it got the lock: it may find it free before it queues.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let guard = counter.lock(&co);
                    // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                    guard.with_mut(|value| unsafe { *value += 100 });
                }))
                .is_ok()
            })
        };
        let waiter = {
            let counter = counter.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = counter.lock(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        drop(guard);
        let cancelled_got_in = cancelled.join().unwrap();
        waiter.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        // The cancelled one either took the lock before it had to wait, or never touched
        // the data.
        assert_eq!(total, if cancelled_got_in { 101 } else { 1 });
        assert!(!counter.raw().is_locked());
    });
}

#[test]
fn coqueue_waiter_cancelled_while_a_producer_wakes_it() {
    loom::model(|| {
        let state = Arc::new((ThreadMutex::new(false), CoQueue::new()));
        let consumer = {
            let state = state.clone();
            thread::spawn(move || {
                let co = Co::model_cancelled();
                let (lock, queue) = &*state;
                let mut ready = lock.lock(&co);
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while !*ready {
                        queue.wait(&co, &mut ready);
                    }
                }));
                // Cancelled or not, the guard holds its lock here: the data is ours.
                let was_ready = *ready;
                assert!(outcome.is_err() || was_ready);
            })
        };
        let (lock, queue) = &*state;
        let mut ready = lock.lock_blocking();
        *ready = true;
        queue.next(&mut ready);
        drop(ready);
        consumer.join().unwrap();
        let ready = lock.lock_blocking();
        assert!(queue.is_empty(&ready), "the cancelled consumer left the queue");
    });
}

#[test]
fn coqueue_under_a_thread_mutex() {
    loom::model(|| {
        let state = Arc::new((ThreadMutex::new(false), CoQueue::new()));
        let consumer = {
            let state = state.clone();
            thread::spawn(move || {
                let co = Co::model();
                let (lock, queue) = &*state;
                let mut ready = lock.lock(&co);
                while !*ready {
                    queue.wait(&co, &mut ready);
                }
            })
        };
        // A plain thread: no coroutine, just the thread mutex.
        let (lock, queue) = &*state;
        let mut ready = lock.lock_blocking();
        *ready = true;
        queue.restart_all(&mut ready);
        drop(ready);
        consumer.join().unwrap();
    });
}

#[test]
fn coqueue_under_a_comutex() {
    loom::model(|| {
        let state = Arc::new((CoMutex::new(false), CoQueue::new()));
        let consumer = {
            let state = state.clone();
            thread::spawn(move || {
                let co = Co::model();
                let (lock, queue) = &*state;
                let mut ready = lock.lock(&co);
                while !*ready {
                    queue.wait(&co, &mut ready);
                }
            })
        };
        let co = Co::model();
        let (lock, queue) = &*state;
        let mut ready = lock.lock(&co);
        *ready = true;
        queue.next(&mut ready);
        drop(ready);
        consumer.join().unwrap();
    });
}

/// A reader upgrades while a writer contends: upgrading gives up the read ownership and queues
/// as a writer when it cannot be immediate, downgrading never blocks; the two writers never
/// overlap with each other or with a reader, and nobody is left parked.
/// Checked to fail (a deadlock) with the writer's queueing made a plain `fetch_or` of the
/// queued flag (no look at whether the reader let go meanwhile); the other three CoRwLock
/// models catch that too.
#[test]
fn corwlock_release_races_a_writer_queueing() {
    loom::model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let read = lock.read(&co);
        let writer = {
            let lock = lock.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = lock.write(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let seen = read.with(|value| unsafe { *value });
        drop(read);
        writer.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = lock.read(&co).with(|value| unsafe { *value });
        assert_eq!((seen, total), (0, 1));
        assert!(lock.try_write().is_some(), "free at the end");
    });
}

/// Checked to fail (a deadlock) with the candidate's requeue made unconditional (no look at
/// whether the lock came free while it spun), and with a release that serves the queue only
/// when it finds the state exactly "queued" (not when starving).
#[test]
fn corwlock_candidate_loses_to_a_barger_and_is_served_again() {
    loom::model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = lock.write(&co);
        let waiter = {
            let lock = lock.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = lock.write(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        drop(guard);
        // Takes the lock again at once: past the waiter if it was woken as the candidate and
        // has not taken the lock yet (it then goes back to the queue, and the lock turns
        // starving: the next release hands it over).
        for _ in 0..2 {
            let guard = lock.write(&co);
            // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
            guard.with_mut(|value| unsafe { *value += 10 });
        }
        waiter.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = lock.read(&co).with(|value| unsafe { *value });
        assert_eq!(total, 21);
        assert!(lock.try_write().is_some(), "free at the end");
    });
}

/// Checked to fail (a deadlock) with the pop of the head clearing the queued flag even when
/// another waiter stays queued.
#[test]
fn corwlock_queued_readers_are_let_in_after_a_writer() {
    three_party_model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = lock.write(&co);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let lock = lock.clone();
                thread::spawn(move || {
                    let co = Co::model();
                    let guard = lock.read(&co);
                    // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                    guard.with(|value| unsafe { assert_eq!(*value, 1) });
                })
            })
            .collect();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        guard.with_mut(|value| unsafe { *value = 1 });
        drop(guard);
        for reader in readers {
            reader.join().unwrap();
        }
        assert!(lock.try_write().is_some(), "free at the end");
    });
}

/// Checked to fail (a deadlock) with an upgrade beside another reader that gives up its read
/// lock without setting the queued flag (the other reader's release then serves nobody).
#[test]
fn corwlock_upgrade_beside_another_reader_queues_as_a_writer() {
    loom::model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let read = lock.read(&co);
        let reader = {
            let lock = lock.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = lock.read(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with(|value| unsafe { *value })
            })
        };
        let write = read.upgrade(&co);
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        write.with_mut(|value| unsafe { *value += 1 });
        drop(write);
        let seen = reader.join().unwrap();
        assert!(seen <= 1);
        assert!(lock.try_write().is_some(), "free at the end");
    });
}

#[test]
fn corwlock_upgrade_and_downgrade() {
    loom::model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let writer = {
            let lock = lock.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = lock.write(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
                let read = guard.downgrade();
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                read.with(|value| unsafe { assert!(*value >= 1) });
            })
        };
        let co = Co::model();
        let read = lock.read(&co);
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let seen = read.with(|value| unsafe { *value });
        let write = read.upgrade(&co);
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        write.with_mut(|value| unsafe { *value += 10 });
        drop(write);
        writer.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = lock.read(&co).with(|value| unsafe { *value });
        assert_eq!(total, 11);
        assert!(seen <= 1);
    });
}

/// Two coroutines share one unit of a SharedResource (QEMU's `SharedResource`: a CoQueue under a
/// thread mutex): the second waits until the first releases; nobody is left parked and the
/// units add up at the end.
#[test]
fn shared_resource_hands_units_over() {
    loom::model(|| {
        let resource = Arc::new(SharedResource::new(1));
        let holders = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        let other = {
            let (resource, holders) = (resource.clone(), holders.clone());
            thread::spawn(move || {
                let co = Co::model();
                resource.allocate(&co, 1);
                assert_eq!(holders.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                holders.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                resource.release(1);
            })
        };
        let co = Co::model();
        resource.allocate(&co, 1);
        assert_eq!(holders.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
        holders.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        resource.release(1);
        other.join().unwrap();
        assert_eq!(resource.available(), 1);
    });
}

/// A waiter is leaked while it is queued for a CoMutex, in a race with the holder's unlock,
/// which may wake it as the candidate, and a second waiter queueing. Checked to fail (a
/// deadlock) with the shutdown's abandon taken out.
#[test]
fn comutex_waiter_leaked_while_the_holder_hands_over() {
    three_party_model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = counter.lock(&co);
        let leaked = {
            let counter = counter.clone();
            spawn_leaked(0, move |co| {
                let guard = counter.lock(co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 100 });
            })
        };
        let waiter = {
            let counter = counter.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = counter.lock(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        drop(guard);
        let leaked_got_in = leaked.join().unwrap();
        waiter.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        assert_eq!(total, if leaked_got_in { 101 } else { 1 });
        assert!(!counter.raw().is_locked());
    });
}

/// A waiter woken as the candidate loses the lock to a barger, goes back to the queue (the
/// lock turns starving) and is leaked there, in a race with the barger's unlock, which hands
/// it the lock. Checked to fail (a deadlock) with the shutdown's abandon taken out.
#[test]
fn comutex_starving_lock_handed_to_a_waiter_leaked_meanwhile() {
    loom::model(|| {
        let counter = Arc::new(CoMutex::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = counter.lock(&co);
        let leaked = {
            let counter = counter.clone();
            // Its first wait ends normally (woken as the candidate); the next is leaked.
            spawn_leaked(1, move |co| {
                let guard = counter.lock(co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 100 });
            })
        };
        drop(guard);
        // Takes the lock again at once: past the waiter if it was woken as the candidate.
        let guard = counter.lock(&co);
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        guard.with_mut(|value| unsafe { *value += 1 });
        drop(guard);
        let leaked_got_in = leaked.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = counter.lock(&co).with(|value| unsafe { *value });
        assert_eq!(total, if leaked_got_in { 101 } else { 1 });
        assert!(!counter.raw().is_locked());
    });
}

/// A CoRwLock writer woken as the candidate loses the lock to a barging writer, goes back to
/// the queue (under loom, one loss turns the lock starving) and is leaked there, in a race with
/// the barger's release, which hands it the lock. Checked to fail (a deadlock) with the
/// abandon's release of a handed hold taken out.
#[test]
fn corwlock_starving_lock_handed_to_a_writer_leaked_meanwhile() {
    loom::model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let guard = lock.write(&co);
        let leaked = {
            let lock = lock.clone();
            // Its first wait ends normally (woken as the candidate); the next is leaked.
            spawn_leaked(1, move |co| {
                let guard = lock.write(co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 100 });
            })
        };
        drop(guard);
        // Takes the lock again at once: past the waiter if it was woken as the candidate.
        let guard = lock.write(&co);
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        guard.with_mut(|value| unsafe { *value += 1 });
        drop(guard);
        let leaked_got_in = leaked.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = lock.write(&co).with(|value| unsafe { *value });
        assert_eq!(total, if leaked_got_in { 101 } else { 1 });
        assert!(lock.try_write().is_some(), "the lock ends free");
    });
}

/// A writer is leaked while it is queued for a CoRwLock, in a race with the reader's release,
/// which may grant it the lock, and a second writer queueing. Checked to fail (a deadlock)
/// with the shutdown's abandon taken out.
#[test]
fn corwlock_waiter_leaked_while_the_reader_hands_over() {
    three_party_model(|| {
        let lock = Arc::new(CoRwLock::new(UnsafeCell::new(0u32)));
        let co = Co::model();
        let read = lock.read(&co);
        let leaked = {
            let lock = lock.clone();
            spawn_leaked(0, move |co| {
                let guard = lock.write(co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 100 });
            })
        };
        let writer = {
            let lock = lock.clone();
            thread::spawn(move || {
                let co = Co::model();
                let guard = lock.write(&co);
                // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
                guard.with_mut(|value| unsafe { *value += 1 });
            })
        };
        drop(read);
        let leaked_got_in = leaked.join().unwrap();
        writer.join().unwrap();
        // SAFETY: the access runs under the lock's guard; loom checks that the lock excludes.
        let total = lock.write(&co).with(|value| unsafe { *value });
        assert_eq!(total, if leaked_got_in { 101 } else { 1 });
    });
}
