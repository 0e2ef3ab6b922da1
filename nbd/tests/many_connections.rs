//! A thousand idle connections, active clients beside them, and clients that hang up in the
//! middle of a request: everything is served, and afterwards the server holds no more
//! connections, requests (coroutines), request buffers or descriptors than before. More
//! clients than the server has descriptors for: it keeps serving, and accepts again later.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use aiocoro_nbd::wire;
use common::client::{Client, SIZE, request_bytes};
use common::{Server, qcow2_image, temp_dir};

/// Idle connections held open while the others run.
const IDLE: usize = 1000;

/// The open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the server's descriptors").count()
}

/// What the descriptors of process `pid` refer to, for a failure message.
fn descriptor_targets(pid: u32) -> Vec<String> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the descriptors");
    let target = |entry: std::fs::DirEntry| std::fs::read_link(entry.path()).ok();
    entries.flatten().filter_map(target).map(|path| path.display().to_string()).collect()
}

/// The complete stats lines of the server's log.
fn stats_lines(server: &Server) -> Vec<String> {
    let log = server.log();
    let complete = log.split_inclusive('\n').filter(|line| line.ends_with('\n'));
    complete.filter(|line| line.contains("stats:")).map(str::to_owned).collect()
}

/// The server's live counts (connections, requests, request bytes), asked for with SIGUSR1.
fn live_counts(server: &mut Server) -> [i64; 3] {
    let lines = |server: &Server| stats_lines(server).len();
    let before = lines(server);
    server.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(server) == before {
        assert!(Instant::now() < deadline, "no stats line after SIGUSR1");
        std::thread::sleep(Duration::from_millis(5));
    }
    let line = stats_lines(server).pop().expect("a stats line");
    let value = |key: &str| -> i64 {
        let start = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("{key} in {line}"));
        let digits = line[start + key.len() + 1..].split_whitespace().next().unwrap();
        digits.parse().unwrap_or_else(|_| panic!("{key} in {line}"))
    };
    [value("connections"), value("requests"), value("request-bytes")]
}

