//! Running block code from outside a coroutine.

use std::cell::RefCell;
use std::rc::Rc;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;

/// Runs `body` in a coroutine of this thread's context (made for the call if the thread has
/// none) and returns its result once it ends; the context runs meanwhile. For tools and
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
    let result = Rc::new(RefCell::new(None));
    let slot = result.clone();
    let coroutine = context.spawn(move |co| *slot.borrow_mut() = Some(body(co)));
    context.wait_while(|| !coroutine.is_ended());
    let value = result.borrow_mut().take();
    Ok(value.expect("the coroutine ended without a result (it panicked)"))
}
