//! File-descriptor handlers over epoll (QEMU's `aio_set_fd_handler`), and the coroutine waits
//! built on them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::Rc;

use super::context::{Local, current_local};
use super::wait::LocalWaker;
use crate::coroutine::Co;
use crate::sys;

/// The callbacks of one file descriptor: what to run when it is readable and when it is
/// writable.
///
/// ```
/// use aiocoro::aio::{AioContext, FdHandler};
/// use std::os::fd::AsRawFd;
/// use std::{cell::Cell, io::Write, rc::Rc};
///
/// let ctx = AioContext::new()?;
/// let (reader, mut writer) = std::io::pipe()?;
/// let readable = Rc::new(Cell::new(false));
/// let r = readable.clone();
/// ctx.set_fd_handler(reader.as_raw_fd(), FdHandler::new().on_readable(move || r.set(true)))?;
/// writer.write_all(b"x")?;
/// while !readable.get() {
///     ctx.poll(true);
/// }
/// ctx.remove_fd_handler(reader.as_raw_fd())?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct FdHandler {
    read: Option<Rc<dyn Fn()>>,
    write: Option<Rc<dyn Fn()>>,
}

impl std::fmt::Debug for FdHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdHandler")
            .field("readable", &self.read.is_some())
            .field("writable", &self.write.is_some())
            .finish()
    }
}

impl FdHandler {
    /// No callbacks: setting it removes a descriptor's handlers.
    pub fn new() -> FdHandler {
        FdHandler::default()
    }

    /// Runs `callback` whenever the descriptor is readable (or has hung up or failed).
    pub fn on_readable(mut self, callback: impl Fn() + 'static) -> FdHandler {
        self.read = Some(Rc::new(callback));
        self
    }

    /// Runs `callback` whenever the descriptor is writable (or has failed).
    pub fn on_writable(mut self, callback: impl Fn() + 'static) -> FdHandler {
        self.write = Some(Rc::new(callback));
        self
    }

    fn is_empty(&self) -> bool {
        self.read.is_none() && self.write.is_none()
    }
}

/// Handlers and waiting coroutines of one descriptor.
#[derive(Default)]
struct Entry {
    handler: FdHandler,
    readers: Vec<LocalWaker>,
    writers: Vec<LocalWaker>,
    /// The events epoll watches for this descriptor now.
    registered: u32,
}

impl Entry {
    fn wanted(&self) -> u32 {
        let mut events = 0;
        if self.handler.read.is_some() || !self.readers.is_empty() {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if self.handler.write.is_some() || !self.writers.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }
}

/// The descriptors a context watches.
#[derive(Default)]
pub(crate) struct FdTable {
    entries: HashMap<RawFd, Entry>,
}

/// What became ready on one descriptor: callbacks to run and coroutines to wake.
pub(crate) struct Ready {
    read: Option<Rc<dyn Fn()>>,
    write: Option<Rc<dyn Fn()>>,
    wakers: Vec<LocalWaker>,
    /// The handler of a descriptor forgotten on the way, dropped with `Ready`, after the
    /// table's borrow.
    _forgotten: Option<FdHandler>,
}

impl Ready {
    /// Wakes the waiters and runs the callbacks (no table borrow is held); returns whether
    /// anything ran.
    pub(crate) fn run(self, local: &Local) -> bool {
        let progress = self.read.is_some() || self.write.is_some() || !self.wakers.is_empty();
        for waker in &self.wakers {
            waker.wake_in(local);
        }
        if let Some(read) = self.read {
            read();
        }
        if let Some(write) = self.write {
            write();
        }
        progress
    }
}

impl FdTable {
    /// Sets the handler of `fd`. Returns the handler that is no longer set (the previous one,
    /// or the new one if epoll refused it), for the caller to drop once it no longer borrows
    /// the table: its callbacks may own values whose drops set handlers too.
    pub(crate) fn set_handler(
        &mut self,
        epoll: BorrowedFd<'_>,
        fd: RawFd,
        handler: FdHandler,
    ) -> (FdHandler, io::Result<()>) {
        if handler.is_empty() && !self.entries.contains_key(&fd) {
            return (handler, Ok(()));
        }
        let entry = self.entries.entry(fd).or_default();
        let previous = std::mem::replace(&mut entry.handler, handler);
        match self.sync(epoll, fd) {
            Ok(()) => (previous, Ok(())),
            Err(error) => match self.entries.get_mut(&fd) {
                Some(entry) => (std::mem::replace(&mut entry.handler, previous), Err(error)),
                None => (previous, Err(error)),
            },
        }
    }

