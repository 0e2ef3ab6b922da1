//! One client connection from greeting to close.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use aiocoro::coroutine::Co;

use crate::export::Export;
use crate::handshake::handshake;
use crate::options::{Negotiated, negotiate};
use crate::socket::CoSocket;
use crate::transmission;

/// Serves one client on `stream` (non-blocking) from the coroutine `co`: handshake, option
/// haggling, then requests until `DISC`. Returns when the connection is over; the caller
/// closes the stream.
///
/// # Errors
///
/// An I/O error or a protocol violation by the client, which ends this connection only.
pub fn serve_connection<S: AsRawFd>(co: &Co, stream: &S, export: &Export) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let socket = CoSocket::new(co, stream);
    let flags = handshake(&socket)?;
    match negotiate(&socket, export, flags.no_zeroes)? {
        Negotiated::Transmission => transmission::serve(co, &socket, export),
        Negotiated::Aborted => Ok(()),
    }
}
