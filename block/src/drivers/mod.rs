//! The drivers: `file` and `null-co` (protocols), `raw` (a format).

mod file;
mod file_lock;
mod null;
mod raw;

pub use file::{AioMode, CacheMode, FileDriver, FileOptions};
pub use file_lock::Locking;
pub use null::{NullDriver, NullOptions};
pub use raw::{RawDriver, RawOptions};
