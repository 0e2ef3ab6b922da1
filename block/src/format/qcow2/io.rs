//! Reading children at any offset (padding to their alignment), and cutting a request's
//! buffers into the pieces that clusters map.

use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Range;

use aiocoro::coroutine::Co;

use crate::buffer::{IoBuffer, gather_into};
use crate::node::BlockNode;
use crate::padding;

/// Reads `bufs` from `node` at `offset`, through an aligned bounce buffer when the range is
/// not aligned to the node's requests (an `O_DIRECT` file under a compressed cluster).
///
/// # Errors
///
/// The node's error.
pub(crate) fn read_at(
    co: &Co,
    node: &BlockNode,
    offset: u64,
    bufs: &mut [IoSliceMut<'_>],
) -> io::Result<()> {
    let len: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
    let alignment = node.alignment();
    if alignment.fits(offset, len) {
        node.read(co, offset, bufs)
    } else {
        padding::read(co, node, offset, bufs, alignment.request)
    }
}

/// Reads `buf.len()` bytes from `node` at `offset` into `buf`.
///
/// # Errors
///
/// The node's error.
pub(crate) fn read_exact_at(
    co: &Co,
    node: &BlockNode,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    read_at(co, node, offset, &mut [IoSliceMut::new(buf)])
}

/// Writes `bytes` to `node` at `offset`, read-modify-writing the partly covered blocks when
/// the range is not aligned to the node's requests. Unaligned writes are only made to
/// metadata, under the metadata lock, and metadata clusters are at least one block: nothing
/// else writes those blocks meanwhile.
///
/// # Errors
///
/// The node's error.
pub(crate) fn write_at(co: &Co, node: &BlockNode, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let alignment = node.alignment();
    let bufs = [IoSlice::new(bytes)];
    if alignment.fits(offset, bytes.len() as u64) {
        node.write(co, offset, &bufs)
    } else {
        padding::write(co, node, offset, &bufs, alignment.request)
    }
}

/// The `len` bytes of `bufs` from byte `start` on, as slices of them (for writes).
pub(crate) fn sub_slices_ref<'a>(
    bufs: &'a [IoSlice<'_>],
    start: usize,
    len: usize,
) -> Vec<IoSlice<'a>> {
    let mut window = window(start, len);
    bufs.iter()
        .map_while(|buf| Some((window(buf.len())?, buf)))
        .filter(|(range, _)| !range.is_empty())
        .map(|(range, buf)| IoSlice::new(&buf[range]))
        .collect()
}

/// The `len` bytes of `bufs` from byte `start` on, as slices of them.
pub(crate) fn sub_slices<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
) -> Vec<IoSliceMut<'a>> {
    let mut window = window(start, len);
    bufs.iter_mut()
        .map_while(|buf| Some((window(buf.len())?, buf)))
        .filter(|(range, _)| !range.is_empty())
        .map(|(range, buf)| IoSliceMut::new(&mut buf[range]))
        .collect()
}

/// Given the lengths of buffers one after the other, the part of each that holds bytes
/// `start..start + len` of them all (empty if none), until a buffer starts past them (`None`).
fn window(start: usize, len: usize) -> impl FnMut(usize) -> Option<Range<usize>> {
    let end = start + len;
    let mut at = 0;
    move |buf_len| {
        if at >= end {
            return None;
        }
        let (from, to) = (start.max(at), end.min(at + buf_len));
        let range = if from < to { from - at..to - at } else { 0..0 };
        at += buf_len;
        Some(range)
    }
}

/// A copy of the `len` bytes of `bufs` from byte `start` on, in one buffer.
pub(crate) fn gather(bufs: &[IoSlice<'_>], start: usize, len: usize) -> IoBuffer {
    let mut buffer = IoBuffer::new(len);
    gather_into(&sub_slices_ref(bufs, start, len), &mut buffer);
    buffer
}

/// Fills `bufs` with zeroes.
pub(crate) fn zero(bufs: &mut [IoSliceMut<'_>]) {
    bufs.iter_mut().for_each(|buf| buf.fill(0));
}

/// Reads `buf.len()` bytes at `offset` of a file of `file_len` bytes; what lies past its end
/// reads as zeroes (as QEMU's block layer reads it).
///
/// # Errors
///
/// The read error.
pub(crate) fn read_within_file(
    co: &Co,
    file: &BlockNode,
    file_len: u64,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let inside = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[inside..].fill(0);
    if inside > 0 {
        read_exact_at(co, file, offset, &mut buf[..inside])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::scatter;

    #[test]
    fn sub_slices_cut_across_buffers() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 4], [0u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b), IoSliceMut::new(&mut c)];
        let mut piece = sub_slices(&mut bufs, 2, 7);
        assert_eq!(piece.iter().map(|s| s.len()).collect::<Vec<_>>(), [1, 4, 2]);
        scatter(&[1, 2, 3, 4, 5, 6, 7], &mut piece);
        drop(piece);
        zero(&mut sub_slices(&mut bufs, 3, 1));
        assert!(sub_slices(&mut bufs, 12, 0).is_empty());
        assert_eq!((a, b, c), ([0, 0, 1], [0, 3, 4, 5], [6, 7, 0, 0, 0]));
    }
}
