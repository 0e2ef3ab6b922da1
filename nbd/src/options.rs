//! The option haggling phase: the client's options, one at a time, until one starts
//! transmission (`EXPORT_NAME`, `GO`) or ends the connection (`ABORT`).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use crate::export::{Export, MAX_REQUEST, PREFERRED_BLOCK};
use crate::handshake::ClientFlags;
use crate::meta_context::{MetaContext, MetaRequest};
use crate::reply::ReplyMode;
use crate::socket::CoSocket;
use crate::wire;

/// The largest option payload read into memory. A longer one is answered with
/// `NBD_REP_ERR_TOO_BIG` (unless it is an `EXPORT_NAME`, which has no error reply, or the
/// client lacks fixed newstyle) and the connection closed (its payload is never read, so
/// nothing is allocated by the client's say-so). The protocol caps names at 4096 bytes.
pub const MAX_OPTION_LENGTH: u32 = 16 * 1024;

/// What the option phase settled for the transmission phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// How requests and replies are framed (`STRUCTURED_REPLY`, `EXTENDED_HEADERS`).
    pub mode: ReplyMode,
    /// The metadata contexts `BLOCK_STATUS` reports (`SET_META_CONTEXT`), in id order.
    pub contexts: Vec<MetaContext>,
}

/// How the option phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// The client chose the export: transmission starts with what was settled.
    Transmission(Session),
    /// The client sent `ABORT`: the connection ends.
    Aborted,
}

