//! The node options a command line names an image with, in the spelling `qemu-img` and
//! `qemu-nbd` share: a file name with `-f FMT` (probed when absent), or `--image-opts` (the
//! argument is the options themselves), with a cache mode (`-t` / `--cache`) and an I/O
//! engine (`-i` / `--aio`) on top.

use std::io::{self, Read};

use crate::error::{invalid_input, unsupported};
use crate::options::BlockOptions;

/// The first bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// An image as a command line names it.
#[derive(Clone, Debug)]
pub struct ImageArgs<'a> {
    /// The file name, or with `image_opts` the options (`driver=qcow2,file.filename=...`).
    pub image: &'a str,
    /// `-f`: the format driver; probed from the file when `None`.
    pub format: Option<&'a str>,
    /// `--image-opts`: `image` is a list of options, not a file name.
    pub image_opts: bool,
    /// The cache mode: `writeback` (the page cache) or `none` (`O_DIRECT`).
    pub cache: &'a str,
    /// The I/O engine: `io_uring` or `threads`.
    pub aio: &'a str,
    /// Open the image read-only.
    pub read_only: bool,
}

impl ImageArgs<'_> {
    /// The options to open the image with ([`crate::open_options`]). With `image_opts` the
    /// cache mode and engine apply where the options do not set them (they are inherited by
    /// the children).
    ///
    /// # Errors
    ///
    /// `-f` with `--image-opts`, an unknown or unsupported cache mode or engine (`native`,
    /// Linux AIO, is not implemented), `read-only=off` with `read_only`, bad option syntax,
    /// or a file that cannot be read for probing.
    pub fn options(&self) -> io::Result<BlockOptions> {
        let direct = match self.cache {
            "none" => "on",
            "writeback" => "off",
            other @ ("writethrough" | "directsync" | "unsafe") => {
                return Err(unsupported(format!(
                    "cache mode '{other}' is not supported (writeback or none)"
                )));
            }
            other => return Err(invalid_input(format!("unknown cache mode '{other}'"))),
        };
        let aio = match self.aio {
            aio @ ("io_uring" | "threads") => aio,
            "native" => {
                return Err(unsupported(
                    "aio mode 'native' (Linux AIO) is not supported; use io_uring or threads",
                ));
            }
            other => return Err(invalid_input(format!("unknown aio mode '{other}'"))),
        };
        let mut options = if self.image_opts {
            if self.format.is_some() {
                return Err(invalid_input("--image-opts and -f are incompatible"));
            }
            let mut options = BlockOptions::parse(self.image)?;
            options.set_default("cache.direct", direct);
            options.set_default("aio", aio);
            options
        } else {
            let format = match self.format {
                Some(format) => format.to_owned(),
                None => probe_format(self.image)?.to_owned(),
            };
            let mut options = BlockOptions::default();
            options.set("driver", &format)?;
            options.set("file.driver", "file")?;
            options.set("file.filename", self.image)?;
            options.set("cache.direct", direct)?;
            options.set("aio", aio)?;
            options
        };
        if self.read_only {
            match options.get("read-only") {
                None => options.set("read-only", "on")?,
                Some("on" | "true" | "yes") => {}
                Some(other) => {
                    return Err(invalid_input(format!(
                        "read-only={other} contradicts the read-only flag"
                    )));
                }
            }
        }
        Ok(options)
    }
}

/// The format of the image file `filename`, from its first bytes: `qcow2` if it starts with
/// qcow2's magic, else `raw`.
///
/// # Errors
///
/// If the file cannot be opened or read (the error names the file).
pub fn probe_format(filename: &str) -> io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(filename).map_err(|error| {
        io::Error::new(error.kind(), format!("cannot open {filename}: {error}"))
    })?;
    let read = file.read(&mut magic)?;
    Ok(if read == 4 && &magic == QCOW2_MAGIC { "qcow2" } else { "raw" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(image: &str) -> ImageArgs<'_> {
        ImageArgs {
            image,
            format: Some("raw"),
            image_opts: false,
            cache: "writeback",
            aio: "io_uring",
            read_only: false,
        }
    }

    #[test]
    fn a_file_name_becomes_a_format_over_a_file() {
        let options = ImageArgs { cache: "none", read_only: true, ..args("a.img") }.options();
        let options = options.unwrap();
        assert_eq!(options.get("driver"), Some("raw"));
        assert_eq!(options.get("file.filename"), Some("a.img"));
        assert_eq!(options.get("cache.direct"), Some("on"));
        assert_eq!(options.get("read-only"), Some("on"));
    }

    #[test]
    fn image_opts_keep_their_own_settings() {
        let text = "driver=qcow2,file.filename=a.img,aio=threads";
        let options = ImageArgs { image_opts: true, format: None, cache: "none", ..args(text) };
        let options = options.options().unwrap();
        assert_eq!(options.get("aio"), Some("threads"));
        assert_eq!(options.get("cache.direct"), Some("on"));
        assert_eq!(options.get("file.filename"), Some("a.img"));
    }

    #[test]
    fn bad_combinations_are_refused() {
        let message = |args: ImageArgs<'_>| args.options().unwrap_err().to_string();
        assert!(message(ImageArgs { image_opts: true, ..args("driver=raw") }).contains("-f"));
        assert!(message(ImageArgs { cache: "unsafe", ..args("a") }).contains("not supported"));
        assert!(message(ImageArgs { cache: "bogus", ..args("a") }).contains("unknown cache"));
        assert!(message(ImageArgs { aio: "native", ..args("a") }).contains("Linux AIO"));
        let contradiction = ImageArgs {
            image_opts: true,
            format: None,
            read_only: true,
            ..args("driver=raw,read-only=off")
        };
        assert!(message(contradiction).contains("contradicts"));
    }
}
