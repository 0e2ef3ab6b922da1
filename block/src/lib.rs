//! # aiocoro-block
//!
//! The reference block layer on top of [`aiocoro`], built only on its public API. So far it holds
//! the node graph ([`graph::Graph`]): nodes joined by child edges that carry a role, as QEMU's
//! `BlockDriverState`s are joined by `BdrvChild`ren. The driver trait, the file / null / raw
//! drivers, `BlockBackend` and qcow2 build on it next.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod graph;
