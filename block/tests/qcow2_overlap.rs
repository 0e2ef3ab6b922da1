//! Guest writes never land on the image's own metadata: an image made by `qemu-img` and
//! `qemu-io`, then corrupted so that an L2 entry says "write in place" at a table, or so that
//! the refcounts call a table free; a write through our driver fails with `InvalidData`
//! naming the guest offset, the host cluster and the metadata, and the file is unchanged;
//! an entry that names a table as a shared cluster, once overwritten, does not free it.

mod qcow2_support;

use std::io::{self, ErrorKind};
use std::path::Path;

use qcow2_support::*;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

/// A 1 MiB image of 64 KiB clusters whose guest clusters 0 and 1 hold 0x5a bytes.
fn written_image(scratch: &Scratch) -> std::path::PathBuf {
    let image = scratch.path("o.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=64k", "1M");
    qemu_io("qcow2", &image, &["write -P 0x5a 0 128k"]);
    image
}

/// Where the image's L1 table, first L2 table, refcount table and first refcount block are.
fn tables(image: &Path) -> [(&'static str, u64); 4] {
    let (l1, refcount_table) = (peek_u64(image, 40), peek_u64(image, 48));
    [
        ("an L2 table (L1 entry 0)", peek_u64(image, l1) & OFFSET_MASK),
        ("a refcount block (refcount table entry 0)", peek_u64(image, refcount_table)),
        ("the L1 table", l1),
        ("the refcount table", refcount_table),
    ]
}

/// Writes 4 KiB at guest `offset` through our driver (then flushes) and returns the error.
fn write_error(image: &Path, offset: u64) -> std::io::Error {
    let result = with_image(&qcow2_rw_options(image), move |co, blk| {
        blk.write(co, offset, &[0xee; 4096])?;
        blk.flush(co)
    });
    result.expect_err("a write over metadata succeeded")
}

/// The last byte of the header's incompatible features, which holds the corrupt bit (1).
const CORRUPT_BYTE: usize = 79;

/// Asserts that `error` refuses a write to a corrupt image, naming `what` (the table), each of
/// `words` and the repair, and that the image is still `corrupt`, byte for byte, but for
/// the corrupt bit, now set.
fn assert_refused(image: &Path, corrupt: &[u8], what: &str, error: &io::Error, words: &[&str]) {
    assert_eq!(error.kind(), ErrorKind::InvalidData, "{what}: {error}");
    let message = error.to_string();
    for words in words.iter().chain(&[what, "qemu-img check -r all", "marked corrupt"]) {
        assert!(message.contains(words), "{what}: {message}");
    }
    let mut now = std::fs::read(image).unwrap();
    assert_eq!(now[CORRUPT_BYTE] & 2, 2, "{what}: the corrupt bit is set");
    now[CORRUPT_BYTE] &= !2;
    assert!(now == corrupt, "{what}: the image was written");
}

#[test]
fn a_write_over_metadata_marks_the_image_corrupt_and_the_node_read_only() {
    let scratch = Scratch::new("overlap-mark");
    let image = written_image(&scratch);
    let l1 = peek_u64(&image, 40);
    poke(&image, l2_entry_at(&image, 1), &(COPIED | l1).to_be_bytes());
    let kinds = with_image(&qcow2_rw_options(&image), |co, blk| {
        let first = blk.write(co, 64 << 10, &[0xee; 4096]).unwrap_err();
        // Every later write is refused, even one that would have been fine; reads go on.
        let then = blk.write(co, 512 << 10, &[0xee; 4096]).unwrap_err();
        let zeroes = blk.write_zeroes(co, 0, 64 << 10, false).unwrap_err();
        let mut buf = vec![0u8; 4096];
        blk.read(co, 0, &mut buf)?;
        assert!(buf.iter().all(|&b| b == 0x5a));
        Ok([first.kind(), then.kind(), zeroes.kind()])
    })
    .unwrap();
    let denied = ErrorKind::PermissionDenied;
    assert_eq!(kinds, [ErrorKind::InvalidData, denied, denied]);
    assert_eq!(peek(&image, CORRUPT_BYTE as u64, 1)[0] & 2, 2, "the corrupt bit is set");
    assert!(qemu_img(&["info", image.to_str().unwrap()]).contains("corrupt: true"));

    // Opened again: read-only it reads, for writing it is refused until repaired.
    read_ours(&image, 1 << 20).unwrap();
    let error = with_image(&qcow2_rw_options(&image), |_, _| Ok(())).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    assert!(error.to_string().contains("marked corrupt"), "{error}");
    let report =
        aiocoro_block::qcow2::check_image_file(&image, aiocoro_block::qcow2::Repair::All).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:#?}");
    assert_eq!(peek(&image, CORRUPT_BYTE as u64, 1)[0] & 2, 0, "the repair clears the bit");
    qemu_check(&image);
    with_image(&qcow2_rw_options(&image), |co, blk| {
        blk.write(co, 512 << 10, &[0x77; 4096])?;
        blk.flush(co)
    })
    .unwrap();
    qemu_check(&image);
}

#[test]
fn an_in_place_write_at_metadata_fails_naming_it_and_writes_nothing() {
    let scratch = Scratch::new("overlap-in-place");
    let image = written_image(&scratch);
    let original = std::fs::read(&image).unwrap();
    for (what, table) in tables(&image) {
        std::fs::write(&image, &original).unwrap();
        // Guest cluster 1's entry: "refcount one, the data is at the table".
        poke(&image, l2_entry_at(&image, 1), &(COPIED | table).to_be_bytes());
        let corrupt = std::fs::read(&image).unwrap();
        let error = write_error(&image, (64 << 10) + 512);
        let host = format!("host cluster {table:#x}");
        assert_refused(&image, &corrupt, what, &error, &["guest offset 0x10000", &host]);
    }
}

#[test]
fn an_allocation_of_a_table_the_refcounts_call_free_fails_and_writes_nothing() {
    let scratch = Scratch::new("overlap-free");
    let image = written_image(&scratch);
    let original = std::fs::read(&image).unwrap();
    let block = peek_u64(&image, peek_u64(&image, 48));
    // The open checks the refcounts of the header, the L1 and refcount tables; these not.
    for (what, table) in tables(&image).into_iter().take(2) {
        std::fs::write(&image, &original).unwrap();
        // 16-bit refcounts: the table's cluster is free, the first free one (first fit).
        poke(&image, block + 2 * (table >> 16), &[0, 0]);
        let corrupt = std::fs::read(&image).unwrap();
        // Guest cluster 4 is unallocated: the write allocates.
        let error = write_error(&image, 4 << 16);
        let host = format!("host cluster {table:#x}");
        assert_refused(&image, &corrupt, what, &error, &["guest offset 0x40000", "free", &host]);
    }
}

#[test]
fn replacing_a_shared_entry_that_names_metadata_does_not_free_the_metadata() {
    let scratch = Scratch::new("overlap-shared");
    let image = written_image(&scratch);
    let original = std::fs::read(&image).unwrap();
    let block = peek_u64(&image, peek_u64(&image, 48));
    for (what, table) in tables(&image) {
        std::fs::write(&image, &original).unwrap();
        // Guest cluster 1's entry: "shared, the data is at the table". Writing it allocates
        // a new cluster and drops the reference the entry held, at the flush: freeing the
        // table would let the next allocation (first fit) take it.
        poke(&image, l2_entry_at(&image, 1), &table.to_be_bytes());
        with_image(&qcow2_rw_options(&image), |co, blk| {
            blk.write(co, (64 << 10) + 512, &[0xee; 4096])?;
            blk.flush(co)?;
            blk.write(co, 4 << 16, &[0xee; 4096])?;
            blk.flush(co)
        })
        .unwrap_or_else(|error| panic!("{what}: {error}"));
        assert_eq!(peek(&image, block + 2 * (table >> 16), 2), [0, 1], "{what}: its refcount");
        // The poke itself leaked guest cluster 1's old data cluster; nothing else is wrong.
        let check = std::process::Command::new("qemu-img")
            .args(["check", image.to_str().unwrap()])
            .output()
            .expect("qemu-img check: install qemu-utils");
        let text = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(3), "{what}: {text}");
        assert!(text.contains("1 leaked clusters") && !text.contains("ERROR"), "{what}: {text}");
        let data = qemu_raw(&image);
        assert!(data[..64 << 10].iter().all(|&b| b == 0x5a), "{what}: guest cluster 0");
        for at in [(64 << 10) + 512, 4 << 16] {
            assert!(data[at..at + 4096].iter().all(|&b| b == 0xee), "{what}: {at:#x}");
        }
    }
}
