//! Misuse of a coroutine is a clear panic (or, for a stack overflow, a clear death), never UB.

mod common;
#[path = "../benches/support/process_memory.rs"]
#[allow(dead_code, reason = "these tests need only the mapping count")]
mod process_memory;

use std::cell::RefCell;
use std::hint::black_box;
use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;

use aiocoro::coroutine::pool::{self, PoolConfig};
use aiocoro::coroutine::{Co, Coroutine, MIN_STACK_SIZE};

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[test]
fn entering_itself_panics_naming_the_rule() {
    let co = Coroutine::builder().name("selfish").build(|co| co.current().enter()).unwrap();
    let message = panic_message(panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err());
    assert!(message.contains("entered while it is running"), "{message}");
    assert!(message.contains("\"selfish\""), "the message names the coroutine: {message}");
    assert!(co.is_ended(), "the panic ended the coroutine");
}

#[test]
fn entering_an_ancestor_panics_naming_the_rule() {
    let outer = Coroutine::new(|co| {
        let me = co.current();
        Coroutine::new(move |_co| me.enter()).enter();
    });
    let message =
        panic_message(panic::catch_unwind(AssertUnwindSafe(|| outer.enter())).unwrap_err());
    assert!(message.contains("entered while it is running"), "{message}");
    assert!(outer.is_ended());
}

#[test]
fn entering_an_ancestor_two_levels_up_panics_naming_the_rule() {
    let outer = Coroutine::builder()
        .name("grandparent")
        .build(|co| {
            let me = co.current();
            Coroutine::new(move |_co| Coroutine::new(move |_co| me.enter()).enter()).enter();
        })
        .unwrap();
    let message =
        panic_message(panic::catch_unwind(AssertUnwindSafe(|| outer.enter())).unwrap_err());
    assert!(message.contains("entered while it is running"), "{message}");
    assert!(message.contains("\"grandparent\""), "{message}");
    assert!(outer.is_ended());
}

/// Runs `enter` in a destructor on the stack of a coroutine that is being dropped while
/// suspended, and returns the message of the panic it must raise.
fn panic_message_of_an_entry_during_unwinding<F: FnOnce(&Co) + 'static>(enter: F) -> String {
    struct EnterOnDrop<'a, F: FnOnce(&Co)> {
        co: &'a Co,
        enter: Option<F>,
        message: Rc<RefCell<Option<String>>>,
    }
    impl<F: FnOnce(&Co)> Drop for EnterOnDrop<'_, F> {
        fn drop(&mut self) {
            let enter = self.enter.take().unwrap();
            // A panic caught inside a destructor may happen during unwinding.
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| enter(self.co)));
            *self.message.borrow_mut() = Some(panic_message(outcome.unwrap_err()));
        }
    }
    let message = Rc::new(RefCell::new(None));
    let slot = message.clone();
    let co = Coroutine::new(move |co| {
        let _guard = EnterOnDrop { co, enter: Some(enter), message: slot };
        co.yield_now();
        unreachable!("the coroutine is dropped, never entered again");
    });
    co.enter();
    drop(co);
    message.take().expect("the destructor ran")
}

#[test]
fn entering_a_coroutine_being_unwound_panics_naming_the_rule() {
    let message = panic_message_of_an_entry_during_unwinding(|co| co.current().enter());
    assert!(message.contains("entered while its stack was being unwound"), "{message}");
}

#[test]
fn entering_a_coroutine_being_unwound_from_one_it_entered_panics_naming_the_rule() {
    let message = panic_message_of_an_entry_during_unwinding(|co| {
        let me = co.current();
        Coroutine::new(move |_co| me.enter()).enter();
    });
    assert!(message.contains("entered while its stack was being unwound"), "{message}");
}

#[test]
fn a_coroutine_dropping_a_suspended_one_cannot_be_entered_by_its_destructors() {
    let message = Rc::new(RefCell::new(None));
    let seen = message.clone();
    let outer = Coroutine::new(move |co| {
        let me = co.current();
        let inner = Coroutine::new(move |co| {
            struct EnterOuterOnDrop(Option<Coroutine>, Rc<RefCell<Option<String>>>);
            impl Drop for EnterOuterOnDrop {
                fn drop(&mut self) {
                    let outer = self.0.take().unwrap();
                    let outcome = panic::catch_unwind(AssertUnwindSafe(|| outer.enter()));
                    *self.1.borrow_mut() = Some(panic_message(outcome.unwrap_err()));
                }
            }
            let _guard = EnterOuterOnDrop(Some(me), seen);
            co.yield_now();
        });
        inner.enter();
        // The last handle: `inner`'s stack unwinds here, while `outer` runs.
        drop(inner);
    });
    outer.enter();
    assert!(outer.is_ended());
    let message = message.take().expect("the destructor ran");
    assert!(message.contains("entered while it is running"), "{message}");
}

#[test]
fn entering_an_ended_coroutine_panics_naming_the_rule() {
    let co = Coroutine::new(|_co| {});
    co.enter();
    let message = panic_message(panic::catch_unwind(AssertUnwindSafe(|| co.enter())).unwrap_err());
    assert!(message.contains("entered after it ended"), "{message}");
    assert!(message.contains(&format!("#{}", co.id())), "{message}");
}

