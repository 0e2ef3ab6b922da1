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
pub(crate) fn fallocate(
    fd: BorrowedFd<'_>,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let offset = to_off(offset)?;
    let len = to_off(len)?;
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    syscall!(fallocate(fd.as_raw_fd(), mode, offset, len)).map(drop)
}

/// Where `SEEK_DATA` (`data == true`) or `SEEK_HOLE` finds the next data or hole at or after
/// `offset`; `None` where there is none (`ENXIO`: at or past the end).
pub(crate) fn seek_data_or_hole(
    fd: BorrowedFd<'_>,
    offset: u64,
    data: bool,
) -> io::Result<Option<u64>> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    match syscall!(lseek(fd.as_raw_fd(), to_off(offset)?, whence)) {
        Ok(position) => Ok(Some(position as u64)),
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Where the end of `fd` is (`lseek(fd, 0, SEEK_END)`): a block device's size.
pub(crate) fn seek_end(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: `fd` is borrowed, so live; the other arguments are plain integers.
    syscall!(lseek(fd.as_raw_fd(), 0, libc::SEEK_END)).map(|end| end as u64)
}

/// The `O_DIRECT` alignment the file system states for `fd` (`statx` with
/// `STATX_DIOALIGN`): `(memory, offset)`; `None` where it does not say.
pub(crate) fn direct_io_alignment(fd: BorrowedFd<'_>) -> io::Result<Option<(u32, u32)>> {
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
pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = to_off(offset)?;
    // SAFETY: `fd` is borrowed, so live; the kernel writes at most `buf.len()` bytes into
    // `buf`, which this call borrows mutably.
    syscall!(pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset)).map(|n| n as usize)
}

/// Takes a shared (`F_RDLCK`) open-file-description lock on the one byte at `byte` of `fd`
/// (`fcntl(F_OFD_SETLK)`): it lives as long as the open file description, and conflicts with
/// no other lock of the same description.
pub(crate) fn ofd_lock_shared_byte(fd: BorrowedFd<'_>, byte: u64) -> io::Result<()> {
    let mut lock = one_byte_lock(byte, libc::F_RDLCK)?;
    // SAFETY: `fd` is borrowed, so live; `lock` is a `flock` the call reads.
    syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &raw mut lock)).map(drop)
}

/// Drops every open-file-description lock `fd`'s description holds (`F_UNLCK` over the whole
/// file), at once, whoever else still references the description.
pub(crate) fn ofd_unlock_all(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut lock = one_byte_lock(0, libc::F_UNLCK)?;
    lock.l_len = 0; // to the end of the file, however far it grows
    // SAFETY: `fd` is borrowed, so live; `lock` is a `flock` the call reads.
    syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &raw mut lock)).map(drop)
}

/// Whether another open file description (of this process or another) holds a lock on the
/// byte at `byte` of `fd` that an exclusive lock would conflict with (`fcntl(F_OFD_GETLK)`
/// asking for `F_WRLCK`).
pub(crate) fn ofd_byte_locked_elsewhere(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let mut lock = one_byte_lock(byte, libc::F_WRLCK)?;
    // SAFETY: `fd` is borrowed, so live; `lock` is a `flock` the call reads and rewrites.
    syscall!(fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &raw mut lock))?;
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// A `flock` of `kind` over the one byte at `byte` (`l_pid` 0, as OFD locks require).
fn one_byte_lock(byte: u64, kind: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = to_off(byte)?;
    lock.l_len = 1;
    Ok(lock)
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
