#!/usr/bin/env bash
# Runs the loom models in loom-tests/ against aiocoro built with its loom shim.
# A separate target directory keeps the --cfg from invalidating the normal build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="${RUSTFLAGS:-} --cfg aiocoro_loom"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
exec cargo test -p loom-tests --release "$@"
