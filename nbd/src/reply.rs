//! Replies framed as the connection negotiated: simple replies, structured reply chunks, or
//! chunks with extended headers. A [`Reply`] is built whole in memory and written under the
//! connection's writer lock, so its chunks never interleave with another reply's bytes.

use aiocoro_block::IoBuffer;

use crate::request::Request;
use crate::wire;

/// How replies are framed, as negotiated in the option phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplyMode {
    /// Simple replies only (nothing negotiated).
    Simple,
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Structured replies with extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

/// A piece of a reply: header and small payload bytes, or a data buffer sent as it is.
pub enum Segment {
    /// Bytes built here.
    Bytes(Vec<u8>),
    /// Data read from the export.
    Data(IoBuffer),
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("len", &self.bytes().len()).finish()
    }
}

impl Segment {
    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Segment::Bytes(bytes) => bytes,
            Segment::Data(buffer) => buffer,
        }
    }
}

/// One reply to one request, in the connection's [`ReplyMode`].
pub struct Reply {
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    segments: Vec<Segment>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("mode", &self.mode)
            .field("cookie", &self.cookie)
            .field("offset", &self.offset)
            .field("segments", &self.segments)
            .finish()
    }
}

impl Reply {
    /// An empty reply to `request`.
    pub fn new(mode: ReplyMode, request: &Request) -> Reply {
        Reply { mode, cookie: request.cookie, offset: request.offset, segments: Vec::new() }
    }

    /// The mode replies are framed in.
    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// The segments to write, in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The bytes of the reply in one buffer.
    #[cfg(test)]
    fn to_bytes(&self) -> Vec<u8> {
        self.segments.iter().flat_map(|segment| segment.bytes().iter().copied()).collect()
    }

    fn bytes(&mut self) -> &mut Vec<u8> {
        if !matches!(self.segments.last(), Some(Segment::Bytes(_))) {
            self.segments.push(Segment::Bytes(Vec::with_capacity(64)));
        }
        match self.segments.last_mut() {
            Some(Segment::Bytes(bytes)) => bytes,
            _ => unreachable!("a bytes segment was just pushed"),
        }
    }

