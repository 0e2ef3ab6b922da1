//! Every system call of this crate, each behind `syscall!`, which turns `-1` into the
//! thread's `errno` as an `io::Error`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Calls a libc function and turns its `-1` into `Err(io::Error::last_os_error())`.
macro_rules! syscall {
    ($name:ident($($arg:expr),* $(,)?)) => {{
        // SAFETY: each caller passes arguments valid for this call (live descriptors, sized
        // buffers); the `SAFETY` line above each use says why.
        let result = unsafe { libc::$name($($arg),*) };
        if result == -1 { Err(io::Error::last_os_error()) } else { Ok(result) }
    }};
}

/// `fallocate(2)` with `mode` over `len` bytes at `offset`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = to_off(offset)?;
    let len = to_off(len)?;
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    syscall!(fallocate(fd.as_raw_fd(), mode, offset, len)).map(drop)
}

/// Where `SEEK_DATA` (`data == true`) or `SEEK_HOLE` finds the next data or hole at or after
/// `offset`; `None` where there is none (`ENXIO`: at or past the end).
pub fn seek_data_or_hole(fd: BorrowedFd<'_>, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    match syscall!(lseek(fd.as_raw_fd(), to_off(offset)?, whence)) {
        Ok(position) => Ok(Some(position as u64)),
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Where the end of `fd` is (`lseek(fd, 0, SEEK_END)`): a block device's size.
pub fn seek_end(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    syscall!(lseek(fd.as_raw_fd(), 0, libc::SEEK_END)).map(|end| end as u64)
}

/// The `O_DIRECT` alignment the file system states for `fd` (`statx` with
/// `STATX_DIOALIGN`): `(memory, offset)`; `None` where it does not say.
pub fn direct_io_alignment(fd: BorrowedFd<'_>) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stat: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `fd` is borrowed, so live; the path is a NUL-terminated C string (empty, with
    // `AT_EMPTY_PATH`); `stat` is a `statx` the call may write whole.
    syscall!(statx(
        fd.as_raw_fd(),
        empty.as_ptr(),
        libc::AT_EMPTY_PATH,
        libc::STATX_DIOALIGN,
        &raw mut stat,
    ))?;
    let stated = stat.stx_mask & libc::STATX_DIOALIGN != 0 && stat.stx_dio_offset_align != 0;
    Ok(stated.then_some((stat.stx_dio_mem_align, stat.stx_dio_offset_align)))
}

/// One plain `pread(2)` into `buf` at `offset`, for probing at open time.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = to_off(offset)?;
    // SAFETY: `fd` is borrowed, so live; the kernel writes at most `buf.len()` bytes into
    // `buf`, which this call borrows mutably.
    syscall!(pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset)).map(|n| n as usize)
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
