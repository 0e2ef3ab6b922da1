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
//! (ns per item). `multi/rwlock_cross_thread` runs 300 000 operations on one CoRwLock from 3
//! coroutines on each of two IoThreads (one in four a write, the others reads);
//! `multi/rwlock_cross_thread_std` does the same with `std::sync::RwLock` on six threads (first
//! line format, ns per operation). Each of these two runs alternately with its std peer, so that
//! a phase of the machine falls on both. Run with
//! `cargo run --release --example sync_perf [-- FILTER...]`: with filter words, only the figures
//! whose names contain one of them (`sync_perf multi/`).

#[path = "../benches/support/report.rs"]
mod report;
#[path = "../benches/support/sync_workloads.rs"]
#[allow(dead_code, reason = "shared by the bench and the example, which each use a part")]
mod workloads;

use std::time::Duration;

use report::Figures;

use workloads::Outcome;

const USAGE: &str = "\
usage: sync_perf [FILTER...]

The lock figures, one line each: `<name> <iterations> iterations <seconds> s <ns> ns/op` (the
median of five runs) or `<name> <iterations/s> iterations/s` (one 1-second run on IoThreads),
with std's and tokio's locks as peers in the same process. With FILTER words, only the
figures whose names contain one of them.

  -h, --help    print this help and exit";

/// If `name` is selected: one 1-second run of `run`, printed as a rate.
fn report_rate(figures: &Figures, name: &str, run: impl Fn(Duration) -> Outcome) {
    if !figures.selects(name) {
        return;
    }
    let outcome = run(Duration::from_secs(1));
    println!("{name} {:.0} iterations/s", outcome.rate());
}

fn main() {
    let figures = Figures::from_command_line("sync_perf", USAGE);
    figures.report("comutex/uncontended", 10_000_000, 1, workloads::comutex_uncontended);
    figures.report("corwlock/read", 10_000_000, 1, workloads::corwlock_read);
    figures.report("corwlock/write", 10_000_000, 1, workloads::corwlock_write);
    figures.report(
        "comutex/handoff_same_thread",
        2_000_000,
        1,
        workloads::comutex_handoff_same_thread,
    );
    figures.report("coqueue/enter_next_wait", 2_000_000, 1, workloads::coqueue_enter_next_wait);
    // Peers, for scale.
    figures.report("std_mutex/uncontended", 10_000_000, 1, workloads::std_mutex_uncontended);
    figures.report("tokio_mutex/uncontended", 10_000_000, 1, workloads::tokio_mutex_uncontended);
    figures.report("tokio_mutex/handoff_same_thread", 2_000_000, 1, workloads::tokio_mutex_handoff);
    report_rate(&figures, "multi/mutex/contended", |duration| {
        workloads::multi_comutex(5, duration)
    });
    report_rate(&figures, "multi/mutex/handoff", |duration| workloads::multi_comutex(2, duration));
    report_rate(&figures, "multi/mutex/pthread", |duration| {
        workloads::multi_std_mutex(5, duration)
    });
    // Each with its std peer, their runs alternating.
    figures.report_with_baseline(
        ("multi/oversubscribed_queue", workloads::oversubscribed_queue),
        ("multi/oversubscribed_queue_std", workloads::oversubscribed_queue_std),
        200_000,
    );
    figures.report_with_baseline(
        ("multi/rwlock_cross_thread", workloads::rwlock_cross_thread),
        ("multi/rwlock_cross_thread_std", workloads::rwlock_cross_thread_std),
        300_000,
    );
}
