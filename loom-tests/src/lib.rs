//! loom models of aiocoro's cross-thread protocols.
//!
//! The models live in `tests/` and compile only with `RUSTFLAGS="--cfg aiocoro_loom"`, which
//! also switches aiocoro's atomics and locks to loom's (see `src/loom.rs` in aiocoro), so the
//! code checked is the code that ships. Run them with `scripts/loom.sh` from the repository root.
