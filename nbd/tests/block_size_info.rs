//! `NBD_INFO_BLOCK_SIZE`: the minimum block size is the node's alignment (an `O_DIRECT`
//! raw file here) for a client that asks for block sizes or only wants information, and 1
//! for a `GO` that does not ask (the block layer pads unaligned requests), as QEMU does.

mod common;

use aiocoro_nbd::wire;
use common::client::Client;
use common::{Server, temp_dir};

/// The (minimum, preferred, maximum) block sizes `option` (INFO or GO) reports, asking for
/// block sizes or not.
fn block_sizes(server: &Server, option: u32, ask: bool) -> (u32, u32, u32) {
    let mut client = Client::with_flags(server, wire::CLIENT_FIXED_NEWSTYLE);
    let mut payload = 0u32.to_be_bytes().to_vec();
    if ask {
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    } else {
        payload.extend_from_slice(&0u16.to_be_bytes());
    }
    client.option(option, &payload);
    let mut sizes = None;
    loop {
        let reply = client.option_reply();
        match reply.kind {
            wire::REP_ACK => break,
            wire::REP_INFO if reply.data[..2] == wire::INFO_BLOCK_SIZE.to_be_bytes() => {
                let word =
                    |at: usize| u32::from_be_bytes(reply.data[at..at + 4].try_into().unwrap());
                sizes = Some((word(2), word(6), word(10)));
            }
            wire::REP_INFO => {}
            other => panic!("option {option} answered with {other:#x}"),
        }
    }
    sizes.expect("no INFO_BLOCK_SIZE")
}

#[test]
fn the_minimum_block_size_is_the_alignment_for_clients_that_honour_it() {
    let dir = temp_dir("block-size");
    let image = dir.join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let server = Server::start(&dir, &image, &["-t", "-f", "raw", "--cache=none"]);
    let max = aiocoro_nbd::MAX_REQUEST;
    let (alignment, preferred, maximum) = block_sizes(&server, wire::OPT_INFO, false);
    assert!(alignment > 1 && alignment.is_power_of_two(), "O_DIRECT alignment {alignment}");
    assert_eq!((preferred, maximum), (alignment.max(4096), max));
    assert_eq!(block_sizes(&server, wire::OPT_INFO, true), (alignment, preferred, max));
    assert_eq!(block_sizes(&server, wire::OPT_GO, true), (alignment, preferred, max));
    assert_eq!(block_sizes(&server, wire::OPT_GO, false), (1, preferred, max));
}
