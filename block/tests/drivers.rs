//! The drivers on real files: `file` in every cache mode (page cache, `O_DIRECT`) and aio
//! engine (io_uring, thread pool), directly and under `raw`; `raw`'s window; `null-co`; and
//! the errors of bad requests and bad options.

mod common;

use std::cell::Cell;
use std::io::{self, ErrorKind, IoSlice, IoSliceMut};
use std::path::Path;
use std::rc::Rc;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::{
    Allocation, BlockBackend, BlockGraph, BlockStatus, IoBuffer, Op, RequestError, open,
    run_in_coroutine,
};
use common::{TempFile, pattern};

const KIB: u64 = 1024;

/// One way to reach a file.
#[derive(Clone, Copy, Debug)]
struct Combo {
    /// `cache=none` (`O_DIRECT`) rather than `cache=writeback`.
    direct: bool,
    /// `aio=threads` rather than `aio=io_uring`.
    threads: bool,
    /// Under a `raw` node rather than the `file` node itself.
    raw: bool,
}

fn combos() -> Vec<Combo> {
    let mut all = Vec::new();
    for direct in [false, true] {
        for threads in [false, true] {
            for raw in [false, true] {
                all.push(Combo { direct, threads, raw });
            }
        }
    }
    all
}

impl Combo {
    /// Options opening `file` this way; the top node is named `disk`, a raw node's child
    /// `disk-file`. `extra` goes to the top node (`,key=value...`).
    fn options(&self, file: &TempFile, extra: &str) -> String {
        let cache = if self.direct { "none" } else { "writeback" };
        let aio = if self.threads { "threads" } else { "io_uring" };
        let name = file.name();
        if self.raw {
            format!(
                "driver=raw,node-name=disk,file.node-name=disk-file,file.filename={name},\
                 file.cache={cache},file.aio={aio}{extra}"
            )
        } else {
            format!("driver=file,node-name=disk,filename={name},cache={cache},aio={aio}{extra}")
        }
    }
}

fn open_blk(co: &Co, options: &str) -> io::Result<BlockBackend> {
    let graph = BlockGraph::new();
    let (_, node) = open(co, &graph, options)?;
    Ok(BlockBackend::new(node))
}

/// The request error inside `error`; panics if there is none.
fn request_error(error: &io::Error) -> &RequestError {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RequestError>())
        .unwrap_or_else(|| panic!("not a RequestError: {error:?}"))
}

/// Asserts `result` is a refused request of `kind` on node `node` for `op`, whose message
/// contains `words`.
fn assert_refused<T: std::fmt::Debug>(
    result: io::Result<T>,
    kind: ErrorKind,
    node: &str,
    op: Op,
    words: &str,
) {
    let error = result.expect_err("the request should have been refused");
    assert_eq!(error.kind(), kind, "{error}");
    let inner = request_error(&error);
    assert_eq!(inner.node, node, "{error}");
    assert_eq!(inner.op, op, "{error}");
    let text = error.to_string();
    assert!(text.contains(&format!("node '{node}'")), "{text}");
    assert!(text.contains(&op.to_string()), "{text}");
    assert!(text.contains(words), "{text} should contain {words:?}");
}

/// The open-file status flags (`O_ACCMODE`, `O_DIRECT`, ...) of every descriptor this process
/// has open on `path`.
fn open_flags(path: &Path) -> Vec<i32> {
    let path = path.canonicalize().unwrap();
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(&path) {
            continue;
        }
        let fdinfo = Path::new("/proc/self/fdinfo").join(entry.file_name());
        let Ok(info) = std::fs::read_to_string(fdinfo) else { continue };
        let flags = info.lines().find_map(|line| line.strip_prefix("flags:")).unwrap();
        all.push(i32::from_str_radix(flags.trim(), 8).unwrap());
    }
    all
}

fn read_vec(co: &Co, blk: &BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = IoBuffer::new(len);
    blk.read(co, offset, &mut buf).unwrap();
    buf.to_vec()
}

