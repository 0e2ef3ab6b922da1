//! Every system call the runtime makes, in one place.
//!
//! Each call goes through [`syscall!`], which turns the C convention (`-1` and `errno`) into an
//! [`io::Error`]. Callers above this module never see a raw return code.

use std::io;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

/// Calls a `libc` function and turns a return value of `-1` into the `errno` error.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each use of the macro states why its call is sound, on the line above it.
        let ret = unsafe { libc::$fn($($arg),*) };
        if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
    }};
}

/// The size of a virtual-memory page, read once from the kernel.
pub(crate) fn page_size() -> usize {
    static PAGE_SIZE: OnceLock<usize> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf reads a constant and touches no memory of ours.
        let size = syscall!(sysconf(libc::_SC_PAGESIZE)).expect("sysconf(_SC_PAGESIZE) failed");
        let size = usize::try_from(size).expect("page size does not fit in usize");
        assert!(size.is_power_of_two(), "page size {size} is not a power of two");
        size
    })
}

/// Reserves `len` bytes of private anonymous memory with no access rights (`PROT_NONE`).
pub(crate) fn map_inaccessible(len: usize) -> io::Result<NonNull<u8>> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: an anonymous mapping at an address of the kernel's choosing touches no existing
    // memory; the result is checked against MAP_FAILED below.
    let addr = unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_NONE, flags, -1, 0) };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Makes `len` bytes at `addr` readable and writable.
///
/// # Safety
///
/// `addr..addr + len` must lie inside a mapping this process owns and that no live reference
/// expects to stay inaccessible.
pub(crate) unsafe fn make_read_write(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the caller guarantees the range is ours and may become accessible.
    syscall!(mprotect(addr.as_ptr().cast(), len, prot)).map(drop)
}

/// Returns a mapping made by [`map_inaccessible`] to the kernel.
///
/// # Safety
///
/// `addr..addr + len` must be exactly one mapping made by [`map_inaccessible`] that nothing
/// references any more.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is one unreferenced mapping of ours.
    syscall!(munmap(addr.as_ptr().cast(), len)).map(drop)
}

/// A `SIGSEGV`/`SIGBUS` handler with the `SA_SIGINFO` signature.
pub(crate) type FaultHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `signal` (on the alternate signal stack) and returns the previous
/// disposition, so that the handler can chain to it.
pub(crate) fn install_fault_handler(
    signal: libc::c_int,
    handler: FaultHandler,
) -> io::Result<libc::sigaction> {
    // SAFETY: `sigaction` is plain old data; all-zeroes is a valid (empty) value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid, owned sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above, all-zeroes is a valid sigaction to receive the old disposition.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, initialised sigaction values; the handler has the
    // SA_SIGINFO signature that the flags announce.
    syscall!(sigaction(signal, &action, &mut previous))?;
    Ok(previous)
}

/// Puts `previous` (a disposition returned by [`install_fault_handler`]) back for `signal`.
/// Async-signal-safe.
pub(crate) fn restore_fault_handler(signal: libc::c_int, previous: &libc::sigaction) {
    // A failure leaves our handler in place; the caller then re-faults into it, which is
    // still a death by the same signal.
    // SAFETY: `previous` is a live sigaction the kernel gave us; a null old-action pointer is
    // allowed.
    let _ = syscall!(sigaction(signal, previous, ptr::null_mut()));
}

/// Writes `bytes` to standard error with one `write(2)`. Async-signal-safe; errors are ignored
/// because the only caller is a dying process reporting why.
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: the pointer and length describe the live slice `bytes`.
    let _ = syscall!(write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()));
}
