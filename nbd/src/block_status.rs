//! `NBD_CMD_BLOCK_STATUS`: the extents of a range in each selected metadata context, from
//! the node's status through its backing chain
//! ([`BlockBackend::block_status_above`](aiocoro_block::BlockBackend::block_status_above)).

use std::io;

use aiocoro::coroutine::Co;
use aiocoro_block::{Allocation, BlockBackend, ChainStatus};

use crate::meta_context::MetaContext;
use crate::reply::{Reply, ReplyMode};
use crate::wire;

/// The most extents one context reports per request (the client asks again from where the
/// reply ended): bounds the reply at 16 bytes each.
pub const MAX_EXTENTS: usize = 16 * 1024;

/// One extent: `length` bytes with the context's `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// How many bytes.
    pub length: u64,
    /// The context's flags for them.
    pub flags: u32,
}

/// The flags `context` reports for a range whose chain status is `status`.
pub fn flags(context: MetaContext, status: &ChainStatus) -> u32 {
    match context {
        MetaContext::BaseAllocation => match status.allocation {
            Allocation::Data => 0,
            Allocation::Zero | Allocation::Unallocated => wire::STATE_HOLE | wire::STATE_ZERO,
            // A kind this server does not know yet: reading it as data is always right.
            _ => 0,
        },
        MetaContext::AllocationDepth => status.depth,
    }
}

/// The extents of `context` over the `length` bytes at `offset` (inside the export, not
/// empty), from the start: neighbours with equal flags merged, at most `max_extents` of
/// them (the last then ends early; together they never pass `length`).
///
/// # Errors
///
/// The block layer's error.
pub fn extents(
    co: &Co,
    backend: &BlockBackend,
    context: MetaContext,
    offset: u64,
    length: u64,
    max_extents: usize,
) -> io::Result<Vec<Extent>> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut done = 0;
    while done < length {
        let status = backend.block_status_above(co, offset + done, length - done)?;
        let flags = flags(context, &status);
        let full = extents.len() == max_extents;
        match extents.last_mut() {
            Some(last) if last.flags == flags => last.length += status.len,
            _ if full => break,
            _ => extents.push(Extent { length: status.len, flags }),
        }
        done += status.len;
    }
    Ok(extents)
}

/// Adds the block status chunk of `context` with `extents` to `reply`: `BLOCK_STATUS`
/// (32-bit lengths) or, with extended headers, `BLOCK_STATUS_EXT`.
pub fn add_chunk(reply: &mut Reply, flags: u16, context: MetaContext, extents: &[Extent]) {
    let mut payload = context.id().to_be_bytes().to_vec();
    if reply.mode() == ReplyMode::Extended {
        payload.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for extent in extents {
            payload.extend_from_slice(&extent.length.to_be_bytes());
            payload.extend_from_slice(&u64::from(extent.flags).to_be_bytes());
        }
        reply.chunk(flags, wire::REPLY_TYPE_BLOCK_STATUS_EXT, &payload);
    } else {
        for extent in extents {
            let length = u32::try_from(extent.length).expect("a compact request's extent fits u32");
            payload.extend_from_slice(&length.to_be_bytes());
            payload.extend_from_slice(&extent.flags.to_be_bytes());
        }
        reply.chunk(flags, wire::REPLY_TYPE_BLOCK_STATUS, &payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aiocoro_block::{BlockGraph, run_in_coroutine};

    /// A 1 MiB qcow2 image with data in its 2nd and 4th 64 KiB clusters, opened read-only;
    /// the extents `body` finds in it.
    fn with_image(body: impl FnOnce(&Co, &BlockBackend) -> Vec<Extent> + 'static) -> Vec<Extent> {
        let path = std::env::temp_dir().join(format!("aiocoro-nbd-extents-{}", std::process::id()));
        let image = path.to_str().unwrap().to_owned();
        let run = |program: &str, args: &[&str]| {
            let status = std::process::Command::new(program).args(args).output().unwrap();
            assert!(status.status.success(), "{program} {args:?}: {status:?}");
        };
        run("qemu-img", &["create", "-q", "-f", "qcow2", &image, "1M"]);
        let writes = ["-c", "write 64k 64k", "-c", "write 192k 64k"];
        run("qemu-io", &[&["-f", "qcow2"][..], &writes, &[&image]].concat());
        let options = format!("driver=qcow2,read-only=on,file.filename={image}");
        let extents = run_in_coroutine(move |co| {
            let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options).unwrap();
            body(co, &BlockBackend::new(node))
        })
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        extents
    }

    #[test]
    fn extents_merge_equal_neighbours_and_stop_at_the_limit() {
        let (hole, data) = (wire::STATE_HOLE | wire::STATE_ZERO, 0);
        let extent = |length, flags| Extent { length, flags };
        let found = with_image(|co, backend| {
            let all = extents(co, backend, MetaContext::BaseAllocation, 0, 1 << 20, 100).unwrap();
            let two = extents(co, backend, MetaContext::BaseAllocation, 0, 1 << 20, 2).unwrap();
            let depth = extents(co, backend, MetaContext::AllocationDepth, 0, 320 << 10, 100);
            [all, two, depth.unwrap()].concat()
        });
        let k = 64 << 10;
        assert_eq!(
            found,
            [
                // All of it: hole, data, hole, data, hole to the end.
                extent(k, hole),
                extent(k, data),
                extent(k, hole),
                extent(k, data),
                extent((1 << 20) - 4 * k, hole),
                // Two extents at most: the reply ends early, after 128 KiB.
                extent(k, hole),
                extent(k, data),
                // Depths over 320 KiB: unallocated (0) or here (1).
                extent(k, 0),
                extent(k, 1),
                extent(k, 0),
                extent(k, 1),
                extent(k, 0),
            ]
        );
    }
}