#[test]
fn cache_none_opens_with_o_direct_and_states_an_alignment() {
    for combo in combos() {
        let file = TempFile::with_contents("o-direct", &pattern(64 * KIB as usize, 1));
        let path = file.path().to_owned();
        let options = combo.options(&file, "");
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            let flags = open_flags(&path);
            assert_eq!(flags.len(), 1, "{combo:?}: one descriptor on the file");
            assert_eq!(flags[0] & libc::O_DIRECT != 0, combo.direct, "{combo:?}: {:o}", flags[0]);
            assert_eq!(flags[0] & libc::O_ACCMODE, libc::O_RDWR, "{combo:?}");
            let alignment = blk.root().alignment();
            if combo.direct {
                assert!(alignment.request >= 512, "{combo:?}: {alignment:?}");
                assert!(alignment.request <= 4096, "{combo:?}: {alignment:?}");
            } else {
                assert_eq!(alignment.request, 1, "{combo:?}: byte-granular through the cache");
            }
            assert_eq!(blk.length(), 64 * KIB);
        })
        .unwrap();
        assert!(open_flags(file.path()).is_empty(), "the node closed its file when dropped");
    }
}

#[test]
fn scatter_gather_round_trips_with_aligned_and_misaligned_buffers() {
    for combo in combos() {
        let mut shadow = pattern(1 << 20, 2);
        let file = TempFile::with_contents("round-trip", &shadow);
        let options = combo.options(&file, "");
        let after = run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            // Aligned buffers (the kernel gets them as they are under O_DIRECT).
            let a = IoBuffer::copy_from(&pattern(4096, 3));
            let b = IoBuffer::copy_from(&pattern(8192, 4));
            blk.writev(co, 64 * KIB, &[IoSlice::new(&a), IoSlice::new(&b)]).unwrap();
            shadow[64 << 10..68 << 10].copy_from_slice(&a);
            shadow[68 << 10..76 << 10].copy_from_slice(&b);
            // Misaligned addresses and odd lengths (bounced under O_DIRECT), in total 8 KiB.
            let backing = pattern(8192 + 3, 5);
            let (x, y, z) = (&backing[1..1001], &backing[1001..4097], &backing[4097..8193]);
            blk.writev(co, 128 * KIB, &[IoSlice::new(x), IoSlice::new(y), IoSlice::new(z)])
                .unwrap();
            shadow[128 << 10..136 << 10].copy_from_slice(&backing[1..8193]);
            // A single misaligned buffer.
            blk.write(co, 4 * KIB, &backing[3..4099]).unwrap();
            shadow[4 << 10..8 << 10].copy_from_slice(&backing[3..4099]);
            blk.flush(co).unwrap();

            // Read back in other shapes: aligned pieces, then misaligned ones.
            let mut p = IoBuffer::new(8192);
            let mut q = IoBuffer::new(4096);
            blk.readv(co, 64 * KIB, &mut [IoSliceMut::new(&mut p), IoSliceMut::new(&mut q)])
                .unwrap();
            assert_eq!(&p[..], &shadow[64 << 10..72 << 10], "{combo:?}");
            assert_eq!(&q[..], &shadow[72 << 10..76 << 10], "{combo:?}");
            let mut odd = vec![0xAAu8; 8192 + 7];
            let (head, tail) = odd[5..8197].split_at_mut(3000);
            blk.readv(co, 128 * KIB, &mut [IoSliceMut::new(head), IoSliceMut::new(tail)]).unwrap();
            assert_eq!(&odd[5..8197], &shadow[128 << 10..136 << 10], "{combo:?}");
            assert_eq!(&odd[..5], [0xAA; 5], "{combo:?}: no byte before the buffers");
            assert_eq!(&odd[8197..], [0xAA; 2], "{combo:?}: no byte after the buffers");
            assert_eq!(read_vec(co, &blk, 0, 1 << 20), shadow, "{combo:?}: the whole image");
            shadow
        })
        .unwrap();
        assert_eq!(file.contents(), after, "{combo:?}: the file holds what was written");
    }
}

/// A request may have more buffers than one `preadv` / `pwritev` takes (Linux: 1024).
#[test]
fn requests_with_more_buffers_than_one_system_call_takes() {
    for combo in combos() {
        let file = TempFile::with_contents("many-buffers", &vec![0; 1 << 20]);
        let options = combo.options(&file, "");
        let written = pattern(1 << 20, 20);
        let expected = written.clone();
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            // 2048 aligned pieces of 512 bytes.
            let pieces: Vec<IoBuffer> = written.chunks(512).map(IoBuffer::copy_from).collect();
            let slices: Vec<IoSlice<'_>> = pieces.iter().map(|piece| IoSlice::new(piece)).collect();
            blk.writev(co, 0, &slices).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
            // 4096 pieces of 256 bytes, half of them misaligned for O_DIRECT.
            let mut back = vec![0u8; 1 << 20];
            let mut slices: Vec<IoSliceMut<'_>> =
                back.chunks_mut(256).map(IoSliceMut::new).collect();
            blk.readv(co, 0, &mut slices).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
            assert!(back == written, "{combo:?}: read back what was written");
        })
        .unwrap();
        assert!(file.contents() == expected, "{combo:?}");
    }
}