/// Runs the option phase on `socket` for `export`, with what the client's `flags` asked for
/// (see [`handshake`](crate::handshake::handshake)).
///
/// # Errors
///
/// An I/O error, a bad option magic, an unknown name in `EXPORT_NAME` (which has no error
/// reply) or an `EXPORT_NAME` after `EXTENDED_HEADERS` (which the protocol forbids), an
/// oversized option, or, from a client without fixed newstyle, any option but
/// `EXPORT_NAME` (such a client reads no error replies, as in qemu-nbd): the connection must
/// then be closed.
///
/// # Panics
///
/// If the calling thread has no [`AioContext`](aiocoro::aio::AioContext): between options
/// the negotiation lets the context's other coroutines run.
pub fn negotiate<S: AsRawFd>(
    socket: &CoSocket<'_, S>,
    export: &Export,
    flags: ClientFlags,
) -> io::Result<Negotiated>
where
    for<'s> &'s S: Read + Write,
{
    let mut session = Session { mode: ReplyMode::Simple, contexts: Vec::new() };
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            // A client that pipelines options, reading the replies as they come, may never
            // make this loop wait: its turn ends with each option, so that it cannot hold
            // the thread's other connections up.
            socket.let_others_run();
        }
        let magic = socket.read_u64()?;
        if magic != wire::OPTION_MAGIC {
            return Err(protocol_error(format!("option with bad magic {magic:#x}")));
        }
        let option = socket.read_u32()?;
        let length = socket.read_u32()?;
        if !flags.fixed_newstyle && option != wire::OPT_EXPORT_NAME {
            return Err(protocol_error(format!(
                "option {option} from a client without fixed newstyle, which may only send \
                 EXPORT_NAME"
            )));
        }
        if length > MAX_OPTION_LENGTH {
            // EXPORT_NAME has no error reply, and a client without fixed newstyle reads none.
            if flags.fixed_newstyle && option != wire::OPT_EXPORT_NAME {
                reply(socket, option, wire::REP_ERR_TOO_BIG, b"option payload too large")?;
            }
            return Err(protocol_error(format!("option {option} of {length} bytes")));
        }
        let mut payload = vec![0; length as usize];
        socket.read_exact(&mut payload)?;
        match option {
            wire::OPT_EXPORT_NAME => {
                if payload != export.name.as_bytes() {
                    return Err(protocol_error("EXPORT_NAME of an unknown export".into()));
                }
                if session.mode == ReplyMode::Extended {
                    // The client MUST NOT: which headers it would send is unclear, and the
                    // option has no error reply.
                    return Err(protocol_error("EXPORT_NAME after EXTENDED_HEADERS".into()));
                }
                let mut answer = Vec::with_capacity(10 + 124);
                answer.extend_from_slice(&export.size().to_be_bytes());
                answer.extend_from_slice(&export.transmission_flags(session.mode).to_be_bytes());
                if !flags.no_zeroes {
                    answer.resize(answer.len() + 124, 0);
                }
                socket.write_all(&answer)?;
                return Ok(Negotiated::Transmission(session));
            }
            wire::OPT_ABORT => {
                // The client may already be gone: its hang-up is no error here.
                let _ = reply(socket, option, wire::REP_ACK, &[]);
                return Ok(Negotiated::Aborted);
            }
            wire::OPT_LIST => {
                if !payload.is_empty() {
                    reply(socket, option, wire::REP_ERR_INVALID, b"LIST takes no payload")?;
                    continue;
                }
                let mut server = Vec::with_capacity(4 + export.name.len());
                server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                server.extend_from_slice(export.name.as_bytes());
                server.extend_from_slice(export.description.as_bytes());
                reply(socket, option, wire::REP_SERVER, &server)?;
                reply(socket, option, wire::REP_ACK, &[])?;
            }
            wire::OPT_INFO | wire::OPT_GO => {
                if info(socket, option, &payload, export, session.mode)? && option == wire::OPT_GO {
                    return Ok(Negotiated::Transmission(session));
                }
            }
            wire::OPT_STRUCTURED_REPLY | wire::OPT_EXTENDED_HEADERS => {
                let wanted = match option {
                    wire::OPT_STRUCTURED_REPLY => ReplyMode::Structured,
                    _ => ReplyMode::Extended,
                };
                if !payload.is_empty() {
                    reply(socket, option, wire::REP_ERR_INVALID, b"the option takes no payload")?;
                } else if session.mode > wanted {
                    let message = b"extended headers already negotiated (and take precedence)";
                    reply(socket, option, wire::REP_ERR_EXT_HEADER_REQD, message)?;
                } else if session.mode == wanted {
                    reply(socket, option, wire::REP_ERR_INVALID, b"already negotiated")?;
                } else {
                    session.mode = wanted;
                    reply(socket, option, wire::REP_ACK, &[])?;
                }
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                meta_context(socket, option, &payload, export, &mut session)?;
            }
            _ => reply(socket, option, wire::REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Answers `LIST_META_CONTEXT` (the contexts the queries match, id 0) or
/// `SET_META_CONTEXT` (selects them, with their ids, replacing any earlier selection; a
/// failed `SET` selects nothing). Both need structured replies first.
fn meta_context<S: AsRawFd>(
    socket: &CoSocket<'_, S>,
    option: u32,
    payload: &[u8],
    export: &Export,
    session: &mut Session,
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let listing = option == wire::OPT_LIST_META_CONTEXT;
    if !listing {
        session.contexts.clear();
    }
    if session.mode == ReplyMode::Simple {
        let message = b"metadata contexts need structured replies first";
        return reply(socket, option, wire::REP_ERR_INVALID, message);
    }
    let Some(request) = MetaRequest::parse(payload) else {
        return reply(socket, option, wire::REP_ERR_INVALID, b"malformed meta context payload");
    };
    if request.export != export.name.as_bytes() {
        return reply(socket, option, wire::REP_ERR_UNKNOWN, b"no export of that name");
    }
    let contexts = request.contexts(listing);
    for &context in &contexts {
        let id = if listing { 0 } else { context.id() };
        let mut data = id.to_be_bytes().to_vec();
        data.extend_from_slice(context.name().as_bytes());
        reply(socket, option, wire::REP_META_CONTEXT, &data)?;
    }
    if !listing {
        session.contexts = contexts;
    }
    reply(socket, option, wire::REP_ACK, &[])
}

/// Answers an `INFO` or `GO` whose payload is `payload`; returns whether the export was
/// described (the request was valid and named our export). The transmission flags depend
/// on the reply `mode` negotiated so far.
fn info<S: AsRawFd>(
    socket: &CoSocket<'_, S>,
    option: u32,
    payload: &[u8],
    export: &Export,
    mode: ReplyMode,
) -> io::Result<bool>
where
    for<'s> &'s S: Read + Write,
{
    let Some(request) = InfoRequest::parse(payload) else {
        reply(socket, option, wire::REP_ERR_INVALID, b"malformed INFO/GO payload")?;
        return Ok(false);
    };
    if request.name != export.name.as_bytes() {
        reply(socket, option, wire::REP_ERR_UNKNOWN, b"no export of that name")?;
        return Ok(false);
    }
    let mut export_info = wire::INFO_EXPORT.to_be_bytes().to_vec();
    export_info.extend_from_slice(&export.size().to_be_bytes());
    export_info.extend_from_slice(&export.transmission_flags(mode).to_be_bytes());
    reply(socket, option, wire::REP_INFO, &export_info)?;
    if request.wants(wire::INFO_NAME) {
        let mut name = wire::INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(export.name.as_bytes());
        reply(socket, option, wire::REP_INFO, &name)?;
    }
    if request.wants(wire::INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut description = wire::INFO_DESCRIPTION.to_be_bytes().to_vec();
        description.extend_from_slice(export.description.as_bytes());
        reply(socket, option, wire::REP_INFO, &description)?;
    }
    // Sent whether asked or not, as QEMU does. The minimum is the node's alignment for a
    // client that asked for block sizes (it will honour them) or only wants information;
    // otherwise 1, as any alignment works (the block layer pads unaligned requests).
    let minimum = if option == wire::OPT_INFO || request.wants(wire::INFO_BLOCK_SIZE) {
        u32::try_from(export.backend.root().alignment().request).unwrap_or(PREFERRED_BLOCK)
    } else {
        1
    };
    let mut block_size = wire::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [minimum, PREFERRED_BLOCK.max(minimum), MAX_REQUEST] {
        block_size.extend_from_slice(&size.to_be_bytes());
    }
    reply(socket, option, wire::REP_INFO, &block_size)?;
    reply(socket, option, wire::REP_ACK, &[])?;
    Ok(true)
}

/// The payload of `INFO` / `GO`: an export name and the information types asked for.
struct InfoRequest<'a> {
    name: &'a [u8],
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// Parses `payload`; `None` if its lengths do not add up.
    fn parse(payload: &'a [u8]) -> Option<InfoRequest<'a>> {
        let name_length = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        let name = payload.get(4..4 + name_length)?;
        let rest = &payload[4 + name_length..];
        let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let requests = &rest[2..];
        (requests.len() == count * 2).then_some(InfoRequest { name, requests })
    }

    /// Whether the client asked for information `kind`.
    fn wants(&self, kind: u16) -> bool {
        self.requests.chunks_exact(2).any(|pair| u16::from_be_bytes([pair[0], pair[1]]) == kind)
    }
}

/// Sends one option reply of type `kind` with `data`.
fn reply<S: AsRawFd>(
    socket: &CoSocket<'_, S>,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()>
where
    for<'s> &'s S: Read + Write,
{
    let mut message = Vec::with_capacity(20 + data.len());
    message.extend_from_slice(&wire::OPTION_REPLY_MAGIC.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    socket.write_all(&message)
}

/// The error that ends a connection whose client broke the protocol.
pub(crate) fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD protocol violation: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_payload_parses_and_refuses_bad_lengths() {
        let mut payload = 3u32.to_be_bytes().to_vec();
        payload.extend_from_slice(b"abc");
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&wire::INFO_NAME.to_be_bytes());
        let request = InfoRequest::parse(&payload).expect("valid payload");
        assert_eq!(request.name, b"abc");
        assert!(request.wants(wire::INFO_NAME));
        assert!(!request.wants(wire::INFO_DESCRIPTION));
        // A count that says more requests than there are, a name longer than the payload.
        assert!(InfoRequest::parse(&payload[..payload.len() - 1]).is_none());
        let mut long_name = 100u32.to_be_bytes().to_vec();
        long_name.extend_from_slice(b"abc\0\0");
        assert!(InfoRequest::parse(&long_name).is_none());
        assert!(InfoRequest::parse(&[0, 0]).is_none());
    }
}
