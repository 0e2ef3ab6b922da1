//! A parent with two children of the same kind (QEMU's roles give room for it): a mirror
//! that writes to both its copies and reads from the primary one, over one file through the
//! page cache and one with `O_DIRECT`. Unaligned guest writes reach both copies (requests
//! reaching the mirror satisfy the stricter copy), and the graph keeps the role rules.

mod common;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use aiocoro_block::aiocoro::coroutine::Co;
use aiocoro_block::graph::{GraphError, NodeId};
use aiocoro_block::{
    BlockBackend, BlockDriver, BlockGraph, BlockNode, BlockStatus, Child, ChildLabel, ChildRole,
    invalid_input, run_in_coroutine,
};
use common::{TempFile, pattern};

const LEN: usize = 256 << 10;

/// Writes go to every copy, in order; reads, lengths and block status come from the
/// primary copy (the first).
struct Mirror {
    copies: Vec<Child>,
}

impl Mirror {
    fn primary(&self) -> &Child {
        &self.copies[0]
    }
}

impl BlockDriver for Mirror {
    fn format_name(&self) -> &'static str {
        "mirror"
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        Ok(self.primary().node().length())
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.primary().node().read(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.copies.iter().try_for_each(|copy| copy.node().write(co, offset, bufs))
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        self.copies.iter().try_for_each(|copy| copy.node().flush(co))
    }

    fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.primary().node().block_status(co, offset, len)
    }
}

/// Adds a mirror named `name` over the nodes `copies`, the first primary.
fn add_mirror(
    co: &Co,
    graph: &BlockGraph,
    name: &str,
    copies: &[NodeId],
) -> io::Result<(NodeId, Arc<BlockNode>)> {
    graph.add_node_with(|edges| {
        let mut children = Vec::new();
        for (i, id) in copies.iter().enumerate() {
            let role = if i == 0 { ChildRole::DATA | ChildRole::PRIMARY } else { ChildRole::DATA };
            children.push(edges.attach(ChildLabel::new(format!("child{i}"), role), *id)?);
        }
        let lengths: Vec<u64> = children.iter().map(|child| child.node().length()).collect();
        if lengths.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(invalid_input(format!("mirror: copies of different lengths {lengths:?}")));
        }
        BlockNode::new(co, name, Mirror { copies: children }, false)
    })
}

/// Opens a mirror (node `mirror`) over the nodes `copies` describe, the first primary.
fn open_mirror(
    co: &Co,
    graph: &BlockGraph,
    copies: &[String],
) -> io::Result<(NodeId, Arc<BlockNode>)> {
    let mut ids = Vec::new();
    for options in copies {
        ids.push(aiocoro_block::open(co, graph, options)?.0);
    }
    add_mirror(co, graph, "mirror", &ids)
}

#[test]
fn a_mirror_writes_both_copies_and_reads_the_primary() {
    let before = pattern(LEN, 0x3c);
    let buffered = TempFile::with_contents("mirror-buffered", &before);
    let direct = TempFile::with_contents("mirror-direct", &before);
    let copies = [
        format!("driver=file,filename={}", buffered.name()),
        format!("driver=file,filename={},cache=none", direct.name()),
    ];
    let writes: [(usize, usize, u8); 4] =
        [(1, 1, 0xb1), (4095, 2, 0xb2), (700, 9000, 0xb3), (LEN - 513, 513, 0xb4)];
    let mut expected = before.clone();
    for (offset, len, byte) in writes {
        expected[offset..offset + len].fill(byte);
    }
    let want = expected.clone();
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (mirror_id, mirror) = open_mirror(co, &graph, &copies)?;
        let children = graph.children(mirror_id);
        let names: Vec<&str> = children.iter().map(|(label, _)| label.name()).collect();
        assert_eq!(names, ["child0", "child1"], "two children, each under its name");
        assert_eq!(children[1].0.role(), ChildRole::DATA);
        let direct_node = graph.child(mirror_id, "child1").unwrap();
        assert!(direct_node.alignment().request > 1, "O_DIRECT needs aligned requests");
        assert_eq!(mirror.alignment(), direct_node.alignment(), "the stricter copy rules");

        let driver =
            mirror.driver().downcast_ref::<Mirror>().expect("the node's driver is a Mirror");
        assert_eq!(driver.copies.len(), 2, "the driver is reached back from its node");
        assert!(mirror.driver().downcast_ref::<aiocoro_block::storage::FileDriver>().is_none());
        let blk = BlockBackend::new(mirror);
        for (offset, len, byte) in writes {
            blk.write(co, offset as u64, &vec![byte; len])?;
        }
        blk.flush(co)?;
        let mut back = vec![0u8; 10_000];
        blk.read(co, 3, &mut back)?;
        assert_eq!(back, want[3..10_003], "an unaligned read through the mirror");
        Ok::<_, io::Error>(())
    })
    .unwrap()
    .unwrap();
    assert!(buffered.contents() == expected, "the primary copy holds every write");
    assert!(direct.contents() == expected, "the O_DIRECT copy holds every write");
}