#[test]
fn misaligned_requests_are_padded_and_land_exactly() {
    for combo in combos() {
        let len = 64 * KIB as usize;
        let file = TempFile::with_contents("misaligned", &pattern(len, 6));
        let options = combo.options(&file, "");
        let mut shadow = pattern(len, 6);
        let expected = run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            let alignment = blk.root().alignment().request as usize;
            if combo.direct {
                assert!(alignment >= 512, "{combo:?}: O_DIRECT needs sector alignment");
            }
            // The unit the offsets below are misaligned to (any unit, for byte alignment).
            let align = alignment.max(512);
            let half = align / 2;
            // A read that starts and ends inside blocks, into a misaligned buffer.
            let mut odd = vec![0u8; 3 * align + 1];
            blk.read(co, half as u64, &mut odd[1..]).unwrap();
            assert_eq!(&odd[1..], &shadow[half..half + 3 * align], "{combo:?}");
            // A write inside one block, one across a boundary, one of a whole middle.
            for (offset, bytes) in [(3usize, 10usize), (align - 7, 20), (half, 2 * align)] {
                let data: Vec<u8> = (0..bytes).map(|i| (i as u8) ^ 0x5a).collect();
                blk.write(co, offset as u64, &data).unwrap();
                shadow[offset..offset + bytes].copy_from_slice(&data);
            }
            // Zeroes with a misaligned head and tail around whole blocks.
            let (at, count) = (4 * align + 1, 3 * align);
            blk.write_zeroes(co, at as u64, count as u64, false).unwrap();
            shadow[at..at + count].fill(0);
            // What a discard leaves is unspecified, so the shadow copy takes the file's word
            // for its range; under O_DIRECT only the whole block inside it may change.
            let (at, count) = (9 * align + 1, 2 * align);
            blk.discard(co, at as u64, count as u64).unwrap();
            let mut whole = vec![0u8; len];
            blk.read(co, 0, &mut whole).unwrap();
            let (from, to) = if combo.direct { (10 * align, 11 * align) } else { (at, at + count) };
            shadow[from..to].copy_from_slice(&whole[from..to]);
            let differs = whole.iter().zip(&shadow).position(|(a, b)| a != b);
            assert_eq!(differs, None, "{combo:?}: first byte read back differently");
            shadow
        })
        .unwrap();
        assert!(file.contents() == expected, "{combo:?}: the file differs from the node");
    }
}

#[test]
fn a_padded_write_into_a_partial_last_block_is_refused() {
    for combo in combos().into_iter().filter(|combo| combo.direct) {
        let len = 3 * 4096 + 100;
        let file = TempFile::with_contents("partial", &pattern(len, 9));
        let options = combo.options(&file, "");
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            let op = Op::Write { offset: len as u64 - 10, len: 10 };
            let result = blk.write(co, len as u64 - 10, &[1; 10]);
            assert_refused(result, ErrorKind::InvalidInput, "disk", op, "partial block");
            // Reading it works (padded past the end of the file, which reads as zeroes).
            let mut tail = [0u8; 100];
            blk.read(co, 3 * 4096, &mut tail).unwrap();
            assert_eq!(&tail[..], &pattern(len, 9)[3 * 4096..], "{combo:?}");
        })
        .unwrap();
        assert_eq!(file.contents(), pattern(len, 9), "{combo:?}: nothing written");
    }
}

