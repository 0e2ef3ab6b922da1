//! Starting the `aiocoro-nbd` binary on a Unix socket for a test, and the QEMU tools.

#![allow(dead_code)] // Each test file uses its own part of this module.

pub(crate) mod client;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// A directory for one test, removed with what it holds when dropped.
pub(crate) struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for one test.
pub(crate) fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("aiocoro-nbd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    TempDir(dir)
}

/// Runs `program` with `args`; panics naming the command if it cannot start.
pub(crate) fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program} {args:?}: {error}"))
}

/// Runs `program` with `args` and panics with its output unless it succeeds; returns stdout.
pub(crate) fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A new qcow2 image of `size` (qemu-img's spelling) in `dir`.
pub(crate) fn qcow2_image(dir: &Path, size: &str) -> PathBuf {
    let image = dir.join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), size]);
    image
}

/// How a server process is set up beyond its arguments.
#[derive(Default)]
struct Setup {
    /// Where its standard error goes (else to the test's).
    log: Option<PathBuf>,
    /// Its limit on open descriptors, soft and hard.
    fd_limit: Option<u64>,
    /// Environment variables added to the test's.
    env: Vec<(OsString, OsString)>,
}

impl Setup {
    /// Standard error to `<dir>/server.log`.
    fn logged(dir: &Path) -> Setup {
        Setup { log: Some(dir.join("server.log")), ..Setup::default() }
    }
}

/// A running server, killed when dropped.
pub(crate) struct Server {
    child: Option<Child>,
    /// The Unix socket it listens on (empty for TCP).
    pub socket: PathBuf,
    /// Where its standard error goes, if not to the test's.
    log: Option<PathBuf>,
}

impl Server {
    /// Starts `aiocoro-nbd -k <dir>/nbd.sock --pid-file <dir>/nbd.pid ARGS IMAGE` and waits
    /// until it listens (its pid file is written after the socket is bound).
    pub(crate) fn start(dir: &Path, image: &Path, args: &[&str]) -> Server {
        let socket = dir.join("nbd.sock");
        let listen = ["-k".to_owned(), socket.to_str().expect("a UTF-8 path").to_owned()];
        Server::spawn(dir, image, &listen, args, socket, Setup::default())
    }

    /// As [`Server::start`], with the server's standard error going to `<dir>/server.log`
    /// (see [`Server::log`]).
    pub(crate) fn start_logged(dir: &Path, image: &Path, args: &[&str]) -> Server {
        let socket = dir.join("nbd.sock");
        let listen = ["-k".to_owned(), socket.to_str().expect("a UTF-8 path").to_owned()];
        Server::spawn(dir, image, &listen, args, socket, Setup::logged(dir))
    }

    /// As [`Server::start_logged`], with at most `fds` open descriptors (the soft and the hard
    /// limit, so that the server cannot raise it).
    pub(crate) fn start_with_fd_limit(dir: &Path, image: &Path, args: &[&str], fds: u64) -> Server {
        let socket = dir.join("nbd.sock");
        let listen = ["-k".to_owned(), socket.to_str().expect("a UTF-8 path").to_owned()];
        let setup = Setup { fd_limit: Some(fds), ..Setup::logged(dir) };
        Server::spawn(dir, image, &listen, args, socket, setup)
    }

    /// As [`Server::start_logged`], with the environment variables `env` added.
    pub(crate) fn start_with_env(
        dir: &Path,
        image: &Path,
        args: &[&str],
        env: &[(&str, &OsStr)],
    ) -> Server {
        let socket = dir.join("nbd.sock");
        let listen = ["-k".to_owned(), socket.to_str().expect("a UTF-8 path").to_owned()];
        let env = env.iter().map(|&(name, value)| (name.into(), value.to_owned())).collect();
        Server::spawn(dir, image, &listen, args, socket, Setup { env, ..Setup::logged(dir) })
    }

    /// As [`Server::start`] but on TCP at 127.0.0.1; returns the port too. The port is one
    /// the system just handed out and took back, so another process could take it first.
    pub(crate) fn start_tcp(dir: &Path, image: &Path, args: &[&str]) -> (Server, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = ["-b", "127.0.0.1", "-p", &port.to_string()].map(str::to_owned);
        (Server::spawn(dir, image, &listen, args, PathBuf::new(), Setup::default()), port)
    }

    fn spawn(
        dir: &Path,
        image: &Path,
        listen: &[String],
        args: &[&str],
        socket: PathBuf,
        setup: Setup,
    ) -> Server {
        let pid_file = dir.join("nbd.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut command = Command::new(env!("CARGO_BIN_EXE_aiocoro-nbd"));
        command.args(listen).arg("--pid-file").arg(&pid_file).args(args).arg(image);
        command.envs(setup.env);
        if let Some(log) = &setup.log {
            command.stderr(std::fs::File::create(log).expect("create the server log"));
        }
        if let Some(fds) = setup.fd_limit {
            let limit = libc::rlimit { rlim_cur: fds, rlim_max: fds };
            // SAFETY: between fork and exec the hook only calls setrlimit, which is
            // async-signal-safe, with a valid pointer to an initialised rlimit it owns.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start aiocoro-nbd");
        let mut server = Server { child: Some(child), socket, log: setup.log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid_file.exists() {
            if let Some(status) = server.child().try_wait().expect("poll the server") {
                panic!("aiocoro-nbd exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "aiocoro-nbd did not start listening in 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// The URL of export `name` for QEMU's tools.
    pub(crate) fn url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Sends the server `signal` (a name `kill` knows, such as `TERM`).
    pub(crate) fn signal(&mut self, signal: &str) {
        let pid = self.child().id().to_string();
        run_ok("kill", &[&format!("-{signal}"), &pid]);
    }

    /// The server's process id.
    pub(crate) fn pid(&mut self) -> u32 {
        self.child().id()
    }

    /// What the server wrote to standard error so far (started by [`Server::start_logged`]).
    pub(crate) fn log(&self) -> String {
        let log = self.log.as_ref().expect("the server was started with a log");
        std::fs::read_to_string(log).expect("read the server log")
    }

    /// Whether the server is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child().try_wait().expect("poll the server").is_none()
    }

    /// Waits for the server to exit by itself (at most 20 s) and returns its status.
    pub(crate) fn wait_exit(mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child().try_wait().expect("poll the server") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "aiocoro-nbd did not exit in 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the server was not waited for")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
