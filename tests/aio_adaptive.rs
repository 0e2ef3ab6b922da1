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
    ctx.set_adaptive_polling(Some(AdaptivePolling::new(100_000_000)));
    // 2 ms waits grow the window 4 us, 8 us, ... until it covers them (4.096 ms).
    for _ in 0..14 {
        block_for(&ctx, Duration::from_millis(2));
    }
    let window = ctx.polling_window_ns();
    assert!(window >= 2_000_000, "the window covers a 2 ms wait: {window}");
    // A wait inside the window is caught by busy polling and leaves the window alone.
    block_for(&ctx, Duration::from_millis(1));
    assert_eq!(ctx.polling_window_ns(), window);
}
