//! Nodes of the block graph (QEMU's `BlockDriverState`) and the roles of their children
//! (`BdrvChildRole`).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use aiocoro::coroutine::Co;

use crate::driver::{Alignment, BlockDriver, BlockStatus};
use crate::error::{Op, RequestError};
use crate::graph::{Edge, Graph, GraphError, NodeId};

/// What a child is to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildRole {
    /// The protocol node a format stores its image in (QEMU's `file` child).
    File,
    /// The image that unallocated ranges read from (QEMU's `backing` child).
    Backing,
}

/// The graph of block nodes.
pub type BlockGraph = Graph<BlockNode, ChildRole>;

/// A parent's hold on a child node; requests go through [`Edge::node`], so replacing the
/// child in the graph redirects them.
pub type Child = Edge<BlockNode>;

/// A node of the block graph: a named driver instance. Its methods call the driver and put
/// the node's name and the request in front of any error ([`RequestError`]). They check
/// nothing else: bounds and alignment are the [`BlockBackend`](crate::BlockBackend)'s job.
pub struct BlockNode {
    name: String,
    driver: Box<dyn BlockDriver>,
    /// The driver's alignment, as it stated it last (at open, and when a child was replaced
    /// through [`replace_child`]): `Alignment::request` and `Alignment::memory`.
    request_alignment: AtomicU64,
    memory_alignment: AtomicUsize,
    /// The length in bytes, as the driver last reported it (at open, after a truncate).
    length: AtomicU64,
    read_only: bool,
}

impl BlockNode {
    /// A node named `name` over an opened driver; asks the driver for its length.
    ///
    /// # Errors
    ///
    /// If the driver cannot tell its length.
    pub fn new(
        co: &Co,
        name: impl Into<String>,
        driver: impl BlockDriver,
        read_only: bool,
    ) -> io::Result<BlockNode> {
        let name = name.into();
        let length = driver
            .length(co)
            .map_err(|error| RequestError::wrap(error, &name, driver.format_name(), Op::Open))?;
        let alignment = checked_alignment(&driver);
        Ok(BlockNode {
            name,
            driver: Box::new(driver),
            request_alignment: AtomicU64::new(alignment.request),
            memory_alignment: AtomicUsize::new(alignment.memory),
            length: AtomicU64::new(length),
            read_only,
        })
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name (`file`, `raw`, ...).
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// The alignment requests need.
    pub fn alignment(&self) -> Alignment {
        Alignment {
            request: self.request_alignment.load(Ordering::Relaxed),
            memory: self.memory_alignment.load(Ordering::Relaxed),
        }
    }

    /// Asks the driver for its alignment again (QEMU's `bdrv_refresh_limits`), after a child
    /// changed.
    fn refresh_alignment(&self) {
        let alignment = checked_alignment(&*self.driver);
        self.request_alignment.store(alignment.request, Ordering::Relaxed);
        self.memory_alignment.store(alignment.memory, Ordering::Relaxed);
    }

    /// The length in bytes.
    pub fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    fn context(&self, op: Op) -> impl FnOnce(io::Error) -> io::Error + '_ {
        move |error| RequestError::wrap(error, &self.name, self.driver.format_name(), op)
    }

    fn refuse_if_read_only(&self, op: Op) -> io::Result<()> {
        if self.read_only {
            let error = io::Error::new(io::ErrorKind::PermissionDenied, "the node is read-only");
            return Err(self.context(op)(error));
        }
        Ok(())
    }

    /// Reads into `bufs` from `offset`.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.driver.read(co, offset, bufs).map_err(|error| {
            let len = bufs.iter().map(|buf| buf.len() as u64).sum();
            self.context(Op::Read { offset, len })(error)
        })
    }

    /// Writes `bufs` at `offset`.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // The request's length is only needed to name it in an error.
        let op = || Op::Write { offset, len: bufs.iter().map(|buf| buf.len() as u64).sum() };
        if self.read_only {
            return self.refuse_if_read_only(op());
        }
        self.driver.write(co, offset, bufs).map_err(|error| self.context(op())(error))
    }

    /// Flushes completed writes to stable storage.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn flush(&self, co: &Co) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.driver.flush(co).map_err(self.context(Op::Flush))
    }

    /// Discards a range.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        let op = Op::Discard { offset, len };
        self.refuse_if_read_only(op)?;
        self.driver.discard(co, offset, len).map_err(self.context(op))
    }

    /// Makes a range read as zeroes.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let op = Op::WriteZeroes { offset, len };
        self.refuse_if_read_only(op)?;
        self.driver.write_zeroes(co, offset, len, may_unmap).map_err(self.context(op))
    }

    /// How the range at `offset` reads.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let op = Op::BlockStatus { offset, len };
        let status = self.driver.block_status(co, offset, len).map_err(self.context(op))?;
        assert!(
            (1..=len).contains(&status.len) || len == 0,
            "aiocoro-block: driver {} answered block status for {} bytes of {len} asked",
            self.format_name(),
            status.len
        );
        Ok(status)
    }

    /// Resizes the node, and records the length the driver reports afterwards.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        let op = Op::Truncate { len };
        self.refuse_if_read_only(op)?;
        self.driver.truncate(co, len).map_err(self.context(op))?;
        let length = self.driver.length(co).map_err(self.context(op))?;
        self.length.store(length, Ordering::Release);
        Ok(())
    }
}

/// The driver's alignment, which must be powers of two.
fn checked_alignment(driver: &(impl BlockDriver + ?Sized)) -> Alignment {
    let alignment = driver.alignment();
    assert!(
        alignment.request.is_power_of_two() && alignment.memory.is_power_of_two(),
        "aiocoro-block: driver {} states an alignment that is not a power of two: {alignment:?}",
        driver.format_name()
    );
    alignment
}

/// Points `parent`'s child in `role` at `new_child` (QEMU's `bdrv_replace_child`), then has
/// `parent` and every node above it ask their drivers for their alignment again: a new child
/// may need stricter alignment (an `O_DIRECT` file under a buffered one's parent). Requests
/// already past their backend's checks are not re-checked: replace children inside drained
/// sections of the backends above, as QEMU does.
///
/// # Errors
///
/// As [`Graph::replace_child`](crate::graph::Graph::replace_child); nothing changes then.
pub fn replace_child(
    graph: &BlockGraph,
    parent: NodeId,
    role: &ChildRole,
    new_child: NodeId,
) -> Result<NodeId, GraphError> {
    let old = graph.replace_child(parent, role, new_child)?;
    let mut pending = vec![parent];
    let mut seen = Vec::new();
    while let Some(id) = pending.pop() {
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        if let Some(node) = graph.node(id) {
            node.refresh_alignment();
        }
        pending.extend(graph.parents(id).into_iter().map(|(above, _)| above));
    }
    Ok(old)
}

impl fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.format_name())
            .field("length", &self.length())
            .finish()
    }
}
