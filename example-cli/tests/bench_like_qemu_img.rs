//! The `bench` example against `qemu-img bench` (qemu-utils): the same arguments write the
//! same bytes to the same offsets (`--pattern 0xa5 -o 1M`, and the octal and hex spellings),
//! print the same first line, and the same bad arguments are refused with the same message
//! and exit status 1.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory of this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("bench-like-qemu-img-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A new image `name` of `format` and 8 MiB, made by qemu-img.
    fn image(&self, name: &str, format: &str) -> PathBuf {
        let path = self.0.join(name);
        let output = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&path)
            .arg("8M")
            .output()
            .expect("qemu-img (qemu-utils) is installed");
        assert!(output.status.success(), "{output:?}");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ours(args: &[&str], image: &Path) -> Output {
    let bench = support::build("aiocoro-block", "bench");
    Command::new(bench).args(args).arg(image).output().unwrap()
}

fn qemu_img(args: &[&str], image: &Path) -> Output {
    Command::new("qemu-img").arg("bench").args(args).arg(image).output().unwrap()
}

fn first_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().to_owned()
}

/// The guest bytes of `image`, read by qemu-img into a raw file.
fn guest_bytes(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("converted");
    let output = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    std::fs::read(raw).unwrap()
}

/// Runs `args` with both tools on new images of `format`; both succeed with the same first
/// line and leave the same guest bytes, which are returned.
fn same_writes(args: &[&str], format: &str) -> Vec<u8> {
    let scratch = Scratch::new(&format!("{format}-{}", args.join("").replace(['-', ' '], "")));
    let (mine, theirs) = (scratch.image("ours", format), scratch.image("qemu", format));
    let (our_run, their_run) = (ours(args, &mine), qemu_img(args, &theirs));
    assert!(our_run.status.success(), "bench {args:?}: {our_run:?}");
    assert!(their_run.status.success(), "qemu-img bench {args:?}: {their_run:?}");
    assert_eq!(first_line(&our_run), first_line(&their_run), "{args:?}");
    let bytes = guest_bytes(&mine);
    assert!(bytes == guest_bytes(&theirs), "bench {args:?} wrote other bytes than qemu-img");
    bytes
}

#[test]
fn pattern_0xa5_from_offset_1m_writes_what_qemu_img_writes() {
    for format in ["raw", "qcow2"] {
        let bytes = same_writes(
            &["-f", format, "-w", "--pattern", "0xa5", "-o", "1M", "-c", "100", "-d", "4"],
            format,
        );
        let (start, end) = (1 << 20, (1 << 20) + 100 * 4096);
        assert!(bytes[..start].iter().all(|&byte| byte == 0), "{format}: before the offset");
        assert!(bytes[start..end].iter().all(|&byte| byte == 0xa5), "{format}: the pattern");
        assert!(bytes[end..].iter().all(|&byte| byte == 0), "{format}: after the requests");
    }
}

#[test]
fn octal_and_hex_spellings_mean_what_they_mean_to_qemu_img() {
    let args = [
        "-f",
        "raw",
        "-w",
        "--pattern=0245",
        "-o",
        "0x100000",
        "-S",
        "8k",
        "-s",
        "010",
        "-c",
        "0x20",
    ];
    let bytes = same_writes(&args, "raw");
    // 32 requests of 10 bytes (a size's leading 0 is not octal), 8 KiB apart from 1 MiB.
    let written: Vec<usize> = (0..bytes.len()).filter(|&at| bytes[at] == 0xa5).collect();
    let expected: Vec<usize> =
        (0..32).flat_map(|i| (0..10).map(move |b| (1 << 20) + i * 8192 + b)).collect();
    assert_eq!(written, expected);
}

#[test]
fn bad_arguments_are_refused_as_qemu_img_refuses_them() {
    let scratch = Scratch::new("refused");
    let image = scratch.image("image", "raw");
    let refused: [&[&str]; 9] = [
        &["-c", "1k"],
        &["-c", "0"],
        &["-d", "08"],
        &["-o", "1.5"],
        &["-o", "-1"],
        &["-s", "0"],
        &["-w", "--pattern", "256"],
        &["-w", "--flush-interval", "32"],
        &["--flush-interval", "64"],
    ];
    for args in refused {
        let (our_run, their_run) = (ours(args, &image), qemu_img(args, &image));
        assert_eq!(our_run.status.code(), Some(1), "bench {args:?}: {our_run:?}");
        assert_eq!(their_run.status.code(), Some(1), "qemu-img bench {args:?}: {their_run:?}");
        let reason = |output: &Output, prefix: &str| {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            let first = stderr.lines().next().unwrap_or_default();
            first.strip_prefix(prefix).unwrap_or(first).to_owned()
        };
        assert_eq!(reason(&our_run, "bench: "), reason(&their_run, "qemu-img: "), "{args:?}");
    }
}
