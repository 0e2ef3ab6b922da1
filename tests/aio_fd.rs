//! File-descriptor handlers and coroutine waits on real pipes, sockets, eventfds and files.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use aiocoro::aio::{AioContext, FdHandler};

#[test]
fn a_read_handler_runs_while_the_pipe_has_data() {
    let ctx = AioContext::new().unwrap();
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let fd = reader.as_raw_fd();
    let calls = Rc::new(Cell::new(0));
    let c = calls.clone();
    ctx.set_fd_handler(fd, FdHandler::new().on_readable(move || c.set(c.get() + 1))).unwrap();
    assert!(!ctx.poll(false), "an empty pipe is not readable");
    writer.write_all(b"hello").unwrap();
    assert!(ctx.poll(false));
    assert!(ctx.poll(false), "level-triggered: still readable");
    let mut buffer = [0; 5];
    reader.read_exact(&mut buffer).unwrap();
    let before = calls.get();
    assert!(!ctx.poll(false));
    assert_eq!(calls.get(), before);
    ctx.remove_fd_handler(fd).unwrap();
    writer.write_all(b"x").unwrap();
    assert!(!ctx.poll(false), "a removed handler is not called");
}

#[test]
fn handlers_can_be_changed_and_removed_from_inside_a_handler() {
    let ctx = AioContext::new().unwrap();
    let (reader, mut writer) = std::io::pipe().unwrap();
    let fd = reader.as_raw_fd();
    let log = Rc::new(RefCell::new(Vec::new()));
    let (l, ctx2) = (log.clone(), ctx.clone());
    ctx.set_fd_handler(
        fd,
        FdHandler::new().on_readable(move || {
            l.borrow_mut().push("first");
            let l2 = l.clone();
            let ctx3 = ctx2.clone();
            // Replace ourselves with a handler that removes itself.
            ctx2.set_fd_handler(
                fd,
                FdHandler::new().on_readable(move || {
                    l2.borrow_mut().push("second");
                    ctx3.remove_fd_handler(fd).unwrap();
                }),
            )
            .unwrap();
        }),
    )
    .unwrap();
    writer.write_all(b"x").unwrap();
    for _ in 0..4 {
        ctx.poll(false);
    }
    assert_eq!(*log.borrow(), ["first", "second"]);
    drop(reader);
}

#[test]
fn a_write_handler_runs_when_the_pipe_has_room() {
    let ctx = AioContext::new().unwrap();
    let (_reader, writer) = std::io::pipe().unwrap();
    let writable = Rc::new(Cell::new(false));
    let w = writable.clone();
    ctx.set_fd_handler(writer.as_raw_fd(), FdHandler::new().on_writable(move || w.set(true)))
        .unwrap();
    ctx.poll(false);
    assert!(writable.get());
    ctx.remove_fd_handler(writer.as_raw_fd()).unwrap();
}

#[test]
fn coroutines_wait_for_readable_and_writable_descriptors() {
    let ctx = AioContext::new().unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let received = Rc::new(RefCell::new(Vec::new()));
    let r = received.clone();
    let reader = ctx.spawn(move |co| {
        let mut a = a;
        let mut buffer = [0u8; 64];
        while r.borrow().len() < 11 {
            co.wait_readable(a.as_raw_fd()).unwrap();
            match a.read(&mut buffer) {
                Ok(n) => r.borrow_mut().extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    });
    let writer = ctx.spawn(move |co| {
        let mut b = b;
        for chunk in [&b"hello "[..], b"world"] {
            co.wait_writable(b.as_raw_fd()).unwrap();
            b.write_all(chunk).unwrap();
            co.sleep(std::time::Duration::from_millis(1));
        }
    });
    reader.join().unwrap();
    writer.join().unwrap();
    assert_eq!(*received.borrow(), b"hello world");
}

#[test]
fn a_closed_descriptor_is_a_clear_error() {
    let ctx = AioContext::new().unwrap();
    // A number far above any descriptor limit: closed for sure, and (unlike a descriptor this
    // test closes itself) never reused by a test running on another thread.
    let fd = 1 << 30;
    let error = ctx.set_fd_handler(fd, FdHandler::new().on_readable(|| {})).unwrap_err();
    assert!(error.to_string().contains(&format!("file descriptor {fd}")), "{error}");
    let message = ctx.run(move |co| co.wait_readable(fd).map_err(|e| e.to_string())).unwrap_err();
    assert!(message.contains("Bad file descriptor"), "{message}");
    assert_eq!(ctx.suspended_coroutines(), 0, "the failed wait left nothing behind");
}

#[test]
fn a_regular_file_is_refused_with_an_error() {
    let ctx = AioContext::new().unwrap();
    let path = std::env::temp_dir().join(format!("aiocoro-fd-test-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let error = ctx.set_fd_handler(file.as_raw_fd(), FdHandler::new().on_readable(|| {}));
    std::fs::remove_file(&path).unwrap();
    let error = error.unwrap_err();
    assert!(error.to_string().contains("cannot watch file descriptor"), "{error}");
}

/// Removes the handlers of a descriptor when dropped (an RAII registration).
struct Registration {
    ctx: AioContext,
    fd: std::os::fd::RawFd,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.ctx.remove_fd_handler(self.fd).unwrap();
    }
}

#[test]
fn replacing_a_handler_may_drop_a_registration_that_its_callback_owned() {
    let ctx = AioContext::new().unwrap();
    let (first, _first_writer) = std::io::pipe().unwrap();
    let (second, _second_writer) = std::io::pipe().unwrap();
    ctx.set_fd_handler(second.as_raw_fd(), FdHandler::new().on_readable(|| {})).unwrap();
    let registration = Registration { ctx: ctx.clone(), fd: second.as_raw_fd() };
    let handler = FdHandler::new().on_readable(move || {
        let _ = &registration;
    });
    ctx.set_fd_handler(first.as_raw_fd(), handler).unwrap();
    // The old handler, and with it the registration of `second`, is dropped here.
    ctx.remove_fd_handler(first.as_raw_fd()).unwrap();
    assert!(!ctx.poll(false));
}
