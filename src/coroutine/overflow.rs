//! Reports a coroutine stack overflow by name before the process dies of it.
//!
//! Every coroutine stack has a guard page below it (a guard region, or a `PROT_NONE` page where the
//! kernel has no guard regions: see `guard.rs`), so an overflow faults with `SIGSEGV` instead of
//! writing over the stack below, which in a reservation is another coroutine's. The handler
//! installed here runs on the thread's alternate signal stack (Rust's runtime gives every thread
//! it starts one), checks whether the faulting address lies in the guard page of the coroutine
//! running on this thread, and if so prints which coroutine overflowed. It then restores the
//! default action and returns, so the faulting instruction runs again and the process dies by the
//! signal, as it would have without us. A fault anywhere else goes to the handler that was
//! installed before ours (normally Rust's own, which reports the overflow of a thread's main
//! stack).

use std::fmt::{self, Write};
use std::sync::OnceLock;

use super::current;
use crate::sys;

/// The dispositions of `SIGSEGV` and `SIGBUS` before ours, in that order.
static PREVIOUS: OnceLock<[libc::sigaction; 2]> = OnceLock::new();

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];

/// Installs the overflow reporter once per process. Called before the first stack is taken.
pub(crate) fn install_once() {
    PREVIOUS.get_or_init(|| {
        SIGNALS.map(|signal| {
            sys::install_fault_handler(signal, on_fault).unwrap_or_else(|error| {
                panic!("aiocoro: cannot install the {signal} handler: {error}")
            })
        })
    });
}

extern "C" fn on_fault(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let address = unsafe { (*info).si_addr() } as usize;
    let slot = current::slot();
    // SAFETY: a non-null current slot is alive while its coroutine runs, and this handler runs
    // on the coroutine's thread, interrupting it; the fields read are plain `Cell`s that the
    // interrupted code never leaves half-written.
    if let Some(slot) = unsafe { slot.as_ref() } {
        let guard = slot.guard_range();
        if guard.contains(&address) {
            let (low, high) = (guard.start, guard.end);
            let mut message = MessageBuffer::new();
            let _ = write!(
                message,
                "\naiocoro: stack overflow in {}: fault at {address:#x} in the guard page \
                 {low:#x}..{high:#x} below its stack\n",
                slot.describe()
            );
            sys::write_stderr(message.as_bytes());
            restore_default(signal);
            return;
        }
    }
    chain(signal, info, context);
}

/// Hands a fault that is not a coroutine stack overflow to the handler installed before ours.
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let Some(index) = SIGNALS.iter().position(|&s| s == signal) else {
        return;
    };
    let Some(previous) = PREVIOUS.get().map(|all| &all[index]) else {
        restore_default(signal);
        return;
    };
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Let the faulting instruction run again under the old disposition.
        sys::restore_fault_handler(signal, previous);
    } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the stored value is a three-argument handler, which was
        // installed by this process and is called exactly as the kernel would call it.
        let handler: sys::FaultHandler = unsafe { std::mem::transmute(handler) };
        handler(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the stored value is a one-argument handler.
        let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        handler(signal);
    }
}

fn restore_default(signal: libc::c_int) {
    // SAFETY: all-zeroes is SIG_DFL with an empty mask and no flags.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    sys::restore_fault_handler(signal, &default);
}

/// A fixed buffer that `write!` can fill without allocating (allocation is not
/// async-signal-safe). Text past its end is cut off.
struct MessageBuffer {
    bytes: [u8; 512],
    len: usize,
}

impl MessageBuffer {
    fn new() -> Self {
        MessageBuffer { bytes: [0; 512], len: 0 }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for MessageBuffer {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
