//! Writes mixed with QEMU's: images written by `qemu-io` (data, compressed and zero
//! clusters) overwritten here and then by `qemu-io` again; `write_zeroes`, `discard` and
//! `truncate` round trips; images that must not be written; images whose driver was dropped
//! without a flush (no errors allowed, only leaks). Every written image is checked
//! with `qemu-img check` (no errors, no leaks) and `qemu-img compare` against a raw shadow.

mod qcow2_support;

use std::io::ErrorKind;
use std::path::Path;

use aiocoro_block::qcow2::{Compat, CreateOptions};
use qcow2_support::*;

const K: u64 = 1024;

/// What a step does to the guest, applied to our image and the shadow alike.
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
}

fn ours(image: &Path, shadow: &Path, ops: Vec<Op>) {
    for op in &ops {
        match *op {
            Op::Write(offset, len, byte) => poke(shadow, offset, &vec![byte; len as usize]),
            Op::Zero(offset, len) => poke(shadow, offset, &vec![0; len as usize]),
        }
    }
    with_image(&qcow2_rw_options(image), move |co, blk| {
        for op in &ops {
            match *op {
                Op::Write(offset, len, byte) => blk.write(co, offset, &vec![byte; len as usize])?,
                Op::Zero(offset, len) => blk.write_zeroes(co, offset, len, true)?,
            }
        }
        blk.flush(co)
    })
    .unwrap();
}

/// `qemu-io` writes (`write [-c|-z] [-P byte] offset len`), mirrored in the shadow.
fn theirs(image: &Path, shadow: &Path, writes: &[(&str, u64, u64, u8)]) {
    let commands: Vec<String> = writes
        .iter()
        .map(|&(flags, offset, len, byte)| {
            poke(shadow, offset, &vec![if flags == "-z" { 0 } else { byte }; len as usize]);
            match flags {
                "-z" => format!("write -z {offset} {len}"),
                flags => format!("write {flags} -P {byte} {offset} {len}"),
            }
        })
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io("qcow2", image, &commands);
}

fn raw_shadow(scratch: &Scratch, len: u64) -> std::path::PathBuf {
    let shadow = scratch.path("shadow.raw");
    std::fs::write(&shadow, []).unwrap();
    std::fs::OpenOptions::new().write(true).open(&shadow).unwrap().set_len(len).unwrap();
    shadow
}

/// `base.raw` in `scratch`: 2 MiB of 0xa1 bytes.
fn filled_base(scratch: &Scratch) -> std::path::PathBuf {
    let base = scratch.path("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "2M"]);
    qemu_io("raw", &base, &["write -P 0xa1 0 2M"]);
    base
}

/// A 4 KiB-cluster image `name` of `size` bytes over `base.raw` (raw), created here.
fn create_over_base(
    scratch: &Scratch,
    name: &str,
    compat: Compat,
    size: u64,
) -> std::path::PathBuf {
    let image = scratch.path(name);
    let options = CreateOptions {
        cluster_size: 4096,
        compat,
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(size)
    };
    create_ours(&image, options);
    image
}

#[test]
fn qemu_io_then_ours_then_qemu_io() {
    let scratch = Scratch::new("write-interop");
    let image = scratch.path("i.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "4M");
    let shadow = raw_shadow(&scratch, 4 << 20);
    theirs(
        &image,
        &shadow,
        &[
            ("", 0, 256 * K, 0x11),
            ("-c", 512 * K, 128 * K, 0x22),
            ("-z", 1024 * K, 128 * K, 0),
            ("", 1536 * K, 64 * K, 0x33),
        ],
    );
    // Zero the allocated cluster at 1536k without unmapping it (QEMU keeps it preallocated
    // under the zero flag).
    qemu_io("qcow2", &image, &["write -z 1536k 64k"]);
    poke(&shadow, 1536 * K, &vec![0; 64 * K as usize]);
    qemu_check(&image);
    ours(
        &image,
        &shadow,
        vec![
            Op::Write(100, 5000, 0x44),                 // in place
            Op::Write(512 * K + 100, 1000, 0x55),       // into a compressed cluster
            Op::Write(640 * K - 10, 20, 0x56),          // across two compressed clusters
            Op::Write(1024 * K + 5000, 10, 0x66),       // into a zero cluster
            Op::Write(1536 * K + 1, 1, 0x77),           // into a preallocated zero cluster
            Op::Write(3 * 1024 * K - 3, 200 * K, 0x88), // fresh clusters, unaligned
            Op::Zero(192 * K, 64 * K),                  // a whole data cluster
        ],
    );
    qemu_check(&image);
    qemu_compare(&image, &shadow);
    theirs(&image, &shadow, &[("", 600 * K, 100 * K, 0x99), ("", 3 * 1024 * K, 4 * K, 0xaa)]);
    ours(&image, &shadow, vec![Op::Write(650 * K, 3, 0xbb), Op::Write(3 * 1024 * K + 1, 2, 0xcc)]);
    qemu_check(&image);
    qemu_compare(&image, &shadow);
    qemu_io("qcow2", &image, &["read -q -P 0xbb 650k 3", "read -q -P 0x99 651k 40k"]);
}

#[test]
fn growing_over_a_longer_backing_file_reads_zeroes_in_the_new_area() {
    let scratch = Scratch::new("write-grow-backing");
    filled_base(&scratch);
    for (i, compat) in [Compat::V3, Compat::V2].into_iter().enumerate() {
        // An old size inside a cluster (whole sectors: qcow2 sizes are).
        let image = create_over_base(&scratch, &format!("g{i}.qcow2"), compat, (1 << 20) + 1024);
        with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.truncate(co, 3 << 20)?;
            blk.flush(co)
        })
        .unwrap();
        // The old size's bytes from the backing file, zeroes after.
        let shadow = scratch.path("shadow.raw");
        let mut expected = vec![0u8; 3 << 20];
        expected[..(1 << 20) + 1024].fill(0xa1);
        std::fs::write(&shadow, &expected).unwrap();
        qemu_check(&image);
        qemu_compare(&image, &shadow);
    }
}

