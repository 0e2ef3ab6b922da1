//! The newstyle handshake: the server's greeting (fixed newstyle offered) and the client's
//! flags.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use crate::options::protocol_error;
use crate::socket::CoSocket;
use crate::wire;

/// What the client asked for in its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle: it may send any option and reads error replies.
    /// Without it, `EXPORT_NAME` is the only option it may send (old clients).
    pub fixed_newstyle: bool,
    /// Leave out the 124 zero bytes after `EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Greets the client and reads its flags.
///
/// # Errors
///
/// An I/O error, or client flags with unknown bits (the protocol says to close the
/// connection then).
pub fn handshake<S: AsRawFd>(socket: &CoSocket<'_, S>) -> io::Result<ClientFlags>
where
    for<'s> &'s S: Read + Write,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&wire::INIT_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&wire::OPTION_MAGIC.to_be_bytes());
    let flags = wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES;
    greeting[16..18].copy_from_slice(&flags.to_be_bytes());
    socket.write_all(&greeting)?;
    let client = socket.read_u32()?;
    let known = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    if client & !known != 0 {
        return Err(protocol_error(format!("client flags {client:#x}")));
    }
    Ok(ClientFlags {
        fixed_newstyle: client & wire::CLIENT_FIXED_NEWSTYLE != 0,
        no_zeroes: client & wire::CLIENT_NO_ZEROES != 0,
    })
}
