//! A small image tool with qemu-img's spelling, reading through aiocoro-block's drivers:
//!
//! ```text
//! cargo run -p aiocoro-block --example qcow2 -- info FILE
//! cargo run -p aiocoro-block --example qcow2 -- convert -O raw FILE OUT
//! cargo run -p aiocoro-block --example qcow2 -- convert -O qcow2 [-c] [-o OPTIONS] FILE OUT
//! cargo run -p aiocoro-block --example qcow2 -- create [-f qcow2] [-o OPTIONS] [-b BACKING]
//!     [-F BACKING_FORMAT] FILE [SIZE]
//! cargo run -p aiocoro-block --example qcow2 -- check [-r leaks|all] [--output human|json]
//!     [-f qcow2] FILE
//! cargo run -p aiocoro-block --example qcow2 -- snapshot -l FILE
//! ```
//!
//! `info` prints the format, virtual size, cluster size, refcount width, backing file and
//! how many bytes the image itself holds (from block status); `convert -O raw` reads every
//! guest byte through the driver (backing chain included) and writes a sparse raw file;
//! `convert -O qcow2` writes them into a new qcow2 image (`-o` as for `create`), leaving
//! zero clusters unallocated, and with `-c` compresses each cluster with the image's
//! `compression_type` (`zlib` or `zstd`) through the driver's compressed writes.
//! `create` makes a new qcow2 image; `-o` takes qemu-img's `cluster_size=64k`,
//! `compat=1.1|0.10`, `refcount_bits=16`, `lazy_refcounts=on|off`, `extended_l2=on|off`,
//! `compression_type=zlib|zstd`, `backing_file=`,
//! `backing_fmt=`, `size=`; without a size the backing file's is used. `check` checks (and
//! with `-r` repairs) a qcow2 image as `qemu-img check` does: the problems found on stderr,
//! the report on stdout, and qemu-img's exit code (0 clean, 1 check failed, 2 corruptions,
//! 3 leaks only). `snapshot -l` lists the internal snapshots as `qemu-img snapshot -l` does.

use std::cell::Cell;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use aiocoro::aio::AioContext;
use aiocoro::coroutine::Co;
use aiocoro_block::qcow2::header::SECTOR_SIZE;
use aiocoro_block::qcow2::{Compat, Compression, CreateOptions, Header, Repair, check_image_file};
use aiocoro_block::{Allocation, BlockBackend, BlockGraph, invalid_input, run_in_coroutine};
use example_cli::Arg::{Long, Short, Value};
use example_cli::numbers::parse_size;
use example_cli::{CommandLine, Stop, ValueExt};

const USAGE: &str = "\
usage: qcow2 info FILE
       qcow2 convert [-f FMT] -O raw FILE OUT
       qcow2 convert [-f FMT] -O qcow2 [-c] [-o OPTIONS] FILE OUT
       qcow2 snapshot -l FILE
       qcow2 create [-f qcow2] [-o OPTIONS] [-b BACKING] [-F FMT] FILE [SIZE]
       qcow2 check [-r leaks|all] [--output human|json] [-f qcow2] FILE

A small image tool with qemu-img's spelling, through aiocoro-block's drivers. The source's
format is probed (-f is accepted and ignored). OPTIONS: cluster_size, compat (1.1 or 0.10),
refcount_bits, lazy_refcounts, extended_l2 (on or off), compression_type (zlib or zstd),
backing_file, backing_fmt, size. Sizes as qemu-img reads them: decimal, 0x hex; a unit k, M,
G, T (B: bytes). -q and -p are accepted and ignored.

  -h, --help    print this help and exit";

/// The bytes read per request by `convert`.
const CHUNK: usize = 2 << 20;

/// How many pieces `convert -O qcow2` copies at once.
const CONVERT_WORKERS: usize = 8;

/// What to do, from the command line.
enum Command {
    /// `info FILE`.
    Info(String),
    /// `convert ... FILE OUT`.
    Convert { file: String, out: String, target: Target },
    /// `snapshot -l FILE`.
    Snapshots(String),
    /// `create ... FILE [SIZE]`; whether the size was given.
    Create { file: String, options: CreateOptions, sized: bool },
    /// `check ... FILE`; whether the output is JSON.
    Check { file: String, repair: Repair, json: bool },
}

