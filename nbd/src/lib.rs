//! # aiocoro-nbd
//!
//! The server side of the NBD protocol on [`aiocoro`] and [`aiocoro_block`], for the
//! `aiocoro-nbd` binary and for programs that export a node themselves:
//!
//! - [`handshake`]: newstyle, fixed newstyle offered (a client without it may only send
//!   `EXPORT_NAME`), with `NO_ZEROES`;
//! - [`options`]: `EXPORT_NAME`, `GO`, `INFO` (export, name, description, block size),
//!   `LIST`, `ABORT`, `STRUCTURED_REPLY`, `EXTENDED_HEADERS`, `LIST_META_CONTEXT` /
//!   `SET_META_CONTEXT` ([`meta_context`]); anything else is answered `NBD_REP_ERR_UNSUP`;
//! - [`transmission`]: `READ` (`DF`), `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (`NO_HOLE`), `CACHE`, `BLOCK_STATUS` (`REQ_ONE`, [`block_status`]), `DISC`, each with
//!   `FUA` (honoured by the commands that write, accepted by the others); the
//!   requests of a connection run concurrently, one coroutine each, up to
//!   [`transmission::MAX_IN_FLIGHT`];
//! - [`request`] and [`reply`]: compact or extended request headers; simple replies, or
//!   structured ones ([`structured_read`]: holes and data) once negotiated;
//! - [`errors`]: block-layer errors as NBD error values;
//! - [`serve_connection`]: one connection from greeting to close, in a coroutine, with a
//!   time limit on the handshake;
//! - [`stats()`]: the connections, requests and request buffers alive, for leak checks.
//!
//! A client that breaks the protocol loses its connection, never the server.
//!
//! Linux only, as [`aiocoro`] and [`aiocoro_block`] are (their docs list the kernel features
//! used and their fallbacks).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!("aiocoro-nbd runs on Linux only, as aiocoro and aiocoro-block do");

pub mod block_status;
mod connection;
pub mod errors;
mod export;
pub mod handshake;
mod handshake_deadline;
mod in_flight;
pub mod meta_context;
pub mod options;
mod outbox;
pub mod reply;
pub mod request;
mod socket;
mod stats;
pub mod structured_read;
pub mod transmission;
pub mod wire;

pub use connection::serve_connection;
pub use export::{Export, MAX_REQUEST, PREFERRED_BLOCK};
pub use socket::CoSocket;
pub use stats::{Stats, stats};
