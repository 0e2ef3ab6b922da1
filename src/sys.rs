//! Every system call the runtime makes, in one place.
//!
//! Each call goes through `syscall!` (below), which turns the C convention (`-1` and `errno`)
//! into an [`io::Error`]. Callers above this module never see a raw return code.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

/// Makes `len` bytes at `addr` inaccessible again (`PROT_NONE`).
///
/// # Safety
///
/// `addr..addr + len` must lie inside a mapping this process owns that no live reference
/// points into.
pub(crate) unsafe fn make_inaccessible(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours and unreferenced.
    syscall!(mprotect(addr.as_ptr().cast(), len, libc::PROT_NONE)).map(drop)
}

/// `madvise` advice of Linux 6.13+: install guard regions (not in the `libc` crate yet).
const MADV_GUARD_INSTALL: libc::c_int = 102;

/// Turns `len` bytes at `addr` into a guard region (Linux 6.13+ `MADV_GUARD_INSTALL`): any access
/// faults with `SIGSEGV`, like a `PROT_NONE` page, but the mapping is not split in two. A kernel
/// without guard regions (or a mapping that cannot have them, e.g. a locked one) answers
/// `EINVAL`.
///
/// # Safety
///
/// `addr..addr + len` must lie inside a private anonymous mapping this process owns, and nothing
/// may rely on reading or writing it any more (its contents are discarded).
pub(crate) unsafe fn install_guard(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours and that its contents are not needed.
    syscall!(madvise(addr.as_ptr().cast(), len, MADV_GUARD_INSTALL)).map(drop)
}

/// Gives the pages of `len` bytes at `addr` back to the kernel (`MADV_DONTNEED`): the range stays
/// mapped, guard regions in it stay, and the next touch of a page gets a fresh zeroed one.
///
/// # Safety
///
/// `addr..addr + len` must lie inside a private anonymous mapping this process owns whose
/// contents nothing needs any more.
pub(crate) unsafe fn discard(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is ours and that its contents are not needed.
    syscall!(madvise(addr.as_ptr().cast(), len, libc::MADV_DONTNEED)).map(drop)
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

/// Creates an epoll instance (close-on-exec).
pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes only flags.
    let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds, changes or removes (`op`) the interest of `epoll` in `fd`, with `token` as its data.
pub(crate) fn epoll_ctl(
    epoll: BorrowedFd<'_>,
    op: libc::c_int,
    fd: RawFd,
    events: u32,
    token: u64,
) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: `event` is a live epoll_event; the kernel validates both descriptors.
    syscall!(epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event)).map(drop)
}

/// Waits on `epoll` for at most `timeout` (`None`: no limit) and fills `events`; returns how
/// many are ready. An interrupted wait returns 0.
pub(crate) fn epoll_wait(
    epoll: BorrowedFd<'_>,
    events: &mut [libc::epoll_event],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let capacity = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    let result = match timeout {
        // Nanosecond timeouts need epoll_pwait2 (Linux 5.11); older kernels fall back to
        // epoll_wait with the timeout rounded up to whole milliseconds.
        Some(timeout) if EPOLL_PWAIT2.load(Ordering::Relaxed) => {
            let spec = libc::timespec {
                tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: timeout.subsec_nanos().into(),
            };
            // SAFETY: the buffer holds `capacity` events, `spec` is a live timespec, and a
            // null sigmask means "no change".
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    capacity,
                    &spec as *const libc::timespec,
                    ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if ret == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                EPOLL_PWAIT2.store(false, Ordering::Relaxed);
                return epoll_wait(epoll, events, Some(timeout));
            }
            if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret as libc::c_int) }
        }
        _ => {
            let millis = timeout.map_or(-1, |t| {
                let rounded_up = t.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(rounded_up).unwrap_or(libc::c_int::MAX)
            });
            // SAFETY: the buffer holds `capacity` events.
            syscall!(epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), capacity, millis))
        }
    };
    match result {
        Ok(ready) => Ok(ready as usize),
        Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(error) => Err(error),
    }
}

