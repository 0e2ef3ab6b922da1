//! Raw-socket clients for structured replies, metadata contexts, block status and extended
//! headers: the right chunks for good requests, the right error for every malformed option
//! and request, and no allocation by the client's say-so.

mod common;

use aiocoro_nbd::wire;
use common::client::{Client, SIZE, request_bytes};
use common::{Server, TempDir, qcow2_image, temp_dir};

fn start(name: &str) -> (Server, TempDir) {
    let dir = temp_dir(name);
    let image = qcow2_image(&dir, "1M");
    (Server::start(&dir, &image, &["-f", "qcow2", "-t", "-e", "8"]), dir)
}

/// Sends `option` with `payload`; returns the reply types up to and including the final
/// one, with the data of each.
fn option(client: &mut Client, option: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
    client.option(option, payload);
    let mut replies = Vec::new();
    loop {
        let reply = client.option_reply();
        assert_eq!(reply.option, option);
        let last = reply.kind != wire::REP_META_CONTEXT && reply.kind != wire::REP_INFO;
        replies.push((reply.kind, reply.data));
        if last {
            return replies;
        }
    }
}

/// The payload of `LIST_META_CONTEXT` / `SET_META_CONTEXT` for the default export.
fn meta_payload(queries: &[&[u8]]) -> Vec<u8> {
    let mut payload = 0u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        payload.extend_from_slice(&(query.len() as u32).to_be_bytes());
        payload.extend_from_slice(query);
    }
    payload
}

/// Negotiates `mode_option` (structured replies or extended headers), selects `contexts`,
/// and enters transmission; returns the client and the transmission flags.
fn transmission(server: &Server, mode_option: u32, contexts: &[&[u8]]) -> (Client, u16) {
    let mut client =
        Client::with_flags(server, wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES);
    assert_eq!(option(&mut client, mode_option, &[]), [(wire::REP_ACK, vec![])]);
    if !contexts.is_empty() {
        let replies = option(&mut client, wire::OPT_SET_META_CONTEXT, &meta_payload(contexts));
        assert_eq!(replies.len(), contexts.len() + 1, "{replies:?}");
    }
    let replies = option(&mut client, wire::OPT_GO, &[0, 0, 0, 0, 0, 0]);
    assert_eq!(replies.last().unwrap().0, wire::REP_ACK);
    let export = replies.iter().find(|(_, data)| data[..2] == [0, 0]).expect("INFO_EXPORT");
    (client, u16::from_be_bytes([export.1[10], export.1[11]]))
}

/// One reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    payload: Vec<u8>,
}

impl Chunk {
    fn done(&self) -> bool {
        self.flags & wire::REPLY_FLAG_DONE != 0
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.payload[at..at + 8].try_into().unwrap())
    }

    /// The error value of an error chunk.
    fn error(&self) -> u32 {
        assert!(
            self.kind == wire::REPLY_TYPE_ERROR || self.kind == wire::REPLY_TYPE_ERROR_OFFSET,
            "not an error chunk: {self:?}"
        );
        self.u32_at(0)
    }
}

/// Reads one chunk (structured or extended header) of the reply to `cookie`.
fn chunk(client: &mut Client, extended: bool, cookie: u64) -> Chunk {
    let header = client.read(if extended { 32 } else { 20 });
    let magic = if extended { wire::EXTENDED_REPLY_MAGIC } else { wire::STRUCTURED_REPLY_MAGIC };
    assert_eq!(header[..4], magic.to_be_bytes(), "chunk magic");
    assert_eq!(header[8..16], cookie.to_be_bytes(), "cookie echoed");
    let length = if extended {
        u64::from_be_bytes(header[24..32].try_into().unwrap()) as usize
    } else {
        u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize
    };
    Chunk {
        flags: u16::from_be_bytes([header[4], header[5]]),
        kind: u16::from_be_bytes([header[6], header[7]]),
        payload: client.read(length),
    }
}

