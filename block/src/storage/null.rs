//! The null driver (QEMU's `null-co`): a device of a given size that stores nothing, for
//! measuring the block layer itself.

use std::io::{self, IoSlice, IoSliceMut};
use std::time::Duration;

use aiocoro::coroutine::Co;

use crate::driver::{Allocation, BlockDriver, BlockStatus};

/// The null driver's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NullOptions {
    /// The device's length in bytes (QEMU's default: 1 GiB).
    pub size: u64,
    /// Whether reads fill the buffer with zeroes; otherwise they leave it as it is.
    pub read_zeroes: bool,
    /// How long each request sleeps before it completes, to model a device's latency.
    pub latency: Duration,
}

impl Default for NullOptions {
    fn default() -> Self {
        NullOptions { size: 1 << 30, read_zeroes: false, latency: Duration::ZERO }
    }
}

/// A device that stores nothing: writes vanish, reads return zeroes or leave the buffer.
#[derive(Debug)]
pub struct NullDriver {
    options: NullOptions,
}

impl NullDriver {
    /// A null device with `options`.
    pub fn new(options: NullOptions) -> NullDriver {
        NullDriver { options }
    }

    fn delay(&self, co: &Co) {
        if !self.options.latency.is_zero() {
            co.sleep(self.options.latency);
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        Ok(self.options.size)
    }

    fn read(&self, co: &Co, _offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.delay(co);
        if self.options.read_zeroes {
            bufs.iter_mut().for_each(|buf| buf.fill(0));
        }
        Ok(())
    }

    fn write(&self, co: &Co, _offset: u64, _bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.delay(co);
        Ok(())
    }

    fn flush(&self, _co: &Co) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, co: &Co, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        self.delay(co);
        Ok(())
    }

    fn can_zero_fast(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    fn block_status(&self, _co: &Co, _offset: u64, len: u64) -> io::Result<BlockStatus> {
        let allocation = if self.options.read_zeroes { Allocation::Zero } else { Allocation::Data };
        Ok(BlockStatus { allocation, len })
    }
}
