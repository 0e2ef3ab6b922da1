//! Errors of block requests: the OS error, with the node and the request in front of it.

use std::error::Error;
use std::fmt;
use std::io;

/// What a request asked for, as an error names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Write `len` bytes at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Flush to stable storage.
    Flush,
    /// Discard `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Write `len` zero bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Query the allocation status at `offset`.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Resize to `len` bytes.
    Truncate {
        /// The new length.
        len: u64,
    },
    /// Open the node.
    Open,
    /// Close the node (write back what it caches, flush).
    Close,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Read { offset, len } => write!(f, "read of {len} bytes at offset {offset}"),
            Op::Write { offset, len } => write!(f, "write of {len} bytes at offset {offset}"),
            Op::Flush => f.write_str("flush"),
            Op::Discard { offset, len } => write!(f, "discard of {len} bytes at offset {offset}"),
            Op::WriteZeroes { offset, len } => {
                write!(f, "write-zeroes of {len} bytes at offset {offset}")
            }
            Op::BlockStatus { offset, len } => {
                write!(f, "block status of {len} bytes at offset {offset}")
            }
            Op::Truncate { len } => write!(f, "truncate to {len} bytes"),
            Op::Open => f.write_str("open"),
            Op::Close => f.write_str("close"),
        }
    }
}

/// A failed request: which node, which driver, what was asked, and the cause (the
/// [`source`](Error::source)). It travels inside an [`io::Error`] of the cause's kind:
/// `node 'disk' (file): read of 4096 bytes at offset 8192: Input/output error (os error 5)`.
#[derive(Debug)]
pub struct RequestError {
    /// The node's name.
    pub node: String,
    /// The node's driver (`file`, `raw`, `null-co`, ...).
    pub driver: &'static str,
    /// The request.
    pub op: Op,
    source: io::Error,
}

impl RequestError {
    /// Wraps `source` with the node and request, unless it already names a node (the
    /// innermost node's context is the useful one).
    pub fn wrap(source: io::Error, node: &str, driver: &'static str, op: Op) -> io::Error {
        if source.get_ref().is_some_and(|inner| inner.is::<RequestError>()) {
            return source;
        }
        let kind = source.kind();
        io::Error::new(kind, RequestError { node: node.to_owned(), driver, op, source })
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node '{}' ({}): {}: {}", self.node, self.driver, self.op, self.source)
    }
}

impl Error for RequestError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// An `InvalidInput` error with `message`, for requests and options that make no sense.
pub fn invalid_input(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// An `Unsupported` error with `message`, for what a driver cannot do.
pub fn unsupported(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, message.into())
}
