//! The qcow2 format (QEMU's `block/qcow2*.c`), first increment: open and read.
//!
//! Images made by `qemu-img create -f qcow2` (compat 0.10 and 1.1, any cluster size from
//! 512 B to 2 MiB, any refcount width) open as they are. Reads go through the L1 table and
//! an L2 cache under one [`CoMutex`](aiocoro::sync::CoMutex) over metadata, as QEMU
//! does; data I/O runs outside the lock. Unallocated clusters read from the backing node (or
//! as zeroes), zero clusters as zeroes, compressed clusters are inflated.
//!
//! Writes are not implemented yet: they fail with `Unsupported`. Images that need features
//! this driver lacks (encryption, external data files, extended L2 entries, zstd) are refused
//! at open with an error that names the feature; malformed images fail with `InvalidData`
//! errors that say what is wrong and where, never with a panic or an absurd allocation.
//!
//! One concept per file: [`offsets`] (guest/host offsets and cluster indices as distinct
//! types), [`header`] (header, extensions, features), `mapping` (L1/L2 entries), `l2_cache`,
//! `compressed` (inflate), `io` (reads of children at their alignment), [`backing`] (finding
//! the backing file), `driver` ([`Qcow2Driver`]).

pub mod backing;
mod compressed;
mod driver;
pub mod header;
mod io;
mod l2_cache;
mod mapping;
pub mod offsets;

pub use backing::{BackingSpec, resolve_backing};
pub use driver::{DEFAULT_L2_CACHE_BYTES, Qcow2Driver};
pub use header::Header;
pub use mapping::ClusterMapping;
pub use offsets::{ClusterIndex, Geometry, GuestOffset, HostOffset};

/// An `InvalidData` error for a malformed image, prefixed with `qcow2: `.
pub(crate) fn corrupt(message: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("qcow2: {message}"))
}

/// An `Unsupported` error for what this driver does not implement, prefixed with `qcow2: `.
pub(crate) fn refuse(message: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, format!("qcow2: {message}"))
}
