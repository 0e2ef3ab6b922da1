//! Real clients against the `aiocoro-nbd` binary: `qemu-img` and `qemu-io` over
//! `nbd+unix://`, a qcow2 image behind the server.

mod common;

use common::{Server, qcow2_image, run, run_ok, temp_dir};

#[test]
fn qemu_io_writes_read_back_and_the_image_matches() {
    let dir = temp_dir("interop");
    let image = qcow2_image(&dir, "64M");
    let server = Server::start(
        &dir,
        &image,
        &["-f", "qcow2", "-t", "-e", "4", "--iothreads", "2", "-x", "disk", "-D", "test disk"],
    );
    let url = server.url("disk");
    let info = run_ok("qemu-img", &["info", "--output=json", &url]);
    assert!(info.contains("\"virtual-size\": 67108864"), "qemu-img info: {info}");

    let io = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 64k",
            "-c",
            "read -P 0xab 4096 64k",
            "-c",
            "aio_write -P 0x5c 1M 12k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x5c 1M 12k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "write -P 0x77 3M 128k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0x77 3136k 64k",
            "-c",
            "write -f -P 0x31 63M 1M",
            "-c",
            "flush",
            &url,
        ],
    );
    assert!(!io.contains("Pattern verification failed"), "qemu-io: {io}");
    assert!(!io.to_lowercase().contains("error") && !io.contains("failed"), "qemu-io: {io}");

    // Through the server (another connection) and in the file (shared lock: the server
    // holds it for writing) the data are the same.
    run_ok(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "qcow2", &url, image.to_str().unwrap()],
    );
    // A name the server does not export is refused.
    let wrong = run("qemu-img", &["info", &server.url("other")]);
    assert!(!wrong.status.success(), "export 'other' must not exist");
}

#[test]
fn without_persistent_the_server_exits_after_its_client_with_the_data_flushed() {
    let dir = temp_dir("oneshot");
    let image = qcow2_image(&dir, "16M");
    let server = Server::start(&dir, &image, &["--iothreads", "1"]);
    let url = server.url("");
    let io = run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x42 512k 256k", &url]);
    assert!(io.contains("wrote 262144/262144"), "qemu-io: {io}");
    let status = server.wait_exit();
    assert!(status.success(), "aiocoro-nbd exited with {status}");
    assert!(!dir.join("nbd.sock").exists() && !dir.join("nbd.pid").exists());
    // The file itself (probed as qcow2 by the server) holds the data and is consistent.
    let path = image.to_str().unwrap();
    run_ok("qemu-img", &["check", path]);
    let read = run_ok("qemu-io", &["-f", "qcow2", "-c", "read -P 0x42 512k 256k", path]);
    assert!(!read.contains("Pattern verification failed"), "qemu-io: {read}");
}

#[test]
fn a_read_only_export_serves_reads_and_refuses_writers() {
    let dir = temp_dir("readonly");
    let image = qcow2_image(&dir, "8M");
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x99 0 64k", image.to_str().unwrap()]);
    let server = Server::start(&dir, &image, &["-r", "-t", "-e", "2"]);
    let url = server.url("");
    let read = run_ok("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x99 0 64k", &url]);
    assert!(!read.contains("Pattern verification failed"), "qemu-io: {read}");
    let write = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &url]);
    assert!(!write.status.success(), "a read-write open of a read-only export must fail");
    // Refused before any write was sent: the data are untouched.
    run_ok(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "qcow2", &url, image.to_str().unwrap()],
    );
}

