//! Opening a dirty image for writing (QEMU's "repair image if dirty" in `qcow2_do_open`):
//! an image whose dirty bit is set (lazy refcounts, left by QEMU or a crash) may have
//! refcounts below the references its tables make, so the allocator would hand out
//! clusters in use. Before it is written, it is checked and repaired as `qemu-img check -r
//! all` would (refcounts raised or rebuilt, leaks freed), which clears the dirty bit.

use std::io;

use aiocoro::coroutine::Co;

use super::check::check;
use super::check_report::Repair;
use super::corrupt;
use super::header::Header;
use crate::node::BlockNode;

/// Repairs the dirty image in the writable `file` and returns its header as the repair left
/// it (the refcount table may have moved).
///
/// # Errors
///
/// `InvalidData` if the repair failed or left errors a repair cannot fix (the image stays
/// dirty then); the check's own errors.
pub(crate) fn repair_dirty(co: &Co, file: &BlockNode) -> io::Result<Header> {
    let report = check(co, file, Repair::All)?;
    if let Some(failure) = &report.failure {
        return Err(corrupt(format!("the image is dirty and repairing it failed: {failure}")));
    }
    let header = Header::read(co, file)?;
    if report.check_errors > 0 || header.is_dirty() {
        return Err(corrupt(format!(
            "the image is dirty and its repair left {} error(s) and {} check error(s) (see \
             qemu-img check); open it read-only",
            report.corruptions, report.check_errors
        )));
    }
    Ok(header)
}
