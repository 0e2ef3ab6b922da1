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