    /// A simple reply: the error value, then `data` if it is 0.
    ///
    /// # Panics
    ///
    /// If structured replies were negotiated (the simple reply is then never right).
    pub fn simple(&mut self, error: u32, data: Option<IoBuffer>) {
        assert_eq!(self.mode, ReplyMode::Simple, "aiocoro-nbd: a simple reply after negotiation");
        let cookie = self.cookie;
        let bytes = self.bytes();
        bytes.extend_from_slice(&wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&error.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        if let Some(data) = data.filter(|_| error == 0) {
            self.segments.push(Segment::Data(data));
        }
    }

    /// A chunk header for a payload of `length` bytes, which the caller adds next.
    fn chunk_header(&mut self, flags: u16, kind: u16, length: usize) {
        let (mode, cookie, offset) = (self.mode, self.cookie, self.offset);
        let bytes = self.bytes();
        match mode {
            ReplyMode::Simple => panic!("aiocoro-nbd: a reply chunk without structured replies"),
            ReplyMode::Structured => {
                bytes.extend_from_slice(&wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
                bytes.extend_from_slice(&flags.to_be_bytes());
                bytes.extend_from_slice(&kind.to_be_bytes());
                bytes.extend_from_slice(&cookie.to_be_bytes());
                let length = u32::try_from(length).expect("a chunk of a compact reply fits u32");
                bytes.extend_from_slice(&length.to_be_bytes());
            }
            ReplyMode::Extended => {
                bytes.extend_from_slice(&wire::EXTENDED_REPLY_MAGIC.to_be_bytes());
                bytes.extend_from_slice(&flags.to_be_bytes());
                bytes.extend_from_slice(&kind.to_be_bytes());
                bytes.extend_from_slice(&cookie.to_be_bytes());
                bytes.extend_from_slice(&offset.to_be_bytes());
                bytes.extend_from_slice(&(length as u64).to_be_bytes());
            }
        }
    }

    /// A chunk of type `kind` whose payload is `payload`.
    pub fn chunk(&mut self, flags: u16, kind: u16, payload: &[u8]) {
        self.chunk_header(flags, kind, payload.len());
        self.bytes().extend_from_slice(payload);
    }

    /// An `OFFSET_DATA` chunk: `data` read at `offset`.
    pub fn data_chunk(&mut self, flags: u16, offset: u64, data: IoBuffer) {
        self.chunk_header(flags, wire::REPLY_TYPE_OFFSET_DATA, 8 + data.len());
        self.bytes().extend_from_slice(&offset.to_be_bytes());
        self.segments.push(Segment::Data(data));
    }

    /// An `OFFSET_HOLE` chunk: `length` bytes at `offset` read as zeroes.
    pub fn hole_chunk(&mut self, flags: u16, offset: u64, length: u32) {
        let mut payload = [0u8; 12];
        payload[..8].copy_from_slice(&offset.to_be_bytes());
        payload[8..].copy_from_slice(&length.to_be_bytes());
        self.chunk(flags, wire::REPLY_TYPE_OFFSET_HOLE, &payload);
    }

    /// The final error chunk (`ERROR`, or `ERROR_OFFSET` when the failing `offset` is
    /// known) with a message for people (cut to the protocol's 4096-byte string limit).
    pub fn error_chunk(&mut self, error: u32, message: &str, offset: Option<u64>) {
        let mut end = message.len().min(4096);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message.as_bytes()[..end];
        let mut payload = Vec::with_capacity(6 + message.len() + 8);
        payload.extend_from_slice(&error.to_be_bytes());
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message);
        let kind = match offset {
            Some(offset) => {
                payload.extend_from_slice(&offset.to_be_bytes());
                wire::REPLY_TYPE_ERROR_OFFSET
            }
            None => wire::REPLY_TYPE_ERROR,
        };
        self.chunk(wire::REPLY_FLAG_DONE, kind, &payload);
    }

    /// The reply to a request without reply data: success (`error` 0) or an error, simple
    /// or structured (a final `NONE` chunk, or an error chunk with `message`) as negotiated.
    pub fn status(&mut self, error: u32, message: &str) {
        match (self.mode, error) {
            (ReplyMode::Simple, _) => self.simple(error, None),
            (_, 0) => self.chunk(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, &[]),
            (_, error) => self.error_chunk(error, message, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request { flags: 0, command: wire::CMD_READ, cookie: 9, offset: 4096, length: 512 }
    }

    #[test]
    fn each_mode_frames_its_own_headers() {
        let mut simple = Reply::new(ReplyMode::Simple, &request());
        simple.status(wire::EIO, "lost");
        let bytes = simple.to_bytes();
        assert_eq!(bytes.len(), 16);
        assert_eq!(bytes[..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(bytes[4..8], wire::EIO.to_be_bytes());

        let mut structured = Reply::new(ReplyMode::Structured, &request());
        structured.hole_chunk(0, 4096, 512);
        structured.status(0, "");
        let bytes = structured.to_bytes();
        assert_eq!(bytes.len(), 20 + 12 + 20);
        assert_eq!(bytes[..4], wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(bytes[6..8], wire::REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(bytes[16..20], 12u32.to_be_bytes());
        assert_eq!(bytes[32 + 4..32 + 6], wire::REPLY_FLAG_DONE.to_be_bytes());

        let mut extended = Reply::new(ReplyMode::Extended, &request());
        extended.error_chunk(wire::EINVAL, "bad", Some(4096));
        let bytes = extended.to_bytes();
        assert_eq!(bytes.len(), 32 + 4 + 2 + 3 + 8);
        assert_eq!(bytes[..4], wire::EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(bytes[6..8], wire::REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
        assert_eq!(bytes[16..24], 4096u64.to_be_bytes(), "the request's offset");
        assert_eq!(bytes[24..32], 17u64.to_be_bytes());
        assert_eq!(&bytes[38..41], b"bad");
    }
}
