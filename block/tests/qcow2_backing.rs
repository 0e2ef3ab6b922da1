//! Backing chains (qcow2 over qcow2 over raw) read like `qemu-img convert -O raw` of the
//! top; the backing format comes from the header extension or is probed; `backing.*`
//! options replace the header's backing file.

mod qcow2_support;

use std::path::{Path, PathBuf};

use aiocoro_block::Allocation;
use qcow2_support::*;

/// base.raw (2 MiB) <- mid.qcow2 (4 MiB, 64k clusters) <- top.qcow2 (6 MiB, 4k clusters),
/// backing names relative to the images' directory.
fn chain(scratch: &Scratch) -> PathBuf {
    let (base, mid, top) =
        (scratch.path("base.raw"), scratch.path("mid.qcow2"), scratch.path("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "2M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 2M"]);
    create_qcow2_over(mid.to_str().unwrap(), "", "base.raw", "raw", "4M");
    qemu_io("qcow2", &mid, &["write -P 0x22 512k 64k", "write -z 1M 64k", "write -P 0x23 3M 4k"]);
    let options = "cluster_size=4k";
    create_qcow2_over(top.to_str().unwrap(), options, "mid.qcow2", "qcow2", "6M");
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 0 4k",
            "write -P 0x34 1050k 8k",
            "write -P 0x35 5M 4k",
            "write -z 600k 4k",
        ],
    );
    top
}

#[test]
fn a_qcow2_over_qcow2_over_raw_chain_reads_like_qemu_img_convert() {
    let scratch = Scratch::new("chain");
    let top = chain(&scratch);
    let theirs = qemu_raw(&top);
    for chunk in [1 << 20, 3000, 65536 + 4096] {
        assert_same_bytes(
            &read_ours(&top, chunk).unwrap(),
            &theirs,
            &format!("chain, {chunk}-byte reads"),
        );
    }
    // Spot checks of what comes from where.
    assert_eq!(theirs[0], 0x33); // top
    assert_eq!(theirs[4096], 0x11); // base through two unallocated layers
    assert_eq!(theirs[512 << 10], 0x22); // mid
    assert_eq!(theirs[1 << 20], 0); // mid's zero cluster hides base
    assert_eq!(theirs[(3 << 20) - 1], 0); // past base's 2 MiB
    assert_eq!(theirs[5 << 20], 0x35);
}

#[test]
fn the_top_of_a_chain_reports_what_it_does_not_hold_as_unallocated() {
    let scratch = Scratch::new("chain-status");
    let top = chain(&scratch);
    let runs = status_ours(&top).unwrap();
    let at = |offset: u64| runs.iter().find(|(s, l, _)| (*s..s + l).contains(&offset)).unwrap().2;
    assert_eq!(at(0), Allocation::Data);
    assert_eq!(at(4096), Allocation::Unallocated);
    assert_eq!(at(600 << 10), Allocation::Zero);
    assert_eq!(at(1050 << 10), Allocation::Data);
    assert_eq!(at(4 << 20), Allocation::Unallocated);
}

#[test]
fn status_above_follows_the_chain_to_the_layer_that_holds_each_range() {
    let scratch = Scratch::new("chain-above");
    let top = chain(&scratch);
    let at = move |offset: u64| {
        with_image(&qcow2_options(&top), move |co, blk| {
            let status = blk.block_status_above(co, offset, 4096)?;
            Ok((status.allocation, status.depth, status.len))
        })
        .unwrap()
    };
    // top's data and zero cluster; mid's data and zero cluster; base's data under both.
    assert_eq!(at(0), (Allocation::Data, 1, 4096));
    assert_eq!(at(600 << 10), (Allocation::Zero, 1, 4096));
    assert_eq!(at(512 << 10), (Allocation::Data, 2, 4096));
    assert_eq!(at(1 << 20), (Allocation::Zero, 2, 4096));
    assert_eq!(at(4096), (Allocation::Data, 3, 4096));
    // Past base's 2 MiB (inside mid's 4 MiB): zeroes that base, the short layer, holds.
    assert_eq!(at(2 << 20), (Allocation::Zero, 3, 4096));
    // Past mid's 4 MiB, and mid's data at 3 MiB.
    assert_eq!(at(4 << 20), (Allocation::Zero, 2, 4096));
    assert_eq!(at(3 << 20), (Allocation::Data, 2, 4096));
}

/// A layer that holds nothing of a range and has no backing node: depth 0.
#[test]
fn status_above_of_a_range_no_layer_holds_has_depth_zero() {
    let scratch = Scratch::new("chain-above-none");
    let image = scratch.path("alone.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    let status =
        with_image(&qcow2_options(&image), |co, blk| blk.block_status_above(co, 0, 1 << 20))
            .unwrap();
    assert_eq!(
        (status.allocation, status.depth, status.len),
        (Allocation::Unallocated, 0, 1 << 20)
    );
}

/// Renames the backing format extension of `image` to an unknown type, so that readers
/// must probe.
fn forget_backing_format(image: &Path) {
    let header_length = u32::from_be_bytes(peek(image, 100, 4).try_into().unwrap()) as u64;
    let mut at = header_length;
    loop {
        let kind = u32::from_be_bytes(peek(image, at, 4).try_into().unwrap());
        let len = u32::from_be_bytes(peek(image, at + 4, 4).try_into().unwrap()) as u64;
        assert_ne!(kind, 0, "no backing format extension in {}", image.display());
        if kind == 0xe279_2aca {
            poke(image, at, &0x0bad_f00du32.to_be_bytes());
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn without_a_backing_format_the_backing_file_is_probed() {
    let scratch = Scratch::new("probe");
    let top = chain(&scratch);
    let theirs = qemu_raw(&top);
    forget_backing_format(&top);
    forget_backing_format(&scratch.path("mid.qcow2"));
    assert_same_bytes(&read_ours(&top, 1 << 20).unwrap(), &theirs, "probed chain");
}

#[test]
fn an_absolute_backing_name_and_a_missing_backing_file() {
    let scratch = Scratch::new("absolute");
    let base = scratch.path("base.qcow2");
    let top = scratch.path("top.qcow2");
    create_qcow2(base.to_str().unwrap(), "", "1M");
    qemu_io("qcow2", &base, &["write -P 0x44 0 1M"]);
    let base_abs = base.canonicalize().unwrap();
    create_qcow2_over(top.to_str().unwrap(), "", base_abs.to_str().unwrap(), "qcow2", "1M");
    assert_eq!(read_ours(&top, 1 << 20).unwrap(), vec![0x44; 1 << 20]);
    std::fs::remove_file(&base).unwrap();
    let error = open_error(&top);
    assert!(error.to_string().contains("base.qcow2"), "{error}");
}

#[test]
fn backing_options_replace_the_header_backing_file() {
    let scratch = Scratch::new("override");
    let top = chain(&scratch);
    let other = scratch.path("other.raw");
    std::fs::write(&other, vec![0x66u8; 6 << 20]).unwrap();
    let options = format!(
        "driver=qcow2,read-only=on,file.filename={},backing.driver=raw,backing.file.filename={}",
        top.display(),
        other.display()
    );
    let bytes = with_image(&options, |co, blk| {
        let mut bytes = vec![0u8; blk.length() as usize];
        blk.read(co, 0, &mut bytes)?;
        Ok(bytes)
    })
    .unwrap();
    assert_eq!(bytes[0], 0x33);
    assert_eq!(bytes[4096], 0x66);
    assert_eq!(bytes[600 << 10], 0);
    assert_eq!(bytes[(6 << 20) - 1], 0x66);
}
