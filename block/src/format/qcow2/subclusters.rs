//! Extended L2 entries (incompatible feature bit 4, QEMU's subclusters): each L2 entry is
//! followed by a 64-bit bitmap that splits its cluster into 32 subclusters. Bit `n` (0..32)
//! says subcluster `n` is allocated (its data is in the host cluster), bit `32 + n` that it
//! reads as zeroes; neither means unallocated (the backing node shows through). The entry's
//! own zero flag (bit 0) has no meaning then. A compressed cluster has no subclusters: its
//! bitmap is reserved, zero (check reports one that is not, as QEMU does; reads ignore it).

use super::mapping::{COMPRESSED, ClusterMapping, ZERO, decode_l2};
use super::offsets::{Geometry, SUBCLUSTERS};

/// The bitmap of a cluster whose subclusters all read as zeroes.
pub(crate) const ALL_ZERO: u64 = (u32::MAX as u64) << 32;

/// The allocation bits of `bitmap`.
pub(crate) fn allocated(bitmap: u64) -> u32 {
    bitmap as u32
}

/// The "reads as zeroes" bits of `bitmap`.
pub(crate) fn zeroed(bitmap: u64) -> u32 {
    (bitmap >> 32) as u32
}

/// The bitmap with allocation bits `allocated` and zero bits `zeroed`.
pub(crate) fn bitmap(allocated: u32, zeroed: u32) -> u64 {
    u64::from(allocated) | (u64::from(zeroed) << 32)
}

/// The mask of subclusters `first..end` (`end` at most 32).
pub(crate) fn mask(first: u32, end: u32) -> u32 {
    debug_assert!(first < end && end <= SUBCLUSTERS, "qcow2: subcluster mask {first}..{end}");
    (u32::MAX >> (SUBCLUSTERS - (end - first))) << first
}

/// What subcluster `first` of the cluster of extended L2 entry `(entry, bitmap)` maps to, and
/// how many subclusters from it map alike (to the end of the cluster for a compressed one).
/// A data mapping names the host cluster's start.
///
/// # Errors
///
/// A description of what is wrong with the entry: an allocated subcluster that also reads
/// as zeroes, or one without a host cluster, besides what [`decode_l2`] finds.
pub(crate) fn subcluster_run(
    (entry, bitmap): (u64, u64),
    first: u32,
    geometry: Geometry,
    file_len: u64,
) -> Result<(ClusterMapping, u32), String> {
    if entry & COMPRESSED != 0 {
        return Ok((decode_l2(entry, geometry, 3, file_len)?, SUBCLUSTERS - first));
    }
    let cluster = decode_l2(entry & !ZERO, geometry, 3, file_len)?;
    let (allocated, zeroed) = (allocated(bitmap), zeroed(bitmap));
    let kind = |n: u32| -> Result<ClusterMapping, String> {
        match (allocated >> n & 1 != 0, zeroed >> n & 1 != 0) {
            (true, true) => {
                Err(format!("subcluster {n} is both allocated and zero (bitmap {bitmap:#018x})"))
            }
            (true, false) if cluster == ClusterMapping::Unallocated => Err(format!(
                "subcluster {n} is allocated but the entry names no host cluster (bitmap \
                 {bitmap:#018x})"
            )),
            (true, false) => Ok(cluster),
            (false, true) => Ok(ClusterMapping::Zero),
            (false, false) => Ok(ClusterMapping::Unallocated),
        }
    };
    let mapping = kind(first)?;
    let mut end = first + 1;
    while end < SUBCLUSTERS && kind(end)? == mapping {
        end += 1;
    }
    Ok((mapping, end - first))
}

/// Whether the subclusters of `bitmap` say something impossible: allocated and zero at once,
/// or allocated in an entry without a host cluster (`has_host` false).
pub(crate) fn is_invalid(bitmap: u64, has_host: bool) -> bool {
    allocated(bitmap) & zeroed(bitmap) != 0 || (!has_host && allocated(bitmap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::offsets::HostOffset;

    const MIB: u64 = 1 << 20;

    #[test]
    fn masks_and_bits() {
        assert_eq!(mask(0, 32), u32::MAX);
        assert_eq!(mask(0, 1), 1);
        assert_eq!(mask(3, 5), 0b11000);
        assert_eq!(mask(31, 32), 1 << 31);
        assert_eq!(bitmap(0b101, 0b010), 0x0000_0002_0000_0005);
        assert_eq!((allocated(ALL_ZERO), zeroed(ALL_ZERO)), (0, u32::MAX));
        assert!(is_invalid(bitmap(1, 1), true));
        assert!(is_invalid(bitmap(1, 0), false));
        assert!(!is_invalid(bitmap(1, 2), true));
    }

    #[test]
    fn runs_of_subclusters() {
        let g = Geometry::extended(16);
        let data = (1 << 63) | 0x30000;
        let map = bitmap(0b0011_0000, 0b1100);
        let run = |first| subcluster_run((data, map), first, g, MIB);
        assert_eq!(run(0), Ok((ClusterMapping::Unallocated, 2)));
        assert_eq!(run(2), Ok((ClusterMapping::Zero, 2)));
        assert_eq!(run(4), Ok((ClusterMapping::Data(HostOffset(0x30000)), 2)));
        assert_eq!(run(6), Ok((ClusterMapping::Unallocated, 26)));
        assert_eq!(subcluster_run((0, ALL_ZERO), 5, g, MIB), Ok((ClusterMapping::Zero, 27)));
        assert!(subcluster_run((data, bitmap(1, 1)), 0, g, MIB).unwrap_err().contains("both"));
        assert!(subcluster_run((0, 1), 0, g, MIB).unwrap_err().contains("no host cluster"));
        // Reached only past a valid run: the error is found when the run gets there.
        assert!(subcluster_run((data, bitmap(3, 2)), 0, g, MIB).unwrap_err().contains("both"));
    }
}
