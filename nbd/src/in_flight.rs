//! The requests of one connection that are running: a count with a limit, which the
//! connection's reader waits on (back-pressure, and letting requests finish before close).

use std::cell::Cell;
use std::rc::Rc;

use aiocoro::aio::LocalWaker;
use aiocoro::coroutine::Co;

/// The running requests of one connection, shared by its coroutines on one thread.
pub(crate) struct InFlight {
    count: Cell<usize>,
    limit: usize,
    /// The reader, while it waits for the count to drop.
    waiter: Cell<Option<LocalWaker>>,
}

/// One running request; dropping it (at the end, or by unwinding) ends the request.
pub(crate) struct Running(Rc<InFlight>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.count.set(self.0.count.get() - 1);
        if let Some(waiter) = self.0.waiter.take() {
            waiter.wake();
        }
    }
}

impl InFlight {
    /// No requests yet; at most `limit` at once.
    pub(crate) fn new(limit: usize) -> Rc<InFlight> {
        assert!(limit > 0, "aiocoro-nbd: an in-flight limit must be at least 1");
        Rc::new(InFlight { count: Cell::new(0), limit, waiter: Cell::new(None) })
    }

    /// Counts a new request. Call [`InFlight::wait_for_room`] first.
    pub(crate) fn start(self: &Rc<InFlight>) -> Running {
        self.count.set(self.count.get() + 1);
        Running(self.clone())
    }

    /// Suspends the (one) reader until fewer than the limit run.
    pub(crate) fn wait_for_room(&self, co: &Co) {
        self.wait_until(co, |count| count < self.limit);
    }

    /// Suspends the (one) reader until no request runs.
    pub(crate) fn wait_idle(&self, co: &Co) {
        self.wait_until(co, |count| count == 0);
    }

    fn wait_until(&self, co: &Co, done: impl Fn(usize) -> bool) {
        while !done(self.count.get()) {
            let wait = co.prepare_wait();
            self.waiter.set(Some(wait.local_waker()));
            wait.wait();
        }
    }
}
