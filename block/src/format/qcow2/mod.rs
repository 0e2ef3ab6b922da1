//! The qcow2 format (QEMU's `block/qcow2*.c`): create, open, read and write.
//!
//! Images made by `qemu-img create -f qcow2` (compat 0.10 and 1.1, any cluster size from
//! 512 B to 2 MiB, any refcount width, `compression_type=zlib|zstd`, with or without
//! internal snapshots) open as they are. Reads go through the L1 table and an L2 cache under
//! one [`CoMutex`](aiocoro::sync::CoMutex) over metadata, as QEMU does; data I/O runs
//! outside the lock. Unallocated clusters read from the backing node (or as zeroes), zero
//! clusters as zeroes, compressed clusters (deflate or zstd) are decompressed.
//!
//! Opened read-write (when the node is not read-only), writes allocate clusters from the
//! refcounts (first free run), copy-on-write partial clusters from what the guest saw
//! before, overwrite allocated clusters in place, and write metadata back in an order that
//! leaves at worst leaked clusters after a crash (see `metadata`); `write_zeroes` sets the
//! zero flag of whole clusters (version 3), `discard` drops whole clusters, `truncate`
//! grows, `write_compressed` writes whole clusters compressed. Clusters and L2 tables that
//! internal snapshots share are copied before they change, so snapshots stay intact. Images
//! with extended L2 entries (`extended_l2=on`) are read, written, zeroed and discarded per
//! subcluster (a 32nd of a cluster): a write into a fresh cluster writes and marks allocated
//! only the subclusters it touches.
//! [`create()`] makes new images; [`check()`] checks and repairs them as `qemu-img check` does;
//! [`list_snapshots`] and [`snapshot_list`] list snapshots as `qemu-img snapshot -l` does.
//! Images that need features this driver lacks (encryption, external data files, unknown
//! compression types) are refused at open with an error that names the feature; malformed
//! images fail with `InvalidData` errors that say what is wrong and where, never with a
//! panic or an absurd allocation.
//!
//! One concept per file: [`offsets`] (guest and host offsets, guest and host cluster numbers and
//! cluster counts as distinct types), [`header`] (header, extensions, features), `mapping` (L1/L2
//! entries), `l2_cache`, `table` (tables of big-endian entries as stored), `compressed` (deflate
//! and zstd clusters), `compressed_write` (compressed writes), `io` (child I/O at its alignment),
//! [`backing`] (finding the backing file), `driver` ([`Qcow2Driver`], reads), `create`, `refcount`
//! (refcounts and the allocator), `metadata` (what the lock guards and the write-back order it
//! keeps: `metadata/l1`, the L1 table; `metadata/flushed`, new tables on disk before anything names
//! them), `overlap` (keeping guest data off metadata), `header_update` (table moves whose header
//! write fails), `allocation` (in-flight allocations and the writes merged into them), `write`
//! (allocating writes), `shared_l2` (copying L2 tables shared with snapshots), `discard` (discard
//! and zero clusters), `resize` (growing), [`check()`] (`qemu-img check [-r]`: `check_report`,
//! `references`, `stored_refcounts`, `rebuild`, `snapshot_table`, `bitmap_directory`), `dirty`
//! (repairing a dirty image opened for writing), `corruption` (the corrupt bit), `autoclear`
//! (clearing the autoclear feature bits before writing), `subclusters` (extended L2 entries),
//! `subcluster_write` and `subcluster_discard` (writes, zero writes and discards at subcluster
//! granularity).

mod allocation;
mod autoclear;
pub mod backing;
mod bitmap_directory;
mod check;
mod check_report;
mod compressed;
mod compressed_write;
mod corruption;
mod create;
mod dirty;
mod discard;
mod driver;
pub mod header;
mod header_update;
mod in_place;
mod io;
mod l2_cache;
mod mapping;
mod metadata;
pub mod offsets;
mod overlap;
mod rebuild;
mod refcount;
mod references;
mod resize;
mod shared_l2;
mod snapshot_table;
mod stored_refcounts;
mod subcluster_discard;
mod subcluster_write;
mod subclusters;
mod table;
mod write;

pub use backing::{BackingSpec, resolve_backing};
pub use check::{check, check_image_file};
pub use check_report::{CheckReport, Repair};
pub use create::{Compat, CreateOptions, create, create_file};
pub use driver::{CacheSizes, Qcow2Driver};
pub use header::{Compression, Header};
pub use mapping::ClusterMapping;
pub use offsets::{ClusterCount, Geometry, GuestCluster, GuestOffset, HostCluster, HostOffset};
pub use snapshot_table::{Snapshot, list_snapshots, snapshot_list};

/// An `InvalidData` error for a malformed image, prefixed with `qcow2: `.
pub(crate) fn corrupt(message: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("qcow2: {message}"))
}

/// An `Unsupported` error for what this driver does not implement, prefixed with `qcow2: `.
pub(crate) fn refuse(message: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, format!("qcow2: {message}"))
}
