//! The user's handle on a node (QEMU's `BlockBackend`): checked requests, in-flight
//! counting, drained sections; shared by every thread that submits requests (multiqueue).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro::coroutine::Co;
use aiocoro::sync::{CoRwLock, QuiesceGate, Quiesced};

use crate::buffer::IoBuffer;
use crate::driver::BlockStatus;
use crate::error::{Op, RequestError, invalid_input};
use crate::node::BlockNode;
use crate::padding;
use crate::status_above::{ChainStatus, block_status_above};

/// A handle on a block node for submitting requests; `Send + Sync` and cheap to clone, so
/// that every IoThread submits through the same backend (multiqueue). Each request runs in
/// the coroutine that calls it, in that thread's context.
///
/// Requests are checked before they reach the node: inside the node's length, no overflow; a
/// bad one is an `InvalidInput` error that names the node and the request. Requests that are
/// not aligned to the node's [`Alignment`](crate::Alignment) (an `O_DIRECT` file takes whole
/// sectors) are widened through a bounce buffer: reads of the covering range, writes as a
/// read-modify-write that runs alone among the writes (QEMU's request padding and
/// serialising requests), discards shrunk to the aligned part (a discard is advisory).
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
    gate: QuiesceGate,
    /// Taken shared by aligned writes and exclusively by padded (read-modify-write) ones, on
    /// nodes whose requests need alignment: a write landing between a padded write's read
    /// and its write would be overwritten with the old bytes.
    rmw: CoRwLock<()>,
}

/// A drained section of a backend: no request runs while it lives, and new ones wait for
/// its end (QEMU's `bdrv_drained_begin` / `_end`). Made by [`BlockBackend::drain`].
#[must_use = "the section ends when this guard is dropped"]
pub struct Drained<'a> {
    _section: Quiesced<'a>,
}

impl std::fmt::Debug for Drained<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drained").finish_non_exhaustive()
    }
}

impl BlockBackend {
    /// A backend on `root`.
    pub fn new(root: Arc<BlockNode>) -> BlockBackend {
        let rmw = CoRwLock::new(());
        BlockBackend { inner: Arc::new(Inner { root, gate: QuiesceGate::new(), rmw }) }
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
    /// Inside a coroutine; and as a coroutine or callback that this thread's context runs
    /// meanwhile panics (the section is closed again on the way out).
    pub fn drain(&self) -> Drained<'_> {
        assert!(
            !aiocoro::coroutine::in_coroutine(),
            "aiocoro-block: BlockBackend::drain called inside a coroutine; drain from outside \
             any coroutine (the thread's event loop level)"
        );
        Drained { _section: self.inner.gate.quiesce() }
    }

    fn refuse(&self, op: Op, message: String) -> io::Error {
        let node = &self.inner.root;
        RequestError::wrap(invalid_input(message), node.name(), node.format_name(), op)
    }

    /// Checks a ranged request: no overflow, inside the node.
    fn check(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        let Some(end) = offset.checked_add(len).filter(|&end| end <= i64::MAX as u64) else {
            return Err(self.refuse(op, "the request overflows the largest offset".into()));
        };
        let length = self.length();
        if end > length {
            return Err(self.refuse(op, format!("out of range: the node has {length} bytes")));
        }
        Ok(())
    }

    /// The alignment requests need, if the range does not have it.
    fn misaligned(&self, offset: u64, len: u64) -> Option<u64> {
        let alignment = self.inner.root.alignment();
        (!alignment.fits(offset, len)).then_some(alignment.request)
    }

    /// Refuses a padded write that would reach past the node's end (its length is not a
    /// multiple of the alignment, and the write touches the partial last block).
    fn check_padded_write(&self, op: Op, offset: u64, len: u64, align: u64) -> io::Result<()> {
        let (_, end) = padding::widen(offset, len, align);
        let length = self.length();
        if end > length {
            return Err(self.refuse(
                op,
                format!(
                    "misaligned: the node's last {} bytes are a partial block of {align} bytes, \
                     which writes cannot reach",
                    length % align
                ),
            ));
        }
        Ok(())
    }

    fn run<R>(&self, co: &Co, request: impl FnOnce(&BlockNode) -> io::Result<R>) -> io::Result<R> {
        // Counts the request out when it ends, however it ends.
        let _in_flight = self.inner.gate.enter(co);
        // Once started, the request runs to its end even if the coroutine's context shuts
        // down meanwhile (a padded write's read and write included), as a node's requests do;
        // once the context cancels, it does not start.
        co.run_uncancellable(|| request(&self.inner.root))
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
        self.check(Op::Read { offset, len }, offset, len)?;
        match self.misaligned(offset, len) {
            None => self.run(co, |node| node.read(co, offset, bufs)),
            Some(_) if len == 0 => Ok(()),
            Some(align) => self.run(co, |node| padding::read(co, node, offset, bufs, align)),
        }
    }

    /// Writes `buf` at `offset`.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error (with the node and request named).
    pub fn write(&self, co: &Co, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.writev(co, offset, &[IoSlice::new(buf)])
    }