#[test]
fn yielding_while_being_dropped_aborts_with_a_message() {
    const TEST: &str = "yielding_while_being_dropped_aborts_with_a_message";
    if common::is_child(TEST) {
        let co = Coroutine::builder()
            .name("dropped")
            .build(|co| {
                // A local whose destructor yields: it runs when the suspended coroutine is
                // dropped and its stack unwound.
                struct Yielder<'a>(&'a aiocoro::coroutine::Co);
                impl Drop for Yielder<'_> {
                    fn drop(&mut self) {
                        self.0.yield_now();
                    }
                }
                let _yielder = Yielder(co);
                co.yield_now();
            })
            .unwrap();
        co.enter();
        drop(co);
        unreachable!("dropping a coroutine whose destructor yields must not return");
    }
    let output = common::run_child(TEST);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("yielded while its stack was being unwound"), "{stderr}");
    assert!(stderr.contains("\"dropped\""), "{stderr}");
}

/// Recurses until the stack overflows.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 32]);
    black_box(recurse(depth + 1)) + frame[7]
}

#[test]
fn a_stack_overflow_dies_on_the_guard_page_and_names_the_coroutine() {
    const TEST: &str = "a_stack_overflow_dies_on_the_guard_page_and_names_the_coroutine";
    if common::is_child(TEST) {
        let co = Coroutine::builder()
            .name("deep")
            .stack_size(64 * 1024)
            .build(|_co| {
                black_box(recurse(0));
            })
            .unwrap();
        co.enter();
        unreachable!("infinite recursion must not return");
    }
    let output = common::run_child(TEST);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("aiocoro: stack overflow in coroutine #"), "{stderr}");
    assert!(stderr.contains("\"deep\""), "{stderr}");
    assert!(stderr.contains("guard page"), "{stderr}");
}

/// Pooled stacks lie next to each other in one reservation: the overflowing stack's guard is all
/// that separates it from the top of its suspended neighbour's stack.
#[test]
fn a_pooled_stack_between_suspended_neighbours_overflows_into_its_guard() {
    const TEST: &str = "a_pooled_stack_between_suspended_neighbours_overflows_into_its_guard";
    if common::is_child(TEST) {
        let neighbours: Vec<Coroutine> = (0..100)
            .map(|_| {
                let co = Coroutine::new(|co| co.yield_now());
                co.enter();
                co
            })
            .collect();
        let co = Coroutine::builder()
            .name("between")
            .build(|_co| {
                black_box(recurse(0));
            })
            .unwrap();
        let more: Vec<Coroutine> = (0..100)
            .map(|_| {
                let co = Coroutine::new(|co| co.yield_now());
                co.enter();
                co
            })
            .collect();
        co.enter();
        drop((neighbours, more));
        unreachable!("infinite recursion must not return");
    }
    let output = common::run_child(TEST);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("aiocoro: stack overflow in coroutine #101 \"between\""), "{stderr}");
    assert!(stderr.contains("guard page"), "{stderr}");
}

/// Where the kernel refuses guard regions (here because `mlockall(MCL_FUTURE)` locks every new
/// mapping, and locked memory cannot have them), each stack falls back to a `PROT_NONE` guard page
/// of its own, two mappings per stack as before reservations, and an overflow still dies on the
/// guard and is reported.
#[test]
fn without_guard_regions_stacks_get_guard_pages_that_still_catch_an_overflow() {
    const TEST: &str = "without_guard_regions_stacks_get_guard_pages_that_still_catch_an_overflow";
    if common::is_child(TEST) {
        // Small stacks keep the locked reservations far below the default RLIMIT_MEMLOCK.
        pool::configure(PoolConfig { stack_size: MIN_STACK_SIZE, ..PoolConfig::DEFAULT });
        // SAFETY: mlockall only changes how this process's future mappings are kept in memory
        // (locked once faulted in); it touches no Rust object.
        let locked = unsafe { libc::mlockall(libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        assert_eq!(locked, 0, "mlockall: {}", std::io::Error::last_os_error());
        let before = process_memory::mapping_count();
        let neighbours: Vec<Coroutine> = (0..50)
            .map(|_| {
                let co = Coroutine::new(|co| co.yield_now());
                co.enter();
                co
            })
            .collect();
        let added = process_memory::mapping_count() - before;
        assert!(added >= 90, "50 stacks with guard pages of their own: {added} mappings added");
        let co = Coroutine::builder()
            .name("locked")
            .build(|_co| {
                black_box(recurse(0));
            })
            .unwrap();
        co.enter();
        drop(neighbours);
        unreachable!("infinite recursion must not return");
    }
    let output = common::run_child(TEST);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "{:?}\n{stderr}", output.status);
    assert!(stderr.contains("aiocoro: stack overflow in coroutine #51 \"locked\""), "{stderr}");
    assert!(stderr.contains("guard page"), "{stderr}");
}
