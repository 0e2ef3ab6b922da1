//! Building the `LD_PRELOAD` fault-injection shim (`fail_sync.c`, beside this file) with the C
//! compiler, for the tests that preload it: the block layer's flush failure test and the NBD
//! server's (which includes this file by path).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the shim whose source is `source` into the temporary directory (`$CC`, else
/// `cc`); returns the library's path.
pub(crate) fn build_shim(source: &Path) -> PathBuf {
    let output = std::env::temp_dir().join(format!("aiocoro-fail-sync-{}.so", std::process::id()));
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
        .arg(&output)
        .arg(source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|error| panic!("cannot run the C compiler '{compiler}': {error}"));
    assert!(status.success(), "'{compiler}' could not build {}", source.display());
    output
}
