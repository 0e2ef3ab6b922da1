//! Nodes of the block graph (QEMU's `BlockDriverState`).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use aiocoro::coroutine::Co;

use crate::driver::{Alignment, BlockDriver, BlockStatus};
use crate::error::{Op, RequestError};
use crate::graph::Edge;

/// A parent's hold on a child node; requests go through [`Edge::node`], so replacing the
/// child in the graph redirects them.
pub type Child = Edge<BlockNode>;

/// A node of the block graph: a named driver instance. Its methods call the driver and put
/// the node's name and the request in front of any error ([`RequestError`]). They check
/// nothing else: bounds and alignment are the [`BlockBackend`](crate::BlockBackend)'s job.
///
/// A request runs to its end once started, as in QEMU (see
/// [`Co::run_uncancellable`](aiocoro::coroutine::Co::run_uncancellable)): an IoThread stopped while its
/// coroutines are inside requests lets those requests finish (its shutdown waits for them),
/// and cancels the coroutines at their next wait or request. A driver never sees a request
/// stop half-way (between a data write and the metadata that makes it visible, say, where
/// other threads' requests would wait for it).
///
/// Closing flushes, as QEMU's `bdrv_close` does: [`BlockNode::close`] reports the error;
/// dropping the last handle of a writable node written since its last flush flushes it too
/// (a qcow2 image writes back its cached metadata then), so a program that drops its
/// handles before it exits loses nothing. A failure on drop can only be said on stderr. A
/// drop inside a coroutine flushes on a helper thread while the dropping thread waits (see
/// `run_to_end`): a driver whose requests need the dropping thread's context (none of this
/// crate's) must be closed explicitly instead. `std::process::exit`, a leaked handle, or a
/// handle kept by a thread-local destroyed after the runtime's own are never dropped:
/// close those explicitly.
pub struct BlockNode {
    name: String,
    /// Taken out only by `drop`.
    driver: ManuallyDrop<Box<dyn BlockDriver>>,
    /// The driver's alignment, as it stated it last given its children's (when the node
    /// joined the graph, and whenever its children or theirs changed): `Alignment::request`
    /// and `Alignment::memory`.
    request_alignment: AtomicU64,
    memory_alignment: AtomicUsize,
    /// The length in bytes, as the driver last reported it (at open, after a truncate).
    length: AtomicU64,
    read_only: bool,
    /// Set when a request that changes the contents ends (a write, write-zeroes, discard or
    /// truncate), cleared when a flush starts (and set again if it fails); sequentially
    /// consistent, so that a flush that clears it covers every change that set it before.
    unflushed: AtomicBool,
    /// Set by [`BlockNode::close`]: requests are refused.
    closed: AtomicBool,
}

