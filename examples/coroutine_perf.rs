//! A quick, criterion-free run of the coroutine benchmarks, one line per figure:
//!
//! ```text
//! <name> <iterations> iterations <seconds> s <ns> ns/op
//! ```
//!
//! Each figure is the median of five timed runs after a warm-up. `future/*` and `join/*` are the
//! Future bridge and join handles (see `benches/support/future_workloads.rs`); `join/spawn_join`
//! compares with `raw_corosensei_lifecycle`, `future/cross_thread_wake` with
//! `future/cross_thread_wake_tokio` (tokio awaiting the same futures). `nesting` is per level, the
//! others per operation. `raw_corosensei_*` run the same shapes on bare `corosensei`, in the same
//! process, as the baseline: their runs alternate with those of `lifecycle` and `yield`, so that
//! a slower phase of the machine falls on both. `suspended/1000000` is per coroutine (create, enter until its yield,
//! later enter to its end) with a million suspended at once; before its runs, one such million is
//! measured (almost all of their stacks new to the process):
//!
//! ```text
//! suspended_memory <KiB> KiB each, <count> mappings
//! suspended_page_tables <KiB> KiB each
//! ```
//!
//! the resident memory each suspended coroutine adds, the process's mappings while they are all
//! suspended, and the page-table memory each adds (the kernel's, not in the resident size).
//! Run with `cargo run --release --example coroutine_perf [-- FILTER...]`: with filter words,
//! only the figures whose names contain one of them (`coroutine_perf future/ join/`).

#[path = "../benches/support/future_workloads.rs"]
mod future_workloads;
#[path = "../benches/support/process_memory.rs"]
mod process_memory;
#[path = "../benches/support/report.rs"]
mod report;
#[path = "../benches/support/coroutine_workloads.rs"]
mod workloads;

use report::Figures;

const USAGE: &str = "\
usage: coroutine_perf [FILTER...]

The coroutine figures, one line each (`<name> <iterations> iterations <seconds> s <ns> ns/op`,
the median of five runs), with raw corosensei's as the baseline in the same process (its
runs alternating with ours). With
FILTER words, only the figures whose names contain one of them.

  -h, --help    print this help and exit";

/// How many coroutines `suspended` keeps suspended at once.
const SUSPENDED: u64 = 1_000_000;

/// Suspends [`SUSPENDED`] coroutines and prints what they cost in memory and mappings.
fn suspended_memory() {
    let resident = process_memory::resident_kib();
    let page_tables = process_memory::page_table_kib();
    let coroutines = workloads::suspend_all(SUSPENDED);
    let mappings = process_memory::mapping_count();
    let each = |before: u64, after: u64| after.saturating_sub(before) as f64 / SUSPENDED as f64;
    let resident = each(resident, process_memory::resident_kib());
    let page_tables = each(page_tables, process_memory::page_table_kib());
    println!("suspended_memory {resident:.2} KiB each, {mappings} mappings");
    println!("suspended_page_tables {page_tables:.2} KiB each");
    workloads::finish_all(coroutines);
}

fn main() {
    const NESTING_DEPTH: u32 = 1000;
    let figures = Figures::from_command_line("coroutine_perf", USAGE);
    figures.report_with_baseline(
        ("lifecycle", workloads::lifecycle),
        ("raw_corosensei_lifecycle", workloads::raw_corosensei_lifecycle),
        5_000_000,
    );
    figures.report("cost", 5_000_000, 1, workloads::cost);
    figures.report("nesting", 100, u64::from(NESTING_DEPTH), |cycles| {
        workloads::nesting(cycles, NESTING_DEPTH)
    });
    figures.report_with_baseline(
        ("yield", workloads::yield_round_trips),
        ("raw_corosensei_yield", workloads::raw_corosensei_yield),
        20_000_000,
    );
    figures.report("function_call", 100_000_000, 1, workloads::function_call);
    let bridge = future_workloads::Bridge::new();
    figures.report("future/ready", 20_000_000, 1, |n| bridge.ready(n));
    figures.report("future/cross_thread_wake", 200_000, 1, |n| bridge.cross_thread_wake(n));
    figures.report("future/cross_thread_wake_tokio", 200_000, 1, |n| {
        bridge.tokio_cross_thread_wake(n)
    });
    figures.report("join/spawn_join", 5_000_000, 1, |n| bridge.spawn_join(n));
    figures.report("join/await_from_tokio", 200_000, 1, |n| bridge.await_from_tokio(n));
    drop(bridge);
    // Last, so that the baselines above run right after the figures they are compared with.
    if figures.selects("suspended_memory") || figures.selects("suspended_page_tables") {
        suspended_memory();
    }
    figures.report(&format!("suspended/{SUSPENDED}"), SUSPENDED, 1, workloads::suspended);
}
