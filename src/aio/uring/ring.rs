//! One context's io_uring: staging, merging, submission, reaping, back-pressure and
//! cancellation (QEMU's `LuringState`).
//!
//! A coroutine's request is staged here and waits in the coroutine's
//! [`RequestGuard`](super::request_guard::RequestGuard); the requests staged in one round go
//! to the kernel together, when the context next polls or once [`MAX_BATCH`] of them wait
//! (one `io_uring_enter` for the batch). Neighbours that read (or write) one file at
//! contiguous offsets go as one merged request ([`super::merge`] plans the runs).
//! The ring signals an eventfd that its context watches; the handler reaps the completions
//! into the in-flight table and wakes the coroutines waiting for them.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;

use io_uring::{IoUring, opcode, squeue, types};

use super::merge::{self, Kind, MAX_BATCH, MemberResult, MergeCandidate};
use crate::aio::AioContext;
use crate::aio::arena::{Arena, Key};
use crate::aio::fd::FdHandler;
use crate::aio::wait::LocalWaker;
use crate::coroutine::Co;
use crate::sys;

/// Submission-queue slots of each ring (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 128;

/// The `user_data` of cancel requests, whose own completions carry nothing to deliver. No
/// in-flight key has it (that would take 2^32 table places).
const CANCEL_USER_DATA: u64 = u64::MAX;
/// One context's io_uring.
pub(super) struct Ring {
    uring: RefCell<IoUring>,
    /// Signalled by the kernel for each completion; the context's fd handler reaps then.
    eventfd: OwnedFd,
    /// The in-flight table: one `RequestState::Pending` entry per request a coroutine made and has not
    /// got the result of, and one `RequestState::Merged` entry per merged request in the kernel. The
    /// key of a request in the kernel alone, or of a merged request, is its `user_data`.
    ///
    /// The kernel reads and writes the caller's buffers (and iovec array) from the moment the
    /// request is pushed until its completion is posted, while the coroutine that owns them
    /// sleeps. So the entry is made before the request is staged, and the coroutine's
    /// [`RequestGuard`](super::request_guard::RequestGuard), which lives in the frame that borrows the buffers, removes it only
    /// after the result has been reaped into it (`RequestState::Done`). A member of a merged request is
    /// not done before the merged completion has been reaped: then it gets its length, or it
    /// is staged again alone and waits for that request's completion. If the coroutine is
    /// unwound first, the guard's drop takes the request out of `staged` if it is there, or
    /// else submits a cancel for the request in the kernel that covers its buffers (its own,
    /// or the merged one) and blocks, reaping, until that completion arrives (a cancel that
    /// comes too late changes nothing: the request's completion still comes). Only then can
    /// the unwinding go on and free the buffers. Dropping the ring likewise cancels and waits
    /// for everything still in the kernel first.
    ///
    /// A merged request's iovec array is the ring's: it lives in the `RequestState::Merged` entry,
    /// unchanged, from before the request is pushed until its completion has been reaped.
    ops: RefCell<Arena<RequestState>>,
    /// Requests made and not yet in the submission queue, in the order they were made (each
    /// one's entry is `RequestState::Pending` at `Location::Staged`); `flush_staged` moves them there, runs of
    /// contiguous neighbours merged. The iovec arrays and buffers they name are valid for as
    /// long as they are here (the owner's `RequestGuard` takes them out before it lets go).
    staged: RefCell<VecDeque<Staged>>,
    /// Requests pushed (single, merged, cancels) whose completion has not been reaped.
    in_kernel: Cell<usize>,
    /// Requests owed a result (the `RequestState::Pending` entries): staged, in the kernel alone or
    /// merged, or staged again after their merged request fell short.
    owed: Cell<usize>,
    /// Cancel requests pushed whose completion has not been reaped.
    cancels: Cell<usize>,
    /// The most requests coroutines may have owed at once: at most the submission queue's
    /// size, and at most half the completion queue's, so that with one request in the kernel
    /// per owed request (a merged one stands for several) and one cancel each, the completion
    /// queue cannot overflow.
    limit: usize,
    /// Coroutines waiting for `owed + cancels` to drop below `limit`, oldest first; each reap
    /// wakes as many as it freed places (all when nothing is owed), and they look again.
    room: RefCell<VecDeque<LocalWaker>>,
    /// What merging did, for tests and curious readers.
    stats: Cell<MergeStats>,
    /// Tests merge requests on sockets (where a read waits until data comes) too.
    #[cfg(test)]
    merge_any_fd: Cell<bool>,
}