fn main() -> ExitCode {
    let command = CommandLine::from_env("qcow2", USAGE).parse(parse_command);
    let result = match command {
        Command::Info(file) => info(&file),
        Command::Convert { file, out, target: Target::Raw } => convert(&file, &out),
        Command::Convert { file, out, target: Target::Qcow2 { options, compress } } => {
            convert_to_qcow2(&file, &out, options, compress)
        }
        Command::Snapshots(file) => list_snapshots(&file),
        Command::Create { file, options, sized } => create(&file, options, sized),
        Command::Check { file, repair, json } => return check(&file, repair, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qcow2: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The command and its arguments.
fn parse_command(line: &mut CommandLine) -> Result<Command, Stop> {
    let command = match line.next_arg()? {
        Some(Value(command)) => command.string()?,
        Some(arg) => return Err(arg.unexpected().into()),
        None => return Err("a command is missing (info, convert, snapshot, create, check)".into()),
    };
    match command.as_str() {
        "info" => {
            let mut given = Vec::new();
            while let Some(arg) = line.next_arg()? {
                match arg {
                    Value(value) => given.push(value.string()?),
                    arg => return Err(arg.unexpected().into()),
                }
            }
            let [file] = operands(given, ["FILE"])?;
            Ok(Command::Info(file))
        }
        "snapshot" => {
            let (mut list, mut given) = (false, Vec::new());
            while let Some(arg) = line.next_arg()? {
                match arg {
                    Short('l') => list = true,
                    Value(value) => given.push(value.string()?),
                    arg => return Err(arg.unexpected().into()),
                }
            }
            if !list {
                return Err("only snapshot -l (list) is supported".into());
            }
            let [file] = operands(given, ["FILE"])?;
            Ok(Command::Snapshots(file))
        }
        "convert" => convert_options(line),
        "create" => create_options(line),
        "check" => check_options(line),
        other => Err(format!("unknown command '{other}'").into()),
    }
}

/// The operands `given`, exactly as many as `names` names (the first missing one is named
/// in the error).
fn operands<const N: usize>(given: Vec<String>, names: [&str; N]) -> Result<[String; N], Stop> {
    if let Some(extra) = given.get(N) {
        return Err(format!("unexpected argument \"{extra}\"").into());
    }
    let missing = names.get(given.len()).copied().unwrap_or_default();
    given.try_into().map_err(|_| format!("{missing} is missing").into())
}

/// `qcow2` if `file` starts with the qcow2 magic, else `raw` (as qemu-img probes).
fn probe(file: &str) -> io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(file)?.read_at(&mut magic, 0)?;
    Ok(if read == 4 && Header::has_magic(&magic) { "qcow2" } else { "raw" })
}

/// Opens `file` read-only with its probed format and runs `body` on it.
fn with_image<R: 'static>(
    file: &str,
    body: impl FnOnce(&Co, &BlockBackend, &'static str) -> io::Result<R> + 'static,
) -> io::Result<R> {
    let format = probe(file)?;
    let options = format!("driver={format},read-only=on,file.filename={}", file.replace(',', ",,"));
    run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = aiocoro_block::open(co, &graph, &options)?;
        body(co, &BlockBackend::new(node), format)
    })?
}

/// Bytes as qemu-img prints sizes: `8 MiB (8388608 bytes)`.
/// A byte count as qemu-img prints one: three significant digits, in the largest binary unit
/// that keeps the number under 1000 ("0 B", "10 KiB", "0.977 MiB", "1.5 GiB").
fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let decimals = match value {
        v if v < 1.0 => 3,
        v if v < 10.0 => 2,
        v if v < 100.0 => 1,
        _ => 0,
    };
    let mut number = format!("{value:.decimals$}");
    if number.contains('.') {
        number = number.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{number} {}", UNITS[unit])
}

fn info(file: &str) -> io::Result<()> {
    let file_owned = file.to_owned();
    let (format, virtual_size, allocated, header) = with_image(file, move |co, blk, format| {
        let header = if format == "qcow2" {
            let graph = BlockGraph::new();
            let options =
                format!("driver=file,read-only=on,filename={}", file_owned.replace(',', ",,"));
            let (_, node) = aiocoro_block::open(co, &graph, &options)?;
            Some(Header::read(co, &node)?)
        } else {
            None
        };
        let len = blk.length();
        let (mut at, mut allocated) = (0, 0);
        while at < len {
            let status = blk.block_status(co, at, len - at)?;
            if status.allocation == Allocation::Data {
                allocated += status.len;
            }
            at += status.len;
        }
        Ok((format, len, allocated, header))
    })?;
    let disk_size = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(file)?.blocks() * 512
    };
    let mut out = io::stdout().lock();
    writeln!(out, "image: {file}")?;
    writeln!(out, "file format: {format}")?;
    writeln!(out, "virtual size: {} ({virtual_size} bytes)", human(virtual_size))?;
    writeln!(out, "disk size: {}", human(disk_size))?;
    if let Some(header) = &header {
        writeln!(out, "cluster_size: {}", header.geometry.cluster_size())?;
        if let Some(backing) = &header.backing_file {
            writeln!(out, "backing file: {backing}")?;
        }
        if let Some(format) = &header.backing_format {
            writeln!(out, "backing file format: {format}")?;
        }
        writeln!(out, "Format specific information:")?;
        writeln!(out, "    compat: {}", header.compat())?;
        writeln!(out, "    compression type: {}", header.compression.name())?;
        writeln!(out, "    lazy refcounts: {}", header.lazy_refcounts())?;
        writeln!(out, "    extended l2: {}", header.geometry.has_subclusters())?;
        writeln!(out, "    refcount bits: {}", header.refcount_bits())?;
        writeln!(out, "    dirty: {}", header.is_dirty())?;
        writeln!(out, "    snapshots: {}", header.nb_snapshots)?;
    }
    writeln!(
        out,
        "allocated in this image: {} ({allocated} bytes, from block status)",
        human(allocated)
    )?;
    Ok(())
}

