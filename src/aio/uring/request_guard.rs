//! The guard of one ring request, owned by the coroutine frame that borrows the request's
//! memory: the only way a request gets onto a ring.

use std::rc::Rc;

use super::ring::{Request, Ring};
use crate::aio::arena::Key;
use crate::coroutine::Co;

/// A request staged or in the kernel, owned by the coroutine frame that borrows its memory. It
/// must be finished; dropping it unfinished (an unwinding) takes a staged request out of the
/// queue, or cancels the request in the kernel that covers it and blocks until the kernel is
/// done with it (see the invariant on the ring's in-flight table).
pub(super) struct RequestGuard {
    ring: Rc<Ring>,
    key: Key,
    /// The completion was taken; nothing is left in the kernel.
    finished: bool,
}

impl RequestGuard {
    /// Hands `request` to `ring` and waits until it completes; returns its result.
    ///
    /// # Safety
    ///
    /// Everything `request` names (buffers, iovec arrays) must stay valid until this call
    /// returns or unwinds past.
    pub(super) unsafe fn run(ring: &Rc<Ring>, co: &Co, request: Request) -> i32 {
        // SAFETY: forwarded to our caller: the guard is finished below, or dropped while this
        // call unwinds.
        unsafe { RequestGuard::start(ring, co, request) }.finish(co)
    }

    /// Stages `request` on `ring` (waiting for room first); the returned guard waits for it.
    /// Submits what is staged once a batch is.
    ///
    /// # Safety
    ///
    /// Everything `request` names must stay valid until the returned guard has finished or
    /// been dropped.
    pub(super) unsafe fn start(ring: &Rc<Ring>, co: &Co, request: Request) -> RequestGuard {
        ring.wait_for_room(co);
        // SAFETY: the guard made right below, before anything else can run, keeps the request
        // in the table until it is done and taken, or cancelled; our caller keeps its memory
        // valid that long.
        let key = unsafe { ring.stage(request) };
        let guard = RequestGuard { ring: ring.clone(), key, finished: false };
        ring.submit_if_batch_full();
        guard
    }

    /// Waits until the request completes; returns its result.
    pub(super) fn finish(mut self, co: &Co) -> i32 {
        loop {
            if let Some(result) = self.ring.take_result(self.key) {
                self.finished = true;
                return result;
            }
            let wait = co.prepare_wait();
            self.ring.wake_on_completion(self.key, wait.local_waker());
            wait.wait();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.ring.cancel_and_wait(self.key);
        }
    }
}
