//! Drained sections (`BlockBackend::drain`) while IoThreads run requests in loops: inside a
//! section no request runs and none reaches the driver, on any thread; afterwards requests
//! go on. Drains from a thread without a context, from one whose context runs requests of
//! its own, nested on one thread and overlapping across two.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::Duration;

use aiocoro::aio::{AioContext, IoThread};
use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, run_in_coroutine};
use common::{Counters, HANG, TestDriver, wait_until};

/// Requests each IoThread keeps going at once.
const DEPTH: usize = 3;

/// IoThreads running request loops on one backend over a [`TestDriver`].
struct Load {
    blk: BlockBackend,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Requests the loops saw complete.
    completed: Arc<AtomicU64>,
    ended: Mutex<mpsc::Receiver<()>>,
    loops: usize,
    iothreads: Vec<IoThread>,
}

/// One request loop: reads and writes its own 512 bytes until `stop`, counting completions.
fn request_loop(co: &Co, blk: &BlockBackend, lane: u64, stop: &AtomicBool, completed: &AtomicU64) {
    let offset = lane * 512;
    let mut buf = [lane as u8; 512];
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if round.is_multiple_of(2) {
            buf.fill((round / 2) as u8 ^ lane as u8);
            blk.write(co, offset, &buf).unwrap();
        } else {
            let mut back = [0u8; 512];
            blk.read(co, offset, &mut back).unwrap();
            assert_eq!(back, buf, "lane {lane} read back what it wrote");
        }
        completed.fetch_add(1, Ordering::SeqCst);
        round += 1;
    }
}

impl Load {
    /// Starts `threads` IoThreads with [`DEPTH`] request loops each, on a driver whose
    /// requests sleep `delay`, and waits until requests flow.
    fn start(threads: usize, delay: Duration) -> Load {
        let mut driver = TestDriver::new(1 << 20);
        driver.delay = delay;
        let counters = driver.counters.clone();
        let blk =
            run_in_coroutine(move |co| BlockBackend::new(Arc::new(driver.into_node(co, "t"))))
                .unwrap();
        let mut load = Load {
            blk,
            counters,
            stop: Arc::default(),
            completed: Arc::default(),
            ended: Mutex::new(mpsc::channel().1),
            loops: 0,
            iothreads: Vec::new(),
        };
        let (tx, rx) = mpsc::channel();
        load.ended = Mutex::new(rx);
        for thread in 0..threads {
            let iothread = IoThread::spawn(&format!("drain-{thread}")).unwrap();
            for _ in 0..DEPTH {
                let lane = load.loops as u64;
                let (blk, stop, completed) =
                    (load.blk.clone(), load.stop.clone(), load.completed.clone());
                let tx = tx.clone();
                iothread
                    .handle()
                    .spawn(move |co| {
                        request_loop(co, &blk, lane, &stop, &completed);
                        tx.send(()).unwrap();
                    })
                    .unwrap();
                load.loops += 1;
            }
            load.iothreads.push(iothread);
        }
        load.wait_for_progress(0);
        load
    }

    /// Waits until the driver has seen more than `entered` requests.
    fn wait_for_progress(&self, entered: u64) {
        wait_until("requests to reach the driver", || self.counters.entered() > entered);
    }

    /// Stops the loops and waits for them to end.
    fn stop_loops(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let ended = self.ended.get_mut().unwrap();
        while self.loops > 0 {
            let report = ended.recv_timeout(HANG);
            // No second panic while unwinding from a failed assertion.
            if std::thread::panicking() && report.is_err() {
                return;
            }
            report.expect("a request loop never ended");
            self.loops -= 1;
        }
    }

    /// Stops the loops and the IoThreads, and checks that every request that reached the
    /// driver completed once.
    fn finish(mut self) {
        self.stop_loops();
        std::mem::take(&mut self.iothreads).into_iter().for_each(IoThread::stop);
        assert_eq!(self.blk.in_flight(), 0);
        assert_eq!(self.counters.entered(), self.counters.left());
        assert_eq!(self.counters.left(), self.completed.load(Ordering::SeqCst));
    }
}

impl Drop for Load {
    /// After a failed assertion: end the loops so that the IoThreads stop cleanly.
    fn drop(&mut self) {
        self.stop_loops();
    }
}

/// Checks a drained section: nothing runs now, and nothing reaches the driver while this
/// thread sleeps a little (giving the loops every chance to sneak a request in).
fn assert_quiet(load: &Load) -> u64 {
    let entered = load.counters.entered();
    assert_eq!(load.blk.in_flight(), 0, "a request runs inside a drained section");
    assert_eq!(load.counters.left(), entered, "a request is inside the driver");
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(load.counters.entered(), entered, "a request reached the driver while drained");
    assert_eq!(load.blk.in_flight(), 0, "a request runs inside a drained section");
    entered
}

