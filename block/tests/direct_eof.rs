//! `O_DIRECT` (`cache=none`) at an end of file that is not block-aligned: QEMU leaves one
//! after a compressed write (`qemu-io -c 'write -c ...'`), the file ending inside the
//! compressed cluster. Reading that cluster reads past the end; the short read must be
//! completed with zeroes (as QEMU does), never continued at the unaligned offset where it
//! stopped: once the file has grown there (another request allocating a cluster), the
//! kernel refuses that read with `EINVAL`.

mod qcow2_support;

use std::path::Path;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockGraph, IoBuffer, run_in_coroutine};
use qcow2_support::*;

const CLUSTER: u64 = 64 << 10;

/// Races per engine and first request: whether the allocations grow the file between the
/// short read and what follows it depends on timing (every round hit it on the thread
/// pool before the fix, about half of them on io_uring).
const ROUNDS: usize = 4;

/// An image of 16 clusters whose last written cluster is compressed: the file ends inside
/// it, at an offset that is no multiple of 512.
fn image_ending_in_a_compressed_cluster(scratch: &Scratch) -> std::path::PathBuf {
    let image = scratch.path("compressed-tail.qcow2");
    create_qcow2(image.to_str().unwrap(), "cluster_size=64k", "1M");
    qemu_io("qcow2", &image, &["write -P 0x11 0 64k", "write -c -P 0x5a 64k 64k"]);
    let len = std::fs::metadata(&image).unwrap().len();
    assert_ne!(len % 512, 0, "the file must end inside the compressed cluster: {len} bytes");
    image
}

fn options(image: &Path, aio: &str) -> String {
    format!("driver=qcow2,file.filename={},file.cache=none,file.aio={aio}", image.display())
}

fn open_backend(options: &str) -> BlockBackend {
    let options = options.to_owned();
    run_in_coroutine(move |co| {
        let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options)
            .unwrap_or_else(|error| panic!("{options}: {error}"));
        BlockBackend::new(node)
    })
    .unwrap()
}

fn read(co: &Co, blk: &BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = IoBuffer::new(len);
    blk.read(co, offset, &mut buf).unwrap_or_else(|error| panic!("read at {offset}: {error}"));
    buf.to_vec()
}

/// What the first request does to the compressed cluster, racing the allocations.
#[derive(Clone, Copy, Debug)]
enum First {
    /// Reads the whole cluster.
    Read,
    /// Writes 512 bytes into it: a copy on write that reads it.
    CopyOnWrite,
}

/// Reads the compressed cluster, or copies it on write (512 bytes into it), while other
/// requests allocate clusters, growing the file past its unaligned end; under each aio
/// engine. What we read and what qemu-img reads afterwards is the data written.
#[test]
fn compressed_cluster_at_an_unaligned_end_reads_and_copies_on_write_under_o_direct() {
    for aio in ["threads", "io_uring"] {
        for first in [First::Read, First::CopyOnWrite] {
            for _ in 0..ROUNDS {
                race_the_compressed_cluster_with_allocations(aio, first);
            }
        }
    }
}

fn race_the_compressed_cluster_with_allocations(aio: &'static str, first: First) {
    let what = format!("aio={aio}, {first:?}");
    let scratch = Scratch::new(&format!("direct-eof-{aio}-{first:?}"));
    let image = image_ending_in_a_compressed_cluster(&scratch);
    let mut expected = vec![0u8; 1 << 20];
    expected[..CLUSTER as usize].fill(0x11);
    expected[CLUSTER as usize..2 * CLUSTER as usize].fill(0x5a);
    if let First::CopyOnWrite = first {
        expected[(CLUSTER + 1024) as usize..(CLUSTER + 1536) as usize].fill(0xc3);
    }
    for cluster in 2..16 {
        let at = (cluster * CLUSTER) as usize;
        expected[at..at + 512].fill(cluster as u8);
    }
    // The context every request below runs in (run_in_coroutine takes the thread's).
    let context = AioContext::new().unwrap();
    let blk = open_backend(&options(&image, aio));
    let mut requests = Vec::new();
    let on_compressed = blk.clone();
    let label = what.clone();
    requests.push(context.spawn(move |co| {
        match first {
            First::Read => {
                let cluster = read(co, &on_compressed, CLUSTER, CLUSTER as usize);
                assert!(cluster == [0x5a; CLUSTER as usize], "{label}: the compressed cluster");
            }
            First::CopyOnWrite => on_compressed
                .write(co, CLUSTER + 1024, &IoBuffer::copy_from(&[0xc3; 512]))
                .unwrap_or_else(|error| panic!("{label}: the copy on write: {error}")),
        }
    }));
    for cluster in 2..16u64 {
        let grow = blk.clone();
        let label = what.clone();
        requests.push(context.spawn(move |co| {
            let data = IoBuffer::copy_from(&[cluster as u8; 512]);
            grow.write(co, cluster * CLUSTER, &data)
                .unwrap_or_else(|error| panic!("{label}: write at cluster {cluster}: {error}"));
        }));
    }
    context.wait_while(|| requests.iter().any(|request| !request.is_finished()));
    let last = blk.clone();
    let ours = run_in_coroutine(move |co| {
        last.flush(co).unwrap();
        read(co, &last, 0, 1 << 20)
    })
    .unwrap();
    drop(blk);
    assert_same_bytes(&ours, &expected, &format!("{what}: ours"));
    assert_same_bytes(&qemu_raw(&image), &expected, &format!("{what}: qemu-img"));
    qemu_check(&image);
}