#[test]
fn out_of_range_and_overflowing_requests_are_refused() {
    for combo in combos() {
        let file = TempFile::with_contents("range", &pattern(64 * KIB as usize, 7));
        let options = combo.options(&file, "");
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            let end = 64 * KIB;
            let mut buf = IoBuffer::new(4096);
            let kind = ErrorKind::InvalidInput;
            let range = "out of range: the node has 65536 bytes";
            let op = Op::Read { offset: end, len: 4096 };
            assert_refused(blk.read(co, end, &mut buf), kind, "disk", op, range);
            let op = Op::Write { offset: end - 4096, len: 8192 };
            let two = IoBuffer::new(8192);
            assert_refused(blk.write(co, end - 4096, &two), kind, "disk", op, range);
            let op = Op::Discard { offset: end, len: 4096 };
            assert_refused(blk.discard(co, end, 4096), kind, "disk", op, range);
            let op = Op::WriteZeroes { offset: 0, len: end + 4096 };
            assert_refused(blk.write_zeroes(co, 0, end + 4096, true), kind, "disk", op, range);
            let op = Op::BlockStatus { offset: end, len: 1 };
            assert_refused(blk.block_status(co, end, 1), kind, "disk", op, range);

            let overflow = "overflows";
            let far = u64::MAX - 4095;
            let op = Op::Read { offset: far, len: 4096 };
            assert_refused(blk.read(co, far, &mut buf), kind, "disk", op, overflow);
            let past = i64::MAX as u64 - 4095;
            let op = Op::Write { offset: past, len: 8192 };
            assert_refused(blk.write(co, past, &two), kind, "disk", op, overflow);
            let op = Op::Discard { offset: 4096, len: u64::MAX };
            assert_refused(blk.discard(co, 4096, u64::MAX), kind, "disk", op, overflow);
            let op = Op::BlockStatus { offset: 0, len: 0 };
            assert_refused(blk.block_status(co, 0, 0), kind, "disk", op, "empty");
            let op = Op::Truncate { len: u64::MAX };
            assert_refused(blk.truncate(co, u64::MAX), kind, "disk", op, "largest offset");

            // The last block still works.
            blk.read(co, end - 4096, &mut buf).unwrap();
            assert_eq!(blk.length(), end);
        })
        .unwrap();
        assert_eq!(file.contents(), pattern(64 * KIB as usize, 7), "{combo:?}: nothing written");
    }
}

#[test]
fn reads_past_the_end_of_the_file_are_zero_filled() {
    // 3 blocks and 100 bytes: the length is a multiple of no O_DIRECT alignment.
    let len = 3 * 4096 + 100;
    let contents = pattern(len, 8);
    for combo in combos() {
        let file = TempFile::with_contents("short", &contents);
        let options = combo.options(&file, "");
        let contents = contents.clone();
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            assert_eq!(blk.length(), len as u64);
            let node = blk.root();
            // The last block, in an aligned buffer and a misaligned one.
            let mut aligned = IoBuffer::new(4096);
            aligned.fill(0xAA);
            node.read(co, 3 * 4096, &mut [IoSliceMut::new(&mut aligned)]).unwrap();
            assert_eq!(&aligned[..100], &contents[3 * 4096..], "{combo:?}");
            assert!(aligned[100..].iter().all(|&b| b == 0), "{combo:?}: zeroes after the end");
            let mut odd = vec![0xAAu8; 4096 + 1];
            node.read(co, 3 * 4096, &mut [IoSliceMut::new(&mut odd[1..])]).unwrap();
            assert_eq!(&odd[1..101], &contents[3 * 4096..], "{combo:?}");
            assert!(odd[101..].iter().all(|&b| b == 0), "{combo:?}: zeroes after the end");
            // Straddling the end, split over two buffers.
            let mut first = IoBuffer::new(4096);
            let mut second = IoBuffer::new(4096);
            second.fill(0xAA);
            let mut bufs = [IoSliceMut::new(&mut first), IoSliceMut::new(&mut second)];
            node.read(co, 2 * 4096, &mut bufs).unwrap();
            assert_eq!(&first[..], &contents[2 * 4096..3 * 4096], "{combo:?}");
            assert_eq!(&second[..100], &contents[3 * 4096..], "{combo:?}");
            assert!(second[100..].iter().all(|&b| b == 0), "{combo:?}");
            // Wholly past the end.
            let mut beyond = IoBuffer::new(8192);
            beyond.fill(0xAA);
            node.read(co, 8 * 4096, &mut [IoSliceMut::new(&mut beyond)]).unwrap();
            assert!(beyond.iter().all(|&b| b == 0), "{combo:?}: zeroes past the end");
        })
        .unwrap();
    }
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    for combo in combos() {
        let mut shadow = pattern(1 << 20, 9);
        let file = TempFile::with_contents("zeroes", &shadow);
        let options = combo.options(&file, "");
        let after = run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            blk.write_zeroes(co, 64 * KIB, 64 * KIB, false).unwrap();
            shadow[64 << 10..128 << 10].fill(0);
            blk.write_zeroes(co, 256 * KIB, 12 * KIB, true).unwrap();
            shadow[256 << 10..268 << 10].fill(0);
            blk.discard(co, 512 * KIB, 64 * KIB).unwrap();
            shadow[512 << 10..576 << 10].fill(0);
            // The last bytes of the image.
            blk.write_zeroes(co, (1 << 20) - 4096, 4096, true).unwrap();
            shadow[(1 << 20) - 4096..].fill(0);
            blk.flush(co).unwrap();
            assert_eq!(read_vec(co, &blk, 0, 1 << 20), shadow, "{combo:?}");
            assert_eq!(blk.length(), 1 << 20, "{combo:?}: zeroing keeps the size");
            shadow
        })
        .unwrap();
        assert_eq!(file.contents(), after, "{combo:?}");
    }
}

