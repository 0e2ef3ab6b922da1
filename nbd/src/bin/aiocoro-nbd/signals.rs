//! SIGINT and SIGTERM as an orderly shutdown, SIGUSR1 as a request for the live counts:
//! blocked in every thread of the process and taken by one thread with `sigwait`.

use std::io;

/// SIGINT, SIGTERM and SIGUSR1, blocked in the calling thread and in every thread it starts
/// later.
pub(crate) struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread; call it before starting any thread,
    /// so that every thread inherits the mask and the signals wait for [`Self::watch`].
    ///
    /// # Errors
    ///
    /// If the signal mask cannot be changed.
    pub(crate) fn block() -> io::Result<TerminationSignals> {
        // SAFETY: sigset_t is plain data, and sigemptyset initialises it before any use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGUSR1);
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let error = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error));
        }
        Ok(TerminationSignals { set })
    }

    /// Starts a thread that calls `on_report` on every SIGUSR1 and `on_terminate` (once) on
    /// the first SIGINT or SIGTERM, then ends. It is not joined: it ends with the process.
    ///
    /// # Errors
    ///
    /// If the thread cannot be started.
    pub(crate) fn watch(
        self,
        on_report: impl Fn() + Send + 'static,
        on_terminate: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        let set = self.set;
        std::thread::Builder::new().name("nbd-signals".into()).spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is an initialised sigset_t and `signal` a valid out pointer.
            while unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                if signal != libc::SIGUSR1 {
                    on_terminate();
                    return;
                }
                on_report();
            }
        })?;
        Ok(())
    }
}
