//! A quick, criterion-free run of the lock benchmarks. Single-thread figures print
//!
//! ```text
//! <name> <iterations> iterations <seconds> s <ns> ns/op
//! ```
//!
//! (median of five runs after a warm-up), multi-thread ones
//!
//! ```text
//! <name> <iterations/s> iterations/s
//! ```
//!
//! (one 1-second run each; 5 IoThreads for `contended` and `pthread`, as QEMU's
//! `test-aio-multithread` uses, 2 for `handoff`). `multi/oversubscribed_queue` passes 200 000
//! items through a bounded queue (capacity 8) on CoMutex + CoQueue, from 4 producer coroutines
//! on one IoThread to 3 consumers on another; `multi/oversubscribed_queue_std` does the same
//! with `std::sync::Mutex` + `Condvar` on seven threads; both print the first line format
//! (ns per item). Run with `cargo run --release --example sync_perf`.

#[path = "../benches/support/report.rs"]
mod report;
#[path = "../benches/support/sync_workloads.rs"]
#[allow(dead_code, reason = "shared by the bench and the example, which each use a part")]
mod workloads;

use std::time::Duration;

use report::report;

use workloads::Outcome;

fn report_rate(name: &str, run: impl Fn(Duration) -> Outcome) {
    let outcome = run(Duration::from_secs(1));
    println!("{name} {:.0} iterations/s", outcome.rate());
}

fn main() {
    report("comutex/uncontended", 10_000_000, 1, workloads::comutex_uncontended);
    report("corwlock/read", 10_000_000, 1, workloads::corwlock_read);
    report("corwlock/write", 10_000_000, 1, workloads::corwlock_write);
    report("comutex/handoff_same_thread", 2_000_000, 1, workloads::comutex_handoff_same_thread);
    report("coqueue/enter_next_wait", 2_000_000, 1, workloads::coqueue_enter_next_wait);
    // Peers, for scale.
    report("std_mutex/uncontended", 10_000_000, 1, workloads::std_mutex_uncontended);
    report("tokio_mutex/uncontended", 10_000_000, 1, workloads::tokio_mutex_uncontended);
    report("tokio_mutex/handoff_same_thread", 2_000_000, 1, workloads::tokio_mutex_handoff);
    report_rate("multi/mutex/contended", |duration| workloads::multi_comutex(5, duration));
    report_rate("multi/mutex/handoff", |duration| workloads::multi_comutex(2, duration));
    report_rate("multi/mutex/pthread", |duration| workloads::multi_std_mutex(5, duration));
    report("multi/oversubscribed_queue", 200_000, 1, workloads::oversubscribed_queue);
    report("multi/oversubscribed_queue_std", 200_000, 1, workloads::oversubscribed_queue_std);
}
