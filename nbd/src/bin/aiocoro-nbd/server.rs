//! Accepting clients and handing each to an IoThread, round robin, until it is time to stop.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use aiocoro::aio::IoThread;
use aiocoro_nbd::Export;

use crate::listener::{Listener, Stream};
use crate::signals::TerminationSignals;

/// What the accept thread and the connections tell the main thread.
enum Event {
    /// A client connected.
    Accepted(Stream),
    /// Accepting failed for good.
    AcceptFailed(io::Error),
    /// The connection of this number ended (normally, with an error, or by a panic), after its
    /// client reached transmission or not.
    Ended { number: u64, transmitted: bool },
    /// SIGINT or SIGTERM: shut down.
    Terminate,
}

/// Tells the main thread that a connection ended when dropped, even by a panic's unwinding.
struct EndNotice {
    events: Sender<Event>,
    number: u64,
    /// Set once the client has chosen the export (past the handshake).
    transmitted: Cell<bool>,
}

impl Drop for EndNotice {
    fn drop(&mut self) {
        let (number, transmitted) = (self.number, self.transmitted.get());
        let _ = self.events.send(Event::Ended { number, transmitted });
    }
}

/// How the server runs.
pub(crate) struct ServePolicy {
    /// Keep serving after the last client (`-t`); without it, the server ends once a client
    /// that reached transmission has gone and no other is connected (clients that abort or
    /// fail the handshake do not count, as in `qemu-nbd`).
    pub persistent: bool,
    /// How many clients are served at once (`-e`); later ones wait, connected.
    pub shared: usize,
    /// How long a served client may take over its handshake (`--handshake-limit`).
    pub handshake_limit: Option<Duration>,
}

/// Serves `export` to the clients of `listener` on `threads`, round robin, until (without
/// `persistent`) a client has come, reached transmission and gone and no other is connected,
/// or until SIGINT or SIGTERM: then every connection is shut down and its running requests let
/// finish.
///
/// # Errors
///
/// If accepting fails for another reason than one failed connection, or a thread cannot
/// be started.
pub(crate) fn serve(
    listener: Listener,
    export: Arc<Export>,
    threads: &[IoThread],
    policy: &ServePolicy,
    signals: TerminationSignals,
) -> io::Result<()> {
    let (events, inbox) = channel();
    let signal_events = events.clone();
    signals.watch(report_stats, move || {
        let _ = signal_events.send(Event::Terminate);
    })?;
    let accept_events = events.clone();
    // The accept thread blocks in accept(); it is not joined, and ends with the process.
    std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
        accept_loop(&listener, &accept_events);
    })?;
    run_events(&inbox, &events, &export, threads, policy)
}

/// Prints the live counts (SIGUSR1), for leak checks: one line on standard error.
fn report_stats() {
    let stats = aiocoro_nbd::stats();
    // One write, so that a reader never sees half a line.
    let line = format!(
        "aiocoro-nbd: stats: connections={} requests={} request-bytes={}\n",
        stats.connections, stats.requests, stats.request_bytes
    );
    let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
}

/// How long accepting pauses when the process or the system is out of descriptors or memory
/// (the connection waits in the listen backlog meanwhile).
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Accepts clients and passes them on until the main thread stops listening. Running out of
/// descriptors or memory pauses accepting (reported once per shortage) instead of ending the
/// server: clients can cause it (each waiting client holds a descriptor), and it passes as
/// connections end.
fn accept_loop(listener: &Listener, events: &Sender<Event>) {
    let mut short = false;
    loop {
        let event = match listener.accept() {
            Ok(stream) => {
                short = false;
                Event::Accepted(stream)
            }
            Err(error) if is_transient(&error) => continue,
            Err(error) if is_shortage(&error) => {
                if !std::mem::replace(&mut short, true) {
                    eprintln!("aiocoro-nbd: cannot accept a client for now: {error}; retrying");
                }
                std::thread::sleep(EXHAUSTED_PAUSE);
                continue;
            }
            Err(error) => Event::AcceptFailed(error),
        };
        let failed = matches!(event, Event::AcceptFailed(_));
        if events.send(event).is_err() || failed {
            return;
        }
    }
}

/// Whether `error` from `accept` concerns one connection only (it went away first, or the
/// network failed under it: `accept(2)` says to retry) or an interrupted call.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
    ) || matches!(
        error.raw_os_error(),
        Some(libc::EPROTO | libc::ENOPROTOOPT | libc::EHOSTDOWN | libc::ENONET | libc::EPERM)
    )
}

/// Whether `error` from `accept` is a shortage of descriptors (the process's or the
/// system's) or of kernel memory, which passes as connections end.
fn is_shortage(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// The main thread's loop: starts connections while fewer than `shared` run, and decides
/// when to stop.
fn run_events(
    inbox: &Receiver<Event>,
    events: &Sender<Event>,
    export: &Arc<Export>,
    threads: &[IoThread],
    policy: &ServePolicy,
) -> io::Result<()> {
    let mut waiting: VecDeque<Stream> = VecDeque::new();
    // A second handle on each running connection, to shut it down on a signal.
    let mut active: HashMap<u64, Stream> = HashMap::new();
    let (mut served, mut next_thread, mut terminating) = (0u64, 0usize, false);
    // Whether a client has reached transmission (and so may end a server without -t).
    let mut transmitted = false;
    loop {
        while active.len() < policy.shared
            && !terminating
            && let Some(stream) = waiting.pop_front()
        {
            let Ok(handle) = stream.try_clone() else {
                continue; // Out of descriptors: this client is dropped, the others go on.
            };
            let thread = &threads[next_thread % threads.len()];
            next_thread += 1;
            let notice =
                EndNotice { events: events.clone(), number: served, transmitted: Cell::new(false) };
            let export = export.clone();
            let handshake_limit = policy.handshake_limit;
            let started = thread.handle().spawn(move |co| {
                let notice = notice;
                let stream: Stream = stream;
                match stream.serve(co, export, handshake_limit, || notice.transmitted.set(true)) {
                    // A client hanging up without DISC (as many do) is no error to report.
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {}
                    Err(error) => eprintln!("aiocoro-nbd: connection ended: {error}"),
                }
            });
            if started.is_err() {
                return Err(io::Error::other("an IoThread has shut down"));
            }
            active.insert(served, handle);
            served += 1;
        }
        let finished = !policy.persistent && transmitted && waiting.is_empty();
        if active.is_empty() && (finished || terminating) {
            return Ok(());
        }
        match inbox.recv().expect("the main thread holds a sender") {
            Event::Accepted(stream) if terminating => drop(stream),
            Event::Accepted(stream) => waiting.push_back(stream),
            Event::AcceptFailed(error) => return Err(error),
            Event::Ended { number, transmitted: reached } => {
                transmitted |= reached;
                drop(active.remove(&number));
            }
            Event::Terminate => {
                terminating = true;
                waiting.clear();
                for stream in active.values() {
                    stream.shutdown();
                }
            }
        }
    }
}
