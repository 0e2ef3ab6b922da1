//! CoRwLock: readers share, writers exclude (also across IoThreads), queued writers keep new
//! readers out, FIFO service of runs of readers, running lockers barge past a woken waiter,
//! upgrade and downgrade, try_*.

#[path = "common/sync_helpers.rs"]
mod sync_helpers;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use sync_helpers::{collect, pass_turn};

use aiocoro::aio::{AioContext, IoThread, LocalWaker};
use aiocoro::coroutine::{Co, Coroutine};
use aiocoro::sync::CoRwLock;

type Log = Rc<RefCell<Vec<String>>>;

fn log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

fn note(log: &Log, entry: impl Into<String>) {
    log.borrow_mut().push(entry.into());
}

fn taken(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.borrow_mut())
}

/// Runs everything runnable on `ctx`.
fn drain(ctx: &AioContext) {
    while ctx.poll(false) {}
}

/// A door that one coroutine waits at until the test opens it.
#[derive(Default)]
struct Gate {
    open: Cell<bool>,
    waiter: RefCell<Option<LocalWaker>>,
}

impl Gate {
    fn pass(&self, co: &Co) {
        while !self.open.get() {
            let wait = co.prepare_wait();
            *self.waiter.borrow_mut() = Some(wait.local_waker());
            wait.wait();
        }
    }

    fn open(&self) {
        self.open.set(true);
        if let Some(waker) = self.waiter.borrow_mut().take() {
            waker.wake();
        }
    }
}

#[test]
fn try_read_and_try_write_follow_the_holders() {
    let lock = CoRwLock::new(5);
    let first = lock.try_read().expect("a free lock can be read");
    let second = lock.try_read().expect("readers share");
    assert_eq!(*first + *second, 10);
    assert!(lock.try_write().is_none(), "no writer while readers hold it");
    drop(first);
    assert!(lock.try_write().is_none(), "one reader is still there");
    drop(second);

    let mut writer = lock.try_write().expect("a free lock can be written");
    *writer = 6;
    assert!(lock.try_read().is_none(), "no reader while a writer holds it");
    assert!(lock.try_write().is_none(), "one writer at a time");
    drop(writer);

    let writer = lock.try_write().unwrap();
    let reader = writer.downgrade();
    assert_eq!(*reader, 6);
    let other = lock.try_read().expect("a downgraded lock admits readers");
    assert!(lock.try_write().is_none(), "a downgraded lock is still held");
    drop((reader, other));
    assert!(lock.try_write().is_some(), "free again after every guard is gone");
    assert_eq!(lock.into_inner(), 6);
}

#[test]
fn readers_hold_the_lock_together() {
    const READERS: usize = 5;
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(7u32));
    let inside = Rc::new(Cell::new(0));
    let most = Rc::new(Cell::new(0));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let (lock, inside, most) = (lock.clone(), inside.clone(), most.clone());
        readers.push(ctx.spawn(move |co| {
            let value = lock.read(co);
            inside.set(inside.get() + 1);
            most.set(most.get().max(inside.get()));
            co.sleep(Duration::from_millis(1)); // every reader gets in before any leaves
            assert_eq!(*value, 7);
            inside.set(inside.get() - 1);
        }));
    }
    let l = lock.clone();
    let seen_inside = inside.clone();
    let writer = ctx.spawn(move |co| {
        let mut value = l.write(co);
        assert_eq!(seen_inside.get(), 0, "the writer got in while readers were inside");
        *value = 8;
    });
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(most.get(), READERS, "all readers held the lock at once");
    assert_eq!(*lock.try_read().unwrap(), 8);
}

#[test]
fn readers_on_several_iothreads_share_the_lock() {
    const THREADS: usize = 3;
    const PER_THREAD: usize = 2;
    const READERS: usize = THREADS * PER_THREAD;
    let lock = Arc::new(CoRwLock::new(()));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("rw-share-{i}")).unwrap()).collect();
    for iothread in &iothreads {
        for _ in 0..PER_THREAD {
            let (lock, arrived, tx) = (lock.clone(), arrived.clone(), tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    let _guard = lock.read(co);
                    arrived.fetch_add(1, Ordering::SeqCst);
                    // Hold the read lock until every reader holds it too; if readers excluded
                    // each other this could never happen.
                    let mut rounds = 0;
                    while arrived.load(Ordering::SeqCst) < READERS && rounds < 20_000 {
                        co.sleep(Duration::from_micros(500));
                        rounds += 1;
                    }
                    tx.send(arrived.load(Ordering::SeqCst)).unwrap();
                })
                .unwrap();
        }
    }
    let seen = collect(&rx, READERS);
    for iothread in iothreads {
        iothread.stop();
    }
    assert!(seen.iter().all(|&n| n == READERS), "readers did not all hold the lock at once");
    assert!(lock.try_write().is_some());
}

