//! The transmission phase: a reader takes requests off the socket in order and runs each in
//! a coroutine of its own, up to [`MAX_IN_FLIGHT`] at once; replies go out whole, in the
//! order requests finish, framed as the option phase settled (simple, structured, or with
//! extended headers: see [`crate::reply`]).

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::IoBuffer;

use crate::block_status::{self, MAX_EXTENTS};
use crate::errors::nbd_errno;
use crate::export::{Export, MAX_REQUEST};
use crate::in_flight::InFlight;
use crate::options::{Session, protocol_error};
use crate::outbox::Outbox;
use crate::reply::{Reply, ReplyMode};
use crate::request::{Request, read_request};
use crate::socket::CoSocket;
use crate::structured_read::read_reply;
use crate::wire;

/// How many requests of one connection run at once; the reader reads no further request
/// while that many run (back-pressure on the client).
pub const MAX_IN_FLIGHT: usize = 32;
/// How many buffer bytes (read data, write payloads) the running requests of one connection
/// hold at most; a request that does not fit waits (one request alone always fits).
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// The buffer `CACHE` reads through, piece by piece.
const CACHE_PIECE: u64 = 1 << 20;

/// What the coroutines of one connection share.
struct Connection<S> {
    stream: S,
    export: Arc<Export>,
    session: Session,
    /// Replies on their way out (whole, several per system call).
    outbox: Outbox,
    in_flight: Rc<InFlight>,
}

