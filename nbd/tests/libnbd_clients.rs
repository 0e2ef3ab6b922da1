//! libnbd's tools against the `aiocoro-nbd` binary: `nbdinfo` and `nbdcopy` starting it by
//! socket activation (`[ aiocoro-nbd ... ]`), and `nbdcopy --connections 4` copying an image
//! out of the server and into it, compared byte for byte.
//!
//! `AIOCORO_NBD_COPY_SIZE` sets the copied image's size (default `64M`; `1G` for the
//! release check).

mod common;

use std::path::Path;

use common::{Server, run_ok, temp_dir};

const SERVER: &str = env!("CARGO_BIN_EXE_aiocoro-nbd");

/// Writes `size` bytes of data to `path`: pseudo-random 1 MiB stretches with every fourth
/// one left zero (holes after conversion to qcow2, so that both data and holes are copied).
fn write_source(path: &Path, size: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for n in 0..size.div_ceil(1 << 20) {
        if n % 4 == 3 {
            chunk.fill(0);
        } else {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
        }
        let length = (size - n * (1 << 20)).min(1 << 20) as usize;
        file.write_all(&chunk[..length]).unwrap();
    }
    file.flush().unwrap();
}

/// Panics unless the files `a` and `b` hold the same bytes (`cmp` names the first difference).
fn assert_same_bytes(a: &Path, b: &Path) {
    run_ok("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
}

#[test]
fn nbdinfo_starts_the_server_by_socket_activation() {
    let dir = temp_dir("activation");
    let image = common::qcow2_image(&dir, "64M");
    let image = image.to_str().unwrap();
    let info = run_ok(
        "nbdinfo",
        &["--", "[", SERVER, "-r", "-f", "qcow2", "-D", "activated disk", image, "]"],
    );
    assert!(info.contains("export-size: 67108864"), "nbdinfo: {info}");
    assert!(info.contains("is_read_only: true"), "nbdinfo: {info}");
    assert!(info.contains("activated disk"), "nbdinfo: {info}");
    // The same image named by --image-opts, writable.
    let options = format!("driver=qcow2,file.filename={image}");
    let info = run_ok("nbdinfo", &["--", "[", SERVER, "--image-opts", &options, "]"]);
    assert!(info.contains("is_read_only: false") && info.contains("can_multi_conn: true"));
    // -k with socket activation is refused (the socket is the one passed).
    let socket = dir.join("unused.sock");
    let refused =
        common::run("nbdinfo", &["--", "[", SERVER, "-k", socket.to_str().unwrap(), image, "]"]);
    assert!(!refused.status.success(), "-k must be refused under socket activation");
}

#[test]
fn nbdcopy_with_four_connections_copies_out_of_and_into_the_server_byte_for_byte() {
    let size = std::env::var("AIOCORO_NBD_COPY_SIZE").unwrap_or_else(|_| "64M".into());
    let bytes = aiocoro_block::parse_size(&size).expect("AIOCORO_NBD_COPY_SIZE is a size");
    let dir = temp_dir("nbdcopy");
    let (source, qcow2) = (dir.join("source.raw"), dir.join("source.qcow2"));
    write_source(&source, bytes);
    let (source_path, qcow2_path) = (source.to_str().unwrap(), qcow2.to_str().unwrap());
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", source_path, qcow2_path]);

    // Out of the server (started by nbdcopy, read-only, four connections) into a file.
    let out = dir.join("out.raw");
    let server = [SERVER, "-r", "-e", "4", "--cache=none", "-f", "qcow2", qcow2_path];
    let mut args = vec!["--connections", "4", "--", "["];
    args.extend(server);
    args.extend(["]", out.to_str().unwrap()]);
    run_ok("nbdcopy", &args);
    assert_same_bytes(&source, &out);

    // Into the server (a fresh qcow2 image) from the file, then the image read back.
    let target = dir.join("target.qcow2");
    let target_path = target.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", target_path, &bytes.to_string()]);
    let server = [SERVER, "-e", "4", "--cache=none", "-f", "qcow2", target_path];
    let mut args = vec!["--connections", "4", source_path, "--", "["];
    args.extend(server);
    args.push("]");
    run_ok("nbdcopy", &args);
    run_ok("qemu-img", &["check", target_path]);
    let back = dir.join("back.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", target_path, back.to_str().unwrap()],
    );
    assert_same_bytes(&source, &back);
}

#[test]
fn nbdcopy_reads_over_tcp_with_four_connections() {
    let dir = temp_dir("nbdcopy-tcp");
    let source = dir.join("source.raw");
    write_source(&source, 16 << 20);
    let (_server, port) = Server::start_tcp(&dir, &source, &["-r", "-t", "-e", "4", "-f", "raw"]);
    let out = dir.join("out.raw");
    let url = format!("nbd://127.0.0.1:{port}/");
    run_ok("nbdcopy", &["--connections", "4", &url, out.to_str().unwrap()]);
    assert_same_bytes(&source, &out);
}

#[test]
fn a_socket_activated_tcp_listener_is_served() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = temp_dir("activation-tcp");
    let image = common::qcow2_image(&dir, "64M");
    // What systemd does: bind, pass the socket as descriptor 3, name the process in LISTEN_PID
    // (the shell's $$ is the pid the server keeps after exec).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = listener.as_raw_fd();
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"", SERVER, "-t", "-r"])
        .arg(&image);
    // SAFETY: between fork and exec the hook only calls dup2 and fcntl, which are
    // async-signal-safe; `fd` is open (the listener lives until after the spawn).
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let result = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if result < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = command.spawn().expect("start the server");
    drop(listener); // The server holds its own copy.
    let info = common::run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/")]);
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "nbdinfo: {stdout}{}", String::from_utf8_lossy(&info.stderr));
    assert!(stdout.contains("export-size: 67108864") && stdout.contains("is_read_only: true"));
}
