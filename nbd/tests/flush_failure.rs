//! A flush that fails on the server's disk fails the client's `FLUSH` with `EIO`, and so does
//! every later `FLUSH` and `FUA` request (a failed `fdatasync` may have dropped written data,
//! which no later flush can prove stable); the server's flush at exit fails too, and it exits
//! with failure. No success after the failure, whichever I/O engine flushes.
//!
//! The failure is injected by the block layer's `LD_PRELOAD` shim (`block/tests/fault`,
//! built with `cc`): the server's second flush of the image fails, in libc's `fdatasync`
//! (`--aio=threads`) or in its io_uring submission.

mod common;
#[path = "../../block/tests/fault/shim.rs"]
mod shim;

use std::path::Path;

use aiocoro_nbd::wire;
use common::client::Client;
use common::{Server, temp_dir};

#[test]
fn a_failed_flush_fails_that_flush_every_later_one_and_the_exit() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../block/tests/fault/fail_sync.c");
    let shim = shim::build_shim(&source);
    for (aio, via) in [("threads", "libc"), ("io_uring", "io_uring")] {
        let dir = temp_dir(&format!("flush-failure-{aio}"));
        let image = dir.join("disk.raw");
        std::fs::write(&image, vec![0; 1 << 20]).unwrap();
        let target = image.canonicalize().unwrap();
        let env = [
            ("LD_PRELOAD", shim.as_os_str()),
            ("FAIL_SYNC_PATH", target.as_os_str()),
            ("FAIL_SYNC_NTH", "2".as_ref()),
            ("FAIL_SYNC_VIA", via.as_ref()),
        ];
        let aio_arg = format!("--aio={aio}");
        let mut server = Server::start_with_env(&dir, &image, &["-t", "-f", "raw", &aio_arg], &env);
        let (mut client, _) = Client::transmission(&server);
        let flush = |client: &mut Client| client.command(wire::CMD_FLUSH, 0, 0, 0);
        assert_eq!(client.write(0, 0, &[1; 4096]), 0);
        assert_eq!(flush(&mut client), 0, "{aio}: the first flush");
        assert_eq!(client.write(0, 4096, &[2; 4096]), 0);
        assert_eq!(flush(&mut client), wire::EIO, "{aio}: the flush that failed");
        assert_eq!(flush(&mut client), wire::EIO, "{aio}: a flush after the failed one");
        let fua = wire::CMD_FLAG_FUA;
        assert_eq!(client.write(fua, 8192, &[3; 4096]), wire::EIO, "{aio}: a FUA write");
        let zeroes = client.command(wire::CMD_WRITE_ZEROES, fua, 0, 4096);
        assert_eq!(zeroes, wire::EIO, "{aio}: FUA write zeroes");
        // Stopped, the server cannot make the writes durable either, and says so.
        server.signal("TERM");
        assert!(client.is_closed());
        let status = server.wait_exit();
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
        assert!(!status.success(), "{aio}: exit {status} after a failed flush: {log}");
        assert_eq!(log.matches("fail_sync: injected EIO").count(), 1, "{aio}: {log}");
        assert!(log.contains("an earlier flush failed"), "{aio}: {log}");
    }
    let _ = std::fs::remove_file(shim);
}
