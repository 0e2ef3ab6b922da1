//! The snapshot table (QEMU's `qcow2_read_snapshots`): each internal snapshot's L1 table,
//! id, name, date, VM clock, VM state size and instruction count, and how many bytes the
//! table takes; [`list_snapshots`] reads it from an image and [`snapshot_list`] prints it as
//! `qemu-img snapshot -l` does. Entries are 8-byte aligned: a 40-byte fixed part (L1 offset
//! and size, the id and name lengths, dates, VM clock, VM state size, the extra data's
//! length), the extra data (a 64-bit VM state size, the disk size, the instruction count),
//! the id, the name.

use std::io;

use aiocoro::coroutine::Co;

use super::corrupt;
use super::header::{Fields, Header};
use super::io::read_within_file;
use crate::node::BlockNode;

/// The fixed part of a snapshot table entry.
const FIXED_LEN: usize = 40;
/// The most extra data QEMU reads in an entry.
const MAX_EXTRA_DATA: u64 = 1024;
/// The largest snapshot table QEMU reads.
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// An internal snapshot, as its table entry describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot's id.
    pub id: String,
    /// The snapshot's name (its tag).
    pub name: String,
    /// Where its L1 table is.
    pub l1_offset: u64,
    /// Its L1 table's entries.
    pub l1_size: u32,
    /// When it was taken: seconds since the epoch.
    pub date_sec: u32,
    /// When it was taken: the nanoseconds past `date_sec`.
    pub date_nsec: u32,
    /// The guest's clock when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The bytes of VM state saved with it.
    pub vm_state_size: u64,
    /// The guest's instruction count when it was taken (record/replay), if recorded.
    pub icount: Option<u64>,
}

/// The snapshot table of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotTable {
    /// The snapshots, in table order.
    pub(crate) snapshots: Vec<Snapshot>,
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
        let field = Fields(&fixed);
        let l1_offset = field.u64(0);
        let (l1_size, id_len, name_len) = (field.u32(8), field.u16(12), field.u16(14));
        let extra = u64::from(field.u32(36));
        if extra > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "snapshot table entry {index} has {extra} bytes of extra data, more than the \
                 {MAX_EXTRA_DATA} allowed"
            )));
        }
        let mut extra_data = vec![0u8; extra as usize];
        read_within_file(co, file, file_len, offset + at + FIXED_LEN as u64, &mut extra_data)?;
        let extra_u64 = |i: usize| (extra_data.len() >= i + 8).then(|| Fields(&extra_data).u64(i));
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
        snapshots.push(Snapshot {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            l1_offset,
            l1_size,
            date_sec: field.u32(16),
            date_nsec: field.u32(20),
            vm_clock_nsec: field.u64(24),
            vm_state_size: extra_u64(0).unwrap_or(u64::from(field.u32(32))),
            icount: extra_u64(16).filter(|&count| count != u64::MAX),
        });
    }
    Ok(SnapshotTable { snapshots, bytes: at })
}

/// The internal snapshots of the qcow2 image in `file`, in table order.
///
/// # Errors
///
/// The header's or the table's read error; `InvalidData` for a malformed header or table.
pub fn list_snapshots(co: &Co, file: &BlockNode) -> io::Result<Vec<Snapshot>> {
    let file_len = file.length();
    let header = Header::parse(&Header::read_first_cluster(co, file)?, file_len)?;
    let table =
        read_snapshot_table(co, file, file_len, header.snapshots_offset.0, header.nb_snapshots)?;
    Ok(table.snapshots)
}

/// `snapshots` as `qemu-img snapshot -l` prints them: the `Snapshot list:` line, the
/// column heads, then one line per snapshot (dates in local time).
pub fn snapshot_list(snapshots: &[Snapshot]) -> String {
    let row = |id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str| {
        format!("{id:<7} {tag:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}\n")
    };
    let mut text = String::from("Snapshot list:\n");
    text += &row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
    for snapshot in snapshots {
        let secs = snapshot.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            snapshot.vm_clock_nsec / 1_000_000 % 1000
        );
        let icount = snapshot.icount.map_or_else(|| "--".to_owned(), |count| count.to_string());
        text += &row(
            &snapshot.id,
            &snapshot.name,
            &size_to_str(snapshot.vm_state_size),
            &local_date(snapshot.date_sec),
            &clock,
            &icount,
        );
    }
    text
}

/// A byte count as QEMU's `size_to_str` prints it: a binary unit chosen so that the number
/// is below 1000, printed with `%0.3g` (`0 B`, `0.977 KiB`, `1.5 KiB`, `118 MiB`).
fn size_to_str(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // floor(log2(bytes * 1024 / 1000)) / 10, as QEMU derives it with frexp.
    let scaled = bytes as f64 * 1.024;
    let unit = if scaled >= 1.0 { (scaled.log2().floor() as usize / 10).min(6) } else { 0 };
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    // %0.3g: three significant digits, trailing zeroes dropped.
    let magnitude = if value > 0.0 { value.log10().floor() as i32 } else { 0 };
    let decimals = (2 - magnitude).max(0) as usize;
    let number = format!("{value:.decimals$}");
    let number = if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        number
    };
    format!("{number} {}", units[unit])
}

/// `secs` since the epoch as `%Y-%m-%d %H:%M:%S` in local time.
fn local_date(secs: u32) -> String {
    let time = libc::time_t::from(secs);
    // SAFETY: an all-zero `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers point at live, properly aligned values for the call's duration;
    // localtime_r is the thread-safe variant and keeps no reference to them.
    if unsafe { libc::localtime_r(&time, &mut tm) }.is_null() {
        return format!("@{secs}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(123_456_789), "118 MiB");
    }
}
