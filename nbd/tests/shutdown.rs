//! SIGTERM and SIGINT shut the server down in order: connected clients are disconnected,
//! written data are flushed to the image, the socket and pid file are removed, exit 0.

mod common;

use common::client::Client;
use common::{Server, qcow2_image, run_ok, temp_dir};

fn shuts_down_on(signal: &str) {
    let dir = temp_dir(&format!("signal-{signal}"));
    let image = qcow2_image(&dir, "1M");
    let mut server = Server::start(&dir, &image, &["-t", "-e", "4", "--iothreads", "2"]);
    let (mut writer, _) = Client::transmission(&server);
    // A write without FUA or flush: only the shutdown's flush makes it durable.
    assert_eq!(writer.write(0, 4096, &[0x3c; 8192]), 0);
    let (mut idle, _) = Client::transmission(&server);
    server.signal(signal);
    assert!(writer.is_closed() && idle.is_closed(), "connections must be closed");
    let status = server.wait_exit();
    assert!(status.success(), "aiocoro-nbd exited with {status} on SIG{signal}");
    assert!(!dir.join("nbd.sock").exists() && !dir.join("nbd.pid").exists());
    let path = image.to_str().unwrap();
    run_ok("qemu-img", &["check", path]);
    let read = run_ok("qemu-io", &["-f", "qcow2", "-c", "read -P 0x3c 4096 8192", path]);
    assert!(!read.contains("Pattern verification failed"), "qemu-io: {read}");
}

#[test]
fn sigterm_disconnects_clients_flushes_and_exits() {
    shuts_down_on("TERM");
}

#[test]
fn sigint_disconnects_clients_flushes_and_exits() {
    shuts_down_on("INT");
}
