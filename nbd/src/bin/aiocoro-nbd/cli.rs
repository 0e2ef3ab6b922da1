//! The command line, in `qemu-nbd`'s spelling where the meaning is the same.

use std::path::PathBuf;
use std::time::Duration;

/// The text of `--help`.
pub(crate) const HELP: &str = "\
Usage: aiocoro-nbd [OPTIONS] FILE
Serve FILE (a qcow2 or raw image) over NBD, each connection on one of N IoThreads,
all through one block backend.

  -f, --format=FORMAT      image format: qcow2 or raw (default: probed)
      --image-opts         FILE is a list of node options, e.g.
                           driver=qcow2,file.filename=disk.qcow2 (no -f)
  -r, --read-only          export read-only (writes fail with EPERM)
  -x, --export-name=NAME   export name (default: the empty name)
  -D, --description=TEXT   export description
  -k, --socket=PATH        listen on a Unix socket at PATH (removed at exit; a
                           stale one that nothing listens on is replaced)
  -p, --port=PORT          TCP port (default: 10809)
  -b, --bind=ADDR          TCP address (default: 0.0.0.0)
  -t, --persistent         keep serving after the last client disconnects
                           (without it: exit when the first client has gone and
                           no other is connected)
  -e, --shared=N           serve up to N clients at once (default: 1)
      --handshake-limit=N  disconnect a client that has not finished the handshake
                           N seconds after it is served (default: 10; 0: no limit)
      --cache=MODE         writeback (default) or none (O_DIRECT)
      --aio=MODE           io_uring (default) or threads
      --discard=MODE       ignore (default: TRIM does nothing) or unmap
      --pid-file=PATH      write the server's process id to PATH (removed at exit)
      --iothreads=N        IoThreads serving connections, round robin
                           (default: one per core)
  -h, --help               this text

Socket activation: started with LISTEN_PID (this process) and LISTEN_FDS=1, as systemd
and libnbd do, the server accepts on descriptor 3 (Unix or TCP) instead of -k/-p/-b.

Runs in the foreground (there is no --fork). SIGINT and SIGTERM shut the server down:
connections are closed after their running requests, and the image is drained and
flushed. SIGUSR1 prints the live connections, requests and request buffer bytes on
standard error. TLS (--tls-creds) is out of scope: serve on a Unix socket or a trusted network.
";

/// What the command line asks for.
#[derive(Debug)]
pub(crate) struct Options {
    /// The image to serve: a file name, or with `image_opts` its node options.
    pub image: String,
    /// `image` is a list of node options (`--image-opts`).
    pub image_opts: bool,
    /// `qcow2` or `raw`; `None` to probe.
    pub format: Option<String>,
    /// Refuse writes.
    pub read_only: bool,
    /// The export's name.
    pub export_name: String,
    /// The export's description.
    pub description: String,
    /// The Unix socket to listen on, instead of TCP.
    pub socket: Option<PathBuf>,
    /// The TCP port, if given (default 10809).
    pub port: Option<u16>,
    /// The TCP address, if given (default 0.0.0.0).
    pub bind: Option<String>,
    /// Keep serving after the last client.
    pub persistent: bool,
    /// How many clients at once.
    pub shared: usize,
    /// How long a client may take over its handshake; `None`: for ever.
    pub handshake_limit: Option<Duration>,
    /// The file's cache mode.
    pub cache: String,
    /// The file's I/O engine.
    pub aio: String,
    /// Whether `TRIM` frees space (`--discard=unmap`).
    pub unmap: bool,
    /// Where to write the process id.
    pub pid_file: Option<PathBuf>,
    /// How many IoThreads serve connections.
    pub iothreads: usize,
}

/// The result of parsing: options to run with, or a request for the help text.
pub(crate) enum Parsed {
    /// Serve with these options.
    Run(Box<Options>),
    /// Print [`HELP`] and exit successfully.
    Help,
}

