//! Two writers on one image: our file nodes take and honour QEMU's image locks
//! (`file-posix`'s permission bytes), so `qemu-img` / `qemu-io` refuse an image we write,
//! we refuse one `qemu-io` writes, and `locking=off` opts out as in QEMU.

mod qcow2_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
use qcow2_support::*;

fn fresh_image(scratch: &Scratch) -> PathBuf {
    let image = scratch.path("locked.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    image
}

/// Opens `options` with our drivers.
fn open_ours(options: &str) -> std::io::Result<BlockBackend> {
    let options = options.to_owned();
    run_in_coroutine(move |co| {
        let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options)?;
        Ok(BlockBackend::new(node))
    })?
}

/// The error of opening `options`, which must fail (`because` says why).
fn refused(options: &str, because: &str) -> std::io::Error {
    match open_ours(options) {
        Ok(_) => panic!("{options} opened although {because}"),
        Err(error) => error,
    }
}

/// Runs a QEMU tool that may fail; its output.
fn try_run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program} ({error}): install qemu-utils"))
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn qemu_write(image: &Path) -> Output {
    try_run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x44 0 512", image.to_str().unwrap()])
}

fn qemu_check_output(image: &Path) -> Output {
    try_run("qemu-img", &["check", image.to_str().unwrap()])
}

#[test]
fn qemu_img_and_qemu_io_refuse_an_image_we_hold_for_writing() {
    let scratch = Scratch::new("locking-ours");
    let image = fresh_image(&scratch);
    let ours = open_ours(&qcow2_rw_options(&image)).expect("our read-write open");

    let check = qemu_check_output(&image);
    assert!(!check.status.success(), "qemu-img check of an image we write: {}", text(&check));
    assert!(text(&check).contains("Failed to get shared \"write\" lock"), "{}", text(&check));

    let write = qemu_write(&image);
    // qemu-io reports a failed open on stderr; its exit status says nothing here.
    assert!(text(&write).contains("Failed to get \"write\" lock"), "{}", text(&write));
    assert!(!text(&write).contains("wrote 512/512"), "qemu-io wrote: {}", text(&write));

    // Our own second open for writing is refused the same way (OFD locks belong to the
    // open, not the process).
    let second = refused(&qcow2_rw_options(&image), "we hold it for writing");
    assert_eq!(second.kind(), std::io::ErrorKind::ResourceBusy, "{second}");
    assert!(second.to_string().contains("Failed to get \"write\" lock"), "{second}");

    drop(ours);
    qemu_check(&image);
    let write = qemu_write(&image);
    assert!(text(&write).contains("wrote 512/512"), "after we closed it: {}", text(&write));
}

#[test]
fn a_read_only_open_of_ours_keeps_writers_out_but_lets_readers_in() {
    let scratch = Scratch::new("locking-ours-ro");
    let image = fresh_image(&scratch);
    let ours = open_ours(&qcow2_options(&image)).expect("our read-only open");
    let write = qemu_write(&image);
    assert!(text(&write).contains("Failed to get \"write\" lock"), "{}", text(&write));
    qemu_check(&image);
    let reader = open_ours(&qcow2_options(&image)).expect("a second reader");
    drop((ours, reader));
}

/// `qemu-io` with the image open, reading commands from a pipe kept open until dropped.
struct HeldByQemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl HeldByQemuIo {
    /// Starts `qemu-io` on `image` (read-only with `-r`) and waits until it has the image
    /// open (its first read answered).
    fn new(image: &Path, read_only: bool) -> HeldByQemuIo {
        let mut args = vec!["-f", "qcow2"];
        if read_only {
            args.push("-r");
        }
        args.push(image.to_str().unwrap());
        let mut child = Command::new("qemu-io")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run qemu-io: install qemu-utils");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"read 0 512\n").unwrap();
        stdin.flush().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("read 512/512 bytes") {
            let mut line = String::new();
            let read = stdout.read_line(&mut line).unwrap();
            assert!(read > 0, "qemu-io ended before it read the image: {seen}");
            seen += &line;
        }
        HeldByQemuIo { child, stdin: Some(stdin) }
    }
}

impl Drop for HeldByQemuIo {
    fn drop(&mut self) {
        drop(self.stdin.take()); // End of input: qemu-io quits.
        let _ = self.child.wait();
    }
}

#[test]
fn we_refuse_an_image_qemu_io_holds_for_writing_unless_locking_is_off() {
    let scratch = Scratch::new("locking-qemu");
    let image = fresh_image(&scratch);
    let held = HeldByQemuIo::new(&image, false);

    let error = refused(&qcow2_rw_options(&image), "qemu-io writes the image");
    assert_eq!(error.kind(), std::io::ErrorKind::ResourceBusy, "{error}");
    let message = error.to_string();
    assert!(message.contains("Failed to get \"write\" lock"), "{message}");
    assert!(message.contains(image.to_str().unwrap()), "names the image: {message}");
    assert!(message.contains("locking=off"), "says how to opt out: {message}");

    // Reading it is refused too, as qemu-img's reads are: a reader of ours does not share
    // writing, and qemu-io writes.
    let error = refused(&qcow2_options(&image), "qemu-io writes the image");
    assert!(error.to_string().contains("Failed to get shared \"write\" lock"), "{error}");

    // locking=off neither checks nor takes locks.
    let unlocked = format!("{},file.locking=off", qcow2_options(&image));
    let reader = open_ours(&unlocked).expect("locking=off opens it anyway");
    drop(reader);
    drop(held);
    let ours = open_ours(&qcow2_rw_options(&image)).expect("qemu-io has quit");
    drop(ours);
}

#[test]
fn a_read_only_qemu_io_lets_us_read_but_not_write() {
    let scratch = Scratch::new("locking-qemu-ro");
    let image = fresh_image(&scratch);
    let held = HeldByQemuIo::new(&image, true);
    let error = refused(&qcow2_rw_options(&image), "qemu-io reads the image");
    assert!(error.to_string().contains("Failed to get \"write\" lock"), "{error}");
    let reader = open_ours(&qcow2_options(&image)).expect("two readers share");
    drop((reader, held));
}

#[test]
fn locking_off_takes_no_locks_and_bad_modes_are_refused() {
    let scratch = Scratch::new("locking-off");
    let image = fresh_image(&scratch);
    let unlocked =
        open_ours(&format!("{},file.locking=off", qcow2_rw_options(&image))).expect("locking=off");
    let check = qemu_check_output(&image);
    assert!(check.status.success(), "no locks with locking=off: {}", text(&check));
    drop(unlocked);
    let on = open_ours(&format!("{},file.locking=on", qcow2_rw_options(&image))).expect("on");
    assert!(!qemu_check_output(&image).status.success(), "locking=on locks");
    drop(on);
    let error = refused(
        &format!("{},file.locking=maybe", qcow2_rw_options(&image)),
        "maybe is no locking mode",
    );
    assert!(error.to_string().contains("option 'locking': unknown mode 'maybe'"), "{error}");
}
