//! Where each thread was last seen: running on a CPU, or blocked in its context's poll. A
//! `CoMutex` or `CoRwLock` locker reads its holder's entry to tell whether spinning can pay
//! (see `adaptive_spin`).
//!
//! Threads are named by the ids `CoMutex` hands out (`comutex::thread_id`). Entries live in a
//! small fixed table indexed by the id modulo its size, each tagged with its owner's id, so a
//! reader that finds another thread's tag knows nothing (and spins as if the holder ran). The
//! information is advisory: the thread may have moved or blocked since it wrote it. It only
//! steers how long a locker spins, never what the lock does.

#[cfg(not(aiocoro_loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// How many threads can be tracked without sharing an entry.
#[cfg(not(aiocoro_loom))]
const ENTRIES: usize = 256;

/// `(thread id << 32) | (cpu + 1)` while the thread runs, `(thread id << 32)` while it is
/// blocked in a poll; 0 if no thread wrote it yet.
#[cfg(not(aiocoro_loom))]
static TABLE: [Entry; ENTRIES] = [const { Entry(AtomicU64::new(0)) }; ENTRIES];

/// One thread's entry, alone in a 128-byte block: each thread writes its own around every
/// blocking poll, which would otherwise evict its neighbours' entries from the CPUs of the
/// threads that write those (two cache lines: CPUs that fetch lines in pairs would still
/// share them).
#[cfg(not(aiocoro_loom))]
#[repr(align(128))]
struct Entry(AtomicU64);

/// What a thread's entry says about it (nothing under loom, where spinning never looks).
#[cfg(not(aiocoro_loom))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Nothing known (not recorded, or the entry is another thread's).
    Unknown,
    /// Blocked in its context's poll: it runs no coroutine until something wakes it.
    Blocked,
    /// Running; last seen on this CPU.
    OnCpu(u32),
}

#[cfg(not(aiocoro_loom))]
fn entry(thread: u32) -> &'static AtomicU64 {
    &TABLE[thread as usize % ENTRIES].0
}

/// The CPU the calling thread runs on (as of the call).
#[cfg(not(aiocoro_loom))]
pub(crate) fn current_cpu() -> u32 {
    // SAFETY: `sched_getcpu` has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(u32::MAX - 1)
}

/// The calling thread's id, as `CoMutex` names threads (never 0).
#[cfg(not(aiocoro_loom))]
#[inline]
pub(crate) fn this_thread() -> u32 {
    super::comutex::thread_id()
}

/// Records that the calling thread is about to block in its poll.
#[inline]
pub(crate) fn blocking() {
    #[cfg(not(aiocoro_loom))]
    {
        let me = this_thread();
        entry(me).store(u64::from(me) << 32, Ordering::Relaxed);
    }
}

/// Records that the calling thread runs, and on which CPU.
#[inline]
pub(crate) fn running() {
    #[cfg(not(aiocoro_loom))]
    {
        let me = this_thread();
        let seen = (u64::from(me) << 32) | u64::from(current_cpu() + 1);
        entry(me).store(seen, Ordering::Relaxed);
    }
}

/// What `thread`'s entry says.
#[cfg(not(aiocoro_loom))]
#[inline]
pub(crate) fn seen(thread: u32) -> Seen {
    if thread == 0 {
        return Seen::Unknown;
    }
    let value = entry(thread).load(Ordering::Relaxed);
    if (value >> 32) as u32 != thread {
        return Seen::Unknown;
    }
    match value as u32 {
        0 => Seen::Blocked,
        cpu => Seen::OnCpu(cpu - 1),
    }
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::{Seen, seen, this_thread};
    use crate::aio::IoThread;

    #[test]
    fn a_context_thread_is_seen_blocked_in_its_poll_and_on_a_cpu_while_it_runs() {
        let iothread = IoThread::spawn("presence").unwrap();
        let (tx, rx) = mpsc::channel();
        iothread
            .handle()
            .spawn(move |_co| tx.send((this_thread(), seen(this_thread()))).unwrap())
            .unwrap();
        let (thread, while_running) = rx.recv().unwrap();
        assert!(matches!(while_running, Seen::OnCpu(_)), "running: {while_running:?}");
        // With nothing to do, the thread ends its busy polling and blocks.
        while seen(thread) != Seen::Blocked {
            std::thread::sleep(Duration::from_millis(1));
        }
        iothread.stop();
        assert_eq!(seen(0), Seen::Unknown, "0 names no thread (a free CoMutex)");
    }
}
