//! Where clients connect: a TCP or a Unix socket (bound here, or passed by socket
//! activation), and the streams they give.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aiocoro::coroutine::Co;
use aiocoro_nbd::{Export, serve_connection};

use crate::socket_buffers;

/// A listening socket.
pub(crate) enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket.
    Unix(UnixListener),
}

/// One accepted connection.
pub(crate) enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
}

impl Listener {
    /// Listens on the Unix socket `path` if given (replacing a stale socket there, see
    /// [`bind_unix`]), else on TCP `bind`:`port`.
    ///
    /// # Errors
    ///
    /// If the socket cannot be bound (the error names the address).
    pub(crate) fn bind(path: Option<&PathBuf>, bind: &str, port: u16) -> io::Result<Listener> {
        match path {
            Some(path) => bind_unix(path).map(Listener::Unix).map_err(|error| {
                io::Error::new(error.kind(), format!("{}: {error}", path.display()))
            }),
            None => TcpListener::bind((bind, port))
                .map(Listener::Tcp)
                .map_err(|error| io::Error::new(error.kind(), format!("{bind}:{port}: {error}"))),
        }
    }

    /// The listening socket `fd` passed by socket activation, Unix or TCP as its address
    /// family says, made blocking (the accept thread waits in `accept`).
    ///
    /// # Errors
    ///
    /// If `fd` is not a Unix or TCP socket.
    pub(crate) fn from_activation(fd: OwnedFd) -> io::Result<Listener> {
        // SAFETY: sockaddr_storage is plain data, valid when zeroed.
        let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut length = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `address` and `length` are valid out pointers; the length is the storage's.
        let result =
            unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut address).cast(), &mut length) };
        if result != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(error.kind(), format!("socket activation: fd 3: {error}")));
        }
        let listener = match libc::c_int::from(address.ss_family) {
            libc::AF_UNIX => Listener::Unix(UnixListener::from(fd)),
            libc::AF_INET | libc::AF_INET6 => Listener::Tcp(TcpListener::from(fd)),
            family => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("socket activation: fd 3 has address family {family}, not Unix or IP"),
                ));
            }
        };
        match &listener {
            Listener::Tcp(listener) => listener.set_nonblocking(false)?,
            Listener::Unix(listener) => listener.set_nonblocking(false)?,
        }
        Ok(listener)
    }

    /// Waits for the next connection and makes it ready to serve: non-blocking, with large
    /// socket buffers, and for TCP without Nagle's delay (replies go out as soon as they are
    /// written).
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                socket_buffers::enlarge(stream.as_fd());
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(true)?;
                socket_buffers::enlarge(stream.as_fd());
                Ok(Stream::Unix(stream))
            }
        }
    }
}

/// Binds the Unix socket `path`. A socket file already there that no process listens on (a
/// server killed before it could remove it: connecting is refused) is replaced, as
/// `qemu-nbd` replaces it; a socket someone listens on, or a file that is no socket, is left
/// alone and the bind fails.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(error) if error.kind() == io::ErrorKind::AddrInUse && is_stale_socket(path) => {
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        bound => bound,
    }
}

/// Whether `path` is a socket file with no listener behind it.
fn is_stale_socket(path: &Path) -> bool {
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
    is_socket
        && UnixStream::connect(path)
            .is_err_and(|error| error.kind() == io::ErrorKind::ConnectionRefused)
}

impl Stream {
    /// Another handle on the same connection, to shut it down with.
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(stream) => Stream::Tcp(stream.try_clone()?),
            Stream::Unix(stream) => Stream::Unix(stream.try_clone()?),
        })
    }

    /// Shuts both directions down: the connection's reader sees an end of file, and its
    /// running requests finish (their replies are dropped).
    pub(crate) fn shutdown(&self) {
        // A connection already closed needs nothing.
        let _ = match self {
            Stream::Tcp(stream) => stream.shutdown(std::net::Shutdown::Both),
            Stream::Unix(stream) => stream.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Serves the client on this stream (see [`serve_connection`]), its handshake limited to
    /// `handshake_limit`; `on_transmission` is called if the client gets past the handshake.
    pub(crate) fn serve(
        self,
        co: &Co,
        export: Arc<Export>,
        handshake_limit: Option<Duration>,
        on_transmission: impl FnOnce(),
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => {
                serve_connection(co, stream, export, handshake_limit, on_transmission)
            }
            Stream::Unix(stream) => {
                serve_connection(co, stream, export, handshake_limit, on_transmission)
            }
        }
    }
}
