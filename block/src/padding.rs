//! Requests that are not aligned to what the node takes (an `O_DIRECT` file wants whole
//! sectors), widened to aligned ones through a bounce buffer (QEMU's request padding).
//!
//! A widened read is a read of the covering aligned range. A widened write is a
//! read-modify-write of the first and last blocks it touches, which is only correct if no
//! other write to those blocks lands between its read and its write: the
//! [`BlockBackend`](crate::BlockBackend) runs padded writes alone (QEMU's serialising
//! requests), see `rmw` there.

use std::io::{self, IoSlice, IoSliceMut};

use aiocoro::coroutine::Co;

use crate::buffer::{IoBuffer, gather_into, scatter};
use crate::node::BlockNode;

/// The aligned range covering `len` bytes at `offset`: `(start, end)`.
pub(crate) fn widen(offset: u64, len: u64, align: u64) -> (u64, u64) {
    let start = offset - offset % align;
    let end = (offset + len).div_ceil(align) * align;
    (start, end)
}

/// The whole aligned blocks inside `len` bytes at `offset`: `(start, end)`, with
/// `offset <= start <= end <= offset + len` (`start == end` when no whole block fits).
pub(crate) fn shrink(offset: u64, len: u64, align: u64) -> (u64, u64) {
    let end = offset + len;
    let start = (offset.div_ceil(align) * align).min(end);
    (start, (end - end % align).max(start))
}

/// Reads `bufs` at a misaligned `offset` through a bounce buffer of the covering range.
pub(crate) fn read(
    co: &Co,
    node: &BlockNode,
    offset: u64,
    bufs: &mut [IoSliceMut<'_>],
    align: u64,
) -> io::Result<()> {
    let len: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
    let (start, end) = widen(offset, len, align);
    let mut bounce = IoBuffer::new(bounce_len(start, end)?);
    node.read(co, start, &mut [IoSliceMut::new(&mut bounce)])?;
    scatter(&bounce[(offset - start) as usize..], bufs);
    Ok(())
}

/// Writes `bufs` at a misaligned `offset`: reads the partly covered first and last blocks,
/// lays the new bytes over them, and writes the covering range. The caller must keep other
/// writes to these blocks out meanwhile.
pub(crate) fn write(
    co: &Co,
    node: &BlockNode,
    offset: u64,
    bufs: &[IoSlice<'_>],
    align: u64,
) -> io::Result<()> {
    let len: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
    let (start, end) = widen(offset, len, align);
    let mut bounce = IoBuffer::new(bounce_len(start, end)?);
    let block = align as usize;
    if offset != start {
        node.read(co, start, &mut [IoSliceMut::new(&mut bounce[..block])])?;
    }
    let last = bounce.len() - block;
    if offset + len != end && (last != 0 || offset == start) {
        node.read(co, end - align, &mut [IoSliceMut::new(&mut bounce[last..])])?;
    }
    gather_into(bufs, &mut bounce[(offset - start) as usize..]);
    node.write(co, start, &[IoSlice::new(&bounce)])
}

fn bounce_len(start: u64, end: u64) -> io::Result<usize> {
    usize::try_from(end - start).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
}

#[cfg(test)]
mod tests {
    use super::{shrink, widen};

    #[test]
    fn widening_covers_the_request_with_whole_blocks() {
        assert_eq!(widen(0, 512, 512), (0, 512));
        assert_eq!(widen(100, 10, 512), (0, 512));
        assert_eq!(widen(500, 24, 512), (0, 1024));
        assert_eq!(widen(4096, 0, 4096), (4096, 4096));
        assert_eq!(widen(4097, 4096, 4096), (4096, 12288));
    }

    #[test]
    fn shrinking_keeps_the_whole_blocks_inside_the_request() {
        assert_eq!(shrink(0, 512, 512), (0, 512));
        assert_eq!(shrink(100, 1000, 512), (512, 1024));
        assert_eq!(shrink(100, 10, 512), (110, 110), "no whole block: empty, at the end");
        assert_eq!(shrink(100, 412, 512), (512, 512), "ends on a boundary");
        assert_eq!(shrink(512, 100, 512), (512, 512), "starts on a boundary");
        assert_eq!(shrink(4097, 8192, 4096), (8192, 12288));
    }
}
