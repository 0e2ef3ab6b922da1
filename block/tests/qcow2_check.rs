//! `check` against `qemu-img check` on a generated corpus of damaged images: images made by
//! the real qemu-img / qemu-io, damaged by byte edits (or by killing qemu-io with lazy
//! refcounts). For every image our report (exit code, JSON, the messages naming each
//! problem) equals qemu-img's; for both repair modes our repair exits as qemu-img's does,
//! leaves what qemu-img's repair leaves (`qemu-img check` after it, `qemu-img compare` with
//! the image before the damage and with qemu-img's repaired copy), and `-r all` leaves
//! images qemu-img checks clean.

mod common;
mod qcow2_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aiocoro_block::qcow2::{CheckReport, Repair, check, check_image_file};
use aiocoro_block::{BlockGraph, run_in_coroutine};
use common::faults::open_faulty_file;
use qcow2_support::*;

/// Bits 9..=55 of an L1 / L2 entry: the offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 / L2 entry bit 63.
const COPIED: u64 = 1 << 63;

/// What `qemu-img check [ARGS] IMAGE` printed and exited with.
#[derive(Debug)]
struct QemuCheck {
    status: i32,
    stdout: String,
    /// The per-problem lines, without qemu-img's own `qemu-img: ...` lines.
    messages: Vec<String>,
}

