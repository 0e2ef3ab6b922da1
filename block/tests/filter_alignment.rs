//! A filter that says nothing about alignment, over an `O_DIRECT` file (`cache=none`):
//! requests reaching the filter must satisfy the file below it, so unaligned guest writes
//! are padded above the filter instead of reaching `O_DIRECT` as they are (`EINVAL`).

mod common;

use std::io::{self, IoSlice, IoSliceMut};

use aiocoro::coroutine::Co;
use aiocoro_block::{BlockBackend, BlockDriver, BlockGraph, BlockNode, Child, ChildLabel};
use common::{TempFile, pattern};

const LEN: usize = 64 << 10;

/// Passes every request to its `file` child; states no alignment of its own.
struct PassThrough {
    file: Child,
}

impl BlockDriver for PassThrough {
    fn format_name(&self) -> &'static str {
        "pass-through"
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        Ok(self.file.node().length())
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.file.node().read(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.file.node().write(co, offset, bufs)
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        self.file.node().flush(co)
    }
}

#[test]
fn unaligned_writes_through_a_filter_over_cache_none_are_padded() {
    let before = pattern(LEN, 0x5a);
    let file = TempFile::with_contents("direct-under-filter", &before);
    let options = format!("driver=file,filename={},cache=none", file.name());
    let mut expected = before.clone();
    let writes: [(usize, usize, u8); 4] =
        [(100, 10, 0xa1), (4000, 200, 0xa2), (511, 3000, 0xa3), (LEN - 7, 7, 0xa4)];
    for (offset, len, byte) in writes {
        expected[offset..offset + len].fill(byte);
    }
    let want = expected.clone();
    let read_back = aiocoro_block::run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (file_id, file_node) = aiocoro_block::open(co, &graph, &options)?;
        assert!(file_node.alignment().request > 1, "O_DIRECT needs aligned requests");
        let (_, filter) = graph.add_node_with(|edges| {
            let file = edges.attach(ChildLabel::filtered_file(), file_id)?;
            BlockNode::new(co, "filter", PassThrough { file }, false)
        })?;
        let blk = BlockBackend::new(filter.clone());
        for (offset, len, byte) in writes {
            blk.write(co, offset as u64, &vec![byte; len])?;
        }
        blk.flush(co)?;
        let mut back = vec![0u8; 3001];
        blk.read(co, 510, &mut back)?;
        assert_eq!(back, want[510..3511], "an unaligned read through the filter");
        assert_eq!(filter.alignment(), file_node.alignment(), "the filter takes its child's");
        Ok::<_, io::Error>(())
    });
    read_back.unwrap().unwrap();
    assert!(
        file.contents() == expected,
        "the file holds the padded writes and nothing else changed"
    );
}

#[test]
fn a_stricter_child_two_levels_down_reaches_the_filter() {
    let buffered = TempFile::with_contents("buffered-under-raw", &[0x33; LEN]);
    let direct = TempFile::with_contents("direct-under-raw", &[0x44; LEN]);
    let raw_options = format!("driver=raw,file.filename={}", buffered.name());
    let direct_options = format!("driver=file,filename={},cache=none", direct.name());
    aiocoro_block::run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (raw_id, _) = aiocoro_block::open(co, &graph, &raw_options)?;
        let (_, filter) = graph.add_node_with(|edges| {
            let file = edges.attach(ChildLabel::filtered_file(), raw_id)?;
            BlockNode::new(co, "filter", PassThrough { file }, false)
        })?;
        assert_eq!(filter.alignment().request, 1, "the page cache takes any byte");
        let (direct_id, direct_node) = aiocoro_block::open(co, &graph, &direct_options)?;
        graph.replace_child(raw_id, "file", direct_id)?;
        assert_eq!(filter.alignment(), direct_node.alignment(), "refreshed up to the filter");
        let blk = BlockBackend::new(filter);
        blk.write(co, 100, &[0x55; 10])?;
        let mut back = [0u8; 120];
        blk.read(co, 0, &mut back)?;
        assert_eq!(&back[..100], &[0x44; 100][..]);
        assert_eq!(&back[100..110], &[0x55; 10][..]);
        assert_eq!(&back[110..], &[0x44; 10][..]);
        Ok::<_, io::Error>(())
    })
    .unwrap()
    .unwrap();
    assert!(buffered.contents().iter().all(|&b| b == 0x33), "the old child is untouched");
}