#[test]
fn a_thread_without_a_context_drains_every_iothread() {
    assert!(AioContext::current().is_none());
    let load = Load::start(3, Duration::from_micros(100));
    for _ in 0..20 {
        let drained = load.blk.drain();
        let entered = assert_quiet(&load);
        drop(drained);
        load.wait_for_progress(entered);
    }
    load.finish();
}

#[test]
fn a_drain_without_requests_returns_at_once_and_holds_new_ones() {
    let mut driver = TestDriver::new(4096);
    driver.delay = Duration::ZERO;
    let counters = driver.counters.clone();
    let blk =
        run_in_coroutine(move |co| BlockBackend::new(Arc::new(driver.into_node(co, "t")))).unwrap();
    let iothread = IoThread::spawn("drain-idle").unwrap();
    let drained = blk.drain();
    let (tx, rx) = mpsc::channel();
    let other = blk.clone();
    iothread
        .handle()
        .spawn(move |co| {
            other.write(co, 0, &[7; 512]).unwrap();
            tx.send(()).unwrap();
        })
        .unwrap();
    // The request waits for the section's end; nothing else could complete it.
    assert!(rx.recv_timeout(Duration::from_millis(20)).is_err(), "a request ran while drained");
    assert_eq!(counters.entered(), 0);
    drop(drained);
    rx.recv_timeout(HANG).expect("the held request never went on");
    assert_eq!(counters.entered(), 1);
    iothread.stop();
}

#[test]
fn a_thread_with_a_context_drains_its_own_requests_too() {
    let load = Load::start(2, Duration::from_micros(100));
    let context = AioContext::new().unwrap();
    let local_completed = Arc::new(AtomicU64::new(0));
    let mut local = Vec::new();
    for lane in 0..4 {
        let (blk, stop, completed) = (load.blk.clone(), load.stop.clone(), local_completed.clone());
        let lane = 100 + lane;
        local.push(context.spawn(move |co| request_loop(co, &blk, lane, &stop, &completed)));
    }
    // Start this context's loops: each runs until it sleeps inside the driver. Between polls
    // (no section open) that is where they all are, so every drain below has to run them to
    // the end of their requests, or it never returns.
    context.poll(false);
    for _ in 0..10 {
        assert!(load.blk.in_flight() >= 4, "this context's requests are in flight");
        let drained = load.blk.drain();
        let entered = assert_quiet(&load);
        // Polling inside the section runs nothing of the backend's.
        context.poll(false);
        assert_eq!(load.counters.entered(), entered, "a held local request went on");
        drop(drained);
        let completed = local_completed.load(Ordering::SeqCst);
        context.wait_while(|| local_completed.load(Ordering::SeqCst) <= completed);
        load.wait_for_progress(entered);
    }
    load.stop.store(true, Ordering::SeqCst);
    context.wait_while(|| local.iter().any(|coroutine| !coroutine.is_finished()));
    let local_completed = local_completed.load(Ordering::SeqCst);
    load.completed.fetch_add(local_completed, Ordering::SeqCst);
    load.finish();
}

/// The requests woken by the end of one section meet the next section: those that back out
/// must not show as in flight inside it (each counts itself in before it sees the section).
#[test]
fn requests_backing_out_of_a_section_are_not_in_flight() {
    let load = Load::start(3, Duration::ZERO);
    for _ in 0..30 {
        let first = load.blk.drain();
        // Let the loops reach the gate and wait there.
        std::thread::sleep(Duration::from_micros(500));
        drop(first);
        let second = load.blk.drain();
        for _ in 0..2000 {
            assert_eq!(load.blk.in_flight(), 0, "a request runs inside a drained section");
        }
        drop(second);
    }
    load.finish();
}

/// An IoThread drains from a callback of its own event loop (as QEMU drains from a bottom
/// half) while its own coroutines have requests inside the driver: the drain runs its
/// context (a nested poll) until they end.
#[test]
fn an_iothread_drains_from_a_callback_while_its_coroutines_run_requests() {
    let load = Load::start(2, Duration::from_micros(100));
    let (tx, rx) = mpsc::channel();
    for _ in 0..10 {
        let entered = load.counters.entered();
        let (blk, counters, tx) = (load.blk.clone(), load.counters.clone(), tx.clone());
        load.iothreads[0]
            .handle()
            .schedule_oneshot(move || {
                let drained = blk.drain();
                let quiet = (blk.in_flight(), counters.entered() - counters.left());
                let entered = counters.entered();
                std::thread::sleep(Duration::from_millis(1));
                let after = counters.entered();
                drop(drained);
                tx.send((quiet, entered, after)).unwrap();
            })
            .unwrap();
        let (quiet, inside, after) = rx.recv_timeout(HANG).expect("the drain never ended");
        assert_eq!(quiet, (0, 0), "requests ran inside the section");
        assert_eq!(inside, after, "a request reached the driver while drained");
        load.wait_for_progress(entered.max(after));
    }
    load.finish();
}