fn qemu_check_with(args: &[&str], image: &Path) -> QemuCheck {
    let output =
        Command::new("qemu-img").arg("check").args(args).arg(image).output().expect(
            "qemu-img check: the check tests need QEMU's tools (apt-get install qemu-utils)",
        );
    let stderr = String::from_utf8_lossy(&output.stderr);
    QemuCheck {
        status: output.status.code().expect("qemu-img was not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        messages: stderr
            .lines()
            .filter(|line| !line.starts_with("qemu-img:"))
            .map(str::to_owned)
            .collect(),
    }
}

/// Our messages as lines (one message may hold two, as QEMU prints them).
fn lines(report: &CheckReport) -> Vec<String> {
    report.messages.iter().flat_map(|message| message.lines()).map(str::to_owned).collect()
}

/// Whether `qemu-img compare` finds the guest contents of `a` and `b` identical; `None` if
/// it cannot read one of them (a repair left a misaligned entry).
fn identical(a: &Path, b: &Path) -> Option<bool> {
    let status = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .args([a, b])
        .stderr(Stdio::null())
        .status()
        .expect("qemu-img compare");
    match status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => None,
    }
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

fn poke_u64(image: &Path, at: u64, value: u64) {
    poke(image, at, &value.to_be_bytes());
}

fn peek_u32(image: &Path, at: u64) -> u32 {
    u32::from_be_bytes(peek(image, at, 4).try_into().unwrap())
}

/// The cluster size of a qcow2 image.
fn cluster_size(image: &Path) -> u64 {
    1 << peek_u32(image, 20)
}

/// The host offset of the L1 table.
fn l1_offset(image: &Path) -> u64 {
    peek_u64(image, 40)
}

/// Where refcount table entry `slot` is, and where the refcount of host `cluster` is: its
/// block's offset, its bit offset in the block and its width in bits.
fn refcount_slot(image: &Path, cluster: u64) -> (u64, u64, u64, u32) {
    let order = if peek_u32(image, 4) >= 3 { peek_u32(image, 96) } else { 4 };
    let per_block = (cluster_size(image) * 8) >> order;
    let table_entry = peek_u64(image, 48) + cluster / per_block * 8;
    let block = peek_u64(image, table_entry);
    assert_ne!(block, 0, "no refcount block counts cluster {cluster} of {}", image.display());
    (table_entry, block, (cluster % per_block) << order, 1 << order)
}

/// Sets the stored refcount of host `cluster` (1- and 16-bit refcounts).
fn set_refcount(image: &Path, cluster: u64, value: u64) {
    let (_, block, bit, width) = refcount_slot(image, cluster);
    match width {
        16 => poke(image, block + bit / 8, &(value as u16).to_be_bytes()),
        1 => {
            let at = block + bit / 8;
            let byte = peek(image, at, 1)[0] & !(1 << (bit % 8));
            poke(image, at, &[byte | ((value as u8 & 1) << (bit % 8))]);
        }
        other => panic!("set_refcount: {other}-bit refcounts are not used here"),
    }
}

/// Sets incompatible feature bit `bit` of a version 3 image.
fn set_incompatible(image: &Path, bit: u32) {
    let features = peek_u64(image, 72) | 1 << bit;
    poke_u64(image, 72, features);
}

/// A 64 KiB-cluster image of 8 MiB (QEMU's options `options`) with data in its first three
/// clusters and at 5 MiB.
fn sample(scratch: &Scratch, options: &str) -> PathBuf {
    sample_named(scratch, "pristine.qcow2", options)
}

/// [`sample`] in the file `name`.
fn sample_named(scratch: &Scratch, name: &str, options: &str) -> PathBuf {
    let image = scratch.path(name);
    create_qcow2(image.to_str().unwrap(), options, "8M");
    qemu_io("qcow2", &image, &["write -P 0xab 0 192k", "write -P 0xcd 5M 64k"]);
    image
}

/// What a damaged image should show.
struct Expect {
    /// `qemu-img check`'s exit code on it (proves the damage is what the case says).
    status: i32,
    /// Whether `qemu-img check -r all` leaves it clean (not for damage that no repair
    /// undoes, such as a misaligned data cluster).
    repairable: bool,
}

/// Damages a copy of `pristine` with `damage`, then compares our check and both repairs
/// with qemu-img's.
fn verify(scratch: &Scratch, pristine: &Path, damage: impl FnOnce(&Path), expect: Expect) {
    let damaged = copy(pristine, &scratch.path("damaged.qcow2"));
    damage(&damaged);
    let name = damaged.to_str().unwrap();

    let theirs = qemu_check_with(&["--output", "json"], &damaged);
    assert_eq!(theirs.status, expect.status, "the damage is not what was meant: {theirs:?}");
    let ours = check_image_file(&damaged, Repair::None).unwrap();
    assert_eq!(ours.exit_code() as i32, theirs.status, "{ours:#?}\nqemu-img: {theirs:?}");
    assert_eq!(ours.json(name), theirs.stdout);
    assert_eq!(lines(&ours), theirs.messages);
    let human = qemu_check_with(&[], &damaged);
    assert_eq!(ours.human(), human.stdout);

    for (repair, flag) in [(Repair::Leaks, "leaks"), (Repair::All, "all")] {
        let (qemu_copy, our_copy) = (scratch.path("theirs.qcow2"), scratch.path("ours.qcow2"));
        // The same file name, so that the outputs naming it compare equal.
        let theirs = {
            copy(&damaged, &qemu_copy);
            qemu_check_with(&["-r", flag], &qemu_copy)
        };
        copy(&damaged, &our_copy);
        let ours = check_image_file(&our_copy, repair).unwrap();
        let context = format!("-r {flag}: ours {ours:#?}\nqemu-img: {theirs:?}");
        assert_eq!(ours.exit_code() as i32, theirs.status, "{context}");
        assert_eq!(lines(&ours), theirs.messages, "{context}");
        if ours.failure.is_none() {
            assert_eq!(ours.human(), theirs.stdout, "{context}");
        }
        let after_ours = qemu_check_with(&[], &our_copy);
        let after_theirs = qemu_check_with(&[], &qemu_copy);
        assert_eq!(after_ours.status, after_theirs.status, "-r {flag}: {after_ours:?}");
        if repair == Repair::All && expect.repairable {
            assert_eq!(after_ours.status, 0, "-r all left {after_ours:?}");
        }
        let kept = identical(&qemu_copy, pristine);
        assert_eq!(
            identical(&our_copy, pristine),
            kept,
            "-r {flag}: our repair keeps the data where qemu-img's does"
        );
        // (Unless qemu-img cannot read what its repair left: then neither can it ours.)
        if kept.is_some() {
            let same = identical(&our_copy, &qemu_copy);
            assert_eq!(same, Some(true), "-r {flag}: ours and qemu-img's differ");
        }
    }
}

const DAMAGED: Expect = Expect { status: 2, repairable: true };

#[test]
fn a_clean_image_is_clean() {
    let scratch = Scratch::new("check-clean");
    let pristine = sample(&scratch, "");
    verify(&scratch, &pristine, |_| {}, Expect { status: 0, repairable: true });
}

#[test]
fn leaked_clusters() {
    let scratch = Scratch::new("check-leak");
    let pristine = sample(&scratch, "");
    let leak = |image: &Path| {
        // Two more clusters at the end of the file, counted but unused.
        let len = std::fs::metadata(image).unwrap().len();
        let cluster = cluster_size(image);
        std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .unwrap()
            .set_len(len + 2 * cluster)
            .unwrap();
        set_refcount(image, len / cluster, 1);
        set_refcount(image, len / cluster + 1, 1);
    };
    verify(&scratch, &pristine, leak, Expect { status: 3, repairable: true });
}

#[test]
fn wrong_oflag_copied() {
    let scratch = Scratch::new("check-copied");
    let pristine = sample(&scratch, "");
    let clear_data_flag = |image: &Path| {
        let at = l2_entry_at(image, 1);
        poke_u64(image, at, peek_u64(image, at) & !COPIED);
    };
    verify(&scratch, &pristine, clear_data_flag, DAMAGED);
    let clear_table_flag = |image: &Path| {
        let at = l1_offset(image);
        poke_u64(image, at, peek_u64(image, at) & !COPIED);
    };
    verify(&scratch, &pristine, clear_table_flag, DAMAGED);
}

#[test]
fn a_referenced_cluster_with_refcount_zero() {
    let scratch = Scratch::new("check-zero");
    let pristine = sample(&scratch, "");
    let zero = |image: &Path| {
        let data = peek_u64(image, l2_entry_at(image, 2)) & OFFSET_MASK;
        set_refcount(image, data / cluster_size(image), 0);
    };
    verify(&scratch, &pristine, zero, DAMAGED);
}

#[test]
fn a_refcount_block_past_the_end_of_the_file() {
    let scratch = Scratch::new("check-past");
    let pristine = sample(&scratch, "");
    let past = |image: &Path| {
        let (table_entry, ..) = refcount_slot(image, 0);
        poke_u64(image, table_entry, 256 * cluster_size(image));
    };
    verify(&scratch, &pristine, past, DAMAGED);
}

#[test]
fn an_l2_entry_pointing_into_metadata() {
    let scratch = Scratch::new("check-meta");
    let pristine = sample(&scratch, "");
    let into_l1 = |image: &Path| poke_u64(image, l2_entry_at(image, 1), COPIED | l1_offset(image));
    verify(&scratch, &pristine, into_l1, DAMAGED);
    // A refcount block used as data: the refcounts cannot be trusted, they are rebuilt.
    let into_refcounts = |image: &Path| {
        let (_, block, ..) = refcount_slot(image, 0);
        poke_u64(image, l2_entry_at(image, 2), COPIED | block);
    };
    verify(&scratch, &pristine, into_refcounts, DAMAGED);
}

#[test]
fn a_dirty_image_left_by_a_killed_qemu_with_lazy_refcounts() {
    let scratch = Scratch::new("check-dirty");
    let pristine = scratch.path("pristine.qcow2");
    create_qcow2(pristine.to_str().unwrap(), "lazy_refcounts=on", "8M");
    qemu_io("qcow2", &pristine, &["write -P 0xab 0 192k", "write -P 0xcd 5M 64k"]);
    let killed = |image: &Path| {
        // qemu-io dies with its refcounts unwritten and the dirty bit set.
        let status = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 128k", "-c", "sigraise 9"])
            .arg(image)
            .output()
            .unwrap()
            .status;
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert_ne!(peek_u64(image, 72) & 1, 0, "the dirty bit is set");
    };
    verify(&scratch, &pristine, killed, Expect { status: 2, repairable: true });
    // The dirty bit alone: refcounts right, nothing to report; a repair clears the bit.
    verify(
        &scratch,
        &pristine,
        |image| set_incompatible(image, 0),
        Expect { status: 0, repairable: true },
    );
    let marked = scratch.path("marked.qcow2");
    copy(&pristine, &marked);
    set_incompatible(&marked, 0);
    check_image_file(&marked, Repair::Leaks).unwrap();
    assert_eq!(peek_u64(&marked, 72) & 1, 0, "-r leaks on a clean image clears the dirty bit");
}

#[test]
fn an_image_marked_corrupt_is_checked_and_the_mark_cleared_by_a_repair() {
    let scratch = Scratch::new("check-corrupt-bit");
    let pristine = sample(&scratch, "");
    let marked = |image: &Path| {
        set_incompatible(image, 1);
        let at = l2_entry_at(image, 1);
        poke_u64(image, at, peek_u64(image, at) & !COPIED);
    };
    verify(&scratch, &pristine, marked, DAMAGED);
    let repaired = copy(&pristine, &scratch.path("repaired.qcow2"));
    marked(&repaired);
    assert_eq!(check_image_file(&repaired, Repair::All).unwrap().exit_code(), 0);
    assert_eq!(peek_u64(&repaired, 72) & 2, 0, "the corrupt bit is cleared");
}

#[test]
fn refcount_overflow_with_one_bit_refcounts() {
    let scratch = Scratch::new("check-overflow");
    let pristine = sample(&scratch, "refcount_bits=1");
    let into_l1 = |image: &Path| poke_u64(image, l2_entry_at(image, 1), COPIED | l1_offset(image));
    let image = scratch.path("overflow.qcow2");
    copy(&pristine, &image);
    into_l1(&image);
    let report = check_image_file(&image, Repair::None).unwrap();
    assert_eq!(report.refcount_overflows, 1, "{report:#?}");
    verify(&scratch, &pristine, into_l1, Expect { status: 2, repairable: false });
}

#[test]
fn misaligned_and_reserved_entries() {
    let scratch = Scratch::new("check-entries");
    let pristine = sample(&scratch, "");
    let misaligned = |image: &Path| {
        let at = l2_entry_at(image, 1);
        poke_u64(image, at, peek_u64(image, at) + 0x200);
    };
    verify(&scratch, &pristine, misaligned, Expect { status: 2, repairable: false });
    // A preallocated zero cluster at a misaligned offset: -r all makes it a plain zero one.
    let preallocated = |image: &Path| {
        let at = l2_entry_at(image, 1);
        poke_u64(image, at, ((peek_u64(image, at) & OFFSET_MASK) + 0x200) | 1);
    };
    verify(&scratch, &pristine, preallocated, DAMAGED);
    let reserved = |image: &Path| {
        let at = l1_offset(image);
        poke_u64(image, at, peek_u64(image, at) | 1 << 60);
    };
    verify(&scratch, &pristine, reserved, Expect { status: 2, repairable: false });
}

#[test]
fn compressed_clusters_small_clusters_and_version_2() {
    let scratch = Scratch::new("check-shapes");
    let raw = scratch.path("data.raw");
    std::fs::write(&raw, (0..3 << 20).map(|i: u32| (i / 4096 % 251) as u8).collect::<Vec<_>>())
        .unwrap();
    let compressed = scratch.path("pristine.qcow2");
    compress_to_qcow2(raw.to_str().unwrap(), compressed.to_str().unwrap(), "");
    let zero_first_data = |image: &Path| {
        let data = peek_u64(image, l2_entry_at(image, 0)) & 0x003f_ffff_ffff_ffff;
        set_refcount(image, data / cluster_size(image), 0);
    };
    verify(&scratch, &compressed, zero_first_data, DAMAGED);

    // 512-byte clusters: 256 refcounts a block, so the image spans several blocks; one
    // block's table entry is lost.
    let small = scratch.path("small.qcow2");
    create_qcow2(small.to_str().unwrap(), "cluster_size=512", "4M");
    qemu_io("qcow2", &small, &["write -P 0x11 0 300k", "write -P 0x22 3M 20k"]);
    let lose_block = |image: &Path| {
        let (table_entry, ..) = refcount_slot(image, 300);
        poke_u64(image, table_entry, 0);
    };
    verify(&scratch, &small, lose_block, DAMAGED);

    let v2 = sample_named(&scratch, "v2.qcow2", "compat=0.10");
    let leak_and_flag = |image: &Path| {
        let at = l2_entry_at(image, 0);
        poke_u64(image, at, peek_u64(image, at) & !COPIED);
        let data = peek_u64(image, l2_entry_at(image, 1)) & OFFSET_MASK;
        set_refcount(image, data / cluster_size(image), 2);
    };
    verify(&scratch, &v2, leak_and_flag, DAMAGED);
}

#[test]
fn internal_snapshots_are_counted() {
    let scratch = Scratch::new("check-snapshots");
    let pristine = sample(&scratch, "");
    let image = pristine.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "first", image]);
    qemu_io("qcow2", &pristine, &["write -P 0x77 64k 128k", "write -P 0x78 6M 64k"]);
    qemu_img(&["snapshot", "-c", "second", image]);
    qemu_io("qcow2", &pristine, &["write -P 0x79 0 64k"]);
    verify(&scratch, &pristine, |_| {}, Expect { status: 0, repairable: true });
    // Guest cluster 2 is shared by both snapshots and the active table: refcount 3.
    let shared = |image: &Path| peek_u64(image, l2_entry_at(image, 2)) & OFFSET_MASK;
    let too_low = |image: &Path| set_refcount(image, shared(image) / cluster_size(image), 1);
    verify(&scratch, &pristine, too_low, DAMAGED);
    let free = |image: &Path| set_refcount(image, shared(image) / cluster_size(image), 0);
    verify(&scratch, &pristine, free, DAMAGED);
}