fn convert(file: &str, out: &str) -> io::Result<()> {
    let output = std::fs::File::create(out)?;
    let started = Instant::now();
    let len = with_image(file, move |co, blk, _| {
        let len = blk.length();
        let mut buf = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            blk.read(co, at, &mut buf[..n])?;
            // Leave holes where the guest sees zeroes, as qemu-img convert does.
            if buf[..n].iter().any(|&byte| byte != 0) {
                output.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        output.set_len(len)?;
        Ok(len)
    })?;
    report_converted(len, started);
    Ok(())
}

/// Prints the internal snapshots of `file` as `qemu-img snapshot -l` does (nothing if it
/// has none).
fn list_snapshots(file: &str) -> io::Result<()> {
    let options = format!("driver=file,read-only=on,filename={}", escape(file));
    let snapshots = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = aiocoro_block::open(co, &graph, &options)?;
        aiocoro_block::qcow2::list_snapshots(co, &node)
    })??;
    if !snapshots.is_empty() {
        print!("{}", aiocoro_block::qcow2::snapshot_list(&snapshots));
    }
    Ok(())
}

/// What `convert` writes.
enum Target {
    /// A sparse raw file.
    Raw,
    /// A new qcow2 image made with `options`, its clusters compressed if `compress`.
    Qcow2 { options: CreateOptions, compress: bool },
}

/// Parses `convert`'s arguments: `[-f FMT] -O raw|qcow2 [-c] [-o OPTIONS] FILE OUT`.
fn convert_options(line: &mut CommandLine) -> Result<Command, Stop> {
    let (mut format, mut compress, mut options) = (None, false, CreateOptions::new(0));
    let mut given = Vec::new();
    while let Some(arg) = line.next_arg()? {
        match arg {
            Short('O') => format = Some(line.value()?),
            Short('f') => drop(line.value()?), // The source's format is probed.
            Short('c') => compress = true,
            Short('o') => drop(apply_options(&mut options, &line.value()?)?),
            Short('q' | 'p') => {}
            Value(value) => given.push(value.string()?),
            arg => return Err(arg.unexpected().into()),
        }
    }
    let target = match format.as_deref() {
        Some("raw") if !compress => Target::Raw,
        Some("raw") => return Err("-c needs -O qcow2".into()),
        Some("qcow2") => Target::Qcow2 { options, compress },
        _ => return Err("convert needs -O raw or -O qcow2".into()),
    };
    let [file, out] = operands(given, ["FILE", "OUT"])?;
    Ok(Command::Convert { file, out, target })
}