/// Sends a request with `payload` (compact or extended header) and reads every chunk of the
/// reply.
fn request(
    client: &mut Client,
    extended: bool,
    command: u16,
    flags: u16,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<Chunk> {
    let cookie = 0x5eed ^ offset ^ u64::from(command);
    client.send(&header(extended, command, flags, cookie, offset, length));
    client.send(payload);
    let mut chunks = vec![chunk(client, extended, cookie)];
    while !chunks.last().unwrap().done() {
        chunks.push(chunk(client, extended, cookie));
    }
    chunks
}

fn header(
    extended: bool,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    if !extended {
        return request_bytes(command, flags, cookie, offset, length as u32, &[]);
    }
    let mut bytes = wire::EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&command.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes
}

/// The error value of a reply that is one error chunk.
fn error_of(chunks: &[Chunk]) -> u32 {
    assert_eq!(chunks.len(), 1, "an error reply is one chunk: {chunks:?}");
    chunks[0].error()
}

#[test]
fn the_new_options_answer_malformed_and_repeated_requests_with_errors() {
    let (server, _dir) = start("options-structured");
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    let invalid = |replies: Vec<(u32, Vec<u8>)>| {
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].0, wire::REP_ERR_INVALID, "{replies:?}");
    };
    let list = meta_payload(&[]);
    // Meta contexts before structured replies; structured replies with a payload.
    invalid(option(&mut client, wire::OPT_LIST_META_CONTEXT, &list));
    invalid(option(&mut client, wire::OPT_SET_META_CONTEXT, &list));
    invalid(option(&mut client, wire::OPT_STRUCTURED_REPLY, b"x"));
    invalid(option(&mut client, wire::OPT_EXTENDED_HEADERS, b"x"));
    assert_eq!(option(&mut client, wire::OPT_STRUCTURED_REPLY, &[])[0].0, wire::REP_ACK);
    invalid(option(&mut client, wire::OPT_STRUCTURED_REPLY, &[]));
    // LIST with no query lists both contexts, with id 0.
    let listed = option(&mut client, wire::OPT_LIST_META_CONTEXT, &list);
    let names: Vec<_> = listed.iter().filter(|(kind, _)| *kind == wire::REP_META_CONTEXT).collect();
    assert_eq!(names.len(), 2, "{listed:?}");
    assert_eq!(names[0].1, b"\0\0\0\0base:allocation");
    assert_eq!(names[1].1, b"\0\0\0\0qemu:allocation-depth");
    // Malformed payloads: cut short, a trailing byte, a lying query count, a huge name
    // length; an unknown export.
    let good = meta_payload(&[b"base:allocation"]);
    for option_type in [wire::OPT_LIST_META_CONTEXT, wire::OPT_SET_META_CONTEXT] {
        invalid(option(&mut client, option_type, &good[..good.len() - 1]));
        let mut trailing = good.clone();
        trailing.push(0);
        invalid(option(&mut client, option_type, &trailing));
        let mut lying = meta_payload(&[]);
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        invalid(option(&mut client, option_type, &lying));
        invalid(option(&mut client, option_type, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]));
        let mut other = 1u32.to_be_bytes().to_vec();
        other.extend_from_slice(b"x\0\0\0\0");
        assert_eq!(option(&mut client, option_type, &other)[0].0, wire::REP_ERR_UNKNOWN);
    }
    // Queries that match nothing select nothing, and that is no error: an unknown context,
    // another namespace, a namespace alone in SET, an oversized query.
    let huge = vec![b'b'; 5000];
    let nothing: [&[u8]; 4] = [b"base:nope", b"nbd-server:allocation", b"base:", &huge];
    let replies = option(&mut client, wire::OPT_SET_META_CONTEXT, &meta_payload(&nothing));
    assert_eq!(replies, [(wire::REP_ACK, vec![])]);
    // SET selects with ids; extended headers after structured replies are fine once.
    let set = meta_payload(&[b"qemu:allocation-depth", b"base:allocation"]);
    let replies = option(&mut client, wire::OPT_SET_META_CONTEXT, &set);
    assert_eq!(replies[0], (wire::REP_META_CONTEXT, b"\0\0\0\x01base:allocation".to_vec()));
    assert_eq!(replies[1], (wire::REP_META_CONTEXT, b"\0\0\0\x02qemu:allocation-depth".to_vec()));
    assert_eq!(option(&mut client, wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ACK);
    invalid(option(&mut client, wire::OPT_EXTENDED_HEADERS, &[]));
    // Structured replies after extended headers: the error the protocol names for it (the
    // extended headers, which take precedence, stay).
    let replies = option(&mut client, wire::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].0, wire::REP_ERR_EXT_HEADER_REQD, "{replies:?}");
    // Thousands of empty queries in one payload: each matches nothing.
    let empty: Vec<&[u8]> = vec![b""; 3000];
    let replies = option(&mut client, wire::OPT_LIST_META_CONTEXT, &meta_payload(&empty));
    assert_eq!(replies, [(wire::REP_ACK, vec![])]);
    // A meta context payload too large to read: TOO_BIG, and the connection closes without
    // the server reading (or allocating) it.
    let mut header = wire::OPTION_MAGIC.to_be_bytes().to_vec();
    header.extend_from_slice(&wire::OPT_SET_META_CONTEXT.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header);
    assert_eq!(client.option_reply().kind, wire::REP_ERR_TOO_BIG);
    assert!(client.is_closed());
}