#[test]
fn zeroes_discard_and_growing() {
    let scratch = Scratch::new("write-zero");
    let base = filled_base(&scratch);
    for (i, compat) in [Compat::V3, Compat::V2].into_iter().enumerate() {
        let image = create_over_base(&scratch, &format!("z{i}.qcow2"), compat, 2 << 20);
        let shadow = scratch.path("shadow.raw");
        std::fs::copy(&base, &shadow).unwrap();
        ours(
            &image,
            &shadow,
            vec![
                Op::Write(0, 512 * K, 0x10),
                Op::Zero(8 * K, 16 * K),       // whole clusters over data
                Op::Zero(100 * K + 7, 10 * K), // partial ends, whole middle
                Op::Zero(1024 * K, 64 * K),    // over the backing file
                Op::Zero(1500 * K + 3, 100),   // inside one cluster
            ],
        );
        qemu_check(&image);
        qemu_compare(&image, &shadow);

        // Discard drops whole clusters, which then read as zeroes (version 3: the zero flag
        // hides the backing file); a version 2 image cannot say so and keeps them, as QEMU
        // does. The partial head and tail are left alone.
        with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.discard(co, 200 * K + 1, 40 * K)?;
            blk.flush(co)
        })
        .unwrap();
        if compat == Compat::V3 {
            poke(&shadow, 204 * K, &vec![0u8; 36 * K as usize]);
        }
        qemu_check(&image);
        qemu_compare(&image, &shadow);

        // Growing to 64 MiB needs a larger L1 table; past the backing file reads zeroes.
        with_image(&qcow2_rw_options(&image), |co, blk| {
            let error = blk.truncate(co, 1 << 20).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
            assert!(error.to_string().contains("shrinking"), "{error}");
            blk.truncate(co, 64 << 20)?;
            assert_eq!(blk.length(), 64 << 20);
            blk.write(co, (60 << 20) + 5, &[0xee; 9000])?;
            blk.flush(co)
        })
        .unwrap();
        std::fs::OpenOptions::new().write(true).open(&shadow).unwrap().set_len(64 << 20).unwrap();
        poke(&shadow, (60 << 20) + 5, &[0xee; 9000]);
        qemu_check(&image);
        qemu_compare(&image, &shadow);
        let info = qemu_img(&["info", image.to_str().unwrap()]);
        assert!(info.contains("virtual size: 64 MiB"), "{info}");
    }
}

