//! The driver trait every node of the block graph implements (QEMU's `BlockDriver`).

use std::any::Any;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro::coroutine::Co;

use crate::buffer::IoBuffer;
use crate::node::BlockNode;

/// The largest write the default [`BlockDriver::write_zeroes`] makes at once.
const ZERO_CHUNK: usize = 1 << 20;

/// What requests a driver takes as they are (QEMU's `request_alignment` and
/// `min_mem_alignment`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// Offsets and lengths of reads and writes must be multiples of this (a power of two).
    pub request: u64,
    /// Buffers whose addresses are multiples of this (and whose lengths are multiples of
    /// both alignments) avoid a bounce buffer (a power of two). Any buffer works; others
    /// cost a copy.
    pub memory: usize,
}

impl Alignment {
    /// Any byte offset, any buffer.
    pub const BYTE: Alignment = Alignment { request: 1, memory: 1 };

    /// Whether `offset` and `len` are multiples of the request alignment.
    pub fn fits(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.request) && len.is_multiple_of(self.request)
    }

    /// What satisfies both: the larger of each alignment (both are powers of two).
    ///
    /// ```
    /// use aiocoro_block::Alignment;
    ///
    /// let direct = Alignment { request: 4096, memory: 512 };
    /// let other = Alignment { request: 512, memory: 4096 };
    /// assert_eq!(direct.join(other), Alignment { request: 4096, memory: 4096 });
    /// assert_eq!(Alignment::BYTE.join(direct), direct);
    /// ```
    pub fn join(self, other: Alignment) -> Alignment {
        Alignment {
            request: self.request.max(other.request),
            memory: self.memory.max(other.memory),
        }
    }
}

/// How a range of a node reads (QEMU's `BDRV_BLOCK_DATA` / `_ZERO` / `_ALLOCATED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Allocation {
    /// Data stored in this node.
    Data,
    /// Reads as zeroes (a hole, a zero cluster).
    Zero,
    /// Not stored here: reads come from the backing node, or as zeroes without one.
    Unallocated,
}

/// The status of the start of a range: the first `len` bytes all read as `allocation` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// How the bytes read.
    pub allocation: Allocation,
    /// How many bytes from the asked offset share that status (at least 1, at most the
    /// asked length).
    pub len: u64,
}

/// A block driver: a format (qcow2, raw) or a protocol (file, null) behind a node. Methods
/// that do I/O are coroutine functions (they take `&Co`); they run in the context of the
/// thread that submitted the request, and several threads call them at once.
///
/// Requests reach a driver already checked by the [`BlockBackend`](crate::BlockBackend):
/// inside the node's length (reads and writes), aligned to [`BlockDriver::alignment`].
/// Errors need no node name: the node adds it ([`RequestError`](crate::RequestError)).
///
/// Writing a driver of your own (a filter over other nodes) is shown step by step in
/// `docs/filter-driver.md` (in this crate's directory) and the `throttle` example.
pub trait BlockDriver: Any + Send + Sync {
    /// The driver's name as options spell it (`file`, `raw`, `null-co`).
    fn format_name(&self) -> &'static str;

    /// The alignment requests reaching this node need (QEMU's `request_alignment` and
    /// `min_mem_alignment`), given `below`: the strictest alignment of the node's children
    /// whose role is [`DATA`](crate::ChildRole::DATA), [`FILTERED`](crate::ChildRole::FILTERED)
    /// or [`COW`](crate::ChildRole::COW) (any byte for a node without children).
    ///
    /// The default is `below`: requests reaching the node satisfy every node below it, so a
    /// filter passes them to its children as they came (the backend pads misaligned guest
    /// requests above it). A protocol driver states what its storage needs (an `O_DIRECT`
    /// file wants whole sectors); a driver that aligns its own requests to its children
    /// states only what it needs itself. (qcow2 keeps the default: it pads its metadata
    /// I/O, but guest bytes reach its file at the offsets they came with.)
    /// The [`BlockGraph`](crate::BlockGraph) asks again whenever the node's children change.
    fn alignment(&self, below: Alignment) -> Alignment {
        below
    }

    /// The node's length in bytes, asked at open and after a truncate.
    ///
    /// # Errors
    ///
    /// If the length cannot be found (a failed `fstat`, a child's error).
    fn length(&self, co: &Co) -> io::Result<u64>;

