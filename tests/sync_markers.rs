//! Which types may cross or be shared between threads, pinned at compile time: a change to any
//! of these is a change to the soundness story (`docs/design.md`, rules 1 to 3) and must be
//! deliberate.

use aiocoro::aio::{
    AioContext, AioHandle, BhHandle, BottomHalf, LocalWaker, Sleeper, Timer, Waker,
};
use aiocoro::coroutine::{Co, Coroutine};
use aiocoro::sync::{
    CoMutex, CoMutexGuard, CoQueue, CoRwLock, CoRwLockReadGuard, CoRwLockWriteGuard, NoLock,
    NoLockGuard, Permit, SharedResource, SpinLock, SpinLockGuard, ThreadMutex, ThreadMutexGuard,
};
use static_assertions::{assert_impl_all, assert_not_impl_any};

// Locks shared between threads own data that may be sent.
assert_impl_all!(CoMutex<u32>: Send, Sync);
assert_impl_all!(ThreadMutex<u32>: Send, Sync);
assert_impl_all!(SpinLock<u32>: Send, Sync);
assert_impl_all!(CoRwLock<u32>: Send, Sync);
assert_impl_all!(CoQueue: Send, Sync);
assert_impl_all!(SharedResource: Send, Sync);
assert_impl_all!(Permit<'static>: Send, Sync);

// State private to one context may move with it, but not be shared.
assert_impl_all!(NoLock<u32>: Send);
assert_not_impl_any!(NoLock<u32>: Sync);

// A lock's data is only as shareable as the data.
assert_not_impl_any!(CoMutex<std::rc::Rc<u32>>: Send, Sync);
assert_not_impl_any!(CoRwLock<std::rc::Rc<u32>>: Send, Sync);
assert_impl_all!(CoRwLock<std::cell::Cell<u32>>: Send);
assert_not_impl_any!(CoRwLock<std::cell::Cell<u32>>: Sync);

// Guards stay with the coroutine or thread that took the lock.
assert_not_impl_any!(CoMutexGuard<'static, u32>: Send);
assert_not_impl_any!(ThreadMutexGuard<'static, u32>: Send);
assert_not_impl_any!(SpinLockGuard<'static, u32>: Send);
assert_not_impl_any!(NoLockGuard<'static, u32>: Send);
assert_not_impl_any!(CoRwLockReadGuard<'static, u32>: Send);
assert_not_impl_any!(CoRwLockWriteGuard<'static, u32>: Send);

// What other threads use to reach a context.
assert_impl_all!(AioHandle: Send, Sync);
assert_impl_all!(Waker: Send, Sync);
assert_impl_all!(BhHandle: Send, Sync);
assert_impl_all!(Sleeper: Send, Sync);

// What stays on the context's home thread.
assert_not_impl_any!(AioContext: Send);
assert_not_impl_any!(LocalWaker: Send);
assert_not_impl_any!(BottomHalf: Send);
assert_not_impl_any!(Timer: Send);

// Coroutines never migrate (rule 1), and `Co` never leaves its coroutine (rule 2).
assert_not_impl_any!(Coroutine: Send, Sync);
assert_not_impl_any!(Co: Send, Sync);

/// The assertions above are checked when this file compiles; this test only makes the file
/// show up in the test run.
#[test]
fn thread_safety_markers_hold() {
    // A value check as well, so the test is not empty: a lock built from `Send` data can
    // really move to another thread and back.
    let lock = CoRwLock::new(1u32);
    let lock = std::thread::spawn(move || {
        *lock.try_write().unwrap() += 1;
        lock
    })
    .join()
    .unwrap();
    assert_eq!(lock.into_inner(), 2);
}
