//! Fault injection for the block tests (QEMU's `blkdebug`, reduced): a filter node over a
//! child that passes every request through, except the flushes and writes it is told to
//! fail; it logs the writes and flushes that reached the child, in order.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aiocoro::coroutine::Co;
use aiocoro_block::graph::NodeId;
use aiocoro_block::qcow2::{CacheSizes, Header, Qcow2Driver};
use aiocoro_block::{BlockDriver, BlockGraph, BlockNode, Child, ChildLabel};

/// What a [`FaultFilter`] fails, shared with the test that made it.
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
    /// Writes seen so far (failed ones included).
    writes_seen: AtomicU64,
    /// Reads seen so far (failed ones included).
    reads_seen: AtomicU64,
    /// The number (as `reads_seen` counts, from 1) of a read that fails with `EIO`
    /// (`u64::MAX`: none).
    failing_read_number: AtomicU64,
    /// Flushes seen so far (failed ones included).
    flushes_seen: AtomicU64,
    /// The number (as `writes_seen` counts, from 1) of a write that fails with the errno,
    /// writing nothing.
    failing_write_number: Mutex<Option<(u64, i32)>>,
    /// The number (as `writes_seen` counts, from 1) of a write that is torn: its first half
    /// (whole 512-byte sectors) lands, then it fails with `EIO` (`u64::MAX`: none).
    torn_write_number: AtomicU64,
    /// The number (as `flushes_seen` counts, from 1) of a flush that fails with `EIO`.
    failing_flush_number: AtomicU64,
    /// From this write number on every write, flush and truncate fails with `EIO`: the
    /// device is gone (`u64::MAX`: never).
    dead_from_write: AtomicU64,
    /// Writes that reach past this many bytes fail with `ENOSPC`, writing nothing, and so
    /// does a truncate past it: the disk is full (`u64::MAX`: never).
    full_at: AtomicU64,
    /// Whether flushes that pass stop at the filter: the tests that set it never crash the
    /// machine, so the order of writes and flushes the filter sees is all they need (and
    /// they need many flushes).
    flushes_stop_here: AtomicBool,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            trigger: Mutex::default(),
            flushes_to_fail: AtomicU64::default(),
            failed_flushes: AtomicU64::default(),
            failing_write: Mutex::default(),
            log: Mutex::default(),
            writes_seen: AtomicU64::default(),
            reads_seen: AtomicU64::default(),
            failing_read_number: AtomicU64::new(u64::MAX),
            flushes_seen: AtomicU64::default(),
            failing_write_number: Mutex::default(),
            torn_write_number: AtomicU64::new(u64::MAX),
            failing_flush_number: AtomicU64::new(u64::MAX),
            dead_from_write: AtomicU64::new(u64::MAX),
            full_at: AtomicU64::new(u64::MAX),
            flushes_stop_here: AtomicBool::new(false),
        }
    }
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

    /// How many writes and flushes reached the filter so far (failed ones included).
    pub(crate) fn seen(&self) -> (u64, u64) {
        (self.writes_seen.load(Ordering::SeqCst), self.flushes_seen.load(Ordering::SeqCst))
    }

    /// Fails write number `n` (as [`Faults::seen`] counts them, from 1) with `errno`; it
    /// writes nothing.
    pub(crate) fn fail_write_number(&self, n: u64, errno: i32) {
        *self.failing_write_number.lock().unwrap() = Some((n, errno));
    }

    /// How many reads reached the filter so far (failed ones included).
    pub(crate) fn reads_seen(&self) -> u64 {
        self.reads_seen.load(Ordering::SeqCst)
    }

    /// Fails read number `n` (as [`Faults::reads_seen`] counts them, from 1) with `EIO`.
    pub(crate) fn fail_read_number(&self, n: u64) {
        self.failing_read_number.store(n, Ordering::SeqCst);
    }

    /// Tears write number `n` (as [`Faults::seen`] counts them, from 1): the whole sectors of
    /// its first half land, then it fails with `EIO`.
    pub(crate) fn tear_write_number(&self, n: u64) {
        self.torn_write_number.store(n, Ordering::SeqCst);
    }

    /// Fails flush number `n` (as [`Faults::seen`] counts them, from 1) with `EIO`.
    pub(crate) fn fail_flush_number(&self, n: u64) {
        self.failing_flush_number.store(n, Ordering::SeqCst);
    }

    /// From write number `n` on (as [`Faults::seen`] counts them, from 1), every write,
    /// flush and truncate fails with `EIO` and does nothing: the device is gone.
    pub(crate) fn die_at_write_number(&self, n: u64) {
        self.dead_from_write.store(n, Ordering::SeqCst);
    }

    /// Writes reaching past `len` bytes, and truncates past it, fail with `ENOSPC` and do
    /// nothing from now on (`u64::MAX`: the disk has room again).
    pub(crate) fn fill_disk_at(&self, len: u64) {
        self.full_at.store(len, Ordering::SeqCst);
    }

    /// Passes no flush on to the child from now on (a flush that does not fail succeeds at
    /// the filter).
    pub(crate) fn stop_flushes_here(&self) {
        self.flushes_stop_here.store(true, Ordering::SeqCst);
    }

    /// Takes back the numbered write and flush failures not reached yet, the full disk and
    /// the dead device: from now on requests pass.
    pub(crate) fn heal(&self) {
        *self.failing_write_number.lock().unwrap() = None;
        self.torn_write_number.store(u64::MAX, Ordering::SeqCst);
        self.failing_read_number.store(u64::MAX, Ordering::SeqCst);
        self.failing_flush_number.store(u64::MAX, Ordering::SeqCst);
        self.dead_from_write.store(u64::MAX, Ordering::SeqCst);
        self.full_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// Whether the device is gone (see [`Faults::die_at_write_number`]).
    fn is_dead(&self) -> bool {
        self.writes_seen.load(Ordering::SeqCst) >= self.dead_from_write.load(Ordering::SeqCst)
    }

    /// What becomes of the write of `len` bytes at `offset` (counting it).
    fn write_fate(&self, offset: u64, len: u64) -> WriteFate {
        let number = self.writes_seen.fetch_add(1, Ordering::SeqCst) + 1;
        if self.is_dead() {
            return WriteFate::Fail(libc::EIO);
        }
        let mut numbered = self.failing_write_number.lock().unwrap();
        if let Some((_, errno)) = numbered.take_if(|(at, _)| *at == number) {
            return WriteFate::Fail(errno);
        }
        let torn = self.torn_write_number.compare_exchange(
            number,
            u64::MAX,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if torn.is_ok() {
            return WriteFate::Torn;
        }
        if offset + len > self.full_at.load(Ordering::SeqCst) {
            return WriteFate::Fail(libc::ENOSPC);
        }
        if self.fails_write(offset, len) { WriteFate::Fail(libc::EIO) } else { WriteFate::Pass }
    }

    /// Whether this flush fails (counting it).
    fn flush_fails(&self) -> bool {
        let number = self.flushes_seen.fetch_add(1, Ordering::SeqCst) + 1;
        let numbered = self
            .failing_flush_number
            .compare_exchange(number, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        self.is_dead() || numbered || self.fails_flush()
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

/// What a [`FaultFilter`] does with a write.
enum WriteFate {
    /// Passes it to the child.
    Pass,
    /// Fails it with this errno; nothing lands.
    Fail(i32),
    /// Passes the whole sectors of its first half, then fails it with `EIO`.
    Torn,
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
        let number = self.faults.reads_seen.fetch_add(1, Ordering::SeqCst) + 1;
        let failing = &self.faults.failing_read_number;
        if failing.compare_exchange(number, u64::MAX, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.child.node().read(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len() as u64).sum();
        match self.faults.write_fate(offset, len) {
            WriteFate::Pass => {}
            WriteFate::Fail(errno) => return Err(io::Error::from_raw_os_error(errno)),
            WriteFate::Torn => {
                let half = (len / 2) as usize / 512 * 512;
                let first: Vec<u8> =
                    bufs.iter().flat_map(|buf| buf.iter().copied()).take(half).collect();
                if half > 0 {
                    self.child.node().write(co, offset, &[IoSlice::new(&first)])?;
                    self.faults.record(FileEvent::Write { offset, len: half as u64 });
                }
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.child.node().write(co, offset, bufs)?;
        self.faults.record(FileEvent::Write { offset, len });
        self.faults.saw_write(offset, len);
        Ok(())
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        if self.faults.flush_fails() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if !self.faults.flushes_stop_here.load(Ordering::SeqCst) {
            self.child.node().flush(co)?;
        }
        self.faults.record(FileEvent::Flush);
        Ok(())
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        if self.faults.is_dead() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if len > self.faults.full_at.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
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
    open_faulty_qcow2_with(co, graph, path, CacheSizes::default())
}

/// [`open_faulty_qcow2`] with metadata caches of `caches`.
pub(crate) fn open_faulty_qcow2_with(
    co: &Co,
    graph: &BlockGraph,
    path: &std::path::Path,
    caches: CacheSizes,
) -> (Arc<BlockNode>, Arc<Faults>) {
    let (filter_id, filter, faults) = open_faulty_file(co, graph, path);
    let header = Header::read(co, &filter).unwrap();
    let (_, node) = graph
        .add_node_with(|edges| {
            let file = edges.attach(ChildLabel::image_file(), filter_id)?;
            let driver = Qcow2Driver::open(co, file, None, header, caches)?;
            BlockNode::new(co, "image", driver, false)
        })
        .unwrap();
    (node, faults)
}
