//! A raw-socket client that breaks the protocol in every way this increment handles; the
//! server answers with the right error or closes that one connection, and keeps serving.

mod common;

use aiocoro_nbd::options::MAX_OPTION_LENGTH;
use aiocoro_nbd::wire;
use common::client::{Client, SIZE};
use common::{Server, TempDir, qcow2_image, temp_dir};

/// Starts a persistent server for up to 8 clients on a new 1 MiB qcow2 image in a new
/// directory (removed when the returned guard is dropped, after the server).
fn start(name: &str, extra: &[&str]) -> (Server, TempDir) {
    let dir = temp_dir(name);
    let image = qcow2_image(&dir, "1M");
    let mut args = vec!["-f", "qcow2", "-t", "-e", "8", "--iothreads", "2"];
    args.extend_from_slice(extra);
    (Server::start(&dir, &image, &args), dir)
}

/// The server is alive and serving: a client can negotiate, write, read back, disconnect.
fn assert_serving(server: &mut Server) {
    assert!(server.is_running(), "the server died");
    let (mut client, _) = Client::transmission(server);
    assert_eq!(client.write(0, 8192, &[0x5a; 512]), 0);
    assert_eq!(client.read_data(8192, 512), vec![0x5a; 512]);
    client.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(client.is_closed(), "DISC must close the connection");
}

#[test]
fn garbage_and_bad_magics_close_only_that_connection() {
    let (mut server, _dir) = start("garbage", &[]);
    // Garbage as the client flags (unknown bits set).
    let mut client = Client::connect(&server);
    client.send(&[0xff; 64]);
    assert!(client.is_closed(), "unknown client flags must close the connection");
    // Without fixed newstyle, any option but EXPORT_NAME (which is all such a client may
    // send) ends the connection: the server has no way to answer it.
    let mut client = Client::with_flags(&server, 0);
    client.option(wire::OPT_LIST, &[]);
    assert!(client.is_closed(), "LIST from a client without fixed newstyle must close it");
    // An option with a bad magic (a request sent before negotiation).
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    client.request(wire::CMD_READ, 0, 0, 512, &[]);
    assert!(client.is_closed(), "a command before negotiation must close the connection");
    // A request with a bad magic during transmission.
    let (mut client, _) = Client::transmission(&server);
    client.send(&[0xee; 28]);
    assert!(client.is_closed(), "a request with a bad magic must close the connection");
    // A client that hangs up mid-request.
    let (mut client, _) = Client::transmission(&server);
    client.send(&wire::REQUEST_MAGIC.to_be_bytes());
    drop(client);
    assert_serving(&mut server);
}