/// Waits (at most 20 s) until the server is back to `counts` and (if given) `fds`
/// descriptors; returns its descriptors.
fn wait_for_baseline(server: &mut Server, counts: [i64; 3], fds: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (now, now_fds) = (live_counts(server), descriptors(server.pid()));
        if now == counts && fds.is_none_or(|fds| fds == now_fds) {
            return now_fds;
        }
        assert!(
            Instant::now() < deadline,
            "leak: counts {now:?} (were {counts:?}), descriptors {now_fds} (were {fds:?}): {:?}",
            descriptor_targets(server.pid())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A persistent server of `image` on two IoThreads serving `shared` clients at once, once a
/// client on each IoThread (round robin) has come and gone, so that what each creates lazily
/// (its io_uring ring, pools) exists before anything is counted; with its descriptor count.
fn settled_server(dir: &Path, image: &Path, shared: &str) -> (Server, usize) {
    let mut server = Server::start_logged(dir, image, &["-t", "-e", shared, "--iothreads", "2"]);
    active_client(&server, 0, 1);
    active_client(&server, 1, 1);
    let fds = wait_for_baseline(&mut server, [0, 0, 0], None);
    (server, fds)
}

/// Writes then reads back its own 64 KiB blocks, `rounds` times.
fn active_client(server: &Server, slot: u64, rounds: u8) {
    let (mut client, _) = Client::transmission(server);
    for round in 0..rounds {
        let data = vec![round ^ slot as u8; 65536];
        let offset = slot * 65536;
        assert_eq!(client.write(0, offset, &data), 0);
        assert_eq!(client.read_data(offset, 65536), data, "slot {slot} round {round}");
    }
    client.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(client.is_closed());
}

#[test]
fn a_thousand_idle_clients_and_hang_ups_mid_request_leak_nothing() {
    let dir = temp_dir("many");
    let image = qcow2_image(&dir, "1M");
    let (mut server, fds) = settled_server(&dir, &image, "2000");
    let baseline = [0, 0, 0];

    let idle: Vec<Client> = (0..IDLE).map(|_| Client::transmission(&server).0).collect();
    let counts = live_counts(&mut server);
    assert_eq!(counts[0], IDLE as i64, "every idle client is served at once (-e 2000)");

    std::thread::scope(|scope| {
        for slot in 0..8 {
            let server = &server;
            scope.spawn(move || active_client(server, slot, 20));
        }
        for n in 0..50u64 {
            let server = &server;
            scope.spawn(move || {
                let (mut client, _) = Client::transmission(server);
                if n % 2 == 0 {
                    // A write whose payload stops halfway.
                    let header = request_bytes(wire::CMD_WRITE, 0, n, 0, 65536, &[7; 32768]);
                    client.send(&header);
                } else {
                    // Pipelined reads, then gone without reading a reply.
                    let mut burst = Vec::new();
                    for cookie in 0..32 {
                        burst.extend(request_bytes(wire::CMD_READ, 0, cookie, 0, 32768, &[]));
                    }
                    client.send(&burst);
                }
                drop(client);
            });
        }
    });
    // The idle clients are still served.
    for client in idle.iter().step_by(97) {
        let mut client = Client { stream: client.stream.try_clone().unwrap() };
        assert_eq!(client.read_data(SIZE - 4096, 4096).len(), 4096);
    }
    drop(idle);
    wait_for_baseline(&mut server, baseline, Some(fds));
    // And the server goes on serving.
    active_client(&server, 3, 2);
    server.signal("TERM");
    assert!(server.wait_exit().success());
}

/// The resident memory of process `pid`, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn a_client_that_stops_reading_replies_holds_bounded_memory() {
    const READS: usize = 20_000; // 80 MiB of replies
    let dir = temp_dir("stops-reading");
    let image = qcow2_image(&dir, "1M");
    let mut server = Server::start_logged(&dir, &image, &["-t", "--iothreads", "1"]);
    active_client(&server, 0, 1);
    let before = resident(server.pid());
    let (client, _) = Client::transmission(&server);
    let mut sender = client.stream.try_clone().unwrap();
    sender.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let sending = std::thread::spawn(move || {
        let mut burst = Vec::new();
        for cookie in 0..READS as u64 {
            burst.extend(request_bytes(wire::CMD_READ, 0, cookie, 0, 4096, &[]));
        }
        // Blocks once the server stops reading (back-pressure); ends when the test hangs up.
        let _ = std::io::Write::write_all(&mut sender, &burst);
    });
    std::thread::sleep(Duration::from_secs(2));
    let grown = resident(server.pid()).saturating_sub(before);
    let counts = live_counts(&mut server);
    assert!(grown < 32 << 20, "the server grew by {grown} bytes for a client that reads nothing");
    assert!(counts[1] <= 32, "{} requests run for one connection (limit 32)", counts[1]);
    client.stream.shutdown(std::net::Shutdown::Both).unwrap();
    sending.join().unwrap();
    wait_for_baseline(&mut server, [0, 0, 0], None);
}

/// More clients than the server has descriptors for: with two served at once (`-e 2`), the
/// others wait holding a descriptor each, until `accept` fails with `EMFILE`. The server must
/// neither exit nor drop the clients it serves, and must accept again once descriptors are
/// free.
#[test]
fn running_out_of_descriptors_drops_no_client_and_accepting_resumes() {
    const LIMIT: u64 = 48;
    let dir = temp_dir("out-of-descriptors");
    let image = qcow2_image(&dir, "1M");
    let args = ["-t", "-e", "2", "--iothreads", "1"];
    let mut server = Server::start_with_fd_limit(&dir, &image, &args, LIMIT);
    let (mut first, _) = Client::transmission(&server);
    let (mut second, _) = Client::transmission(&server);
    // (A connection refused is a server that exited: the assertion below says so.)
    let waiting: Vec<UnixStream> =
        (0..LIMIT + 16).filter_map(|_| UnixStream::connect(&server.socket).ok()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.is_running() && descriptors(server.pid()) < LIMIT as usize {
        assert!(Instant::now() < deadline, "the server never used up its descriptors");
        std::thread::sleep(Duration::from_millis(5));
    }
    // accept now fails each time the server tries.
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.is_running(), "the server exited when it ran out of descriptors");
    assert_eq!(first.write(0, 0, &[1; 4096]), 0, "a served client was dropped");
    assert_eq!(second.read_data(0, 4096), vec![1; 4096], "a served client was dropped");
    // The waiting clients hang up, one served client leaves: a new client is served.
    drop(waiting);
    first.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(first.is_closed());
    let (mut third, _) = Client::transmission(&server);
    assert_eq!(third.read_data(0, 4096), vec![1; 4096]);
    assert!(server.log().contains("Too many open files"), "unreported: {}", server.log());
}

/// Clients that hang up (half-close) after each byte of a handshake, from none to all of it:
/// each connection is closed by the server, which then holds no connection or descriptor more
/// than before and goes on serving.
#[test]
fn hang_ups_at_every_byte_of_the_handshake_leak_nothing() {
    let dir = temp_dir("handshake-hang-ups");
    let image = qcow2_image(&dir, "1M");
    let (mut server, fds) = settled_server(&dir, &image, "4");
    let option = |option: u32, data: &[u8]| {
        let mut bytes = wire::OPTION_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    };
    let mut meta = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    meta.extend_from_slice(b"base:allocation");
    let handshake = [
        (wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES).to_be_bytes().to_vec(),
        option(wire::OPT_STRUCTURED_REPLY, &[]),
        option(wire::OPT_SET_META_CONTEXT, &meta),
        option(wire::OPT_LIST, &[]),
        option(42, b"unknown"),
        option(wire::OPT_INFO, &[0, 0, 0, 0, 0, 1, 0, 3]),
        option(wire::OPT_GO, &[0, 0, 0, 0, 0, 0]),
    ]
    .concat();
    for cut in 0..=handshake.len() {
        let mut client = Client::connect(&server);
        client.send(&handshake[..cut]);
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        // The replies to what was sent, then the end (a reset if the server left bytes unread).
        let mut answers = Vec::new();
        match std::io::Read::read_to_end(&mut client.stream, &mut answers) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(error) => panic!("hung up after {cut} bytes: the server did not close: {error}"),
        }
    }
    wait_for_baseline(&mut server, [0, 0, 0], Some(fds));
    active_client(&server, 2, 1);
}