    /// Fills `bufs`, in order, from `offset`.
    ///
    /// # Errors
    ///
    /// The I/O error; a failed read leaves the buffers' contents unspecified.
    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()>;

    /// Writes `bufs`, in order, at `offset`.
    ///
    /// # Errors
    ///
    /// The I/O error; the range's contents are unspecified then.
    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()>;

    /// Writes `bufs` at `offset` compressed (QEMU's `bdrv_co_pwritev_compressed`), for
    /// formats that store compressed data: the request must cover whole clusters (the last
    /// may end at the end of the node). Unsupported by default.
    ///
    /// # Errors
    ///
    /// `Unsupported`; `InvalidInput` for a request that is not whole clusters; the I/O
    /// error.
    fn write_compressed(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let _ = (co, offset, bufs);
        Err(crate::error::unsupported(format!(
            "the {} driver does not write compressed data",
            self.format_name()
        )))
    }

    /// Makes every completed write stable.
    ///
    /// # Errors
    ///
    /// The I/O error: completed writes may not be stable.
    fn flush(&self, co: &Co) -> io::Result<()>;

    /// Tells the node the range's contents are no longer needed (it may read as anything
    /// afterwards, zeroes included). Doing nothing is a correct implementation; that is the
    /// default.
    ///
    /// # Errors
    ///
    /// The I/O error.
    fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        let _ = (co, offset, len);
        Ok(())
    }

    /// Makes the range read as zeroes; with `may_unmap` the driver may free its storage. The
    /// default writes zero buffers.
    ///
    /// # Errors
    ///
    /// The I/O error.
    fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let _ = may_unmap;
        write_zeroes_by_writing(co, offset, len, |co, offset, bufs| self.write(co, offset, bufs))
    }

    /// Whether [`BlockDriver::write_zeroes`] of the range writes no zero buffers (it frees
    /// or flags the storage instead): the "fast zero" that NBD's `FAST_ZERO` asks for
    /// (QEMU's `BDRV_REQ_NO_FALLBACK`). `false` by default, as the default writes buffers.
    fn can_zero_fast(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// How the range starting at `offset` reads; the default says "data" for all of it.
    ///
    /// # Errors
    ///
    /// The I/O error.
    fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let _ = (co, offset);
        Ok(BlockStatus { allocation: Allocation::Data, len })
    }

    /// The node that the ranges [`Allocation::Unallocated`] here read from (QEMU's
    /// `bdrv_cow_bs`): a format's backing image. `None` by default (the ranges read as
    /// zeroes). [`BlockBackend::block_status_above`](crate::BlockBackend::block_status_above)
    /// follows it.
    fn backing_node(&self) -> Option<Arc<BlockNode>> {
        None
    }

    /// Resizes the node to `len` bytes. Unsupported by default.
    ///
    /// # Errors
    ///
    /// `Unsupported`, or the I/O error.
    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        let _ = (co, len);
        Err(crate::error::unsupported(format!("the {} driver cannot resize", self.format_name())))
    }
}

impl dyn BlockDriver {
    /// The driver as its own type `T`, if it is one (a node's driver reached back from the
    /// node: [`BlockNode::driver`](crate::BlockNode::driver)).
    pub fn downcast_ref<T: BlockDriver>(&self) -> Option<&T> {
        (self as &dyn Any).downcast_ref::<T>()
    }
}

/// Makes `len` bytes at `offset` zero by calling `write` with zero buffers of up to 1 MiB
/// (what [`BlockDriver::write_zeroes`] does by default).
///
/// # Errors
///
/// The first error of `write`.
pub fn write_zeroes_by_writing(
    co: &Co,
    offset: u64,
    len: u64,
    write: impl Fn(&Co, u64, &[IoSlice<'_>]) -> io::Result<()>,
) -> io::Result<()> {
    let chunk = usize::try_from(len).map_or(ZERO_CHUNK, |len| len.min(ZERO_CHUNK));
    let zeroes = IoBuffer::zeroed(chunk);
    let mut done = 0;
    while done < len {
        let now = (len - done).min(chunk as u64) as usize;
        write(co, offset + done, &[IoSlice::new(&zeroes[..now])])?;
        done += now as u64;
    }
    Ok(())
}