    /// Writes `buf` at `offset` compressed, for formats that store compressed clusters
    /// (qcow2; QEMU's `blk_co_pwrite_compressed`): `offset` must start a cluster and `buf`
    /// cover whole clusters, the last of which may end at the end of the image. A cluster
    /// that does not compress is written as it is.
    ///
    /// # Errors
    ///
    /// A refused request; `Unsupported` for a format without compression; `InvalidInput`
    /// for a request that is not whole clusters; the node's error.
    pub fn write_compressed(&self, co: &Co, offset: u64, buf: &[u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check(Op::Write { offset, len }, offset, len)?;
        let align = self.inner.root.alignment().request;
        self.run(co, |node| {
            // Whole clusters: never padded, but ordered with padded writes as writes are.
            let _shared = (align != 1).then(|| self.inner.rmw.read(co));
            node.write_compressed(co, offset, &[IoSlice::new(buf)])
        })
    }

    /// Writes `bufs`, in order, at `offset`.
    ///
    /// # Errors
    ///
    /// As [`BlockBackend::write`]; also a misaligned write that would have to reach past the
    /// end of a node whose length is not a multiple of its alignment.
    pub fn writev(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len() as u64).sum();
        let op = Op::Write { offset, len };
        self.check(op, offset, len)?;
        let align = self.inner.root.alignment().request;
        match self.misaligned(offset, len) {
            None if align == 1 => self.run(co, |node| node.write(co, offset, bufs)),
            None => self.run(co, |node| {
                let _shared = self.inner.rmw.read(co);
                node.write(co, offset, bufs)
            }),
            Some(_) if len == 0 => Ok(()),
            Some(align) => {
                self.check_padded_write(op, offset, len, align)?;
                self.run(co, |node| {
                    let _alone = self.inner.rmw.write(co);
                    padding::write(co, node, offset, bufs, align)
                })
            }
        }
    }

    /// Makes every completed write stable.
    ///
    /// # Errors
    ///
    /// The node's error.
    pub fn flush(&self, co: &Co) -> io::Result<()> {
        self.run(co, |node| node.flush(co))
    }

    /// Closes the node (see [`BlockNode::close`]): writes back what it caches, flushes, and
    /// refuses later requests. Call it once no other request of this backend runs.
    ///
    /// # Errors
    ///
    /// The flush error; the node then stays open.
    pub fn close(&self, co: &Co) -> io::Result<()> {
        self.run(co, |node| node.close(co))
    }

    /// Discards `len` bytes at `offset`; on a node that needs alignment, only the aligned
    /// blocks inside the range (a discard is advisory).
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Discard { offset, len }, offset, len)?;
        let (offset, len) = match self.misaligned(offset, len) {
            None => (offset, len),
            Some(align) => match padding::shrink(offset, len, align) {
                (start, end) if start == end => return Ok(()),
                (start, end) => (start, end - start),
            },
        };
        self.run(co, |node| node.discard(co, offset, len))
    }

    /// Makes `len` bytes at `offset` read as zeroes; `may_unmap` lets the node free them.
    /// On a node that needs alignment, a misaligned head and tail are written as zero bytes
    /// (padded, alone among the writes), the aligned middle as zeroes.
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let op = Op::WriteZeroes { offset, len };
        self.check(op, offset, len)?;
        let align = self.inner.root.alignment().request;
        let Some(align) = self.misaligned(offset, len).filter(|_| len != 0) else {
            return self.run(co, |node| {
                let _shared = (align != 1).then(|| self.inner.rmw.read(co));
                node.write_zeroes(co, offset, len, may_unmap)
            });
        };
        self.check_padded_write(op, offset, len, align)?;
        // Whole blocks in the middle; partial ones at either end, written as zero bytes.
        let (start, stop) = padding::shrink(offset, len, align);
        let (head, middle, tail) = ((offset, start), (start, stop), (stop, offset + len));
        self.run(co, |node| {
            let _alone = self.inner.rmw.write(co);
            let zeroes = IoBuffer::zeroed(align as usize);
            for (from, to) in [head, tail] {
                if from < to {
                    let bytes = [IoSlice::new(&zeroes[..(to - from) as usize])];
                    padding::write(co, node, from, &bytes, align)?;
                }
            }
            if middle.0 < middle.1 {
                node.write_zeroes(co, middle.0, middle.1 - middle.0, may_unmap)?;
            }
            Ok(())
        })
    }

    /// Whether [`BlockBackend::write_zeroes`] of the range would write no zero buffers
    /// ([`BlockDriver::can_zero_fast`](crate::BlockDriver::can_zero_fast); a range the node's
    /// alignment makes pad is not fast): what NBD's `FAST_ZERO` asks before zeroing.
    pub fn can_zero_fast(&self, offset: u64, len: u64) -> bool {
        len == 0
            || (self.misaligned(offset, len).is_none()
                && self.inner.root.driver().can_zero_fast(offset, len))
    }

    /// How the range at `offset` reads (see [`BlockStatus`]).
    ///
    /// # Errors
    ///
    /// A refused request, or the node's error.
    pub fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check(Op::BlockStatus { offset, len }, offset, len)?;
        if len == 0 {
            return Err(self.refuse(Op::BlockStatus { offset, len }, "an empty range".into()));
        }
        self.run(co, |node| node.block_status(co, offset, len))
    }

    /// How the range at `offset` reads through the node's backing chain, and from which
    /// layer (see [`ChainStatus`]): what an NBD server reports for `base:allocation` and
    /// `qemu:allocation-depth`.
    ///
    /// # Errors
    ///
    /// A refused request, or a node's error.
    pub fn block_status_above(&self, co: &Co, offset: u64, len: u64) -> io::Result<ChainStatus> {
        self.check(Op::BlockStatus { offset, len }, offset, len)?;
        if len == 0 {
            return Err(self.refuse(Op::BlockStatus { offset, len }, "an empty range".into()));
        }
        self.run(co, |node| block_status_above(co, node, offset, len))
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