#[test]
fn growing_needs_an_l1_table_larger_than_half_a_refcount_block() {
    // 512 B clusters: one L2 table maps 32 KiB, and a refcount block counts 256 clusters
    // (16-bit refcounts) or 64 (64-bit). The new L1 tables take 1024 and 100 clusters.
    let scratch = Scratch::new("write-grow-l1");
    for (options, from, to) in [
        ("cluster_size=512", 200 << 20, 2u64 << 30),
        ("cluster_size=512,refcount_bits=64", 1 << 20, 100 << 20),
    ] {
        let image = scratch.path("g.qcow2");
        let _ = std::fs::remove_file(&image);
        create_qcow2(image.to_str().unwrap(), options, &from.to_string());
        qemu_io("qcow2", &image, &["write -P 0x61 0 64k"]);
        with_image(&qcow2_rw_options(&image), move |co, blk| {
            blk.truncate(co, to)?;
            blk.write(co, to - 5000, &[0x62; 5000])?;
            blk.flush(co)
        })
        .unwrap_or_else(|error| panic!("{options}: {error}"));
        qemu_check(&image);
        let end = format!("read -q -P 0x62 {} 5000", to - 5000);
        qemu_io("qcow2", &image, &["read -q -P 0x61 0 64k", &end]);
    }
}

#[test]
fn dirty_images_are_repaired_when_opened_for_writing() {
    let scratch = Scratch::new("write-dirty");
    let image = scratch.path("d.qcow2");
    create_qcow2(image.to_str().unwrap(), "lazy_refcounts=on", "4M");
    qemu_io("qcow2", &image, &["write -P 0x11 0 64k"]);
    // qemu-io dies after allocating writes with lazy refcounts: the L2 entries are on disk,
    // the refcounts of the new clusters are not, and the dirty bit is set.
    let killed = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 1M 192k", "-c", "sigraise 9"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9));
    assert_eq!(peek_u64(&image, 72) & 1, 1, "the dirty bit is set");
    assert_eq!(check_status(&image).0, 2, "the refcounts are stale");

    // Allocating writes would take the clusters counted free but in use, unless the open
    // repairs the refcounts first.
    with_image(&qcow2_rw_options(&image), |co, blk| {
        blk.write(co, 2 << 20, &[0x33; 256 << 10])?;
        blk.flush(co)
    })
    .unwrap();
    assert_eq!(peek_u64(&image, 72) & 1, 0, "the dirty bit is cleared");
    qemu_check(&image);
    qemu_io(
        "qcow2",
        &image,
        &["read -q -P 0x11 0 64k", "read -q -P 0x22 1M 192k", "read -q -P 0x33 2M 256k"],
    );
    // Read-only, a dirty image is read as it is.
    poke(&image, 72, &1u64.to_be_bytes());
    read_ours(&image, 1 << 20).unwrap();
    assert_eq!(peek_u64(&image, 72) & 1, 1, "a read-only open repairs nothing");
}

#[test]
fn a_refcount_block_outside_the_file_is_an_error_not_free_space() {
    let scratch = Scratch::new("write-bad-refblock");
    for (what, entry) in [("past the end", 1u64 << 40), ("beyond 2^56", (1u64 << 60) | 0x10000)] {
        let image = scratch.path("r.qcow2");
        let _ = std::fs::remove_file(&image);
        create_qcow2(image.to_str().unwrap(), "", "1M");
        qemu_io("qcow2", &image, &["write -P 0x5a 0 64k"]);
        let table = peek_u64(&image, 48);
        poke(&image, table, &entry.to_be_bytes());
        // A write that allocates needs the refcount block: reading zeroes from past the end
        // of the file would make every cluster look free, the header's included.
        let result =
            with_image(&qcow2_rw_options(&image), |co, blk| blk.write(co, 512 << 10, &[1; 4096]));
        let error = result.err().unwrap_or_else(|| {
            panic!("{what}: the write succeeded; the refcount block should be refused")
        });
        assert_eq!(error.kind(), ErrorKind::InvalidData, "{what}: {error}");
        assert!(error.to_string().contains("refcount"), "{what}: {error}");
        let data = qemu_raw(&image);
        assert!(data[..64 << 10].iter().all(|&b| b == 0x5a), "{what}: the data is intact");
    }
}

