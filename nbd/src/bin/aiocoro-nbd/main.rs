//! `aiocoro-nbd`: serves a qcow2 or raw image over NBD, each connection on one of N
//! IoThreads, all through one `BlockBackend`. The command line follows `qemu-nbd`'s; see
//! `aiocoro-nbd --help`.

mod cli;
mod listener;
mod server;
mod signals;

use std::io::{self, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use aiocoro::aio::IoThread;
use aiocoro_block::{BlockBackend, BlockGraph, BlockOptions};
use aiocoro_nbd::Export;

use crate::cli::{Options, Parsed};
use crate::listener::Listener;
use crate::server::ServePolicy;
use crate::signals::TerminationSignals;

/// The first bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The format of the image at `path`: qcow2 if it starts with the qcow2 magic, else raw.
fn probe_format(path: &Path) -> io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))?;
    let read = file.read(&mut magic)?;
    Ok(if read == 4 && &magic == QCOW2_MAGIC { "qcow2" } else { "raw" })
}

/// Opens the image the options name, as one backend.
fn open_backend(options: &Options) -> io::Result<BlockBackend> {
    let format = match &options.format {
        Some(format) => format.as_str(),
        None => probe_format(&options.image)?,
    };
    let mut block = BlockOptions::default();
    block.set("driver", format)?;
    block.set("file.filename", &options.image.to_string_lossy())?;
    block.set("file.cache", &options.cache)?;
    block.set("file.aio", &options.aio)?;
    if options.read_only {
        block.set("read-only", "on")?;
    }
    let graph = BlockGraph::new();
    let root = aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::open_options(co, &graph, &block).map(|(_, node)| node)
    })??;
    Ok(BlockBackend::new(root))
}

/// Serves until the policy or a signal says to stop, then drains and flushes the export.
fn run(options: Options) -> io::Result<()> {
    // Before any thread starts (the block layer's included), so that all inherit the mask.
    let signals = TerminationSignals::block()?;
    let backend = open_backend(&options)?;
    let export = Arc::new(Export {
        name: options.export_name.clone(),
        description: options.description.clone(),
        backend,
        read_only: options.read_only,
    });
    let listener = Listener::bind(options.socket.as_ref(), &options.bind, options.port)?;
    if let Some(path) = &options.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let threads: Vec<IoThread> = (0..options.iothreads)
        .map(|n| IoThread::spawn(&format!("nbd-iothread-{n}")))
        .collect::<io::Result<_>>()?;
    let policy = ServePolicy { persistent: options.persistent, shared: options.shared };
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
