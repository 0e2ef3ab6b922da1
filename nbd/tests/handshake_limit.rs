//! A client that connects and never finishes the handshake is cut off after the handshake
//! limit (`--handshake-limit`, 10 s by default, as in `qemu-nbd`), so that it cannot hold a
//! slot of `-e` (with the default `-e 1`, the only one) for ever; the limit ends with the
//! handshake.

mod common;

use std::time::{Duration, Instant};

use aiocoro_nbd::wire;
use common::client::Client;
use common::{qcow2_image, temp_dir};

#[test]
fn a_client_stalled_in_the_handshake_is_cut_off_and_the_next_one_is_served() {
    let dir = temp_dir("handshake-limit");
    let image = qcow2_image(&dir, "1M");
    // One client at a time (the default -e 1).
    let server = common::Server::start_logged(&dir, &image, &["-t", "--handshake-limit", "1"]);

    // Silent after the greeting: the next client waits for the slot until the limit.
    let started = Instant::now();
    let mut silent = Client::connect(&server);
    let (mut next, _) = Client::transmission(&server);
    assert!(silent.is_closed(), "the stalled client must be disconnected");
    assert!(started.elapsed() >= Duration::from_millis(900), "cut off before the limit");
    // In transmission the limit no longer applies.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(next.write(0, 0, &[5; 512]), 0);
    next.request(wire::CMD_DISC, 0, 0, 0, &[]);
    assert!(next.is_closed());

    // Stalled in the middle of an option: its flags and half an option header.
    let mut partial = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    partial.send(&wire::OPTION_MAGIC.to_be_bytes());
    let (mut last, _) = Client::transmission(&server);
    assert!(partial.is_closed(), "the stalled client must be disconnected");
    assert_eq!(last.read_data(0, 512), vec![5; 512]);
    let log = server.log();
    assert!(log.contains("did not finish the handshake within 1 s"), "server log: {log}");
}

/// A client that pipelines options without end, reading the replies as fast as they come, never
/// makes the server wait for its socket; the negotiation must still let the other connections
/// of its IoThread run (here with no handshake limit, which would otherwise end the attack).
#[test]
fn a_client_pipelining_options_without_end_does_not_starve_its_neighbours() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = temp_dir("option-flood");
    let image = qcow2_image(&dir, "1M");
    let args = ["-t", "-e", "4", "--iothreads", "1", "--handshake-limit", "0"];
    let server = common::Server::start_logged(&dir, &image, &args);
    let (mut neighbour, _) = Client::transmission(&server);
    let attacker = Client::with_flags(&server, wire::CLIENT_FIXED_NEWSTYLE);
    let mut list = wire::OPTION_MAGIC.to_be_bytes().to_vec();
    list.extend_from_slice(&wire::OPT_LIST.to_be_bytes());
    list.extend_from_slice(&0u32.to_be_bytes());
    let burst = list.repeat(16384);
    let stop = &AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (mut sender, mut receiver) = (&attacker.stream, &attacker.stream);
        scope.spawn(
            move || {
                while !stop.load(Ordering::Relaxed) && sender.write_all(&burst).is_ok() {}
            },
        );
        let (flowing, under_way) = std::sync::mpsc::channel();
        let draining = scope.spawn(move || {
            let mut replies = vec![0; 1 << 20];
            let mut received = 0;
            while !stop.load(Ordering::Relaxed) {
                match receiver.read(&mut replies) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => received += read,
                }
                let _ = flowing.send(());
            }
            received
        });
        let timeout = std::time::Duration::from_secs(10);
        under_way.recv_timeout(timeout).expect("the attacker's replies never came");
        // The neighbour is answered while the flood goes on (its read times out after 10 s).
        neighbour.stream.set_read_timeout(Some(timeout)).unwrap();
        neighbour.request(wire::CMD_READ, 0, 0, 512, &[]);
        let mut reply = [0; 16];
        let answered = neighbour.stream.read_exact(&mut reply);
        stop.store(true, Ordering::Relaxed);
        attacker.stream.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(answered.is_ok(), "the neighbour starved: {answered:?}");
        assert!(draining.join().unwrap() > 0, "the attacker got no reply");
    });
}
