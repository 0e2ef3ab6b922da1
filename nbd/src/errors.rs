//! How a block-layer error becomes the error value of an NBD reply.

use std::io;

use crate::wire;

/// The NBD error value for `error`: `EPERM` for a write the node refuses, `EINVAL` for a
/// request the block layer finds invalid, `ENOSPC` when the storage is full, `EIO` for
/// everything else (the protocol has no finer values for a client to act on).
pub fn nbd_errno(error: &io::Error) -> u32 {
    match error.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => wire::EPERM,
        io::ErrorKind::InvalidInput => wire::EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            wire::ENOSPC
        }
        _ => wire::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_nbd_values() {
        let of = |kind: io::ErrorKind| nbd_errno(&io::Error::from(kind));
        assert_eq!(of(io::ErrorKind::PermissionDenied), wire::EPERM);
        assert_eq!(of(io::ErrorKind::InvalidInput), wire::EINVAL);
        assert_eq!(nbd_errno(&io::Error::from_raw_os_error(libc::ENOSPC)), wire::ENOSPC);
        assert_eq!(of(io::ErrorKind::Other), wire::EIO);
        assert_eq!(nbd_errno(&io::Error::from_raw_os_error(libc::EIO)), wire::EIO);
    }
}
