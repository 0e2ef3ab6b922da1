//! The raw format (QEMU's `raw`): the guest sees the bytes of its `file` child as they are,
//! optionally through a window (`offset`, `size`).

use std::io::{self, IoSlice, IoSliceMut};

use aiocoro::coroutine::Co;

use crate::driver::{BlockDriver, BlockStatus};
use crate::error::{invalid_input, unsupported};
use crate::node::Child;

/// The window of the child a raw node shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// Where the guest's byte 0 is in the child.
    pub offset: u64,
    /// The guest's length; the rest of the child after `offset` when `None`.
    pub size: Option<u64>,
}

/// The raw format over a `file` child.
#[derive(Debug)]
pub struct RawDriver {
    file: Child,
    options: RawOptions,
}

impl RawDriver {
    /// A raw node showing `options`' window of `file`.
    ///
    /// # Errors
    ///
    /// If the window does not lie inside the child, or is not aligned to its requests.
    pub fn new(file: Child, options: RawOptions) -> io::Result<RawDriver> {
        let child = file.node();
        let (length, alignment) = (child.length(), child.alignment());
        let end =
            options.size.map_or(Some(options.offset), |size| options.offset.checked_add(size));
        match end {
            Some(end) if end <= length && options.offset <= length => {}
            _ => {
                return Err(invalid_input(format!(
                    "raw: the window at offset {} of {} bytes does not fit in the {length} bytes \
                     of node '{}'",
                    options.offset,
                    options.size.map_or("all remaining".to_string(), |size| size.to_string()),
                    child.name()
                )));
            }
        }
        if !alignment.fits(options.offset, options.size.unwrap_or(0)) {
            return Err(invalid_input(format!(
                "raw: offset {} and size must be multiples of {} (node '{}')",
                options.offset,
                alignment.request,
                child.name()
            )));
        }
        Ok(RawDriver { file, options })
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        let child = self.file.node().length();
        Ok(self.options.size.unwrap_or_else(|| child.saturating_sub(self.options.offset)))
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.file.node().read(co, self.options.offset + offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.file.node().write(co, self.options.offset + offset, bufs)
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        self.file.node().flush(co)
    }

    fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        self.file.node().discard(co, self.options.offset + offset, len)
    }

    fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.file.node().write_zeroes(co, self.options.offset + offset, len, may_unmap)
    }

    fn can_zero_fast(&self, offset: u64, len: u64) -> bool {
        self.file.node().driver().can_zero_fast(self.options.offset + offset, len)
    }

    fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.file.node().block_status(co, self.options.offset + offset, len)
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        if self.options.size.is_some() {
            return Err(unsupported("raw: a node with a fixed size cannot resize"));
        }
        self.file.node().truncate(co, self.options.offset + len)
    }
}