#[test]
fn empty_requests_do_nothing_and_succeed() {
    for combo in combos() {
        let contents = pattern(64 * KIB as usize, 21);
        let file = TempFile::with_contents("empty", &contents);
        let options = combo.options(&file, "");
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            for offset in [0, 4096, 64 * KIB] {
                blk.read(co, offset, &mut []).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                blk.readv(co, offset, &mut []).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                blk.write(co, offset, &[]).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                blk.writev(co, offset, &[]).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                blk.discard(co, offset, 0).unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                for unmap in [false, true] {
                    blk.write_zeroes(co, offset, 0, unmap)
                        .unwrap_or_else(|e| panic!("{combo:?}: {e}"));
                }
            }
            assert_eq!(blk.length(), 64 * KIB);
        })
        .unwrap();
        assert!(file.contents() == contents, "{combo:?}: the file is untouched");
    }
}

#[test]
fn block_status_tells_holes_from_data() {
    for combo in combos() {
        let file = TempFile::sparse("sparse", 1 << 20);
        let options = combo.options(&file, "");
        let mib = 1 << 20;
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            let status = blk.block_status(co, 0, mib).unwrap();
            if status == (BlockStatus { allocation: Allocation::Data, len: mib }) {
                eprintln!("{combo:?}: the temporary directory's file system has no holes; skipped");
                return;
            }
            assert_eq!(status, BlockStatus { allocation: Allocation::Zero, len: mib });
            blk.write(co, 256 * KIB, &IoBuffer::copy_from(&pattern(8192, 10))).unwrap();
            blk.flush(co).unwrap();
            let zero = |len| BlockStatus { allocation: Allocation::Zero, len };
            let data = |len| BlockStatus { allocation: Allocation::Data, len };
            assert_eq!(blk.block_status(co, 0, mib).unwrap(), zero(256 * KIB), "{combo:?}");
            assert_eq!(blk.block_status(co, 0, 4096).unwrap(), zero(4096), "{combo:?}");
            let at = 256 * KIB;
            assert_eq!(blk.block_status(co, at, mib - at).unwrap(), data(8192), "{combo:?}");
            assert_eq!(blk.block_status(co, at + 4096, 1).unwrap(), data(1), "{combo:?}");
            let after = 264 * KIB;
            assert_eq!(blk.block_status(co, after, mib - after).unwrap(), zero(mib - after));
            assert_eq!(blk.block_status(co, mib - 1, 1).unwrap(), zero(1), "{combo:?}");
            // Unmapping zeroes make the data a hole again.
            blk.write_zeroes(co, at, 8192, true).unwrap();
            assert_eq!(blk.block_status(co, 0, mib).unwrap(), zero(mib), "{combo:?}");
            assert!(read_vec(co, &blk, at, 8192).iter().all(|&b| b == 0));
        })
        .unwrap();
    }
}

#[test]
fn truncate_grows_and_shrinks_the_file() {
    for combo in combos() {
        let file = TempFile::with_contents("truncate", &pattern(64 * KIB as usize, 11));
        let path = file.path().to_owned();
        let options = combo.options(&file, "");
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            blk.truncate(co, 128 * KIB).unwrap();
            assert_eq!(blk.length(), 128 * KIB, "{combo:?}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 * KIB, "{combo:?}");
            assert!(read_vec(co, &blk, 64 * KIB, 64 << 10).iter().all(|&b| b == 0));
            let block = IoBuffer::copy_from(&pattern(4096, 12));
            blk.write(co, 124 * KIB, &block).unwrap();
            assert_eq!(read_vec(co, &blk, 124 * KIB, 4096), &block[..], "{combo:?}");
            if combo.raw {
                assert_eq!(blk.root().length(), 128 * KIB);
            }

            blk.truncate(co, 32 * KIB).unwrap();
            assert_eq!(blk.length(), 32 * KIB, "{combo:?}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 32 * KIB, "{combo:?}");
            assert_eq!(read_vec(co, &blk, 0, 32 << 10), pattern(64 << 10, 11)[..32 << 10]);
            let mut buf = IoBuffer::new(4096);
            let op = Op::Read { offset: 32 * KIB, len: 4096 };
            let range = "out of range";
            assert_refused(
                blk.read(co, 32 * KIB, &mut buf),
                ErrorKind::InvalidInput,
                "disk",
                op,
                range,
            );
        })
        .unwrap();
    }
}

