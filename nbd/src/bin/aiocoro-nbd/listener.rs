//! Where clients connect: a TCP or a Unix socket, and the streams they give.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use aiocoro::coroutine::Co;
use aiocoro_nbd::{Export, serve_connection};

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
    /// Listens on the Unix socket `path` if given, else on TCP `bind`:`port`.
    pub(crate) fn bind(path: Option<&PathBuf>, bind: &str, port: u16) -> io::Result<Listener> {
        match path {
            Some(path) => UnixListener::bind(path).map(Listener::Unix).map_err(|error| {
                io::Error::new(error.kind(), format!("{}: {error}", path.display()))
            }),
            None => TcpListener::bind((bind, port))
                .map(Listener::Tcp)
                .map_err(|error| io::Error::new(error.kind(), format!("{bind}:{port}: {error}"))),
        }
    }

    /// Waits for the next connection and makes it ready to serve (non-blocking, and for
    /// TCP without Nagle's delay: replies are sent as soon as they are written).
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(true)?;
                Ok(Stream::Unix(stream))
            }
        }
    }
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

    /// Serves the client on this stream (see [`serve_connection`]).
    pub(crate) fn serve(self, co: &Co, export: Arc<Export>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => serve_connection(co, stream, export),
            Stream::Unix(stream) => serve_connection(co, stream, export),
        }
    }
}
