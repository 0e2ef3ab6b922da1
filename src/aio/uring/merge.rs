//! Request merging for the io_uring layer (QEMU virtio-blk's idea, done at submission): the
//! pure part. Which queued requests go to the kernel together as one `readv` / `writev`
//! ([`first_run`]), and what each of them gets back from the merged completion ([`split`]).
//!
//! The ring (`ring.rs`) owns the queue, the merged iovec arrays and the memory-safety
//! argument; nothing here touches memory or the kernel.

use std::os::fd::RawFd;

/// Requests queued in one round are handed to the kernel as soon as this many wait (QEMU's
/// `aio-max-batch`), the rest when the context next polls. Batches let the kernel merge
/// neighbouring requests; several batches in flight keep the device busy meanwhile. 16 did
/// best for sequential 4 KiB `O_DIRECT` reads at depth 64 on a virtio disk (8: 5% slower,
/// 64: 15% slower).
pub(super) const MAX_BATCH: usize = 16;

/// The most requests merged into one: a batch.
pub(super) const MAX_MEMBERS: usize = MAX_BATCH;

/// The most iovecs one `readv` / `writev` takes (Linux's `UIO_MAXIOV`).
pub(super) const IOV_MAX: usize = 1024;

/// The most bytes one merged request covers: Linux's `MAX_RW_COUNT` (`INT_MAX` rounded down to
/// a page), the most one `readv` / `writev` moves; a completion's result is an `i32`, and this
/// also fits a `u32`.
pub(super) const MAX_BYTES: u64 = 0x7fff_f000;

/// Which way a request moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `readv`: the kernel writes into the buffers.
    Read,
    /// `writev`: the kernel reads the buffers.
    Write,
}

/// What the planner needs to know of a queued read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MergeCandidate {
    pub(super) kind: Kind,
    pub(super) fd: RawFd,
    pub(super) offset: u64,
    /// Bytes asked for (the sum of the iovec lengths).
    pub(super) len: u64,
    /// Number of iovecs.
    pub(super) iovecs: usize,
    /// Must go alone (a request that a failed merge handed back).
    pub(super) alone: bool,
}

/// How many of the queued requests `items`, from the front, go to the kernel as one request:
/// 1 for a request that goes alone (an item that is not a [`MergeCandidate`], such as an fsync, always
/// does), more for a run of neighbours in queue order that are the same kind on the same
/// descriptor, each starting where the one before ends, with at most [`MAX_MEMBERS`]
/// requests, [`IOV_MAX`] iovecs and [`MAX_BYTES`] bytes in all. 0 only for no items.
pub(super) fn first_run<T>(items: &[T], piece: impl Fn(&T) -> Option<MergeCandidate>) -> usize {
    let Some(first) = items.first().and_then(&piece) else {
        return items.len().min(1);
    };
    if first.alone {
        return 1;
    }
    let (mut end, mut iovecs, mut bytes) =
        (first.offset.checked_add(first.len), first.iovecs, first.len);
    let mut run = 1;
    for item in &items[1..] {
        if run == MAX_MEMBERS {
            break;
        }
        let Some(next) = piece(item) else { break };
        let fits = !next.alone
            && next.kind == first.kind
            && next.fd == first.fd
            && Some(next.offset) == end
            && iovecs + next.iovecs <= IOV_MAX
            && bytes + next.len <= MAX_BYTES;
        if !fits {
            break;
        }
        end = next.offset.checked_add(next.len);
        iovecs += next.iovecs;
        bytes += next.len;
        run += 1;
    }
    run
}

/// What one member of a merged request gets from its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MemberResult {
    /// Its whole length moved: this is its result.
    Done(i32),
    /// Not all of it moved (an error, a cancel, a short count): it must go to the kernel
    /// again, alone, and its own completion decides.
    Again,
}