/// Writes every guest byte of `file` into a new qcow2 image `out` made with `options` (its
/// size is `file`'s, in whole sectors): clusters that read as zeroes stay unallocated, the
/// others are written compressed (the library's compressed writes) with `compress`, as
/// they are without. [`CONVERT_WORKERS`] coroutines copy [`CHUNK`]-byte pieces in parallel
/// (qemu-img convert's `-m 8`), so that clusters compress on several threads at once.
fn convert_to_qcow2(
    file: &str,
    out: &str,
    mut options: CreateOptions,
    compress: bool,
) -> io::Result<()> {
    let started = Instant::now();
    let source = format!("driver={},read-only=on,file.filename={}", probe(file)?, escape(file));
    let target = format!("driver=qcow2,file.filename={}", escape(out));
    let path = std::path::PathBuf::from(out);
    let cluster = options.cluster_size as usize;
    // This thread's context, where the workers run (run_in_coroutine uses it too).
    let ctx = AioContext::new()?;
    let (src, dst) = run_in_coroutine(move |co| {
        let graph = BlockGraph::new();
        let (_, node) = aiocoro_block::open(co, &graph, &source)?;
        let src = BlockBackend::new(node);
        // Whole sectors, as qemu-img sees a raw file (its last partial sector reads zeroes).
        options.size = src.length().next_multiple_of(SECTOR_SIZE);
        aiocoro_block::qcow2::create_file(co, &path, &options)?;
        let (_, node) = aiocoro_block::open(co, &graph, &target)?;
        Ok::<_, io::Error>((src, BlockBackend::new(node)))
    })??;
    let len = dst.length();
    let chunk = CHUNK.max(cluster) as u64;
    let next = Rc::new(Cell::new(0u64));
    let running = Rc::new(Cell::new(CONVERT_WORKERS));
    let failure = Rc::new(Cell::new(None));
    for _ in 0..CONVERT_WORKERS {
        let (src, dst) = (src.clone(), dst.clone());
        let (next, running, failure) = (next.clone(), running.clone(), failure.clone());
        ctx.spawn(move |co| {
            let mut buf = vec![0u8; chunk as usize];
            while next.get() < len {
                let at = next.get();
                next.set(at + chunk);
                let copied = copy_piece(co, (&src, &dst), at, &mut buf, (cluster, compress));
                if let Err(error) = copied {
                    next.set(len);
                    failure.set(Some(failure.take().unwrap_or(error)));
                }
            }
            running.set(running.get() - 1);
        });
    }
    ctx.wait_while(|| running.get() > 0);
    if let Some(error) = failure.take() {
        return Err(error);
    }
    run_in_coroutine(move |co| dst.close(co))??;
    report_converted(len, started);
    Ok(())
}

/// Says on stderr how many bytes `convert` wrote since `started`, and how fast.
fn report_converted(len: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "converted {} in {seconds:.2} s ({:.0} MiB/s)",
        human(len),
        len as f64 / (1 << 20) as f64 / seconds.max(1e-9)
    );
}

/// Copies the piece of up to `buf.len()` bytes at `at` from `src` (zeroes past its end) to
/// `dst`, cluster by cluster of `cluster` bytes: zero clusters skipped, the others written
/// compressed if `compress`.
fn copy_piece(
    co: &Co,
    (src, dst): (&BlockBackend, &BlockBackend),
    at: u64,
    buf: &mut [u8],
    (cluster, compress): (usize, bool),
) -> io::Result<()> {
    let n = (dst.length() - at).min(buf.len() as u64) as usize;
    let inside = src.length().saturating_sub(at).min(n as u64) as usize;
    src.read(co, at, &mut buf[..inside])?;
    buf[inside..n].fill(0);
    for (i, piece) in buf[..n].chunks(cluster).enumerate() {
        if piece.iter().all(|&byte| byte == 0) {
            continue;
        }
        let offset = at + (i * cluster) as u64;
        if compress {
            dst.write_compressed(co, offset, piece)?;
        } else {
            dst.write(co, offset, piece)?;
        }
    }
    Ok(())
}

/// `path` as an option value (commas doubled).
fn escape(path: &str) -> String {
    path.replace(',', ",,")
}

/// The value of an `on|off` option `key` (qemu-img also takes `true|false`).
fn on_off(key: &str, value: &str) -> io::Result<bool> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(invalid_input(format!("{key}={other}: on or off"))),
    }
}

/// A size (as qemu-img reads one) or an error naming the option.
fn size_of(key: &str, value: &str) -> io::Result<u64> {
    parse_size(value, key, 0..=i64::MAX as u64).map_err(invalid_input)
}

/// Applies a `-o` list (`key=value,...`) to `options`; returns whether it gave the size.
fn apply_options(options: &mut CreateOptions, list: &str) -> io::Result<bool> {
    let mut sized = false;
    for entry in list.split(',').filter(|entry| !entry.is_empty()) {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| invalid_input(format!("option '{entry}' has no '=value'")))?;
        match key {
            "cluster_size" => options.cluster_size = size_of(key, value)?,
            "compat" => {
                options.compat = match value {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    other => return Err(invalid_input(format!("compat={other}: 0.10 or 1.1"))),
                }
            }
            "refcount_bits" => {
                options.refcount_bits = value
                    .parse()
                    .map_err(|_| invalid_input(format!("refcount_bits={value}: a number")))?;
            }
            "lazy_refcounts" => options.lazy_refcounts = on_off(key, value)?,
            "extended_l2" => options.extended_l2 = on_off(key, value)?,
            "compression_type" => {
                options.compression = match value {
                    "zlib" => Compression::Deflate,
                    "zstd" => Compression::Zstd,
                    other => {
                        return Err(invalid_input(format!(
                            "compression_type={other}: zlib or zstd"
                        )));
                    }
                }
            }
            "backing_file" => options.backing_file = Some(value.to_owned()),
            "backing_fmt" => options.backing_format = Some(value.to_owned()),
            "size" => {
                options.size = size_of(key, value)?;
                sized = true;
            }
            other => return Err(invalid_input(format!("unknown option '{other}'"))),
        }
    }
    Ok(sized)
}

