//! The line format of the criterion-free example runs (`coroutine_perf`, `sync_perf`):
//! `<name> <iterations> iterations <seconds> s <ns> ns/op`, for the figures the command
//! line selects.

use std::time::{Duration, Instant};

use example_cli::{CommandLine, NameFilter};

/// How many timed runs a figure takes the median of.
const RUNS: usize = 5;

/// The figures to print: those whose names the command line's filter words select.
pub(crate) struct Figures {
    filter: NameFilter,
}

impl Figures {
    /// The figures `program`'s command line selects; `--help` prints `usage` and exits, as
    /// does a bad argument (see [`CommandLine::parse`]).
    pub(crate) fn from_command_line(program: &'static str, usage: &'static str) -> Self {
        let filter = CommandLine::from_env(program, usage).parse(NameFilter::parse);
        Figures { filter }
    }

    /// Whether the figure `name` is to be run.
    pub(crate) fn selects(&self, name: &str) -> bool {
        self.filter.selects(name)
    }

    /// If `name` is selected: runs `run(iterations)` once to warm up (with a tenth of the
    /// iterations), then `RUNS` times, and prints the median as one line. `ops_per_iteration`
    /// scales what counts as one operation (levels per nesting cycle, for example).
    pub(crate) fn report(
        &self,
        name: &str,
        iterations: u64,
        ops_per_iteration: u64,
        run: impl Fn(u64),
    ) {
        if !self.selects(name) {
            return;
        }
        run(iterations / 10 + 1);
        let times: Vec<Duration> = (0..RUNS).map(|_| timed(&run, iterations)).collect();
        print_line(name, iterations * ops_per_iteration, times);
    }

    /// Like [`Figures::report`] for a figure and the baseline it is compared with, each of
    /// `iterations` operations: their runs alternate, so that a phase of the machine (another
    /// process on the core, a frequency change) falls on both alike, and each prints its line.
    /// Runs both when either is selected.
    pub(crate) fn report_with_baseline(
        &self,
        (name, run): (&str, impl Fn(u64)),
        (baseline_name, baseline): (&str, impl Fn(u64)),
        iterations: u64,
    ) {
        if !self.selects(name) && !self.selects(baseline_name) {
            return;
        }
        run(iterations / 10 + 1);
        baseline(iterations / 10 + 1);
        let (times, baseline_times): (Vec<Duration>, Vec<Duration>) =
            (0..RUNS).map(|_| (timed(&run, iterations), timed(&baseline, iterations))).unzip();
        print_line(name, iterations, times);
        print_line(baseline_name, iterations, baseline_times);
    }
}

/// How long `run(iterations)` takes.
fn timed(run: impl Fn(u64), iterations: u64) -> Duration {
    let start = Instant::now();
    run(iterations);
    start.elapsed()
}

/// Prints the line of a figure of `ops` operations whose runs took `times`: their median.
fn print_line(name: &str, ops: u64, mut times: Vec<Duration>) {
    times.sort();
    let median = times[RUNS / 2];
    let ns_per_op = median.as_secs_f64() * 1e9 / ops as f64;
    println!("{name} {ops} iterations {:.6} s {ns_per_op:.2} ns/op", median.as_secs_f64());
}
