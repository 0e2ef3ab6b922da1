//! Compressed clusters: raw deflate streams (no zlib header), as `qemu-img convert -c`
//! writes them.

use std::sync::{Arc, Mutex, PoisonError};

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

/// Inflates `input` into `out`, which must come out exactly full (one cluster). Trailing
/// input (the rest of the last sector) is ignored.
///
/// # Errors
///
/// A description of why the data does not inflate to a full cluster.
pub(crate) fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut state = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    let failed = matches!(
        status,
        TINFLStatus::Failed
            | TINFLStatus::FailedCannotMakeProgress
            | TINFLStatus::BadParam
            | TINFLStatus::Adler32Mismatch
    );
    if failed || written != out.len() {
        return Err(format!(
            "the compressed data ({} bytes) inflates to {written} of the {} bytes of a \
             cluster ({status:?})",
            input.len(),
            out.len()
        ));
    }
    Ok(())
}

/// The last cluster inflated, by the host offset of its compressed data (QEMU kept one such
/// `cluster_cache` too): sequential reads smaller than a cluster inflate it once, not once
/// per read. The lock is held only to swap the entry, never across I/O or a yield.
#[derive(Default)]
pub(crate) struct LastInflated {
    entry: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl LastInflated {
    /// The cluster whose compressed data starts at `offset`, if it is the one kept.
    pub(crate) fn get(&self, offset: u64) -> Option<Arc<[u8]>> {
        let entry = self.entry.lock().unwrap_or_else(PoisonError::into_inner);
        entry.as_ref().filter(|(at, _)| *at == offset).map(|(_, cluster)| cluster.clone())
    }

    /// Keeps `cluster`, inflated from data at `offset`.
    pub(crate) fn put(&self, offset: u64, cluster: Arc<[u8]>) {
        *self.entry.lock().unwrap_or_else(PoisonError::into_inner) = Some((offset, cluster));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflates_a_raw_deflate_stream_and_refuses_garbage() {
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut packed = miniz_oxide::deflate::compress_to_vec(&cluster, 6);
        packed.extend_from_slice(&[0xee; 100]); // the rest of the sector
        let mut out = vec![0u8; 4096];
        inflate_cluster(&packed, &mut out).unwrap();
        assert_eq!(out, cluster);
        let mut short = vec![0u8; 8192];
        assert!(inflate_cluster(&packed, &mut short).is_err());
        assert!(inflate_cluster(&[0xff; 64], &mut out).is_err());
        assert!(inflate_cluster(&[], &mut out).is_err());
    }
}
