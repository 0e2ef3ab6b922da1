//! SIGTERM and SIGINT shut the server down in order: connected clients are disconnected,
//! written data are flushed to the image, the socket and pid file are removed, exit 0. A
//! server killed instead leaves its socket behind: the next one on that path replaces it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Runs the server on the Unix socket `socket` with `image`, which must refuse to start;
/// returns what it wrote on standard error.
fn refused_start(socket: &Path, image: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aiocoro-nbd"))
        .arg("-k")
        .arg(socket)
        .args(["-f", "qcow2"])
        .arg(image)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aiocoro-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll the server").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("the server's output");
    assert!(!output.status.success(), "the server started on {}", socket.display());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_socket_left_by_a_killed_server_is_replaced_but_a_live_one_is_not() {
    let dir = temp_dir("stale-socket");
    let image = qcow2_image(&dir, "1M");
    let mut killed = Server::start(&dir, &image, &["-t"]);
    killed.signal("KILL");
    assert!(!killed.wait_exit().success());
    assert!(dir.join("nbd.sock").exists(), "SIGKILL leaves the socket behind");
    // The next server on that path starts and serves.
    let server = Server::start(&dir, &image, &["-t", "-e", "4"]);
    let (mut client, _) = Client::transmission(&server);
    assert_eq!(client.read_data(0, 512), vec![0; 512]);
    // A live server's socket is not taken over (another image: this one is locked).
    let other = dir.join("other.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", other.to_str().unwrap(), "1M"]);
    let error = refused_start(&dir.join("nbd.sock"), &other);
    assert!(error.contains("in use"), "{error}");
    assert_eq!(client.read_data(0, 512), vec![0; 512], "the live server lost its client");
    let (mut second, _) = Client::transmission(&server);
    assert_eq!(second.read_data(0, 512), vec![0; 512], "the live server lost its socket");
    // Nor is a file that is not a socket.
    let plain = dir.join("plain");
    std::fs::write(&plain, b"not a socket").unwrap();
    let error = refused_start(&plain, &other);
    assert!(error.contains("in use"), "{error}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"not a socket");
}