/// A client that does not set fixed newstyle (old `nbd-client`s) can still choose the export
/// with `EXPORT_NAME`, the one option it may send, and use it, as qemu-nbd lets it.
#[test]
fn a_client_without_fixed_newstyle_gets_the_export_by_name() {
    let (mut server, _dir) = start("nonfixed", &[]);
    let mut client = Client::with_flags(&server, 0);
    client.option(wire::OPT_EXPORT_NAME, b"");
    let export = client.read(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
    assert_eq!(export[10..], [0; 124], "the zero padding, which this client did not decline");
    assert_eq!(client.write(0, 4096, &[0xa7; 512]), 0);
    assert_eq!(client.read_data(4096, 512), vec![0xa7; 512]);
    client.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(client.is_closed(), "DISC must close the connection");
    // An unknown export name ends the connection (EXPORT_NAME has no error reply).
    let mut client = Client::with_flags(&server, 0);
    client.option(wire::OPT_EXPORT_NAME, b"nope");
    assert!(client.is_closed(), "an unknown export name must close the connection");
    // An oversized name: closed without a TOO_BIG reply, which this client could not read.
    let mut client = Client::with_flags(&server, 0);
    client.send(&wire::OPTION_MAGIC.to_be_bytes());
    client.send(&wire::OPT_EXPORT_NAME.to_be_bytes());
    client.send(&(MAX_OPTION_LENGTH + 1).to_be_bytes());
    assert!(client.is_closed(), "an oversized EXPORT_NAME must close the connection, unanswered");
    assert_serving(&mut server);
}

#[test]
fn bad_and_unknown_options_get_error_replies() {
    let (mut server, _dir) = start("options", &["-x", "disk", "-D", "a test disk"]);
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    // Unknown options (with and without payload), and STARTTLS (5): no TLS here.
    for (option, payload) in [(42u32, &b"whatever"[..]), (0x7fff_ffff, &[][..]), (5, &[][..])] {
        client.option(option, payload);
        let reply = client.option_reply();
        assert_eq!((reply.option, reply.kind), (option, wire::REP_ERR_UNSUP));
    }
    // LIST names the export and its description; with a payload it is invalid.
    client.option(wire::OPT_LIST, &[]);
    let server_reply = client.option_reply();
    assert_eq!(server_reply.kind, wire::REP_SERVER);
    assert_eq!(server_reply.data, b"\0\0\0\x04diska test disk");
    assert_eq!(client.option_reply().kind, wire::REP_ACK);
    client.option(wire::OPT_LIST, b"x");
    assert_eq!(client.option_reply().kind, wire::REP_ERR_INVALID);
    // INFO with lengths that do not add up, and for an unknown export.
    client.option(wire::OPT_INFO, &[0, 0, 0, 9, b'd']);
    assert_eq!(client.option_reply().kind, wire::REP_ERR_INVALID);
    client.option(wire::OPT_INFO, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(client.option_reply().kind, wire::REP_ERR_UNKNOWN);
    // INFO asking for the name and description.
    let mut info = 4u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"disk");
    info.extend_from_slice(&[0, 2, 0, 1, 0, 2]);
    client.option(wire::OPT_INFO, &info);
    let mut seen = Vec::new();
    loop {
        let reply = client.option_reply();
        if reply.kind == wire::REP_ACK {
            break;
        }
        assert_eq!(reply.kind, wire::REP_INFO);
        seen.push(reply.data);
    }
    assert!(seen.contains(&b"\0\x01disk".to_vec()), "INFO_NAME missing: {seen:?}");
    assert!(seen.contains(&b"\0\x02a test disk".to_vec()), "INFO_DESCRIPTION missing");
    let block_size = seen.iter().find(|data| data[..2] == [0, 3]).expect("INFO_BLOCK_SIZE");
    assert_eq!(block_size[2..], [0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    // An option too large to read is refused, and the connection closed: the server never
    // reads (or allocates) a gigabyte.
    let mut header = wire::OPTION_MAGIC.to_be_bytes().to_vec();
    header.extend_from_slice(&42u32.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    client.send(&header);
    assert_eq!(client.option_reply().kind, wire::REP_ERR_TOO_BIG);
    assert!(client.is_closed());
    // But EXPORT_NAME has no error reply, whoever sends it: an oversized one is closed
    // unanswered (the client would read a TOO_BIG reply as the export's size and flags).
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    let mut header = wire::OPTION_MAGIC.to_be_bytes().to_vec();
    header.extend_from_slice(&wire::OPT_EXPORT_NAME.to_be_bytes());
    header.extend_from_slice(&(MAX_OPTION_LENGTH + 1).to_be_bytes());
    client.send(&header);
    assert!(client.is_closed(), "an oversized EXPORT_NAME must close the connection, unanswered");
    // EXPORT_NAME of an unknown export has no error reply: the connection closes. Names are
    // compared whole: one with a NUL in it is unknown (qemu-nbd takes "disk\0junk" as "disk").
    for name in [&b"nope"[..], b"disk\0", b"disk\0junk"] {
        let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
        client.option(wire::OPT_EXPORT_NAME, name);
        assert!(client.is_closed(), "EXPORT_NAME {name:?} must close the connection");
    }
    // ABORT is acknowledged, then the connection closes.
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    client.option(wire::OPT_ABORT, &[]);
    assert_eq!(client.option_reply().kind, wire::REP_ACK);
    assert!(client.is_closed());
    assert!(server.is_running());
    // GO for "disk" works after all that (assert_serving asks for the empty name, which
    // this server does not export).
    let mut client = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk\0\0");
    client.option(wire::OPT_GO, &go);
    while client.option_reply().kind != wire::REP_ACK {}
    assert_eq!(client.read_data(0, 4096), vec![0; 4096]);
}

#[test]
fn export_name_honours_no_zeroes() {
    let (server, _dir) = start("export-name", &[]);
    // With fixed newstyle or without (NO_ZEROES does not depend on it, as in qemu-nbd).
    let fixed = wire::CLIENT_FIXED_NEWSTYLE;
    let no_zeroes = wire::CLIENT_NO_ZEROES;
    for (flags, padding) in [(fixed | no_zeroes, 0), (fixed, 124), (no_zeroes, 0), (0, 124)] {
        let mut client = Client::with_flags(&server, flags);
        client.option(wire::OPT_EXPORT_NAME, b"");
        let answer = client.read(10 + padding);
        assert_eq!(answer[..8], SIZE.to_be_bytes());
        assert!(answer[10..].iter().all(|&byte| byte == 0));
        // Transmission follows at once: the next bytes are a reply, not more padding.
        assert_eq!(client.read_data(0, 512), vec![0; 512]);
    }
}

#[test]
fn invalid_requests_get_nbd_errors_and_the_connection_goes_on() {
    let (mut server, _dir) = start("requests", &[]);
    let (mut client, flags) = Client::transmission(&server);
    let expected = wire::TFLAG_HAS_FLAGS
        | wire::TFLAG_SEND_FLUSH
        | wire::TFLAG_SEND_FUA
        | wire::TFLAG_SEND_TRIM
        | wire::TFLAG_SEND_WRITE_ZEROES
        | wire::TFLAG_SEND_FAST_ZERO
        | wire::TFLAG_SEND_CACHE
        | wire::TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected, "no DF without structured replies");
    // Past the end, straddling the end, and offsets that overflow.
    assert_eq!(client.command(wire::CMD_READ, 0, SIZE, 512), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_READ, 0, SIZE - 512, 1024), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_READ, 0, u64::MAX - 100, 512), wire::EINVAL);
    assert_eq!(client.write(0, SIZE - 256, &[1; 512]), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_TRIM, 0, SIZE, 4096), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_WRITE_ZEROES, 0, SIZE - 1, 2), wire::EINVAL);
    // Over the maximum request size.
    assert_eq!(client.command(wire::CMD_READ, 0, 0, aiocoro_nbd::MAX_REQUEST + 1), wire::EINVAL);
    // Unknown commands and flags.
    assert_eq!(client.command(99, 0, 0, 0), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_FLUSH, wire::CMD_FLAG_NO_HOLE, 0, 0), wire::EINVAL);
    assert_eq!(client.command(wire::CMD_READ, 1 << 9, 0, 512), wire::EINVAL);
    assert_eq!(client.write(wire::CMD_FLAG_NO_HOLE, 0, &[1; 512]), wire::EINVAL);
    // Nothing of the refused writes landed; valid requests work on the same connection.
    assert_eq!(client.read_data(SIZE - 512, 512), vec![0; 512]);
    assert_eq!(client.read_data(0, 512), vec![0; 512]);
    assert_eq!(client.write(wire::CMD_FLAG_FUA, 65536, &[7; 4096]), 0);
    assert_eq!(client.command(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE, 66560, 1024), 0);
    assert_eq!(client.command(wire::CMD_TRIM, wire::CMD_FLAG_FUA, 131072, 65536), 0);
    assert_eq!(client.command(wire::CMD_FLUSH, 0, 0, 0), 0);
    let mut expected = vec![7; 4096];
    expected[1024..2048].fill(0);
    assert_eq!(client.read_data(65536, 4096), expected);
    // A write of 4 GiB - 1 is refused at once, without reading (or allocating) its payload;
    // the connection then ends, as its payload cannot be skipped.
    client.request(wire::CMD_WRITE, 0, 0, u32::MAX, &[]);
    assert_eq!(client.reply(), wire::EINVAL);
    assert!(client.is_closed());
    assert_serving(&mut server);
}