#[test]
fn a_corrupt_copied_l2_entry_fails_the_write_instead_of_writing_where_it_points() {
    let scratch = Scratch::new("write-bad-l2");
    let image = scratch.path("c.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=64k", "1M");
    qemu_io("qcow2", &image, &["write -P 0x5a 0 128k"]);
    let original = std::fs::read(&image).unwrap();
    // Guest clusters 0 and 1 hold data at `data` and `data + 64k`, the last cluster of the
    // file; each case makes entry `index` say "refcount one, write in place" somewhere else.
    let data = peek_u64(&image, l2_entry_at(&image, 0)) & 0x00ff_ffff_ffff_fe00;
    for (what, index, offset) in [
        ("unaligned", 0, data + 0x200),
        ("past the end of the file", 0, 1 << 40),
        ("contiguous, past the end of the file", 2, data + (128 << 10)),
    ] {
        std::fs::write(&image, &original).unwrap();
        poke(&image, l2_entry_at(&image, index), &((1u64 << 63) | offset).to_be_bytes());
        let file_len = std::fs::metadata(&image).unwrap().len();
        // One write over guest clusters 0 to 2, of the bytes that are there already.
        let result = with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.write(co, 4096, &[0x5a; (192 << 10) - 8192])?;
            blk.flush(co)
        });
        let error = result.err().unwrap_or_else(|| {
            panic!("{what}: the write succeeded; the corrupt L2 entry should be refused")
        });
        assert_eq!(error.kind(), ErrorKind::InvalidData, "{what}: {error}");
        assert!(error.to_string().contains(&format!("L2 entry {index}")), "{what}: {error}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), file_len, "{what}: the file grew");
        assert!(peek(&image, data, 128 << 10).iter().all(|&b| b == 0x5a), "{what}: data changed");
    }
}

#[test]
fn dropping_a_corrupt_unaligned_l2_entry_frees_no_other_cluster() {
    let scratch = Scratch::new("write-unaligned-drop");
    let image = scratch.path("u.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=64k", "1M");
    qemu_io("qcow2", &image, &["write -P 0x11 0 64k", "write -P 0x22 64k 64k"]);
    let original = std::fs::read(&image).unwrap();
    let data1 = peek_u64(&image, l2_entry_at(&image, 1)) & 0x00ff_ffff_ffff_fe00;
    // Entry 0 (shared, or a preallocated zero cluster) names an unaligned offset inside the
    // cluster of guest cluster 1: it holds no reference to that cluster.
    for (what, entry) in [("shared", data1 + 0x200), ("zero", data1 + 0x200 + 1)] {
        std::fs::write(&image, &original).unwrap();
        poke(&image, l2_entry_at(&image, 0), &entry.to_be_bytes());
        with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.discard(co, 0, 64 << 10)?;
            blk.flush(co)?;
            // First fit: a cluster freed by mistake is the one this write gets.
            blk.write(co, 128 << 10, &[0x33; 64 << 10])?;
            blk.flush(co)
        })
        .unwrap_or_else(|error| panic!("{what}: {error}"));
        let data = qemu_raw(&image);
        assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 0x22), "{what}: cluster 1 lost");
        assert!(data[128 << 10..192 << 10].iter().all(|&b| b == 0x33), "{what}: cluster 2");
        let (status, text) = check_status(&image);
        assert!(status == 0 || status == 3, "{what}: {status}\n{text}");
    }
}

#[test]
fn metadata_the_refcounts_do_not_count_is_refused_for_writing_not_overwritten() {
    let scratch = Scratch::new("write-uncounted");
    let image = scratch.path("u.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=512", "64k");
    qemu_io("qcow2", &image, &["write -P 0x5a 0 8k"]);
    let original = std::fs::read(&image).unwrap();
    let (table, l1) = (peek_u64(&image, 48), peek_u64(&image, 40));
    let block = peek_u64(&image, table);
    // The refcount table names no block (every cluster reads as free, the header's too),
    // or the block says that the header, the refcount table or the L1 table is free.
    let cases: [(&str, u64, &[u8]); 4] = [
        ("header", table, &[0; 8]),
        ("header", block, &[0; 2]),
        ("refcount table", block + 2 * (table / 512), &[0; 2]),
        ("L1 table", block + 2 * (l1 / 512), &[0; 2]),
    ];
    for (what, at, bytes) in cases {
        std::fs::write(&image, &original).unwrap();
        poke(&image, at, bytes);
        let corrupt = std::fs::read(&image).unwrap();
        let result = with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.write(co, 32 << 10, &[1; 4096])?;
            blk.flush(co)
        });
        let error = result.err().unwrap_or_else(|| {
            panic!("{what}: the write succeeded; it should be refused as metadata")
        });
        assert_eq!(error.kind(), ErrorKind::InvalidData, "{what}: {error}");
        assert!(error.to_string().contains(what), "{what}: {error}");
        assert!(std::fs::read(&image).unwrap() == corrupt, "{what}: the image was written");
    }
}

