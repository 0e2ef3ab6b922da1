//! Format drivers: how an image's guest bytes map onto its storage ([`storage`](crate::storage)),
//! through their `file` child. `raw` (the identity, with an optional offset and size) and
//! [`qcow2`] (clusters, backing chains, compression, snapshots, check and repair).

pub mod qcow2;
mod raw;

pub use raw::{RawDriver, RawOptions};