/// Counts of what request merging did on one ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MergeStats {
    /// Merged requests handed to the kernel.
    merged: u64,
    /// Requests that went to the kernel inside a merged request.
    members: u64,
    /// Members that a short or failed merged request sent to the kernel again alone.
    again: u64,
}

/// A request owed a result.
enum RequestState {
    /// Not done; where it is, and the waker of the coroutine waiting for it, once it waits.
    Pending { waker: Option<LocalWaker>, at: Location },
    /// Its result, for the coroutine to take.
    Done(i32),
    /// A merged request in the kernel (not owed to any coroutine).
    Merged(MergedRequest),
}

impl RequestState {
    /// Makes a pending request done with `result` and adds its waiter's waker, if it waits, to
    /// `woken`; whether it was pending (a done or merged entry is left as it is).
    fn complete(&mut self, result: i32, woken: &mut Vec<LocalWaker>) -> bool {
        let RequestState::Pending { waker, .. } = self else { return false };
        woken.extend(waker.take());
        *self = RequestState::Done(result);
        true
    }
}

/// Where a pending request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Location {
    /// In `Ring::staged`, not yet pushed.
    Staged,
    /// In the kernel, alone: its key is the `user_data`.
    Kernel,
    /// In the kernel inside the merged request under this key.
    MergedRequest(Key),
}

/// A merged request in the kernel.
struct MergedRequest {
    /// The members' keys and requests, in queue order (the order of their bytes).
    members: Vec<(Key, VectoredIo)>,
    /// The concatenation of the members' iovec arrays: what the kernel reads as the request's
    /// iovec array until its completion is reaped (never changed, never dropped before).
    iovecs: Vec<libc::iovec>,
}

/// A request waiting to be pushed.
struct Staged {
    key: Key,
    request: Request,
}

impl Staged {
    fn merge_candidate(&self) -> Option<MergeCandidate> {
        match &self.request {
            Request::Vectored(rw) => Some(rw.merge_candidate()),
            Request::Other(_) => None,
        }
    }
}

/// A request as a coroutine makes it.
pub(super) enum Request {
    /// A read or write at an offset, which may be merged with its neighbours.
    Vectored(VectoredIo),
    /// Anything else (an fsync, ...): goes alone, in its place in the queue.
    Other(squeue::Entry),
}

/// A `preadv` / `pwritev`: the caller's iovec array, and what merging needs to know of it.
#[derive(Clone, Copy, Debug)]
pub(super) struct VectoredIo {
    pub(super) kind: Kind,
    pub(super) fd: RawFd,
    pub(super) offset: u64,
    pub(super) iov: *const libc::iovec,
    pub(super) count: u32,
    /// The sum of the iovecs' lengths.
    pub(super) len: u64,
    /// Must go alone (staged again after its merged request fell short).
    pub(super) alone: bool,
}

impl VectoredIo {
    fn merge_candidate(&self) -> MergeCandidate {
        MergeCandidate {
            kind: self.kind,
            fd: self.fd,
            offset: self.offset,
            len: self.len,
            iovecs: self.count as usize,
            alone: self.alone,
        }
    }

    /// The submission entry for this request at its offset, over `count` iovecs at `iov`.
    fn entry(&self, iov: *const libc::iovec, count: u32) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match self.kind {
            Kind::Read => opcode::Readv::new(fd, iov, count).offset(self.offset).build(),
            Kind::Write => opcode::Writev::new(fd, iov, count).offset(self.offset).build(),
        }
    }
}

