//! How long a `CoMutex` or `CoRwLock` locker spins before it queues: only while the holder can
//! be running.
//!
//! A locker that finds the lock held by a coroutine of another thread may poll it for a while
//! instead of queueing; queueing costs a suspension and a cross-thread wake-up, and lockers of
//! the holder's thread queue behind a queued waiter, so a spin that gives up too early costs
//! more than itself. A candidate woken from the queue that finds the lock taken spins the same
//! way before it queues again. Polling pays only while the holder's
//! thread can let go meanwhile. So the spin looks, every few polls, at where the holder's
//! thread was last seen ([`super::presence`]):
//!
//! * blocked in its context's poll: it runs no coroutine until something wakes it. The first
//!   time, that may be a hand-over to a waiter whose thread is being woken right now: the
//!   locker offers the CPU once (the woken thread may need it) and polls on. Seen blocked
//!   again, the holder keeps the lock across a yield or its thread does not get to run:
//!   polling cannot pay, and the locker queues;
//! * running on another CPU: it is making progress; the locker polls on, with `pause`;
//! * running on the locker's own CPU, or not known: with more threads than CPUs the holder may
//!   be waiting for this very CPU, so the locker offers it every [`YIELD_EVERY`] polls.
//!
//! A spin never lasts more than [`MAX_ROUNDS`] polls. Before this policy, every spin offered
//! the CPU every 100 polls whatever the holder did and spun against threads that were
//! asleep; with more threads than CPUs that made a producer / consumer pair spend most of its
//! time in `sched_yield`. A per-lock budget learned from past spins (as glibc's adaptive
//! mutex keeps) was tried and measured worse: with 5 threads on 2 CPUs, the short budgets it
//! learns make lockers give up on a preempted holder and queue, and the queue then stays
//! (contended throughput fell from 85-104 to 21-31 M/s in the same runs).
//!
//! Under loom the spin is two polls, no looks and no yields, exactly as before this policy: a
//! bounded spin needs no yield to let the model progress, and after a loom yield a thread
//! never reads again a value it read before it, which would keep the model from the stale
//! reads of the lock word that CoMutex's release handshake is about. What the spin decides is
//! only when to queue; the queueing protocol the models check is unchanged.

#[cfg(not(aiocoro_loom))]
use super::presence::{self, Seen};

/// The most polls of one spin: about 50 µs of `pause` on the machines measured, the order of
/// a hand-over to a queued waiter when the CPUs are busy (two under loom).
const MAX_ROUNDS: u32 = if cfg!(aiocoro_loom) { 2 } else { 1_000 };

/// How many polls pass between two looks at where the holder's thread is.
#[cfg(not(aiocoro_loom))]
const LOOK_EVERY: u32 = 10;

/// How many polls pass between two offers of the CPU while the holder's thread is not seen
/// on another CPU (a multiple of `LOOK_EVERY`).
#[cfg(not(aiocoro_loom))]
const YIELD_EVERY: u32 = 100;

/// Polls `try_acquire` while the holder can be running (see the module docs); `holder` reads
/// the holder's thread id (as `CoMutex` names threads; 0 when free). Returns whether
/// `try_acquire` succeeded.
#[inline]
pub(crate) fn spin(mut try_acquire: impl FnMut() -> bool, holder: impl Fn() -> u32) -> bool {
    #[cfg(not(aiocoro_loom))]
    let mut seen_blocked = false;
    for round in 0..MAX_ROUNDS {
        if try_acquire() {
            return true;
        }
        #[cfg(not(aiocoro_loom))]
        if round % LOOK_EVERY == LOOK_EVERY - 1 {
            match presence::seen(holder()) {
                Seen::Blocked if seen_blocked => return false,
                Seen::Blocked => {
                    seen_blocked = true;
                    std::thread::yield_now();
                }
                Seen::OnCpu(cpu) if cpu != presence::current_cpu() => {}
                Seen::OnCpu(_) | Seen::Unknown => {
                    if round % YIELD_EVERY == YIELD_EVERY - 1 {
                        std::thread::yield_now();
                    }
                }
            }
        }
        #[cfg(not(aiocoro_loom))]
        std::hint::spin_loop();
        #[cfg(aiocoro_loom)]
        let _ = (round, &holder);
    }
    false
}