    pub(crate) fn add_waiter(
        &mut self,
        epoll: BorrowedFd<'_>,
        fd: RawFd,
        writable: bool,
        waker: LocalWaker,
    ) -> io::Result<()> {
        let entry = self.entries.entry(fd).or_default();
        let list = if writable { &mut entry.writers } else { &mut entry.readers };
        list.push(waker);
        self.sync(epoll, fd).inspect_err(|_| {
            if let Some(entry) = self.entries.get_mut(&fd) {
                let list = if writable { &mut entry.writers } else { &mut entry.readers };
                list.pop();
            }
        })
    }

    /// Takes what `flags` made ready for the descriptor `token`.
    pub(crate) fn take_ready(&mut self, epoll: BorrowedFd<'_>, token: u64, flags: u32) -> Ready {
        let mut ready = Ready { read: None, write: None, wakers: Vec::new(), _forgotten: None };
        let Ok(fd) = RawFd::try_from(token) else { return ready };
        let Some(entry) = self.entries.get_mut(&fd) else { return ready };
        let failed = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        if failed || flags & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0 {
            ready.read = entry.handler.read.clone();
            ready.wakers.append(&mut entry.readers);
        }
        if failed || flags & libc::EPOLLOUT as u32 != 0 {
            ready.write = entry.handler.write.clone();
            ready.wakers.append(&mut entry.writers);
        }
        if !ready.wakers.is_empty() && self.sync(epoll, fd).is_err() {
            // The descriptor was closed under us; forget it.
            ready._forgotten = self.entries.remove(&fd).map(|entry| entry.handler);
        }
        ready
    }

    /// Makes epoll watch what the entry of `fd` wants, and drops an entry that wants nothing.
    fn sync(&mut self, epoll: BorrowedFd<'_>, fd: RawFd) -> io::Result<()> {
        let Some(entry) = self.entries.get_mut(&fd) else { return Ok(()) };
        let wanted = entry.wanted();
        if wanted == entry.registered {
            if wanted == 0 {
                self.entries.remove(&fd);
            }
            return Ok(());
        }
        let token = fd as u64;
        let result = if wanted == 0 {
            // A descriptor closed meanwhile is already gone from epoll: nothing to undo.
            let _ = sys::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, 0, token);
            Ok(())
        } else if entry.registered == 0 {
            match sys::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, wanted, token) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    sys::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, wanted, token)
                }
                other => other,
            }
        } else {
            match sys::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, wanted, token) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    sys::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, wanted, token)
                }
                other => other,
            }
        };
        match result {
            Ok(()) => {
                entry.registered = wanted;
                if wanted == 0 {
                    self.entries.remove(&fd);
                }
                Ok(())
            }
            Err(error) => Err(io::Error::new(
                error.kind(),
                format!("aiocoro: cannot watch file descriptor {fd}: {error}"),
            )),
        }
    }
}

impl Co {
    /// Suspends this coroutine until `fd` is readable (or has hung up or failed). The base of
    /// coroutine sockets and pipes.
    ///
    /// # Errors
    ///
    /// If `fd` cannot be watched (closed, or a regular file); the error names the descriptor.
    ///
    /// # Panics
    ///
    /// If this thread has no [`AioContext`](super::AioContext).
    pub fn wait_readable(&self, fd: RawFd) -> io::Result<()> {
        self.wait_fd(fd, false)
    }

    /// Suspends this coroutine until `fd` is writable (or has failed).
    ///
    /// # Errors
    ///
    /// As [`Co::wait_readable`].
    pub fn wait_writable(&self, fd: RawFd) -> io::Result<()> {
        self.wait_fd(fd, true)
    }

    fn wait_fd(&self, fd: RawFd, writable: bool) -> io::Result<()> {
        let wait = self.prepare_wait();
        let local = current_local("waiting for a file descriptor");
        local.add_fd_waiter(fd, writable, wait.local_waker())?;
        wait.wait();
        Ok(())
    }
}
