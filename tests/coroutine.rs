//! Enter / yield / nesting / current / panic semantics of coroutines.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;

use aiocoro::coroutine::{self, Coroutine, current, in_coroutine};

fn log() -> Rc<RefCell<Vec<String>>> {
    Rc::new(RefCell::new(Vec::new()))
}

#[test]
fn enter_runs_until_yield_and_resumes_after_it() {
    let steps = log();
    let s = steps.clone();
    let co = Coroutine::new(move |co| {
        for i in 0..3 {
            s.borrow_mut().push(format!("in {i}"));
            co.yield_now();
        }
        s.borrow_mut().push("end".into());
    });
    let mut entries = 0;
    while !co.is_ended() {
        assert!(!co.is_running());
        co.enter();
        entries += 1;
        steps.borrow_mut().push(format!("out {entries}"));
    }
    assert_eq!(entries, 4);
    assert_eq!(
        *steps.borrow(),
        ["in 0", "out 1", "in 1", "out 2", "in 2", "out 3", "end", "out 4"]
    );
}

#[test]
fn a_yield_returns_to_whoever_entered() {
    let steps = log();
    let s = steps.clone();
    let outer = Coroutine::new(move |co| {
        let s2 = s.clone();
        let inner = Coroutine::new(move |co| {
            s2.borrow_mut().push("inner 1".into());
            co.yield_now();
            s2.borrow_mut().push("inner 2".into());
        });
        s.borrow_mut().push("outer 1".into());
        inner.enter();
        s.borrow_mut().push("outer after inner yield".into());
        co.yield_now();
        inner.enter();
        assert!(inner.is_ended());
        s.borrow_mut().push("outer end".into());
    });
    outer.enter();
    steps.borrow_mut().push("thread".into());
    outer.enter();
    assert!(outer.is_ended());
    assert_eq!(
        *steps.borrow(),
        ["outer 1", "inner 1", "outer after inner yield", "thread", "inner 2", "outer end"]
    );
}

#[test]
fn current_names_the_innermost_running_coroutine() {
    assert!(!in_coroutine());
    assert!(current().is_none());
    let outer = Coroutine::new(|co| {
        let me = co.current();
        assert!(in_coroutine());
        assert_eq!(current().as_ref(), Some(&me));
        assert!(me.is_running());
        let enterer = me.clone();
        let inner = Coroutine::new(move |co| {
            assert_eq!(current(), Some(co.current()));
            assert!(co.current().is_running());
            assert!(enterer.is_running(), "a coroutine waiting for one it entered runs");
            co.yield_now();
        });
        inner.enter();
        assert!(!inner.is_running(), "a suspended coroutine does not run");
        assert!(me.is_running());
        assert_ne!(inner, me);
        assert_eq!(current(), Some(me), "the enterer is current again after the nested run");
    });
    outer.enter();
    assert!(outer.is_ended());
    assert!(!in_coroutine());
}

#[test]
fn a_body_keeps_rc_and_refcell_borrows_across_yields() {
    let shared = Rc::new(RefCell::new(vec![1]));
    let s = shared.clone();
    let co = Coroutine::new(move |co| {
        let local = Rc::new(Cell::new(10));
        let mut borrowed = s.borrow_mut();
        borrowed.push(2);
        co.yield_now();
        borrowed.push(local.get());
    });
    co.enter();
    assert!(shared.try_borrow().is_err(), "the coroutine still holds its borrow");
    co.enter();
    assert_eq!(*shared.borrow(), [1, 2, 10]);
}

#[derive(Debug, PartialEq)]
struct Payload(u32);

#[test]
fn a_panic_reaches_the_enterer_with_its_payload_and_ends_the_coroutine() {
    let co = Coroutine::new(|co| {
        co.yield_now();
        panic::panic_any(Payload(42));
    });
    co.enter();
    let caught = panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err();
    assert_eq!(caught.downcast_ref::<Payload>(), Some(&Payload(42)));
    assert!(co.is_ended());
    assert!(!in_coroutine(), "the current coroutine is restored after the panic");
}

