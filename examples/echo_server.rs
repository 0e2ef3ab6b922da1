//! A TCP echo server: one coroutine per connection, on one thread's [`AioContext`].
//!
//! Sockets are ordinary non-blocking `std::net` sockets. When one would block, its coroutine
//! suspends in [`Co::wait_readable`] / [`Co::wait_writable`] on the raw descriptor and the
//! context runs the other connections meanwhile. An accept-loop coroutine accepts connections
//! and starts a coroutine for each with [`AioContext::spawn`].
//!
//! ```text
//! cargo run --release --example echo_server [-- --port 7777]
//! ```
//!
//! prints `listening on 127.0.0.1:<port>` and serves until killed. Try it with
//! `nc 127.0.0.1 <port>`.
//!
//! The serving logic is [`serve`], which `tests/echo_server.rs` runs on a thread of its own and
//! stops through a [`StopSignal`].

// `tests/echo_server.rs` includes this file as a module and uses its `pub` items.
#![allow(unreachable_pub)]
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

use aiocoro::aio::{AioContext, FdHandler, Waker};
use aiocoro::coroutine::Co;
use example_cli::Arg::Long;
use example_cli::{CommandLine, Stop};

/// How much a connection reads (and then writes back) at a time.
const BUFFER_SIZE: usize = 16 * 1024;

/// How a stopped server treats the connections that are still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Stop accepting; let open connections run until their clients close them.
    Drain,
    /// Stop accepting and shut the open connections down at once.
    Close,
}

/// What the stopper and the accept loops share.
#[derive(Debug, Default)]
struct StopState {
    /// Set once a stop was requested; the first request wins.
    mode: Option<StopMode>,
    /// The waits of the accept loops waiting for a connection, by ticket.
    waiters: HashMap<u64, Waker>,
    next_ticket: u64,
}

/// Asks a running [`serve`] to stop, from any thread.
///
/// Clones share one signal. A signal stops every `serve` that uses it (for example one per
/// IoThread), and a `serve` that starts after the request returns at once.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    state: Arc<Mutex<StopState>>,
}

impl StopSignal {
    /// A signal that has not been raised.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Requests a stop in `mode` and wakes the accept loop if it is waiting. Only the first
    /// request counts.
    pub fn stop(&self, mode: StopMode) {
        let waiters = {
            let mut state = self.lock();
            state.mode.get_or_insert(mode);
            std::mem::take(&mut state.waiters)
        };
        // Woken outside the lock: a wake only queues the coroutine on its context.
        for waker in waiters.into_values() {
            waker.wake();
        }
    }

    /// The mode of the stop requested so far, if any.
    pub fn requested(&self) -> Option<StopMode> {
        self.lock().mode
    }

