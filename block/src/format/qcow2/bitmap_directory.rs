//! The persistent bitmap directory, as far as a check needs it (QEMU's `bitmap_list_load`):
//! where each bitmap's table is and how many entries it has. Entries are 8-byte aligned: a
//! 24-byte fixed part (the table's offset and size, flags, type, granularity, the name's
//! and the extra data's lengths), the extra data, the name.

use std::io;

use aiocoro::coroutine::Co;

use super::corrupt;
use super::header::{BitmapsExtension, Fields};
use super::io::read_within_file;
use crate::node::BlockNode;

/// The fixed part of a directory entry.
const FIXED_LEN: u64 = 24;
/// The largest directory QEMU reads.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// The most bitmap table entries QEMU reads.
const MAX_TABLE_ENTRIES: u32 = 0x800_0000;

/// Bits of a bitmap table entry that hold the offset of a cluster of bitmap data.
pub(crate) const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a bitmap table entry that must be zero.
const ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bit 0, without an offset: the cluster's bits are all ones.
const ENTRY_ALL_ONES: u64 = 1;

/// A bitmap's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BitmapTable {
    /// Where the table is.
    pub(crate) offset: u64,
    /// Its entries.
    pub(crate) entries: u32,
}

/// Reads the bitmap directory that `extension` names, in a file of `file_len` bytes.
///
/// # Errors
///
/// `InvalidData` naming what is wrong (a directory too large, an entry past its end, a table
/// too large); read errors.
pub(crate) fn read_bitmap_directory(
    co: &Co,
    file: &BlockNode,
    file_len: u64,
    extension: &BitmapsExtension,
) -> io::Result<Vec<BitmapTable>> {
    let size = extension.directory_size;
    if size > MAX_DIRECTORY_BYTES {
        return Err(corrupt(format!(
            "the bitmap directory is {size} bytes long, more than the {MAX_DIRECTORY_BYTES} \
             allowed"
        )));
    }
    let mut directory = vec![0u8; size as usize];
    read_within_file(co, file, file_len, extension.directory_offset.0, &mut directory)?;
    let mut tables = Vec::with_capacity(extension.count.min(65535) as usize);
    let mut at = 0u64;
    for index in 0..extension.count {
        let fixed = at
            .checked_add(FIXED_LEN)
            .filter(|&end| end <= size)
            .map(|end| &directory[at as usize..end as usize])
            .ok_or_else(|| corrupt(format!("bitmap directory entry {index} runs past its end")))?;
        let field = Fields(fixed);
        let offset = field.u64(0);
        let entries = field.u32(8);
        let name_len = u64::from(field.u16(18));
        let extra_len = u64::from(field.u32(20));
        if entries > MAX_TABLE_ENTRIES {
            return Err(corrupt(format!(
                "bitmap directory entry {index}: a table of {entries} entries, more than the \
                 {MAX_TABLE_ENTRIES} allowed"
            )));
        }
        at = (at + FIXED_LEN + extra_len + name_len).next_multiple_of(8);
        if at > size {
            return Err(corrupt(format!("bitmap directory entry {index} runs past its end")));
        }
        tables.push(BitmapTable { offset, entries });
    }
    Ok(tables)
}

/// Whether a bitmap table entry is well-formed for clusters of `cluster_size` bytes: no
/// reserved bits, and with an offset, an aligned one and not the all-ones flag.
pub(crate) fn is_valid_entry(entry: u64, cluster_size: u64) -> bool {
    let offset = entry & ENTRY_OFFSET_MASK;
    entry & ENTRY_RESERVED == 0
        && (offset == 0 || (entry & ENTRY_ALL_ONES == 0 && offset.is_multiple_of(cluster_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entries() {
        assert!(is_valid_entry(0, 65536));
        assert!(is_valid_entry(ENTRY_ALL_ONES, 65536));
        assert!(is_valid_entry(0x30000, 65536));
        assert!(!is_valid_entry(0x30000 | ENTRY_ALL_ONES, 65536));
        assert!(!is_valid_entry(0x30200, 65536));
        assert!(!is_valid_entry(1 << 60, 65536));
    }
}