#[test]
fn a_panic_in_a_nested_coroutine_passes_through_its_enterer() {
    let outer = Coroutine::new(|_co| {
        let inner = Coroutine::new(|_co| panic::panic_any(Payload(7)));
        let caught = panic::catch_unwind(AssertUnwindSafe(|| inner.enter())).unwrap_err();
        assert!(inner.is_ended());
        panic::resume_unwind(caught);
    });
    let caught = panic::catch_unwind(AssertUnwindSafe(|| outer.enter())).unwrap_err();
    assert_eq!(caught.downcast_ref::<Payload>(), Some(&Payload(7)));
    assert!(outer.is_ended());
}

/// Counts its drops.
struct DropCounter(Rc<Cell<u32>>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

#[test]
fn dropping_a_suspended_coroutine_unwinds_its_stack() {
    let drops = Rc::new(Cell::new(0));
    let d = drops.clone();
    let after_yield = Rc::new(Cell::new(false));
    let a = after_yield.clone();
    let co = Coroutine::new(move |co| {
        let _local = DropCounter(d);
        co.yield_now();
        a.set(true);
    });
    co.enter();
    assert_eq!(drops.get(), 0);
    drop(co);
    assert_eq!(drops.get(), 1, "the local on the coroutine stack was dropped");
    assert!(!after_yield.get(), "the body did not continue past its yield");
    assert!(!in_coroutine());
}

#[test]
fn dropping_an_unstarted_coroutine_drops_its_body() {
    let drops = Rc::new(Cell::new(0));
    let captured = DropCounter(drops.clone());
    let co = Coroutine::new(move |_co| drop(captured));
    drop(co);
    assert_eq!(drops.get(), 1);
}

#[test]
fn clones_name_the_same_coroutine_and_keep_it_alive() {
    let drops = Rc::new(Cell::new(0));
    let d = drops.clone();
    let co = Coroutine::new(move |co| {
        let _local = DropCounter(d);
        co.yield_now();
    });
    let other = co.clone();
    assert_eq!(co, other);
    assert_eq!(co.id(), other.id());
    co.enter();
    drop(co);
    assert_eq!(drops.get(), 0, "a clone still holds the suspended coroutine");
    other.enter();
    assert!(other.is_ended());
    assert_eq!(drops.get(), 1);
}

#[test]
fn a_destructor_on_an_unwinding_stack_may_take_a_handle() {
    struct TakesHandle(Rc<RefCell<Option<Coroutine>>>);
    impl Drop for TakesHandle {
        fn drop(&mut self) {
            let me = coroutine::current().expect("destructors of a dropped coroutine run in it");
            *self.0.borrow_mut() = Some(me);
        }
    }
    let stash = Rc::new(RefCell::new(None));
    let s = stash.clone();
    let co = Coroutine::new(move |co| {
        let _guard = TakesHandle(s);
        co.yield_now();
    });
    co.enter();
    drop(co);
    let kept = stash.borrow_mut().take().expect("the destructor stashed a handle");
    assert!(kept.is_ended());
}

#[test]
fn builder_sets_name_and_stack_size() {
    let co = Coroutine::builder()
        .name("flusher")
        .stack_size(64 * 1024)
        .build(|co| {
            // Use a good part of the 64 KiB (debug builds may copy the array once): pages below the top must be mapped and writable.
            let mut buffer = [0u8; 24 * 1024];
            buffer[0] = 1;
            std::hint::black_box(&mut buffer);
            co.yield_now();
        })
        .unwrap();
    assert_eq!(co.name(), Some("flusher"));
    co.enter();
    co.enter();
    assert!(co.is_ended());
    assert!(format!("{co:?}").contains("flusher"));
}

#[test]
fn ids_differ_between_live_coroutines() {
    let a = Coroutine::new(|_co| {});
    let b = Coroutine::new(|_co| {});
    assert_ne!(a.id(), b.id());
}
