//! A client speaking the NBD wire protocol by hand over a Unix socket, for tests that
//! send what real clients never would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use aiocoro_nbd::wire;

use super::Server;

/// The cookie of the requests [`Client::request`] sends.
const COOKIE: u64 = 0x1234_5678_9abc_def0;

/// The bytes of a request (header and `payload`).
pub(crate) fn request_bytes(
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut message = wire::REQUEST_MAGIC.to_be_bytes().to_vec();
    message.extend_from_slice(&flags.to_be_bytes());
    message.extend_from_slice(&command.to_be_bytes());
    message.extend_from_slice(&cookie.to_be_bytes());
    message.extend_from_slice(&offset.to_be_bytes());
    message.extend_from_slice(&length.to_be_bytes());
    message.extend_from_slice(payload);
    message
}

/// The export size of the tests' images.
pub(crate) const SIZE: u64 = 1 << 20;

/// A client speaking the wire protocol by hand.
pub(crate) struct Client {
    pub stream: UnixStream,
}

/// One option reply.
pub(crate) struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// The reply type.
    pub kind: u32,
    /// The payload.
    pub data: Vec<u8>,
}

impl Client {
    /// Connects and reads the greeting, checking it.
    pub(crate) fn connect(server: &Server) -> Client {
        let stream = UnixStream::connect(&server.socket).expect("connect to the server");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client = Client { stream };
        let greeting = client.read(18);
        assert_eq!(&greeting[0..8], &wire::INIT_MAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &wire::OPTION_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_eq!(flags, wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
        client
    }

    /// Connects and sends the client flags `flags`.
    pub(crate) fn with_flags(server: &Server, flags: u32) -> Client {
        let mut client = Client::connect(server);
        client.send(&flags.to_be_bytes());
        client
    }

    /// Connects with fixed newstyle and `NO_ZEROES`, and enters transmission with `GO`;
    /// returns the client and the transmission flags. The export must be [`SIZE`] bytes.
    pub(crate) fn transmission(server: &Server) -> (Client, u16) {
        let (client, size, flags) = Client::go(server);
        assert_eq!(size, SIZE, "the export's size");
        (client, flags)
    }

    /// As [`Client::transmission`] for an export of any size; returns the client, the
    /// export's size and the transmission flags.
    pub(crate) fn go(server: &Server) -> (Client, u64, u16) {
        let mut client =
            Client::with_flags(server, wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES);
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        client.option(wire::OPT_GO, &go);
        let mut export = None;
        loop {
            let reply = client.option_reply();
            assert_eq!(reply.option, wire::OPT_GO);
            match reply.kind {
                wire::REP_ACK => break,
                wire::REP_INFO if reply.data[..2] == wire::INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(reply.data[2..10].try_into().unwrap());
                    export = Some((size, u16::from_be_bytes([reply.data[10], reply.data[11]])));
                }
                wire::REP_INFO => {}
                other => panic!("GO answered with reply type {other:#x}"),
            }
        }
        let (size, flags) = export.expect("GO sent no INFO_EXPORT");
        (client, size, flags)
    }

    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the server");
    }

    pub(crate) fn read(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.stream.read_exact(&mut bytes).expect("read from the server");
        bytes
    }

    /// Whether the server closed the connection (an end of file, or a reset).
    pub(crate) fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    pub(crate) fn option(&mut self, option: u32, data: &[u8]) {
        let mut message = wire::OPTION_MAGIC.to_be_bytes().to_vec();
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.send(&message);
    }

    pub(crate) fn option_reply(&mut self) -> OptionReply {
        let header = self.read(20);
        assert_eq!(header[0..8], wire::OPTION_REPLY_MAGIC.to_be_bytes());
        let word = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
        let data = self.read(word(16) as usize);
        OptionReply { option: word(8), kind: word(12), data }
    }

    /// Sends a request header (and `payload`) with the tests' usual cookie.
    pub(crate) fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.send(&request_bytes(command, flags, COOKIE, offset, length, payload));
    }

    /// Reads a simple reply; returns its error value.
    pub(crate) fn reply(&mut self) -> u32 {
        let reply = self.read(16);
        assert_eq!(reply[0..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[8..16], COOKIE.to_be_bytes(), "cookie echoed");
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }

    /// Reads a simple reply to any request; returns its error value and cookie.
    pub(crate) fn any_reply(&mut self) -> (u32, u64) {
        let reply = self.read(16);
        assert_eq!(reply[0..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        (error, u64::from_be_bytes(reply[8..16].try_into().unwrap()))
    }

    /// A request without payload; returns the reply's error value.
    pub(crate) fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.request(command, flags, offset, length, &[]);
        self.reply()
    }

    /// Writes `data` at `offset`; returns the error value.
    pub(crate) fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(wire::CMD_WRITE, flags, offset, data.len() as u32, data);
        self.reply()
    }

    /// Reads `length` bytes at `offset`, which must succeed.
    pub(crate) fn read_data(&mut self, offset: u64, length: u32) -> Vec<u8> {
        assert_eq!(self.command(wire::CMD_READ, 0, offset, length), 0, "read at {offset}");
        self.read(length as usize)
    }
}
