//! Images we must not read are refused at open with errors that name the feature or the
//! broken field; corrupted tables fail the read that reaches them, naming the guest offset
//! and the entry. Nothing panics.

mod qcow2_support;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use qcow2_support::*;

/// A 64 KiB-cluster v3 image of 8 MiB with data in its first clusters and at 5 MiB.
fn sample(scratch: &Scratch, name: &str, compat: &str) -> PathBuf {
    let image = scratch.path(name);
    let options = format!("compat={compat},cluster_size=64k");
    create_qcow2(image.to_str().unwrap(), &options, "8M");
    qemu_io("qcow2", &image, &["write -P 0xab 0 192k", "write -P 0xcd 5M 64k"]);
    image
}

fn expect(image: &Path, kind: ErrorKind, words: &[&str]) -> String {
    let error = open_error(image);
    let text = error.to_string();
    assert_eq!(error.kind(), kind, "{text}");
    for word in words {
        assert!(text.contains(word), "the error should say '{word}': {text}");
    }
    text
}

#[test]
fn luks_encryption_is_refused_by_name() {
    let scratch = Scratch::new("luks");
    let image = scratch.path("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        image.to_str().unwrap(),
        "1M",
    ]);
    expect(&image, ErrorKind::Unsupported, &["encryption", "LUKS", "luks.qcow2"]);
}

#[test]
fn an_external_data_file_is_refused_by_name() {
    let scratch = Scratch::new("datafile");
    let image = scratch.path("d.qcow2");
    let data = scratch.path("d.data");
    let options = format!("data_file={}", data.display());
    create_qcow2(image.to_str().unwrap(), &options, "1M");
    expect(&image, ErrorKind::Unsupported, &["external data file"]);
}

#[test]
fn unknown_compression_types_are_refused_by_number() {
    let scratch = Scratch::new("zstd");
    let image = scratch.path("z.qcow2");
    create_qcow2(image.to_str().unwrap(), "compression_type=zstd", "1M");
    assert_eq!(peek(&image, 104, 1), [1], "qemu-img writes compression_type 1 for zstd");
    read_ours(&image, 1 << 20).unwrap();
    poke(&image, 104, &[2]);
    expect(&image, ErrorKind::Unsupported, &["compression type 2", "not supported"]);
}

#[test]
fn feature_bits_corrupt_unknown_and_dirty() {
    let scratch = Scratch::new("features");
    let image = sample(&scratch, "f.qcow2", "1.1");
    let good = read_ours(&image, 1 << 20).unwrap();

    // Marked corrupt: read-only it reads (as QEMU reads it), for writing it is refused.
    poke(&image, 72, &2u64.to_be_bytes());
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &good, "image marked corrupt");
    let error = with_image(&qcow2_rw_options(&image), |_, _| Ok(())).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
    for word in ["marked corrupt", "bit 1", "check -r all", "read-only"] {
        assert!(error.to_string().contains(word), "the error should say '{word}': {error}");
    }

    poke(&image, 72, &(1u64 << 40).to_be_bytes());
    expect(&image, ErrorKind::Unsupported, &["incompatible feature", "bit 40"]);

    // Dirty (lazy refcounts after a crash): refcounts may be stale, reads are fine.
    poke(&image, 72, &1u64.to_be_bytes());
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &good, "dirty image");

    // Unknown compatible and autoclear bits are fine too.
    poke(&image, 72, &0u64.to_be_bytes());
    poke(&image, 80, &(1u64 << 33).to_be_bytes());
    poke(&image, 88, &(1u64 << 20).to_be_bytes());
    assert_same_bytes(&read_ours(&image, 1 << 20).unwrap(), &good, "unknown compat bits");
}

/// `(field, byte offset, new bytes, error kind, words the error says)`.
type HeaderCase = (&'static str, u64, Vec<u8>, ErrorKind, Vec<&'static str>);

