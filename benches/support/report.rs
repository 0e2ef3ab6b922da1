//! The line format of the criterion-free example runs (`coroutine_perf`, `sync_perf`):
//! `<name> <iterations> iterations <seconds> s <ns> ns/op`.

use std::time::{Duration, Instant};

/// How many timed runs a figure takes the median of.
const RUNS: usize = 5;

/// Runs `run(iterations)` once to warm up (with a tenth of the iterations), then `RUNS` times,
/// and prints the median as one line. `ops_per_iteration` scales what counts as one operation
/// (levels per nesting cycle, for example).
pub fn report(name: &str, iterations: u64, ops_per_iteration: u64, run: impl Fn(u64)) {
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
