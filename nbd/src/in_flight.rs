//! The requests of one connection that are running: a count and a byte total with limits,
//! which the connection's reader waits on (back-pressure, a bound on the memory a client can
//! make the server hold, and letting requests finish before close).

use std::cell::Cell;
use std::rc::Rc;

use aiocoro::aio::LocalWaker;
use aiocoro::coroutine::Co;

use crate::stats;

/// The running requests of one connection, shared by its coroutines on one thread.
pub(crate) struct InFlight {
    count: Cell<usize>,
    /// The buffer bytes the running requests hold.
    bytes: Cell<u64>,
    limit: usize,
    byte_limit: u64,
    /// The reader, while it waits for the count to drop.
    waiter: Cell<Option<LocalWaker>>,
}

/// One running request and its buffer bytes; dropping it (at the end, or by unwinding) ends
/// the request.
pub(crate) struct Running(Rc<InFlight>, u64);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.count.set(self.0.count.get() - 1);
        self.0.bytes.set(self.0.bytes.get() - self.1);
        stats::request_ended(self.1);
        if let Some(waiter) = self.0.waiter.take() {
            waiter.wake();
        }
    }
}

impl InFlight {
    /// No requests yet; at most `limit` at once, holding at most `byte_limit` bytes (or one
    /// request of any size alone).
    pub(crate) fn new(limit: usize, byte_limit: u64) -> Rc<InFlight> {
        assert!(limit > 0, "aiocoro-nbd: an in-flight limit must be at least 1");
        Rc::new(InFlight {
            count: Cell::new(0),
            bytes: Cell::new(0),
            limit,
            byte_limit,
            waiter: Cell::new(None),
        })
    }

    /// Counts a new request holding `bytes`. Call [`InFlight::wait_for_room`] first.
    pub(crate) fn start(self: &Rc<InFlight>, bytes: u64) -> Running {
        self.count.set(self.count.get() + 1);
        self.bytes.set(self.bytes.get() + bytes);
        stats::request_started(bytes);
        Running(self.clone(), bytes)
    }

    /// Suspends the (one) reader until a request holding `bytes` fits: fewer than the limit
    /// run, and the bytes fit under the byte limit or nothing runs.
    pub(crate) fn wait_for_room(&self, co: &Co, bytes: u64) {
        self.wait_until(co, || {
            let count = self.count.get();
            count < self.limit && (count == 0 || self.bytes.get() + bytes <= self.byte_limit)
        });
    }

    /// Suspends the (one) reader until no request runs.
    pub(crate) fn wait_idle(&self, co: &Co) {
        self.wait_until(co, || self.count.get() == 0);
    }

    fn wait_until(&self, co: &Co, done: impl Fn() -> bool) {
        while !done() {
            let wait = co.prepare_wait();
            self.waiter.set(Some(wait.local_waker()));
            wait.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aiocoro::aio::AioContext;

    /// Starts a coroutine that waits for room for `bytes` and then records that it passed.
    fn reader(ctx: &AioContext, in_flight: &Rc<InFlight>, bytes: u64) -> Rc<Cell<bool>> {
        let passed = Rc::new(Cell::new(false));
        let (in_flight, flag) = (in_flight.clone(), passed.clone());
        ctx.spawn(move |co| {
            in_flight.wait_for_room(co, bytes);
            flag.set(true);
        });
        passed
    }

    #[test]
    fn the_reader_waits_until_the_count_and_the_bytes_fit() {
        let ctx = AioContext::new().unwrap();
        let in_flight = InFlight::new(2, 100);
        let first = in_flight.start(60);
        // 60 + 50 bytes is over the limit: the reader waits until the first request ends.
        let passed = reader(&ctx, &in_flight, 50);
        while ctx.poll(false) {}
        assert!(!passed.get(), "a request over the byte limit must wait");
        drop(first);
        ctx.wait_while(|| !passed.get());
        // Two small requests reach the count limit.
        let (a, b) = (in_flight.start(1), in_flight.start(1));
        let passed = reader(&ctx, &in_flight, 1);
        while ctx.poll(false) {}
        assert!(!passed.get(), "a request over the count limit must wait");
        drop(a);
        ctx.wait_while(|| !passed.get());
        drop(b);
        // A request larger than the byte limit passes alone.
        let passed = reader(&ctx, &in_flight, 1000);
        ctx.wait_while(|| !passed.get());
        assert_eq!((in_flight.count.get(), in_flight.bytes.get()), (0, 0));
    }
}
