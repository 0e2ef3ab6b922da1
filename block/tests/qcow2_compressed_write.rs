//! Compressed writes (`BlockBackend::write_compressed`, deflate and zstd, with extended L2
//! entries too): QEMU reads back what we compressed, `qemu-img check` finds the image clean,
//! and its cluster counts say the clusters are compressed.

mod qcow2_support;

use std::io::ErrorKind;
use std::path::Path;

use aiocoro_block::qcow2::{Compression, CreateOptions};
use qcow2_support::*;

/// `len` bytes: compressible text, a zero stretch, incompressible noise, more text.
fn source(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len / 2 {
        bytes.extend_from_slice(format!("record {} of seed {seed}; ", bytes.len()).as_bytes());
    }
    bytes.resize(len * 5 / 8, 0);
    let mut rng = Rng(seed | 1);
    while bytes.len() < len * 3 / 4 {
        bytes.extend_from_slice(&rng.next().to_le_bytes());
    }
    while bytes.len() < len {
        bytes.extend_from_slice(format!("tail {} ", bytes.len() % 977).as_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Writes `data` compressed into a new image of our own making, cluster by cluster (zero
/// clusters skipped, as a converter does), through `write_compressed`.
fn write_compressed_image(image: &Path, options: CreateOptions, data: &[u8], direct: bool) {
    let cluster = options.cluster_size as usize;
    create_ours(image, options);
    let cache = if direct { ",file.cache=none" } else { "" };
    let data = data.to_vec();
    with_image(&format!("{}{cache}", qcow2_rw_options(image)), move |co, blk| {
        for (i, piece) in data.chunks(cluster).enumerate() {
            if piece.iter().any(|&byte| byte != 0) {
                blk.write_compressed(co, (i * cluster) as u64, piece)?;
            }
        }
        blk.close(co)
    })
    .unwrap();
}

/// The percentage of compressed clusters `qemu-img check` reports, asserting it is clean.
fn checked_compressed_share(image: &Path) -> f64 {
    let (status, text) = check_status(image);
    assert_eq!(status, 0, "qemu-img check: {text}");
    let before = text
        .split("% compressed clusters")
        .next()
        .filter(|before| before.len() < text.len())
        .unwrap_or_else(|| panic!("no compressed share in: {text}"));
    let share = before.rsplit(' ').next().unwrap_or_default();
    share.parse().unwrap_or_else(|_| panic!("'{share}' in: {text}"))
}

#[test]
fn qemu_reads_what_we_compressed_with_either_type_at_every_cluster_size() {
    let scratch = Scratch::new("compressed-write");
    for compression in [Compression::Deflate, Compression::Zstd] {
        for (cluster_size, size, extended_l2) in [
            (512, 1 << 20, false),
            (4096, 3 << 20, false),
            (65536, 5 << 20, false),
            (2 << 20, 7 << 20, false),
            (16384, 2 << 20, true),
            (65536, 5 << 20, true),
        ] {
            // A size that ends inside a cluster: the last one is written short.
            let size = size + 3 * 512;
            let what = format!("{compression:?}, {cluster_size}-byte clusters, {extended_l2}");
            let data = source(size, cluster_size);
            let raw = scratch.path("src.raw");
            std::fs::write(&raw, &data).unwrap();
            let image = scratch.path("c.qcow2");
            let _ = std::fs::remove_file(&image);
            let options = CreateOptions {
                cluster_size,
                compression,
                extended_l2,
                ..CreateOptions::new(size as u64)
            };
            write_compressed_image(&image, options, &data, cluster_size >= 65536);
            let share = checked_compressed_share(&image);
            assert!(share > 30.0, "{what}: only {share}% compressed clusters");
            qemu_compare(&image, &raw);
            assert_same_bytes(&qemu_raw(&image), &data, &what);
            assert_same_bytes(&read_ours(&image, 70000).unwrap(), &data, &what);
            let info = qemu_img(&["info", image.to_str().unwrap()]);
            assert!(info.contains(&format!("compression type: {}", compression.name())), "{info}");
            assert!(info.contains(&format!("extended l2: {extended_l2}")), "{what}: {info}");
        }
    }
}

#[test]
fn compressed_clusters_pack_into_shared_host_clusters_and_survive_overwrites() {
    let scratch = Scratch::new("compressed-pack");
    let image = scratch.path("p.qcow2");
    let raw = scratch.path("p.raw");
    let size = 4u64 << 20;
    let mut data = source(size as usize, 7);
    let options = CreateOptions { compression: Compression::Zstd, ..CreateOptions::new(size) };
    write_compressed_image(&image, options, &data, false);
    let file_len = std::fs::metadata(&image).unwrap().len();
    assert!(file_len < size / 2, "packed: {file_len} bytes for {size} of data");

    // Overwrite compressed clusters compressed again, normally, and partly; read it back.
    let overwrite = source(3 << 16, 99);
    let (again, plain) = (overwrite[..2 << 16].to_vec(), overwrite[2 << 16..].to_vec());
    data[..2 << 16].copy_from_slice(&again);
    data[5 << 16..][..1 << 16].copy_from_slice(&plain);
    data[(9 << 16) + 100..][..300].fill(0xee);
    with_image(&qcow2_rw_options(&image), move |co, blk| {
        blk.write_compressed(co, 0, &again)?;
        blk.write(co, 5 << 16, &plain)?;
        blk.write(co, (9 << 16) + 100, &[0xee; 300])?;
        blk.flush(co)?;
        // A write that is not whole clusters is refused, naming the rule.
        let error = blk.write_compressed(co, 512, &[1; 65536]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
        assert!(error.to_string().contains("whole"), "{error}");
        blk.close(co)
    })
    .unwrap();
    std::fs::write(&raw, &data).unwrap();
    let share = checked_compressed_share(&image);
    assert!(share > 10.0, "only {share}% compressed clusters after the overwrites");
    qemu_compare(&image, &raw);
    assert_same_bytes(&read_ours(&image, 4096).unwrap(), &data, "after overwrites");
}

#[test]
fn formats_without_compression_refuse_compressed_writes() {
    let scratch = Scratch::new("compressed-raw");
    let raw = scratch.path("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let options = format!("driver=raw,file.filename={}", raw.display());
    let error =
        with_image(&options, |co, blk| blk.write_compressed(co, 0, &[1; 65536])).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    assert!(error.to_string().contains("compressed"), "{error}");
}

/// The guest ranges `(start, length)` that `qemu-img map` calls compressed.
fn compressed_runs(image: &Path) -> Vec<(u64, u64)> {
    let map = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
    let number = |line: &str, key: &str| -> u64 {
        let after = line.split(&format!("\"{key}\": ")).nth(1).unwrap_or_else(|| panic!("{map}"));
        after.split([',', '}']).next().unwrap().trim().parse().unwrap()
    };
    map.lines()
        .filter(|line| line.contains("\"compressed\": true"))
        .map(|line| (number(line, "start"), number(line, "length")))
        .collect()
}

#[test]
fn compressed_writes_with_extended_l2_entries_replace_clusters_of_every_kind() {
    const K: u64 = 1024;
    let scratch = Scratch::new("compressed-extended");
    std::fs::write(scratch.path("base.raw"), vec![0xa1; 1 << 20]).unwrap();
    let image = scratch.path("e.qcow2");
    create_qcow2_over(image.to_str().unwrap(), "extended_l2=on", "base.raw", "raw", "1M");
    // Clusters of 64 KiB (2 KiB subclusters): 0 all allocated; 1 subclusters 0-1 allocated,
    // 4-5 zero, the rest the backing file's; 2 a zero cluster; 3 the backing file's; 4
    // compressed by qemu-io; 5 subcluster 0 allocated, the rest the backing file's.
    qemu_io(
        "qcow2",
        &image,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 64k 4k",
            "write -z 72k 4k",
            "write -z 128k 64k",
            "write -c -P 0x44 256k 64k",
            "write -P 0x55 320k 2k",
        ],
    );
    let clusters = 6;
    let data = source((clusters * 64 * K) as usize, 11);
    let mut shadow = vec![0xa1; 1 << 20];
    shadow[..data.len()].copy_from_slice(&data);
    let written = data.clone();
    with_image(&qcow2_rw_options(&image), move |co, blk| {
        blk.write_compressed(co, 0, &written)?;
        blk.close(co)
    })
    .unwrap();
    qemu_check(&image);
    assert_eq!(compressed_runs(&image), [(0, clusters * 64 * K)], "all six compressed");
    for cluster in 0..clusters {
        let entry_at = l2_entry_at(&image, 2 * cluster);
        let (entry, bitmap) = (peek_u64(&image, entry_at), peek_u64(&image, entry_at + 8));
        assert_eq!(entry >> 62, 0b01, "cluster {cluster}: a compressed entry ({entry:#x})");
        assert_eq!(bitmap, 0, "cluster {cluster}: a compressed cluster's bitmap is reserved");
    }
    let raw = scratch.path("shadow.raw");
    std::fs::write(&raw, &shadow).unwrap();
    qemu_compare(&image, &raw);
    assert_same_bytes(&read_ours(&image, 5000).unwrap(), &shadow, "ours, compressed");

    // A write into one of them copies it whole, as into qemu's compressed clusters.
    shadow[(64 * K + 100) as usize..][..10].fill(0x66);
    with_image(&qcow2_rw_options(&image), |co, blk| {
        blk.write(co, 64 * K + 100, &[0x66; 10])?;
        blk.close(co)
    })
    .unwrap();
    qemu_check(&image);
    std::fs::write(&raw, &shadow).unwrap();
    qemu_compare(&image, &raw);
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &shadow, "ours, after a write");
}
