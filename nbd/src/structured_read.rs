//! `NBD_CMD_READ` answered with structured replies: `OFFSET_HOLE` chunks for the ranges
//! that read as zeroes (from the node's status through its backing chain, so that zeroes
//! are not sent as data) and `OFFSET_DATA` chunks for the rest; one data chunk with `DF`,
//! and for reads shorter than [`SPARSE_READ_MIN`]. A failure is answered with one error
//! chunk alone.

use std::io;

use aiocoro::coroutine::Co;
use aiocoro_block::{Allocation, BlockBackend, IoBuffer};

use crate::errors::nbd_errno;
use crate::reply::{Reply, ReplyMode};
use crate::request::Request;
use crate::wire;

/// Reads shorter than this are sent as one data chunk without looking for holes: the
/// lookup (the node's metadata, under its lock, on every read) would cost more than the
/// zero bytes it could save. A qcow2 cluster is 64 KiB by default.
pub const SPARSE_READ_MIN: u64 = 64 * 1024;

/// The structured reply to a valid `READ` (inside the export, at most the maximum request);
/// in one data chunk with `DF` or when shorter than [`SPARSE_READ_MIN`].
pub fn read_reply(co: &Co, backend: &BlockBackend, mode: ReplyMode, request: &Request) -> Reply {
    let mut reply = Reply::new(mode, request);
    let whole = request.flags & wire::CMD_FLAG_DF != 0 || request.length < SPARSE_READ_MIN;
    let result = match request.length {
        0 => {
            reply.status(0, "");
            Ok(())
        }
        _ if whole => {
            read_into(co, backend, &mut reply, false, request.offset, request.length, true)
        }
        _ => sparse_read(co, backend, &mut reply, request.offset, request.offset + request.length),
    };
    match result {
        Ok(()) => reply,
        Err((error, offset)) => {
            let mut reply = Reply::new(mode, request);
            reply.error_chunk(nbd_errno(&error), &error.to_string(), Some(offset));
            reply
        }
    }
}

/// A failure, and the offset it concerns.
type Failure = (io::Error, u64);

/// Adds hole and data chunks for `offset..end`: each run of ranges that read as zeroes is a
/// hole chunk, each run of data one data chunk.
fn sparse_read(
    co: &Co,
    backend: &BlockBackend,
    reply: &mut Reply,
    offset: u64,
    end: u64,
) -> Result<(), Failure> {
    let mut run: Option<(bool, u64, u64)> = None;
    let mut at = offset;
    while at < end {
        let status = backend.block_status_above(co, at, end - at).map_err(|error| {
            (io::Error::new(error.kind(), format!("cannot tell holes from data: {error}")), at)
        })?;
        let zero = status.allocation != Allocation::Data;
        match run {
            Some((run_zero, _, ref mut len)) if run_zero == zero => *len += status.len,
            Some((run_zero, start, len)) => {
                read_into(co, backend, reply, run_zero, start, len, false)?;
                run = Some((zero, at, status.len));
            }
            None => run = Some((zero, at, status.len)),
        }
        at += status.len;
    }
    let (zero, start, len) = run.expect("a read of at least one byte has a run");
    read_into(co, backend, reply, zero, start, len, true)
}

/// Adds one chunk for `len` bytes at `offset`: a hole if `zero`, else the data read.
fn read_into(
    co: &Co,
    backend: &BlockBackend,
    reply: &mut Reply,
    zero: bool,
    offset: u64,
    len: u64,
    last: bool,
) -> Result<(), Failure> {
    let flags = if last { wire::REPLY_FLAG_DONE } else { 0 };
    let len32 = u32::try_from(len).expect("a read is at most the maximum request");
    if zero {
        reply.hole_chunk(flags, offset, len32);
    } else {
        let mut data = IoBuffer::new(len as usize);
        backend.read(co, offset, &mut data).map_err(|error| (error, offset))?;
        reply.data_chunk(flags, offset, data);
    }
    Ok(())
}
