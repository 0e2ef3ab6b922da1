//! The echo server of `examples/echo_server.rs`, driven by real TCP clients on other threads:
//! every byte comes back in order, a client that resets its connection disturbs nobody else,
//! and both stop modes end `serve` cleanly.

#[path = "../examples/echo_server.rs"]
#[allow(dead_code)]
mod echo_server;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use aiocoro::aio::AioContext;
use echo_server::{ServeStats, StopMode, StopSignal, serve};

/// Bytes each well-behaved client sends.
const MESSAGE_LEN: usize = 64 * 1024;

/// A small deterministic generator (splitmix64) for message contents and chunk sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A size in `1..=max`.
    fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}

/// `len` pseudo-random bytes, different for every seed.
fn message(seed: u64, len: usize) -> Arc<[u8]> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Panics with the first difference between what was sent and what came back.
fn assert_echoed(client: u64, sent: &[u8], received: &[u8]) {
    if let Some(at) = sent.iter().zip(received).position(|(a, b)| a != b) {
        panic!(
            "client {client}: byte {at} came back as {:#04x}, sent {:#04x}",
            received[at], sent[at]
        );
    }
    assert_eq!(received.len(), sent.len(), "client {client}: wrong number of bytes came back");
}

/// A server running `serve` on a thread of its own with its own context, like an IoThread.
struct RunningServer {
    addr: SocketAddr,
    stop: StopSignal,
    thread: JoinHandle<io::Result<ServeStats>>,
}

impl RunningServer {
    fn start() -> RunningServer {
        RunningServer::start_with(StopSignal::new())
    }

    /// Starts a server that `stop` stops.
    fn start_with(stop: StopSignal) -> RunningServer {
        // Bound before the thread starts, so clients may connect at once.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let signal = stop.clone();
        let thread = thread::Builder::new()
            .name("echo-server".into())
            .spawn(move || {
                let ctx = AioContext::new()?;
                let stats = serve(&ctx, listener, &signal)?;
                assert_eq!(ctx.suspended_coroutines(), 0, "serve left coroutines suspended");
                Ok(stats)
            })
            .unwrap();
        RunningServer { addr, stop, thread }
    }

    /// Requests a stop and returns what `serve` returned.
    fn stop(self, mode: StopMode) -> ServeStats {
        self.stop.stop(mode);
        self.thread.join().expect("the server thread panicked").expect("serve failed")
    }
}