#[test]
fn a_broken_header_is_an_error_and_a_repair_needs_a_writable_node() {
    let scratch = Scratch::new("check-errors");
    let image = sample(&scratch, "");
    let options = format!("driver=file,read-only=on,filename={}", image.display());
    let error = aiocoro_block::run_in_coroutine(move |co| {
        let (_, node) = aiocoro_block::open(co, &aiocoro_block::BlockGraph::new(), &options)?;
        aiocoro_block::qcow2::check(co, &node, Repair::All)
    })
    .unwrap()
    .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
    poke(&image, 0, b"XXXX");
    let error = check_image_file(&image, Repair::None).unwrap_err();
    assert!(error.to_string().contains("not a qcow2 image"), "{error}");
}

#[test]
fn persistent_bitmaps_are_counted() {
    let scratch = Scratch::new("check-bitmaps");
    let pristine = sample(&scratch, "");
    let image = pristine.to_str().unwrap();
    qemu_img(&["bitmap", "--add", image, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512k", image, "b1"]);
    qemu_io("qcow2", &pristine, &["write -P 0x44 1M 128k"]);
    verify(&scratch, &pristine, |_| {}, Expect { status: 0, repairable: true });
    // The bitmap directory is found from the header extension; its first entry names b0's
    // table, whose first entry names a cluster of bitmap data.
    let bitmap_data = |image: &Path| {
        let header = std::fs::read(image).unwrap();
        let mut at = u32::from_be_bytes(header[100..104].try_into().unwrap()) as usize;
        loop {
            let kind = u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
            let len = u32::from_be_bytes(header[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_ne!(kind, 0, "the image has a bitmaps extension");
            if kind == 0x2385_2875 {
                let directory = peek_u64(image, at as u64 + 8 + 16);
                let table = peek_u64(image, directory);
                return peek_u64(image, table) & OFFSET_MASK;
            }
            at += 8 + len.next_multiple_of(8);
        }
    };
    let free = |image: &Path| set_refcount(image, bitmap_data(image) / cluster_size(image), 0);
    verify(&scratch, &pristine, free, DAMAGED);
    // After our rebuild the bitmaps are intact: qemu-img reads them.
    let repaired = copy(&pristine, &scratch.path("repaired.qcow2"));
    free(&repaired);
    assert_eq!(check_image_file(&repaired, Repair::All).unwrap().exit_code(), 0);
    let info = qemu_img(&["info", repaired.to_str().unwrap()]);
    assert!(info.contains("name: b0") && info.contains("name: b1"), "{info}");
}

#[test]
fn a_data_cluster_two_entries_name() {
    let scratch = Scratch::new("check-twice");
    let pristine = sample(&scratch, "");
    let twice = |image: &Path| {
        let data = peek_u64(image, l2_entry_at(image, 1));
        poke_u64(image, l2_entry_at(image, 80), data);
    };
    verify(&scratch, &pristine, twice, DAMAGED);
    // Two L1 entries name one L2 table (4 KiB clusters: 8 MiB needs 16 L1 entries).
    let small = sample_named(&scratch, "small.qcow2", "cluster_size=4k");
    let shared_table = |image: &Path| {
        let l1 = l1_offset(image);
        poke_u64(image, l1 + 8, peek_u64(image, l1));
    };
    verify(&scratch, &small, shared_table, DAMAGED);
}

#[test]
fn a_refcount_higher_than_the_references() {
    let scratch = Scratch::new("check-high");
    let pristine = sample(&scratch, "");
    // A leak, and the entry's COPIED flag now wrong: qemu-img calls it a corruption.
    let high = |image: &Path| {
        let data = peek_u64(image, l2_entry_at(image, 1)) & OFFSET_MASK;
        set_refcount(image, data / cluster_size(image), 5);
    };
    verify(&scratch, &pristine, high, DAMAGED);
    // Compressed clusters packed several to a host cluster: one reference too few.
    let raw = scratch.path("data.raw");
    std::fs::write(&raw, (0..1 << 20).map(|i: u32| (i / 4096 % 251) as u8).collect::<Vec<_>>())
        .unwrap();
    let compressed = scratch.path("compressed.qcow2");
    compress_to_qcow2(raw.to_str().unwrap(), compressed.to_str().unwrap(), "cluster_size=4k");
    let low = |image: &Path| {
        let data = peek_u64(image, l2_entry_at(image, 3)) & 0x003f_ffff_ffff_ffff;
        set_refcount(image, data / cluster_size(image), 1);
    };
    verify(&scratch, &compressed, low, DAMAGED);
}

#[test]
fn entries_past_the_end_of_the_file() {
    let scratch = Scratch::new("check-past-end");
    let pristine = sample(&scratch, "");
    let data_past = |image: &Path| poke_u64(image, l2_entry_at(image, 1), COPIED | 1000 << 16);
    verify(&scratch, &pristine, data_past, Expect { status: 2, repairable: false });
    // A snapshot whose L1 table lies past the end of the file.
    qemu_img(&["snapshot", "-c", "s1", pristine.to_str().unwrap()]);
    let snapshot_l1_past = |image: &Path| poke_u64(image, peek_u64(image, 64), 1000 << 16);
    verify(&scratch, &pristine, snapshot_l1_past, Expect { status: 2, repairable: false });
}

/// Repairs `image` (`-r all`) through a filter that fails as `arm` says; returns the writes
/// the repair made and its exit code and failure.
fn repair_failing(
    image: &Path,
    arm: impl FnOnce(&common::faults::Faults) + 'static,
) -> (u64, i32, Option<String>) {
    let path = image.to_path_buf();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node, faults) = open_faulty_file(co, &graph, &path);
        arm(&faults);
        let report = check(co, &node, Repair::All).unwrap();
        (faults.seen().0, report.exit_code() as i32, report.failure)
    })
    .unwrap()
}

#[test]
fn a_repair_that_fails_midway_loses_no_data_and_a_later_one_completes() {
    let scratch = Scratch::new("check-failing-repair");
    // 512-byte clusters: a lost refcount block needs a rebuild (several block writes, the
    // table, the header), and the counts of the rest are repaired in place.
    let pristine = scratch.path("pristine.qcow2");
    create_qcow2(pristine.to_str().unwrap(), "cluster_size=512", "4M");
    qemu_io("qcow2", &pristine, &["write -P 0x11 0 300k", "write -P 0x22 3M 20k"]);
    let damaged = copy(&pristine, &scratch.path("damaged.qcow2"));
    let (table_entry, ..) = refcount_slot(&damaged, 300);
    poke_u64(&damaged, table_entry, 0);
    let work = scratch.path("work.qcow2");
    copy(&damaged, &work);
    let (writes, status, failure) = repair_failing(&work, |_| {});
    assert_eq!((status, failure), (0, None), "the repair without faults");
    let len = std::fs::metadata(&damaged).unwrap().len();
    let faults = (1..=writes).map(|n| (n, false)).chain([(len, true), (len + 1024, true)]);
    for (at, full) in faults {
        copy(&damaged, &work);
        let (_, status, failure) = repair_failing(&work, move |faults| {
            if full {
                faults.fill_disk_at(at);
            } else {
                faults.fail_write_number(at, libc::EIO);
            }
        });
        let what = format!("write {at} failing (disk full: {full})");
        assert_eq!(status, 1, "{what}: the check says it failed");
        let failure = failure.unwrap_or_default();
        let errno = if full { "No space left on device" } else { "Input/output error" };
        assert!(failure.contains(errno), "{what}: the failure names the error: {failure}");
        assert_eq!(identical(&work, &pristine), Some(true), "{what}: the data is intact");
        assert_eq!(check_image_file(&work, Repair::All).unwrap().exit_code(), 0, "{what}");
        assert_eq!(qemu_check_with(&[], &work).status, 0, "{what}: repaired after all");
        assert_eq!(identical(&work, &pristine), Some(true), "{what}: and still intact");
    }
}

#[test]
fn l1_entries_past_the_end_of_the_file_or_misaligned() {
    let scratch = Scratch::new("check-l1-entries");
    let pristine = sample(&scratch, "");
    let past = |image: &Path| poke_u64(image, l1_offset(image), COPIED | 1000 << 16);
    verify(&scratch, &pristine, past, Expect { status: 2, repairable: false });
    let misaligned = |image: &Path| {
        let at = l1_offset(image);
        poke_u64(image, at, peek_u64(image, at) + 0x200);
    };
    verify(&scratch, &pristine, misaligned, Expect { status: 2, repairable: false });
}

#[test]
fn a_refcount_block_in_an_l2_table_and_a_header_counted_free() {
    let scratch = Scratch::new("check-block-in-l2");
    let pristine = sample(&scratch, "");
    let block_in_l2 = |image: &Path| {
        let (table_entry, ..) = refcount_slot(image, 0);
        poke_u64(image, table_entry, peek_u64(image, l1_offset(image)) & OFFSET_MASK);
    };
    verify(&scratch, &pristine, block_in_l2, DAMAGED);
    verify(&scratch, &pristine, |image| set_refcount(image, 0, 0), DAMAGED);
}

#[test]
fn damage_qemu_img_check_does_not_look_at_is_not_reported() {
    let scratch = Scratch::new("check-unseen");
    // A compressed entry's sector count reaching past the end of the file.
    let raw = scratch.path("data.raw");
    std::fs::write(&raw, (0..1 << 20).map(|i: u32| (i / 4096 % 251) as u8).collect::<Vec<_>>())
        .unwrap();
    let compressed = scratch.path("compressed.qcow2");
    compress_to_qcow2(raw.to_str().unwrap(), compressed.to_str().unwrap(), "");
    let long = |image: &Path| {
        let at = l2_entry_at(image, 0);
        poke_u64(image, at, peek_u64(image, at) | 0x3f << 54);
    };
    verify(&scratch, &compressed, long, Expect { status: 0, repairable: true });
    // The zero flag in a version 2 image (reads refuse it, as QEMU's do).
    let v2 = sample_named(&scratch, "v2.qcow2", "compat=0.10");
    let zero_flag = |image: &Path| {
        let at = l2_entry_at(image, 1);
        poke_u64(image, at, peek_u64(image, at) | 1);
    };
    verify(&scratch, &v2, zero_flag, Expect { status: 0, repairable: true });
}