#[test]
fn a_raw_node_of_fixed_size_cannot_resize() {
    let file = TempFile::with_contents("raw-fixed", &pattern(64 * KIB as usize, 13));
    let options = format!("driver=raw,node-name=disk,size=32k,file.filename={}", file.name());
    run_in_coroutine(move |co| {
        let blk = open_blk(co, &options).unwrap();
        let op = Op::Truncate { len: 16 * KIB };
        assert_refused(
            blk.truncate(co, 16 * KIB),
            ErrorKind::Unsupported,
            "disk",
            op,
            "fixed size",
        );
        assert_eq!(blk.length(), 32 * KIB);
    })
    .unwrap();
    assert_eq!(file.contents().len() as u64, 64 * KIB);
}

#[test]
fn read_only_nodes_refuse_writes_and_open_the_file_read_only() {
    for combo in combos() {
        let contents = pattern(64 * KIB as usize, 14);
        let file = TempFile::with_contents("read-only", &contents);
        let path = file.path().to_owned();
        let options = combo.options(&file, ",read-only=on");
        let expected = contents.clone();
        run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            assert!(blk.root().is_read_only());
            let flags = open_flags(&path);
            assert_eq!(flags.len(), 1, "{combo:?}");
            assert_eq!(flags[0] & libc::O_ACCMODE, libc::O_RDONLY, "{combo:?}: {:o}", flags[0]);

            let kind = ErrorKind::PermissionDenied;
            let buf = IoBuffer::copy_from(&pattern(4096, 15));
            let why = "read-only";
            // Under raw, the child (also read-only, inherited) is never reached: the top node
            // refuses first.
            let op = Op::Write { offset: 0, len: 4096 };
            assert_refused(blk.write(co, 0, &buf), kind, "disk", op, why);
            let op = Op::WriteZeroes { offset: 0, len: 4096 };
            assert_refused(blk.write_zeroes(co, 0, 4096, false), kind, "disk", op, why);
            let op = Op::Discard { offset: 0, len: 4096 };
            assert_refused(blk.discard(co, 0, 4096), kind, "disk", op, why);
            let op = Op::Truncate { len: 4096 };
            assert_refused(blk.truncate(co, 4096), kind, "disk", op, why);
            blk.flush(co).unwrap();
            assert_eq!(read_vec(co, &blk, 0, 64 << 10), expected, "{combo:?}: reads work");
        })
        .unwrap();
        assert_eq!(file.contents(), contents, "{combo:?}: the file is untouched");
    }
}

#[test]
fn raw_window_maps_requests_into_the_file() {
    for combo in combos().into_iter().filter(|combo| combo.raw) {
        let mut shadow = pattern(1 << 20, 16);
        let file = TempFile::with_contents("window", &shadow);
        let options = combo.options(&file, ",offset=64k,size=128k");
        let after = run_in_coroutine(move |co| {
            let blk = open_blk(co, &options).unwrap();
            assert_eq!(blk.length(), 128 * KIB, "{combo:?}");
            let start = 64 << 10;
            assert_eq!(read_vec(co, &blk, 0, 4096), &shadow[start..start + 4096], "{combo:?}");
            let end = start + (128 << 10);
            assert_eq!(read_vec(co, &blk, 124 * KIB, 4096), &shadow[end - 4096..end]);

            let first = IoBuffer::copy_from(&pattern(4096, 17));
            let last = IoBuffer::copy_from(&pattern(4096, 18));
            blk.write(co, 0, &first).unwrap();
            blk.write(co, 124 * KIB, &last).unwrap();
            shadow[start..start + 4096].copy_from_slice(&first);
            shadow[end - 4096..end].copy_from_slice(&last);
            blk.write_zeroes(co, 8 * KIB, 4096, false).unwrap();
            shadow[start + 8192..start + 12288].fill(0);
            blk.discard(co, 16 * KIB, 4096).unwrap();
            shadow[start + 16384..start + 20480].fill(0);

            let mut buf = IoBuffer::new(4096);
            let op = Op::Read { offset: 128 * KIB, len: 4096 };
            let range = "out of range: the node has 131072 bytes";
            assert_refused(
                blk.read(co, 128 * KIB, &mut buf),
                ErrorKind::InvalidInput,
                "disk",
                op,
                range,
            );
            let op = Op::Write { offset: 124 * KIB, len: 8192 };
            let two = IoBuffer::new(8192);
            assert_refused(
                blk.write(co, 124 * KIB, &two),
                ErrorKind::InvalidInput,
                "disk",
                op,
                range,
            );
            blk.flush(co).unwrap();
            assert_eq!(read_vec(co, &blk, 0, 128 << 10), &shadow[start..end], "{combo:?}");
            shadow
        })
        .unwrap();
        assert_eq!(file.contents(), after, "{combo:?}: only the window changed, in place");
    }
}

