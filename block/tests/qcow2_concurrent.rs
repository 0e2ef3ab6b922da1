//! One qcow2 backend read from several threads at once, several coroutines on each, with an
//! L2 cache far smaller than the image (tables are evicted and reloaded under the metadata
//! lock while other requests run); and the same through `O_DIRECT` files, where compressed
//! clusters and L2 tables are read through aligned bounce buffers.

mod qcow2_support;

use std::path::Path;
use std::sync::Arc;

use aiocoro::aio::AioContext;
use aiocoro_block::{BlockBackend, run_in_coroutine};
use qcow2_support::*;

const THREADS: usize = 4;
const COROUTINES: usize = 8;
const READS: usize = 150;

/// A 512 B-cluster image (one L2 table per 32 KiB) over a 4k-cluster qcow2 over raw.
fn image(scratch: &Scratch) -> std::path::PathBuf {
    let (base, mid, top) =
        (scratch.path("base.raw"), scratch.path("mid.qcow2"), scratch.path("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "3M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 3M"]);
    let (b, m, t) = (base.to_str().unwrap(), mid.to_str().unwrap(), top.to_str().unwrap());
    create_qcow2_over(m, "cluster_size=4k", b, "raw", "4M");
    qemu_io("qcow2", &mid, &["write -P 0x22 1M 512k", "write -z 2M 64k"]);
    create_qcow2_over(t, "cluster_size=512", m, "qcow2", "4M");
    let mut writes = Vec::new();
    for i in 0..64u64 {
        writes.push(format!("write -P {} {} {}", 0x30 + i, i * 61_440 + 1000, 700 + i * 37));
    }
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io("qcow2", &top, &writes);
    top
}

fn read_concurrently(blk: BlockBackend, expected: Arc<Vec<u8>>) {
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (blk, expected) = (blk.clone(), expected.clone());
            std::thread::spawn(move || {
                let ctx = AioContext::new().unwrap();
                let coroutines: Vec<_> = (0..COROUTINES)
                    .map(|c| {
                        let (blk, expected) = (blk.clone(), expected.clone());
                        ctx.spawn(move |co| {
                            let mut state = (t * 100 + c) as u64 * 0x9e37_79b9 + 1;
                            let mut next = move || {
                                state ^= state << 13;
                                state ^= state >> 7;
                                state ^= state << 17;
                                state
                            };
                            let len = expected.len() as u64;
                            for _ in 0..READS {
                                let offset = next() % len;
                                let n = (next() % 20_000 + 1).min(len - offset) as usize;
                                let mut buf = vec![0u8; n];
                                blk.read(co, offset, &mut buf).unwrap();
                                let want = &expected[offset as usize..offset as usize + n];
                                assert!(
                                    buf == want,
                                    "thread {t} coroutine {c}: read of {n} at {offset} differs"
                                );
                            }
                        })
                    })
                    .collect();
                ctx.wait_while(|| coroutines.iter().any(|co| !co.is_finished()));
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a reader panicked");
    }
}

#[test]
fn several_threads_read_one_image_through_a_small_l2_cache() {
    let scratch = Scratch::new("concurrent");
    let top = image(&scratch);
    let expected = Arc::new(qemu_raw(&top));
    let options =
        format!("driver=qcow2,read-only=on,l2-cache-size=4k,file.filename={}", top.display());
    read_concurrently(open_backend(&options), expected);
}

fn direct(image: &Path, extra: &str) -> String {
    format!("driver=qcow2,read-only=on,cache.direct=on{extra},file.filename={}", image.display())
}

#[test]
fn o_direct_files_read_compressed_clusters_and_backing_chains() {
    let scratch = Scratch::new("direct");
    let top = image(&scratch);
    let expected = Arc::new(qemu_raw(&top));
    read_concurrently(open_backend(&direct(&top, "")), expected);

    let src = scratch.path("src.raw");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 1000) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let packed = scratch.path("c.qcow2");
    let (s, p) = (src.to_str().unwrap(), packed.to_str().unwrap());
    compress_to_qcow2(s, p, "cluster_size=4k");
    let blk = open_backend(&direct(&packed, ""));
    let ours = run_in_coroutine(move |co| {
        let mut all = vec![0u8; blk.length() as usize];
        for (i, piece) in all.chunks_mut(3000).enumerate() {
            blk.read(co, (i * 3000) as u64, piece)?;
        }
        Ok::<_, std::io::Error>(all)
    })
    .unwrap()
    .unwrap();
    assert_same_bytes(&ours, &data, "compressed over O_DIRECT");
}
