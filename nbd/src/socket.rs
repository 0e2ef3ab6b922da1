//! A non-blocking socket read and written from a coroutine: a call that would block
//! suspends the coroutine until the descriptor is ready, and the context runs others.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use aiocoro::coroutine::Co;

/// A non-blocking stream (TCP or Unix) used from the coroutine `co`.
pub struct CoSocket<'a, S> {
    co: &'a Co,
    stream: &'a S,
    fd: RawFd,
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
    pub fn new(co: &'a Co, stream: &'a S) -> CoSocket<'a, S> {
        CoSocket { co, stream, fd: stream.as_raw_fd() }
    }

    /// Fills `buf`; `UnexpectedEof` if the peer closes its side first.
    pub fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match { self.stream }.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => buf = &mut buf[read..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.co.wait_readable(self.fd)?
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Writes all of `data`, suspending while the send buffer is full.
    pub fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match { self.stream }.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => data = &data[written..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.co.wait_writable(self.fd)?
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
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