/// Data written non-atomically under the write lock: `a` and `b` are updated with yields in
/// between, so a reader or writer that gets in during a write sees them differ or loses an
/// update.
#[derive(Default)]
struct Pair {
    a: u64,
    b: u64,
}

/// Who is inside the lock, checked by everybody who gets in.
#[derive(Default)]
struct Inside {
    writers: AtomicUsize,
    readers: AtomicUsize,
}

impl Inside {
    fn writer_in(&self) {
        assert_eq!(self.writers.fetch_add(1, Ordering::SeqCst), 0, "two writers at once");
        assert_eq!(self.readers.load(Ordering::SeqCst), 0, "a writer beside readers");
    }

    fn writer_out(&self) {
        self.writers.fetch_sub(1, Ordering::SeqCst);
    }

    fn reader_in(&self) {
        self.readers.fetch_add(1, Ordering::SeqCst);
        assert_eq!(self.writers.load(Ordering::SeqCst), 0, "a reader beside a writer");
    }

    fn reader_out(&self) {
        self.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn writers_exclude_everybody_across_three_iothreads() {
    const THREADS: usize = 3;
    const COROUTINES: usize = 4;
    const ROUNDS: u64 = 1_000;
    let lock = Arc::new(CoRwLock::new(Pair::default()));
    let inside = Arc::new(Inside::default());
    let (tx, rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..THREADS).map(|i| IoThread::spawn(&format!("rw-excl-{i}")).unwrap()).collect();
    for (t, iothread) in iothreads.iter().enumerate() {
        for c in 0..COROUTINES {
            let (lock, inside, tx) = (lock.clone(), inside.clone(), tx.clone());
            let seed = (t * COROUTINES + c) as u64;
            iothread
                .handle()
                .spawn(move |co| {
                    let mut writes = 0;
                    for round in 0..ROUNDS {
                        match (round + seed) % 5 {
                            0 | 1 => {
                                let mut pair = lock.write(co);
                                inside.writer_in();
                                let a = pair.a;
                                pass_turn(co);
                                pair.a = a + 1;
                                pass_turn(co);
                                pair.b += 1;
                                inside.writer_out();
                                writes += 1;
                            }
                            2 => {
                                let pair = lock.read(co);
                                inside.reader_in();
                                assert_eq!(pair.a, pair.b, "a reader saw a half-done write");
                                pass_turn(co);
                                assert_eq!(pair.a, pair.b, "a write happened under a reader");
                                inside.reader_out();
                            }
                            3 => {
                                let pair = lock.read(co);
                                let before = pair.a;
                                let mut pair = pair.upgrade(co);
                                inside.writer_in();
                                assert!(pair.a >= before);
                                let b = pair.b;
                                pass_turn(co);
                                pair.b = b + 1;
                                pair.a += 1;
                                inside.writer_out();
                                writes += 1;
                            }
                            _ => {
                                let mut pair = lock.write(co);
                                inside.writer_in();
                                pair.a += 1;
                                pass_turn(co);
                                pair.b += 1;
                                inside.writer_out();
                                writes += 1;
                                let pair = pair.downgrade();
                                inside.reader_in();
                                pass_turn(co);
                                assert_eq!(pair.a, pair.b, "a write happened under a downgrade");
                                inside.reader_out();
                            }
                        }
                        // Between rounds, let the queue drain now and then, so that the
                        // uncontended fast paths meet held locks too.
                        for _ in 0..(round + seed) % 4 * 2 {
                            pass_turn(co);
                        }
                        if round % 16 == 0 {
                            co.sleep(Duration::ZERO);
                        }
                    }
                    tx.send(writes).unwrap();
                })
                .unwrap();
        }
    }
    let writes: u64 = collect(&rx, THREADS * COROUTINES).into_iter().sum();
    for iothread in iothreads {
        iothread.stop();
    }
    let pair = Arc::try_unwrap(lock).ok().unwrap().into_inner();
    assert!(writes > 0);
    assert_eq!((pair.a, pair.b), (writes, writes), "an update was lost");
}

#[test]
fn a_queued_writer_keeps_new_readers_out() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(0));
    let gate = Rc::new(Gate::default());
    let log = log();

