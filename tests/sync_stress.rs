//! Mutual exclusion under every lock kind with real IoThreads and many coroutines: a counter
//! that is read, left alone for a moment, and written back stays exact only if no two holders
//! overlap.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro::sync::{CoMutex, Lock, NoLock, RawLock, SpinLock, ThreadMutex};

const IOTHREADS: usize = 3;
const COROUTINES: usize = 4;
const ROUNDS: u64 = 300;

/// A counter whose increment is a separate read and write, so that overlapping holders lose
/// updates.
#[derive(Default)]
struct SlowCounter(Cell<u64>);
// SAFETY: (a test) only touched under the lock that owns it.
unsafe impl Send for SlowCounter {}

impl SlowCounter {
    fn bump(&self) {
        let value = self.0.get();
        std::hint::black_box(&value);
        std::thread::yield_now();
        self.0.set(value + 1);
    }
}

/// Runs `COROUTINES` coroutines on each of `IOTHREADS` IoThreads, each taking `lock` `ROUNDS`
/// times; `between` runs with the lock released (for example a yield).
fn hammer<R>(lock: Arc<Lock<R, SlowCounter>>, between: fn(&Co)) -> u64
where
    R: RawLock + Send + Sync + 'static,
{
    let (done_tx, done_rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..IOTHREADS).map(|i| IoThread::spawn(&format!("stress-{i}")).unwrap()).collect();
    for iothread in &iothreads {
        for _ in 0..COROUTINES {
            let (lock, done_tx) = (lock.clone(), done_tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    for _ in 0..ROUNDS {
                        lock.lock(co).bump();
                        between(co);
                    }
                    done_tx.send(()).unwrap();
                })
                .unwrap();
        }
    }
    for _ in 0..IOTHREADS * COROUTINES {
        done_rx.recv_timeout(Duration::from_secs(120)).expect("a coroutine never finished");
    }
    for iothread in iothreads {
        iothread.stop();
    }
    match Arc::try_unwrap(lock) {
        Ok(lock) => lock.into_inner().0.get(),
        Err(_) => panic!("a holder of the lock is still alive"),
    }
}

const EXPECTED: u64 = (IOTHREADS * COROUTINES) as u64 * ROUNDS;

#[test]
fn comutex_excludes_across_iothreads() {
    assert_eq!(hammer(Arc::new(CoMutex::default()), |co| co.reschedule()), EXPECTED);
}

#[test]
fn thread_mutex_excludes_across_iothreads() {
    assert_eq!(hammer(Arc::new(ThreadMutex::default()), |co| co.reschedule()), EXPECTED);
}

#[test]
fn spinlock_excludes_across_iothreads() {
    assert_eq!(hammer(Arc::new(SpinLock::default()), |co| co.reschedule()), EXPECTED);
}

#[test]
fn no_lock_state_stays_exact_between_yields_of_one_context() {
    let ctx = AioContext::new().unwrap();
    let state = Rc::new(NoLock::new(SlowCounter::default()));
    let coroutines: Vec<_> = (0..8)
        .map(|_| {
            let state = state.clone();
            ctx.spawn(move |co| {
                for _ in 0..ROUNDS {
                    state.lock(co).bump();
                    co.reschedule();
                }
            })
        })
        .collect();
    for co in coroutines {
        co.join().unwrap();
    }
    assert_eq!(state.lock_blocking().0.get(), 8 * ROUNDS);
}