#[test]
fn fua_is_accepted_on_every_command_as_the_protocol_requires() {
    // SEND_FUA is advertised, so "the server MUST accept all commands with this bit set (even
    // by ignoring the bit)": clients are known to set it on others (QEMU 2.x on FLUSH).
    let (mut server, _dir) = start("fua-everywhere", &[]);
    let (mut client, flags) = Client::transmission(&server);
    assert_ne!(flags & wire::TFLAG_SEND_FUA, 0);
    let fua = wire::CMD_FLAG_FUA;
    assert_eq!(client.write(fua, 4096, &[0x42; 4096]), 0);
    assert_eq!(client.command(wire::CMD_FLUSH, fua, 0, 0), 0, "FLUSH with FUA");
    assert_eq!(client.command(wire::CMD_CACHE, fua, 0, 8192), 0, "CACHE with FUA");
    assert_eq!(client.command(wire::CMD_READ, fua, 4096, 4096), 0, "READ with FUA");
    assert_eq!(client.read(4096), vec![0x42; 4096]);
    // Unknown bits beside FUA are still refused.
    assert_eq!(client.command(wire::CMD_READ, fua | 1 << 9, 4096, 512), wire::EINVAL);
    assert_serving(&mut server);
}

#[test]
fn a_read_only_export_refuses_every_write_with_eperm() {
    let (mut server, _dir) = start("eperm", &["-r"]);
    let (mut client, flags) = Client::transmission(&server);
    assert_ne!(flags & wire::TFLAG_READ_ONLY, 0, "READ_ONLY must be advertised");
    assert_eq!(client.write(0, 0, &[1; 512]), wire::EPERM);
    assert_eq!(client.command(wire::CMD_TRIM, 0, 0, 4096), wire::EPERM);
    assert_eq!(client.command(wire::CMD_WRITE_ZEROES, 0, 0, 4096), wire::EPERM);
    assert_eq!(client.read_data(0, 512), vec![0; 512]);
    assert_eq!(client.command(wire::CMD_FLUSH, 0, 0, 0), 0);
    client.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(client.is_closed());
    assert!(server.is_running());
}

