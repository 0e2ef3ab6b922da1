//! Errors of file I/O that name the call that failed: `preadv(fd 7, offset 4096): Bad file
//! descriptor (os error 9)`, with the bare OS error as the source.

use std::error::Error;
use std::fmt;
use std::io;

/// An I/O error with the call that failed in front of it.
#[derive(Debug)]
struct OpError {
    op: String,
    source: io::Error,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.source)
    }
}

impl Error for OpError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// `error`, with `op` (the call, as `preadv(fd 7, offset 4096)`) in front of it.
pub(super) fn with_context(error: io::Error, op: String) -> io::Error {
    io::Error::new(error.kind(), OpError { op, source: error })
}