impl Ring {
    /// Makes a ring for this thread's context and has the context watch its eventfd.
    pub(super) fn new() -> io::Result<Rc<Ring>> {
        let uring = sys::uring_new(RING_ENTRIES)?;
        let eventfd = sys::eventfd()?;
        sys::uring_register_eventfd(&uring, eventfd.as_fd())?;
        let params = uring.params();
        let sq = params.sq_entries() as usize;
        let cq = params.cq_entries() as usize;
        let ring = Rc::new(Ring {
            uring: RefCell::new(uring),
            eventfd,
            ops: RefCell::default(),
            staged: RefCell::default(),
            in_kernel: Cell::new(0),
            owed: Cell::new(0),
            cancels: Cell::new(0),
            limit: sq.min(cq / 2).max(1),
            room: RefCell::default(),
            stats: Cell::default(),
            #[cfg(test)]
            merge_any_fd: Cell::new(false),
        });
        let ctx = AioContext::current().ok_or_else(|| {
            io::Error::other("aiocoro: the thread lost its AioContext while making its io_uring")
        })?;
        let weak = Rc::downgrade(&ring);
        let handler = FdHandler::new().on_readable(move || {
            if let Some(ring) = weak.upgrade() {
                // Drain first, then reap: a completion posted after the drain signals again.
                let _ = sys::eventfd_drain(ring.eventfd.as_fd());
                ring.reap();
            }
        });
        ctx.set_fd_handler(ring.eventfd.as_raw_fd(), handler)?;
        Ok(ring)
    }

    /// The eventfd the kernel signals for each completion.
    pub(super) fn eventfd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    /// Puts `request` in the in-flight table and the staging queue; returns its key. Submits
    /// nothing (see [`Ring::submit_if_batch_full`]).
    ///
    /// # Safety
    ///
    /// Everything `request` names (buffers, iovec arrays) must stay valid until the request
    /// under the returned key is done and taken ([`Ring::take_result`]) or cancelled
    /// ([`Ring::cancel_and_wait`]): see the invariant on `ops`.
    pub(super) unsafe fn stage(&self, request: Request) -> Key {
        let key = self
            .ops
            .borrow_mut()
            .insert(RequestState::Pending { waker: None, at: Location::Staged });
        self.owed.set(self.owed.get() + 1);
        self.staged.borrow_mut().push_back(Staged { key, request });
        key
    }

    /// Hands what is staged to the kernel once a batch ([`MAX_BATCH`]) waits; what is staged
    /// in smaller rounds goes when the context next polls ([`Ring::submit_queued`]): one
    /// `io_uring_enter` per round, not per request.
    pub(super) fn submit_if_batch_full(&self) {
        if self.staged.borrow().len() >= MAX_BATCH {
            self.submit_queued();
        }
    }

    /// The result of the request under `key`, taken out of the table, if it is done.
    pub(super) fn take_result(&self, key: Key) -> Option<i32> {
        let mut ops = self.ops.borrow_mut();
        match ops.get(key) {
            Some(RequestState::Done(result)) => {
                let result = *result;
                ops.remove(key);
                Some(result)
            }
            Some(RequestState::Pending { .. }) => None,
            Some(RequestState::Merged(_)) | None => {
                unreachable!("aiocoro: an io_uring request left the in-flight table early")
            }
        }
    }

    /// Has the completion of the pending request under `key` wake `waker`.
    pub(super) fn wake_on_completion(&self, key: Key, waker: LocalWaker) {
        if let Some(RequestState::Pending { waker: slot, .. }) = self.ops.borrow_mut().get_mut(key)
        {
            *slot = Some(waker);
        }
    }

    /// Whether completions wait to be reaped (see [`FileIo::completions_ready`]).
    ///
    /// [`FileIo::completions_ready`]: super::FileIo::completions_ready
    pub(super) fn completions_ready(&self) -> bool {
        if self.in_kernel.get() == 0 {
            return false;
        }
        let mut uring = self.uring.borrow_mut();
        !uring.completion().is_empty() || uring.submission().taskrun()
    }

