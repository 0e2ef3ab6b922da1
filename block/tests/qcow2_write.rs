//! qcow2 writes checked by QEMU's own tools: images made by `qcow2::create` and by
//! `qemu-img create` (several option sets, with and without a backing chain) are written
//! here in aligned, unaligned and cluster-spanning patterns, then `qemu-img check` must find
//! no errors and no leaks, `qemu-io` must read the last pattern back, and `qemu-img compare`
//! must find the image identical to a raw shadow that took the same writes.

mod qcow2_support;

use std::path::{Path, PathBuf};

use aiocoro_block::qcow2::{Compat, CreateOptions};
use qcow2_support::*;

const SIZE: u64 = 6 << 20;

/// One write: `len` bytes of `byte` at `offset`.
#[derive(Clone, Copy, Debug)]
struct Write {
    offset: u64,
    len: u64,
    byte: u8,
}

/// Aligned, unaligned and spanning writes, and overwrites of earlier ones.
fn patterns(cluster: u64, seed: u64) -> Vec<Write> {
    let mut rng = Rng(seed);
    let mut writes = vec![
        Write { offset: 0, len: cluster, byte: 0x11 },
        // Enough clusters of 512 B to outgrow a one-cluster refcount table of 64-bit
        // refcounts (64 blocks of 64 clusters).
        Write { offset: 2 << 20, len: 3 << 20, byte: 0x12 },
        Write { offset: 3 * cluster + 100, len: 50, byte: 0x22 },
        Write { offset: 5 * cluster - 7, len: 3 * cluster + 20, byte: 0x33 },
        Write { offset: SIZE - 1000, len: 1000, byte: 0x44 },
        Write { offset: 10, len: 20, byte: 0x55 },
        Write { offset: (1 << 20) + 12_345, len: 300_000, byte: 0x66 },
    ];
    for i in 0..40u8 {
        let len = 1 + rng.below(3 * cluster);
        let offset = rng.below(SIZE - len);
        writes.push(Write { offset, len, byte: 0x70 + i });
    }
    writes
}

/// Applies `writes` to the image through our driver (read-write) and to the raw `shadow`.
fn write_both(image: &Path, shadow: &Path, writes: &[Write]) {
    let list = writes.to_vec();
    with_image(&qcow2_rw_options(image), move |co, blk| {
        for w in &list {
            blk.write(co, w.offset, &vec![w.byte; w.len as usize])?;
        }
        blk.flush(co)
    })
    .unwrap();
    for w in writes {
        poke(shadow, w.offset, &vec![w.byte; w.len as usize]);
    }
}

/// The checks every written image must pass.
fn verify(image: &Path, shadow: &Path, last: Write) {
    qemu_check(image);
    qemu_io("qcow2", image, &[&format!("read -q -P {} {} {}", last.byte, last.offset, last.len)]);
    qemu_compare(image, shadow);
    let ours = read_ours(image, 1 << 20).unwrap();
    assert_same_bytes(&ours, &std::fs::read(shadow).unwrap(), "our read-back");
}

/// A raw shadow of `SIZE` bytes, copied from `base` (a raw file) if given.
fn shadow(scratch: &Scratch, base: Option<&Path>) -> PathBuf {
    let path = scratch.path("shadow.raw");
    match base {
        Some(base) => {
            std::fs::copy(base, &path).unwrap();
        }
        None => std::fs::write(&path, []).unwrap(),
    }
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(SIZE).unwrap();
    path
}

fn ours(cluster_size: u64, compat: Compat, refcount_bits: u32, lazy: bool) -> CreateOptions {
    CreateOptions {
        cluster_size,
        compat,
        refcount_bits,
        lazy_refcounts: lazy,
        ..CreateOptions::new(SIZE)
    }
}