#[test]
fn images_abandoned_without_a_flush_have_at_worst_leaks() {
    // What was written back before the driver was dropped (refcounts before L2 tables
    // before L1 entries, dirty L2 tables written back on eviction from a two-table cache)
    // must be consistent on its own: no errors, leaked clusters allowed.
    let scratch = Scratch::new("write-abandoned");
    for (i, writes) in [3u64, 40, 200, 700].into_iter().enumerate() {
        let image = scratch.path(&format!("a{i}.qcow2"));
        let options = CreateOptions { cluster_size: 4096, ..CreateOptions::new(16 << 20) };
        create_ours(&image, options);
        // The leaked node keeps its file open, and with it QEMU's image locks: as if its
        // process had died, qemu-img must be able to look, so this open takes no locks.
        let options = format!(
            "driver=qcow2,l2-cache-size=8k,file.locking=off,file.filename={}",
            image.display()
        );
        with_image(&options, move |co, blk| {
            // Abandoned: a node never dropped is never flushed (closing would write back).
            std::mem::forget(blk.clone());
            let mut rng = Rng(writes + 5);
            for _ in 0..writes {
                let len = 1 + rng.below(40_000);
                let offset = rng.below((16 << 20) - len);
                blk.write(co, offset, &vec![0x5a; len as usize])?;
            }
            Ok(())
        })
        .unwrap();
        let (status, text) = check_status(&image);
        assert!(status == 0 || status == 3, "{writes} writes, then no flush: {status}\n{text}");
    }
}

#[test]
fn a_refcount_cache_of_four_blocks_evicts_writes_back_and_reloads_them() {
    // 512-byte clusters with 16-bit refcounts: one block counts 128 KiB of the file, so
    // 6 MiB of data passes through ~50 blocks, four at a time; freeing the first clusters
    // afterwards loads blocks written (and evicted) earlier in this session.
    let scratch = Scratch::new("write-refcount-cache");
    let image = scratch.path("r.qcow2");
    let options = CreateOptions { cluster_size: 512, ..CreateOptions::new(8 << 20) };
    create_ours(&image, options);
    let shadow = raw_shadow(&scratch, 8 << 20);
    let options = format!("driver=qcow2,refcount-cache-size=512,file.filename={}", image.display());
    with_image(&options, |co, blk| {
        for n in 0..48u64 {
            blk.write(co, n * 128 * K, &vec![n as u8 + 1; 128 * K as usize])?;
        }
        blk.discard(co, 0, 1024 * K)?;
        blk.flush(co)?;
        blk.write(co, 7 << 20, &vec![0xee; 512 * K as usize])?;
        blk.flush(co)
    })
    .unwrap();
    for n in 8..48u64 {
        poke(&shadow, n * 128 * K, &vec![n as u8 + 1; 128 * K as usize]);
    }
    poke(&shadow, 7 << 20, &vec![0xee; 512 * K as usize]);
    qemu_check(&image);
    qemu_compare(&image, &shadow);
}

#[test]
fn writing_an_image_with_persistent_bitmaps_marks_them_stale() {
    let scratch = Scratch::new("write-bitmaps");
    let image = scratch.path("b.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "4M");
    qemu_img(&["bitmap", "--add", image.to_str().unwrap(), "b0"]);
    qemu_io("qcow2", &image, &["write -P 0x11 0 64k"]);
    assert_eq!(peek_u64(&image, 88), 1, "autoclear bit 0: the bitmaps are consistent");
    // Our writes do not update the bitmaps: they must not be trusted afterwards.
    with_image(&qcow2_rw_options(&image), |co, blk| {
        blk.write(co, 1 << 20, &[0x22; 64 << 10])?;
        blk.flush(co)
    })
    .unwrap();
    assert_eq!(peek_u64(&image, 88), 0, "the autoclear bits are cleared");
    let info = qemu_img(&["info", image.to_str().unwrap()]);
    assert!(!info.contains("name: b0"), "qemu-img still trusts the bitmap: {info}");
    // The bitmap's clusters are leaked now, nothing worse; a repair frees them.
    assert_eq!(check_status(&image).0, 3);
    qemu_img(&["check", "-r", "leaks", image.to_str().unwrap()]);
    qemu_check(&image);
    qemu_io("qcow2", &image, &["read -q -P 0x11 0 64k", "read -q -P 0x22 1M 64k"]);
}
