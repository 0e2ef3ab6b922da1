//! A non-blocking socket read and written from a coroutine: a call that would block
//! suspends the coroutine until the descriptor is ready, and the context runs others.
//!
//! A socket made with [`CoSocket::with_read_ahead`] reads what the peer has sent so far in
//! one system call into a buffer of its own and hands it out from there, so that pipelined
//! requests (a header, a payload, the next header...) cost one `recv` per batch instead of
//! one each.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use aiocoro::coroutine::Co;

/// The most parts one `writev` takes (Linux's `UIO_MAXIOV`); more go in several calls.
const MAX_PARTS: usize = 1024;

/// The read-ahead buffer's size: reads this large or larger go straight to the caller's
/// buffer.
const READ_AHEAD: usize = 64 * 1024;

/// A non-blocking stream (TCP or Unix) used from the coroutine `co`.
pub struct CoSocket<'a, S> {
    co: &'a Co,
    stream: &'a S,
    fd: RawFd,
    /// Bytes read from the stream but not yet handed out (only with read-ahead).
    read_ahead: Option<RefCell<ReadAhead>>,
}

/// Received bytes not yet handed out: `buffer[start..end]`.
struct ReadAhead {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<S> std::fmt::Debug for CoSocket<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoSocket").field("fd", &self.fd).finish_non_exhaustive()
    }
}

impl<'a, S: AsRawFd> CoSocket<'a, S>
where
    for<'s> &'s S: Read + Write,
{
    /// Wraps `stream`, which must be in non-blocking mode (else calls block the thread).
    /// It reads no byte more than asked for, so that another reader can take over.
    pub fn new(co: &'a Co, stream: &'a S) -> CoSocket<'a, S> {
        CoSocket { co, stream, fd: stream.as_raw_fd(), read_ahead: None }
    }

    /// As [`CoSocket::new`], but reading ahead: the bytes it has read beyond what was asked
    /// for are lost with it, so it must be the stream's only reader from now on.
    pub fn with_read_ahead(co: &'a Co, stream: &'a S) -> CoSocket<'a, S> {
        let buffer = vec![0; READ_AHEAD].into_boxed_slice();
        let read_ahead = Some(RefCell::new(ReadAhead { buffer, start: 0, end: 0 }));
        CoSocket { co, stream, fd: stream.as_raw_fd(), read_ahead }
    }

    /// Fills `buf`; `UnexpectedEof` if the peer closes its side first.
    pub fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        let Some(read_ahead) = &self.read_ahead else {
            while !buf.is_empty() {
                let read = self.read_some(buf)?;
                buf = &mut buf[read..];
            }
            return Ok(());
        };
        let mut ahead = read_ahead.borrow_mut();
        while !buf.is_empty() {
            let ReadAhead { buffer, start, end } = &mut *ahead;
            if *start < *end {
                let taken = buf.len().min(*end - *start);
                buf[..taken].copy_from_slice(&buffer[*start..*start + taken]);
                *start += taken;
                buf = &mut buf[taken..];
            } else if buf.len() >= READ_AHEAD {
                let read = self.read_some(buf)?;
                buf = &mut buf[read..];
            } else {
                *end = self.read_some(buffer)?;
                *start = 0;
            }
        }
        Ok(())
    }

    /// Reads at least one byte into `buf`, waiting until some arrive; `UnexpectedEof` if
    /// the peer has closed its side.
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match { self.stream }.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => return Ok(read),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.co.wait_readable(self.fd)?
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Writes all of `data`, suspending while the send buffer is full.
    pub fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&mut [IoSlice::new(data)])
    }

    /// Writes all of `parts` one after the other, with as few system calls as the send
    /// buffer allows (one when it has room), suspending while it is full.
    pub fn write_all_vectored(&self, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut parts, 0); // Skips empty parts.
        while !parts.is_empty() {
            let batch = &parts[..parts.len().min(MAX_PARTS)];
            match { self.stream }.write_vectored(batch) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut parts, written),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.co.wait_writable(self.fd)?
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Lets the other coroutines of this thread's context run (and its events be polled),
    /// then continues ([`Co::reschedule`]): for a loop that reads and writes without ever
    /// waiting when its peer keeps the socket full and empty, which would hold the thread.
    ///
    /// # Panics
    ///
    /// If the calling thread has no [`AioContext`](aiocoro::aio::AioContext).
    pub fn let_others_run(&self) {
        self.co.reschedule();
    }

    /// Reads a big-endian `u32`.
    pub fn read_u32(&self) -> io::Result<u32> {
        let mut bytes = [0; 4];
        self.read_exact(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    /// Reads a big-endian `u64`.
    pub fn read_u64(&self) -> io::Result<u64> {
        let mut bytes = [0; 8];
        self.read_exact(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }
}
