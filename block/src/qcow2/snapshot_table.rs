//! The snapshot table, as far as a check needs it (QEMU's `qcow2_read_snapshots`): where
//! each internal snapshot's L1 table is, its id and name for messages, and how many bytes
//! the table takes. Entries are 8-byte aligned: a 40-byte fixed part (L1 offset and size,
//! the id and name lengths, dates, VM state size, the extra data's length), the extra data,
//! the id, the name.

use std::io;

use aiocoro::coroutine::Co;

use super::check::read_within_file;
use super::corrupt;
use crate::node::BlockNode;

/// The fixed part of a snapshot table entry.
const FIXED_LEN: usize = 40;
/// The most extra data QEMU reads in an entry.
const MAX_EXTRA_DATA: u64 = 1024;
/// The largest snapshot table QEMU reads.
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// An internal snapshot's L1 table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotL1 {
    /// The snapshot's id.
    pub(crate) id: String,
    /// The snapshot's name.
    pub(crate) name: String,
    /// Where its L1 table is.
    pub(crate) l1_offset: u64,
    /// Its L1 table's entries.
    pub(crate) l1_size: u32,
}

/// The snapshot table of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotTable {
    /// The snapshots, in table order.
    pub(crate) snapshots: Vec<SnapshotL1>,
    /// The bytes from the table's start to the end of its last entry.
    pub(crate) bytes: u64,
}

/// Reads the `count` entries of the snapshot table at `offset` of a file of `file_len`
/// bytes.
///
/// # Errors
///
/// `InvalidData` naming the entry if one runs past the table's limit or holds more extra
/// data than QEMU reads; read errors.
pub(crate) fn read_snapshot_table(
    co: &Co,
    file: &BlockNode,
    file_len: u64,
    offset: u64,
    count: u32,
) -> io::Result<SnapshotTable> {
    let mut snapshots = Vec::with_capacity(count as usize);
    let mut at = 0u64;
    for index in 0..count {
        at = at.next_multiple_of(8);
        let mut fixed = [0u8; FIXED_LEN];
        read_within_file(co, file, file_len, offset + at, &mut fixed)?;
        let u32_at = |i: usize| u32::from_be_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_be_bytes(fixed[i..i + 2].try_into().expect("2 bytes"));
        let l1_offset = u64::from_be_bytes(fixed[..8].try_into().expect("8 bytes"));
        let (l1_size, id_len, name_len) = (u32_at(8), u16_at(12), u16_at(14));
        let extra = u64::from(u32_at(36));
        if extra > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "snapshot table entry {index} has {extra} bytes of extra data, more than the \
                 {MAX_EXTRA_DATA} allowed"
            )));
        }
        let strings_at = offset + at + FIXED_LEN as u64 + extra;
        let mut strings = vec![0u8; usize::from(id_len) + usize::from(name_len)];
        read_within_file(co, file, file_len, strings_at, &mut strings)?;
        let (id, name) = strings.split_at(usize::from(id_len));
        at += FIXED_LEN as u64 + extra + strings.len() as u64;
        if at > MAX_TABLE_BYTES {
            return Err(corrupt(format!(
                "the snapshot table runs past {MAX_TABLE_BYTES} bytes at entry {index}"
            )));
        }
        snapshots.push(SnapshotL1 {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            l1_offset,
            l1_size,
        });
    }
    Ok(SnapshotTable { snapshots, bytes: at })
}