impl BlockNode {
    /// A node named `name` over an opened driver; asks the driver for its length. Its
    /// alignment is the driver's alone until a [`BlockGraph`](crate::BlockGraph) adds it,
    /// which combines it with its children's.
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
        let alignment = checked_alignment(&driver, Alignment::BYTE);
        Ok(BlockNode {
            name,
            driver: ManuallyDrop::new(Box::new(driver)),
            request_alignment: AtomicU64::new(alignment.request),
            memory_alignment: AtomicUsize::new(alignment.memory),
            length: AtomicU64::new(length),
            read_only,
            unflushed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
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

    /// The alignment requests reaching this node need: its driver's, given its children's
    /// (see [`BlockDriver::alignment`]).
    pub fn alignment(&self) -> Alignment {
        Alignment {
            request: self.request_alignment.load(Ordering::Relaxed),
            memory: self.memory_alignment.load(Ordering::Relaxed),
        }
    }

    /// Asks the driver for its alignment again given `below`, its children's (QEMU's
    /// `bdrv_refresh_limits`); returns whether it changed.
    pub(crate) fn refresh_alignment(&self, below: Alignment) -> bool {
        let alignment = checked_alignment(&**self.driver, below);
        let old = self.request_alignment.swap(alignment.request, Ordering::Relaxed);
        let old_memory = self.memory_alignment.swap(alignment.memory, Ordering::Relaxed);
        old != alignment.request || old_memory != alignment.memory
    }

    /// The length in bytes.
    pub fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The driver; [`downcast_ref`](trait.BlockDriver.html#method.downcast_ref) reaches
    /// its own type:
    ///
    /// ```
    /// use aiocoro_block::storage::NullDriver;
    /// use aiocoro_block::qcow2::Qcow2Driver;
    ///
    /// let node = aiocoro_block::run_in_coroutine(|co| {
    ///     let graph = aiocoro_block::BlockGraph::new();
    ///     aiocoro_block::open(co, &graph, "driver=null-co,size=1M").map(|(_, node)| node)
    /// })??;
    /// assert!(node.driver().downcast_ref::<NullDriver>().is_some());
    /// assert!(node.driver().downcast_ref::<Qcow2Driver>().is_none());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn driver(&self) -> &dyn BlockDriver {
        &**self.driver
    }

    fn context(&self, op: Op) -> impl FnOnce(io::Error) -> io::Error + '_ {
        move |error| RequestError::wrap(error, &self.name, self.driver.format_name(), op)
    }

    fn refuse_if_read_only(&self, op: Op) -> io::Result<()> {
        self.refuse_if_closed(op)?;
        if self.read_only {
            let error = io::Error::new(io::ErrorKind::PermissionDenied, "the node is read-only");
            return Err(self.context(op)(error));
        }
        Ok(())
    }

    fn refuse_if_closed(&self, op: Op) -> io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(self.context(op)(io::Error::other("the node is closed")));
        }
        Ok(())
    }

    /// Records that a request that changes the contents ended and returns its `result`.
    fn changed<R>(&self, result: R) -> R {
        if !self.unflushed.load(Ordering::SeqCst) {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        result
    }

    /// Flushes the driver, naming `op` in its error.
    fn flush_driver(&self, co: &Co, op: Op) -> io::Result<()> {
        let unflushed = self.unflushed.swap(false, Ordering::SeqCst);
        let flushed = co.run_uncancellable(|| self.driver.flush(co));
        if flushed.is_err() && unflushed {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        flushed.map_err(self.context(op))
    }

    /// Closes the node (QEMU's `bdrv_close`): flushes it, which writes back what its driver
    /// caches (a qcow2 image's metadata) and makes every completed write stable, then
    /// refuses every later request with an error that says the node is closed. Call it once
    /// no other request on the node runs (drain its backends first). Closing a closed node
    /// does nothing; the children stay open (the graph holds them; they flush when
    /// dropped).
    ///
    /// # Errors
    ///
    /// The flush error, with context (`close`). The node then stays open: flush or close it
    /// again, or drop it (which flushes once more and says on stderr if that fails too).
    pub fn close(&self, co: &Co) -> io::Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if self.read_only {
            return Ok(());
        }
        let flushed = self.flush_driver(co, Op::Close);
        if flushed.is_err() {
            self.closed.store(false, Ordering::SeqCst);
        }
        flushed
    }

    /// Reads into `bufs` from `offset`.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return self.refuse_if_closed(Op::Read { offset, len: byte_len(bufs) });
        }
        co.run_uncancellable(|| self.driver.read(co, offset, bufs))
            .map_err(|error| self.context(Op::Read { offset, len: byte_len(bufs) })(error))
    }

    /// Writes `bufs` at `offset`.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // The request's length is only needed to name it in an error.
        let op = || Op::Write { offset, len: byte_len(bufs) };
        if self.read_only || self.closed.load(Ordering::Relaxed) {
            return self.refuse_if_read_only(op());
        }
        let result = co.run_uncancellable(|| self.driver.write(co, offset, bufs));
        self.changed(result).map_err(|error| self.context(op())(error))
    }

    /// Writes `bufs` at `offset` compressed (see [`BlockDriver::write_compressed`]).
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn write_compressed(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let op = || Op::Write { offset, len: byte_len(bufs) };
        if self.read_only || self.closed.load(Ordering::Relaxed) {
            return self.refuse_if_read_only(op());
        }
        let result = co.run_uncancellable(|| self.driver.write_compressed(co, offset, bufs));
        self.changed(result).map_err(|error| self.context(op())(error))
    }

    /// Flushes completed writes to stable storage.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn flush(&self, co: &Co) -> io::Result<()> {
        self.refuse_if_closed(Op::Flush)?;
        if self.read_only {
            return Ok(());
        }
        self.flush_driver(co, Op::Flush)
    }

    /// Discards a range.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        let op = Op::Discard { offset, len };
        self.refuse_if_read_only(op)?;
        let result = co.run_uncancellable(|| self.driver.discard(co, offset, len));
        self.changed(result).map_err(self.context(op))
    }

    /// Makes a range read as zeroes.
    ///
    /// # Errors
    ///
    /// The driver's error, with context; `PermissionDenied` on a read-only node.
    pub fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let op = Op::WriteZeroes { offset, len };
        self.refuse_if_read_only(op)?;
        let result = co.run_uncancellable(|| self.driver.write_zeroes(co, offset, len, may_unmap));
        self.changed(result).map_err(self.context(op))
    }

    /// How the range at `offset` reads.
    ///
    /// # Errors
    ///
    /// The driver's error, with context.
    pub fn block_status(&self, co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let op = Op::BlockStatus { offset, len };
        self.refuse_if_closed(op)?;
        let status = co
            .run_uncancellable(|| self.driver.block_status(co, offset, len))
            .map_err(self.context(op))?;
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
        let result = co.run_uncancellable(|| self.driver.truncate(co, len));
        self.changed(result).map_err(self.context(op))?;
        let length = co.run_uncancellable(|| self.driver.length(co)).map_err(self.context(op))?;
        self.length.store(length, Ordering::Release);
        Ok(())
    }
}

