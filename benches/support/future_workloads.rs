//! The workloads of the Future bridge and join handles, measured by `benches/aio.rs`
//! (criterion) and `examples/coroutine_perf.rs` (a quick run). Each method runs `iterations`
//! operations on a [`Bridge`] set up once (threads, contexts, a tokio runtime), so that the
//! figures leave the set-up out.

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle as ThreadHandle;

use aiocoro::aio::{AioContext, IoThread};

/// What the workloads run on: this thread's context, an IoThread, a thread that completes
/// futures, and a tokio current-thread runtime.
pub(crate) struct Bridge {
    context: AioContext,
    iothread: IoThread,
    completer: Completer,
    runtime: tokio::runtime::Runtime,
}

impl Bridge {
    /// Sets it all up; this thread gets a context if it has none.
    pub(crate) fn new() -> Bridge {
        let context = AioContext::current()
            .unwrap_or_else(|| AioContext::new().expect("a context for the bench thread"));
        Bridge {
            context,
            iothread: IoThread::spawn("bridge-bench").expect("an IoThread"),
            completer: Completer::spawn(),
            runtime: tokio::runtime::Builder::new_current_thread().build().expect("a runtime"),
        }
    }

    /// `future/ready`: a coroutine `block_on`s a future that is ready at once.
    pub(crate) fn ready(&self, iterations: u64) {
        self.context.run(move |co| {
            for i in 0..iterations {
                black_box(co.block_on(std::future::ready(black_box(i))));
            }
        });
    }

    /// `future/cross_thread_wake`: a coroutine on the IoThread (which busy-polls a while
    /// before it blocks, as QEMU's IOThreads do) `block_on`s a future that another thread
    /// completes (it watches for the future's waker, see [`Completer`]); per operation, one
    /// suspension, one cross-thread wake and one resume.
    pub(crate) fn cross_thread_wake(&self, iterations: u64) {
        let slot = self.completer.slot.clone();
        let _active = self.completer.start();
        let rounds = self.iothread.handle().spawn(move |co| {
            for _ in 0..iterations {
                co.block_on(Completion { slot: &slot, target: None });
            }
        });
        rounds.expect("the IoThread runs").join().expect("no panic");
    }

    /// `future/cross_thread_wake_tokio`, the peer of `future/cross_thread_wake`: a task of the
    /// tokio current-thread runtime on this thread awaits the same futures, completed by the
    /// same thread.
    pub(crate) fn tokio_cross_thread_wake(&self, iterations: u64) {
        let slot = self.completer.slot.clone();
        let _active = self.completer.start();
        self.runtime.block_on(async move {
            for _ in 0..iterations {
                Completion { slot: &slot, target: None }.await;
            }
        });
    }

    /// `join/spawn_join`: spawn a coroutine on this thread's context and join it from the
    /// thread (the join polls the context).
    pub(crate) fn spawn_join(&self, iterations: u64) {
        for i in 0..iterations {
            black_box(self.context.spawn(move |_| black_box(i)).join().expect("no panic"));
        }
    }

    /// `join/await_from_tokio`: a tokio task spawns a coroutine on an IoThread and awaits its
    /// join handle.
    pub(crate) fn await_from_tokio(&self, iterations: u64) {
        let handle = self.iothread.handle().clone();
        self.runtime.block_on(async move {
            for i in 0..iterations {
                let joined = handle.spawn(move |_| black_box(i)).expect("the IoThread runs");
                black_box(joined.await);
            }
        });
    }
}

/// A thread that completes [`Completion`]s: while [`Completer::start`]'s guard lives, it
/// watches the slot until a completion leaves its waker there, then counts a completion and
/// wakes it; otherwise it sleeps, so that it takes no CPU from the other workloads.
///
/// While it watches, it yields its CPU between looks (`sched_yield`) instead of spinning: on
/// a machine with more runnable threads than CPUs (2 cores shared by several builds), a
/// spinning completer takes the CPU time the awaiting thread needs. In one run with a
/// spinning completer `future/cross_thread_wake` took 3.9 µs and its tokio peer 0.44 µs
/// (tokio's thread never slept: the wake came before it parked); yielding, 1.3-2.2 µs and
/// 5.7-7.5 µs.
struct Completer {
    slot: Arc<Slot>,
    thread: Option<ThreadHandle<()>>,
}

/// The hand-over between a [`Completion`] and the completer.
#[derive(Default)]
struct Slot {
    waker: Mutex<Option<Waker>>,
    waiting: AtomicBool,
    completed: AtomicU64,
    active: AtomicBool,
    stop: AtomicBool,
}

impl Completer {
    fn spawn() -> Completer {
        let slot = Arc::new(Slot::default());
        let s = slot.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                if !s.active.load(Ordering::Acquire) {
                    std::thread::park();
                    continue;
                }
                if !s.waiting.swap(false, Ordering::Acquire) {
                    std::thread::yield_now();
                    continue;
                }
                let waker = s.waker.lock().unwrap_or_else(PoisonError::into_inner).take();
                s.completed.fetch_add(1, Ordering::Release);
                waker.expect("a waiting completion left its waker").wake();
            }
        });
        Completer { slot, thread: Some(thread) }
    }

    /// Makes the thread watch the slot until the returned guard is dropped.
    fn start(&self) -> Active<'_> {
        self.slot.active.store(true, Ordering::Release);
        self.wake_thread();
        Active(self)
    }

    fn wake_thread(&self) {
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

/// While alive, the completer watches the slot.
struct Active<'a>(&'a Completer);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.slot.active.store(false, Ordering::Release);
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.slot.stop.store(true, Ordering::Release);
        self.wake_thread();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the completer thread ended");
        }
    }
}

/// A future the completer completes: pending until the completer counted it.
struct Completion<'a> {
    slot: &'a Slot,
    /// The completion count that means done; set at the first poll.
    target: Option<u64>,
}

impl Future for Completion<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let slot = self.slot;
        match self.target {
            Some(target) if slot.completed.load(Ordering::Acquire) >= target => Poll::Ready(()),
            Some(_) => Poll::Pending,
            None => {
                self.target = Some(slot.completed.load(Ordering::Acquire) + 1);
                *slot.waker.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(cx.waker().clone());
                slot.waiting.store(true, Ordering::Release);
                Poll::Pending
            }
        }
    }
}
