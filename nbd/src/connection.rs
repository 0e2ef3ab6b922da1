//! One client connection from greeting to close.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use aiocoro::coroutine::Co;

use crate::export::Export;
use crate::handshake::handshake;
use crate::handshake_deadline::HandshakeDeadline;
use crate::options::{Negotiated, negotiate};
use crate::socket::CoSocket;
use crate::stats::ConnectionCount;
use crate::transmission;

/// Serves one client on `stream` (non-blocking) from the coroutine `co`: handshake, option
/// haggling, then requests until `DISC` (see [`transmission::serve`]). Returns when the
/// connection is over, with the stream closed. A client that has not chosen an export (or
/// aborted) within `handshake_limit` of the greeting is disconnected (`None`: no limit).
/// `on_transmission` is called when the client has chosen the export, before its first
/// request; it is never called for a client that aborts or fails the handshake (a server that
/// ends after its client, as `qemu-nbd` without `-t`, counts only clients that got this far).
///
/// # Errors
///
/// An I/O error or a protocol violation by the client, which ends this connection only;
/// `TimedOut` if the handshake took longer than `handshake_limit`.
///
/// # Panics
///
/// With a `handshake_limit`, if the calling thread has no
/// [`AioContext`](aiocoro::aio::AioContext) (the limit's timer needs one).
pub fn serve_connection<S: AsRawFd + 'static>(
    co: &Co,
    stream: S,
    export: Arc<Export>,
    handshake_limit: Option<Duration>,
    on_transmission: impl FnOnce(),
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let _count = ConnectionCount::new();
    let negotiated = {
        let socket = CoSocket::new(co, &stream);
        // SAFETY: `stream` owns the socket and outlives `deadline`, which this block drops.
        let deadline = handshake_limit
            .map(|limit| (unsafe { HandshakeDeadline::arm(stream.as_raw_fd(), limit) }, limit));
        let negotiated = handshake(&socket).and_then(|flags| negotiate(&socket, &export, flags));
        match (negotiated, &deadline) {
            (Err(_), Some((deadline, limit))) if deadline.expired() => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client did not finish the handshake within {} s",
                        limit.as_secs_f64()
                    ),
                ));
            }
            (negotiated, _) => negotiated?,
        }
    };
    match negotiated {
        Negotiated::Transmission(session) => {
            on_transmission();
            transmission::serve(co, stream, export, session)
        }
        Negotiated::Aborted => Ok(()),
    }
}
