//! Node options in QEMU's `--image-opts` spelling (`driver=raw,file.filename=disk.img`), and
//! opening a tree of nodes from them.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aiocoro::coroutine::Co;

use crate::block_graph::BlockGraph;
use crate::child::{ChildLabel, ChildRole};
use crate::error::invalid_input;
use crate::format::{RawDriver, RawOptions};
use crate::graph::NodeId;
use crate::node::BlockNode;
use crate::qcow2::{CacheSizes, Header, Qcow2Driver, resolve_backing};
use crate::size::{SizeErrorKind, parse_size};
use crate::storage::{
    AioMode, CacheMode, FileDriver, FileOptions, Locking, NullDriver, NullOptions,
};

/// The longest backing chain opened (a loop of backing names ends here, not in a stack
/// overflow).
const MAX_BACKING_DEPTH: usize = 32;

/// Options that a child takes from its parent unless it sets them itself (QEMU inherits
/// these down the graph).
const INHERITED: [&str; 3] = ["read-only", "cache.direct", "aio"];

/// Parsed `key=value` options; dotted keys (`file.filename`) belong to a child.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    values: BTreeMap<String, String>,
}

impl BlockOptions {
    /// Parses `key=value,key=value` (a value may hold a comma written as `,,`).
    ///
    /// # Errors
    ///
    /// An entry without `=`, or a key given twice.
    pub fn parse(text: &str) -> io::Result<BlockOptions> {
        let mut options = BlockOptions::default();
        for entry in split_entries(text) {
            let Some((key, value)) = entry.split_once('=') else {
                return Err(invalid_input(format!("option '{entry}' has no '=value'")));
            };
            options.set(key, value)?;
        }
        Ok(options)
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    ///
    /// If `key` is already set.
    pub fn set(&mut self, key: &str, value: &str) -> io::Result<()> {
        if self.values.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(invalid_input(format!("option '{key}' is given twice")));
        }
        Ok(())
    }

    /// Sets `key` to `value` unless it is set.
    pub fn set_default(&mut self, key: &str, value: &str) {
        self.values.entry(key.to_owned()).or_insert_with(|| value.to_owned());
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The options under `prefix.`, without the prefix, plus the inherited ones.
    fn child(&self, prefix: &str) -> BlockOptions {
        let dotted = format!("{prefix}.");
        let mut child = BlockOptions {
            values: self
                .values
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&dotted)?.to_owned(), v.clone())))
                .collect(),
        };
        for key in INHERITED {
            if let Some(value) = self.get(key) {
                child.set_default(key, value);
            }
        }
        child
    }

    fn has_child(&self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        self.values.keys().any(|key| key.starts_with(&dotted))
    }
}

/// Splits on commas, where `,,` stands for a comma inside a value.
fn split_entries(text: &str) -> Vec<String> {
    let mut entries = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                entries.last_mut().expect("never empty").push(',');
            }
            ',' => entries.push(String::new()),
            c => entries.last_mut().expect("never empty").push(c),
        }
    }
    entries.retain(|entry| !entry.is_empty());
    entries
}

/// Reads the options one driver takes, and says which keys nobody took.
struct Taker<'a> {
    driver: &'a str,
    options: &'a BlockOptions,
    taken: Vec<&'a str>,
}

impl<'a> Taker<'a> {
    fn new(driver: &'a str, options: &'a BlockOptions) -> Self {
        Taker { driver, options, taken: vec!["driver", "node-name"] }
    }

