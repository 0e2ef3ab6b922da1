//! Image locking as QEMU's `file-posix` does it, so that QEMU, `qemu-img`, `qemu-io` and
//! this crate keep out of each other's images.
//!
//! QEMU names what a user of an image does with four permissions (`BLK_PERM_*`, bit `i`):
//! consistent read (0), write (1), write unchanged (2), resize (3). An open holds some and
//! shares some with other users. On the file, it takes a shared open-file-description
//! (OFD) lock on byte `100 + i` for each permission it holds and on byte `200 + i` for each
//! one it does not share. A permission `i` is free to take when no other open file
//! description locks byte `200 + i`; refusing to share `i` is possible when none locks
//! byte `100 + i`. Locks are shared (`F_RDLCK`), so holders never block each other; a
//! conflict shows only when tested (`F_OFD_GETLK` with `F_WRLCK`). OFD locks belong to the
//! open file description: two opens in one process see each other, and closing the file
//! drops them.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use crate::sys;

/// Whether a file node takes and honours QEMU's image locks (QEMU's `locking=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Locking {
    /// Lock; where the file system refuses locks (`ENOLCK`, ...), open without them.
    #[default]
    Auto,
    /// Lock; where the file system refuses locks, fail the open.
    On,
    /// Take no locks and check none: nothing keeps another writer out.
    Off,
}

/// QEMU's permissions, by bit index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

/// The first byte of the "holds permission `i`" locks.
const HELD_BASE: u64 = 100;
/// The first byte of the "does not share permission `i`" locks.
const UNSHARED_BASE: u64 = 200;

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// The name QEMU's lock errors use.
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn held_byte(self) -> u64 {
        HELD_BASE + self as u64
    }

    fn unshared_byte(self) -> u64 {
        UNSHARED_BASE + self as u64
    }
}

/// What an open of ours holds and shares: as `qemu-img` and `qemu-io` (without `-U`) on a
/// format's file: it reads; a writable one also writes and resizes (a format grows its
/// file); it shares reading but never writing or resizing, whose users would change the
/// image under it.
fn holds(permission: Permission, read_only: bool) -> bool {
    match permission {
        Permission::ConsistentRead => true,
        Permission::Write | Permission::Resize => !read_only,
        Permission::WriteUnchanged => false,
    }
}

fn shares(permission: Permission) -> bool {
    matches!(permission, Permission::ConsistentRead | Permission::WriteUnchanged)
}

/// Takes the image locks of an open of `fd` (the file `path`, for errors), then checks no
/// other open conflicts with them (in this order, as QEMU: of two opens racing, each sees
/// the other). The locks last until `fd`'s open file description is closed.
///
/// # Errors
///
/// A conflict, as QEMU words it (`Failed to get "write" lock`, kind `ResourceBusy`), with
/// the path; under [`Locking::On`] also a file system that refuses locks.
pub(super) fn lock_image(
    fd: BorrowedFd<'_>,
    path: &Path,
    read_only: bool,
    locking: Locking,
) -> io::Result<()> {
    if locking == Locking::Off {
        return Ok(());
    }
    match take_locks(fd, read_only) {
        Err(error) if locking == Locking::Auto && refuses_locks(&error) => return Ok(()),
        Err(error) => {
            return Err(io::Error::new(
                error.kind(),
                format!("{}: cannot take the image locks (locking=on): {error}", path.display()),
            ));
        }
        Ok(()) => {}
    }
    for permission in Permission::ALL {
        if holds(permission, read_only) && locked(fd, path, permission.unshared_byte())? {
            return Err(conflict(path, &format!("Failed to get \"{}\" lock", permission.name())));
        }
    }
    for permission in Permission::ALL {
        if !shares(permission) && locked(fd, path, permission.held_byte())? {
            let what = format!("Failed to get shared \"{}\" lock", permission.name());
            return Err(conflict(path, &what));
        }
    }
    Ok(())
}

/// Gives up the image locks of `fd`'s open now, not when its open file description goes:
/// the kernel may still hold the description for a moment after the descriptor is closed
/// (an io_uring worker that ran a flush drops its reference after posting the completion),
/// and a reopen right after closing would find the locks still held.
pub(super) fn unlock_image(fd: BorrowedFd<'_>) {
    // Only a bad descriptor makes F_UNLCK fail, and the caller owns a live one; should the
    // kernel refuse anyway, the locks go with the description, a moment later.
    let _ = sys::ofd_unlock_all(fd);
}

fn take_locks(fd: BorrowedFd<'_>, read_only: bool) -> io::Result<()> {
    for permission in Permission::ALL {
        if holds(permission, read_only) {
            sys::ofd_lock_shared_byte(fd, permission.held_byte())?;
        }
        if !shares(permission) {
            sys::ofd_lock_shared_byte(fd, permission.unshared_byte())?;
        }
    }
    Ok(())
}

/// Whether `error` says the file system does not do locks (rather than a conflict).
fn refuses_locks(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

fn locked(fd: BorrowedFd<'_>, path: &Path, byte: u64) -> io::Result<bool> {
    sys::ofd_byte_locked_elsewhere(fd, byte).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("{}: cannot test the image lock at byte {byte}: {error}", path.display()),
        )
    })
}

fn conflict(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{what}: is another process using the image [{}]? (another open of it, maybe by \
             QEMU, does not share what this one needs; locking=off opens it anyway, at the \
             risk of corrupting it)",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_bytes_are_qemus() {
        // What a read-write qemu-io holds on a qcow2 image's file (/proc/locks): 100, 101,
        // 103 (consistent read, write, resize) and 201, 203 (write, resize unshared).
        let held: Vec<u64> =
            Permission::ALL.iter().filter(|&&p| holds(p, false)).map(|p| p.held_byte()).collect();
        let unshared: Vec<u64> =
            Permission::ALL.iter().filter(|&&p| !shares(p)).map(|p| p.unshared_byte()).collect();
        assert_eq!(held, [100, 101, 103]);
        assert_eq!(unshared, [201, 203]);
        let read_only: Vec<u64> =
            Permission::ALL.iter().filter(|&&p| holds(p, true)).map(|p| p.held_byte()).collect();
        assert_eq!(read_only, [100]);
    }
}
