//! The loom stand-in for a suspended coroutine: in a model, a "coroutine" is a loom thread
//! with a [`Co::model`](crate::coroutine::Co) token, and suspending it parks the thread until a
//! waker unparks it. Lock code (`CoMutex`, `CoQueue`, ...) runs unchanged on top.

use crate::loom::{Condvar, Mutex};

/// One model suspension: a flag set by the waker, and the condition variable it waits on.
#[derive(Default)]
pub(crate) struct ModelParker {
    woken: Mutex<bool>,
    changed: Condvar,
}

impl ModelParker {
    /// Blocks the calling model thread until [`ModelParker::unpark`].
    pub(crate) fn park(&self) {
        let mut woken = self.woken.lock().unwrap();
        while !*woken {
            woken = self.changed.wait(woken).unwrap();
        }
    }

    /// Wakes the parked (or about to park) model thread.
    pub(crate) fn unpark(&self) {
        *self.woken.lock().unwrap() = true;
        self.changed.notify_one();
    }
}
