//! New tables reach the disk before anything names them (step 3 of the write-back order).
//!
//! A [`Flushed`] table is one whose clusters were allocated and whose refcounts and bytes
//! were written, the file flushed after both. Only [`Metadata::write_flushed`] makes one
//! (its field is private to this file), and the L1 table and the header name a new table
//! only by taking one (see `l1`).

use std::fmt;
use std::io;

use aiocoro::coroutine::Co;

use super::Metadata;
use crate::node::BlockNode;
use crate::qcow2::io::write_at;
use crate::qcow2::offsets::{ClusterCount, HostOffset};

/// A new table on disk with its refcounts: it may be named now.
pub(super) struct Flushed {
    offset: HostOffset,
}

impl Flushed {
    /// Where the table is.
    pub(super) fn offset(&self) -> HostOffset {
        self.offset
    }
}

impl Metadata {
    /// Allocates clusters for the new table `bytes` (whole clusters) for `purpose` (named in
    /// errors), makes their refcounts stable (step 1), writes the table and flushes.
    ///
    /// # Errors
    ///
    /// As [`Metadata::allocate`]; the write or flush error, after which the clusters are
    /// given back (they leak at worst).
    ///
    /// # Panics
    ///
    /// If `bytes` is not whole clusters.
    pub(super) fn write_flushed(
        &mut self,
        co: &Co,
        file: &BlockNode,
        bytes: &[u8],
        purpose: &dyn fmt::Display,
    ) -> io::Result<Flushed> {
        let len = bytes.len() as u64;
        let cluster_size = self.geometry.cluster_size();
        assert!(
            len.is_multiple_of(cluster_size),
            "qcow2: a new table fills whole clusters ({len} bytes is not a multiple of \
             {cluster_size})"
        );
        let offset = self.allocate(co, file, ClusterCount(len / cluster_size), purpose)?;
        let written = self.flush_refcounts(co, file).and_then(|_| {
            write_at(co, file, offset.0, bytes)?;
            file.flush(co)
        });
        if let Err(error) = written {
            self.free_unnamed(co, file, offset, len);
            return Err(error);
        }
        Ok(Flushed { offset })
    }
}