/// Whether epoll_pwait2 is worth trying (cleared the first time the kernel lacks it).
static EPOLL_PWAIT2: AtomicBool = AtomicBool::new(true);

/// How many times the calling thread was preempted (involuntary context switches) so far.
pub(crate) fn involuntary_switches() -> u64 {
    // SAFETY: all-zero bytes are a valid `rusage` (integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`; RUSAGE_THREAD reads this thread's counts.
    let result = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    debug_assert_eq!(result, 0, "aiocoro: getrusage(RUSAGE_THREAD) failed");
    u64::try_from(usage.ru_nivcsw).unwrap_or(0)
}

/// Creates a non-blocking, close-on-exec eventfd with a zero counter.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes only an initial value and flags.
    let fd = syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter, waking whoever polls it. A full counter (EAGAIN) is fine:
/// the eventfd is readable then anyway.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: the pointer and length describe the live `one`.
    match syscall!(write(fd.as_raw_fd(), (&one as *const u64).cast(), 8)) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(error) => Err(error),
    }
}

/// Reads and resets an eventfd's counter; 0 when it was not signalled.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: the pointer and length describe the live `value`.
    match syscall!(read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8)) {
        Ok(_) => Ok(value),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(error) => Err(error),
    }
}

/// Turns a file offset into an `off_t`; offsets past `i64::MAX` are `EINVAL`, as the kernel says.
fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Turns a number of buffers into an `iovcnt`; more than fit are `EINVAL`, as the kernel says.
fn iov_count(buffers: usize) -> io::Result<libc::c_int> {
    libc::c_int::try_from(buffers).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Reads from `fd` at `offset` into `bufs`, in order (`preadv(2)`); returns how many bytes were
/// read, which is short at the end of the file. Retries when interrupted by a signal.
pub(crate) fn preadv(
    fd: BorrowedFd<'_>,
    bufs: &mut [std::io::IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    let count = iov_count(bufs.len())?;
    let iov = bufs.as_mut_ptr().cast::<libc::iovec>().cast_const();
    retry_interrupted(|| {
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix; the array and every
        // buffer it names are live, exclusive borrows for the whole call, so the kernel may
        // write into them.
        syscall!(preadv(fd.as_raw_fd(), iov, count, offset)).map(|read| read as usize)
    })
}

/// Writes `bufs`, in order, to `fd` at `offset` (`pwritev(2)`); returns how many bytes were
/// written. Retries when interrupted by a signal.
pub(crate) fn pwritev(
    fd: BorrowedFd<'_>,
    bufs: &[std::io::IoSlice<'_>],
    offset: u64,
) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    let count = iov_count(bufs.len())?;
    let iov = bufs.as_ptr().cast::<libc::iovec>();
    retry_interrupted(|| {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the array and every buffer
        // it names are live borrows for the whole call, and the kernel only reads them.
        syscall!(pwritev(fd.as_raw_fd(), iov, count, offset)).map(|written| written as usize)
    })
}

/// Flushes `fd`'s data and metadata to stable storage (`fsync(2)`), retrying when interrupted.
pub(crate) fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry_interrupted(|| {
        // SAFETY: fsync takes only a descriptor, which the kernel validates.
        syscall!(fsync(fd.as_raw_fd())).map(drop)
    })
}

/// Flushes `fd`'s data (and only the metadata needed to read it back) to stable storage
/// (`fdatasync(2)`), retrying when interrupted.
pub(crate) fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry_interrupted(|| {
        // SAFETY: fdatasync takes only a descriptor, which the kernel validates.
        syscall!(fdatasync(fd.as_raw_fd())).map(drop)
    })
}

// io_uring. The `io-uring` crate makes these system calls (io_uring_setup, io_uring_enter,
// io_uring_register) itself and reports them as `io::Error`s; the wrappers below keep every use
// of them in this module all the same.

