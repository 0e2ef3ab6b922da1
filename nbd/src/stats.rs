//! What the server holds right now, for leak checks: live connections, running requests
//! (one coroutine each, besides each connection's own) and the buffer bytes they hold.
//!
//! Each thread counts in counters of its own (a request starts and ends on one thread), on a
//! cache line of their own, written only by that thread: counting costs no shared cache line.
//! [`stats`] sums them.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// The server's live counts, summed over its threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections being served (from greeting to close).
    pub connections: i64,
    /// Requests running (each in a coroutine of its own).
    pub requests: i64,
    /// Buffer bytes the running requests hold (read data, write payloads).
    pub request_bytes: i64,
}

/// One thread's counters: written by that thread only, read by [`stats`].
#[repr(align(64))]
#[derive(Default)]
struct Counters {
    connections: AtomicI64,
    requests: AtomicI64,
    request_bytes: AtomicI64,
}

/// Every thread's counters (a thread's stay after it ends: they hold its final counts).
static ALL: Mutex<Vec<Arc<Counters>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: OnceCell<Arc<Counters>> = const { OnceCell::new() };
}

/// Adds `delta` to this thread's counter `which` (a plain load and store: no other thread
/// writes it).
fn add(which: fn(&Counters) -> &AtomicI64, delta: i64) {
    MINE.with(|mine| {
        let counters = mine.get_or_init(|| {
            let counters = Arc::new(Counters::default());
            ALL.lock().unwrap_or_else(|poison| poison.into_inner()).push(counters.clone());
            counters
        });
        let counter = which(counters);
        counter.store(counter.load(Ordering::Relaxed) + delta, Ordering::Relaxed);
    });
}

/// The live counts of the whole process (a snapshot: each thread's counters are read at a
/// slightly different moment).
pub fn stats() -> Stats {
    let all = ALL.lock().unwrap_or_else(|poison| poison.into_inner());
    let mut total = Stats::default();
    for counters in all.iter() {
        total.connections += counters.connections.load(Ordering::Relaxed);
        total.requests += counters.requests.load(Ordering::Relaxed);
        total.request_bytes += counters.request_bytes.load(Ordering::Relaxed);
    }
    total
}

/// Counts one connection while it lives.
pub(crate) struct ConnectionCount(());

impl ConnectionCount {
    pub(crate) fn new() -> ConnectionCount {
        add(|counters| &counters.connections, 1);
        ConnectionCount(())
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        add(|counters| &counters.connections, -1);
    }
}

/// Counts a request and its buffer bytes.
pub(crate) fn request_started(bytes: u64) {
    add(|counters| &counters.requests, 1);
    add(|counters| &counters.request_bytes, bytes as i64);
}

/// Uncounts a request that [`request_started`] counted, on the same thread.
pub(crate) fn request_ended(bytes: u64) {
    add(|counters| &counters.requests, -1);
    add(|counters| &counters.request_bytes, -(bytes as i64));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's counters (other tests of this binary count on threads of their own).
    fn mine() -> Stats {
        MINE.with(|mine| {
            let counters = mine.get().expect("this thread counted");
            Stats {
                connections: counters.connections.load(Ordering::Relaxed),
                requests: counters.requests.load(Ordering::Relaxed),
                request_bytes: counters.request_bytes.load(Ordering::Relaxed),
            }
        })
    }

    #[test]
    fn each_thread_counts_apart_and_the_sum_sees_all() {
        let connection = ConnectionCount::new();
        request_started(4096);
        assert_eq!(mine(), Stats { connections: 1, requests: 1, request_bytes: 4096 });
        // A thread that ends with a request counted (never in the server: it is for the
        // check) leaves its counts in the sum.
        let other = std::thread::spawn(|| {
            request_started(1 << 40);
            mine()
        });
        assert_eq!(other.join().unwrap().request_bytes, 1 << 40);
        assert!(stats().request_bytes >= (1 << 40) + 4096, "the sum misses a thread");
        request_ended(4096);
        drop(connection);
        assert_eq!(mine(), Stats::default());
    }
}
