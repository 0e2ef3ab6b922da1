//! # aiocoro-block
//!
//! The reference block layer on top of [`aiocoro`], built only on its public API (QEMU's
//! `block/` in the shape Rust allows):
//!
//! - [`BlockDriver`]: the trait of drivers, whose I/O methods are coroutine functions;
//! - storage drivers ([`storage`], QEMU's protocols: where the bytes live): `file` (io_uring or
//!   thread pool, page cache or `O_DIRECT`, QEMU's image locks), `null-co`;
//! - format drivers ([`format`](mod@format): how guest bytes map onto storage): `raw`, and
//!   [`qcow2`] (`driver=qcow2`): create, read and write images that `qemu-img` agrees with:
//!   allocating writes, backing chains, compressed clusters (zlib, zstd) read and written,
//!   extended L2 entries, internal snapshots kept intact, discard and zero writes, growing,
//!   and `qemu-img check [-r]`'s checks and repairs;
//! - [`BlockNode`]s joined in a [`BlockGraph`] (over a generic [`graph::Graph`]) by child
//!   edges, each named and with QEMU's role bits ([`ChildLabel`], [`ChildRole`]); a parent
//!   may have any number of children (a mirror, a quorum), and requests reaching a node
//!   satisfy the alignment of every node below it;
//! - writing a driver of your own (a filter: children, the alignment rule, block status):
//!   the how-to `docs/filter-driver.md` in this crate's directory, and the `throttle`
//!   example it walks through;
//! - [`BlockBackend`]: the user's `Send + Sync` handle, shared by several IoThreads at once
//!   (multiqueue), with checked requests, in-flight counting and [`BlockBackend::drain`];
//! - [`IoBuffer`]: aligned buffers from a per-thread pool;
//! - [`open`]: a node tree from options in QEMU's `--image-opts` spelling;
//! - [`ImageArgs`]: those options from a command line's image, `-f`, `--cache` and `--aio`;
//! - [`run_in_coroutine`]: block code from a thread outside every coroutine.
//!
//! ## A backend
//!
//! ```
//! use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
//!
//! let path = std::env::temp_dir().join(format!("aiocoro-block-doc-{}", std::process::id()));
//! std::fs::write(&path, vec![0u8; 1 << 20])?;
//! let options = format!("driver=raw,file.filename={}", path.display());
//! let read_back = run_in_coroutine(move |co| {
//!     let graph = BlockGraph::new();
//!     let (_, node) = aiocoro_block::open(co, &graph, &options)?;
//!     let blk = BlockBackend::new(node);
//!     blk.write(co, 4096, b"hello")?;
//!     blk.flush(co)?;
//!     let mut buf = [0u8; 5];
//!     blk.read(co, 4096, &mut buf)?;
//!     Ok::<_, std::io::Error>(buf)
//! })??;
//! assert_eq!(&read_back, b"hello");
//! std::fs::remove_file(&path)?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ## A qcow2 image written from two IoThreads
//!
//! One [`BlockBackend`] serves coroutines on several [`IoThread`](aiocoro::aio::IoThread)s at
//! once; each request runs on the thread that submits it.
//!
//! ```
//! use aiocoro::aio::IoThread;
//! use aiocoro_block::qcow2::{CreateOptions, create_file};
//! use aiocoro_block::{BlockBackend, BlockGraph, run_in_coroutine};
//!
//! let name = format!("aiocoro-block-mq-{}.qcow2", std::process::id());
//! let path = std::env::temp_dir().join(name);
//! let options = format!("driver=qcow2,file.filename={}", path.display());
//! let blk = run_in_coroutine({
//!     let path = path.clone();
//!     move |co| {
//!         create_file(co, &path, &CreateOptions::new(1 << 20))?;
//!         let (_, node) = aiocoro_block::open(co, &BlockGraph::new(), &options)?;
//!         Ok::<_, std::io::Error>(BlockBackend::new(node))
//!     }
//! })??;
//! let threads = [IoThread::spawn("io-0")?, IoThread::spawn("io-1")?];
//! let writes: Vec<_> = threads
//!     .iter()
//!     .enumerate()
//!     .map(|(i, thread)| {
//!         let blk = blk.clone();
//!         let body = move |co: &aiocoro::coroutine::Co| {
//!             blk.write(co, i as u64 * 65536, &[i as u8 + 1; 512])
//!         };
//!         thread.handle().spawn(body).expect("the IoThread runs")
//!     })
//!     .collect();
//! for write in writes {
//!     write.join().expect("no panic")?;
//! }
//! let (first, second) = run_in_coroutine(move |co| {
//!     blk.flush(co)?;
//!     let (mut first, mut second) = ([0u8; 512], [0u8; 512]);
//!     blk.read(co, 0, &mut first)?;
//!     blk.read(co, 65536, &mut second)?;
//!     Ok::<_, std::io::Error>((first, second))
//! })??;
//! assert_eq!((first, second), ([1; 512], [2; 512]));
//! for thread in threads {
//!     thread.stop();
//! }
//! std::fs::remove_file(&path)?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ## Platform
//!
//! Linux only, as [`aiocoro`] is (its docs list the kernel features used and their fallbacks).
//! This crate adds `O_DIRECT` for `cache=none` and open-file-description (OFD) locks for QEMU's
//! image locking (`locking=auto`, the default, opens without locks where the file system
//! refuses them; `locking=on` fails instead).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "aiocoro-block runs on Linux only: it is built on aiocoro, O_DIRECT and OFD locks (see the \
     crate docs, \"Platform\")"
);

mod backend;
mod block_graph;
mod buffer;
mod child;
mod driver;
mod error;
pub mod format;
pub mod graph;
mod image;
mod node;
mod options;
mod padding;
mod run;
mod size;
mod status_above;
pub mod storage;
mod sys;

/// The runtime this crate is built on, re-exported so that a dependent names the same
/// version (`aiocoro_block::aiocoro::aio::IoThread`) without a dependency of its own.
pub use aiocoro;
pub use backend::{BlockBackend, Drained};
pub use block_graph::{BlockGraph, NewChildren};
pub use buffer::{BUFFER_ALIGN, IoBuffer};
pub use child::{ChildLabel, ChildRole};
pub use driver::{Alignment, Allocation, BlockDriver, BlockStatus, write_zeroes_by_writing};
pub use error::{Op, RequestError, invalid_input, unsupported};
/// The qcow2 format driver, at the root too: the format most users name.
pub use format::qcow2;
pub use image::{ImageArgs, probe_format};
pub use node::{BlockNode, Child};
pub use options::{BlockOptions, open, open_options};
pub use run::run_in_coroutine;
pub use size::{SizeError, SizeErrorKind, parse_size};
pub use status_above::ChainStatus;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
