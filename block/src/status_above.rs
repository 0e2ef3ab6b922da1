//! The status of a range through a node's backing chain (QEMU's `bdrv_block_status_above`
//! with no base, and the depth `bdrv_is_allocated_above` reports): what a reader of the top
//! node gets, and which layer gives it.

use std::io;

use aiocoro::coroutine::Co;

use crate::driver::Allocation;
use crate::node::BlockNode;

/// How the start of a range reads through a backing chain: the first `len` bytes all read
/// as `allocation` says, from the layer `depth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainStatus {
    /// [`Allocation::Data`] or [`Allocation::Zero`] as the layer that holds the range says;
    /// [`Allocation::Unallocated`] when no layer holds it (it reads as zeroes).
    pub allocation: Allocation,
    /// The layer that holds the range: 1 for the top node, 2 for its backing node, and so
    /// on; 0 when no layer holds it. Past the end of a shorter backing node the range reads
    /// as zeroes that that node holds (as QEMU counts them).
    pub depth: u32,
    /// How many bytes from the asked offset share that status (at least 1, at most the
    /// asked length).
    pub len: u64,
}

/// Walks from `top` down its backing nodes until a layer holds the start of the `len`
/// bytes at `offset` (inside `top`, `len` > 0).
pub(crate) fn block_status_above(
    co: &Co,
    top: &BlockNode,
    offset: u64,
    len: u64,
) -> io::Result<ChainStatus> {
    let mut status = top.block_status(co, offset, len)?;
    let mut below = top.driver().backing_node();
    let mut depth = 1;
    while status.allocation == Allocation::Unallocated {
        let Some(node) = below else {
            return Ok(ChainStatus {
                allocation: Allocation::Unallocated,
                depth: 0,
                len: status.len,
            });
        };
        depth += 1;
        let length = node.length();
        if offset >= length {
            return Ok(ChainStatus { allocation: Allocation::Zero, depth, len: status.len });
        }
        status = node.block_status(co, offset, status.len.min(length - offset))?;
        below = node.driver().backing_node();
    }
    Ok(ChainStatus { allocation: status.allocation, depth, len: status.len })
}
