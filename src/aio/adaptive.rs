//! Adaptive busy polling (QEMU's `poll-max-ns`, `poll-grow`, `poll-shrink`).

/// The window QEMU starts growing from, in nanoseconds.
const INITIAL_WINDOW_NS: u64 = 4_000;

/// Settings and state of adaptive busy polling for one context.
///
/// Before blocking, a poll spins for the current window checking for work. After each poll
/// the window adapts to how long the context waited for its work (until another thread
/// signalled it, when one did: see [`AdaptivePolling::record_wait`]): a wait that the window covered
/// leaves it alone; a wait longer than `max_ns` shrinks it (divides by `shrink`, or resets it
/// to 0 when `shrink` is 0); a shorter wait grows it (from 4 µs, multiplying by `grow`) up to
/// `max_ns`.
///
/// With [`AdaptivePolling::pause_while_preempted`] (IoThreads use it), polling also stops while
/// the polling thread keeps being preempted, which QEMU does not do: with more runnable threads
/// than CPUs, the CPU time a poll spins away is likely what the thread that would send the
/// work waits for (see [`AdaptivePolling::record_preemptions`]).
///
/// ```
/// use aiocoro::aio::AdaptivePolling;
///
/// let mut polling = AdaptivePolling::new(32_000);
/// polling.record_block(10_000); // a short wait: grow from 0 to 4 µs
/// assert_eq!(polling.window_ns(), 4_000);
/// polling.record_block(10_000); // still longer than the window: grow to 8 µs
/// assert_eq!(polling.window_ns(), 8_000);
/// polling.record_block(1_000_000); // longer than max: shrink
/// assert_eq!(polling.window_ns(), 4_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptivePolling {
    max_ns: u64,
    grow: u64,
    shrink: u64,
    window_ns: u64,
    /// Whether polls look at the thread's preemptions (`pause_while_preempted`).
    watch_preemptions: bool,
    /// The polling thread's preemption count at the last look, if any.
    preemptions: Option<u64>,
}

impl AdaptivePolling {
    /// Polls for at most `max_ns`, growing by 2 and shrinking by 2 (QEMU's defaults for
    /// `poll-grow` = 0 and a shrink of 2).
    pub fn new(max_ns: u64) -> AdaptivePolling {
        AdaptivePolling {
            max_ns,
            grow: 2,
            shrink: 2,
            window_ns: 0,
            watch_preemptions: false,
            preemptions: None,
        }
    }

    /// Sets the factor the window grows by (at least 2).
    pub fn grow(mut self, factor: u64) -> AdaptivePolling {
        self.grow = factor.max(2);
        self
    }

    /// Sets the divisor the window shrinks by; 0 resets it to nothing.
    pub fn shrink(mut self, divisor: u64) -> AdaptivePolling {
        self.shrink = divisor;
        self
    }

    /// Makes polls stop spinning while the polling thread keeps being preempted (see
    /// [`AdaptivePolling::record_preemptions`]).
    pub fn pause_while_preempted(mut self) -> AdaptivePolling {
        self.watch_preemptions = true;
        self
    }

    /// Whether polls look at the thread's preemptions ([`pause_while_preempted`]).
    ///
    /// [`pause_while_preempted`]: AdaptivePolling::pause_while_preempted
    pub fn watches_preemptions(&self) -> bool {
        self.watch_preemptions
    }

    /// The current window in nanoseconds.
    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    /// Looks at the polling thread's count of preemptions (involuntary context switches) so
    /// far, before a poll spins: if it grew since the last look, the CPUs have more runnable
    /// threads than they run, and spinning would take CPU time from the threads whose work
    /// the poll waits for. The window then resets to nothing, and this returns true (do not
    /// spin); it grows again as usual once the thread is no longer preempted.
    ///
    /// ```
    /// use aiocoro::aio::AdaptivePolling;
    ///
    /// let mut polling = AdaptivePolling::new(32_000).pause_while_preempted();
    /// polling.record_block(10_000);
    /// assert!(!polling.record_preemptions(7)); // the first look only notes the count
    /// assert!(!polling.record_preemptions(7));
    /// assert_eq!(polling.window_ns(), 4_000);
    /// assert!(polling.record_preemptions(8)); // preempted since: stop polling
    /// assert_eq!(polling.window_ns(), 0);
    /// ```
    pub fn record_preemptions(&mut self, count: u64) -> bool {
        let preempted = self.preemptions.is_some_and(|seen| count != seen);
        self.preemptions = Some(count);
        if preempted {
            self.window_ns = 0;
        }
        preempted
    }

    /// Adapts the window to a poll that waited `blocked_ns` in all, of which the first
    /// `work_after_ns` passed before another thread signalled work (`None`: no such signal, or
    /// not known). The window adapts to the earlier of the two: a thread that slept is woken
    /// some time after the signal, and that time is not one polling would have had to
    /// cover. Adapting to the wake-up instead (as QEMU does) traps a window at 0 once
    /// wake-ups of sleeping threads take longer than `max_ns`: every wait then sleeps, takes
    /// that long, and keeps the window at 0.
    ///
    /// ```
    /// use aiocoro::aio::AdaptivePolling;
    ///
    /// let mut polling = AdaptivePolling::new(32_000);
    /// polling.record_wait(50_000, None); // slept past the maximum: stays off
    /// assert_eq!(polling.window_ns(), 0);
    /// polling.record_wait(50_000, Some(5_000)); // the work was there after 5 µs
    /// assert_eq!(polling.window_ns(), 4_000);
    /// ```
    pub fn record_wait(&mut self, blocked_ns: u64, work_after_ns: Option<u64>) {
        self.record_block(work_after_ns.map_or(blocked_ns, |after| after.min(blocked_ns)));
    }

    /// Adapts the window to a poll that waited `blocked_ns` in all.
    pub fn record_block(&mut self, blocked_ns: u64) {
        if blocked_ns <= self.window_ns {
            // The window caught the work: the sweet spot.
        } else if blocked_ns > self.max_ns {
            self.window_ns = self.window_ns.checked_div(self.shrink).unwrap_or(0);
        } else if self.window_ns < self.max_ns {
            let grown = if self.window_ns == 0 {
                INITIAL_WINDOW_NS
            } else {
                self.window_ns.saturating_mul(self.grow)
            };
            self.window_ns = grown.min(self.max_ns);
        }
    }
}
