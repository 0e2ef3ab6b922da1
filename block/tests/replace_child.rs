//! Replacing a node's child in the graph while requests run on several IoThreads (QEMU's
//! `bdrv_replace_child`): requests that started on the old child finish there, later ones
//! reach the new child, and none fails.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use aiocoro::aio::IoThread;
use aiocoro_block::{BlockBackend, BlockGraph, open, run_in_coroutine};
use common::{HANG, TempFile};

const LEN: usize = 1 << 20;
const BLOCK: usize = 4096;

#[test]
fn a_child_replaced_under_running_reads_takes_the_later_ones() {
    let old = TempFile::with_contents("old-child", &vec![0x11; LEN]);
    let new = TempFile::with_contents("new-child", &vec![0x22; LEN]);
    let graph = Arc::new(BlockGraph::new());
    let (g, old_name, new_name) = (graph.clone(), old.name(), new.name());
    let (raw_id, new_id, blk) = run_in_coroutine(move |co| {
        let raw = format!("driver=raw,file.filename={old_name},file.cache=none");
        let (raw_id, node) = open(co, &g, &raw).unwrap();
        let file = format!("driver=file,filename={new_name},cache=none");
        let (new_id, _) = open(co, &g, &file).unwrap();
        (raw_id, new_id, BlockBackend::new(node))
    })
    .unwrap();

    let threads: Vec<IoThread> =
        (0..2).map(|i| IoThread::spawn(&format!("reader-{i}")).unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (done, finished) = mpsc::channel();
    for (t, thread) in threads.iter().enumerate() {
        for lane in 0..4 {
            let (blk, stop, done) = (blk.clone(), stop.clone(), done.clone());
            thread
                .handle()
                .spawn(move |co| {
                    let mut seen = [false; 2];
                    let mut buf = vec![0u8; BLOCK];
                    let mut block = t * 4 + lane;
                    while !stop.load(Ordering::Relaxed) || !seen[1] {
                        let offset = ((block * BLOCK) % LEN) as u64;
                        blk.read(co, offset, &mut buf).expect("no read fails");
                        let whole = buf.iter().all(|&b| b == buf[0]);
                        assert!(whole && (buf[0] == 0x11 || buf[0] == 0x22), "a read of one child");
                        seen[usize::from(buf[0] == 0x22)] = true;
                        block += 8;
                    }
                    done.send(seen).unwrap();
                })
                .unwrap();
        }
    }
    drop(done);
    std::thread::sleep(Duration::from_millis(20));
    let old_id = graph.replace_child(raw_id, "file", new_id).unwrap();
    assert_ne!(old_id, new_id);
    stop.store(true, Ordering::Relaxed);
    let (mut readers, mut saw_old) = (0, false);
    while let Ok(seen) = finished.recv_timeout(HANG) {
        assert!(seen[1], "every reader reached the new child");
        saw_old |= seen[0];
        readers += 1;
    }
    assert_eq!(readers, 8, "every reader ended");
    assert!(saw_old, "reads ran on the old child before the replacement");
    {
        let _drained = blk.drain();
        assert_eq!(blk.in_flight(), 0);
    }
    for thread in threads {
        thread.stop();
    }
    // The old child left the graph's edges; the new one is the raw node's file.
    assert!(graph.parents(old_id).is_empty());
    let children = graph.children(raw_id);
    assert_eq!(children.len(), 1);
    assert_eq!((children[0].0.name(), children[0].1), ("file", new_id));
}

#[test]
fn a_stricter_child_makes_its_parents_pad() {
    let buffered = TempFile::with_contents("buffered", &vec![0x33; LEN]);
    let direct = TempFile::with_contents("direct", &vec![0x44; LEN]);
    let (buffered_name, direct_name) = (buffered.name(), direct.name());
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let raw = format!("driver=raw,file.filename={buffered_name}");
        let (raw_id, node) = open(co, &graph, &raw).unwrap();
        let blk = BlockBackend::new(node);
        assert_eq!(blk.root().alignment().request, 1, "the page cache takes any byte");
        let file = format!("driver=file,filename={direct_name},cache=none");
        let (direct_id, _) = open(co, &graph, &file).unwrap();
        {
            // (A drained section belongs here when requests run elsewhere.)
            graph.replace_child(raw_id, "file", direct_id).unwrap();
        }
        let align = blk.root().alignment().request;
        assert!(align >= 512, "the raw node took its new child's O_DIRECT alignment: {align}");
        // A misaligned write is padded now, not handed to O_DIRECT as it is.
        blk.write(co, 100, &[0x55; 10]).unwrap();
        let mut back = [0u8; 120];
        blk.read(co, 0, &mut back).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0x44));
        assert!(back[100..110].iter().all(|&b| b == 0x55));
        assert!(back[110..].iter().all(|&b| b == 0x44));
    })
    .unwrap();
    assert!(buffered.contents().iter().all(|&b| b == 0x33), "the old child is untouched");
}
