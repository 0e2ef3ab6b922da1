//! The replies of one connection on their way out. Small replies are queued and sent
//! together by one flush that runs after the requests finishing in the same round of the
//! event loop, in one system call instead of one each; a large reply, or one that finds the
//! queue full, is written at once.
//! Either way a reply goes out whole: writing happens under one lock.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;

use aiocoro::coroutine::Co;
use aiocoro::sync::CoMutex;

use crate::socket::CoSocket;

/// Replies up to this size (header and data) are queued; larger ones are written at once
/// (copying them would cost more than the system call it saves).
const QUEUED_MAX: usize = 16 * 1024;
/// The most bytes queued. Past it a reply is written at once, its request waiting (and
/// counting against the connection's in-flight limit) while the socket is full: a client
/// that stops reading replies stops the reader instead of growing the queue.
const QUEUE_LIMIT: usize = 256 * 1024;

/// The replies of one connection not yet written, and the lock writers take.
pub(crate) struct Outbox {
    /// Held while writing, so that replies go out whole.
    writer: CoMutex<()>,
    /// Queued replies, back to back.
    queued: RefCell<Vec<u8>>,
    /// An emptied queue kept for reuse (no allocation per flush).
    spare: Cell<Vec<u8>>,
    /// Whether a flush is scheduled for what is queued.
    flush_scheduled: Cell<bool>,
}

impl Outbox {
    /// An empty outbox.
    pub(crate) fn new() -> Outbox {
        Outbox {
            writer: CoMutex::new(()),
            queued: RefCell::new(Vec::new()),
            spare: Cell::new(Vec::new()),
            flush_scheduled: Cell::new(false),
        }
    }

    /// Sends the reply made of `parts`: queues a small one (calling `schedule_flush` when
    /// the queue was empty: it must arrange for [`Outbox::flush`] to run soon, after the
    /// coroutines ready now), or writes a large one on `socket` at once.
    ///
    /// # Errors
    ///
    /// Writing a large reply failed (the connection is broken).
    pub(crate) fn send<S: AsRawFd>(
        &self,
        co: &Co,
        socket: &CoSocket<'_, S>,
        parts: &mut [IoSlice<'_>],
        schedule_flush: impl FnOnce(),
    ) -> io::Result<()>
    where
        for<'s> &'s S: Read + Write,
    {
        let length: usize = parts.iter().map(|part| part.len()).sum();
        if length > QUEUED_MAX || self.queued.borrow().len() + length > QUEUE_LIMIT {
            let _writing = self.writer.lock(co);
            return socket.write_all_vectored(parts);
        }
        let mut queued = self.queued.borrow_mut();
        for part in parts.iter() {
            queued.extend_from_slice(part);
        }
        if !self.flush_scheduled.replace(true) {
            schedule_flush();
        }
        Ok(())
    }

    /// Writes every queued reply on `socket` (nothing if none is queued).
    ///
    /// # Errors
    ///
    /// Writing failed (the connection is broken; the queued replies are dropped).
    pub(crate) fn flush<S: AsRawFd>(&self, co: &Co, socket: &CoSocket<'_, S>) -> io::Result<()>
    where
        for<'s> &'s S: Read + Write,
    {
        let _writing = self.writer.lock(co);
        self.flush_scheduled.set(false);
        let mut replies = self.queued.replace(self.spare.take());
        let written = socket.write_all(&replies);
        replies.clear();
        self.spare.set(replies);
        written
    }
}
