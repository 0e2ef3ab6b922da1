//! Helpers shared by the block layer's integration tests. Each test binary uses a part.
#![allow(dead_code)]

pub(crate) mod faults;

use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiocoro::coroutine::Co;
use aiocoro_block::{BlockDriver, BlockNode};

/// How long a test waits for something that must happen before it calls it a hang. Only
/// turns a deadlock into a failure; no test asserts how long anything takes.
pub(crate) const HANG: Duration = Duration::from_secs(120);

/// A file in the temporary directory with a name unique to this process and call, removed
/// when dropped.
pub(crate) struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// A new file holding `contents`.
    pub(crate) fn with_contents(what: &str, contents: &[u8]) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "aiocoro-block-test-{}-{what}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).expect("cannot write a temporary file");
        TempFile { path }
    }

    /// A new file of `len` bytes, all holes (a sparse file).
    pub(crate) fn sparse(what: &str, len: u64) -> TempFile {
        let file = TempFile::with_contents(what, &[]);
        std::fs::OpenOptions::new().write(true).open(&file.path).unwrap().set_len(len).unwrap();
        file
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path as options spell it.
    pub(crate) fn name(&self) -> String {
        self.path.display().to_string()
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A byte pattern that differs at every offset of a file (so a misplaced byte shows).
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(31).wrapping_add(i as u64 >> 9) as u8 ^ seed).collect()
}

/// Polls `condition` (sleeping between tries) until it holds; panics naming `what` after
/// [`HANG`].
pub(crate) fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < HANG, "waited {HANG:?} for {what}: a hang");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What a [`TestDriver`] saw, shared with the test that made it.
#[derive(Default)]
pub(crate) struct Counters {
    /// Requests that entered the driver (every kind).
    pub entered: AtomicU64,
    /// Requests that left it (however they ended).
    pub left: AtomicU64,
    /// Requests that failed on purpose.
    pub failed: AtomicU64,
}

impl Counters {
    pub(crate) fn entered(&self) -> u64 {
        self.entered.load(Ordering::SeqCst)
    }

    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::SeqCst)
    }

    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

/// Holds the next request that touches one byte of a [`TestDriver`] until the test opens
/// it, so that the test can run other requests while that one is in the middle of the
/// driver, whatever the timing.
#[derive(Default)]
pub(crate) struct Gate {
    /// The byte whose next request is held, once armed.
    at: Mutex<Option<u64>>,
    holding: AtomicBool,
    open: AtomicBool,
}

impl Gate {
    /// Holds the next request that touches byte `at`.
    pub(crate) fn arm(&self, at: u64) {
        *self.at.lock().unwrap() = Some(at);
    }

    /// Whether a request is being held.
    pub(crate) fn is_holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// Lets the held request go on.
    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Holds the request of `len` bytes at `offset` (sleeping) until the gate opens, if it
    /// is the one the gate was armed for.
    fn pass(&self, co: &Co, offset: u64, len: u64) {
        let caught = {
            let mut at = self.at.lock().unwrap();
            at.take_if(|at| (offset..offset + len).contains(at)).is_some()
        };
        if caught {
            self.holding.store(true, Ordering::SeqCst);
            while !self.open.load(Ordering::SeqCst) {
                co.sleep(Duration::from_millis(1));
            }
            self.holding.store(false, Ordering::SeqCst);
        }
    }
}

/// A memory-backed driver for tests: counts requests, can sleep in each (so that requests
/// overlap), fails with EIO every request whose range touches the byte at `fail_at`, and
/// holds one request at its `gate`. Writes past the end grow it, and it can be truncated,
/// as a file can.
pub(crate) struct TestDriver {
    data: Arc<Mutex<Vec<u8>>>,
    pub counters: Arc<Counters>,
    /// The byte whose requests fail.
    pub fail_at: Option<u64>,
    /// How long each read or write sleeps before it completes.
    pub delay: Duration,
    /// Holds a request once armed.
    pub gate: Arc<Gate>,
}

impl TestDriver {
    pub(crate) fn new(len: usize) -> TestDriver {
        TestDriver {
            data: Arc::new(Mutex::new(vec![0; len])),
            counters: Arc::default(),
            fail_at: None,
            delay: Duration::ZERO,
            gate: Arc::default(),
        }
    }

    /// A driver holding a copy of `bytes`.
    pub(crate) fn with_contents(bytes: &[u8]) -> TestDriver {
        let driver = TestDriver::new(0);
        driver.data.lock().unwrap().extend_from_slice(bytes);
        driver
    }

    /// The driver's bytes, shared: they stay readable after the driver went into a node.
    pub(crate) fn data(&self) -> Arc<Mutex<Vec<u8>>> {
        self.data.clone()
    }

    /// Opens the driver as a node named `name`.
    pub(crate) fn into_node(self, co: &Co, name: &str) -> BlockNode {
        BlockNode::new(co, name, self, false).unwrap()
    }

    /// Counts the request in, sleeps, runs `body` unless the range touches `fail_at`, and
    /// counts it out.
    fn request<R>(
        &self,
        co: &Co,
        offset: u64,
        len: u64,
        body: impl FnOnce(&mut Vec<u8>) -> R,
    ) -> io::Result<R> {
        self.counters.entered.fetch_add(1, Ordering::SeqCst);
        self.gate.pass(co, offset, len);
        if !self.delay.is_zero() {
            co.sleep(self.delay);
        } else {
            co.reschedule();
        }
        let result = if self.fail_at.is_some_and(|at| (offset..offset + len).contains(&at)) {
            self.counters.failed.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(body(&mut self.data.lock().unwrap()))
        };
        self.counters.left.fetch_add(1, Ordering::SeqCst);
        result
    }
}

impl BlockDriver for TestDriver {
    fn format_name(&self) -> &'static str {
        "test"
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        self.request(co, offset, len as u64, |data| {
            let mut at = offset as usize;
            for buf in bufs.iter_mut() {
                let len = buf.len();
                buf.copy_from_slice(&data[at..at + len]);
                at += len;
            }
        })
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        self.request(co, offset, len as u64, |data| {
            let mut at = offset as usize;
            if data.len() < at + len {
                data.resize(at + len, 0);
            }
            for buf in bufs {
                data[at..at + buf.len()].copy_from_slice(buf);
                at += buf.len();
            }
        })
    }

    fn flush(&self, co: &Co) -> io::Result<()> {
        self.request(co, 0, 0, |_| ())
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        self.request(co, len, 0, |data| data.resize(len as usize, 0))
    }
}
