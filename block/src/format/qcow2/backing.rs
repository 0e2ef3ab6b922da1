//! Finding an image's backing file: its path (relative names are relative to the image's
//! directory, as QEMU resolves them) and its format (the header extension's, else probed by
//! magic).

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::header::{Header, MAGIC};
use super::refuse;

/// The backing file an image names, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingSpec {
    /// The path to open.
    pub path: PathBuf,
    /// The driver to open it with: `qcow2` or `raw`.
    pub format: &'static str,
}

/// Where `header`'s backing file is and which driver opens it; `None` if the image has no
/// backing file. `image` is the image's own file name, needed for a relative backing name.
///
/// # Errors
///
/// `Unsupported` for a backing format other than qcow2 and raw or a protocol name
/// (`json:`, `nbd:`, ...); `InvalidInput` for a relative name without the image's file name;
/// the I/O error of probing a backing file without a stated format, naming the path.
pub fn resolve_backing(header: &Header, image: Option<&Path>) -> io::Result<Option<BackingSpec>> {
    let Some(name) = header.backing_file.as_deref() else {
        return Ok(None);
    };
    let name = name.strip_prefix("file:").unwrap_or(name);
    if let Some((protocol, _)) = name.split_once(':')
        && !protocol.contains('/')
        && ["json", "nbd", "http", "https", "ssh", "iscsi", "rbd", "gluster", "nfs"]
            .contains(&protocol)
    {
        return Err(refuse(format!(
            "the backing file '{name}' names the '{protocol}' protocol; only local files are \
             supported"
        )));
    }
    let path = Path::new(name);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let Some(image) = image else {
            return Err(crate::error::invalid_input(format!(
                "qcow2: the backing file '{name}' is relative, and the image's own file name \
                 is unknown (give backing.* options)"
            )));
        };
        image.parent().unwrap_or(Path::new("")).join(path)
    };
    let format = match header.backing_format.as_deref() {
        Some("qcow2") => "qcow2",
        Some("raw") => "raw",
        Some(other) => {
            return Err(refuse(format!(
                "the backing file '{}' has format '{other}'; only qcow2 and raw backing \
                 files are supported",
                path.display()
            )));
        }
        None => probe(&path)?,
    };
    Ok(Some(BackingSpec { path, format }))
}

/// `qcow2` if the file at `path` starts with the qcow2 magic, else `raw`.
fn probe(path: &Path) -> io::Result<&'static str> {
    let context = |error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("qcow2: cannot probe the backing file '{}': {error}", path.display()),
        )
    };
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(context)?;
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]).map_err(context)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(if got == 4 && magic == MAGIC { "qcow2" } else { "raw" })
}
