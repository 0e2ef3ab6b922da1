//! `aiocoro-nbd`: serves a qcow2 or raw image over NBD, each connection on one of N
//! IoThreads, all through one `BlockBackend`. The command line follows `qemu-nbd`'s; see
//! `aiocoro-nbd --help`.

mod activation;
mod cli;
mod descriptors;
mod listener;
mod server;
mod signals;
mod socket_buffers;

use std::io;
use std::process::ExitCode;
use std::sync::Arc;

use aiocoro::aio::IoThread;
use aiocoro_block::{BlockBackend, BlockGraph, ImageArgs};
use aiocoro_nbd::Export;

use crate::cli::{Options, Parsed};
use crate::listener::Listener;
use crate::server::ServePolicy;
use crate::signals::TerminationSignals;

/// Opens the image the options name, as one backend.
fn open_backend(options: &Options) -> io::Result<BlockBackend> {
    let block = ImageArgs {
        image: &options.image,
        format: options.format.as_deref(),
        image_opts: options.image_opts,
        cache: &options.cache,
        aio: &options.aio,
        read_only: options.read_only,
    }
    .options()?;
    let graph = BlockGraph::new();
    let root = aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::open_options(co, &graph, &block).map(|(_, node)| node)
    })??;
    Ok(BlockBackend::new(root))
}

/// The listening socket: the one socket activation passed, else the one the options name.
fn listen(options: &Options) -> io::Result<Listener> {
    if activation::requested() {
        if options.socket.is_some() || options.port.is_some() || options.bind.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "-k, -p and -b cannot be used with socket activation (LISTEN_FDS)",
            ));
        }
        return Listener::from_activation(activation::take_listener()?);
    }
    let bind = options.bind.as_deref().unwrap_or("0.0.0.0");
    Listener::bind(options.socket.as_ref(), bind, options.port.unwrap_or(10809))
}

/// Serves until the policy or a signal says to stop, then drains and flushes the export.
fn run(options: Options) -> io::Result<()> {
    // Before any thread starts (the block layer's included), so that all inherit the mask.
    let signals = TerminationSignals::block()?;
    descriptors::raise_limit();
    let backend = open_backend(&options)?;
    let export = Arc::new(Export {
        name: options.export_name.clone(),
        description: options.description.clone(),
        backend,
        read_only: options.read_only,
        unmap: options.unmap,
    });
    let listener = listen(&options)?;
    if let Some(path) = &options.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let threads: Vec<IoThread> = (0..options.iothreads)
        .map(|n| IoThread::spawn(&format!("nbd-iothread-{n}")))
        .collect::<io::Result<_>>()?;
    let policy = ServePolicy {
        persistent: options.persistent,
        shared: options.shared,
        handshake_limit: options.handshake_limit,
    };
    let served = server::serve(listener, export.clone(), &threads, &policy, signals);
    drop(export.backend.drain());
    for thread in threads {
        thread.stop();
    }
    let backend = export.backend.clone();
    let flushed = aiocoro_block::run_in_coroutine(move |co| backend.flush(co))?;
    // The accept thread keeps the listener until the process ends; its name goes now.
    for path in [&options.pid_file, &options.socket].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    served.and(flushed)
}

fn main() -> ExitCode {
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(options)) => *options,
        Ok(Parsed::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("aiocoro-nbd: {message}\nTry 'aiocoro-nbd --help' for more information.");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("aiocoro-nbd: {error}");
            ExitCode::FAILURE
        }
    }
}