/// The share of each member, of lengths `lens` in queue order, of a merged request's `result`
/// (a count, or a negated `errno`). A count moves a prefix of the concatenated buffers, so
/// the members it covers whole are done with their lengths; every other one goes again.
pub(super) fn split(
    result: i32,
    lens: impl IntoIterator<Item = u64>,
) -> impl Iterator<Item = MemberResult> {
    // A negative result covers nothing; after the first member not covered whole, none is.
    let mut left = u64::try_from(result).ok();
    lens.into_iter().map(move |len| match left {
        Some(rest) if len <= rest => {
            left = Some(rest - len);
            // A member's length is at most `MAX_BYTES` (its run's total), so it fits.
            MemberResult::Done(i32::try_from(len).expect("a merged member longer than MAX_BYTES"))
        }
        _ => {
            left = None;
            MemberResult::Again
        }
    })
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests {
    use super::*;

    fn read(fd: RawFd, offset: u64, len: u64) -> Option<MergeCandidate> {
        Some(MergeCandidate { kind: Kind::Read, fd, offset, len, iovecs: 1, alone: false })
    }

    fn write(fd: RawFd, offset: u64, len: u64) -> Option<MergeCandidate> {
        Some(MergeCandidate { kind: Kind::Write, ..read(fd, offset, len).unwrap() })
    }

    /// The run lengths that cover all of `items`.
    fn plan(items: &[Option<MergeCandidate>]) -> Vec<usize> {
        let mut runs = Vec::new();
        let mut rest = items;
        while !rest.is_empty() {
            let run = first_run(rest, |item| *item);
            runs.push(run);
            rest = &rest[run..];
        }
        runs
    }

    #[test]
    fn contiguous_neighbours_merge_in_queue_order() {
        let items = [read(3, 0, 4096), read(3, 4096, 4096), read(3, 8192, 512), read(3, 8704, 1)];
        assert_eq!(plan(&items), [4]);
        // The same requests out of order: only neighbours that continue each other merge.
        let items = [read(3, 4096, 4096), read(3, 0, 4096), read(3, 8192, 4096)];
        assert_eq!(plan(&items), [1, 1, 1]);
        // A gap or an overlap ends a run.
        let items = [read(3, 0, 4096), read(3, 4097, 4096), read(3, 8193, 10), read(3, 8200, 4)];
        assert_eq!(plan(&items), [1, 2, 1]);
        assert_eq!(plan(&[]), Vec::<usize>::new());
    }

    #[test]
    fn kinds_descriptors_and_barriers_are_not_mixed() {
        let items = [read(3, 0, 10), write(3, 10, 10), write(3, 20, 10), read(3, 30, 10)];
        assert_eq!(plan(&items), [1, 2, 1]);
        let items = [read(3, 0, 10), read(4, 10, 10), read(4, 20, 10)];
        assert_eq!(plan(&items), [1, 2]);
        // An fsync (not a piece) goes alone and is never overtaken or merged across.
        let items = [write(3, 0, 10), write(3, 10, 10), None, write(3, 20, 10), None, None];
        assert_eq!(plan(&items), [2, 1, 1, 1, 1]);
        // A request handed back by a failed merge goes alone, and nothing joins it.
        let mut again = read(3, 10, 10).unwrap();
        again.alone = true;
        let items = [read(3, 0, 10), Some(again), read(3, 20, 10), read(3, 30, 10)];
        assert_eq!(plan(&items), [1, 1, 2]);
    }

    #[test]
    fn runs_stay_within_the_member_iovec_and_byte_limits() {
        let items: Vec<_> = (0..40).map(|i| read(3, i * 4096, 4096)).collect();
        assert_eq!(plan(&items), [MAX_MEMBERS, MAX_MEMBERS, 8]);
        let many = |offset, iovecs| {
            Some(MergeCandidate { kind: Kind::Read, fd: 3, offset, len: 100, iovecs, alone: false })
        };
        let items = [many(0, 1000), many(100, 24), many(200, 1)];
        assert_eq!(plan(&items), [2, 1], "1024 iovecs at most");
        let items = [many(0, 2000), many(100, 1)];
        assert_eq!(plan(&items), [1, 1], "a request over the limit alone stays as it is");
        let big = MAX_BYTES - 4096;
        let items = [read(3, 0, big), read(3, big, 4096), read(3, big + 4096, 1)];
        assert_eq!(plan(&items), [2, 1], "MAX_BYTES at most");
        // No overflow at the end of the offset range: nothing continues past u64::MAX.
        let items = [read(3, u64::MAX - 10, 10), read(3, u64::MAX, 0), read(3, 0, 1)];
        assert_eq!(plan(&items), [2, 1]);
    }

    #[test]
    fn results_are_shared_as_lone_requests_would_get_them() {
        let lens = [4096, 4096, 512];
        let shares = |result| split(result, lens).collect::<Vec<_>>();
        use MemberResult::{Again, Done};
        assert_eq!(shares(8704), [Done(4096), Done(4096), Done(512)]);
        // Short (the end of the file): the members covered whole are done, the others go again.
        assert_eq!(shares(6000), [Done(4096), Again, Again]);
        assert_eq!(shares(8192), [Done(4096), Done(4096), Again]);
        assert_eq!(shares(0), [Again, Again, Again]);
        // Errors, cancels included, leave every member to go again.
        assert_eq!(shares(-libc::ECANCELED), [Again, Again, Again]);
        assert_eq!(shares(-libc::EIO), [Again, Again, Again]);
        // Zero-length members are covered by anything that is not an error.
        assert_eq!(split(0, [0, 0]).collect::<Vec<_>>(), [Done(0), Done(0)]);
        assert_eq!(split(10, [10, 0, 5]).collect::<Vec<_>>(), [Done(10), Done(0), Again]);
        assert_eq!(split(10, [10, 5, 0]).collect::<Vec<_>>(), [Done(10), Again, Again]);
        assert_eq!(split(-libc::EIO, [0]).collect::<Vec<_>>(), [Again]);
    }
}
