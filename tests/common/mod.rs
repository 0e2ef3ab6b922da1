//! Helpers shared by the integration tests.

use std::process::{Command, Output};

/// The environment variable that tells a re-run test binary which test should misbehave.
pub(crate) const CHILD_ENV: &str = "AIOCORO_TEST_CHILD";

/// Whether this process is the child that `test` started to misbehave in.
pub(crate) fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(test)
}

/// Runs the test `test` of this test binary in a child process, with [`CHILD_ENV`] set so that
/// the test takes its misbehaving branch; returns what the child did.
pub(crate) fn run_child(test: &str) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("cannot run the test binary as a child")
}