#[test]
fn raw_window_outside_the_file_is_refused_at_open() {
    let file = TempFile::with_contents("bad-window", &pattern(64 * KIB as usize, 19));
    let name = file.name();
    run_in_coroutine(move |co| {
        let base = format!("driver=raw,file.node-name=proto,file.filename={name}");
        for (window, words) in [
            (",offset=64k,size=4k", "does not fit in the 65536 bytes of node 'proto'"),
            (",offset=60k,size=8k", "does not fit"),
            (",offset=128k", "window at offset 131072 of all remaining bytes does not fit"),
            (",offset=99999999T", "out of range"),
            (",size=1M", "does not fit"),
        ] {
            let options = format!("{base}{window}");
            let error = open_blk(co, &options)
                .err()
                .unwrap_or_else(|| panic!("{options}: opened; the window should be refused"));
            assert_eq!(error.kind(), ErrorKind::InvalidInput, "{options}: {error}");
            assert!(error.to_string().contains(words), "{options}: {error}");
        }
        // A window may end exactly at the end of the file, and be empty.
        let blk = open_blk(co, &format!("{base},offset=60k,size=4k")).unwrap();
        assert_eq!(blk.length(), 4096);
        drop(blk); // Its image lock keeps a second writer out.
        let blk = open_blk(co, &format!("{base},offset=64k")).unwrap();
        assert_eq!(blk.length(), 0);
        drop(blk);

        // Under O_DIRECT the window must be aligned to the file's requests.
        let direct = format!("{base},file.cache=none,offset=100,size=4k");
        let error = open_blk(co, &direct).expect_err("a misaligned window");
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
        assert!(error.to_string().contains("multiples of"), "{error}");
        assert!(error.to_string().contains("'proto'"), "{error}");
    })
    .unwrap();
}

#[test]
fn null_co_reads_zeroes_only_when_asked() {
    run_in_coroutine(|co| {
        let blk = open_blk(co, "driver=null-co,node-name=null,size=1M,read-zeroes=on").unwrap();
        assert_eq!(blk.length(), 1 << 20);
        let mut buf = vec![0xAAu8; 4096];
        blk.read(co, 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let zero = BlockStatus { allocation: Allocation::Zero, len: 8192 };
        assert_eq!(blk.block_status(co, 0, 8192).unwrap(), zero);
        blk.write(co, 0, &[1; 512]).unwrap();
        blk.write_zeroes(co, 0, 4096, true).unwrap();
        blk.discard(co, 0, 4096).unwrap();
        blk.flush(co).unwrap();

        let blk = open_blk(co, "driver=null,read-zeroes=off").unwrap();
        assert_eq!(blk.length(), 1 << 30, "QEMU's default size");
        let mut buf = vec![0xAAu8; 4096];
        blk.read(co, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xAA), "the buffer is left as it was");
        let data = BlockStatus { allocation: Allocation::Data, len: 8192 };
        assert_eq!(blk.block_status(co, 0, 8192).unwrap(), data);
        let error = blk.read(co, 1 << 30, &mut buf).unwrap_err();
        assert!(error.to_string().contains("out of range"), "{error}");
    })
    .unwrap();
}

/// Size options are read as QEMU reads them (`qemu_strtosz`): fractions with a unit, hex.
#[test]
fn size_options_are_read_as_qemu_reads_them() {
    run_in_coroutine(|co| {
        for (size, bytes) in [("1.5M", 3 << 19), ("0x20000", 1 << 17), ("64k", 1 << 16)] {
            let blk = open_blk(co, &format!("driver=null-co,size={size}")).unwrap();
            assert_eq!(blk.length(), bytes, "size={size}");
        }
    })
    .unwrap();
}

