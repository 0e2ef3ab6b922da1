//! The `qcow2` example tool against qemu-img: `convert -O qcow2 [-c] [-o
//! compression_type=...,extended_l2=on]` writes images that `qemu-img compare` finds identical to their
//! source and `qemu-img check` clean, and `snapshot -l` prints what `qemu-img snapshot -l`
//! prints, and `info` prints sizes as `qemu-img info` does.

mod qcow2_support;

use std::path::PathBuf;
use std::process::Command;

use qcow2_support::*;

/// The example binary, built (by cargo, in this test's profile) if need be.
fn tool() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap().to_path_buf();
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-q", "-p", "aiocoro-block", "--example", "qcow2"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the qcow2 example failed");
    profile_dir.join("examples").join("qcow2")
}

/// Runs the tool, panicking with its output unless it succeeds; returns its stdout.
fn run_tool(tool: &PathBuf, args: &[&str]) -> String {
    let output = Command::new(tool).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "qcow2 {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn convert_writes_compressed_images_qemu_img_finds_identical() {
    let tool = tool();
    let scratch = Scratch::new("tool-convert");
    let src = scratch.path("src.raw");
    // Text, zeroes, noise, and a size that is not a whole sector (qemu-img reads the rest of
    // the last sector as zeroes).
    let mut data = Vec::new();
    while data.len() < 3 << 20 {
        data.extend_from_slice(format!("line {} of the source; ", data.len()).as_bytes());
    }
    data.resize(4 << 20, 0);
    let mut rng = Rng(5);
    while data.len() < 5 << 20 {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data.extend_from_slice(&[0x77; 12345]);
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    for (flags, compressed) in [
        (&["-c"][..], "zlib"),
        (&["-c", "-o", "compression_type=zlib"][..], "zlib"),
        (&["-c", "-o", "compression_type=zstd,cluster_size=4k"][..], "zstd"),
        (&["-c", "-o", "extended_l2=on"][..], "zlib"),
        (&["-c", "-o", "extended_l2=on,compression_type=zstd,cluster_size=32k"][..], "zstd"),
        (&[][..], ""),
    ] {
        let out = scratch.path("out.qcow2");
        let _ = std::fs::remove_file(&out);
        let out = out.to_str().unwrap();
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(flags);
        args.extend([src, out]);
        run_tool(&tool, &args);
        let compare = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", src, out]);
        assert!(compare.contains("identical"), "{flags:?}: {compare}");
        let (status, check) = check_status(std::path::Path::new(out));
        assert_eq!(status, 0, "{flags:?}: {check}");
        let share = if compressed.is_empty() { "0.00% compressed" } else { "% compressed" };
        assert!(check.contains(share), "{flags:?}: {check}");
        if !compressed.is_empty() {
            assert!(!check.contains(" 0.00% compressed"), "{flags:?}: {check}");
            let info = qemu_img(&["info", out]);
            assert!(info.contains(&format!("compression type: {compressed}")), "{info}");
            let extended = flags.iter().any(|flag| flag.contains("extended_l2=on"));
            assert_eq!(info.contains("extended l2: true"), extended, "{flags:?}: {info}");
            let map = qemu_img(&["map", "--output=json", out]);
            assert!(map.contains("\"compressed\": true"), "{flags:?}: {map}");
        }
    }
}

#[test]
fn snapshot_list_prints_what_qemu_img_prints() {
    let tool = tool();
    let scratch = Scratch::new("tool-snapshots");
    let image = scratch.path("s.qcow2");
    let image = image.to_str().unwrap();
    create_qcow2(image, "", "4M");
    assert_eq!(run_tool(&tool, &["snapshot", "-l", image]), "");
    for name in ["one", "two"] {
        qemu_img(&["snapshot", "-c", name, image]);
    }
    let ours = run_tool(&tool, &["snapshot", "-l", image]);
    assert_eq!(ours, qemu_img(&["snapshot", "-l", image]));
    assert!(ours.contains("one") && ours.contains("two"), "{ours}");
}

#[test]
fn info_prints_the_sizes_qemu_img_info_prints() {
    let tool = tool();
    let scratch = Scratch::new("tool-info");
    // Sizes whose printed forms once lost digits ("10 KiB" came out as "1 KiB", 0 as " B").
    for size in ["10K", "1000K", "100M", "1536M", "2T"] {
        let image = scratch.path(&format!("{size}.qcow2"));
        let image = image.to_str().unwrap();
        create_qcow2(image, "", size);
        let ours = run_tool(&tool, &["info", image]);
        let theirs = qemu_img(&["info", image]);
        for field in ["virtual size:", "disk size:"] {
            let line =
                |text: &str| text.lines().find(|line| line.starts_with(field)).map(str::to_owned);
            assert_eq!(line(&ours), line(&theirs), "{field} of a {size} image\n{ours}\n{theirs}");
        }
        assert!(ours.contains("allocated in this image: 0 B (0 bytes"), "{ours}");
    }
}

#[test]
fn create_rounds_a_size_up_to_whole_sectors_as_qemu_img_create_does() {
    let tool = tool();
    let scratch = Scratch::new("tool-create-size");
    let backing = scratch.path("backing.raw");
    std::fs::write(&backing, [0x5a; 1000]).unwrap();
    let (ours, theirs) = (scratch.path("ours.qcow2"), scratch.path("theirs.qcow2"));
    let (ours, theirs) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    for (args, size) in [
        (&["1000"][..], 1024),
        (&["-o", "size=1537"][..], 2048),
        (&["-b", "backing.raw", "-F", "raw"][..], 1024),
    ] {
        for (image, run) in [(ours, true), (theirs, false)] {
            let mut all = vec!["create", "-q", "-f", "qcow2"];
            let (options, size_arg) = args.split_at(args.len() - usize::from(args.len() == 1));
            all.extend(options);
            all.push(image);
            all.extend(size_arg);
            if run {
                run_tool(&tool, &all);
            } else {
                qemu_img(&all);
            }
        }
        let field = |image: &str| peek_u64(std::path::Path::new(image), 24);
        assert_eq!(field(theirs), size, "qemu-img create {args:?}");
        assert_eq!(field(ours), size, "create {args:?}");
    }
}