/// "Once extended headers are successfully requested, a client MUST NOT use
/// `NBD_OPT_EXPORT_NAME`": which headers such a client would send is anyone's guess, and
/// `EXPORT_NAME` has no error reply, so the connection closes (as with qemu-nbd). After
/// structured replies alone `EXPORT_NAME` is fine, and transmission is structured.
#[test]
fn export_name_after_extended_headers_closes_the_connection() {
    let (mut server, _dir) = start("export-name-extended");
    let flags = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    let mut client = Client::with_flags(&server, flags);
    assert_eq!(option(&mut client, wire::OPT_EXTENDED_HEADERS, &[])[0].0, wire::REP_ACK);
    client.option(wire::OPT_EXPORT_NAME, b"");
    assert!(client.is_closed(), "EXPORT_NAME after extended headers must close the connection");
    let mut client = Client::with_flags(&server, flags);
    assert_eq!(option(&mut client, wire::OPT_STRUCTURED_REPLY, &[])[0].0, wire::REP_ACK);
    client.option(wire::OPT_EXPORT_NAME, b"");
    let answer = client.read(10);
    assert_eq!(answer[..8], SIZE.to_be_bytes());
    let transmission_flags = u16::from_be_bytes([answer[8], answer[9]]);
    assert_ne!(transmission_flags & wire::TFLAG_SEND_DF, 0, "DF with structured replies");
    let chunks = request(&mut client, false, wire::CMD_READ, 0, 0, 512, &[]);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!((chunks[0].kind, chunks[0].payload.len()), (wire::REPLY_TYPE_OFFSET_DATA, 8 + 512));
    assert!(server.is_running());
}

#[test]
fn structured_reads_skip_holes_and_errors_come_as_error_chunks() {
    let (mut server, _dir) = start("structured-reads");
    let (mut client, flags) = transmission(&server, wire::OPT_STRUCTURED_REPLY, &[]);
    assert_ne!(flags & wire::TFLAG_SEND_DF, 0, "DF is advertised with structured replies");
    let request = |client: &mut Client, command, flags, offset, length: u64, payload: &[u8]| {
        request(client, false, command, flags, offset, length, payload)
    };
    // Without a write the writes below land in a fresh cluster: 64 KiB of data in a 128 KiB
    // read, holes on both sides.
    let done = request(&mut client, wire::CMD_WRITE, 0, 65536, 4096, &[0xab; 4096]);
    assert_eq!((done[0].kind, done[0].done()), (wire::REPLY_TYPE_NONE, true));
    let chunks = request(&mut client, wire::CMD_READ, 0, 0, 196608, &[]);
    let kinds: Vec<_> = chunks.iter().map(|chunk| (chunk.kind, chunk.u64_at(0))).collect();
    let (hole, data) = (wire::REPLY_TYPE_OFFSET_HOLE, wire::REPLY_TYPE_OFFSET_DATA);
    assert_eq!(kinds, [(hole, 0), (data, 65536), (hole, 131072)], "{chunks:?}");
    assert_eq!((chunks[0].u32_at(8), chunks[2].u32_at(8)), (65536, 65536));
    // The cluster's data: the write, and zeroes around it inside the cluster.
    let mut expected = vec![0; 65536];
    expected[..4096].fill(0xab);
    assert_eq!(chunks[1].payload[8..], expected);
    assert!(chunks[2].done() && !chunks[0].done() && !chunks[1].done());
    // Reads shorter than SPARSE_READ_MIN are one data chunk, holes or not; from that size on
    // a hole is a hole chunk.
    let small = aiocoro_nbd::structured_read::SPARSE_READ_MIN - 1;
    let chunks = request(&mut client, wire::CMD_READ, 0, 0, small, &[]);
    assert_eq!((chunks.len(), chunks[0].kind), (1, data));
    assert_eq!(chunks[0].payload[8..], vec![0; small as usize]);
    let chunks = request(&mut client, wire::CMD_READ, 0, 131072, small + 1, &[]);
    assert_eq!((chunks.len(), chunks[0].kind, chunks[0].u32_at(8)), (1, hole, 65536));
    // DF: one data chunk for all of it.
    let chunks = request(&mut client, wire::CMD_READ, wire::CMD_FLAG_DF, 0, 196608, &[]);
    assert_eq!((chunks.len(), chunks[0].kind), (1, data));
    assert_eq!(chunks[0].payload.len(), 8 + 196608);
    // Errors as error chunks, never simple replies: past the end, unknown flags, too big.
    for (flags, offset, length) in
        [(0, SIZE, 512), (1 << 9, 0, 512), (0, 0, u64::from(aiocoro_nbd::MAX_REQUEST) + 1)]
    {
        let chunks = request(&mut client, wire::CMD_READ, flags, offset, length, &[]);
        assert_eq!(error_of(&chunks), wire::EINVAL, "read {flags:#x} {offset} {length}");
    }
    // Block status without a selected context.
    let chunks = request(&mut client, wire::CMD_BLOCK_STATUS, 0, 0, 4096, &[]);
    assert_eq!(error_of(&chunks), wire::EINVAL);
    // An empty read is one final NONE chunk.
    let chunks = request(&mut client, wire::CMD_READ, 0, 0, 0, &[]);
    assert_eq!((chunks.len(), chunks[0].kind), (1, wire::REPLY_TYPE_NONE));
    // A 4 GiB - 1 write: EINVAL at once (its payload never read), then the connection ends.
    client.send(&request_bytes(wire::CMD_WRITE, 0, 7, 0, u32::MAX, &[]));
    assert_eq!(chunk(&mut client, false, 7).error(), wire::EINVAL);
    assert!(client.is_closed());
    assert!(server.is_running());
}

