//! The virtual size is whole 512-byte sectors, as QEMU keeps it: QEMU reads the header's
//! size field in sectors (a size that is not a multiple of 512 shows rounded down), refuses
//! a resize to a size that is not a multiple, and `qemu-img create` rounds a size up. A size
//! that QEMU would show differently would hide bytes our driver wrote.

mod qcow2_support;

use std::io::ErrorKind;

use aiocoro_block::qcow2::{CreateOptions, create_file};
use aiocoro_block::run_in_coroutine;
use qcow2_support::*;

/// The header's size field.
const SIZE_FIELD: u64 = 24;

/// `qemu-img info`'s virtual size line of `image`.
fn qemu_virtual_size(image: &std::path::Path) -> String {
    let info = qemu_img(&["info", image.to_str().unwrap()]);
    info.lines().find(|line| line.starts_with("virtual size:")).unwrap().to_owned()
}

#[test]
fn a_size_field_that_is_not_whole_sectors_reads_as_qemu_reads_it() {
    let scratch = Scratch::new("size-field");
    let image = scratch.path("image.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    qemu_io("qcow2", &image, &["write -P 0x33 0 1M"]);
    poke(&image, SIZE_FIELD, &((1u64 << 20) - 100).to_be_bytes());
    assert!(qemu_virtual_size(&image).ends_with("(1048064 bytes)"));
    let ours = read_ours(&image, 4096).unwrap();
    assert_same_bytes(&ours, &qemu_raw(&image), "an image whose size field is 1 MiB - 100");
}

#[test]
fn a_grow_to_a_size_that_is_not_whole_sectors_is_refused() {
    let scratch = Scratch::new("size-grow");
    let image = scratch.path("image.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "1M");
    let error = with_image(&qcow2_rw_options(&image), |co, blk| {
        let error = blk.truncate(co, (2 << 20) + 1).unwrap_err();
        assert_eq!(blk.length(), 1 << 20, "a refused grow changes nothing");
        Ok(error)
    })
    .unwrap();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("multiple of 512"), "{error}");
    assert_eq!(peek_u64(&image, SIZE_FIELD), 1 << 20);
    qemu_check(&image);
}

#[test]
fn create_refuses_a_size_that_is_not_whole_sectors_and_leaves_the_file_alone() {
    let scratch = Scratch::new("size-create");
    let image = scratch.path("image.qcow2");
    std::fs::write(&image, b"what was there").unwrap();
    let path = image.clone();
    let error = run_in_coroutine(move |co| create_file(co, &path, &CreateOptions::new(1000)))
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(error.to_string().contains("multiple of 512"), "{error}");
    assert_eq!(std::fs::read(&image).unwrap(), b"what was there", "refused options touch no file");
}
