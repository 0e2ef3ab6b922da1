//! Transmission requests as they come off the wire: the compact header (32-bit length) or,
//! once extended headers are negotiated, the extended one (64-bit length).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use crate::options::protocol_error;
use crate::socket::CoSocket;
use crate::wire;

/// One request's header (the payload of a `WRITE` follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`NBD_CMD_*`).
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Where in the export.
    pub offset: u64,
    /// How many bytes (32 bits unless extended headers are negotiated).
    pub length: u64,
}

impl Request {
    /// The end of the range, if it does not overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// Reads one request header, extended (32 bytes) if `extended`, else compact (28 bytes).
///
/// # Errors
///
/// An I/O error, or a header with the wrong magic for the negotiated headers (a protocol
/// violation: the connection must then be closed).
pub fn read_request<S: AsRawFd>(socket: &CoSocket<'_, S>, extended: bool) -> io::Result<Request>
where
    for<'s> &'s S: Read + Write,
{
    let mut header = [0u8; 32];
    let size = if extended { 32 } else { 28 };
    socket.read_exact(&mut header[..size])?;
    parse_request(&header[..size])
}

/// Parses a compact (28 bytes) or extended (32 bytes) request header.
fn parse_request(header: &[u8]) -> io::Result<Request> {
    let u16_at = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let u32_at = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (expected, length) = match header.len() {
        32 => (wire::EXTENDED_REQUEST_MAGIC, u64_at(24)),
        28 => (wire::REQUEST_MAGIC, u32_at(24).into()),
        other => unreachable!("aiocoro-nbd: a request header has 28 or 32 bytes, not {other}"),
    };
    let magic = u32_at(0);
    if magic != expected {
        return Err(protocol_error(format!(
            "request with magic {magic:#x} where {expected:#x} was negotiated"
        )));
    }
    Ok(Request {
        flags: u16_at(4),
        command: u16_at(6),
        cookie: u64_at(8),
        offset: u64_at(16),
        length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_extended_headers_parse_and_refuse_the_other_magic() {
        let mut compact = wire::REQUEST_MAGIC.to_be_bytes().to_vec();
        compact.extend_from_slice(&[0, 1, 0, 2]);
        compact.extend_from_slice(&7u64.to_be_bytes());
        compact.extend_from_slice(&4096u64.to_be_bytes());
        compact.extend_from_slice(&512u32.to_be_bytes());
        let request = parse_request(&compact).unwrap();
        assert_eq!(request, Request { flags: 1, command: 2, cookie: 7, offset: 4096, length: 512 });
        let mut extended = wire::EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        extended.extend_from_slice(&compact[4..24]);
        extended.extend_from_slice(&(5u64 << 32).to_be_bytes());
        assert_eq!(parse_request(&extended).unwrap().length, 5 << 32);
        // Each header with the other mode's magic is a violation.
        extended[..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        assert!(parse_request(&extended).is_err());
        compact[..4].copy_from_slice(&wire::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert!(parse_request(&compact).is_err());
    }
}
