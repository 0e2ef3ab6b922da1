//! A quick, criterion-free run of the coroutine benchmarks, one line per figure:
//!
//! ```text
//! <name> <iterations> iterations <seconds> s <ns> ns/op
//! ```
//!
//! Each figure is the median of five timed runs after a warm-up. `nesting` is per level, the
//! others per operation. `raw_corosensei_*` run the same shapes on bare `corosensei`, in the same
//! process, as the baseline. Run with `cargo run --release --example coroutine_perf`.

#[path = "../benches/support/report.rs"]
mod report;
#[path = "../benches/support/coroutine_workloads.rs"]
mod workloads;

use report::report;

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