/// Without `-t`, the server exits after a client that reached transmission, as qemu-nbd does
/// (its `nbd_client_closed` counts negotiated clients only): clients that abort, break or
/// drop the handshake (`nbdinfo --list`, a health check, a port scan) must not end it before
/// the client it is meant for has come.
#[test]
fn without_persistent_only_a_client_that_reached_transmission_ends_the_server() {
    let dir = temp_dir("oneshot-handshakes");
    let image = qcow2_image(&dir, "1M");
    let server = Server::start(&dir, &image, &["-f", "qcow2", "--iothreads", "1"]);
    // Each is closed by the server (or was dropped) before the next: one at a time.
    let mut aborted = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    aborted.option(wire::OPT_ABORT, &[]);
    assert_eq!(aborted.option_reply().kind, wire::REP_ACK);
    assert!(aborted.is_closed());
    let mut unknown_flags = Client::with_flags(&server, 1 << 7);
    assert!(unknown_flags.is_closed(), "unknown client flags must close the connection");
    let mut unknown_export = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    unknown_export.option(wire::OPT_EXPORT_NAME, b"nope");
    assert!(unknown_export.is_closed());
    let mut hung_up = Client::connect(&server);
    hung_up.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(hung_up.is_closed());
    // The client it was started for is served, and its leaving ends the server.
    let (mut client, _) = Client::transmission(&server);
    assert_eq!(client.write(0, 0, &[9; 512]), 0);
    client.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(client.is_closed());
    assert!(server.wait_exit().success(), "the server must exit after its client");
}