    /// Leaves `waker` for [`StopSignal::stop`] and returns a ticket to take it back with,
    /// unless a stop is requested already; returns the requested mode in that case.
    fn park(&self, waker: Waker) -> Result<u64, StopMode> {
        let mut state = self.lock();
        if let Some(mode) = state.mode {
            return Err(mode);
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiters.insert(ticket, waker);
        Ok(ticket)
    }

    /// Takes back the waker left under `ticket`, if [`StopSignal::stop`] did not use it.
    fn unpark(&self, ticket: u64) {
        self.lock().waiters.remove(&ticket);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StopState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a [`serve`] run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections that ended with an end of file: the client closed its side (or a
    /// [`StopMode::Close`] shut the connection down).
    pub completed: u64,
    /// Connections that ended with an I/O error, such as a client resetting the connection.
    pub failed: u64,
    /// Bytes written back to clients, over all connections.
    pub bytes_echoed: u64,
}

/// The state of one `serve` run, shared by its coroutines on the serving thread.
#[derive(Default)]
struct Server {
    stats: Cell<ServeStats>,
    /// The open connections, so that a [`StopMode::Close`] can shut them down.
    open: RefCell<HashMap<u64, Rc<TcpStream>>>,
    next_id: Cell<u64>,
    /// Why accepting stopped, if it was an error.
    accept_error: RefCell<Option<io::Error>>,
}

impl Server {
    fn count(&self, update: impl FnOnce(&mut ServeStats)) {
        let mut stats = self.stats.get();
        update(&mut stats);
        self.stats.set(stats);
    }
}

/// Echoes every byte each client sends back to it, one coroutine per connection, until `stop`
/// is raised; returns what it did.
///
/// Runs `ctx` (the calling thread's context) until the accept loop has stopped and every
/// connection coroutine has ended: after a [`StopMode::Drain`] that is when the last client
/// closes its connection, after a [`StopMode::Close`] at once. The listener is closed when
/// `serve` returns.
///
/// # Errors
///
/// If the listener cannot be made non-blocking or watched, or `accept` fails with an error
/// that is not about one connection; open connections are then shut down as for a
/// [`StopMode::Close`].
pub fn serve(ctx: &AioContext, listener: TcpListener, stop: &StopSignal) -> io::Result<ServeStats> {
    listener.set_nonblocking(true)?;
    let server = Rc::new(Server::default());
    let acceptor = {
        let (home, server, stop) = (ctx.clone(), server.clone(), stop.clone());
        ctx.spawn(move |co| {
            let mode = match accept_loop(co, &home, &listener, &server, &stop) {
                Ok(mode) => mode,
                Err(error) => {
                    *server.accept_error.borrow_mut() = Some(error);
                    StopMode::Close
                }
            };
            drop(listener);
            if mode == StopMode::Close {
                for stream in server.open.borrow().values() {
                    // Wakes the connection's coroutine with an end of file (or an error if it
                    // was writing); one that has ended meanwhile needs nothing.
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        })
    };
    ctx.wait_while(|| !acceptor.is_finished() || !server.open.borrow().is_empty());
    match server.accept_error.take() {
        Some(error) => Err(error),
        None => Ok(server.stats.get()),
    }
}

/// Accepts connections and starts a coroutine for each until a stop is requested; returns the
/// requested mode.
fn accept_loop(
    co: &Co,
    ctx: &AioContext,
    listener: &TcpListener,
    server: &Rc<Server>,
    stop: &StopSignal,
) -> io::Result<StopMode> {
    loop {
        if let Some(mode) = stop.requested() {
            return Ok(mode);
        }
        match listener.accept() {
            Ok((stream, _peer)) => {
                server.count(|stats| stats.accepted += 1);
                if start_connection(ctx, stream, server).is_err() {
                    server.count(|stats| stats.failed += 1);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Some(mode) = wait_for_connection(co, ctx, listener, stop)? {
                    return Ok(mode);
                }
            }
            // A connection that died before it was accepted, or a signal: try the next one.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error),
        }
    }
}

/// Suspends the accept loop until the listener is readable or a stop is requested; returns
/// the mode in the latter case.
///
/// One wait, two wakers: a local one in the listener's fd handler and a `Send` one left with
/// the stop signal. Whichever comes first resumes the coroutine; the other is then stale and
/// does nothing.
fn wait_for_connection(
    co: &Co,
    ctx: &AioContext,
    listener: &TcpListener,
    stop: &StopSignal,
) -> io::Result<Option<StopMode>> {
    let wait = co.prepare_wait();
    let ticket = match stop.park(wait.waker()) {
        Ok(ticket) => ticket,
        Err(mode) => return Ok(Some(mode)),
    };
    let fd = listener.as_raw_fd();
    let readable = wait.local_waker();
    if let Err(error) =
        ctx.set_fd_handler(fd, FdHandler::new().on_readable(move || readable.wake()))
    {
        stop.unpark(ticket);
        return Err(error);
    }
    wait.wait();
    stop.unpark(ticket);
    ctx.remove_fd_handler(fd)?;
    Ok(stop.requested())
}

/// Registers `stream` as open and starts its coroutine; fails (and drops the connection) if
/// the socket cannot be set up.
fn start_connection(ctx: &AioContext, stream: TcpStream, server: &Rc<Server>) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    // Echoed bytes are small writes in reply to reads: send them at once.
    stream.set_nodelay(true)?;
    let stream = Rc::new(stream);
    let id = server.next_id.get();
    server.next_id.set(id + 1);
    server.open.borrow_mut().insert(id, stream.clone());
    let server = server.clone();
    ctx.spawn(move |co| {
        let result = echo(co, &stream, &server);
        server.count(|stats| match result {
            Ok(()) => stats.completed += 1,
            Err(_) => stats.failed += 1,
        });
        server.open.borrow_mut().remove(&id);
    });
    Ok(())
}

/// Writes back everything the client sends, until it closes its side.
fn echo(co: &Co, stream: &TcpStream, server: &Server) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut buffer = vec![0; BUFFER_SIZE];
    loop {
        let read = match (&*stream).read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                co.wait_readable(fd)?;
                continue;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        write_all(co, stream, &buffer[..read])?;
        server.count(|stats| stats.bytes_echoed += read as u64);
    }
}

/// Writes all of `data`, suspending whenever the socket's send buffer is full.
fn write_all(co: &Co, stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match (&*stream).write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => data = &data[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                co.wait_writable(stream.as_raw_fd())?
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

const USAGE: &str = "\
usage: echo_server [--port N]

A TCP echo server on 127.0.0.1, one coroutine per connection; serves until killed.

  -h, --help    print this help and exit
  --port N      the port to listen on (default 0: any free port, printed)";

/// The port from `--port N` (or `--port=N`); 0 (any free port) without one.
fn parse_port(line: &mut CommandLine) -> Result<u16, Stop> {
    let mut port = 0;
    while let Some(arg) = line.next_arg()? {
        match arg {
            Long("port") => port = line.integer("port", 0..=i64::from(u16::MAX))? as u16,
            arg => return Err(arg.unexpected().into()),
        }
    }
    Ok(port)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = CommandLine::from_env("echo_server", USAGE).parse(parse_port);
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!("listening on {}", listener.local_addr()?);
    let ctx = AioContext::new()?;
    // Nobody raises the signal: serve until the process is killed.
    serve(&ctx, listener, &StopSignal::new())?;
    Ok(())
}
