//! The workspace's example programs, built by cargo in this test's profile.

use std::path::PathBuf;
use std::process::Command;

/// Builds `example` of `package` (if need be) and returns its path.
pub(crate) fn build(package: &str, example: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap().to_path_buf();
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-q", "-p", package, "--example", example]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the example {example} of {package} failed");
    profile_dir.join("examples").join(example)
}
