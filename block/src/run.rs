//! Running block code from outside a coroutine.

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;

/// Runs `body` in a coroutine of this thread's context (made for the call if the thread has
/// none) and returns its result once it ends; the context runs meanwhile
/// ([`AioContext::run`] on the thread's context). For tools and
/// tests; servers spawn their coroutines on their IoThreads instead.
///
/// ```
/// let sum = aiocoro_block::run_in_coroutine(|co| {
///     co.reschedule(); // other coroutines of the context may run here
///     2 + 2
/// })?;
/// assert_eq!(sum, 4);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// If the thread has no context and one cannot be made.
///
/// # Panics
///
/// Inside a coroutine (the context could not run while the caller waits), or as `body`
/// panics.
pub fn run_in_coroutine<R: 'static>(body: impl FnOnce(&Co) -> R + 'static) -> std::io::Result<R> {
    assert!(
        !aiocoro::coroutine::in_coroutine(),
        "aiocoro-block: run_in_coroutine called inside a coroutine; call `body` directly there"
    );
    let context = match AioContext::current() {
        Some(context) => context,
        None => AioContext::new()?,
    };
    Ok(context.run(body))
}

/// Runs `body` in a coroutine to its end from code that has no `Co` and cannot wait for one
/// (a `Drop`), and returns its result.
///
/// Outside any coroutine, `body` runs on this thread as [`run_in_coroutine`] runs it: in
/// this thread's context (a nested poll if the context is polling now: its other bottom
/// halves, handlers and coroutines may run meanwhile, as in QEMU's `AIO_WAIT_WHILE`), or in
/// one made for the call. Inside a coroutine, which cannot yield without its `Co`, and
/// while the thread unwinds from a panic (a second panic would abort), `body` runs on a
/// helper thread with a context of its own while this thread blocks: this thread's
/// context runs nothing meanwhile, so `body` must not need it (no request of `body` may
/// wait for a coroutine or lock of this context).
///
/// # Errors
///
/// If no context can be made, the helper thread cannot start, or `body` panics (the panic
/// is turned into the error: a drop must not unwind).
pub(crate) fn run_to_end<R: Send + 'static>(
    body: impl FnOnce(&Co) -> R + Send + 'static,
) -> std::io::Result<R> {
    let run = move || {
        let caught =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_in_coroutine(body)));
        caught.unwrap_or_else(|_| Err(std::io::Error::other("the coroutine panicked")))
    };
    if !aiocoro::coroutine::in_coroutine() && !std::thread::panicking() {
        return run();
    }
    let helper = std::thread::Builder::new().name("aiocoro-block-close".into()).spawn(run)?;
    helper.join().unwrap_or_else(|_| Err(std::io::Error::other("the helper thread panicked")))
}
