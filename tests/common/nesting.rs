//! Nested coroutines for the pool tests.

use aiocoro::coroutine::Coroutine;

/// Enters a chain of `depth - level` coroutines, each from inside the previous one, so that
/// `depth - level` stacks are in use at the deepest point.
pub(crate) fn nest(level: u32, depth: u32) {
    if level < depth {
        Coroutine::new(move |_co| nest(level + 1, depth)).enter();
    }
}