    fn text(&mut self, key: &'a str) -> Option<&'a str> {
        self.taken.push(key);
        self.options.get(key)
    }

    fn flag(&mut self, key: &'a str, default: bool) -> io::Result<bool> {
        match self.text(key) {
            None => Ok(default),
            Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(other) => Err(invalid_input(format!("option '{key}': '{other}' is not on/off"))),
        }
    }

    fn size(&mut self, key: &'a str) -> io::Result<Option<u64>> {
        let Some(value) = self.text(key) else { return Ok(None) };
        // QEMU's block layer keeps sizes and offsets in an `int64_t`.
        match parse_size(value) {
            Ok(bytes) if bytes <= i64::MAX as u64 => Ok(Some(bytes)),
            Err(error) if error.kind() == SizeErrorKind::Malformed => {
                Err(self.bad(key, &error.to_string()))
            }
            _ => Err(self.bad(
                key,
                &format!("'{value}' is out of range: must be between 0 and {}", i64::MAX),
            )),
        }
    }

    fn bad(&self, key: &str, why: &str) -> io::Error {
        invalid_input(format!("driver '{}', option '{key}': {why}", self.driver))
    }

    /// Refuses keys no one took (a child's keys count as taken when the child is named).
    fn finish(&self, children: &[&str]) -> io::Result<()> {
        let dotted: Vec<String> = children.iter().map(|child| format!("{child}.")).collect();
        for key in self.options.values.keys() {
            let in_child = dotted.iter().any(|dotted| key.starts_with(dotted.as_str()));
            if !in_child
                && !self.taken.contains(&key.as_str())
                && !INHERITED.contains(&key.as_str())
            {
                return Err(invalid_input(format!(
                    "driver '{}' has no option '{key}'",
                    self.driver
                )));
            }
        }
        Ok(())
    }
}

/// Opens the node tree `options` describe (children first) into `graph`; returns the top
/// node. Options in QEMU's spelling:
///
/// - `driver=null-co` (or `null`): `size` (default 1G), `read-zeroes` (on/off, default off),
///   `latency-ns`;
/// - `driver=file`: `filename`, `cache.direct` (on = `O_DIRECT`) or `cache=none|writeback`,
///   `aio=io_uring|threads`, `locking=auto|on|off` (QEMU's image locks, default auto: see
///   [`crate::storage::Locking`]; a format's file takes it as `file.locking=off`);
/// - `driver=raw`: `offset`, `size`, and its child as `file.*` (`file.driver` defaults to
///   `file`), or `file=<filename>`;
/// - `driver=qcow2`: its child as `file.*` or `file=` (as raw; read-write unless the node is
///   read-only, in which case writes are refused), and its
///   backing node from the image header (a relative name is relative to the image's
///   directory; the format from the header, else probed) unless `backing.*` options give it
///   (opened read-only); `l2-cache-size` (bytes of L2 tables cached, default 32M) and
///   `refcount-cache-size` (bytes of refcount blocks cached, default 1M);
/// - every node: `node-name`, `read-only` (inherited by children, as are `cache.direct` and
///   `aio`).
///
/// # Errors
///
/// An unknown driver or option, a bad value, or the driver's open error, each saying which.
pub fn open(co: &Co, graph: &BlockGraph, options: &str) -> io::Result<(NodeId, Arc<BlockNode>)> {
    open_options(co, graph, &BlockOptions::parse(options)?)
}

/// [`open`] from parsed options.
///
/// # Errors
///
/// As [`open`].
pub fn open_options(
    co: &Co,
    graph: &BlockGraph,
    options: &BlockOptions,
) -> io::Result<(NodeId, Arc<BlockNode>)> {
    open_at_depth(co, graph, options, 0)
}

/// [`open_options`] for a node `depth` backing links below the top.
fn open_at_depth(
    co: &Co,
    graph: &BlockGraph,
    options: &BlockOptions,
    depth: usize,
) -> io::Result<(NodeId, Arc<BlockNode>)> {
    let Some(driver) = options.get("driver") else {
        return Err(invalid_input("no 'driver' option (e.g. driver=file,filename=disk.img)"));
    };
    let name = options.get("node-name").map_or_else(auto_node_name, str::to_owned);
    let mut taker = Taker::new(driver, options);
    let read_only = taker.flag("read-only", false)?;
    match driver {
        "null-co" | "null" => {
            let defaults = NullOptions::default();
            let null = NullOptions {
                size: taker.size("size")?.unwrap_or(defaults.size),
                read_zeroes: taker.flag("read-zeroes", defaults.read_zeroes)?,
                latency: Duration::from_nanos(taker.size("latency-ns")?.unwrap_or(0)),
            };
            taker.finish(&[])?;
            let node = BlockNode::new(co, name, NullDriver::new(null), read_only)?;
            graph.add_node_with(|_| Ok(node))
        }
        "file" => {
            let Some(filename) = taker.text("filename") else {
                return Err(taker.bad("filename", "missing"));
            };
            let direct = match (taker.flag("cache.direct", false)?, taker.text("cache")) {
                (direct, None) => direct,
                (_, Some("none")) => true,
                (_, Some("writeback")) => false,
                (_, Some(other @ ("writethrough" | "directsync" | "unsafe"))) => {
                    let why = format!("mode '{other}' is not supported (writeback or none)");
                    return Err(taker.bad("cache", &why));
                }
                (_, Some(other)) => {
                    return Err(taker.bad("cache", &format!("unknown mode '{other}'")));
                }
            };
            let aio = match taker.text("aio") {
                None | Some("io_uring") => AioMode::IoUring,
                Some("threads") => AioMode::Threads,
                Some(other) => return Err(taker.bad("aio", &format!("unknown mode '{other}'"))),
            };
            let locking = match taker.text("locking") {
                None | Some("auto") => Locking::Auto,
                Some("on") => Locking::On,
                Some("off") => Locking::Off,
                Some(other) => {
                    let why = format!("unknown mode '{other}' (auto, on or off)");
                    return Err(taker.bad("locking", &why));
                }
            };
            taker.finish(&[])?;
            let file = FileOptions {
                filename: filename.into(),
                cache: if direct { CacheMode::None } else { CacheMode::Writeback },
                aio,
                read_only,
                locking,
            };
            let node = BlockNode::new(co, name, FileDriver::open(&file)?, read_only)?;
            graph.add_node_with(|_| Ok(node))
        }
        "raw" => {
            let raw = RawOptions {
                offset: taker.size("offset")?.unwrap_or(0),
                size: taker.size("size")?,
            };
            let (child_id, _) = open_child(co, graph, options, &mut taker, false)?;
            taker.finish(&["file"])?;
            let (id, node) = graph.add_node_with(|edges| {
                // Without a window, raw shows its file as it is: a filter (as in QEMU).
                let label = match raw {
                    RawOptions { offset: 0, size: None } => ChildLabel::filtered_file(),
                    _ => ChildLabel::new("file", ChildRole::DATA | ChildRole::PRIMARY),
                };
                let file = edges.attach(label, child_id)?;
                BlockNode::new(co, name, RawDriver::new(file, raw)?, read_only)
            })?;
            Ok((id, node))
        }
        "qcow2" => {
            let defaults = CacheSizes::default();
            let caches = CacheSizes {
                l2_bytes: taker.size("l2-cache-size")?.unwrap_or(defaults.l2_bytes),
                refcount_bytes: taker
                    .size("refcount-cache-size")?
                    .unwrap_or(defaults.refcount_bytes),
            };
            let (file_id, file) = open_child(co, graph, options, &mut taker, read_only)?;
            taker.finish(&["file", "backing"])?;
            let filename = options.get("file").or(options.get("file.filename"));
            let context = |error: io::Error| {
                let image = filename.unwrap_or(file.name());
                io::Error::new(error.kind(), format!("{image}: {error}"))
            };
            let header = Header::read(co, &file).map_err(context)?;
            let backing = if options.has_child("backing") {
                Some(read_only_child(options, "backing"))
            } else {
                let spec = resolve_backing(&header, filename.map(std::path::Path::new));
                spec.map_err(context)?.map(|spec| {
                    let mut backing = read_only_child(options, "backing");
                    backing.set_default("driver", spec.format);
                    backing.set_default("file.filename", &spec.path.to_string_lossy());
                    backing
                })
            };
            let backing_id = match backing {
                Some(_) if depth >= MAX_BACKING_DEPTH => {
                    return Err(context(invalid_input(format!(
                        "qcow2: the backing chain is deeper than {MAX_BACKING_DEPTH} images \
                         (does it loop?)"
                    ))));
                }
                Some(backing) => Some(open_at_depth(co, graph, &backing, depth + 1)?.0),
                None => None,
            };
            let (id, node) = graph.add_node_with(|edges| {
                let file = edges.attach(ChildLabel::image_file(), file_id)?;
                let backing =
                    backing_id.map(|id| edges.attach(ChildLabel::backing(), id)).transpose()?;
                let driver =
                    Qcow2Driver::open(co, file, backing, header, caches).map_err(context)?;
                BlockNode::new(co, name, driver, read_only)
            })?;
            Ok((id, node))
        }
        other => Err(invalid_input(format!(
            "unknown driver '{other}' (known: file, raw, qcow2, null-co)"
        ))),
    }
}

/// The options of child `prefix`, with `read-only=on` whatever the parent says.
fn read_only_child(options: &BlockOptions, prefix: &str) -> BlockOptions {
    let mut child = options.child(prefix);
    child.values.insert("read-only".to_owned(), "on".to_owned());
    child
}

/// Opens a format's `file` child: from `file.*` options, or a filename in `file=`.
fn open_child<'a>(
    co: &Co,
    graph: &BlockGraph,
    options: &'a BlockOptions,
    taker: &mut Taker<'a>,
    read_only: bool,
) -> io::Result<(NodeId, Arc<BlockNode>)> {
    let mut child =
        if read_only { read_only_child(options, "file") } else { options.child("file") };
    if let Some(filename) = taker.text("file") {
        child.set("filename", filename)?;
    }
    if !options.has_child("file") && child.get("filename").is_none() {
        return Err(taker.bad("file", "missing (give file=<filename> or file.filename=...)"));
    }
    child.set_default("driver", "file");
    open_options(co, graph, &child)
}

/// A name for a node that was given none, unique in the process (QEMU's `#blockNNN`).
fn auto_node_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("#block{:03}", NEXT.fetch_add(1, Ordering::Relaxed))
}
