//! SIGKILL while clients write and flush: every write acknowledged as durable (by a later
//! acknowledged `FLUSH`, or a `FUA` write's own reply) reads back afterwards, and `qemu-img
//! check` finds no corruption (leaked clusters, which a kill may leave, are allowed).
//!
//! `AIOCORO_NBD_CRASH_ROUNDS` (default 2) kills and checks that many times, each on a fresh
//! image; `AIOCORO_NBD_CRASH_MS` (default 700) is how long the clients write, from their first
//! durable batch, before the kill.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aiocoro_nbd::wire;
use common::client::{Client, request_bytes};
use common::{Server, qcow2_image, run, temp_dir};

/// Writers, each in a region of its own.
const WRITERS: u64 = 4;
/// The bytes of each writer's region.
const REGION: u64 = 16 << 20;
/// Writes sent back to back before their flush.
const BATCH: u64 = 8;
const BLOCK: u64 = 4096;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |value| value.parse().expect("a number"))
}

/// The content of the write with `tag`: the tag over and over (no two writes alike).
fn content(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat((BLOCK / 8) as usize)
}

/// Reads one simple reply; an error once the server is gone.
fn reply(stream: &mut UnixStream) -> io::Result<u32> {
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply)?;
    assert_eq!(reply[0..4], wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    Ok(u32::from_be_bytes(reply[4..8].try_into().unwrap()))
}

/// Writes the blocks of region `writer` in a shuffled order, batch after batch, each batch
/// made durable by a flush (or, one batch in four, by `FUA` on every write), until the
/// server dies; returns the (offset, tag) of every write acknowledged as durable, and counts
/// the durable batches in `batches`.
fn writer(server: &Server, writer: u64, batches: &AtomicUsize) -> Vec<(u64, u64)> {
    let (client, _, _) = Client::go(server);
    let mut stream = client.stream;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut blocks: Vec<u64> = (0..REGION / BLOCK).collect();
    let mut state = 0x2545_f491_4f6c_dd1d ^ writer;
    for i in (1..blocks.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        blocks.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let mut durable = Vec::new();
    for (batch_number, batch) in blocks.chunks(BATCH as usize).enumerate() {
        let fua = batch_number % 4 == 3;
        let flags = if fua { wire::CMD_FLAG_FUA } else { 0 };
        let writes: Vec<(u64, u64)> = batch
            .iter()
            .map(|&block| (writer * REGION + block * BLOCK, writer << 32 | block))
            .collect();
        let mut burst = Vec::new();
        for &(offset, tag) in &writes {
            let data = content(tag);
            burst.extend(request_bytes(wire::CMD_WRITE, flags, tag, offset, BLOCK as u32, &data));
        }
        if stream.write_all(&burst).is_err() {
            return durable;
        }
        // With FUA, a write whose reply was read before the kill is durable even if the
        // batch's other replies never come; keeping only whole batches is the simpler
        // (weaker) check.
        for _ in &writes {
            match reply(&mut stream) {
                Ok(0) => {}
                Ok(error) => panic!("a write failed with error {error}"),
                Err(_) => return durable,
            }
        }
        if fua {
            durable.extend(&writes);
            batches.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let flush = request_bytes(wire::CMD_FLUSH, 0, 0, 0, 0, &[]);
        if stream.write_all(&flush).is_err() {
            return durable;
        }
        match reply(&mut stream) {
            Ok(0) => {
                durable.extend(&writes);
                batches.fetch_add(1, Ordering::Relaxed);
            }
            Ok(error) => panic!("a flush failed with error {error}"),
            Err(_) => return durable,
        }
    }
    durable
}

fn kill_while_writing(round: u64, run_for: Duration) {
    let dir = temp_dir(&format!("crash-{round}"));
    let image = qcow2_image(&dir, &(WRITERS * REGION).to_string());
    let args = ["-t", "-e", "8", "--iothreads", "2", "--cache=none", "-f", "qcow2"];
    let mut server = Server::start(&dir, &image, &args);
    let pid = server.pid().to_string();
    let batches = &AtomicUsize::new(0);
    let durable: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let server_ref = &server;
        let writers: Vec<_> =
            (0..WRITERS).map(|n| scope.spawn(move || writer(server_ref, n, batches))).collect();
        // The clock starts at the first durable batch, so that a slow start (a loaded
        // machine) still leaves writes to check.
        let deadline = Instant::now() + Duration::from_secs(20);
        while batches.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(run_for);
        common::run_ok("kill", &["-KILL", &pid]);
        writers.into_iter().flat_map(|writer| writer.join().expect("a writer panicked")).collect()
    });
    let status = server.wait_exit();
    assert!(!status.success(), "the server must have been killed, not exit: {status}");
    assert!(!durable.is_empty(), "no write was acknowledged before the kill: a longer run?");

    // Leaked clusters (exit 3) are allowed after a kill; corruption (2) or errors are not.
    let path = image.to_str().unwrap();
    // The killed process's io_uring ring lets go of the file (and its image lock) a moment
    // after the process is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let check = loop {
        let check = run("qemu-img", &["check", path]);
        let locked = String::from_utf8_lossy(&check.stderr).contains("lock");
        if !locked || Instant::now() > deadline {
            break check;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        matches!(check.status.code(), Some(0 | 3)) && !output.contains("ERROR"),
        "qemu-img check after the kill: {output}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // On the killed server's socket path (the socket it left behind is replaced).
    let server = Server::start(&dir, &image, &["-r", "-t", "-f", "qcow2"]);
    let (mut client, _, _) = Client::go(&server);
    for &(offset, tag) in &durable {
        assert!(
            client.read_data(offset, BLOCK as u32) == content(tag),
            "round {round}: the durable write {tag:#x} at {offset} did not survive the kill"
        );
    }
    eprintln!("round {round}: {} durable writes read back after SIGKILL", durable.len());
}

#[test]
fn writes_acknowledged_as_durable_survive_sigkill() {
    let run_for = Duration::from_millis(env_number("AIOCORO_NBD_CRASH_MS", 700));
    for round in 0..env_number("AIOCORO_NBD_CRASH_ROUNDS", 2) {
        kill_while_writing(round, run_for);
    }
}
