//! Block status and structured reads against real clients: `nbdinfo --map` (for
//! `base:allocation` and `qemu:allocation-depth`) and `qemu-img map` report the same
//! extents through our server as through `qemu-nbd` serving the same image, a sparse
//! qcow2 with zero clusters, discarded ranges and a shorter backing file, and a sparse raw
//! file; the data read with holes skipped is the image's.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Server, run_ok, temp_dir};

/// `qemu-nbd` serving an image read-only on a Unix socket, with `qemu:allocation-depth`
/// (`-A`); killed when dropped.
struct QemuNbd(Child, String);

impl QemuNbd {
    fn start(dir: &Path, image: &Path, format: &str) -> QemuNbd {
        let socket = dir.join("qemu-nbd.sock");
        let pid_file = dir.join("qemu-nbd.pid");
        let child = Command::new("qemu-nbd")
            .args(["-A", "-r", "-t", "-f", format, "-k"])
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(image)
            .spawn()
            .expect("start qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start listening in 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd(child, format!("nbd+unix:///?socket={}", socket.display()))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// base.qcow2 (6 MiB: data, a zero cluster) <- top.qcow2 (8 MiB: data in whole and partial
/// clusters, zero clusters, discards over its own data and over the backing data).
fn sparse_chain(dir: &Path) -> std::path::PathBuf {
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", base, "6M"]);
    let base_writes = ["write -P 0x11 0 4M", "write -z 1536k 128k", "write -P 0x12 5M 256k"];
    qemu_io(base, &base_writes);
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "8M"]);
    let top_writes = [
        "write -P 0x22 64k 64k",
        "write -P 0x23 1000k 300k",
        "write -z 2M 256k",
        "discard 3M 128k",
        "write -P 0x24 5M 1M",
        "discard 5M 64k",
        "write -P 0x25 6M 3k",
        "write -z 7M 64k",
        "write -P 0x26 7680k 4k",
    ];
    qemu_io(top, &top_writes);
    dir.join("top.qcow2")
}

fn qemu_io(image: &str, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(image);
    run_ok("qemu-io", &args);
}

/// `nbdinfo --map` for both contexts is the same through both servers.
fn assert_same_maps(ours: &str, qemu_nbd: &str) {
    for map in ["--map", "--map=qemu:allocation-depth"] {
        let theirs = run_ok("nbdinfo", &[map, qemu_nbd]);
        let mine = run_ok("nbdinfo", &[map, ours]);
        assert_eq!(mine, theirs, "nbdinfo {map}: ours, then qemu-nbd's");
    }
    let extents = run_ok("nbdinfo", &["--map", ours]);
    assert!(extents.lines().count() >= 5, "a map with too few extents to test: {extents}");
}

#[test]
fn nbdinfo_map_matches_qemu_nbd_on_a_sparse_raw_file() {
    let dir = temp_dir("map-raw");
    let image = dir.join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let path = image.to_str().unwrap();
    let writes = ["write -P 1 1M 64k", "write -P 2 5M 8k", "write -z 6M 1M", "write -P 3 15M 1M"];
    let mut args = vec!["-f", "raw"];
    for write in &writes {
        args.extend(["-c", write]);
    }
    args.push(path);
    run_ok("qemu-io", &args);
    let qemu = QemuNbd::start(&dir, &image, "raw");
    let ours = Server::start(&dir, &image, &["-r", "-t", "-f", "raw"]);
    assert_same_maps(&ours.url(""), &qemu.1);
}

#[test]
fn nbdinfo_map_and_qemu_img_map_match_qemu_nbd_on_a_sparse_chain() {
    let dir = temp_dir("map");
    let image = sparse_chain(&dir);
    let qemu = QemuNbd::start(&dir, &image, "qcow2");
    let ours = Server::start(&dir, &image, &["-r", "-t", "-f", "qcow2"]);
    let ours_url = ours.url("");
    assert_same_maps(&ours_url, &qemu.1);
    // The allocation depths the chain must show: local, backing and absent ranges.
    let depths = run_ok("nbdinfo", &["--map=qemu:allocation-depth", &ours_url]);
    for kind in ["local", "backing depth 2", "absent"] {
        assert!(depths.contains(kind), "no '{kind}' extent: {depths}");
    }
    let theirs = run_ok("qemu-img", &["map", "--output=json", &qemu.1]);
    let mine = run_ok("qemu-img", &["map", "--output=json", &ours_url]);
    assert_eq!(mine, theirs, "qemu-img map over NBD: ours, then qemu-nbd's");
    // Structured reads (holes skipped) return the image's bytes.
    let path = image.to_str().unwrap();
    run_ok("qemu-img", &["compare", "-U", "-f", "raw", "-F", "qcow2", &ours_url, path]);
}