/// Creates an io_uring instance with `entries` submission slots (and twice as many completion
/// slots).
pub(crate) fn uring_new(entries: u32) -> io::Result<io_uring::IoUring> {
    // Cooperative task running (Linux 5.19): completions are posted when this thread next
    // enters the kernel (it does, at every poll) instead of interrupting it, and the ring's
    // task-run flag says when some wait to be posted (what busy polling looks at); older
    // kernels refuse the flags with EINVAL and get a plain ring.
    match io_uring::IoUring::builder().setup_coop_taskrun().setup_taskrun_flag().build(entries) {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => io_uring::IoUring::new(entries),
        ring => ring,
    }
}

/// Makes the kernel signal `eventfd` whenever it posts a completion to `ring`.
pub(crate) fn uring_register_eventfd(
    ring: &io_uring::IoUring,
    eventfd: BorrowedFd<'_>,
) -> io::Result<()> {
    ring.submitter().register_eventfd(eventfd.as_raw_fd())
}

/// Hands the queued submissions of `ring` to the kernel and, with `want > 0`, waits until at
/// least `want` completions are in its completion queue (`io_uring_enter(2)`). Returns how many
/// submissions the kernel took.
pub(crate) fn uring_enter(ring: &io_uring::IoUring, want: usize) -> io::Result<usize> {
    ring.submit_and_wait(want)
}

/// Whether a read or write at an offset of `fd`, done a second time, has the same effect as
/// once: `fd` is a regular file or a block device, not opened with `O_APPEND` (`fstat(2)`,
/// `fcntl(2)`).
pub(crate) fn redoable_at_offset(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `struct stat` to the valid, writable place it is given.
    syscall!(fstat(fd.as_raw_fd(), stat.as_mut_ptr()))?;
    // SAFETY: fstat succeeded, so it filled `stat`.
    let mode = unsafe { stat.assume_init() }.st_mode & libc::S_IFMT;
    if mode != libc::S_IFREG && mode != libc::S_IFBLK {
        return Ok(false);
    }
    // SAFETY: F_GETFL takes only a descriptor, which the kernel validates.
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    Ok(flags & libc::O_APPEND == 0)
}

/// Runs `call` again for as long as it fails with `EINTR`.
fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sleeps while `word` holds `expected` (`FUTEX_WAIT_PRIVATE`). Returns when woken, when the
/// value differs, or spuriously; callers re-check their condition.
#[cfg(not(aiocoro_loom))]
pub(crate) fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32) {
    // SAFETY: the address is a live, aligned u32 for the whole call; a null timeout waits
    // without limit. EAGAIN (value changed), EINTR and wake-ups all just return.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ptr::null::<libc::timespec>(),
        )
    };
}

/// Wakes one thread sleeping in [`futex_wait`] on `word` (`FUTEX_WAKE_PRIVATE`).
#[cfg(not(aiocoro_loom))]
pub(crate) fn futex_wake_one(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: the address is a live, aligned u32; waking touches no memory of ours.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// `membarrier(2)` commands, from the kernel's `uapi/linux/membarrier.h` (spelled out here so
/// as not to depend on a `libc` recent enough to export them).
#[cfg(not(aiocoro_loom))]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
#[cfg(not(aiocoro_loom))]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Registers this process for [`membarrier`] (`MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`,
/// Linux 4.14). Fails on older kernels and where a seccomp filter forbids the call.
#[cfg(not(aiocoro_loom))]
pub(crate) fn membarrier_register() -> io::Result<()> {
    // SAFETY: the command takes no pointer; flags and cpu id are 0.
    syscall!(syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0))
        .map(drop)
}

/// Makes every CPU that runs a thread of this process execute a full memory barrier before it
/// returns (`MEMBARRIER_CMD_PRIVATE_EXPEDITED`). Needs [`membarrier_register`] first.
#[cfg(not(aiocoro_loom))]
pub(crate) fn membarrier() -> io::Result<()> {
    // SAFETY: the command takes no pointer; flags and cpu id are 0.
    syscall!(syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)).map(drop)
}
