//! What the server offers: one export, a name and description over a `BlockBackend`.

use aiocoro_block::BlockBackend;

use crate::reply::ReplyMode;
use crate::wire;

/// The largest request (read, write payload) the server accepts, and advertises as the
/// maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The preferred block size the server advertises.
pub const PREFERRED_BLOCK: u32 = 4096;

/// One export: a node served under a name.
pub struct Export {
    /// The name clients ask for (`-x`); the empty name is the default export.
    pub name: String,
    /// A human-readable description (`-D`), sent on `INFO_DESCRIPTION`.
    pub description: String,
    /// The node, shared by every connection.
    pub backend: BlockBackend,
    /// Whether writes are refused (`-r`).
    pub read_only: bool,
    /// Whether `TRIM` and `WRITE_ZEROES` may free space (`--discard=unmap`); without it a
    /// `TRIM` succeeds doing nothing and zeroes are written allocated, as in QEMU.
    pub unmap: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.length()
    }

    /// The transmission flags for a connection whose replies are framed as `mode`,
    /// advertised truthfully: flush, FUA, trim, write zeroes (with `FAST_ZERO`: `ENOTSUP`
    /// unless the node zeroes the range without writing) and cache are always handled,
    /// `DF` once structured replies are negotiated, and multi-connection is safe because
    /// every connection goes through the one backend (a flush on any connection flushes the
    /// node).
    pub fn transmission_flags(&self, mode: ReplyMode) -> u16 {
        let mut flags = wire::TFLAG_HAS_FLAGS
            | wire::TFLAG_SEND_FLUSH
            | wire::TFLAG_SEND_FUA
            | wire::TFLAG_SEND_TRIM
            | wire::TFLAG_SEND_WRITE_ZEROES
            | wire::TFLAG_SEND_FAST_ZERO
            | wire::TFLAG_SEND_CACHE
            | wire::TFLAG_CAN_MULTI_CONN;
        if mode >= ReplyMode::Structured {
            flags |= wire::TFLAG_SEND_DF;
        }
        if self.read_only {
            flags |= wire::TFLAG_READ_ONLY;
        }
        flags
    }
}
