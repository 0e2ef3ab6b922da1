//! Helpers of the qcow2 tests: running the real qemu-img / qemu-io, scratch directories,
//! and reading images through our driver.

#![allow(dead_code)] // Each test file uses its own subset.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use aiocoro_block::qcow2::{CreateOptions, create_file};
use aiocoro_block::{Allocation, BlockBackend, BlockGraph, run_in_coroutine};

/// A scratch directory, removed on drop.
pub(crate) struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub(crate) fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("aiocoro-qcow2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `program` with `args`, panicking with its output unless it succeeds. A missing
/// program fails the test: these tests are not skipped.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|error| {
        panic!(
            "cannot run {program} ({error}): the qcow2 interop tests need QEMU's tools; \
             install them (Debian/Ubuntu: apt-get install qemu-utils)"
        )
    });
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub(crate) fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-img create -q -f qcow2 [-o OPTIONS] IMAGE SIZE` (no `-o` for empty options).
pub(crate) fn create_qcow2(image: &str, options: &str, size: &str) {
    create_qcow2_with(image, options, &[], size);
}

/// `qemu-img create` of a qcow2 `image` over `backing` (named as the header will store it)
/// of format `backing_format`.
pub(crate) fn create_qcow2_over(
    image: &str,
    options: &str,
    backing: &str,
    backing_format: &str,
    size: &str,
) {
    create_qcow2_with(image, options, &["-b", backing, "-F", backing_format], size);
}

fn create_qcow2_with(image: &str, options: &str, extra: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend(extra);
    args.extend([image, size]);
    qemu_img(&args);
}

/// Creates the qcow2 `image` with our own `create_file`.
pub(crate) fn create_ours(image: &Path, options: CreateOptions) {
    let image = image.to_path_buf();
    run_in_coroutine(move |co| create_file(co, &image, &options)).unwrap().unwrap();
}

/// `qemu-img convert -c -f raw -O qcow2 [-o OPTIONS] RAW IMAGE`: a compressed copy (no `-o`
/// for empty options).
pub(crate) fn compress_to_qcow2(raw: &str, image: &str, options: &str) {
    let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([raw, image]);
    qemu_img(&args);
}

/// `qemu-io -f FORMAT FILE -c CMD ...`.
pub(crate) fn qemu_io(format: &str, file: &Path, commands: &[&str]) {
    let file = file.to_str().unwrap();
    let mut args = vec!["-f", format, file];
    for command in commands {
        args.push("-c");
        args.push(command);
    }
    run("qemu-io", &args);
}

/// `qemu-img convert -O raw` of `image` (any format, backing chain included), read back.
pub(crate) fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    qemu_img(&["convert", "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Opens `options` and runs `body` on a backend of it, in a coroutine.
pub(crate) fn with_image<R: 'static>(
    options: &str,
    body: impl FnOnce(&aiocoro::coroutine::Co, &BlockBackend) -> io::Result<R> + 'static,
) -> io::Result<R> {
    let options = options.to_owned();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = aiocoro_block::open(co, &graph, &options)?;
        body(co, &BlockBackend::new(node))
    })?
}

/// A backend of the node tree `options` describe, opened in a coroutine.
pub(crate) fn open_backend(options: &str) -> BlockBackend {
    let owned = options.to_owned();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = aiocoro_block::open(co, &graph, &owned)?;
        Ok::<_, io::Error>(BlockBackend::new(node))
    })
    .unwrap()
    .unwrap_or_else(|error| panic!("cannot open {options:?}: {error}"))
}

/// The options that open `image` as qcow2, read-only.
pub(crate) fn qcow2_options(image: &Path) -> String {
    format!("driver=qcow2,read-only=on,file.filename={}", image.display())
}

/// Every guest byte of the qcow2 `image`, read through our driver in `chunk`-byte reads.
pub(crate) fn read_ours(image: &Path, chunk: usize) -> io::Result<Vec<u8>> {
    with_image(&qcow2_options(image), move |co, blk| {
        let len = blk.length() as usize;
        let mut all = vec![0u8; len];
        for (i, piece) in all.chunks_mut(chunk).enumerate() {
            blk.read(co, (i * chunk) as u64, piece)?;
        }
        Ok(all)
    })
}

/// Our block status over the whole image: `(offset, len, allocation)` runs, merged.
pub(crate) fn status_ours(image: &Path) -> io::Result<Vec<(u64, u64, Allocation)>> {
    with_image(&qcow2_options(image), |co, blk| {
        let len = blk.length();
        let mut runs: Vec<(u64, u64, Allocation)> = Vec::new();
        let mut at = 0;
        while at < len {
            let status = blk.block_status(co, at, len - at)?;
            match runs.last_mut() {
                Some(last) if last.2 == status.allocation && last.0 + last.1 == at => {
                    last.1 += status.len;
                }
                _ => runs.push((at, status.len, status.allocation)),
            }
            at += status.len;
        }
        Ok(runs)
    })
}

/// Asserts two images' bytes are equal, naming the first difference.
pub(crate) fn assert_same_bytes(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    if let Some(at) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at:#x}: ours {:#04x}, qemu-img's {:#04x}",
            ours[at], theirs[at]
        );
    }
}

/// Overwrites `bytes` at `offset` of the file at `path`.
pub(crate) fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Reads `len` bytes at `offset` of the file at `path`.
pub(crate) fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, offset).unwrap();
    bytes
}

/// A big-endian u64 of the file at `path`.
pub(crate) fn peek_u64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(peek(path, offset, 8).try_into().unwrap())
}

/// The host offset of L2 entry `index` of the first L2 table of the qcow2 `image`.
pub(crate) fn l2_entry_at(image: &Path, index: u64) -> u64 {
    let l1 = peek_u64(image, 40);
    let l2 = peek_u64(image, l1) & 0x00ff_ffff_ffff_fe00;
    l2 + 8 * index
}

/// The error of opening and reading all of `image` through our driver.
pub(crate) fn open_error(image: &Path) -> io::Error {
    match read_ours(image, 1 << 20) {
        Ok(_) => panic!("{} opened and read without an error", image.display()),
        Err(error) => error,
    }
}

/// `qemu-img check`: succeeds only with no errors and no leaks (exit status 0).
pub(crate) fn qemu_check(image: &Path) {
    qemu_img(&["check", image.to_str().unwrap()]);
}

/// `qemu-img check`'s exit status: 0 clean, 2 errors (corruption), 3 only leaks.
pub(crate) fn check_status(image: &Path) -> (i32, String) {
    let output = std::process::Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .expect("qemu-img check: install qemu-utils");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

/// `qemu-img compare` of the qcow2 `image` (backing chain included) with the raw `shadow`.
pub(crate) fn qemu_compare(image: &Path, shadow: &Path) {
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        image.to_str().unwrap(),
        shadow.to_str().unwrap(),
    ]);
    assert!(out.contains("identical"), "qemu-img compare: {out}");
}

/// The options that open `image` as qcow2, read-write.
pub(crate) fn qcow2_rw_options(image: &Path) -> String {
    format!("driver=qcow2,file.filename={}", image.display())
}

/// A small deterministic generator (xorshift) for write patterns.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Waits (up to a minute) until no process holds a lock on `path` (`/proc/locks`). A killed
/// process's image locks can outlive it briefly: the kernel drops the files of its io_uring
/// requests in the background after the process is gone.
pub(crate) fn wait_until_unlocked(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let inode = format!(":{} ", std::fs::metadata(path).unwrap().ino());
    let start = std::time::Instant::now();
    while std::fs::read_to_string("/proc/locks").unwrap().lines().any(|l| l.contains(&inode)) {
        assert!(start.elapsed().as_secs() < 60, "{} stays locked", path.display());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
