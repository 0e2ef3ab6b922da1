//! Fault injection for the block tests (QEMU's `blkdebug`, reduced): a filter node over a
//! child that passes every request through, except the flushes and writes it is told to
//! fail; it logs the writes and flushes that reached the child, in order.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aiocoro::coroutine::Co;
use aiocoro_block::graph::NodeId;
use aiocoro_block::qcow2::{CacheSizes, Header, Qcow2Driver};
use aiocoro_block::{BlockDriver, BlockGraph, BlockNode, Child, ChildLabel};

/// What a [`FaultFilter`] fails, shared with the test that made it.
#[derive(Default)]
pub(crate) struct Faults {
    /// A byte whose next write arms one flush failure: the first flush after that write
    /// fails.
    trigger: Mutex<Option<u64>>,
    /// Flushes to fail, from the next one on.
    flushes_to_fail: AtomicU64,
    /// Flushes failed so far.
    failed_flushes: AtomicU64,
    /// A byte whose next write fails without writing anything.
    failing_write: Mutex<Option<u64>>,
    /// The writes and flushes passed to the child, in the order they completed.
    log: Mutex<Vec<FileEvent>>,
}

/// A request a [`FaultFilter`] passed to its child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileEvent {
    /// `len` bytes written at `offset`.
    Write { offset: u64, len: u64 },
    /// A flush.
    Flush,
}

impl Faults {
    /// Fails the first flush after the next write that touches byte `at` (as a transient
    /// `fdatasync` EIO does: the written bytes stay in the child).
    pub(crate) fn fail_flush_after_write_to(&self, at: u64) {
        *self.trigger.lock().unwrap() = Some(at);
    }

    /// Fails the next `count` flushes.
    pub(crate) fn fail_next_flushes(&self, count: u64) {
        self.flushes_to_fail.store(count, Ordering::SeqCst);
    }

    /// Fails the next write that touches byte `at`, which then writes nothing.
    pub(crate) fn fail_next_write_to(&self, at: u64) {
        *self.failing_write.lock().unwrap() = Some(at);
    }

    /// The writes and flushes passed to the child since the last call, in order.
    pub(crate) fn take_log(&self) -> Vec<FileEvent> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn record(&self, event: FileEvent) {
        self.log.lock().unwrap().push(event);
    }

    /// How many flushes failed on purpose.
    pub(crate) fn failed_flushes(&self) -> u64 {
        self.failed_flushes.load(Ordering::SeqCst)
    }

    /// Whether the write of `len` bytes at `offset` fails.
    fn fails_write(&self, offset: u64, len: u64) -> bool {
        let mut failing = self.failing_write.lock().unwrap();
        failing.take_if(|at| (offset..offset + len).contains(at)).is_some()
    }

    fn saw_write(&self, offset: u64, len: u64) {
        let mut trigger = self.trigger.lock().unwrap();
        if trigger.take_if(|at| (offset..offset + len).contains(at)).is_some() {
            self.flushes_to_fail.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether this flush fails (counting it if so).
    fn fails_flush(&self) -> bool {
        let taken = self
            .flushes_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if taken {
            self.failed_flushes.fetch_add(1, Ordering::SeqCst);
        }
        taken
    }
}

/// A filter over its `file` child that fails the flushes and writes its [`Faults`] say.
pub(crate) struct FaultFilter {
    child: Child,
    faults: Arc<Faults>,
}

impl BlockDriver for FaultFilter {
    fn format_name(&self) -> &'static str {
        "fault-filter"
    }

    fn length(&self, co: &Co) -> io::Result<u64> {
        self.child.node().driver().length(co)
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.child.node().read(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len() as u64).sum();
        if self.faults.fails_write(offset, len) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.child.node().write(co, offset, bufs)?;
        self.faults.record(FileEvent::Write { offset, len });
        self.faults.saw_write(offset, len);
        Ok(())
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        if self.faults.fails_flush() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.child.node().flush(co)?;
        self.faults.record(FileEvent::Flush);
        Ok(())
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        self.child.node().truncate(co, len)
    }
}

/// Opens the file at `path` with a [`FaultFilter`] (node `faults`) over it, in `graph`.
pub(crate) fn open_faulty_file(
    co: &Co,
    graph: &BlockGraph,
    path: &std::path::Path,
) -> (NodeId, Arc<BlockNode>, Arc<Faults>) {
    let options = format!("driver=file,filename={}", path.display());
    let (file_id, _) = aiocoro_block::open(co, graph, &options).unwrap();
    let faults = Arc::new(Faults::default());
    let filter_faults = faults.clone();
    let (id, node) = graph
        .add_node_with(|edges| {
            let child = edges.attach(ChildLabel::filtered_file(), file_id)?;
            BlockNode::new(co, "faults", FaultFilter { child, faults: filter_faults }, false)
        })
        .unwrap();
    (id, node, faults)
}

/// Opens the qcow2 image at `path` read-write (node `image`) over a [`FaultFilter`].
pub(crate) fn open_faulty_qcow2(
    co: &Co,
    graph: &BlockGraph,
    path: &std::path::Path,
) -> (Arc<BlockNode>, Arc<Faults>) {
    let (filter_id, filter, faults) = open_faulty_file(co, graph, path);
    let header = Header::read(co, &filter).unwrap();
    let (_, node) = graph
        .add_node_with(|edges| {
            let file = edges.attach(ChildLabel::image_file(), filter_id)?;
            let driver = Qcow2Driver::open(co, file, None, header, CacheSizes::default())?;
            BlockNode::new(co, "image", driver, false)
        })
        .unwrap();
    (node, faults)
}
