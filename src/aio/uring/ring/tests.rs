//! The ring's own tests: merging, cancelling and unwinding, with its tables in view.

use std::io::{IoSlice, IoSliceMut, Write};

use super::super::engine::{Engine, engine, forced_off};
use super::super::request_guard::RequestGuard;
use super::super::{completion, preadv, pwritev};
use super::*;

#[test]
fn dropping_an_in_flight_read_cancels_it_and_waits_for_its_completion() {
    let ctx = AioContext::new().unwrap();
    ctx.run(|co| {
        let Engine::Uring(ring) = engine() else {
            // No ring here: that must be because the kernel (or the switch) refuses.
            assert!(forced_off() || IoUring::new(4).is_err(), "io_uring works but went unused");
            return;
        };
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buffer = [0u8; 16];
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let read = opcode::Readv::new(types::Fd(reader.as_raw_fd()), iov.as_mut_ptr().cast(), 1)
            .offset(u64::MAX)
            .build();
        // SAFETY: `buffer` and `iov` outlive `op`, which is dropped right below.
        let op = unsafe { RequestGuard::start(&ring, co, Request::Other(read.clone())) };
        assert_eq!(ring.ops.borrow().len(), 1);
        // The socket is empty: only the cancel can end this read, so a drop that did not
        // cancel would hang here, and one that did not wait would leave the entry.
        drop(op);
        assert_eq!(ring.ops.borrow().len(), 0, "the request was forgotten after its completion");
        // The ring goes on working: the same read now finds data.
        writer.write_all(b"after").unwrap();
        // SAFETY: `buffer` and `iov` outlive the call.
        let result = unsafe { RequestGuard::run(&ring, co, Request::Other(read)) };
        assert_eq!(completion(result).unwrap(), 5);
        assert_eq!(&buffer[..5], b"after");
    });
}

/// This thread's ring, or `None` where the kernel (or the switch) refuses io_uring.
fn this_ring() -> Option<Rc<Ring>> {
    match engine() {
        Engine::Uring(ring) => Some(ring),
        Engine::Pool => {
            assert!(forced_off() || IoUring::new(4).is_err(), "io_uring works but went unused");
            None
        }
    }
}

/// A file in the temporary directory, removed on drop.
struct TempFile {
    path: std::path::PathBuf,
    file: Rc<std::fs::File>,
}

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "aiocoro-uring-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, contents).unwrap();
        let file = std::fs::File::options().read(true).write(true).open(&path).unwrap();
        TempFile { path, file: Rc::new(file) }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bytes that differ from one 4 KiB block to the next.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4096 * 31 + i % 251) as u8).collect()
}

const LEN: usize = 4096;

/// Spawns one coroutine per offset in `offsets`, each reading `LEN` bytes there into two
/// buffers with one `preadv`; runs them and returns what each read, in order.
fn read_from_coroutines(
    ctx: &AioContext,
    file: &Rc<std::fs::File>,
    offsets: impl Iterator<Item = usize>,
) -> Vec<(usize, Vec<u8>)> {
    // All are spawned before the first join runs them, so that their reads can merge.
    let coroutines: Vec<_> = offsets
        .map(|offset| {
            let file = file.clone();
            ctx.spawn(move |co| {
                let (mut head, mut tail) = (vec![0u8; 1000], vec![0u8; LEN - 1000]);
                let bufs = &mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)];
                let read = preadv(co, file.as_fd(), bufs, offset as u64).unwrap();
                head.extend_from_slice(&tail);
                (read, head)
            })
        })
        .collect();
    coroutines.into_iter().map(|co| co.join().unwrap()).collect()
}

#[test]
fn contiguous_reads_of_several_coroutines_are_merged_and_each_gets_its_bytes() {
    const N: usize = 64;
    let data = pattern(N * LEN);
    let temp = TempFile::new("merged-reads", &data);
    let ctx = AioContext::new().unwrap();
    let Some(ring) = this_ring() else { return };
    let results = read_from_coroutines(&ctx, &temp.file, (0..N).map(|i| i * LEN));
    for (i, (read, bytes)) in results.iter().enumerate() {
        assert_eq!(*read, LEN, "request {i}");
        assert!(*bytes == data[i * LEN..][..LEN], "request {i} got the wrong bytes");
    }
    let stats = ring.stats.get();
    assert!(stats.merged >= 1 && stats.members >= 2 * stats.merged, "{stats:?}");
    assert_eq!(stats.again, 0, "{stats:?}");
    assert_eq!((ring.ops.borrow().len(), ring.owed.get(), ring.in_kernel.get()), (0, 0, 0));
}

