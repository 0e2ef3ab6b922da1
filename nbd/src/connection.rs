//! One client connection from greeting to close.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use aiocoro::coroutine::Co;

use crate::export::Export;
use crate::handshake::handshake;
use crate::options::{Negotiated, negotiate};
use crate::socket::CoSocket;
use crate::stats::ConnectionCount;
use crate::transmission;

/// Serves one client on `stream` (non-blocking) from the coroutine `co`: handshake, option
/// haggling, then requests until `DISC` (see [`transmission::serve`]). Returns when the
/// connection is over, with the stream closed.
///
/// # Errors
///
/// An I/O error or a protocol violation by the client, which ends this connection only.
pub fn serve_connection<S: AsRawFd + 'static>(
    co: &Co,
    stream: S,
    export: Arc<Export>,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let _count = ConnectionCount::new();
    let negotiated = {
        let socket = CoSocket::new(co, &stream);
        let flags = handshake(&socket)?;
        negotiate(&socket, &export, flags.no_zeroes)?
    };
    match negotiated {
        Negotiated::Transmission(session) => transmission::serve(co, stream, export, session),
        Negotiated::Aborted => Ok(()),
    }
}