    let (l, g, lg) = (lock.clone(), gate.clone(), log.clone());
    ctx.spawn(move |co| {
        let _value = l.read(co);
        g.pass(co);
        note(&lg, "first reader leaves");
    });
    let (l, lg) = (lock.clone(), log.clone());
    ctx.spawn(move |co| {
        *l.write(co) += 1;
        note(&lg, "writer");
    });
    drain(&ctx);
    assert!(taken(&log).is_empty(), "the writer waits for the reader");
    assert!(lock.try_read().is_none(), "a reader would overtake the queued writer");

    let (l, lg) = (lock.clone(), log.clone());
    ctx.spawn(move |co| {
        let value = l.read(co);
        note(&lg, format!("late reader sees {}", *value));
    });
    drain(&ctx);
    assert!(taken(&log).is_empty(), "the late reader got in past the queued writer");

    gate.open();
    drain(&ctx);
    assert_eq!(taken(&log), ["first reader leaves", "writer", "late reader sees 1"]);
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn a_stream_of_readers_on_iothreads_does_not_starve_a_writer() {
    const READER_THREADS: usize = 2;
    const PER_THREAD: usize = 2;
    /// A starved writer shows up as readers reaching this many rounds.
    const GIVE_UP: u64 = 2_000_000;
    let lock = Arc::new(CoRwLock::new(0u64));
    let written = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let iothreads: Vec<_> =
        (0..=READER_THREADS).map(|i| IoThread::spawn(&format!("rw-stream-{i}")).unwrap()).collect();
    for iothread in &iothreads[..READER_THREADS] {
        for _ in 0..PER_THREAD {
            let (lock, written, rounds, tx) =
                (lock.clone(), written.clone(), rounds.clone(), tx.clone());
            iothread
                .handle()
                .spawn(move |co| {
                    // Two readers per thread that each keep the lock across a turn: on
                    // every thread one of them always holds it, so the lock is never free.
                    let mut mine = 0;
                    while mine < GIVE_UP {
                        let value = lock.read(co);
                        if *value > 0 {
                            break;
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                        pass_turn(co);
                        drop(value);
                        mine += 1;
                    }
                    tx.send(written.load(Ordering::SeqCst)).unwrap();
                })
                .unwrap();
        }
    }
    let (l, w, r, t) = (lock.clone(), written.clone(), rounds.clone(), tx.clone());
    iothreads[READER_THREADS]
        .handle()
        .spawn(move |co| {
            // Start once the readers are streaming.
            while r.load(Ordering::Relaxed) < 1_000 {
                co.sleep(Duration::from_micros(100));
            }
            let mut value = l.write(co);
            *value = 1;
            w.store(true, Ordering::SeqCst);
            t.send(true).unwrap();
        })
        .unwrap();
    let results = collect(&rx, READER_THREADS * PER_THREAD + 1);
    for iothread in iothreads {
        iothread.stop();
    }
    assert!(results.iter().all(|&written| written), "the writer was starved by readers");
}

#[test]
fn queued_waiters_are_served_in_fifo_order_and_runs_of_readers_together() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(0));
    let gate = Rc::new(Gate::default());
    let log = log();

    let (l, g, lg) = (lock.clone(), gate.clone(), log.clone());
    ctx.spawn(move |co| {
        let guard = l.write(co);
        g.pass(co);
        drop(guard);
        // Freed, R1 woken to take it: a running locker may take it first (and let go).
        assert!(l.try_write().is_some(), "the lock is free while R1 is on its way");
        note(&lg, "W0-");
    });
    for (name, writer) in [
        ("R1", false),
        ("R2", false),
        ("W1", true),
        ("R3", false),
        ("W2", true),
        ("R4", false),
        ("R5", false),
    ] {
        let (l, lg) = (lock.clone(), log.clone());
        ctx.spawn(move |co| {
            if writer {
                let _guard = l.write(co);
                note(&lg, format!("{name}+"));
                pass_turn(co); // lets anybody who got the lock too run
                note(&lg, format!("{name}-"));
            } else {
                let _guard = l.read(co);
                note(&lg, format!("{name}+"));
                pass_turn(co);
                note(&lg, format!("{name}-"));
            }
        });
    }
    drain(&ctx);
    assert!(taken(&log).is_empty(), "everybody queues behind the first writer");
    assert_eq!(ctx.suspended_coroutines(), 8);

