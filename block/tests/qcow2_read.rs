//! qcow2 images made and written by the real qemu-img / qemu-io read back through our driver
//! byte for byte as `qemu-img convert -O raw` reads them; block status agrees with
//! `qemu-img map`.

mod qcow2_support;

use std::io::IoSliceMut;
use std::path::Path;

use aiocoro_block::Allocation;
use qcow2_support::*;

/// Writes that cover a whole cluster, a zeroed range, ranges inside one cluster and across
/// many, data at the end, a discard, in an 8 MiB image.
const WRITES: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -z 1M 64k",
    "write -P 0x12 3000 5000",
    "write -P 0xcd 1536k 100k",
    "write -P 0x55 2M 1M",
    "write -z 2304k 4k",
    "discard 2560k 128k",
    "write -P 0x77 7M 1M",
    "write -P 0x99 8388096 512",
];

fn make(scratch: &Scratch, name: &str, options: &str) -> std::path::PathBuf {
    let image = scratch.path(name);
    create_qcow2(image.to_str().unwrap(), options, "8M");
    qemu_io("qcow2", &image, WRITES);
    image
}

fn check_reads_like_qemu(image: &Path, what: &str) {
    let theirs = qemu_raw(image);
    for chunk in [1 << 20, 4096 + 512, 65536 * 3 + 7] {
        let ours = read_ours(image, chunk).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_same_bytes(&ours, &theirs, &format!("{what}, {chunk}-byte reads"));
    }
}

#[test]
fn images_of_every_layout_read_like_qemu_img_convert() {
    let scratch = Scratch::new("layouts");
    let layouts = [
        "compat=0.10,cluster_size=512",
        "compat=0.10,cluster_size=64k",
        "compat=0.10,cluster_size=2M",
        "compat=1.1,cluster_size=512,refcount_bits=1",
        "compat=1.1,cluster_size=64k,refcount_bits=16,lazy_refcounts=on",
        "compat=1.1,cluster_size=2M,refcount_bits=64",
        "compat=1.1,cluster_size=4k,refcount_bits=8,lazy_refcounts=on",
        "compat=1.1,cluster_size=64k,preallocation=metadata",
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let image = make(&scratch, &format!("{i}.qcow2"), layout);
        check_reads_like_qemu(&image, layout);
    }
}

#[test]
fn an_empty_image_reads_as_zeroes_and_is_unallocated() {
    let scratch = Scratch::new("empty");
    let image = scratch.path("empty.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "3M");
    assert_eq!(read_ours(&image, 1 << 20).unwrap(), vec![0u8; 3 << 20]);
    assert_eq!(status_ours(&image).unwrap(), [(0, 3 << 20, Allocation::Unallocated)]);
}

#[test]
fn a_virtual_size_that_is_not_a_cluster_multiple_reads_to_its_last_byte() {
    let scratch = Scratch::new("odd-size");
    let image = scratch.path("odd.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1000448");
    qemu_io("qcow2", &image, &["write -P 0x3c 999936 512", "write -P 0x3d 0 1000448"]);
    qemu_io("qcow2", &image, &["write -P 0x3e 65000 2000"]);
    check_reads_like_qemu(&image, "odd size");
}

#[test]
fn vectored_reads_spanning_clusters_fill_every_buffer() {
    let scratch = Scratch::new("vectored");
    let image = make(&scratch, "v.qcow2", "cluster_size=4k");
    let theirs = qemu_raw(&image);
    let ours = with_image(&qcow2_options(&image), |co, blk| {
        let (mut a, mut b, mut c) = (vec![1u8; 3000], vec![2u8; 70000], vec![3u8; 1]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b), IoSliceMut::new(&mut c)];
        blk.readv(co, 1000, &mut bufs)?;
        Ok([a, b, c].concat())
    })
    .unwrap();
    assert_same_bytes(&ours, &theirs[1000..1000 + 73001], "vectored read");
}

/// `qemu-img map --output=json` as `(start, length, data, zero)`.
fn qemu_map(image: &Path) -> Vec<(u64, u64, bool, bool)> {
    let json = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
    let field = |entry: &str, key: &str| -> String {
        let at = entry.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        entry[at..].trim_start().split([',', '}']).next().unwrap().trim().to_owned()
    };
    json.split('{')
        .skip(1)
        .map(|entry| {
            (
                field(entry, "start").parse().unwrap(),
                field(entry, "length").parse().unwrap(),
                field(entry, "data") == "true",
                field(entry, "zero") == "true",
            )
        })
        .collect()
}

#[test]
fn block_status_agrees_with_qemu_img_map() {
    let scratch = Scratch::new("status");
    for (i, layout) in
        ["compat=1.1,cluster_size=64k", "compat=1.1,cluster_size=512"].iter().enumerate()
    {
        let image = make(&scratch, &format!("{i}.qcow2"), layout);
        let ours = status_ours(&image).unwrap();
        // qemu-img map (no backing): data -> Data, zero without data -> Zero or Unallocated.
        for (start, len, data, zero) in qemu_map(&image) {
            let mut at = start;
            while at < start + len {
                let (s, l, allocation) =
                    *ours.iter().find(|(s, l, _)| (*s..s + l).contains(&at)).unwrap();
                let agrees = match allocation {
                    Allocation::Data => data,
                    Allocation::Zero | Allocation::Unallocated => !data && zero,
                    other => panic!("{layout}: a status qcow2 does not give: {other:?}"),
                };
                assert!(
                    agrees,
                    "{layout}: at {at:#x} we say {allocation:?}, qemu-img map says data={data} zero={zero}"
                );
                at = (s + l).min(start + len);
            }
        }
        assert!(ours.iter().any(|run| run.2 == Allocation::Zero), "{layout}: {ours:?}");
    }
}

#[test]
fn writes_to_an_image_opened_read_only_are_refused() {
    let scratch = Scratch::new("writes");
    let image = scratch.path("w.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    let error =
        with_image(&qcow2_options(&image), |co, blk| blk.write(co, 0, &[1u8; 512])).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
    let error = with_image(&qcow2_options(&image), |co, blk| blk.write_zeroes(co, 0, 512, true))
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
}