/// Parses the arguments (without the program name); an error says which argument is wrong.
pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut options = Options {
        image: String::new(),
        image_opts: false,
        format: None,
        read_only: false,
        export_name: String::new(),
        description: String::new(),
        socket: None,
        port: None,
        bind: None,
        persistent: false,
        shared: 1,
        handshake_limit: Some(Duration::from_secs(10)),
        cache: "writeback".into(),
        aio: "io_uring".into(),
        unmap: false,
        pid_file: None,
        iothreads: std::thread::available_parallelism().map_or(1, usize::from),
    };
    let mut image = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = || match inline.clone() {
            Some(value) => Ok(value),
            None => args.next().ok_or_else(|| format!("{flag} needs a value")),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-f" | "--format" => options.format = Some(value()?),
            "--image-opts" => options.image_opts = true,
            "-r" | "--read-only" => options.read_only = true,
            "-x" | "--export-name" => options.export_name = value()?,
            "-D" | "--description" => options.description = value()?,
            "-k" | "--socket" => options.socket = Some(value()?.into()),
            "-p" | "--port" => options.port = Some(number(&flag, &value()?)?),
            "-b" | "--bind" => options.bind = Some(value()?),
            "-t" | "--persistent" => options.persistent = true,
            "-e" | "--shared" => options.shared = number(&flag, &value()?)?,
            "--handshake-limit" => {
                let seconds: u64 = number(&flag, &value()?)?;
                options.handshake_limit = (seconds > 0).then(|| Duration::from_secs(seconds));
            }
            "--cache" => options.cache = value()?,
            "--aio" => options.aio = value()?,
            "--discard" => options.unmap = discard_mode(&value()?)?,
            "--pid-file" => options.pid_file = Some(value()?.into()),
            "--iothreads" => options.iothreads = number(&flag, &value()?)?,
            "--fork" => {
                return Err("--fork is not supported: the server runs in the foreground".into());
            }
            "--tls-creds" | "--tls-authz" | "--tls-hostname" => {
                return Err(format!("{flag}: TLS is out of scope for aiocoro-nbd"));
            }
            "-c" | "--connect" | "-d" | "--disconnect" => {
                return Err(format!("{flag}: attaching a kernel /dev/nbdX is not supported"));
            }
            other if other.starts_with('-') && other.len() > 1 => {
                return Err(format!("unknown option '{other}'"));
            }
            _ if image.is_some() => return Err(format!("a second image '{arg}': serve one")),
            _ => image = Some(arg),
        }
    }
    options.image = image.ok_or("no image to serve")?;
    if options.shared == 0 || options.iothreads == 0 {
        return Err("--shared and --iothreads must be at least 1".into());
    }
    if let Some(format) = &options.format
        && format != "qcow2"
        && format != "raw"
    {
        return Err(format!("format '{format}' is not supported (qcow2 or raw)"));
    }
    if options.image_opts && options.format.is_some() {
        return Err("--image-opts and -f are incompatible".into());
    }
    if options.socket.is_some() && (options.port.is_some() || options.bind.is_some()) {
        return Err("-k (a Unix socket) and -p / -b (TCP) are incompatible".into());
    }
    if options.export_name.len() > 4096 || options.description.len() > 4096 {
        return Err("the export name and description are limited to 4096 bytes".into());
    }
    Ok(Parsed::Run(Box::new(options)))
}

/// `--discard`'s value: whether discards free space (`unmap`, `on`) or are ignored
/// (`ignore`, `off`), as in QEMU.
fn discard_mode(mode: &str) -> Result<bool, String> {
    match mode {
        "unmap" | "on" => Ok(true),
        "ignore" | "off" => Ok(false),
        other => Err(format!("--discard: unknown mode '{other}' (ignore or unmap)")),
    }
}

/// Parses `text`, the value of `flag`, as a number.
fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse().map_err(|_| format!("{flag}: '{text}' is not a valid number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(args.iter().map(|arg| arg.to_string()))? {
            Parsed::Run(options) => Ok(*options),
            Parsed::Help => Err("help".into()),
        }
    }

    #[test]
    fn qemu_nbd_spellings_parse() {
        let options =
            run(&["-f", "qcow2", "-r", "-x", "disk", "-k", "/tmp/s", "-t", "--shared=4", "a.img"])
                .unwrap();
        assert_eq!(options.format.as_deref(), Some("qcow2"));
        assert!(options.read_only && options.persistent);
        assert_eq!((options.export_name.as_str(), options.shared), ("disk", 4));
        assert_eq!(options.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(options.image, "a.img");
        assert_eq!(run(&["--iothreads", "3", "a"]).unwrap().iothreads, 3);
        assert_eq!(run(&["a"]).unwrap().handshake_limit, Some(Duration::from_secs(10)));
        let limit = |arg| run(&[arg, "a"]).unwrap().handshake_limit;
        assert_eq!(limit("--handshake-limit=3"), Some(Duration::from_secs(3)));
        assert_eq!(limit("--handshake-limit=0"), None);
        let options =
            run(&["--image-opts", "--discard=unmap", "-p", "10", "driver=raw,file=a"]).unwrap();
        assert!(options.image_opts && options.unmap);
        assert_eq!((options.image.as_str(), options.port), ("driver=raw,file=a", Some(10)));
        assert!(!run(&["--discard", "ignore", "a"]).unwrap().unmap);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(run(&[]).unwrap_err().contains("no image"));
        assert!(run(&["a", "b"]).unwrap_err().contains("second image"));
        assert!(run(&["-f", "vmdk", "a"]).unwrap_err().contains("not supported"));
        assert!(run(&["-e", "x", "a"]).unwrap_err().contains("not a valid number"));
        assert!(run(&["--bogus", "a"]).unwrap_err().contains("unknown option"));
        assert!(run(&["-p"]).unwrap_err().contains("needs a value"));
        assert!(run(&["--iothreads=0", "a"]).unwrap_err().contains("at least 1"));
        assert!(run(&["--image-opts", "-f", "raw", "a"]).unwrap_err().contains("incompatible"));
        assert!(run(&["-k", "s", "-p", "1", "a"]).unwrap_err().contains("incompatible"));
        assert!(run(&["--discard=trim", "a"]).unwrap_err().contains("ignore or unmap"));
        assert!(run(&["--fork", "a"]).unwrap_err().contains("foreground"));
        assert!(run(&["--tls-creds=x", "a"]).unwrap_err().contains("out of scope"));
        assert_eq!(run(&["--help"]).unwrap_err(), "help");
    }
}
