//! L1 and L2 table entries: what a guest cluster maps to, checked against the file.

use super::header::SECTOR_SIZE;
use super::offsets::{Geometry, HostOffset};

/// Bits 9..=55: the host offset of an L2 table or a standard cluster.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 and L2 entry bit 63: the cluster's refcount is exactly one (it may be written in
/// place).
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 of a standard cluster: it reads as zeroes (version 3).
pub(crate) const ZERO: u64 = 1;
/// What a guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not in this image: read the backing node, or zeroes.
    Unallocated,
    /// Reads as zeroes (the version 3 zero flag).
    Zero,
    /// Stored as it is in the host cluster that starts here.
    Data(HostOffset),
    /// Stored deflated: `len` bytes from `offset` (not aligned) hold the compressed data.
    Compressed {
        /// Where the compressed data starts.
        offset: HostOffset,
        /// An upper bound of its length (whole 512-byte sectors past the offset's sector).
        len: u64,
    },
}

/// The L2 table an L1 entry points at, `None` for none.
///
/// # Errors
///
/// A description of what is wrong with the entry (the caller says which entry it is).
pub(crate) fn decode_l1(
    raw: u64,
    geometry: Geometry,
    file_len: u64,
) -> Result<Option<HostOffset>, String> {
    let offset = HostOffset(raw & OFFSET_MASK);
    if offset.0 == 0 {
        return Ok(None);
    }
    if !geometry.is_cluster_aligned(offset) {
        return Err(format!("the L2 table offset {:#x} is not cluster-aligned", offset.0));
    }
    match offset.checked_add(geometry.cluster_size()) {
        Some(end) if end.0 <= file_len => Ok(Some(offset)),
        _ => Err(format!(
            "the L2 table at {:#x} ends past the end of the file ({file_len} bytes)",
            offset.0
        )),
    }
}

/// Where the data of a compressed cluster's L2 entry `raw` starts, and an upper bound of its
/// length (whole 512-byte sectors past the offset's sector), unchecked: the offset takes the
/// low 62 - (cluster_bits - 8) bits, the extra sector count the rest up to bit 61.
pub(crate) fn compressed_extent(raw: u64, geometry: Geometry) -> (HostOffset, u64) {
    let sector_bits = geometry.cluster_bits() - 8;
    let offset_bits = 62 - sector_bits;
    let offset = HostOffset(raw & ((1 << offset_bits) - 1));
    let sectors = ((raw >> offset_bits) & ((1 << sector_bits) - 1)) + 1;
    (offset, sectors * SECTOR_SIZE - (offset.0 % SECTOR_SIZE))
}

/// What an L2 entry maps its guest cluster to, in an image of `version`.
///
/// # Errors
///
/// A description of what is wrong with the entry (the caller says which entry it is).
pub(crate) fn decode_l2(
    raw: u64,
    geometry: Geometry,
    version: u32,
    file_len: u64,
) -> Result<ClusterMapping, String> {
    let cluster_size = geometry.cluster_size();
    if raw & COMPRESSED != 0 {
        let (offset, len) = compressed_extent(raw, geometry);
        if offset.0 > OFFSET_MASK | 0x1ff {
            return Err(format!("the compressed cluster offset {:#x} uses bits past 55", offset.0));
        }
        if offset.0 < cluster_size {
            return Err(format!(
                "the compressed cluster at {:#x} lies in the header cluster",
                offset.0
            ));
        }
        if offset.0 >= file_len {
            return Err(format!(
                "the compressed cluster at {:#x} starts past the end of the file ({file_len} \
                 bytes)",
                offset.0
            ));
        }
        return Ok(ClusterMapping::Compressed { offset, len });
    }
    let offset = HostOffset(raw & OFFSET_MASK);
    if offset.0 != 0 && !geometry.is_cluster_aligned(offset) {
        return Err(format!("the cluster offset {:#x} is not cluster-aligned", offset.0));
    }
    if raw & ZERO != 0 {
        if version < 3 {
            return Err("the zero flag is set in a version 2 image".to_string());
        }
        return Ok(ClusterMapping::Zero);
    }
    if offset.0 == 0 {
        return Ok(ClusterMapping::Unallocated);
    }
    if offset.0 >= file_len {
        return Err(format!(
            "the data cluster at {:#x} starts past the end of the file ({file_len} bytes)",
            offset.0
        ));
    }
    Ok(ClusterMapping::Data(offset))
}