#[test]
fn reads_come_from_the_primary_copy() {
    let primary = TempFile::with_contents("mirror-primary", &vec![0x11; LEN]);
    let secondary = TempFile::with_contents("mirror-secondary", &vec![0x22; LEN]);
    let copies = [
        format!("driver=file,filename={}", primary.name()),
        format!("driver=file,filename={}", secondary.name()),
    ];
    run_in_coroutine(move |co| {
        let blk = BlockBackend::new(open_mirror(co, &BlockGraph::new(), &copies)?.1);
        let mut back = vec![0u8; 4096];
        blk.read(co, 8192, &mut back)?;
        assert!(back.iter().all(|&b| b == 0x11), "read from child0, not child1");
        Ok::<_, io::Error>(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn a_parent_has_one_primary_child_and_unique_names() {
    run_in_coroutine(|co| {
        let graph = BlockGraph::new();
        let disk = |co: &Co| aiocoro_block::open(co, &graph, "driver=null-co,size=1M").unwrap().0;
        let (a, b, c) = (disk(co), disk(co), disk(co));
        let refused = graph.add_node_with(|edges| {
            edges.attach(ChildLabel::new("child0", ChildRole::DATA | ChildRole::PRIMARY), a)?;
            edges.attach(ChildLabel::new("child1", ChildRole::DATA | ChildRole::PRIMARY), b)?;
            unreachable!("a second PRIMARY child is refused")
        });
        let error: GraphError = refused.unwrap_err();
        assert!(error.to_string().contains("one PRIMARY child at most"), "{error}");

        let (mirror_id, _) = graph
            .add_node_with(|edges| {
                let copies = vec![
                    edges.attach(
                        ChildLabel::new("child0", ChildRole::DATA | ChildRole::PRIMARY),
                        a,
                    )?,
                    edges.attach(ChildLabel::new("child1", ChildRole::DATA), b)?,
                ];
                BlockNode::new(co, "mirror", Mirror { copies }, false)
            })
            .unwrap();
        let taken = graph.attach(mirror_id, ChildLabel::new("child1", ChildRole::DATA), c);
        assert!(matches!(taken, Err(GraphError::Conflict { .. })), "the name child1 is taken");
        graph.attach(mirror_id, ChildLabel::new("child2", ChildRole::DATA), c).unwrap();
        assert_eq!(graph.children(mirror_id).len(), 3, "three children of one role");
        assert_eq!(graph.detach(mirror_id, "child2"), Ok(c));
    })
    .unwrap();
}

#[test]
fn a_diamond_takes_a_stricter_child_through_both_paths() {
    let buffered = TempFile::with_contents("diamond-buffered", &vec![0x66; LEN]);
    let direct = TempFile::with_contents("diamond-direct", &vec![0x77; LEN]);
    let raw_options = format!("driver=raw,file.filename={}", buffered.name());
    let direct_options = format!("driver=file,filename={},cache=none", direct.name());
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (raw, _) = aiocoro_block::open(co, &graph, &raw_options)?;
        // Two one-copy mirrors over the raw node, and a mirror over both: a diamond.
        let (left, _) = add_mirror(co, &graph, "left", &[raw])?;
        let (right, _) = add_mirror(co, &graph, "right", &[raw])?;
        let (_, top) = add_mirror(co, &graph, "top", &[left, right])?;
        assert_eq!(top.alignment().request, 1);
        let (direct_id, direct_node) = aiocoro_block::open(co, &graph, &direct_options)?;
        graph.replace_child(raw, "file", direct_id)?;
        assert_eq!(top.alignment(), direct_node.alignment(), "both paths up were refreshed");
        let blk = BlockBackend::new(top);
        blk.write(co, 5, &[0x88; 3])?;
        let mut back = [0u8; 10];
        blk.read(co, 0, &mut back)?;
        assert_eq!(back, [0x77, 0x77, 0x77, 0x77, 0x77, 0x88, 0x88, 0x88, 0x77, 0x77]);
        Ok::<_, io::Error>(())
    })
    .unwrap()
    .unwrap();
}