    gate.open();
    drain(&ctx);
    assert_eq!(
        taken(&log),
        [
            "W0-", "R1+", "R2+", "R1-", "R2-", "W1+", "W1-", "R3+", "R3-", "W2+", "W2-", "R4+",
            "R5+", "R4-", "R5-",
        ]
    );
    assert!(lock.try_write().is_some());
}

#[test]
fn the_only_reader_upgrades_without_waiting() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(1));
    let other_ran = Rc::new(Cell::new(false));
    let (l, o) = (lock.clone(), other_ran.clone());
    let upgrader = ctx.spawn(move |co| {
        let value = l.read(co);
        assert_eq!(*value, 1);
        let mut value = value.upgrade(co);
        // The next coroutine in the run queue would have run if the upgrade had suspended.
        assert!(!o.get(), "the upgrade suspended");
        assert!(l.try_read().is_none(), "an upgraded lock is write-locked");
        *value = 2;
    });
    let o = other_ran.clone();
    ctx.spawn(move |_co| o.set(true));
    drain(&ctx);
    assert!(upgrader.is_finished());
    assert!(other_ran.get());
    assert_eq!(*lock.try_read().unwrap(), 2);
}

#[test]
fn an_upgrade_beside_other_readers_gives_up_its_read_lock_and_queues_as_a_writer() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(String::from("start")));
    let (upgrade_now, leave_now) = (Rc::new(Gate::default()), Rc::new(Gate::default()));
    let log = log();

    let (l, g, lg) = (lock.clone(), upgrade_now.clone(), log.clone());
    ctx.spawn(move |co| {
        let text = l.read(co);
        g.pass(co);
        let mut text = text.upgrade(co);
        note(&lg, format!("upgraded, sees {text}"));
        text.push_str("+upgrader");
    });
    let (l, g, lg) = (lock.clone(), leave_now.clone(), log.clone());
    ctx.spawn(move |co| {
        let _text = l.read(co);
        g.pass(co);
        note(&lg, "other reader leaves");
    });
    drain(&ctx);
    let (l, lg) = (lock.clone(), log.clone());
    ctx.spawn(move |co| {
        let mut text = l.write(co);
        note(&lg, "queued writer");
        text.push_str("+writer");
    });
    drain(&ctx);
    assert!(taken(&log).is_empty());

    // The upgrade cannot be immediate (another reader, a queued writer): it queues at the tail.
    upgrade_now.open();
    drain(&ctx);
    assert!(taken(&log).is_empty(), "the upgrade got in beside a reader");
    let (l, lg) = (lock.clone(), log.clone());
    ctx.spawn(move |co| {
        let text = l.read(co);
        note(&lg, format!("late reader sees {text}"));
    });
    drain(&ctx);
    assert!(taken(&log).is_empty(), "a reader overtook the queued writers");

    // The other reader leaves; the upgrader's read lock is gone already, so the lock is free.
    leave_now.open();
    drain(&ctx);
    assert_eq!(
        taken(&log),
        [
            "other reader leaves",
            "queued writer",
            "upgraded, sees start+writer",
            "late reader sees start+writer+upgrader",
        ]
    );
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn an_upgrade_waits_for_the_other_readers_then_keeps_later_readers_out() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(0));
    let leave_now = Rc::new(Gate::default());
    let log = log();

    let (l, lg) = (lock.clone(), log.clone());
    let upgrader = ctx.spawn(move |co| {
        let value = l.read(co);
        pass_turn(co); // the other reader gets in
        let mut value = value.upgrade(co);
        note(&lg, "upgraded");
        *value += 1;
    });
    let (l, g, lg) = (lock.clone(), leave_now.clone(), log.clone());
    ctx.spawn(move |co| {
        let _value = l.read(co);
        g.pass(co);
        note(&lg, "other reader leaves");
    });
    drain(&ctx);
    assert!(!upgrader.is_finished(), "the upgrade cannot happen beside another reader");
    assert!(lock.try_read().is_none(), "a queued upgrade keeps new readers out");
    let (l, lg) = (lock.clone(), log.clone());
    ctx.spawn(move |co| {
        let value = l.read(co);
        note(&lg, format!("late reader sees {}", *value));
    });
    drain(&ctx);
    assert!(taken(&log).is_empty());

    leave_now.open();
    drain(&ctx);
    assert_eq!(taken(&log), ["other reader leaves", "upgraded", "late reader sees 1"]);
}