/// A latency suspends the request (others run meanwhile); without one, a request does not
/// yield. Nothing is timed: the proof is which coroutine ran first.
#[test]
fn null_co_latency_suspends_requests() {
    for (options, yields) in [
        ("driver=null-co,size=1M,latency-ns=1000000", true),
        ("driver=null-co,size=1M,latency-ns=0", false),
        ("driver=null-co,size=1M", false),
    ] {
        let context = AioContext::new().unwrap();
        let blk = run_in_coroutine(move |co| open_blk(co, options).unwrap()).unwrap();
        let other_ran = Rc::new(Cell::new(false));
        let seen = Rc::new(Cell::new(None));
        let (flag, result) = (other_ran.clone(), seen.clone());
        let first = context.spawn(move |co| {
            let mut buf = [0u8; 512];
            blk.read(co, 0, &mut buf).unwrap();
            blk.write(co, 0, &buf).unwrap();
            result.set(Some(flag.get()));
        });
        let flag = other_ran.clone();
        let second = context.spawn(move |_| flag.set(true));
        context.wait_while(|| !first.is_finished() || !second.is_finished());
        assert_eq!(seen.get(), Some(yields), "{options}");
    }
}

#[test]
fn option_errors_name_the_problem() {
    let file = TempFile::with_contents("options", &[0; 4096]);
    let name = file.name();
    run_in_coroutine(move |co| {
        let cases = [
            ("driver=qcow3,file=x".to_string(), "unknown driver 'qcow3'"),
            (
                format!("driver=file,filename={name},colour=blue"),
                "driver 'file' has no option 'colour'",
            ),
            (
                format!("driver=raw,file.filename={name},flavour=x"),
                "driver 'raw' has no option 'flavour'",
            ),
            (
                format!("driver=raw,file.filename={name},file.bogus=1"),
                "driver 'file' has no option 'bogus'",
            ),
            ("driver=null-co,size=12Q".to_string(), "option 'size': '12Q' is not a size"),
            ("driver=null-co,size=1.5".to_string(), "option 'size': '1.5' is not a size"),
            ("driver=null-co,size=1GiB".to_string(), "option 'size': '1GiB' is not a size"),
            ("driver=null-co,size=lots".to_string(), "option 'size': 'lots'"),
            ("driver=null-co,size=99999999T".to_string(), "'99999999T' is out of range"),
            ("driver=null-co,size=-1".to_string(), "'-1' is out of range"),
            (
                "driver=null-co,size=8E".to_string(),
                "'8E' is out of range: must be between 0 and 9223372036854775807",
            ),
            ("driver=null-co,latency-ns=soon".to_string(), "option 'latency-ns'"),
            (
                "driver=null-co,read-zeroes=maybe".to_string(),
                "option 'read-zeroes': 'maybe' is not on/off",
            ),
            ("driver=file".to_string(), "driver 'file', option 'filename': missing"),
            ("driver=raw".to_string(), "driver 'raw', option 'file': missing"),
            ("driver=raw,size=1M".to_string(), "option 'file': missing"),
            ("filename=disk.img".to_string(), "no 'driver' option"),
            (
                format!("driver=file,filename={name},cache=sometimes"),
                "option 'cache': unknown mode 'sometimes'",
            ),
            (
                format!("driver=file,filename={name},aio=native"),
                "option 'aio': unknown mode 'native'",
            ),
            ("driver=null-co,size".to_string(), "option 'size' has no '=value'"),
            ("driver=null-co,size=1M,size=2M".to_string(), "option 'size' is given twice"),
        ];
        for (options, words) in cases {
            let error = open_blk(co, &options)
                .err()
                .unwrap_or_else(|| panic!("{options}: opened; the options should be refused"));
            assert_eq!(error.kind(), ErrorKind::InvalidInput, "{options}: {error}");
            assert!(error.to_string().contains(words), "{options}: {error:?} should say {words:?}");
        }
        // A missing file: its path is in the message.
        let missing = format!("{name}-missing");
        let error = open_blk(co, &format!("driver=raw,file={missing}")).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
        assert!(error.to_string().contains(&missing), "{error}");
        // Commas inside a value are written twice.
        let error = open_blk(co, "driver=file,filename=a,,b").unwrap_err();
        assert!(error.to_string().contains("a,b"), "{error}");
    })
    .unwrap();
}
