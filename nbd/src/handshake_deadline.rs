//! The handshake limit: a connection whose client has not finished the handshake by a
//! deadline is shut down, so that a client that connects and stalls cannot hold the server
//! (and a slot of its connection limit) for ever (QEMU's `--handshake-limit`).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use aiocoro::aio::{AioContext, Timer};

/// A deadline armed on one connection's socket; dropping it disarms it.
pub(crate) struct HandshakeDeadline {
    /// Removed from the context when dropped: its callback never runs after that.
    _timer: Timer,
    expired: Rc<Cell<bool>>,
}

impl HandshakeDeadline {
    /// Shuts the socket `fd` down in both directions once `limit` has passed, unless dropped
    /// first: the handshake's pending and later reads and writes then fail.
    ///
    /// # Safety
    ///
    /// `fd` is a socket the caller owns, and stays open while the deadline lives (otherwise
    /// the timer could shut down whatever the number names by then).
    ///
    /// # Panics
    ///
    /// If the calling thread has no [`AioContext`] (the timer needs one).
    pub(crate) unsafe fn arm(fd: RawFd, limit: Duration) -> HandshakeDeadline {
        let context = AioContext::current().expect(
            "aiocoro-nbd: a handshake limit needs an AioContext on the connection's thread (for its \
             timer); serve the connection from a coroutine of a context",
        );
        let expired = Rc::new(Cell::new(false));
        let flag = expired.clone();
        let timer = context.new_timer(move || {
            flag.set(true);
            // SAFETY: shutdown only changes the state of the socket `fd` names, which stays
            // open while this deadline (and so its timer) lives (the contract of `arm`); it frees
            // and touches no memory. Its error (the client already gone) needs nothing.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        });
        timer.arm_after(limit);
        HandshakeDeadline { _timer: timer, expired }
    }

    /// Whether the deadline passed (and the socket was shut down).
    pub(crate) fn expired(&self) -> bool {
        self.expired.get()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use super::*;

    #[test]
    fn arming_without_a_context_panics_naming_what_it_needs() {
        let (socket, _peer) = UnixStream::pair().unwrap();
        let panic = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `socket` stays open for longer than the deadline, which is dropped at once
            // (if arming makes one at all).
            drop(unsafe { HandshakeDeadline::arm(socket.as_raw_fd(), Duration::from_secs(1)) })
        }))
        .expect_err("armed without an AioContext");
        assert_eq!(
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or(panic.downcast_ref::<&str>().copied()),
            Some(
                "aiocoro-nbd: a handshake limit needs an AioContext on the connection's thread \
                 (for its timer); serve the connection from a coroutine of a context"
            )
        );
    }
}
