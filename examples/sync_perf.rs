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
//! `test-aio-multithread` uses, 2 for `handoff`). Run with
//! `cargo run --release --example sync_perf`.

#[path = "../benches/support/sync_workloads.rs"]
mod workloads;

use std::time::{Duration, Instant};

const RUNS: usize = 5;

fn report(name: &str, iterations: u64, run: impl Fn(u64)) {
    run(iterations / 10 + 1);
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            run(iterations);
            start.elapsed()
        })
        .collect();
    times.sort();
    let median = times[RUNS / 2];
    let ns_per_op = median.as_secs_f64() * 1e9 / iterations as f64;
    println!("{name} {iterations} iterations {:.6} s {ns_per_op:.2} ns/op", median.as_secs_f64());
}

fn report_rate(name: &str, run: impl Fn(Duration) -> u64) {
    let duration = Duration::from_secs(1);
    let iterations = run(duration);
    println!("{name} {:.0} iterations/s", iterations as f64 / duration.as_secs_f64());
}

fn main() {
    report("comutex/uncontended", 10_000_000, workloads::comutex_uncontended);
    report("comutex/handoff_same_thread", 2_000_000, workloads::comutex_handoff_same_thread);
    report("coqueue/enter_next_wait", 2_000_000, workloads::coqueue_enter_next_wait);
    report_rate("multi/mutex/contended", |d| workloads::multi_comutex(5, d));
    report_rate("multi/mutex/handoff", |d| workloads::multi_comutex(2, d));
    report_rate("multi/mutex/pthread", |d| workloads::multi_std_mutex(5, d));
}