#[test]
fn images_created_here_pass_qemu_img_check() {
    let scratch = Scratch::new("write-create");
    let image = scratch.path("a.qcow2");
    for (i, options) in [
        CreateOptions::new(SIZE),
        ours(4096, Compat::V3, 1, false),
        ours(512, Compat::V3, 64, true),
        ours(65536, Compat::V2, 16, false),
        ours(2 << 20, Compat::V3, 8, false),
    ]
    .into_iter()
    .enumerate()
    {
        create_ours(&image, options.clone());
        qemu_check(&image);
        let info = qemu_img(&["info", image.to_str().unwrap()]);
        assert!(info.contains(&format!("cluster_size: {}", options.cluster_size)), "{i}: {info}");
        let compat = if options.compat == Compat::V2 { "0.10" } else { "1.1" };
        assert!(info.contains(&format!("compat: {compat}")), "{i}: {info}");
        if options.compat == Compat::V3 {
            assert!(info.contains(&format!("refcount bits: {}", options.refcount_bits)), "{info}");
            assert!(info.contains(&format!("lazy refcounts: {}", options.lazy_refcounts)));
        }
    }
}

#[test]
fn writes_to_images_created_here() {
    let scratch = Scratch::new("write-ours");
    for (i, options) in [
        CreateOptions::new(SIZE),
        ours(4096, Compat::V3, 1, false),
        // 64 refcounts per block and 64 blocks per table cluster: the writes add refcount
        // blocks and grow the refcount table.
        ours(512, Compat::V3, 64, true),
        ours(65536, Compat::V2, 16, false),
        ours(8192, Compat::V3, 4, false),
    ]
    .into_iter()
    .enumerate()
    {
        let image = scratch.path(&format!("ours{i}.qcow2"));
        let cluster = options.cluster_size;
        create_ours(&image, options);
        let shadow = shadow(&scratch, None);
        let writes = patterns(cluster, 0x9e37_79b9 + i as u64);
        write_both(&image, &shadow, &writes);
        verify(&image, &shadow, *writes.last().unwrap());
        if i == 2 {
            // The refcount table (header bytes 56..60: its clusters) grew from one cluster.
            let clusters = u32::from_be_bytes(peek(&image, 56, 4).try_into().unwrap());
            assert!(clusters > 1, "the refcount table still has {clusters} cluster(s)");
        }
    }
}

#[test]
fn writes_to_images_created_by_qemu_img() {
    let scratch = Scratch::new("write-qemu");
    for (i, options) in [
        "cluster_size=64k",
        "cluster_size=4k,refcount_bits=2",
        "compat=0.10",
        "cluster_size=1k,lazy_refcounts=on,refcount_bits=32",
    ]
    .into_iter()
    .enumerate()
    {
        let image = scratch.path(&format!("qemu{i}.qcow2"));
        create_qcow2(image.to_str().unwrap(), options, "6M");
        let shadow = shadow(&scratch, None);
        let cluster = if i == 1 {
            4096
        } else if i == 3 {
            1024
        } else {
            65536
        };
        let writes = patterns(cluster, 0x1234 + i as u64);
        write_both(&image, &shadow, &writes);
        verify(&image, &shadow, *writes.last().unwrap());
    }
}

#[test]
fn writes_into_a_backing_chain() {
    let scratch = Scratch::new("write-chain");
    let base = scratch.path("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "6M"]);
    qemu_io("raw", &base, &["write -P 0xa1 0 6M"]);
    let mid = scratch.path("mid.qcow2");
    create_ours(
        &mid,
        CreateOptions {
            cluster_size: 4096,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..CreateOptions::new(SIZE)
        },
    );
    qemu_io("qcow2", &mid, &["write -P 0xb2 1M 256k", "write -z 2M 64k"]);
    let top = scratch.path("top.qcow2");
    let (m, t) = (mid.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", m, "-F", "qcow2", t]);
    // The shadow starts as what the chain reads.
    let shadow = scratch.path("shadow.raw");
    std::fs::write(&shadow, qemu_raw(&top)).unwrap();
    let writes = patterns(16384, 77);
    write_both(&top, &shadow, &writes);
    verify(&top, &shadow, *writes.last().unwrap());
    qemu_check(&mid);
}
