//! Growing the virtual disk (QEMU's `qcow2_co_truncate` without shrinking or
//! preallocation): a larger L1 table if the new size needs one, then the new size in the
//! header.

use std::io;

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::header::{MAX_L1_BYTES, SECTOR_SIZE};
use crate::error::invalid_input;

impl Qcow2Driver {
    /// Grows the virtual disk to `len` bytes, a multiple of [`SECTOR_SIZE`] (QEMU keeps the
    /// size in whole sectors, and refuses any other). A new L1 table is written and flushed
    /// (with its refcounts) before the header names it; the old one is retired afterwards
    /// (see `header_update` for a header write that fails).
    pub(super) fn grow(&self, co: &Co, len: u64) -> io::Result<()> {
        let geometry = self.header.geometry;
        let file = self.file.node();
        let mut meta = self.metadata.lock(co);
        meta.check_writable()?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(invalid_input(format!(
                "qcow2: the new size {len} is not a multiple of {SECTOR_SIZE} bytes (the virtual \
                 size is whole sectors)"
            )));
        }
        if len < meta.virtual_size() {
            return Err(invalid_input(format!(
                "qcow2: shrinking an image ({} to {len} bytes) is not supported",
                meta.virtual_size()
            )));
        }
        let needed = geometry.l1_entries_for(len);
        if needed > meta.l1_len() {
            if needed * 8 > MAX_L1_BYTES {
                return Err(invalid_input(format!(
                    "qcow2: {len} bytes need an L1 table larger than {MAX_L1_BYTES} bytes"
                )));
            }
            meta.grow_l1(co, &file, needed)?;
        }
        meta.set_virtual_size(co, &file, len)
    }
}