#[test]
fn contiguous_writes_of_several_coroutines_are_merged_and_land_in_place() {
    const N: usize = 48;
    let data = pattern(N * LEN);
    let temp = TempFile::new("merged-writes", &[]);
    let ctx = AioContext::new().unwrap();
    let Some(ring) = this_ring() else { return };
    let coroutines: Vec<_> = (0..N)
        .map(|i| {
            let (file, data) = (temp.file.clone(), data.clone());
            ctx.spawn(move |co| {
                let block = &data[i * LEN..][..LEN];
                let bufs = [IoSlice::new(&block[..100]), IoSlice::new(&block[100..])];
                pwritev(co, file.as_fd(), &bufs, (i * LEN) as u64).unwrap()
            })
        })
        .collect();
    let written: Vec<usize> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
    assert_eq!(written, vec![LEN; N]);
    assert!(std::fs::read(&temp.path).unwrap() == data, "the file reads back different");
    let stats = ring.stats.get();
    assert!(stats.merged >= 1 && stats.members >= 2 * stats.merged, "{stats:?}");
    assert_eq!(stats.again, 0, "{stats:?}");
}

#[test]
fn a_merged_read_across_the_end_of_the_file_gives_each_member_what_it_alone_gets() {
    let size = 3 * LEN + 1000;
    let data = pattern(size);
    let temp = TempFile::new("merged-eof", &data);
    let ctx = AioContext::new().unwrap();
    let Some(ring) = this_ring() else { return };
    let results = read_from_coroutines(&ctx, &temp.file, (0..6).map(|i| i * LEN));
    let counts: Vec<usize> = results.iter().map(|(read, _)| *read).collect();
    assert_eq!(counts, [LEN, LEN, LEN, 1000, 0, 0]);
    for (i, (read, bytes)) in results.iter().enumerate() {
        let expected = data.get(i * LEN..).unwrap_or_default();
        assert!(bytes[..*read] == expected[..*read], "request {i} got the wrong bytes");
        assert!(bytes[*read..].iter().all(|&b| b == 0), "request {i} got bytes past the end");
    }
    let stats = ring.stats.get();
    // The merged request came back short: the three members it did not cover went again.
    assert!(stats.merged >= 1 && stats.again >= 3, "{stats:?}");
    assert_eq!((ring.ops.borrow().len(), ring.owed.get(), ring.in_kernel.get()), (0, 0, 0));
}

#[test]
fn a_failed_merged_read_sends_each_member_again_alone_for_its_own_error() {
    let temp = TempFile::new("merged-error", &pattern(4 * LEN));
    // Write-only: every read fails with EBADF, merged or alone.
    let file = Rc::new(std::fs::File::options().write(true).open(&temp.path).unwrap());
    let ctx = AioContext::new().unwrap();
    let Some(ring) = this_ring() else { return };
    let coroutines: Vec<_> = (0..4)
        .map(|i| {
            let file = file.clone();
            ctx.spawn(move |co| {
                let mut buf = vec![0u8; LEN];
                let error = preadv(co, file.as_fd(), &mut [IoSliceMut::new(&mut buf)], i * 4096)
                    .unwrap_err();
                // The OS error under the call's name.
                let os = error.get_ref().and_then(|error| error.source());
                let os = os.and_then(|os| os.downcast_ref::<io::Error>());
                os.and_then(io::Error::raw_os_error)
            })
        })
        .collect();
    let errors: Vec<_> = coroutines.into_iter().map(|co| co.join().unwrap()).collect();
    assert_eq!(errors, [Some(libc::EBADF); 4]);
    let stats = ring.stats.get();
    assert!(stats.merged >= 1 && stats.again == stats.members, "{stats:?}");
}