#[test]
fn block_status_reports_both_contexts_and_refuses_bad_ranges() {
    let (server, _dir) = start("block-status");
    let contexts: [&[u8]; 2] = [b"base:allocation", b"qemu:allocation-depth"];
    let (mut client, _) = transmission(&server, wire::OPT_STRUCTURED_REPLY, &contexts);
    let mut request = |command, flags, offset, length: u64, payload: &[u8]| {
        request(&mut client, false, command, flags, offset, length, payload)
    };
    request(wire::CMD_WRITE, 0, 131072, 8192, &[1; 8192]);
    let chunks = request(wire::CMD_BLOCK_STATUS, 0, 65536, 262144, &[]);
    assert_eq!(chunks.len(), 2, "one chunk per context: {chunks:?}");
    assert!(chunks[1].done() && !chunks[0].done());
    let extents = |chunk: &Chunk| -> Vec<(u32, u32)> {
        assert_eq!(chunk.kind, wire::REPLY_TYPE_BLOCK_STATUS);
        (4..chunk.payload.len())
            .step_by(8)
            .map(|at| (chunk.u32_at(at), chunk.u32_at(at + 4)))
            .collect()
    };
    assert_eq!(chunks[0].u32_at(0), 1);
    assert_eq!(extents(&chunks[0]), [(65536, 3), (65536, 0), (131072, 3)]);
    assert_eq!(chunks[1].u32_at(0), 2);
    assert_eq!(extents(&chunks[1]), [(65536, 0), (65536, 1), (131072, 0)]);
    // REQ_ONE: one extent per context.
    let chunks = request(wire::CMD_BLOCK_STATUS, wire::CMD_FLAG_REQ_ONE, 65536, 262144, &[]);
    assert_eq!((extents(&chunks[0]), extents(&chunks[1])), (vec![(65536, 3)], vec![(65536, 0)]));
    // FUA is accepted (and ignored) on commands that write nothing, as the protocol requires
    // once SEND_FUA is advertised.
    let fua = wire::CMD_FLAG_FUA;
    let chunks = request(wire::CMD_BLOCK_STATUS, fua | wire::CMD_FLAG_REQ_ONE, 65536, 4096, &[]);
    assert_eq!((extents(&chunks[0]), extents(&chunks[1])), (vec![(4096, 3)], vec![(4096, 0)]));
    let chunks = request(wire::CMD_READ, fua | wire::CMD_FLAG_DF, 131072, 8192, &[]);
    assert_eq!((chunks.len(), chunks[0].kind), (1, wire::REPLY_TYPE_OFFSET_DATA));
    assert_eq!(chunks[0].payload[8..], [1; 8192]);
    // Empty, past the end, overflowing, unknown flags.
    for (flags, offset, length) in
        [(0, 0, 0), (0, SIZE - 512, 1024), (0, u64::MAX - 10, 512), (wire::CMD_FLAG_DF, 0, 512)]
    {
        let chunks = request(wire::CMD_BLOCK_STATUS, flags, offset, length, &[]);
        assert_eq!(error_of(&chunks), wire::EINVAL, "block status {flags:#x} {offset} {length}");
    }
    // CACHE: in range fine, past the end EINVAL.
    assert_eq!(request(wire::CMD_CACHE, 0, 0, SIZE, &[])[0].kind, wire::REPLY_TYPE_NONE);
    assert_eq!(error_of(&request(wire::CMD_CACHE, 0, SIZE, 1, &[])), wire::EINVAL);
}

