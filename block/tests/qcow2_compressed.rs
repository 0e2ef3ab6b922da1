//! Compressed images (`qemu-img convert -c`, deflate and zstd, with extended L2 entries too)
//! read back as their source.

mod qcow2_support;

use qcow2_support::*;

/// 3 MiB: compressible text, zeroes, incompressible noise (stored uncompressed by
/// qemu-img), and a short odd tail.
fn source() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(3 << 20);
    while bytes.len() < 1 << 20 {
        bytes.extend_from_slice(
            format!("line {} of a compressible text; ", bytes.len() / 7).as_bytes(),
        );
    }
    bytes.truncate(1 << 20);
    bytes.resize(3 << 19, 0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    while bytes.len() < (5 << 19) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.resize((3 << 20) - 4096, 0x5a);
    bytes.resize(3 << 20, 0);
    bytes
}

#[test]
fn compressed_images_of_every_cluster_size_read_as_their_source() {
    let scratch = Scratch::new("compressed");
    let src = scratch.path("src.raw");
    let data = source();
    std::fs::write(&src, &data).unwrap();
    for options in [
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=4k",
        "compat=0.10,cluster_size=64k",
        "compat=1.1,cluster_size=64k",
        "compat=1.1,cluster_size=2M",
        "compat=1.1,cluster_size=512,compression_type=zstd",
        "compat=1.1,cluster_size=4k,compression_type=zstd",
        "compat=1.1,cluster_size=64k,compression_type=zstd",
        "compat=1.1,cluster_size=2M,compression_type=zstd",
        // Extended L2 entries: compressed clusters have no subclusters (bitmap zero).
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=64k,compression_type=zstd",
        "extended_l2=on,cluster_size=2M",
    ] {
        let image = scratch.path("c.qcow2");
        let _ = std::fs::remove_file(&image);
        compress_to_qcow2(src.to_str().unwrap(), image.to_str().unwrap(), options);
        let check = qemu_img(&["check", image.to_str().unwrap()]);
        assert!(
            check.contains("No errors") && !check.contains(" 0.00% compressed"),
            "{options}: no compressed clusters? {check}"
        );
        let theirs = qemu_raw(&image);
        assert_same_bytes(&theirs, &data, &format!("{options}: qemu-img's own read"));
        for chunk in [1 << 20, 1000, 70000] {
            let ours = read_ours(&image, chunk).unwrap();
            assert_same_bytes(&ours, &data, &format!("{options}, {chunk}-byte reads"));
        }
    }
}

#[test]
fn a_compressed_image_with_later_uncompressed_writes() {
    let scratch = Scratch::new("compressed-mixed");
    let src = scratch.path("src.raw");
    std::fs::write(&src, source()).unwrap();
    let image = scratch.path("m.qcow2");
    compress_to_qcow2(src.to_str().unwrap(), image.to_str().unwrap(), "");
    qemu_io(
        "qcow2",
        &image,
        &["write -P 0x71 100k 10k", "write -z 300k 64k", "write -P 0x72 65535 2"],
    );
    assert_same_bytes(&read_ours(&image, 65536).unwrap(), &qemu_raw(&image), "mixed");
}
