//! Header writes that move a table or change the size (QEMU's `bdrv_pwrite_sync` of header
//! fields), and what happens when one fails.
//!
//! A table moves in three steps: the new table is written and flushed, the header field is
//! rewritten to name it, the file is flushed again. If that write or flush fails, the
//! header on disk may name the old table or the new one (a failed flush says nothing about
//! which writes reached the disk), and a later flush that succeeds can make either stable.
//! Memory therefore moves to the new table as soon as the header write was tried: the new
//! table holds every entry of the old one at that point (a new refcount table also the
//! blocks that count its own clusters), and later changes go to the new one only.
//! The header is marked unsure, and [`Metadata::flush_refcounts`], which every write-back
//! of L1 and L2 entries goes through first, rewrites the table fields (and the size) from
//! memory and flushes before anything that depends on them reaches the disk. The old table
//! keeps its clusters until then: it is retired, and freed once the header naming its
//! successor is stable. A crash before that leaves a leaked table, never a lost one.
//!
//! [`Metadata::flush_refcounts`]: super::metadata::Metadata::flush_refcounts

use std::io;

use aiocoro::coroutine::Co;

use super::header::field;
use super::io::write_at;
use super::offsets::HostOffset;
use crate::node::BlockNode;

/// The header fields that name the tables and the size, as memory has them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TableFields {
    /// The virtual disk size.
    pub(crate) size: u64,
    /// L1 entries, and where the L1 table is.
    pub(crate) l1: (u32, HostOffset),
    /// Where the refcount table is, and its clusters.
    pub(crate) refcount_table: (HostOffset, u32),
}

impl TableFields {
    /// Writes the fields into the header (not flushed). The encryption method between the
    /// size and the L1 fields is left alone.
    ///
    /// # Errors
    ///
    /// The write error.
    fn write(&self, co: &Co, file: &BlockNode) -> io::Result<()> {
        write_at(co, file, field::SIZE as u64, &self.size.to_be_bytes())?;
        let mut tables = [0u8; field::REFCOUNT_TABLE_CLUSTERS + 4 - field::L1_SIZE];
        let at = |field: usize| field - field::L1_SIZE;
        tables[at(field::L1_SIZE)..][..4].copy_from_slice(&self.l1.0.to_be_bytes());
        tables[at(field::L1_TABLE_OFFSET)..][..8].copy_from_slice(&self.l1.1.0.to_be_bytes());
        tables[at(field::REFCOUNT_TABLE_OFFSET)..][..8]
            .copy_from_slice(&self.refcount_table.0.0.to_be_bytes());
        tables[at(field::REFCOUNT_TABLE_CLUSTERS)..]
            .copy_from_slice(&self.refcount_table.1.to_be_bytes());
        write_at(co, file, field::L1_SIZE as u64, &tables)
    }
}

/// Whether the header on disk may differ from memory, and the tables retired meanwhile.
#[derive(Debug, Default)]
pub(crate) struct HeaderUpdates {
    /// A header write or the flush after it failed since the header was last known stable.
    unsure: bool,
    /// `(offset, bytes)` of tables the header named before a move: freed once the header
    /// naming their successors is stable.
    retired: Vec<(HostOffset, u64)>,
}

impl HeaderUpdates {
    /// Writes `bytes` at header offset `at` and flushes; marks the header unsure if either
    /// fails.
    ///
    /// # Errors
    ///
    /// The write or flush error.
    pub(crate) fn write(
        &mut self,
        co: &Co,
        file: &BlockNode,
        at: usize,
        bytes: &[u8],
    ) -> io::Result<()> {
        let written = write_at(co, file, at as u64, bytes).and_then(|()| file.flush(co));
        self.unsure |= written.is_err();
        written
    }

    /// Retires `len` bytes of a table at `offset` that the header named before a move:
    /// returns them to be freed now if the header is stable, else keeps them until it is.
    pub(crate) fn retire(&mut self, offset: HostOffset, len: u64) -> Option<(HostOffset, u64)> {
        if self.unsure {
            self.retired.push((offset, len));
            return None;
        }
        Some((offset, len))
    }

    /// If the header is unsure: writes `fields` from memory and flushes, and returns the
    /// retired tables, now free to go (the header is then known stable). Returns nothing
    /// otherwise.
    ///
    /// # Errors
    ///
    /// The write or flush error (the header stays unsure).
    pub(crate) fn settle(
        &mut self,
        co: &Co,
        file: &BlockNode,
        fields: TableFields,
    ) -> io::Result<Vec<(HostOffset, u64)>> {
        if !self.unsure {
            return Ok(Vec::new());
        }
        fields.write(co, file)?;
        file.flush(co)?;
        self.unsure = false;
        Ok(std::mem::take(&mut self.retired))
    }

    /// Whether the header on disk may differ from memory.
    pub(crate) fn is_unsure(&self) -> bool {
        self.unsure
    }
}
