//! The transmission phase: a reader takes requests off the socket in order and runs each in
//! a coroutine of its own, up to [`MAX_IN_FLIGHT`] at once; replies go out whole, in the
//! order requests finish, as simple replies.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::IoBuffer;

use crate::errors::nbd_errno;
use crate::export::{Export, MAX_REQUEST};
use crate::in_flight::InFlight;
use crate::options::protocol_error;
use crate::outbox::Outbox;
use crate::socket::CoSocket;
use crate::wire;

/// How many requests of one connection run at once; the reader reads no further request
/// while that many run (back-pressure on the client).
pub const MAX_IN_FLIGHT: usize = 32;
/// How many buffer bytes (read data, write payloads) the running requests of one connection
/// hold at most; a request that does not fit waits (one request alone always fits).
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;

/// One request's header (the payload of a `WRITE` follows it on the wire).
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

/// What the coroutines of one connection share.
struct Connection<S> {
    stream: S,
    export: Arc<Export>,
    /// Replies on their way out (whole, several per system call).
    outbox: Outbox,
    in_flight: Rc<InFlight>,
}

/// Serves requests on `stream` (non-blocking) until the client sends `DISC` or the
/// connection fails; the requests that run are let finish (and answered) before it returns.
///
/// # Errors
///
/// An I/O error (including the client hanging up without `DISC`), a request with a bad
/// magic, or an oversized `WRITE` (answered with `EINVAL` first, as its payload cannot be
/// skipped in reasonable time): the connection must then be closed.
///
/// # Panics
///
/// If the calling thread has no [`AioContext`] (a coroutine always runs on one).
pub fn serve<S: AsRawFd + 'static>(co: &Co, stream: S, export: Arc<Export>) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let connection = Rc::new(Connection {
        stream,
        export,
        outbox: Outbox::new(),
        in_flight: InFlight::new(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES),
    });
    let result = read_requests(co, &connection);
    connection.in_flight.wait_idle(co);
    // The replies still queued go out before the connection closes.
    let flushed = connection.outbox.flush(co, &CoSocket::new(co, &connection.stream));
    result.and(flushed)
}

/// The reader: reads requests (and write payloads) and starts a coroutine for each.
fn read_requests<S: AsRawFd + 'static>(co: &Co, connection: &Rc<Connection<S>>) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let context = AioContext::current().expect("aiocoro-nbd: a connection runs in an AioContext");
    let socket = CoSocket::with_read_ahead(co, &connection.stream);
    loop {
        let request = read_request(&socket)?;
        // What the request's buffer will hold (nothing for one refused before it allocates).
        let bytes = match request.command {
            wire::CMD_READ | wire::CMD_WRITE if request.length <= MAX_REQUEST => request.length,
            _ => 0,
        };
        connection.in_flight.wait_for_room(co, bytes.into());
        let payload = match request.command {
            wire::CMD_DISC => return Ok(()),
            wire::CMD_WRITE if request.length > MAX_REQUEST => {
                let error = invalid(format!("write of {} bytes", request.length));
                send_reply(co, connection, request, Err(error), &[])?;
                return Err(protocol_error(format!("write payload of {} bytes", request.length)));
            }
            wire::CMD_WRITE => {
                let mut payload = IoBuffer::new(request.length as usize);
                socket.read_exact(&mut payload)?;
                Some(payload)
            }
            _ => None,
        };
        let running = connection.in_flight.start(bytes.into());
        let connection = connection.clone();
        context.spawn(move |co| {
            let _running = running;
            let (result, data) = execute(co, &connection.export, request, payload);
            // A reply that cannot be sent ends nothing here: the reader sees the broken
            // connection on its next read.
            let _ = send_reply(co, &connection, request, result, data.as_deref().unwrap_or(&[]));
        });
    }
}

/// Runs one request; returns its result and, for a read, the data.
fn execute(
    co: &Co,
    export: &Export,
    request: Request,
    payload: Option<IoBuffer>,
) -> (io::Result<()>, Option<IoBuffer>) {
    let backend = &export.backend;
    let result = match request.command {
        wire::CMD_READ => return read(co, export, request),
        wire::CMD_WRITE => check_write(export, request, wire::CMD_FLAG_FUA).and_then(|()| {
            let payload = payload.expect("the reader reads a write's payload");
            backend.write(co, request.offset, &payload)?;
            flush_if_fua(co, export, request)
        }),
        wire::CMD_FLUSH => check_flags(request, 0).and_then(|()| backend.flush(co)),
        wire::CMD_TRIM => check_write(export, request, wire::CMD_FLAG_FUA).and_then(|()| {
            if export.unmap {
                backend.discard(co, request.offset, request.length.into())?;
            }
            flush_if_fua(co, export, request)
        }),
        wire::CMD_WRITE_ZEROES => {
            let allowed = wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE;
            check_write(export, request, allowed).and_then(|()| {
                let may_unmap = export.unmap && request.flags & wire::CMD_FLAG_NO_HOLE == 0;
                backend.write_zeroes(co, request.offset, request.length.into(), may_unmap)?;
                flush_if_fua(co, export, request)
            })
        }
        command => Err(invalid(format!("command {command}"))),
    };
    (result, None)
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

/// Runs a `READ`; returns its result and the data read.
fn read(co: &Co, export: &Export, request: Request) -> (io::Result<()>, Option<IoBuffer>) {
    if let Err(error) = check_flags(request, 0).and_then(|()| check_range(export, request)) {
        return (Err(error), None);
    }
    let mut buffer = IoBuffer::new(request.length as usize);
    match export.backend.read(co, request.offset, &mut buffer) {
        Ok(()) => (Ok(()), Some(buffer)),
        Err(error) => (Err(error), None),
    }
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

/// Sends the simple reply to `request`, whole: the error value of `result`, and `data` on
/// success.
fn send_reply<S: AsRawFd + 'static>(
    co: &Co,
    connection: &Rc<Connection<S>>,
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
    let socket = CoSocket::new(co, &connection.stream);
    let data = if error == 0 { data } else { &[] };
    let parts = &mut [IoSlice::new(&header), IoSlice::new(data)];
    connection.outbox.send(co, &socket, parts, || {
        let connection = connection.clone();
        let context = AioContext::current().expect("aiocoro-nbd: a connection runs in a context");
        context.spawn(move |co| {
            // A broken connection is seen by the reader on its next read.
            let _ = connection.outbox.flush(co, &CoSocket::new(co, &connection.stream));
        });
    })
}
