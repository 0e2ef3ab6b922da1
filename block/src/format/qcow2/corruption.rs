//! The corrupt bit (QEMU's `qcow2_signal_corruption`): when a write finds that guest data
//! or an allocation would land on the image's own metadata (see `overlap`), the image is
//! corrupt and writing on would make it worse. The request fails, the header gets the
//! corrupt bit (version 3; a version 2 header has no feature bits, so only this node
//! remembers), and the node refuses every later write, discard and resize; reads go on. A
//! read-write open of an image with the bit is refused until a check repairs it
//! (`qemu-img check -r all` or [`check`](super::check()) with [`Repair::All`](super::Repair)),
//! which clears the bit.
//!
//! This module and `driver` use each other on purpose: the driver holds the corrupt mark and
//! checks it before each write; marking is a method of the driver (it writes the header and
//! fails the request), kept here beside the mark.

use std::error::Error;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use aiocoro::coroutine::Co;

use super::driver::Qcow2Driver;
use super::header::{INCOMPAT_CORRUPT, field};
use super::io::write_at;

/// The payload of the errors that found metadata where guest data was to go.
#[derive(Debug)]
struct MetadataOverlap(String);

impl fmt::Display for MetadataOverlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for MetadataOverlap {}

/// An `InvalidData` error, prefixed with `qcow2: `, for a write that would have landed on
/// metadata: the driver marks the image corrupt when it meets one.
pub(crate) fn overlap_error(message: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, MetadataOverlap(format!("qcow2: {message}")))
}

/// Whether the node's image was found corrupt (writes are refused).
#[derive(Debug, Default)]
pub(crate) struct CorruptMark(AtomicBool);

impl Qcow2Driver {
    /// Fails if the image was found corrupt while this node had it open.
    ///
    /// # Errors
    ///
    /// `PermissionDenied` naming the rule.
    pub(super) fn refuse_if_corrupt(&self) -> io::Result<()> {
        if self.corrupt.0.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "qcow2: the image was found corrupt and marked so; this node refuses writes \
                 until the image is repaired with check -r all (qemu-img check -r all)",
            ));
        }
        Ok(())
    }

    /// Passes `result` on; if it failed because metadata was in the way, first marks the
    /// image corrupt (once), and says so in the error.
    pub(super) fn mark_corrupt_on_overlap<T>(
        &self,
        co: &Co,
        result: io::Result<T>,
    ) -> io::Result<T> {
        let error = match result {
            Err(error) if error.get_ref().is_some_and(|inner| inner.is::<MetadataOverlap>()) => {
                error
            }
            other => return other,
        };
        if self.corrupt.0.swap(true, Ordering::AcqRel) {
            return Err(error);
        }
        let marked = if self.header.version >= 3 {
            // Under the metadata lock, as every other header write.
            let _meta = self.metadata.lock(co);
            let node = self.file.node();
            let features = self.header.incompatible_features | INCOMPAT_CORRUPT;
            write_at(co, &node, field::INCOMPATIBLE_FEATURES as u64, &features.to_be_bytes())
                .and_then(|()| node.flush(co))
                .map(|()| "the image is now marked corrupt".to_owned())
                .unwrap_or_else(|why| format!("marking the image corrupt failed too: {why}"))
        } else {
            "this node treats the image as corrupt (a version 2 header cannot say so)".to_owned()
        };
        Err(io::Error::new(
            error.kind(),
            format!("{error}; {marked}, and this node refuses further writes"),
        ))
    }
}