#[test]
fn broken_header_fields_are_refused_saying_what_and_where() {
    let scratch = Scratch::new("header");
    let image = sample(&scratch, "h.qcow2", "1.1");
    let original = std::fs::read(&image).unwrap();
    let file_len = original.len() as u64;
    let l1 = peek_u64(&image, 40);
    let cases: Vec<HeaderCase> = vec![
        ("magic", 0, b"QFI\0".to_vec(), ErrorKind::InvalidData, vec!["not a qcow2 image"]),
        ("version", 4, 4u32.to_be_bytes().to_vec(), ErrorKind::Unsupported, vec!["version 4"]),
        (
            "cluster_bits",
            20,
            22u32.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["cluster_bits is 22"],
        ),
        (
            "cluster_bits",
            20,
            8u32.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["cluster_bits is 8"],
        ),
        ("size", 24, u64::MAX.to_be_bytes().to_vec(), ErrorKind::InvalidData, vec!["virtual size"]),
        (
            "size",
            24,
            (1u64 << 40).to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["L1 table has 1 entries, too few"],
        ),
        (
            "crypt_method",
            32,
            1u32.to_be_bytes().to_vec(),
            ErrorKind::Unsupported,
            vec!["encryption (AES"],
        ),
        (
            "l1_size",
            36,
            u32::MAX.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["L1 table has 4294967295 entries"],
        ),
        ("l1_size", 36, 0u32.to_be_bytes().to_vec(), ErrorKind::InvalidData, vec!["too few"]),
        (
            "l1_table_offset",
            40,
            file_len.next_multiple_of(65536).to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["L1 table", "past the end of the file"],
        ),
        (
            "l1_table_offset",
            40,
            0u64.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["L1 table at host offset 0x0 overlaps the header"],
        ),
        (
            "l1_table_offset",
            40,
            (l1 + 8).to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["L1 table", "not aligned"],
        ),
        (
            "refcount_table_offset",
            48,
            (1u64 << 50).to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["refcount table", "past the end"],
        ),
        (
            "refcount_table_clusters",
            56,
            u32::MAX.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["refcount table has 4294967295 clusters"],
        ),
        (
            "nb_snapshots",
            60,
            7u32.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["snapshot table"],
        ),
        (
            "refcount_order",
            96,
            7u32.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["refcount_order is 7"],
        ),
        (
            "header_length",
            100,
            12345u32.to_be_bytes().to_vec(),
            ErrorKind::InvalidData,
            vec!["header_length is 12345"],
        ),
        (
            "backing name",
            8,
            [&65530u64.to_be_bytes()[..], &100u32.to_be_bytes()[..]].concat(),
            ErrorKind::InvalidData,
            vec!["backing file name"],
        ),
    ];
    for (field, at, bytes, kind, words) in cases {
        std::fs::write(&image, &original).unwrap();
        poke(&image, at, &bytes);
        let text = expect(&image, kind, &words);
        eprintln!("{field}: {text}");
    }
    std::fs::write(&image, &original[..50]).unwrap();
    expect(&image, ErrorKind::InvalidData, &["fewer than the 72 of a qcow2 header"]);
}

#[test]
fn a_header_extension_longer_than_the_header_cluster_is_refused() {
    let scratch = Scratch::new("ext");
    let image = sample(&scratch, "e.qcow2", "1.1");
    let header_length = u32::from_be_bytes(peek(&image, 100, 4).try_into().unwrap()) as u64;
    poke(&image, header_length, &[0x12, 0x34, 0x56, 0x78, 0x00, 0x10, 0x00, 0x00]);
    expect(&image, ErrorKind::InvalidData, &["header extension 0x12345678", "past the end"]);
}

