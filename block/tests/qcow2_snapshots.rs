//! Images with internal snapshots (`qemu-img snapshot -c`): listed as `qemu-img snapshot -l`
//! lists them, read, and written with the snapshots kept intact (shared clusters and L2
//! tables copied on write): `qemu-img check` clean, each snapshot reads as it was taken,
//! the current state reads what we wrote.

mod qcow2_support;

use std::path::Path;

use aiocoro_block::BlockGraph;
use qcow2_support::*;

/// The guest bytes of snapshot `name` of `image`, as `qemu-img convert -l` reads them.
fn snapshot_raw(image: &Path, name: &str) -> Vec<u8> {
    let out = image.with_extension(format!("{name}.raw"));
    let snapshot = format!("snapshot.name={name}");
    qemu_img(&[
        "convert",
        "-l",
        &snapshot,
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Our writes (through the node opened with `options`): into shared clusters (partly and
/// wholly), a shared compressed cluster, zeroes over shared data, and fresh clusters;
/// applied to `shadow` too.
fn write_ours(options: &str, shadow: &mut [u8], cluster: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut writes: Vec<(u64, Vec<u8>)> = vec![
        (4096 + 512, vec![0xa0 ^ seed as u8; 8192]),
        (2 << 20, vec![0xb0 ^ seed as u8; cluster as usize]),
        ((3 << 20) + 100, vec![0xc0 ^ seed as u8; 300]),
        ((5 << 20) + 7 * 512, vec![0xd0 ^ seed as u8; 3 * cluster as usize]),
    ];
    for _ in 0..20 {
        let offset = rng.below(6 << 20) & !511;
        let len = (rng.below(4) + 1) * 512;
        writes.push((offset, vec![rng.next() as u8; len as usize]));
    }
    let zero = (1 << 20, cluster * 2);
    for (offset, bytes) in &writes {
        shadow[*offset as usize..][..bytes.len()].copy_from_slice(bytes);
    }
    shadow[zero.0 as usize..][..zero.1 as usize].fill(0);
    with_image(options, move |co, blk| {
        for (offset, bytes) in &writes {
            blk.write(co, *offset, bytes)?;
        }
        blk.write_zeroes(co, zero.0, zero.1, true)?;
        blk.close(co)
    })
    .unwrap();
}

#[test]
fn writing_an_image_with_snapshots_keeps_them_intact() {
    let scratch = Scratch::new("snapshots");
    let cases = [
        (4096u64, false, ""),
        (65536, false, ""),
        (65536, true, ""),
        (65536, false, ",extended_l2=on"),
    ];
    for (cluster, direct, extra) in cases {
        let image = scratch.path("s.qcow2");
        let options = qcow2_rw_options(&image) + if direct { ",file.cache=none" } else { "" };
        let _ = std::fs::remove_file(&image);
        create_qcow2(image.to_str().unwrap(), &format!("cluster_size={cluster}{extra}"), "8M");
        qemu_io(
            "qcow2",
            &image,
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 2M 256k",
                "write -c -P 0x33 3M 64k",
                "write -P 0x44 5M 512k",
            ],
        );
        qemu_img(&["snapshot", "-c", "first", image.to_str().unwrap()]);
        let first = qemu_raw(&image);
        let mut current = first.clone();
        write_ours(&options, &mut current, cluster, 1);
        let (status, text) = check_status(&image);
        assert_eq!(status, 0, "{cluster}{extra}: after our writes: {text}");
        assert_same_bytes(&snapshot_raw(&image, "first"), &first, "snapshot 'first'");
        assert_same_bytes(&qemu_raw(&image), &current, "the current state, read by qemu-img");
        assert_same_bytes(&read_ours(&image, 70000).unwrap(), &current, "read by us");

        // A second snapshot over our writes; writes again; both snapshots stay.
        qemu_img(&["snapshot", "-c", "second", image.to_str().unwrap()]);
        let second = current.clone();
        write_ours(&options, &mut current, cluster, 2);
        let (status, text) = check_status(&image);
        assert_eq!(status, 0, "{cluster}{extra}: after the second round: {text}");
        assert_same_bytes(&snapshot_raw(&image, "first"), &first, "snapshot 'first' again");
        assert_same_bytes(&snapshot_raw(&image, "second"), &second, "snapshot 'second'");
        assert_same_bytes(&read_ours(&image, 65536).unwrap(), &current, "read by us again");

        // Reverting to a snapshot (qemu-img snapshot -a) gives its bytes back, and a check
        // after deleting the other finds the image clean.
        qemu_img(&["snapshot", "-a", "first", image.to_str().unwrap()]);
        assert_same_bytes(&qemu_raw(&image), &first, "reverted to 'first'");
        qemu_img(&["snapshot", "-d", "second", image.to_str().unwrap()]);
        let (status, text) = check_status(&image);
        assert_eq!(status, 0, "{cluster}{extra}: after revert and delete: {text}");
    }
}

#[test]
fn snapshots_are_listed_as_qemu_img_lists_them() {
    let scratch = Scratch::new("snapshot-list");
    let image = scratch.path("l.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "4M");
    let list = |image: &Path| {
        let file = format!("driver=file,read-only=on,filename={}", image.display());
        aiocoro_block::run_in_coroutine(move |co| {
            let graph = BlockGraph::new();
            let (_, node) = aiocoro_block::open(co, &graph, &file)?;
            aiocoro_block::qcow2::list_snapshots(co, &node)
        })
        .unwrap()
        .unwrap()
    };
    assert!(list(&image).is_empty());
    qemu_io("qcow2", &image, &["write -P 1 0 128k"]);
    for name in ["first", "a name longer than sixteen characters"] {
        qemu_img(&["snapshot", "-c", name, image.to_str().unwrap()]);
    }
    let snapshots = list(&image);
    assert_eq!(snapshots.len(), 2);
    assert_eq!(snapshots[1].name, "a name longer than sixteen characters");
    let theirs = qemu_img(&["snapshot", "-l", image.to_str().unwrap()]);
    assert_eq!(aiocoro_block::qcow2::snapshot_list(&snapshots), theirs);
}
