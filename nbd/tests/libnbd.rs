//! libnbd (python3-libnbd) drives every command and flag against the `aiocoro-nbd`
//! binary, with structured replies requested and not: `libnbd_all_commands.py` checks the
//! data, the advertised flags, hole and data chunks, `DF`, block status in both contexts,
//! `LIST_META_CONTEXT`, and the errors the server answers.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, qcow2_image, temp_dir};

/// The Python with the distribution's `nbd` module (a pyenv shim in `PATH` may lack it).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}

#[test]
fn libnbd_drives_every_command_with_structured_replies_on_and_off() {
    let dir = temp_dir("libnbd");
    let image = qcow2_image(&dir, "8M");
    let server = Server::start(&dir, &image, &["-f", "qcow2", "-t"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libnbd_all_commands.py");
    // "on" first: it expects the end of the fresh image to be unallocated.
    for structured in ["on", "off"] {
        let output = Command::new(python())
            .arg(&script)
            .arg(server.url(""))
            .arg(structured)
            .current_dir(&*dir)
            .output()
            .expect("run python3");
        assert!(
            output.status.success(),
            "libnbd_all_commands.py (structured replies {structured}) failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