/// Flushes a writable node written since its last flush (see [`BlockNode`]); says on
/// stderr if that fails.
impl Drop for BlockNode {
    fn drop(&mut self) {
        let format = self.driver.format_name();
        // SAFETY: the driver is taken once, here, and not used afterwards (`self.driver` is
        // not touched again in this function, and `self` is not used after `drop`).
        let driver = unsafe { ManuallyDrop::take(&mut self.driver) };
        if self.read_only || !*self.unflushed.get_mut() {
            return;
        }
        let flushed = crate::run::run_to_end(move |co| {
            let flushed = driver.flush(co);
            // Dropped once its flush is done (a qcow2 driver's own drop then finds nothing
            // left to write back).
            drop(driver);
            flushed
        });
        if let Err(error) = flushed.and_then(|flushed| flushed) {
            eprintln!(
                "aiocoro-block: node '{}' ({}) was dropped with writes not flushed, and the \
                 flush on drop failed: {error}; the writes since its last flush may be lost \
                 (BlockNode::close / BlockBackend::close report this error to the caller)",
                self.name, format
            );
        }
    }
}

/// The bytes of `bufs` together.
fn byte_len<B: std::ops::Deref<Target = [u8]>>(bufs: &[B]) -> u64 {
    bufs.iter().map(|buf| buf.len() as u64).sum()
}

/// The driver's alignment given its children's, which must be powers of two.
fn checked_alignment(driver: &(impl BlockDriver + ?Sized), below: Alignment) -> Alignment {
    let alignment = driver.alignment(below);
    assert!(
        alignment.request.is_power_of_two() && alignment.memory.is_power_of_two(),
        "aiocoro-block: driver {} states an alignment that is not a power of two: {alignment:?}",
        driver.format_name()
    );
    alignment
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
