//! Storage drivers (QEMU's protocol drivers): where an image's bytes live. `file` (a regular
//! file or block device, io_uring or the thread pool, page cache or `O_DIRECT`, QEMU's image
//! locks) and `null-co` (reads zeroes, drops writes: for benchmarks). A format driver
//! ([`format`](mod@crate::format)) sits on one of these as its `file` child.

mod file;
mod file_lock;
mod null;

pub use file::{AioMode, CacheMode, FileDriver, FileOptions};
pub use file_lock::Locking;
pub use null::{NullDriver, NullOptions};
