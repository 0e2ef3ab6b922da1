//! # aiocoro-block
//!
//! The reference block layer on top of [`aiocoro`], built only on its public API (QEMU's
//! `block/` in the shape Rust allows):
//!
//! - [`BlockDriver`]: the trait of drivers, whose I/O methods are coroutine functions;
//! - drivers ([`drivers`]): `file` (io_uring or thread pool, page cache or `O_DIRECT`),
//!   `null-co`, `raw`;
//! - [`qcow2`]: the qcow2 format (open and read so far; `driver=qcow2`);
//! - [`BlockNode`]s joined in a [`BlockGraph`] (a generic [`graph::Graph`]) by child edges
//!   with a [`ChildRole`];
//! - [`BlockBackend`]: the user's `Send + Sync` handle, shared by several IoThreads at once,
//!   with checked requests, in-flight counting and [`BlockBackend::drain`];
//! - [`IoBuffer`]: aligned buffers from a per-thread pool;
//! - [`open`]: a node tree from options in QEMU's `--image-opts` spelling.
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

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod backend;
mod buffer;
mod drain;
mod driver;
pub mod drivers;
mod error;
pub mod graph;
mod node;
mod options;
mod padding;
pub mod qcow2;
mod run;
mod status_above;
mod sys;

pub use backend::{BlockBackend, Drained};
pub use buffer::{BUFFER_ALIGN, IoBuffer};
pub use driver::{Alignment, Allocation, BlockDriver, BlockStatus, write_zeroes_by_writing};
pub use error::{Op, RequestError, invalid_input, unsupported};
pub use node::{BlockGraph, BlockNode, Child, ChildRole, replace_child};
pub use options::{BlockOptions, open, open_options, parse_size};
pub use run::run_in_coroutine;
pub use status_above::ChainStatus;
