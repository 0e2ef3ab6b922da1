//! The transmission phase: requests read one at a time, each answered with a simple reply.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use aiocoro::coroutine::Co;
use aiocoro_block::IoBuffer;

use crate::errors::nbd_errno;
use crate::export::{Export, MAX_REQUEST};
use crate::options::protocol_error;
use crate::socket::CoSocket;
use crate::wire;

/// One request's header (the payload of a `WRITE` follows it on the wire).
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

/// Serves requests on `socket` until the client sends `DISC`.
///
/// # Errors
///
/// An I/O error (including the client hanging up without `DISC`), a request with a bad
/// magic, or an oversized `WRITE` (answered with `EINVAL` first, as its payload cannot be
/// skipped in reasonable time): the connection must then be closed.
pub fn serve<S: AsRawFd>(co: &Co, socket: &CoSocket<'_, S>, export: &Export) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    loop {
        let request = read_request(socket)?;
        if request.command == wire::CMD_DISC {
            return Ok(());
        }
        if request.command == wire::CMD_WRITE {
            write(co, socket, export, request)?;
            continue;
        }
        match request.command {
            wire::CMD_READ => read(co, socket, export, request)?,
            wire::CMD_FLUSH => {
                let result = check_flags(request, 0).and_then(|()| export.backend.flush(co));
                send_reply(socket, request, result, &[])?;
            }
            wire::CMD_TRIM => {
                let result = check_write(export, request, wire::CMD_FLAG_FUA).and_then(|()| {
                    export.backend.discard(co, request.offset, request.length.into())?;
                    flush_if_fua(co, export, request)
                });
                send_reply(socket, request, result, &[])?;
            }
            wire::CMD_WRITE_ZEROES => {
                let allowed = wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE;
                let result = check_write(export, request, allowed).and_then(|()| {
                    let may_unmap = request.flags & wire::CMD_FLAG_NO_HOLE == 0;
                    let length = request.length.into();
                    export.backend.write_zeroes(co, request.offset, length, may_unmap)?;
                    flush_if_fua(co, export, request)
                });
                send_reply(socket, request, result, &[])?;
            }
            command => {
                send_reply(socket, request, Err(invalid(format!("command {command}"))), &[])?
            }
        }
    }
}

/// Reads one request header; a bad magic is a protocol violation.
fn read_request<S: AsRawFd>(socket: &CoSocket<'_, S>) -> io::Result<Request>
where
    for<'s> &'s S: Read + Write,
{
    let mut header = [0u8; 28];
    socket.read_exact(&mut header)?;
    let magic = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != wire::REQUEST_MAGIC {
        return Err(protocol_error(format!("request with bad magic {magic:#x}")));
    }
    Ok(Request {
        flags: u16::from_be_bytes(header[4..6].try_into().expect("2 bytes")),
        command: u16::from_be_bytes(header[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(header[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(header[24..28].try_into().expect("4 bytes")),
    })
}

/// Serves a `READ`.
fn read<S: AsRawFd>(
    co: &Co,
    socket: &CoSocket<'_, S>,
    export: &Export,
    request: Request,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let checked = check_flags(request, 0).and_then(|()| check_range(export, request));
    if let Err(error) = checked {
        return send_reply(socket, request, Err(error), &[]);
    }
    let mut buffer = IoBuffer::new(request.length as usize);
    match export.backend.read(co, request.offset, &mut buffer) {
        Ok(()) => send_reply(socket, request, Ok(()), &buffer),
        Err(error) => send_reply(socket, request, Err(error), &[]),
    }
}

/// Serves a `WRITE`: reads its payload (an oversized one is refused and ends the connection)
/// and writes it.
fn write<S: AsRawFd>(
    co: &Co,
    socket: &CoSocket<'_, S>,
    export: &Export,
    request: Request,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    if request.length > MAX_REQUEST {
        let error = invalid(format!("write of {} bytes", request.length));
        send_reply(socket, request, Err(error), &[])?;
        return Err(protocol_error(format!("write payload of {} bytes", request.length)));
    }
    let mut buffer = IoBuffer::new(request.length as usize);
    socket.read_exact(&mut buffer)?;
    let result = check_write(export, request, wire::CMD_FLAG_FUA).and_then(|()| {
        export.backend.write(co, request.offset, &buffer)?;
        flush_if_fua(co, export, request)
    });
    send_reply(socket, request, result, &[])
}

/// Checks a request that modifies the export: flags within `allowed`, a writable export
/// (`EPERM`), and a range inside the export.
fn check_write(export: &Export, request: Request, allowed: u16) -> io::Result<()> {
    check_flags(request, allowed)?;
    if export.read_only {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the export is read-only"));
    }
    check_range(export, request)
}

/// Refuses flags outside `allowed` (`EINVAL`).
fn check_flags(request: Request, allowed: u16) -> io::Result<()> {
    match request.flags & !allowed {
        0 => Ok(()),
        unknown => Err(invalid(format!("flags {unknown:#x} on command {}", request.command))),
    }
}

/// Refuses a request over the maximum size or past the end of the export (`EINVAL`).
fn check_range(export: &Export, request: Request) -> io::Result<()> {
    let end = request.offset.checked_add(request.length.into());
    if request.length > MAX_REQUEST && request.command == wire::CMD_READ {
        return Err(invalid(format!("read of {} bytes", request.length)));
    }
    match end {
        Some(end) if end <= export.size() => Ok(()),
        _ => Err(invalid(format!(
            "{} bytes at offset {} past the end ({} bytes)",
            request.length,
            request.offset,
            export.size()
        ))),
    }
}

/// Flushes the export if the request carries `FUA`.
fn flush_if_fua(co: &Co, export: &Export, request: Request) -> io::Result<()> {
    if request.flags & wire::CMD_FLAG_FUA != 0 { export.backend.flush(co) } else { Ok(()) }
}

/// An `InvalidInput` error (`EINVAL` on the wire) about a request.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("invalid NBD request: {message}"))
}

/// Sends the simple reply to `request`: the error value of `result`, and `data` on success.
fn send_reply<S: AsRawFd>(
    socket: &CoSocket<'_, S>,
    request: Request,
    result: io::Result<()>,
    data: &[u8],
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let error = match &result {
        Ok(()) => 0,
        Err(error) => nbd_errno(error),
    };
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&error.to_be_bytes());
    header[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    socket.write_all(&header)?;
    if error == 0 { socket.write_all(data) } else { Ok(()) }
}
