//! The descriptor limit: each connection holds two descriptors (its stream and the handle
//! that shuts it down), so a thousand clients need more than the usual soft limit of 1024.

/// Raises the soft limit on open descriptors to the hard limit; if that fails the server
/// runs with the old limit. Past the limit, accepting pauses until connections end (see the
/// accept loop), and a client the server cannot start (no descriptor for its shutdown
/// handle) is dropped.
pub(crate) fn raise_limit() {
    // SAFETY: rlimit is plain data, valid when zeroed.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a valid out pointer for RLIMIT_NOFILE.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is an initialised rlimit within the hard limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}
