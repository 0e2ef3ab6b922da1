//! Socket activation: a parent (systemd, libnbd's `[ aiocoro-nbd ... ]`, `nbdcopy`) binds the
//! listening socket, passes it as descriptor 3, and says so in `LISTEN_PID` (our process id)
//! and `LISTEN_FDS` (how many descriptors, from 3 on).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Whether this process was socket-activated: `LISTEN_PID` names it and `LISTEN_FDS` is set.
pub(crate) fn requested() -> bool {
    std::env::var("LISTEN_PID").is_ok_and(|pid| pid.trim() == std::process::id().to_string())
        && std::env::var_os("LISTEN_FDS").is_some()
}

/// Takes the one listening socket passed to this process (call only when [`requested`]),
/// made close-on-exec and blocking (the accept thread blocks in `accept`).
///
/// # Errors
///
/// `LISTEN_FDS` is not `1` (one export, one socket), or descriptor 3 is not a socket.
pub(crate) fn take_listener() -> io::Result<OwnedFd> {
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    if count.trim() != "1" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: LISTEN_FDS={count}, but one listening socket is served"),
        ));
    }
    // SAFETY: fcntl on a descriptor number is sound whatever it refers to; an unused number
    // only fails with EBADF.
    let flags = unsafe { libc::fcntl(FIRST_FD, libc::F_GETFD) };
    if flags < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("socket activation: fd 3: {error}")));
    }
    // SAFETY: by the activation protocol, descriptor 3 was handed to this process for it to
    // own, and nothing else in this process has taken it (this runs once, before any thread).
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST_FD) };
    // SAFETY: `fd` is open; setting its descriptor flags touches nothing else.
    unsafe { libc::fcntl(FIRST_FD, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(fd)
}