#[test]
fn drains_nest_on_one_thread() {
    let load = Load::start(2, Duration::from_micros(100));
    let outer = load.blk.drain();
    let entered = assert_quiet(&load);
    let inner = load.blk.drain();
    assert_eq!(assert_quiet(&load), entered);
    drop(outer);
    assert_eq!(assert_quiet(&load), entered, "the inner section still holds requests");
    drop(inner);
    load.wait_for_progress(entered);
    load.finish();
}

#[test]
fn drains_overlap_across_two_threads() {
    let load = Arc::new(Load::start(2, Duration::from_micros(50)));
    // First a fixed interleaving: A opens, B opens, A closes (still drained), B closes.
    let steps = Arc::new(Barrier::new(2));
    let (a_load, a_steps) = (load.clone(), steps.clone());
    let a = std::thread::spawn(move || {
        let drained = a_load.blk.drain();
        let entered = assert_quiet(&a_load);
        a_steps.wait(); // A is drained.
        a_steps.wait(); // B is drained.
        drop(drained);
        a_steps.wait(); // A closed.
        entered
    });
    steps.wait();
    let drained = load.blk.drain();
    let entered = assert_quiet(&load);
    steps.wait();
    steps.wait();
    assert_eq!(assert_quiet(&load), entered, "B's section still holds requests");
    assert_eq!(a.join().unwrap(), entered);
    drop(drained);
    load.wait_for_progress(entered);

    // Then both threads drain again and again at will, each checking its own sections.
    let drainers: Vec<_> = (0..2)
        .map(|_| {
            let load = load.clone();
            std::thread::spawn(move || {
                for _ in 0..30 {
                    let drained = load.blk.drain();
                    assert_eq!(load.blk.in_flight(), 0);
                    let entered = load.counters.entered();
                    assert_eq!(load.counters.left(), entered);
                    std::thread::yield_now();
                    assert_eq!(load.counters.entered(), entered);
                    drop(drained);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        })
        .collect();
    drainers.into_iter().for_each(|drainer| drainer.join().unwrap());
    let entered = load.counters.entered();
    load.wait_for_progress(entered);
    let load = Arc::try_unwrap(load).unwrap_or_else(|_| panic!("the drainers hold the load"));
    load.finish();
}

#[test]
fn draining_inside_a_coroutine_is_a_clear_panic() {
    let blk = run_in_coroutine(|co| {
        BlockBackend::new(Arc::new(TestDriver::new(4096).into_node(co, "t")))
    })
    .unwrap();
    let message = run_in_coroutine(move |_co| {
        let panic = catch_unwind(AssertUnwindSafe(|| drop(blk.drain()))).unwrap_err();
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or(panic.downcast_ref::<String>().cloned())
    })
    .unwrap()
    .unwrap();
    assert!(message.contains("drain called inside a coroutine"), "{message}");
}

/// A coroutine that panics while a drainer on its thread runs the context: the panic leaves
/// `drain` by unwinding, and must close the section it opened on the way out. Otherwise every
/// later request on every thread waits for a section that nobody will ever end.
#[test]
fn a_panic_out_of_a_drain_closes_its_section() {
    let ctx = AioContext::new().unwrap();
    let blk = run_in_coroutine(|co| {
        let (_, node) = aiocoro_block::open(
            co,
            &aiocoro_block::BlockGraph::new(),
            "driver=null-co,size=1M,read-zeroes=on,latency-ns=1000",
        )?;
        Ok::<_, std::io::Error>(BlockBackend::new(node))
    })
    .unwrap()
    .unwrap();
    // A request in flight (sleeping in the driver), which panics once it has finished: the
    // drainer below runs it to its end inside `drain`, and the panic comes out there.
    let in_flight = blk.clone();
    ctx.spawn(move |co| {
        in_flight.read(co, 0, &mut [0u8; 512]).unwrap();
        panic!("a coroutine fails while its thread drains");
    });
    ctx.poll(false); // the request starts and sleeps in the driver
    assert_eq!(blk.in_flight(), 1);
    let panic = catch_unwind(AssertUnwindSafe(|| drop(blk.drain())));
    assert!(panic.is_err(), "the coroutine's panic came out of the drain");
    // A new request must go through: a zero-latency path would finish in a few polls.
    let after = blk.clone();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    ctx.spawn(move |co| {
        after.flush(co).unwrap();
        flag.store(true, Ordering::SeqCst);
    });
    for _ in 0..10 {
        ctx.poll(false);
    }
    assert!(done.load(Ordering::SeqCst), "a request after the failed drain was held back");
    assert_eq!(blk.in_flight(), 0);
}
