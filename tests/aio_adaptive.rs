//! Adaptive busy polling grows its window while waits are short and shrinks it after a long one.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use aiocoro::aio::{AdaptivePolling, AioContext};

/// Blocks the context once, until a timer `delay` from now fires.
fn block_for(ctx: &AioContext, delay: Duration) {
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let timer = ctx.new_timer(move || f.set(true));
    timer.arm_after(delay);
    while !fired.get() {
        ctx.poll(true);
    }
}

#[test]
fn the_window_follows_how_long_polls_wait() {
    let ctx = AioContext::new().unwrap();
    assert_eq!(ctx.polling_window_ns(), 0, "off by default");
    const MAX: u64 = 100_000_000;
    ctx.set_adaptive_polling(Some(AdaptivePolling::new(MAX)));
    // Short waits (far below the maximum) grow the window: 0 -> 4 us -> 8 us -> ...
    let mut previous = 0;
    for _ in 0..3 {
        block_for(&ctx, Duration::from_micros(200));
        let window = ctx.polling_window_ns();
        assert!(window > previous, "the window grew: {previous} -> {window}");
        previous = window;
    }
    // A wait longer than the maximum shrinks it.
    block_for(&ctx, Duration::from_millis(150));
    assert!(ctx.polling_window_ns() < previous, "{} !< {previous}", ctx.polling_window_ns());
    ctx.set_adaptive_polling(None);
    assert_eq!(ctx.polling_window_ns(), 0);
}

#[test]
fn the_window_stops_growing_once_it_covers_the_waits() {
    let ctx = AioContext::new().unwrap();
    // Growing 16-fold, so that the window ends up far past the waits (a wait inside it stays
    // inside even when a loaded machine delays this thread by a few milliseconds), and far
    // below the maximum (so that growing on is seen).
    ctx.set_adaptive_polling(Some(AdaptivePolling::new(1_000_000_000).grow(16)));
    // 2 ms waits grow the window 4 us, 64 us, 1.024 ms, 16.384 ms: then it covers them.
    for _ in 0..4 {
        block_for(&ctx, Duration::from_millis(2));
    }
    let window = ctx.polling_window_ns();
    assert!(window >= 2_000_000, "the window covers a 2 ms wait: {window}");
    // Waits inside the window are caught by busy polling and leave the window alone.
    for wait in [Duration::from_millis(2), Duration::from_millis(1)] {
        block_for(&ctx, wait);
        assert_eq!(ctx.polling_window_ns(), window, "after a wait of {wait:?}");
    }
}