/// The host clusters an L2 entry holds a reference to, as `(offset, bytes)`: a standard
/// cluster (with data or preallocated under the zero flag), or the sectors of a compressed
/// one; `None` for none. A corrupt entry naming an unaligned offset holds none: giving back
/// the cluster around that offset would free a cluster that something else uses.
pub(crate) fn referenced_range(raw: u64, geometry: Geometry) -> Option<(HostOffset, u64)> {
    match decode_l2(raw, geometry, 3, u64::MAX) {
        Ok(ClusterMapping::Compressed { offset, len }) => Some((offset, len)),
        _ => {
            Some((HostOffset(raw & OFFSET_MASK), geometry.cluster_size())).filter(|(offset, _)| {
                raw & COMPRESSED == 0 && offset.0 != 0 && geometry.is_cluster_aligned(*offset)
            })
        }
    }
}

/// Whether an L2 entry maps a data cluster that may be written in place: standard, not
/// zero, allocated, refcount one.
pub(crate) fn is_writable_in_place(raw: u64) -> bool {
    raw & (COPIED | COMPRESSED | ZERO) == COPIED && raw & OFFSET_MASK != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn standard_entries() {
        let g = Geometry::new(16);
        assert_eq!(decode_l2(0, g, 3, MIB), Ok(ClusterMapping::Unallocated));
        assert_eq!(decode_l2(1 << 63, g, 3, MIB), Ok(ClusterMapping::Unallocated));
        assert_eq!(decode_l2(ZERO, g, 3, MIB), Ok(ClusterMapping::Zero));
        assert_eq!(decode_l2(0x30000 | ZERO, g, 3, MIB), Ok(ClusterMapping::Zero));
        assert!(decode_l2(ZERO, g, 2, MIB).unwrap_err().contains("version 2"));
        assert_eq!(
            decode_l2((1 << 63) | 0x30000, g, 3, MIB),
            Ok(ClusterMapping::Data(HostOffset(0x30000)))
        );
        assert!(decode_l2(0x30200, g, 3, MIB).unwrap_err().contains("not cluster-aligned"));
        assert!(decode_l2(MIB, g, 3, MIB).unwrap_err().contains("past the end"));
    }

    #[test]
    fn compressed_entries() {
        let g = Geometry::new(16);
        // 64 KiB clusters: 62 - 8 = 54 offset bits, then 8 bits of extra sectors.
        let raw = COMPRESSED | (3 << 54) | 0x30010;
        assert_eq!(
            decode_l2(raw, g, 3, MIB),
            Ok(ClusterMapping::Compressed { offset: HostOffset(0x30010), len: 4 * 512 - 0x10 })
        );
        assert!(decode_l2(COMPRESSED | 0x100, g, 3, MIB).unwrap_err().contains("header"));
        assert!(decode_l2(COMPRESSED | MIB, g, 3, MIB).unwrap_err().contains("past the end"));
    }

    #[test]
    fn references() {
        let g = Geometry::new(16);
        assert_eq!(referenced_range(0, g), None);
        assert_eq!(referenced_range(ZERO, g), None);
        assert_eq!(referenced_range(COPIED | 0x30000, g), Some((HostOffset(0x30000), 65536)));
        assert_eq!(referenced_range(0x30000 | ZERO, g), Some((HostOffset(0x30000), 65536)));
        assert_eq!(referenced_range(COPIED | 0x30200, g), None, "unaligned");
        assert_eq!(referenced_range(0x30200 | ZERO, g), None, "unaligned");
        let compressed = COMPRESSED | (3 << 54) | 0x30010;
        assert_eq!(referenced_range(compressed, g), Some((HostOffset(0x30010), 4 * 512 - 0x10)));
    }

    #[test]
    fn l1_entries() {
        let g = Geometry::new(16);
        assert_eq!(decode_l1(0, g, MIB), Ok(None));
        assert_eq!(decode_l1((1 << 63) | 0x20000, g, MIB), Ok(Some(HostOffset(0x20000))));
        assert!(decode_l1(0x20200, g, MIB).is_err());
        assert!(decode_l1(MIB - 0x8000, g, MIB).is_err());
        assert!(decode_l1(MIB, g, MIB).is_err());
    }
}