/// Stages a read of `buf` at `offset` of `fd` on `ring`.
///
/// # Safety
///
/// `iov` (and the buffer it names) must outlive the returned guard.
unsafe fn stage_read(
    ring: &Rc<Ring>,
    co: &Co,
    fd: RawFd,
    iov: &mut [IoSliceMut<'_>; 1],
    offset: u64,
) -> RequestGuard {
    let rw = VectoredIo {
        kind: Kind::Read,
        fd,
        offset,
        iov: iov.as_mut_ptr().cast::<libc::iovec>().cast_const(),
        count: 1,
        len: iov[0].len() as u64,
        alone: false,
    };
    // SAFETY: forwarded to our caller.
    unsafe { RequestGuard::start(ring, co, Request::Vectored(rw)) }
}

#[test]
fn unwinding_a_member_of_a_merged_read_in_the_kernel_leaves_the_others_correct() {
    let ctx = AioContext::new().unwrap();
    ctx.run(|co| {
        let Some(ring) = this_ring() else { return };
        // A socket read waits for data, so the merged read is surely in the kernel when
        // its member goes.
        ring.merge_any_fd.set(true);
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = reader.as_raw_fd();
        // What a lone read at offset 16 of a socket with data gets (Linux refuses offsets
        // on sockets where it reads them: ESPIPE).
        let alone_at_16 = {
            let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
            writer.write_all(b"89abcdef").unwrap();
            let mut buf = [0u8; 8];
            let mut iov = [IoSliceMut::new(&mut buf)];
            // SAFETY: the iovec and buffer outlive the guard, finished right here.
            unsafe { stage_read(&ring, co, reader.as_raw_fd(), &mut iov, 16) }.finish(co)
        };
        let (mut a, mut b, mut c) = ([0u8; 8], [0u8; 8], [0u8; 8]);
        {
            let mut iov_a = [IoSliceMut::new(&mut a)];
            let mut iov_b = [IoSliceMut::new(&mut b)];
            let mut iov_c = [IoSliceMut::new(&mut c)];
            // SAFETY: the iovecs and buffers outlive the guards (dropped in this block).
            let (op_a, op_b, op_c) = unsafe {
                (
                    stage_read(&ring, co, fd, &mut iov_a, 0),
                    stage_read(&ring, co, fd, &mut iov_b, 8),
                    stage_read(&ring, co, fd, &mut iov_c, 16),
                )
            };
            assert!(ring.submit_queued());
            assert_eq!(ring.stats.get().merged, 1);
            assert_eq!(ring.in_kernel.get(), 1, "one merged request for three");
            // The middle member unwinds: its merged request is cancelled and waited for.
            drop(op_b);
            assert_eq!(ring.owed.get(), 2);
            assert_eq!(ring.stats.get().again, 3, "all three went back to the queue");
            assert_eq!(ring.stats.get().merged, 1);
            assert_eq!(ring.staged.borrow().len(), 2, "the dropped one left it");
            // The others go again alone and get their own results, not ECANCELED.
            writer.write_all(b"0123456789abcdef").unwrap();
            assert_eq!(op_a.finish(co), 8);
            assert_eq!(op_c.finish(co), alone_at_16);
        }
        assert_ne!(alone_at_16, -libc::ECANCELED);
        assert_eq!(&a, b"01234567");
        if alone_at_16 == 8 {
            assert_eq!(&c, b"89abcdef");
        }
        assert_eq!(b, [0; 8], "the unwound member's buffer was left alone");
        assert_eq!((ring.ops.borrow().len(), ring.owed.get()), (0, 0));
    });
}

#[test]
fn unwinding_a_staged_member_takes_it_out_of_the_queue() {
    let data = pattern(3 * LEN);
    let temp = TempFile::new("staged-unwind", &data);
    let ctx = AioContext::new().unwrap();
    let file = temp.file.clone();
    ctx.run(move |co| {
        let Some(ring) = this_ring() else { return };
        let fd = file.as_raw_fd();
        let (mut a, mut b, mut c) = (vec![0u8; LEN], vec![0u8; LEN], vec![0u8; LEN]);
        {
            let mut iov_a = [IoSliceMut::new(&mut a)];
            let mut iov_b = [IoSliceMut::new(&mut b)];
            let mut iov_c = [IoSliceMut::new(&mut c)];
            // SAFETY: the iovecs and buffers outlive the guards (dropped in this block).
            let (op_a, op_b, op_c) = unsafe {
                (
                    stage_read(&ring, co, fd, &mut iov_a, 0),
                    stage_read(&ring, co, fd, &mut iov_b, LEN as u64),
                    stage_read(&ring, co, fd, &mut iov_c, 2 * LEN as u64),
                )
            };
            drop(op_b);
            assert_eq!(ring.staged.borrow().len(), 2);
            assert_eq!(ring.in_kernel.get(), 0, "nothing went to the kernel for it");
            assert_eq!(op_a.finish(co), LEN as i32);
            assert_eq!(op_c.finish(co), LEN as i32);
        }
        assert!(a == data[..LEN] && c == data[2 * LEN..], "wrong bytes");
        assert_eq!(b, vec![0; LEN]);
        assert_eq!(ring.stats.get().merged, 0, "the two left are not neighbours");
        assert_eq!((ring.ops.borrow().len(), ring.owed.get()), (0, 0));
    });
}
