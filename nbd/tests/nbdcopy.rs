//! `nbdcopy --connections 4` out of the server and into it (multi-connection, sparse copies
//! through `base:allocation`), compared byte for byte with the image.

mod common;

use common::{Server, qcow2_image, run_ok, temp_dir};

#[test]
fn nbdcopy_with_four_connections_copies_out_and_in_byte_for_byte() {
    let dir = temp_dir("nbdcopy");
    let image = qcow2_image(&dir, "64M");
    let path = image.to_str().unwrap();
    let writes = [
        "write -P 0x41 0 5M",
        "write -P 0x42 17M 3M",
        "write -z 18M 64k",
        "write -P 0x43 40M 1M",
        "write -P 0x44 63M 1M",
    ];
    let mut args = vec!["-f", "qcow2"];
    for write in &writes {
        args.extend(["-c", write]);
    }
    args.push(path);
    run_ok("qemu-io", &args);
    let copy = dir.join("copy.raw");
    let copy = copy.to_str().unwrap();
    {
        let server = Server::start(&dir, &image, &["-r", "-t", "-e", "8", "--iothreads", "2"]);
        run_ok("nbdcopy", &["--connections", "4", &server.url(""), copy]);
    }
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", copy, path]);
    // Into a fresh image through the server, then compared with the copy.
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    let fresh = qcow2_image(&target, "64M");
    let server = Server::start(&target, &fresh, &["-t", "-e", "8", "--iothreads", "2"]);
    run_ok("nbdcopy", &["--connections", "4", "--flush", copy, &server.url("")]);
    run_ok("qemu-img", &["compare", "-U", "-f", "raw", "-F", "raw", copy, &server.url("")]);
    drop(server);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", copy, fresh.to_str().unwrap()]);
}