    /// Waits until the coroutines' owed requests leave room for one more (see `limit`).
    pub(super) fn wait_for_room(&self, co: &Co) {
        while self.owed.get() + self.cancels.get() >= self.limit {
            let wait = co.prepare_wait();
            self.room.borrow_mut().push_back(wait.local_waker());
            wait.wait();
        }
    }

    /// Moves the staged requests into the submission queue, in order, each run of mergeable
    /// neighbours as one merged request. Returns false if some stay staged because the
    /// submission queue is full.
    fn flush_staged(&self) -> bool {
        let mut staged = self.staged.borrow_mut();
        if staged.is_empty() {
            return true;
        }
        let mut uring = self.uring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        let mut sq = uring.submission();
        let mut stats = self.stats.get();
        while !staged.is_empty() {
            if sq.is_full() {
                self.stats.set(stats);
                return false;
            }
            let mut run = merge::first_run(staged.make_contiguous(), Staged::merge_candidate);
            if run > 1 {
                let Request::Vectored(first) = &staged[0].request else {
                    unreachable!("aiocoro: first_run merged a request that is not a read or write")
                };
                if !self.may_merge_on(first.fd) {
                    run = 1;
                }
            }
            let entry = if run == 1 {
                let Staged { key, request } = staged.pop_front().expect("not empty");
                if let Some(RequestState::Pending { at, .. }) = ops.get_mut(key) {
                    *at = Location::Kernel;
                }
                let entry = match request {
                    Request::Vectored(rw) => rw.entry(rw.iov, rw.count),
                    Request::Other(entry) => entry,
                };
                entry.user_data(key.to_bits())
            } else {
                // The merged request's entry first, so that its key is known while the
                // members are taken from the queue; it is complete before anything is pushed.
                let group = ops.insert(RequestState::Merged(MergedRequest {
                    members: Vec::new(),
                    iovecs: Vec::new(),
                }));
                let mut members = Vec::with_capacity(run);
                for Staged { key, request } in staged.drain(..run) {
                    let Request::Vectored(rw) = request else {
                        unreachable!("only reads and writes are merged")
                    };
                    if let Some(RequestState::Pending { at, .. }) = ops.get_mut(key) {
                        *at = Location::MergedRequest(group);
                    }
                    members.push((key, rw));
                }
                let count: usize = members.iter().map(|(_, rw)| rw.count as usize).sum();
                let mut iovecs = Vec::with_capacity(count);
                for (_, rw) in &members {
                    // SAFETY: a staged request's iovec array is valid while it is staged (the
                    // invariant on `staged`: its owner's guard waits for the merged request
                    // now), and `count` is its length (from a slice).
                    iovecs.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(rw.iov, rw.count as usize)
                    });
                }
                // The planner kept the total within IOV_MAX iovecs.
                let count = u32::try_from(count).expect("at most IOV_MAX iovecs");
                // Moving the Vec into the table below does not move its heap array, which
                // is what the entry names.
                let entry = members[0].1.entry(iovecs.as_ptr(), count);
                stats.merged += 1;
                stats.members += members.len() as u64;
                *ops.get_mut(group).expect("just inserted") =
                    RequestState::Merged(MergedRequest { members, iovecs });
                entry.user_data(group.to_bits())
            };
            // SAFETY: what a single entry names is its staged request's memory, valid until
            // that request's `RequestGuard` is done, which waits for this entry's completion (the
            // invariant on `ops`). A merged entry names the `RequestState::Merged` entry's iovec array,
            // removed only when its completion is reaped, and its members' buffers, each valid
            // until its member is done, which comes after that completion is reaped.
            unsafe { sq.push(&entry) }.expect("the submission queue has room (checked above)");
            self.in_kernel.set(self.in_kernel.get() + 1);
        }
        self.stats.set(stats);
        true
    }

    /// Whether reads and writes on `fd` may be merged: done again alone, a request must have
    /// the same effect (a regular file or block device, not appending).
    fn may_merge_on(&self, fd: RawFd) -> bool {
        #[cfg(test)]
        if self.merge_any_fd.get() {
            return true;
        }
        // SAFETY: `fd` is borrowed by the staged request's caller until its request is done.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        sys::redoable_at_offset(fd).unwrap_or(false)
    }

    /// Puts the cancel `entry` in the submission queue; whether it went in.
    fn push_cancel(&self, entry: &squeue::Entry) -> bool {
        let entry = entry.clone().user_data(CANCEL_USER_DATA);
        let mut uring = self.uring.borrow_mut();
        // SAFETY: a cancel request names no memory.
        if unsafe { uring.submission().push(&entry) }.is_err() {
            return false;
        }
        self.in_kernel.set(self.in_kernel.get() + 1);
        self.cancels.set(self.cancels.get() + 1);
        true
    }

    /// Hands the staged and queued requests to the kernel. Returns false if the kernel is too
    /// busy to take them now (they stay queued for the next poll).
    ///
    /// # Panics
    ///
    /// If the kernel refuses for good: the coroutines waiting for the queued requests could
    /// never be woken.
    pub(super) fn submit_queued(&self) -> bool {
        loop {
            let all = self.flush_staged();
            if self.uring.borrow_mut().submission().is_empty() {
                return true;
            }
            match self.enter(0) {
                Ok(()) if all => return true,
                // The submission queue was full: now it is empty, stage the rest.
                Ok(()) => {}
                Err(error) if is_transient(&error) => {
                    self.reap();
                    return false;
                }
                Err(error) => panic!("aiocoro: io_uring_enter could not submit: {error}"),
            }
        }
    }

    /// Hands every queued request to the kernel and, with `want > 0`, blocks the thread until
    /// that many completions are ready. Retries when interrupted.
    fn enter(&self, want: usize) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        loop {
            match sys::uring_enter(&uring, want) {
                Ok(_) if uring.submission().is_empty() => return Ok(()),
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Moves the posted completions into the in-flight table and wakes their coroutines (and
    /// those waiting for room). The members of a merged request get their lengths, or are
    /// staged again alone (see [`merge::split`]).
    fn reap(&self) {
        let mut woken = Vec::new();
        let (mut reaped, mut cancels, mut done) = (0, 0, 0);
        {
            let mut uring = self.uring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            let mut staged = self.staged.borrow_mut();
            let mut stats = self.stats.get();
            for cqe in uring.completion() {
                reaped += 1;
                if cqe.user_data() == CANCEL_USER_DATA {
                    cancels += 1;
                    continue;
                }
                let key = Key::from_bits(cqe.user_data());
                match ops.get_mut(key) {
                    Some(RequestState::Merged(_)) => {
                        let Some(RequestState::Merged(merged)) = ops.remove(key) else {
                            unreachable!("just seen")
                        };
                        let lens = merged.members.iter().map(|(_, rw)| rw.len);
                        let shares = merge::split(cqe.result(), lens);
                        for (&(member, rw), share) in merged.members.iter().zip(shares) {
                            let Some(op) = ops.get_mut(member) else { continue };
                            match (share, op) {
                                (MemberResult::Done(result), op) => {
                                    done += usize::from(op.complete(result, &mut woken));
                                }
                                (MemberResult::Again, RequestState::Pending { at, .. }) => {
                                    *at = Location::Staged;
                                    let request =
                                        Request::Vectored(VectoredIo { alone: true, ..rw });
                                    staged.push_back(Staged { key: member, request });
                                    stats.again += 1;
                                }
                                (MemberResult::Again, _) => {}
                            }
                        }
                        // The kernel is done with the merged iovec array (its completion was
                        // just reaped): it may go.
                        drop(merged.iovecs);
                    }
                    Some(op) => done += usize::from(op.complete(cqe.result(), &mut woken)),
                    None => {}
                }
            }
            self.stats.set(stats);
        }
        if reaped == 0 {
            return;
        }
        self.in_kernel.set(self.in_kernel.get() - reaped);
        self.cancels.set(self.cancels.get() - cancels);
        self.owed.set(self.owed.get() - done);
        self.wake_room(done + cancels, &mut woken);
        for waker in woken {
            waker.wake();
        }
    }

    /// Adds to `woken` one waiter for room per place of the `freed`; all of them once nothing
    /// is owed, so that a stale waker (its coroutine gave up) cannot leave the others asleep
    /// for good.
    fn wake_room(&self, freed: usize, woken: &mut Vec<LocalWaker>) {
        let mut room = self.room.borrow_mut();
        let all = self.owed.get() + self.cancels.get() == 0;
        let n = if all { room.len() } else { freed.min(room.len()) };
        woken.extend(room.drain(..n));
    }

    /// Blocks the thread until the kernel is done with the request under `key`, asking it to
    /// cancel the request (or the merged request that holds it) first; then forgets it. A
    /// request not yet pushed is just taken out of the queue. For a coroutine that cannot
    /// wait any more.
    pub(super) fn cancel_and_wait(&self, key: Key) {
        let mut cancelled = None;
        loop {
            self.reap();
            let at = match self.ops.borrow().get(key) {
                Some(RequestState::Pending { at, .. }) => Some(*at),
                _ => None,
            };
            let target = match at {
                None => {
                    // Done (or never there): the kernel is not using its memory.
                    self.ops.borrow_mut().remove(key);
                    return;
                }
                Some(Location::Staged) => {
                    self.unstage(key);
                    return;
                }
                Some(Location::Kernel) => key,
                // Cancelling the merged request fails it for every member: the others go
                // again alone when it is reaped, this one leaves the queue then.
                Some(Location::MergedRequest(group)) => group,
            };
            // If a cancel cannot be queued, the request still ends by itself; the wait just
            // takes longer (and the next round tries again).
            if cancelled != Some(target)
                && self.push_cancel(&opcode::AsyncCancel::new(target.to_bits()).build())
            {
                cancelled = Some(target);
            }
            self.block_for_completion();
        }
    }

    /// Takes the staged request under `key` out of the queue and forgets it.
    fn unstage(&self, key: Key) {
        {
            let mut staged = self.staged.borrow_mut();
            let place = staged.iter().position(|staged| staged.key == key);
            staged.remove(place.expect("aiocoro: a staged io_uring request left the queue"));
        }
        self.ops.borrow_mut().remove(key);
        self.owed.set(self.owed.get() - 1);
        let mut woken = Vec::new();
        self.wake_room(1, &mut woken);
        for waker in woken {
            waker.wake();
        }
    }

    /// Submits what is queued and blocks until a completion is ready, or aborts the process:
    /// a caller that cannot wait for the kernel could not keep its memory safe.
    fn block_for_completion(&self) {
        match self.enter(1) {
            Ok(()) => {}
            Err(error) if is_transient(&error) => std::thread::yield_now(),
            Err(error) => {
                eprintln!(
                    "aiocoro: cannot wait for io_uring requests to finish ({error}); aborting, \
                     because the kernel may still write into memory that is about to be freed"
                );
                std::process::abort();
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Staged requests never reached the kernel: nothing to wait for.
        self.staged.get_mut().clear();
        if self.in_kernel.get() > 0 {
            // Requests of coroutines that will never run again (leaked): cancel them all
            // (Linux 5.19+; older kernels refuse, and the wait takes as long as the requests)
            // and wait for the kernel to be done with their memory.
            self.push_cancel(&opcode::AsyncCancel2::new(types::CancelBuilder::any()).build());
            loop {
                self.reap();
                // Members of failed merged requests, staged again: they stay out.
                self.staged.borrow_mut().clear();
                if self.in_kernel.get() == 0 {
                    break;
                }
                self.block_for_completion();
            }
        }
    }
}

/// Errors after which submitting again may work: the kernel lacked memory for the request,
/// or its completion queue was full.
fn is_transient(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
}

#[cfg(all(test, not(aiocoro_loom)))]
mod tests;
