//! Block layer benchmarks: a null-driver request round trip (QEMU's `qemu-img bench` on
//! `null-co` measures the same overhead) and a 4 KiB read of a raw file through the page
//! cache and with `O_DIRECT` on io_uring. `cargo bench -p aiocoro-block --bench block`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiocoro::aio::AioContext;
use aiocoro_block::{BlockBackend, BlockGraph, BlockNode, IoBuffer, run_in_coroutine};
use criterion::{Criterion, criterion_group, criterion_main};

/// The test file of the raw-file benchmarks: 64 MiB of real data.
const FILE_SIZE: usize = 64 << 20;

fn open(options: &str) -> Arc<BlockNode> {
    let options = options.to_owned();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        aiocoro_block::open(co, &graph, &options).map(|(_, node)| node)
    })
    .and_then(|opened| opened)
    .expect("the benchmark's node opens")
}

/// Times `iterations` 4 KiB reads by one coroutine, one after the other, at offsets stepping
/// through the node.
fn reads(ctx: &AioContext, blk: &BlockBackend, iterations: u64) -> Duration {
    let elapsed = Rc::new(RefCell::new(Duration::ZERO));
    let (blk, out) = (blk.clone(), elapsed.clone());
    let co = ctx.spawn(move |co| {
        let mut buffer = IoBuffer::new(4096);
        let blocks = blk.length() / 4096;
        let start = Instant::now();
        for i in 0..iterations {
            blk.read(co, (i % blocks) * 4096, &mut buffer).expect("a read");
        }
        *out.borrow_mut() = start.elapsed();
    });
    ctx.wait_while(|| !co.is_finished());
    elapsed.take()
}

fn block(c: &mut Criterion) {
    let ctx = AioContext::new().expect("a context");
    let null = BlockBackend::new(open("driver=null-co,size=1G"));
    c.bench_function("null/read_4k", |b| b.iter_custom(|n| reads(&ctx, &null, n)));

    let path = std::env::temp_dir().join(format!("aiocoro-block-bench-{}.raw", std::process::id()));
    let data: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&path, data).expect("the test file");
    for (name, cache) in
        [("raw_file/read_4k_writeback", "writeback"), ("raw_file/read_4k_direct", "none")]
    {
        let options = format!(
            "driver=raw,file.filename={},file.cache={cache},file.aio=io_uring",
            path.display()
        );
        let blk = BlockBackend::new(open(&options));
        c.bench_function(name, |b| b.iter_custom(|n| reads(&ctx, &blk, n)));
    }
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, block);
criterion_main!(benches);