#[test]
fn parallel_clients_on_several_iothreads_write_their_own_regions() {
    let dir = temp_dir("parallel");
    let image = qcow2_image(&dir, "32M");
    let server = Server::start(&dir, &image, &["-t", "-e", "4", "--iothreads", "2"]);
    let url = server.url("");
    let clients: Vec<_> = (0..4u8)
        .map(|n| {
            let url = url.clone();
            std::thread::spawn(move || {
                let region = format!("{}M", n * 8);
                let pattern = format!("{}", 0x10 + n);
                let write = format!("write -P {pattern} {region} 4M");
                let read = format!("read -P {pattern} {region} 4M");
                run_ok("qemu-io", &["-f", "raw", "-c", &write, "-c", &read, "-c", "flush", &url])
            })
        })
        .collect();
    for client in clients {
        let output = client.join().expect("a client thread panicked");
        assert!(!output.contains("Pattern verification failed"), "qemu-io: {output}");
    }
    run_ok(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "qcow2", &url, image.to_str().unwrap()],
    );
    for n in 0..4u8 {
        let read = format!("read -P {} {}M 4M", 0x10 + n, n * 8);
        let output =
            run_ok("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", &read, image.to_str().unwrap()]);
        assert!(!output.contains("Pattern verification failed"), "qemu-io: {output}");
    }
}

#[test]
fn tcp_clients_are_served_too() {
    let dir = temp_dir("tcp");
    let image = qcow2_image(&dir, "8M");
    let (_server, port) = Server::start_tcp(&dir, &image, &["-t", "-x", "disk"]);
    let url = format!("nbd://127.0.0.1:{port}/disk");
    let io = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 1M 256k", "-c", "read -P 0x66 1M 256k", &url],
    );
    assert!(!io.contains("Pattern verification failed") && !io.contains("failed"), "qemu-io: {io}");
    run_ok(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "qcow2", &url, image.to_str().unwrap()],
    );
}

#[test]
fn trim_frees_clusters_only_with_discard_unmap() {
    for (discard, freed) in [("--discard=ignore", false), ("--discard=unmap", true)] {
        let dir = temp_dir(&format!("discard-{freed}"));
        let image = qcow2_image(&dir, "8M");
        let path = image.to_str().unwrap();
        run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x55 0 1M", path]);
        let mut server = Server::start(&dir, &image, &["-t", discard]);
        let io =
            run_ok("qemu-io", &["-f", "raw", "-c", "discard 0 1M", "-c", "flush", &server.url("")]);
        assert!(io.contains("discard 1048576/1048576"), "qemu-io: {io}");
        server.signal("TERM");
        assert!(server.wait_exit().success());
        let map = run_ok("qemu-img", &["map", "--output=json", path]);
        let first =
            map.lines().find(|line| line.contains("\"start\": 0,")).expect("an extent at 0");
        assert_eq!(first.contains("\"data\": true"), !freed, "{discard}: qemu-img map: {map}");
    }
}

#[test]
fn qemu_img_converts_into_and_out_of_the_server_and_benches_over_it() {
    let dir = temp_dir("convert-bench");
    let image = qcow2_image(&dir, "16M");
    let server = Server::start(&dir, &image, &["-f", "qcow2", "-t", "-e", "4", "-x", "disk"]);
    let url = server.url("disk");

    // Into the server: a raw source with a pattern, converted onto the export (the target
    // exists, so -n), then compared through the server and against the image file.
    let source = dir.join("source.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "raw", source.to_str().unwrap(), "16M"]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 0 5M",
            "-c",
            "write -P 0xc3 9M 3M",
            source.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source.to_str().unwrap(), &url],
    );
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", source.to_str().unwrap(), &url]);

    // Out of the server into a new qcow2 file, the same bytes.
    let copy = dir.join("copy.qcow2");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &url, copy.to_str().unwrap()]);
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", source.to_str().unwrap(), copy.to_str().unwrap()],
    );

    // qemu-img bench reads and writes over the connection and completes every request.
    for extra in [&[][..], &["-w", "--pattern", "0x5a"][..]] {
        let mut args = vec!["bench", "-f", "raw", "-c", "2000", "-d", "8", "-s", "4k"];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = run_ok("qemu-img", &args);
        assert!(out.contains("Run completed"), "qemu-img bench {extra:?}: {out}");
    }
    // The written pattern is there through the server: 2000 requests of 4 KiB from 0.
    let read = run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 8000k", &url]);
    assert!(!read.contains("Pattern verification failed"), "qemu-io: {read}");
}