#[test]
fn a_downgrade_lets_the_readers_at_the_head_of_the_queue_in_but_not_past_a_writer() {
    let ctx = AioContext::new().unwrap();
    let lock = Rc::new(CoRwLock::new(0));
    let (downgrade_now, leave_now) = (Rc::new(Gate::default()), Rc::new(Gate::default()));
    let log = log();

    let (l, d, g, lg) = (lock.clone(), downgrade_now.clone(), leave_now.clone(), log.clone());
    ctx.spawn(move |co| {
        let mut value = l.write(co);
        d.pass(co);
        *value = 1;
        let value = value.downgrade();
        note(&lg, "downgraded");
        g.pass(co);
        assert_eq!(*value, 1);
        note(&lg, "downgrader leaves");
    });
    for (name, writer) in [("R1", false), ("R2", false), ("W", true), ("R3", false)] {
        let (l, lg) = (lock.clone(), log.clone());
        ctx.spawn(move |co| {
            if writer {
                let mut value = l.write(co);
                *value += 10;
                note(&lg, name);
            } else {
                let value = l.read(co);
                note(&lg, format!("{name} sees {}", *value));
            }
        });
    }
    drain(&ctx);
    assert!(taken(&log).is_empty());

    downgrade_now.open();
    drain(&ctx);
    assert_eq!(taken(&log), ["downgraded", "R1 sees 1", "R2 sees 1"]);
    assert!(lock.try_read().is_none(), "R3 waits behind the queued writer, so does a newcomer");
    assert!(lock.try_write().is_none(), "the downgrader still reads");

    leave_now.open();
    drain(&ctx);
    assert_eq!(taken(&log), ["downgrader leaves", "W", "R3 sees 11"]);
    assert_eq!(ctx.suspended_coroutines(), 0);
}

#[test]
fn a_release_frees_the_lock_for_a_running_locker_while_the_woken_waiter_is_on_its_way() {
    // A plain thread holds the write lock (taken with try_write) while a coroutine queues;
    // the thread's release wakes the waiter across threads, and the thread, still running,
    // takes the lock again before the waiter's context runs it (strict hand-over would keep
    // the lock for the waiter).
    let ctx = AioContext::new().unwrap();
    let lock = Arc::new(CoRwLock::new(0u32));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (held_tx, held_rx) = mpsc::channel();
    let l = lock.clone();
    let holder = std::thread::spawn(move || {
        let mut value = l.try_write().expect("the lock starts free");
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        *value = 5;
        drop(value);
        // The queued reader was woken, but its context (the test's thread) waits for us.
        let mut value = l.try_write().expect("freed for a running locker");
        *value += 1;
    });
    held_rx.recv().unwrap();
    let l = lock.clone();
    let seen = Rc::new(Cell::new(0));
    let s = seen.clone();
    let reader = ctx.spawn(move |co| s.set(*l.read(co)));
    drain(&ctx);
    assert!(!reader.is_finished());
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    reader.join().unwrap();
    assert_eq!(seen.get(), 6, "the woken reader took the lock after the barger");
    assert!(lock.try_write().is_some(), "free at the end");
}

#[test]
fn a_coroutine_entered_directly_can_use_an_uncontended_lock() {
    // No context is needed as long as nobody has to wait.
    let lock = Rc::new(CoRwLock::new(vec![1]));
    let l = lock.clone();
    Coroutine::new(move |co| {
        l.write(co).push(2);
        let first = l.read(co);
        let second = l.read(co);
        assert_eq!(first.len() + second.len(), 4);
        drop(second);
        let mut only = first.upgrade(co);
        only.push(3);
        assert_eq!(*only.downgrade(), [1, 2, 3]);
    })
    .enter();
    assert_eq!(*lock.try_read().unwrap(), [1, 2, 3]);
}
