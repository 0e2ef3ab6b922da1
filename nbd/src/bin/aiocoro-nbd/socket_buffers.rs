//! Large send and receive buffers on accepted connections, so that a window of pipelined
//! requests and replies (32 requests of up to 32 MiB) flows without waiting on small buffers.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The buffer size asked for in each direction.
const WANTED: libc::c_int = 4 << 20;

/// Raises the send and receive buffers of `socket` to [`WANTED`] bytes. It first tries the
/// `FORCE` options (which pass the system maximum, for a privileged server), then the plain
/// ones (capped by `net.core.[rw]mem_max`); a buffer already as large, or one that cannot be
/// raised, stays as it is (for TCP, the kernel's autotuning then sizes it).
pub(crate) fn enlarge(socket: BorrowedFd<'_>) {
    for (plain, forced) in
        [(libc::SO_SNDBUF, libc::SO_SNDBUFFORCE), (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE)]
    {
        if size(socket, plain).is_some_and(|size| size >= WANTED) {
            continue;
        }
        if set(socket, forced, WANTED) {
            continue;
        }
        // Capped by the system maximum, the plain option could shrink a buffer: only grow.
        let before = size(socket, plain);
        if set(socket, plain, WANTED)
            && let Some(before) = before
            && size(socket, plain) < Some(before)
        {
            // The kernel doubles the value it is given: half of what it reported restores it.
            set(socket, plain, before / 2);
        }
    }
}

/// The buffer size `option` reports.
fn size(socket: BorrowedFd<'_>, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `length` are valid out pointers of the sizes given.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut length,
        )
    };
    (result == 0).then_some(value)
}

/// Sets `option` to `value`; whether the kernel took it.
fn set(socket: BorrowedFd<'_>, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: the value pointer and length describe one c_int that outlives the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    result == 0
}
