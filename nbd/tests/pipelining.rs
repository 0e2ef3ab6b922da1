//! Requests sent back to back without waiting for replies: they run concurrently, each is
//! answered exactly once (in any order), and `DISC` lets the running ones finish first.

mod common;

use std::collections::HashMap;

use aiocoro_nbd::wire;
use common::client::{Client, request_bytes};
use common::{Server, qcow2_image, temp_dir};

/// Requests per batch: more than the per-connection in-flight limit, so that the reader
/// also waits for room.
const BATCH: u64 = 3 * aiocoro_nbd::transmission::MAX_IN_FLIGHT as u64;
const BLOCK: u32 = 4096;

/// The contents of block `n`.
fn pattern(n: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (n as u32 * 7 + i) as u8).collect()
}

#[test]
fn pipelined_writes_and_reads_are_each_answered_once() {
    let dir = temp_dir("pipelining");
    let image = qcow2_image(&dir, "1M");
    let server = Server::start(&dir, &image, &["-t", "--iothreads", "2"]);
    let (mut client, _) = Client::transmission(&server);

    let mut writes = Vec::new();
    for n in 0..BATCH {
        let offset = n * u64::from(BLOCK);
        writes.extend(request_bytes(wire::CMD_WRITE, 0, n, offset, BLOCK, &pattern(n)));
    }
    // Sent from another thread: the server may answer before it has read everything.
    let mut sender = client.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || std::io::Write::write_all(&mut sender, &writes));
    let mut answered = HashMap::new();
    for _ in 0..BATCH {
        let (error, cookie) = client.any_reply();
        assert_eq!(error, 0, "write {cookie} failed");
        assert!(answered.insert(cookie, ()).is_none(), "write {cookie} answered twice");
    }
    sending.join().unwrap().expect("send the writes");
    assert_eq!(answered.len() as u64, BATCH);

    let mut reads = Vec::new();
    for n in 0..BATCH {
        reads.extend(request_bytes(wire::CMD_READ, 0, n, n * u64::from(BLOCK), BLOCK, &[]));
    }
    client.send(&reads);
    let mut seen = HashMap::new();
    for _ in 0..BATCH {
        let (error, cookie) = client.any_reply();
        assert_eq!(error, 0, "read {cookie} failed");
        let data = client.read(BLOCK as usize);
        assert_eq!(data, pattern(cookie), "read {cookie} returned another block's data");
        assert!(seen.insert(cookie, ()).is_none(), "read {cookie} answered twice");
    }

    // Writes followed at once by DISC: every write is answered before the server closes.
    let mut burst = Vec::new();
    for n in 0..BATCH {
        let offset = n * u64::from(BLOCK);
        burst.extend(request_bytes(
            wire::CMD_WRITE,
            wire::CMD_FLAG_FUA,
            n,
            offset,
            BLOCK,
            &[9; 4096],
        ));
    }
    burst.extend(request_bytes(wire::CMD_DISC, 0, 0, 0, 0, &[]));
    let mut sender = client.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || std::io::Write::write_all(&mut sender, &burst));
    for _ in 0..BATCH {
        assert_eq!(client.any_reply().0, 0);
    }
    sending.join().unwrap().expect("send the burst");
    assert!(client.is_closed(), "DISC must close the connection after the replies");
}