/// The server's pid, from its pid file (which can exist a moment before its line is in).
fn server_pid(dir: &std::path::Path) -> String {
    loop {
        let text = std::fs::read_to_string(dir.join("nbd.pid")).unwrap();
        if text.ends_with('\n') {
            return text.trim().to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The server's resident memory in KiB.
fn resident_kib(server_pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{server_pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn extended_headers_carry_64_bit_lengths_and_refuse_a_4_gib_write_without_allocating() {
    let (mut server, dir) = start("extended");
    let pid = server_pid(&dir);
    let contexts: [&[u8]; 1] = [b"base:allocation"];
    let (mut client, _) = transmission(&server, wire::OPT_EXTENDED_HEADERS, &contexts);
    let request = |client: &mut Client, command, flags, offset, length: u64, payload: &[u8]| {
        request(client, true, command, flags, offset, length, payload)
    };
    let chunks = request(&mut client, wire::CMD_WRITE, 0, 4096, 512, &[9; 512]);
    assert_eq!(chunks[0].kind, wire::REPLY_TYPE_NONE);
    let chunks = request(&mut client, wire::CMD_READ, 0, 4096, 512, &[]);
    assert_eq!((chunks[0].kind, chunks[0].u64_at(0)), (wire::REPLY_TYPE_OFFSET_DATA, 4096));
    assert_eq!(chunks[0].payload[8..], [9; 512]);
    // BLOCK_STATUS_EXT: a count, then 64-bit lengths and flags.
    let chunks = request(&mut client, wire::CMD_BLOCK_STATUS, 0, 0, SIZE, &[]);
    assert_eq!(chunks[0].kind, wire::REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!((chunks[0].u32_at(0), chunks[0].u32_at(4)), (1, 2));
    assert_eq!((chunks[0].u64_at(8), chunks[0].u64_at(16)), (65536, 0));
    assert_eq!((chunks[0].u64_at(24), chunks[0].u64_at(32)), (SIZE - 65536, 3));
    // 64-bit lengths past the end: EINVAL.
    for command in [wire::CMD_BLOCK_STATUS, wire::CMD_TRIM, wire::CMD_WRITE_ZEROES, wire::CMD_CACHE]
    {
        let chunks = request(&mut client, command, 0, 0, 1 << 40, &[]);
        assert_eq!(error_of(&chunks), wire::EINVAL, "command {command}");
    }
    // A compact header (and 4 more bytes, to fill an extended one) once extended headers
    // are negotiated closes the connection.
    let (mut compact, _) = transmission(&server, wire::OPT_EXTENDED_HEADERS, &[]);
    compact.send(&request_bytes(wire::CMD_READ, 0, 1, 0, 512, &[0; 4]));
    assert!(compact.is_closed());
    // A payload on a command other than WRITE: EINVAL, then the connection ends.
    let (mut payload, _) = transmission(&server, wire::OPT_EXTENDED_HEADERS, &[]);
    payload.send(&header(true, wire::CMD_FLUSH, wire::CMD_FLAG_PAYLOAD_LEN, 3, 0, 16));
    assert_eq!(chunk(&mut payload, true, 3).error(), wire::EINVAL);
    assert!(payload.is_closed());
    // A 4 GiB write: EINVAL at once, nothing allocated, the connection ends.
    let before = resident_kib(&pid);
    // (No payload follows: the server answers before reading any and closes, so bytes
    // sent after the header could meet a closed socket.)
    client.send(&header(true, wire::CMD_WRITE, 0, 4, 0, 4 << 30));
    assert_eq!(chunk(&mut client, true, 4).error(), wire::EINVAL);
    assert!(client.is_closed());
    let after = resident_kib(&pid);
    assert!(after < before + 64 * 1024, "the server grew from {before} to {after} KiB");
    assert!(server.is_running());
}
