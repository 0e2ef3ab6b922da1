//! Growing the virtual disk (QEMU's `qcow2_co_truncate` without shrinking or
//! preallocation): a larger L1 table if the new size needs one, then the new size in the
//! header.

use std::io;

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::header::{MAX_L1_BYTES, field};
use super::io::write_at;
use super::metadata::writable;
use super::refuse_read_only;
use super::table::encode_table;
use crate::error::invalid_input;

impl Qcow2Driver {
    /// Grows the virtual disk to `len` bytes. A new L1 table is written and flushed (with
    /// its refcounts) before the header names it; the old one is retired afterwards (see
    /// `header_update` for a header write that fails).
    pub(super) fn grow(&self, co: &Co, len: u64) -> io::Result<()> {
        let geometry = self.header.geometry;
        let file = self.file.node();
        let mut meta = self.metadata.lock(co);
        if meta.writer.is_none() {
            return Err(refuse_read_only());
        }
        if len < meta.virtual_size {
            return Err(invalid_input(format!(
                "qcow2: shrinking an image ({} to {len} bytes) is not supported",
                meta.virtual_size
            )));
        }
        let needed = geometry.l1_entries_for(len);
        if needed > meta.l1.len() as u64 {
            if needed * 8 > MAX_L1_BYTES {
                return Err(invalid_input(format!(
                    "qcow2: {len} bytes need an L1 table larger than {MAX_L1_BYTES} bytes"
                )));
            }
            let clusters = (needed * 8).div_ceil(geometry.cluster_size());
            let offset = meta.allocate(co, &file, clusters, &"a larger L1 table")?;
            let mut l1 = meta.l1.clone();
            l1.resize(needed as usize, 0);
            let mut raw = encode_table(&l1);
            raw.resize((clusters * geometry.cluster_size()) as usize, 0);
            let written = meta.flush_refcounts(co, &file).and_then(|_| {
                write_at(co, &file, offset.0, &raw)?;
                file.flush(co)
            });
            if let Err(error) = written {
                meta.free_unnamed(co, &file, offset, raw.len() as u64);
                return Err(error);
            }
            // The L1 size and offset, adjacent in the header: one write.
            let at = field::L1_SIZE;
            let mut fields = [0u8; 12];
            fields[..4].copy_from_slice(&(needed as u32).to_be_bytes());
            fields[field::L1_TABLE_OFFSET - at..].copy_from_slice(&offset.0.to_be_bytes());
            let header_written =
                writable(&mut meta.writer).refcounts.header.write(co, &file, at, &fields);
            // Whatever that write did, memory moves to the new table (see `header_update`).
            let old = (meta.l1_offset, meta.l1.len() as u64 * 8);
            meta.l1 = l1;
            meta.l1_offset = offset;
            writable(&mut meta.writer).refcounts.finish_move(co, &file, old, header_written)?;
        }
        let refcounts = &mut writable(&mut meta.writer).refcounts;
        refcounts.header.write(co, &file, field::SIZE, &len.to_be_bytes())?;
        meta.virtual_size = len;
        Ok(())
    }
}
