//! Guest writes of any offset and length into a qcow2 image whose file is opened with
//! `O_DIRECT` (`cache.direct=on`), which takes only whole sectors: in place into allocated
//! clusters (and subclusters), into new ones, and many at once into the same sector, under
//! each aio engine. What we read and what qemu-img reads afterwards is what was written.

mod qcow2_support;

use aiocoro::aio::AioContext;
use aiocoro_block::{BlockBackend, IoBuffer, run_in_coroutine};
use qcow2_support::*;

const SIZE: usize = 1 << 20;

fn open_direct(image: &std::path::Path, aio: &str) -> BlockBackend {
    open_backend(&format!(
        "driver=qcow2,cache.direct=on,aio={aio},file.filename={}",
        image.display()
    ))
}

/// An image of `options` whose first half qemu-io filled (so its clusters are allocated).
fn half_filled(scratch: &Scratch, name: &str, options: &str) -> (std::path::PathBuf, Vec<u8>) {
    let image = scratch.path(name);
    create_qcow2(image.to_str().unwrap(), options, "1M");
    qemu_io("qcow2", &image, &["write -P 0x5a 0 512k"]);
    let mut expected = vec![0u8; SIZE];
    expected[..SIZE / 2].fill(0x5a);
    (image, expected)
}

/// Writes `(offset, len, byte)` one after the other.
fn write_in_turn(blk: &BlockBackend, writes: &[(u64, usize, u8)], expected: &mut [u8]) {
    for &(offset, len, byte) in writes {
        expected[offset as usize..][..len].fill(byte);
    }
    let (blk, writes) = (blk.clone(), writes.to_vec());
    run_in_coroutine(move |co| {
        for (offset, len, byte) in writes {
            blk.write(co, offset, &vec![byte; len])
                .unwrap_or_else(|error| panic!("write of {len} at {offset}: {error}"));
        }
    })
    .unwrap();
}

/// 64 one-byte writes into the same 4 KiB, all at once, each at its own offset.
fn write_at_once(blk: &BlockBackend, base: u64, expected: &mut [u8]) {
    let context = AioContext::new().unwrap();
    let requests: Vec<_> = (0..64u64)
        .map(|n| {
            let blk = blk.clone();
            let at = base + n * 61;
            expected[at as usize] = 0x80 | n as u8;
            context.spawn(move |co| {
                let data = IoBuffer::copy_from(&[0x80 | n as u8]);
                blk.write(co, at, &data).unwrap_or_else(|error| panic!("write at {at}: {error}"));
            })
        })
        .collect();
    context.wait_while(|| requests.iter().any(|request| !request.is_finished()));
}

fn assert_holds(image: &std::path::Path, blk: BlockBackend, expected: &[u8], what: &str) {
    let ours = run_in_coroutine(move |co| {
        blk.flush(co).unwrap();
        let mut all = vec![0u8; SIZE];
        blk.read(co, 0, &mut all).unwrap();
        all
    })
    .unwrap();
    assert_same_bytes(&ours, expected, &format!("{what}: ours"));
    assert_same_bytes(&qemu_raw(image), expected, &format!("{what}: qemu-img"));
    qemu_check(image);
}

#[test]
fn unaligned_writes_reach_an_o_direct_file() {
    let scratch = Scratch::new("direct-writes");
    for aio in ["threads", "io_uring"] {
        for options in ["cluster_size=64k", "cluster_size=16k,extended_l2=on"] {
            let what = format!("aio={aio}, {options}");
            let (image, mut expected) = half_filled(&scratch, "image.qcow2", options);
            let blk = open_direct(&image, aio);
            let writes = [
                // In place, inside a sector, across sectors, across clusters.
                (100, 100, 0x01),
                (70_000, 5000, 0x02),
                ((64 << 10) - 10, 20, 0x03),
                // Into new clusters (subclusters), unaligned.
                ((600 << 10) + 7, 3000, 0x04),
                ((700 << 10) + 511, 2, 0x05),
                // In place into what the last writes allocated.
                ((600 << 10) + 1000, 9, 0x06),
            ];
            write_in_turn(&blk, &writes, &mut expected);
            write_at_once(&blk, 8192, &mut expected);
            write_at_once(&blk, (800 << 10) + 4096, &mut expected);
            assert_holds(&image, blk, &expected, &what);
        }
    }
}