/// Sends `MESSAGE_LEN` bytes made from `seed` in uneven chunks from one thread while reading
/// the echo in uneven reads on another, then checks every byte.
fn well_behaved_client(addr: SocketAddr, seed: u64) {
    let sent = message(seed, MESSAGE_LEN);
    let mut stream = TcpStream::connect(addr).unwrap();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let sent = sent.clone();
        thread::spawn(move || {
            let mut rng = Rng(!seed);
            let mut offset = 0;
            while offset < sent.len() {
                let end = (offset + rng.size(5000)).min(sent.len());
                stream.write_all(&sent[offset..end]).unwrap();
                offset = end;
            }
            // The server sees an end of file once it has read everything, echoes the rest
            // and closes, which ends the reads below.
            stream.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut rng = Rng(seed.rotate_left(17));
    let mut received = Vec::with_capacity(MESSAGE_LEN);
    let mut buffer = vec![0; 7000];
    loop {
        let want = rng.size(buffer.len());
        match stream.read(&mut buffer[..want]).unwrap() {
            0 => break,
            read => received.extend_from_slice(&buffer[..read]),
        }
    }
    writer.join().unwrap();
    assert_echoed(seed, &sent, &received);
}

/// Sends a message, reads the start of its echo, waits until more of the echo is waiting
/// unread and closes: with unread data the kernel resets the connection instead of closing it
/// in order, so the server's next read or write on it fails. Returns how much it sent.
fn resetting_client(addr: SocketAddr) -> usize {
    let seed = 0xdead_beef;
    let sent = message(seed, MESSAGE_LEN);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&sent).unwrap();
    let mut start = vec![0; 1024];
    stream.read_exact(&mut start).unwrap();
    assert_echoed(seed, &sent[..start.len()], &start);
    let mut byte = [0];
    assert_eq!(stream.peek(&mut byte).unwrap(), 1, "more of the echo is on its way");
    drop(stream);
    sent.len()
}

#[test]
fn concurrent_clients_get_every_byte_back_and_a_reset_disturbs_nobody() {
    const CLIENTS: u64 = 8;
    let server = RunningServer::start();
    let addr = server.addr;
    let clients: Vec<_> =
        (0..CLIENTS).map(|seed| thread::spawn(move || well_behaved_client(addr, seed))).collect();
    let resetter = thread::spawn(move || resetting_client(addr));
    for client in clients {
        client.join().expect("a client failed");
    }
    let reset_sent = resetter.join().expect("the resetting client failed");
    // The server still accepts and serves after the reset.
    well_behaved_client(addr, CLIENTS);

    // Draining returns only once every connection coroutine has ended, the reset one included.
    let stats = server.stop(StopMode::Drain);
    let served = CLIENTS + 1;
    assert_eq!(stats.accepted, served + 1, "{stats:?}");
    assert_eq!(stats.completed, served, "every well-behaved connection ended cleanly: {stats:?}");
    assert_eq!(stats.failed, 1, "the reset connection ended with an error: {stats:?}");
    let clean_bytes = served * MESSAGE_LEN as u64;
    assert!(
        (clean_bytes + 1024..=clean_bytes + reset_sent as u64).contains(&stats.bytes_echoed),
        "{stats:?}"
    );
}

#[test]
fn drain_keeps_serving_open_connections_but_accepts_no_more() {
    let server = RunningServer::start();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let mut reply = [0; 5];
    stream.write_all(b"first").unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"first");

    server.stop.stop(StopMode::Drain);
    // A later request changes nothing: the first one wins.
    server.stop.stop(StopMode::Close);
    assert_eq!(server.stop.requested(), Some(StopMode::Drain));
    stream.write_all(b"after").unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"after", "the open connection is still served after the stop");
    assert!(!server.thread.is_finished(), "serve waits for the open connection");

    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(stream.read(&mut reply).unwrap(), 0, "the server closes after the end of file");
    let stats = server.thread.join().unwrap().unwrap();
    assert_eq!(
        stats,
        ServeStats { accepted: 1, completed: 1, failed: 0, bytes_echoed: 10 },
        "{stats:?}"
    );
}

#[test]
fn close_shuts_idle_connections_down_and_closes_the_listener() {
    let server = RunningServer::start();
    let addr = server.addr;
    let mut idle = TcpStream::connect(addr).unwrap();
    let mut reply = [0; 4];
    idle.write_all(b"ping").unwrap();
    idle.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping");
    // Now the connection's coroutine waits for more to read, which will never come.

    let stats = server.stop(StopMode::Close);
    assert_eq!(stats, ServeStats { accepted: 1, completed: 1, failed: 0, bytes_echoed: 4 });
    assert_eq!(idle.read(&mut reply).unwrap(), 0, "the server shut the connection down");
    let error = TcpStream::connect(addr).expect_err("the listener is closed");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
}

#[test]
fn one_signal_stops_servers_on_two_threads() {
    let stop = StopSignal::new();
    let servers =
        [RunningServer::start_with(stop.clone()), RunningServer::start_with(stop.clone())];
    // Each serves a connection, so that both accept loops are running before the stop.
    for server in &servers {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.write_all(b"hi").unwrap();
        let mut reply = [0; 2];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"hi");
    }
    stop.stop(StopMode::Drain);
    for server in servers {
        let stats = server.thread.join().unwrap().unwrap();
        assert_eq!(stats, ServeStats { accepted: 1, completed: 1, failed: 0, bytes_echoed: 2 });
    }
}

#[test]
fn a_stop_requested_before_serve_starts_returns_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stop = StopSignal::new();
    stop.stop(StopMode::Close);
    let ctx = AioContext::new().unwrap();
    let stats = serve(&ctx, listener, &stop).unwrap();
    assert_eq!(stats, ServeStats::default());
    assert_eq!(ctx.suspended_coroutines(), 0);
}
