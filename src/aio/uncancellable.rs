//! Sections that either do not start or run to their end: [`Co::run_uncancellable`].

use super::context::with_current_brief;
use crate::coroutine::Co;

impl Co {
    /// Runs `f` to its end, its waits shielded from this coroutine's cancellation, unless the
    /// coroutine's context is already cancelling its coroutines: then `f` does not start, and
    /// the coroutine is cancelled here, as at a wait that starts then (see
    /// [`AioContext`](super::AioContext)'s shutdown).
    ///
    /// For sections that must not stop half-way, such as a storage request between its data
    /// write and the metadata update that makes the data visible (QEMU runs every request to
    /// completion; `aiocoro-block` runs each of its requests this way). A context's shutdown
    /// waits for a section that has started (also one that reschedules itself until some
    /// other thread is done), and reaches a coroutine that runs one section after another at
    /// the start of the next. Keep sections sure to end: a section that waits for what only a
    /// cancelled coroutine of its context would bring holds the shutdown (an
    /// [`IoThread::stop`](super::IoThread::stop)) up for good, and a shutdown run by a
    /// coroutine of the context itself cannot wait for them, and leaves them suspended for
    /// good (step 3 of the shutdown).
    ///
    /// ```
    /// use aiocoro::aio::IoThread;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let thread = IoThread::spawn("requests").unwrap();
    /// let (started, finished) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    /// let (s, f) = (started.clone(), finished.clone());
    /// thread.handle().spawn(move |co| loop {
    ///     co.run_uncancellable(|| {
    ///         s.fetch_add(1, Ordering::SeqCst);
    ///         co.sleep(Duration::from_millis(5)); // a request's I/O
    ///         f.fetch_add(1, Ordering::SeqCst);
    ///     });
    /// }).unwrap();
    /// std::thread::sleep(Duration::from_millis(20));
    /// // Lets the section in progress end, then cancels the coroutine before the next.
    /// thread.stop();
    /// assert_eq!(started.load(Ordering::SeqCst), finished.load(Ordering::SeqCst));
    /// ```
    pub fn run_uncancellable<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(aiocoro_loom)]
        if self.is_model() {
            return f();
        }
        if self.is_shielded() {
            // A section nested in another (a node's request inside a backend's, a child's
            // inside its parent's): the outer one is counted and shielded, and cannot be
            // cancelled in the middle.
            return f();
        }
        let (section, cancelling) = Section::begin();
        if cancelling && self.may_be_cancelled() {
            drop(section);
            self.unwind_cancelled();
        }
        self.shielded(f)
    }
}

/// A section in progress, counted in its thread's context (if any) until it ends, also by
/// unwinding.
struct Section {
    /// The number of the context that counts it.
    context: Option<u64>,
}

impl Section {
    /// Counts a section in this thread's context; returns it and whether the context is
    /// cancelling its coroutines (one look at the context for both).
    fn begin() -> (Section, bool) {
        // SAFETY: the count update runs no other code.
        let counted = unsafe {
            with_current_brief(|local| {
                local.sections.set(local.sections.get() + 1);
                (local.shared.id, local.is_cancelling())
            })
        };
        match counted {
            Some((context, cancelling)) => (Section { context: Some(context) }, cancelling),
            None => (Section { context: None }, false),
        }
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        let Some(context) = self.context else { return };
        // SAFETY: the count update runs no other code.
        unsafe {
            with_current_brief(|local| {
                if local.shared.id == context {
                    local.sections.set(local.sections.get() - 1);
                }
            })
        };
    }
}
