//! # aiocoro-nbd
//!
//! The server side of the NBD protocol on [`aiocoro`] and [`aiocoro_block`], for the
//! `aiocoro-nbd` binary and for programs that export a node themselves:
//!
//! - [`handshake`]: fixed newstyle, with `NO_ZEROES`;
//! - [`options`]: `EXPORT_NAME`, `GO`, `INFO` (export, name, description, block size),
//!   `LIST`, `ABORT`; anything else is answered `NBD_REP_ERR_UNSUP`;
//! - [`transmission`]: `READ`, `WRITE` (`FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (`NO_HOLE`), `DISC`, with simple replies; the requests of a connection run
//!   concurrently, one coroutine each, up to [`transmission::MAX_IN_FLIGHT`];
//! - [`errors`]: block-layer errors as NBD error values;
//! - [`serve_connection`]: one connection from greeting to close, in a coroutine;
//! - [`stats`]: the connections, requests and request buffers alive, for leak checks.
//!
//! A client that breaks the protocol loses its connection, never the server.
//!
//! Linux only, as [`aiocoro`] and [`aiocoro_block`] are (their docs list the kernel features
//! used and their fallbacks).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!("aiocoro-nbd runs on Linux only, as aiocoro and aiocoro-block do");

mod connection;
pub mod errors;
mod export;
pub mod handshake;
mod in_flight;
pub mod options;
mod outbox;
mod socket;
mod stats;
pub mod transmission;
pub mod wire;

pub use connection::serve_connection;
pub use export::{Export, MAX_REQUEST, PREFERRED_BLOCK};
pub use socket::CoSocket;
pub use stats::{Stats, stats};