#[test]
fn broken_l1_and_l2_entries_fail_the_read_naming_the_guest_offset_and_the_entry() {
    let scratch = Scratch::new("tables");
    let image = sample(&scratch, "t.qcow2", "1.1");
    let original = std::fs::read(&image).unwrap();
    let file_len = original.len() as u64;
    let l1 = peek_u64(&image, 40);

    poke(&image, l1, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    expect(&image, ErrorKind::InvalidData, &["guest offset 0x0", "L1 entry 0", "past the end"]);

    std::fs::write(&image, &original).unwrap();
    poke(&image, l1, &(0x30200u64).to_be_bytes());
    expect(&image, ErrorKind::InvalidData, &["L1 entry 0", "not cluster-aligned"]);

    let cases: Vec<(u64, u64, Vec<&str>)> = vec![
        (
            1,
            (1 << 63) | file_len.next_multiple_of(65536),
            vec!["guest offset 0x10000", "L2 entry 1", "past the end"],
        ),
        (2, (1 << 63) | 0x50200, vec!["guest offset 0x20000", "L2 entry 2", "not cluster-aligned"]),
        (80, (1 << 62) | 0x100, vec!["guest offset 0x500000", "L2 entry 80", "header cluster"]),
        (80, (1 << 62) | (1 << 45), vec!["L2 entry 80", "compressed cluster", "past the end"]),
        // Valid-looking compressed entry over data that is not deflate.
        (0, (1 << 62) | 0x50000, vec!["guest offset 0x0", "compressed cluster", "inflates"]),
    ];
    for (index, entry, words) in cases {
        std::fs::write(&image, &original).unwrap();
        poke(&image, l2_entry_at(&image, index), &entry.to_be_bytes());
        expect(&image, ErrorKind::InvalidData, &words);
    }
}

#[test]
fn the_zero_flag_in_a_version_2_image_is_refused() {
    let scratch = Scratch::new("v2zero");
    let image = sample(&scratch, "v2.qcow2", "0.10");
    poke(&image, l2_entry_at(&image, 3), &1u64.to_be_bytes());
    expect(&image, ErrorKind::InvalidData, &["guest offset 0x30000", "L2 entry 3", "version 2"]);
}

#[test]
fn a_backing_chain_that_loops_is_refused() {
    let scratch = Scratch::new("loop");
    let image = scratch.path("self.qcow2");
    let path = image.to_str().unwrap();
    create_qcow2(path, "", "1M");
    // Make the image its own backing file, without qemu-img's checks.
    qemu_img(&["rebase", "-u", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", path]);
    expect(&image, ErrorKind::InvalidInput, &["backing chain is deeper than 32"]);
}

#[test]
fn a_raw_file_is_not_a_qcow2_image() {
    let scratch = Scratch::new("raw");
    let image = scratch.path("r.img");
    std::fs::write(&image, vec![0x5au8; 4096]).unwrap();
    expect(&image, ErrorKind::InvalidData, &["not a qcow2 image"]);
}

#[test]
fn an_unknown_incompatible_bit_is_named_from_the_feature_name_table() {
    let scratch = Scratch::new("names");
    let image = sample(&scratch, "n.qcow2", "1.1");
    // Find the feature name table qemu-img wrote, and rename bit 4's entry to bit 45.
    let header_length = u32::from_be_bytes(peek(&image, 100, 4).try_into().unwrap()) as u64;
    let mut at = header_length;
    let table = loop {
        let kind = u32::from_be_bytes(peek(&image, at, 4).try_into().unwrap());
        let len = u32::from_be_bytes(peek(&image, at + 4, 4).try_into().unwrap()) as u64;
        assert_ne!(kind, 0, "no feature name table");
        if kind == 0x6803_f857 {
            break (at + 8, len);
        }
        at += 8 + len.next_multiple_of(8);
    };
    let entry = (0..table.1 / 48)
        .map(|i| table.0 + i * 48)
        .find(|&entry| peek(&image, entry, 2) == [0, 4])
        .expect("an entry for incompatible bit 4");
    let name = String::from_utf8(peek(&image, entry + 2, 46)).unwrap();
    let name = name.trim_end_matches('\0').to_owned();
    poke(&image, entry + 1, &[45]);
    poke(&image, 72, &(1u64 << 45).to_be_bytes());
    expect(&image, ErrorKind::Unsupported, &[&format!("'{name}' (bit 45)")]);
}
