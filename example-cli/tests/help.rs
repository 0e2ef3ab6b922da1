//! Every example program answers `--help` (and `-h`) as `qemu-img` does: its usage on stdout,
//! nothing on stderr, exit status 0, and nothing else done; and refuses an unknown option with
//! the reason on stderr and exit status 1.

mod support;

use std::path::Path;
use std::process::{Command, Output};

/// The packages whose `examples/` directories hold example programs, and those directories.
const PACKAGES: [(&str, &str); 2] =
    [("aiocoro", "../examples"), ("aiocoro-block", "../block/examples")];

/// Every example's name (one per `examples/*.rs` file of the packages above), with its
/// package.
pub fn all() -> Vec<(&'static str, String)> {
    let mut examples = Vec::new();
    for (package, dir) in PACKAGES {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&dir).expect("the examples directory lists") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|extension| extension == "rs") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                examples.push((package, name));
            }
        }
    }
    examples.sort();
    examples
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().expect("the example starts")
}

#[test]
fn every_example_prints_its_usage_and_exits_0_on_help() {
    let examples = all();
    assert!(examples.len() >= 6, "the examples were not found: {examples:?}");
    for (package, name) in examples {
        let program = support::build(package, &name);
        for help in ["--help", "-h"] {
            let output = run(&program, &[help]);
            let stdout = String::from_utf8_lossy(&output.stdout);
            let context = format!("{name} {help}: {output:?}");
            assert_eq!(output.status.code(), Some(0), "{context}");
            assert!(stdout.starts_with(&format!("usage: {name}")), "{context}");
            assert!(stdout.contains("-h, --help"), "{context}");
            assert!(output.stderr.is_empty(), "{context}");
        }
    }
}

#[test]
fn every_example_refuses_an_unknown_option_on_stderr_with_status_1() {
    for (package, name) in all() {
        let program = support::build(package, &name);
        let output = run(&program, &["--no-such-option"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let context = format!("{name}: {output:?}");
        assert_eq!(output.status.code(), Some(1), "{context}");
        assert!(output.stdout.is_empty(), "{context}");
        assert!(stderr.starts_with(&format!("{name}: ")), "{context}");
        assert!(stderr.contains(&format!("Try '{name} --help'")), "{context}");
    }
}
