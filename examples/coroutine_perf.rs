//! A quick, criterion-free run of the coroutine benchmarks, one line per figure:
//!
//! ```text
//! <name> <iterations> iterations <seconds> s <ns> ns/op
//! ```
//!
//! Each figure is the median of five timed runs after a warm-up. `nesting` is per level, the
//! others per operation. `raw_corosensei_*` run the same shapes on bare `corosensei`, in the same
//! process, as the baseline. Run with `cargo run --release --example coroutine_perf`.

#[path = "../benches/support/coroutine_workloads.rs"]
mod workloads;

use std::time::{Duration, Instant};

const RUNS: usize = 5;

/// Times `run(iterations)` `RUNS` times after one warm-up and prints the median.
fn report(name: &str, iterations: u64, ops_per_iteration: u64, run: impl Fn(u64)) {
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
    let ops = iterations * ops_per_iteration;
    let ns_per_op = median.as_secs_f64() * 1e9 / ops as f64;
    println!("{name} {ops} iterations {:.6} s {ns_per_op:.2} ns/op", median.as_secs_f64());
}

fn main() {
    const NESTING_DEPTH: u32 = 1000;
    report("lifecycle", 5_000_000, 1, workloads::lifecycle);
    report("cost", 5_000_000, 1, workloads::cost);
    report("nesting", 100, u64::from(NESTING_DEPTH), |cycles| {
        workloads::nesting(cycles, NESTING_DEPTH)
    });
    report("yield", 20_000_000, 1, workloads::yield_round_trips);
    report("function_call", 100_000_000, 1, workloads::function_call);
    report("raw_corosensei_yield", 20_000_000, 1, workloads::raw_corosensei_yield);
    report("raw_corosensei_lifecycle", 5_000_000, 1, workloads::raw_corosensei_lifecycle);
}
