//! `BlockBackend::can_zero_fast`: whole qcow2 clusters, files and null nodes zero without
//! writing; partial clusters, version 2 images and padded ranges do not.

mod qcow2_support;

use qcow2_support::*;

fn fast(options: &str, ranges: &'static [(u64, u64)]) -> Vec<bool> {
    with_image(options, move |_, blk| {
        Ok(ranges.iter().map(|&(offset, len)| blk.can_zero_fast(offset, len)).collect())
    })
    .unwrap()
}

#[test]
fn whole_clusters_files_and_null_nodes_zero_fast() {
    let scratch = Scratch::new("fast-zero");
    let (v3, v2) = (scratch.path("v3.qcow2"), scratch.path("v2.qcow2"));
    create_qcow2(v3.to_str().unwrap(), "", "1M");
    create_qcow2(v2.to_str().unwrap(), "compat=0.10", "1M");
    let ranges = &[(0, 65536), (65536, 131072), (4096, 65536), (0, 65536 + 512), (0, 0)];
    assert_eq!(fast(&qcow2_options(&v3), ranges), [true, true, false, false, true]);
    assert_eq!(fast(&qcow2_options(&v2), ranges), [false, false, false, false, true]);
    let raw = format!("driver=raw,read-only=on,file.filename={}", v3.display());
    assert_eq!(fast(&raw, &[(512, 1)]), [true]);
    assert_eq!(fast("driver=null-co,size=1M", &[(1, 3)]), [true]);
}
