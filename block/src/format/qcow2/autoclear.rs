//! Autoclear feature bits (the qcow2 spec's rule for them): a writer that does not
//! understand such a feature must clear its bit before it modifies the image, so that the
//! data the feature describes is known to be stale. This driver understands none of them:
//! bit 0 says the persistent bitmaps are consistent with the data (our writes do not update
//! them), bit 1 that an external data file is raw (external data files are refused).
//! Opened for writing, the image's autoclear bits are therefore cleared first; QEMU then
//! treats the bitmaps as gone and their clusters as leaked (`qemu-img check -r leaks`
//! frees them), instead of trusting bitmaps that miss our writes.

use std::io;

use aiocoro::coroutine::Co;

use super::header::{Header, field};
use super::io::write_at;
use crate::node::BlockNode;

/// Clears the autoclear bits of the image in the writable `file` whose header is `header`,
/// and in `header`; nothing to do for a version 2 image or one without such bits.
///
/// # Errors
///
/// The write or flush error.
pub(crate) fn clear_autoclear_bits(
    co: &Co,
    file: &BlockNode,
    header: &mut Header,
) -> io::Result<()> {
    if header.version < 3 || header.autoclear_features == 0 {
        return Ok(());
    }
    write_at(co, file, field::AUTOCLEAR_FEATURES as u64, &0u64.to_be_bytes())?;
    file.flush(co)?;
    header.autoclear_features = 0;
    Ok(())
}