/// Parses `create`'s arguments into the image path and its options (the size stays 0 if
/// neither given nor known yet: [`create`] takes the backing file's).
fn create_options(line: &mut CommandLine) -> Result<Command, Stop> {
    let mut options = CreateOptions::new(0);
    let mut sized = false;
    let mut given = Vec::new();
    while let Some(arg) = line.next_arg()? {
        match arg {
            Short('f') => match line.value()?.as_str() {
                "qcow2" => {}
                other => return Err(format!("only -f qcow2 is supported, not {other}").into()),
            },
            Short('b') => options.backing_file = Some(line.value()?),
            Short('F') => options.backing_format = Some(line.value()?),
            Short('q') => {}
            Short('o') => sized |= apply_options(&mut options, &line.value()?)?,
            Value(value) if given.len() < 2 => given.push(value.string()?),
            arg => return Err(arg.unexpected().into()),
        }
    }
    if let [_, size] = given.as_slice() {
        options.size = parse_size(size, "image size", 0..=i64::MAX as u64)?;
        sized = true;
        given.pop();
    }
    let [file] = operands(given, ["FILE"])?;
    Ok(Command::Create { file, options, sized })
}

/// Creates the image, taking the size from the backing file if none was given; the size is
/// rounded up to whole sectors, as qemu-img create rounds it.
fn create(file: &str, mut options: CreateOptions, sized: bool) -> io::Result<()> {
    if !sized {
        let Some(backing) = &options.backing_file else {
            return Err(invalid_input("create needs a SIZE (or a backing file to take it from)"));
        };
        let dir = std::path::Path::new(file).parent().unwrap_or(std::path::Path::new(""));
        let path = dir.join(backing);
        let path = path.to_string_lossy().into_owned();
        options.size = with_image(&path, |_, blk, _| Ok(blk.length()))?;
    }
    options.size = options.size.next_multiple_of(SECTOR_SIZE);
    let path = std::path::PathBuf::from(file);
    aiocoro_block::run_in_coroutine(move |co| {
        aiocoro_block::qcow2::create_file(co, &path, &options)
    })?
}

/// Parses `check`'s arguments into the image path, the repair mode and whether the output
/// is JSON.
fn check_options(line: &mut CommandLine) -> Result<Command, Stop> {
    let (mut repair, mut json, mut given) = (Repair::None, false, Vec::new());
    while let Some(arg) = line.next_arg()? {
        match arg {
            Short('r') => {
                repair = match line.value()?.as_str() {
                    "leaks" => Repair::Leaks,
                    "all" => Repair::All,
                    other => return Err(format!("-r {other}: leaks or all").into()),
                }
            }
            Long("output") => {
                json = match line.value()?.as_str() {
                    "human" => false,
                    "json" => true,
                    other => return Err(format!("--output {other}: human or json").into()),
                }
            }
            Short('f') => match line.value()?.as_str() {
                "qcow2" => {}
                other => return Err(format!("only -f qcow2 is checked, not {other}").into()),
            },
            Short('q') => {}
            Value(value) => given.push(value.string()?),
            arg => return Err(arg.unexpected().into()),
        }
    }
    let [file] = operands(given, ["FILE"])?;
    Ok(Command::Check { file, repair, json })
}

/// Checks `file` and prints as `qemu-img check` does; the exit code is qemu-img's.
fn check(file: &str, repair: Repair, json: bool) -> ExitCode {
    let report = match check_image_file(std::path::Path::new(file), repair) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("qcow2: Could not open '{file}': {error}");
            return ExitCode::from(1);
        }
    };
    for message in &report.messages {
        eprintln!("{message}");
    }
    if json {
        print!("{}", report.json(file));
    } else {
        print!("{}", report.human());
    }
    if let Some(failure) = &report.failure {
        eprintln!("qcow2: Check failed: {failure}");
    } else if report.check_errors > 0 {
        eprintln!("qcow2: Check failed");
    }
    ExitCode::from(report.exit_code())
}