/// Serves requests on `stream` (non-blocking) with what the option phase settled
/// (`session`) until the client sends `DISC` or the connection fails; the requests that run
/// are let finish (and answered) before it returns.
///
/// # Errors
///
/// An I/O error (including the client hanging up without `DISC`), a request with a bad
/// magic, or a payload that cannot be skipped (an oversized `WRITE`, a payload on another
/// command: answered with `EINVAL` first): the connection must then be closed.
///
/// # Panics
///
/// If the calling thread has no [`AioContext`] (a coroutine always runs on one).
pub fn serve<S: AsRawFd + 'static>(
    co: &Co,
    stream: S,
    export: Arc<Export>,
    session: Session,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let connection = Rc::new(Connection {
        stream,
        export,
        session,
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
    let mode = connection.session.mode;
    loop {
        let request = read_request(&socket, mode == ReplyMode::Extended)?;
        // What the request's buffer will hold (nothing for one refused before it allocates).
        let bytes = match request.command {
            wire::CMD_READ | wire::CMD_WRITE if request.length <= MAX_REQUEST.into() => {
                request.length
            }
            _ => 0,
        };
        connection.in_flight.wait_for_room(co, bytes);
        let has_payload = request.command == wire::CMD_WRITE
            || (mode == ReplyMode::Extended && request.flags & wire::CMD_FLAG_PAYLOAD_LEN != 0);
        let payload = match request.command {
            wire::CMD_DISC => return Ok(()),
            wire::CMD_WRITE if has_payload && request.length <= MAX_REQUEST.into() => {
                let mut payload = IoBuffer::new(request.length as usize);
                socket.read_exact(&mut payload)?;
                Some(payload)
            }
            _ if has_payload => {
                let message = format!(
                    "a payload of {} bytes on command {} (writes take at most {MAX_REQUEST})",
                    request.length, request.command
                );
                let mut reply = Reply::new(mode, &request);
                reply.status(wire::EINVAL, &message);
                send(co, connection, &reply)?;
                return Err(protocol_error(message));
            }
            _ => None,
        };
        let running = connection.in_flight.start(bytes);
        let connection = connection.clone();
        context.spawn(move |co| {
            let _running = running;
            let reply = execute(co, &connection, &request, payload);
            // A reply that cannot be sent ends nothing here: the reader sees the broken
            // connection on its next read.
            let _ = send(co, &connection, &reply);
        });
    }
}

/// Runs one request; returns its reply.
fn execute<S>(
    co: &Co,
    connection: &Connection<S>,
    request: &Request,
    payload: Option<IoBuffer>,
) -> Reply {
    let (export, session) = (&*connection.export, &connection.session);
    let backend = &export.backend;
    let mut reply = Reply::new(session.mode, request);
    let result = match request.command {
        wire::CMD_READ => return read(co, connection, request),
        wire::CMD_BLOCK_STATUS => return block_status(co, connection, request),
        wire::CMD_WRITE => check_write(export, request, payload_flag(session)).and_then(|()| {
            let payload = payload.expect("the reader reads a write's payload");
            backend.write(co, request.offset, &payload)?;
            flush_if_fua(co, export, request)
        }),
        wire::CMD_FLUSH => check_flags(request, 0).and_then(|()| backend.flush(co)),
        wire::CMD_TRIM => check_write(export, request, 0).and_then(|()| {
            if export.unmap {
                backend.discard(co, request.offset, request.length)?;
            }
            flush_if_fua(co, export, request)
        }),
        wire::CMD_WRITE_ZEROES => {
            let allowed = wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO;
            let checked = check_write(export, request, allowed);
            if checked.is_ok()
                && request.flags & wire::CMD_FLAG_FAST_ZERO != 0
                && !backend.can_zero_fast(request.offset, request.length)
            {
                // Fails at once, having changed nothing: the client writes zeroes itself.
                reply.status(wire::ENOTSUP, "zeroing this range would not be fast");
                return reply;
            }
            checked.and_then(|()| {
                let may_unmap = export.unmap && request.flags & wire::CMD_FLAG_NO_HOLE == 0;
                backend.write_zeroes(co, request.offset, request.length, may_unmap)?;
                flush_if_fua(co, export, request)
            })
        }
        wire::CMD_CACHE => check_flags(request, 0)
            .and_then(|()| check_range(export, request))
            .and_then(|()| cache(co, export, request)),
        command => Err(invalid(format!("command {command}"))),
    };
    match result {
        Ok(()) => reply.status(0, ""),
        Err(error) => reply.status(nbd_errno(&error), &error.to_string()),
    }
    reply
}

/// `PAYLOAD_LEN`, which a `WRITE` may carry once extended headers are negotiated.
fn payload_flag(session: &Session) -> u16 {
    if session.mode == ReplyMode::Extended { wire::CMD_FLAG_PAYLOAD_LEN } else { 0 }
}

/// Runs a `READ`: a simple reply with the data, or structured chunks (holes and data, one
/// data chunk with `DF`) once negotiated.
fn read<S>(co: &Co, connection: &Connection<S>, request: &Request) -> Reply {
    let export = &*connection.export;
    let mode = connection.session.mode;
    let allowed = if mode == ReplyMode::Simple { 0 } else { wire::CMD_FLAG_DF };
    let mut reply = Reply::new(mode, request);
    if let Err(error) = check_flags(request, allowed).and_then(|()| check_range(export, request)) {
        reply.status(nbd_errno(&error), &error.to_string());
        return reply;
    }
    if mode != ReplyMode::Simple {
        return read_reply(co, &export.backend, mode, request);
    }
    let mut buffer = IoBuffer::new(request.length as usize);
    match export.backend.read(co, request.offset, &mut buffer) {
        Ok(()) => reply.simple(0, Some(buffer)),
        Err(error) => reply.simple(nbd_errno(&error), None),
    }
    reply
}

/// Runs a `BLOCK_STATUS`: one chunk per selected context (`REQ_ONE`: one extent each), or
/// `EINVAL` if none was selected.
fn block_status<S>(co: &Co, connection: &Connection<S>, request: &Request) -> Reply {
    let (export, session) = (&*connection.export, &connection.session);
    let mut reply = Reply::new(session.mode, request);
    let checked = check_flags(request, wire::CMD_FLAG_REQ_ONE)
        .and_then(|()| match session.contexts.is_empty() {
            true => Err(invalid("block status without a selected metadata context".into())),
            false => Ok(()),
        })
        .and_then(|()| match request.length {
            0 => Err(invalid("block status of an empty range".into())),
            _ => check_range(export, request),
        });
    if let Err(error) = checked {
        reply.status(nbd_errno(&error), &error.to_string());
        return reply;
    }
    let max_extents = if request.flags & wire::CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
    for (index, &context) in session.contexts.iter().enumerate() {
        let extents = block_status::extents(
            co,
            &export.backend,
            context,
            request.offset,
            request.length,
            max_extents,
        );
        match extents {
            Ok(extents) => {
                let last = index + 1 == session.contexts.len();
                let flags = if last { wire::REPLY_FLAG_DONE } else { 0 };
                block_status::add_chunk(&mut reply, flags, context, &extents);
            }
            Err(error) => {
                let mut reply = Reply::new(session.mode, request);
                reply.status(nbd_errno(&error), &error.to_string());
                return reply;
            }
        }
    }
    reply
}

/// Runs a `CACHE`: reads the range through the block layer (which loads its metadata and,
/// without `O_DIRECT`, the page cache) piece by piece, keeping nothing.
fn cache(co: &Co, export: &Export, request: &Request) -> io::Result<()> {
    let mut buffer = IoBuffer::new(request.length.min(CACHE_PIECE) as usize);
    let mut done = 0;
    while done < request.length {
        let piece = (request.length - done).min(CACHE_PIECE) as usize;
        export.backend.read(co, request.offset + done, &mut buffer[..piece])?;
        done += piece as u64;
    }
    Ok(())
}

/// Checks a request that modifies the export: flags within `allowed` (and `FUA`), a writable
/// export (`EPERM`), and a range inside the export.
fn check_write(export: &Export, request: &Request, allowed: u16) -> io::Result<()> {
    check_flags(request, allowed)?;
    if export.read_only {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the export is read-only"));
    }
    check_range(export, request)
}

/// Refuses flags outside `allowed` and `FUA` (`EINVAL`). `FUA` is accepted on every command:
/// the server advertises `SEND_FUA`, and then "MUST accept all commands with this bit set (even
/// by ignoring the bit)", as clients set it on commands that write nothing (QEMU 2.x on
/// `FLUSH`). Where the command writes, [`flush_if_fua`] honours it.
fn check_flags(request: &Request, allowed: u16) -> io::Result<()> {
    match request.flags & !(allowed | wire::CMD_FLAG_FUA) {
        0 => Ok(()),
        unknown => Err(invalid(format!("flags {unknown:#x} on command {}", request.command))),
    }
}

/// Refuses a request over the maximum size (reads and caches: writes are refused before
/// their payload) or past the end of the export (`EINVAL`).
fn check_range(export: &Export, request: &Request) -> io::Result<()> {
    let sized = matches!(request.command, wire::CMD_READ | wire::CMD_CACHE);
    if sized && request.length > MAX_REQUEST.into() {
        return Err(invalid(format!(
            "{} bytes in one request (at most {MAX_REQUEST})",
            request.length
        )));
    }
    match request.end() {
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
fn flush_if_fua(co: &Co, export: &Export, request: &Request) -> io::Result<()> {
    if request.flags & wire::CMD_FLAG_FUA != 0 { export.backend.flush(co) } else { Ok(()) }
}

/// An `InvalidInput` error (`EINVAL` on the wire) about a request.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("invalid NBD request: {message}"))
}

/// Sends `reply` whole (no other reply's bytes come between its segments) through the
/// connection's outbox: queued with the other small replies of this loop round, or written
/// at once.
fn send<S: AsRawFd + 'static>(
    co: &Co,
    connection: &Rc<Connection<S>>,
    reply: &Reply,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let socket = CoSocket::new(co, &connection.stream);
    let mut parts: Vec<IoSlice<'_>> =
        reply.segments().iter().map(|segment| IoSlice::new(segment.bytes())).collect();
    connection.outbox.send(co, &socket, &mut parts, || {
        let connection = connection.clone();
        let context = AioContext::current().expect("aiocoro-nbd: a connection runs in a context");
        context.spawn(move |co| {
            // A broken connection is seen by the reader on its next read.
            let _ = connection.outbox.flush(co, &CoSocket::new(co, &connection.stream));
        });
    })
}
