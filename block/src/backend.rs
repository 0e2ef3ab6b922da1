//! The user's handle on a node (QEMU's `BlockBackend`): checked requests, in-flight
//! counting, drained sections; shared by every thread that submits requests (multiqueue).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro::coroutine::Co;

use crate::drain::RequestGate;
use crate::driver::BlockStatus;
use crate::error::{Op, RequestError, invalid_input};
use crate::node::BlockNode;

/// A handle on a block node for submitting requests; `Send + Sync` and cheap to clone, so
/// that every IoThread submits through the same backend (multiqueue). Each request runs in
/// the coroutine that calls it, in that thread's context.
///
/// Requests are checked before they reach the node: inside the node's length, no overflow,
/// aligned to the node's [`Alignment`](crate::Alignment); a bad one is an `InvalidInput`
/// error that names the node and the request.
///
/// ```
/// use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
///
/// let graph = BlockGraph::new();
/// let blk = run_in_coroutine(move |co| {
///     let (_, node) = aiocoro_block::open(co, &graph, "driver=null-co,size=1M,read-zeroes=on")?;
///     let blk = BlockBackend::new(node);
///     let mut buf = [1u8; 512];
///     blk.read(co, 4096, &mut buf)?;
///     assert_eq!(buf, [0; 512]);
///     let error = blk.read(co, 1 << 20, &mut buf).unwrap_err();
///     assert!(error.to_string().contains("out of range"), "{error}");
///     Ok::<_, std::io::Error>(blk)
/// })??;
/// assert_eq!(blk.length(), 1 << 20);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct BlockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    root: Arc<BlockNode>,
    gate: RequestGate,
}

/// A drained section of a backend: no request runs while it lives, and new ones wait for
/// its end (QEMU's `bdrv_drained_begin` / `_end`). Made by [`BlockBackend::drain`].
#[must_use = "the section ends when this guard is dropped"]
pub struct Drained<'a> {
    backend: &'a BlockBackend,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        self.backend.inner.gate.end_drain();
    }
}

/// Counts a request out when it ends, however it ends.
struct InFlight<'a>(&'a RequestGate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl BlockBackend {
    /// A backend on `root`.
    pub fn new(root: Arc<BlockNode>) -> BlockBackend {
        BlockBackend { inner: Arc::new(Inner { root, gate: RequestGate::default() }) }
    }

    /// The node requests go to.
    pub fn root(&self) -> &Arc<BlockNode> {
        &self.inner.root
    }

    /// The node's length in bytes.
    pub fn length(&self) -> u64 {
        self.inner.root.length()
    }

    /// Requests running now, on every thread.
    pub fn in_flight(&self) -> u64 {
        self.inner.gate.in_flight()
    }

    /// Waits until no request runs, on any thread, and holds new ones back until the
    /// returned guard is dropped. Call it outside any coroutine; a thread with an
    /// `AioContext` keeps running it meanwhile.
    ///
    /// # Panics
    ///
    /// Inside a coroutine.
    pub fn drain(&self) -> Drained<'_> {
        self.inner.gate.begin_drain();
        Drained { backend: self }
    }

    fn refuse(&self, op: Op, message: String) -> io::Error {
        let node = &self.inner.root;
        RequestError::wrap(invalid_input(message), node.name(), node.format_name(), op)
    }

    /// Checks a ranged request: no overflow, inside the node, aligned when `aligned`.
    fn check(&self, op: Op, offset: u64, len: u64, aligned: bool) -> io::Result<()> {
        let Some(end) = offset.checked_add(len).filter(|&end| end <= i64::MAX as u64) else {
            return Err(self.refuse(op, "the request overflows the largest offset".into()));
        };
        let length = self.length();
        if end > length {
            return Err(self.refuse(op, format!("out of range: the node has {length} bytes")));
        }
        let alignment = self.inner.root.alignment();
        if aligned && !alignment.fits(offset, len) {
            let message =
                format!("misaligned: offset and length must be multiples of {}", alignment.request);
            return Err(self.refuse(op, message));
        }
        Ok(())
    }

    fn run<R>(&self, co: &Co, request: impl FnOnce(&BlockNode) -> io::Result<R>) -> io::Result<R> {
        self.inner.gate.enter(co);
        let _in_flight = InFlight(&self.inner.gate);
        request(&self.inner.root)
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error (with the node and request named).
    pub fn read(&self, co: &Co, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.readv(co, offset, &mut [IoSliceMut::new(buf)])
    }

    /// Reads into `bufs`, in order, from `offset`.
    ///
    /// # Errors
    ///
    /// As [`BlockBackend::read`].
    pub fn readv(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len() as u64).sum();
        self.check(Op::Read { offset, len }, offset, len, true)?;
        self.run(co, |node| node.read(co, offset, bufs))
    }

    /// Writes `buf` at `offset`.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error (with the node and request named).
    pub fn write(&self, co: &Co, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.writev(co, offset, &[IoSlice::new(buf)])
    }

    /// Writes `bufs`, in order, at `offset`.
    ///
    /// # Errors
    ///
    /// As [`BlockBackend::write`].
    pub fn writev(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len() as u64).sum();
        self.check(Op::Write { offset, len }, offset, len, true)?;
        self.run(co, |node| node.write(co, offset, bufs))
    }

    /// Makes every completed write stable.
    ///
    /// # Errors
    ///
    /// The node's error.
    pub fn flush(&self, co: &Co) -> io::Result<()> {
        self.run(co, |node| node.flush(co))
    }

    /// Discards `len` bytes at `offset`.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Discard { offset, len }, offset, len, true)?;
        self.run(co, |node| node.discard(co, offset, len))
    }

    /// Makes `len` bytes at `offset` read as zeroes; `may_unmap` lets the node free them.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check(Op::WriteZeroes { offset, len }, offset, len, true)?;
        self.run(co, |node| node.write_zeroes(co, offset, len, may_unmap))
    }

    /// How the range at `offset` reads (see [`BlockStatus`]).
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check(Op::BlockStatus { offset, len }, offset, len, false)?;
        if len == 0 {
            return Err(self.refuse(Op::BlockStatus { offset, len }, "an empty range".into()));
        }
        self.run(co, |node| node.block_status(co, offset, len))
    }

    /// Resizes the node to `len` bytes.
    ///
    /// # Errors
    ///
    /// If the node cannot resize, or its error.
    pub fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        if len > i64::MAX as u64 {
            return Err(self.refuse(Op::Truncate { len }, "larger than the largest offset".into()));
        }
        self.run(co, |node| node.truncate(co, len))
    }
}

impl fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBackend")
            .field("root", &self.inner.root)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
