//! Compressed clusters, as the header's compression type says: raw deflate streams (no
//! zlib header, "zlib" in qemu-img) or zstd streams.
//!
//! Deflate data is inflated with a 4 KiB window in mind: QEMU inflates with a 12-bit window
//! (`windowBits = -12`), so a stream that refers further back than 4 KiB does not read in
//! QEMU. [`compress_cluster`] therefore resets the deflate dictionary (a full flush) every
//! 4 KiB of input, which keeps every match distance below the window.
//!
//! zstd data is one or more zstd frames followed by whatever fills the rest of the last
//! sector: decompression stops once the cluster is full (as QEMU's does), so the trailing
//! bytes are never looked at. zstd goes through the `zstd` crate (bindings to the reference
//! C library, libzstd, which QEMU links too): it both decompresses and compresses at
//! libzstd's own levels with exactly QEMU's streaming semantics, where the pure-Rust
//! `ruzstd` compresses only at its fastest level.

use std::sync::{Arc, Mutex, PoisonError};

use miniz_oxide::deflate::core::{
    CompressorOxide, TDEFLFlush, TDEFLStatus, compress, create_comp_flags_from_zip_params,
};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::header::Compression;
use super::offsets::HostOffset;

/// The deflate window QEMU inflates with (`windowBits = -12`).
const DEFLATE_WINDOW: usize = 1 << 12;
/// zlib's default level, as QEMU deflates with.
const DEFLATE_LEVEL: i32 = 6;
/// libzstd's default level (QEMU leaves the level at its default).
const ZSTD_LEVEL: i32 = 0;

/// Decompresses `input` into `out`, which must come out exactly full (one cluster).
/// Trailing input (the rest of the last sector) is ignored.
///
/// # Errors
///
/// A description of why the data does not decompress to a full cluster.
pub(crate) fn decompress_cluster(
    compression: Compression,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match compression {
        Compression::Deflate => inflate_cluster(input, out),
        Compression::Zstd => zstd_decompress_cluster(input, out),
    }
}

/// Compresses one cluster; `None` if the compressed data would not be smaller than the
/// cluster by at least one byte (QEMU then writes the cluster uncompressed).
pub(crate) fn compress_cluster(compression: Compression, cluster: &[u8]) -> Option<Vec<u8>> {
    let limit = cluster.len().checked_sub(1)?;
    match compression {
        Compression::Deflate => deflate_cluster(cluster, limit),
        Compression::Zstd => zstd_compress_cluster(cluster, limit),
    }
}

/// Inflates a raw deflate stream into exactly `out`.
fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<(), String> {
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

/// Deflates `cluster` into at most `limit` bytes of raw deflate, the dictionary reset every
/// [`DEFLATE_WINDOW`] bytes of input.
fn deflate_cluster(cluster: &[u8], limit: usize) -> Option<Vec<u8>> {
    let flags = create_comp_flags_from_zip_params(DEFLATE_LEVEL, -15, 0);
    let mut state = CompressorOxide::new(flags);
    let mut out = vec![0u8; limit];
    let mut written = 0;
    let chunks = cluster.chunks(DEFLATE_WINDOW);
    let last = chunks.len() - 1;
    for (index, mut chunk) in chunks.enumerate() {
        let flush = if index == last { TDEFLFlush::Finish } else { TDEFLFlush::Full };
        loop {
            let (status, read, wrote) = compress(&mut state, chunk, &mut out[written..], flush);
            chunk = &chunk[read..];
            written += wrote;
            match status {
                TDEFLStatus::Done => break,
                TDEFLStatus::Okay if chunk.is_empty() && written < limit => break,
                TDEFLStatus::Okay if written < limit => {}
                // Out of room (or a usage error, which does not happen with these calls).
                _ => return None,
            }
        }
    }
    out.truncate(written);
    Some(out)
}

/// Decompresses zstd frames into exactly `out`, frame after frame until it is full.
fn zstd_decompress_cluster(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let failed = |why: String| {
        format!("the zstd data ({} bytes) does not decompress to a cluster: {why}", input.len())
    };
    let mut decoder = Decoder::new().map_err(|error| failed(error.to_string()))?;
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(out);
    while output.pos() < output.capacity() {
        let (read, wrote) = (input.pos(), output.pos());
        decoder.run(&mut input, &mut output).map_err(|error| failed(error.to_string()))?;
        if input.pos() == read && output.pos() == wrote {
            return Err(failed(format!("it ends after {wrote} bytes")));
        }
    }
    Ok(())
}

/// Compresses `cluster` into one zstd frame of at most `limit` bytes.
fn zstd_compress_cluster(cluster: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut encoder = Encoder::new(ZSTD_LEVEL).ok()?;
    let mut out = vec![0u8; limit];
    let mut input = InBuffer::around(cluster);
    let mut output = OutBuffer::around(&mut out[..]);
    loop {
        let before = (input.pos(), output.pos());
        encoder.run(&mut input, &mut output).ok()?;
        if input.pos() == cluster.len() {
            break;
        }
        if (input.pos(), output.pos()) == before {
            return None;
        }
    }
    loop {
        let written = output.pos();
        let remaining = encoder.finish(&mut output, true).ok()?;
        if remaining == 0 {
            break;
        }
        if output.pos() == written || output.pos() == output.capacity() {
            return None;
        }
    }
    let written = output.pos();
    out.truncate(written);
    Some(out)
}

/// The last cluster decompressed, by the host offset of its compressed data (QEMU kept one
/// such `cluster_cache` too): sequential reads smaller than a cluster decompress it once,
/// not once per read. The lock is held only to swap the entry, never across I/O or a yield.
#[derive(Default)]
pub(crate) struct LastInflated {
    entry: Mutex<Option<(HostOffset, Arc<[u8]>)>>,
}

impl LastInflated {
    /// The cluster whose compressed data starts at `offset`, if it is the one kept.
    pub(crate) fn get(&self, offset: HostOffset) -> Option<Arc<[u8]>> {
        let entry = self.entry.lock().unwrap_or_else(PoisonError::into_inner);
        entry.as_ref().filter(|(at, _)| *at == offset).map(|(_, cluster)| cluster.clone())
    }

    /// Keeps `cluster`, decompressed from data at `offset`.
    pub(crate) fn put(&self, offset: HostOffset, cluster: Arc<[u8]>) {
        *self.entry.lock().unwrap_or_else(PoisonError::into_inner) = Some((offset, cluster));
    }

    /// Forgets the kept cluster if its data started at `offset` (that data was freed and
    /// the bytes may be reused).
    pub(crate) fn forget(&self, offset: HostOffset) {
        let mut entry = self.entry.lock().unwrap_or_else(PoisonError::into_inner);
        if entry.as_ref().is_some_and(|(at, _)| *at == offset) {
            *entry = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster that compresses, with repeats both nearer and further than 4 KiB.
    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i % 251) ^ (i / 5000 % 7)) as u8).collect()
    }

    #[test]
    fn inflates_a_raw_deflate_stream_and_refuses_garbage() {
        let cluster = sample(4096);
        let mut packed = miniz_oxide::deflate::compress_to_vec(&cluster, 6);
        packed.extend_from_slice(&[0xee; 100]); // the rest of the sector
        let mut out = vec![0u8; 4096];
        decompress_cluster(Compression::Deflate, &packed, &mut out).unwrap();
        assert_eq!(out, cluster);
        let mut short = vec![0u8; 8192];
        assert!(decompress_cluster(Compression::Deflate, &packed, &mut short).is_err());
        assert!(decompress_cluster(Compression::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress_cluster(Compression::Deflate, &[], &mut out).is_err());
    }

    #[test]
    fn both_compressions_round_trip_with_trailing_bytes() {
        for compression in [Compression::Deflate, Compression::Zstd] {
            for len in [512, 4096, 65536, 2 << 20] {
                let cluster = sample(len);
                let mut packed = compress_cluster(compression, &cluster)
                    .unwrap_or_else(|| panic!("{compression:?} {len}: compresses"));
                assert!(packed.len() < len, "{compression:?} {len}: smaller");
                packed.extend_from_slice(&[0x5a; 300]);
                let mut out = vec![0u8; len];
                decompress_cluster(compression, &packed, &mut out).unwrap();
                assert!(out == cluster, "{compression:?} {len}: the same bytes back");
            }
        }
    }

    #[test]
    fn deflate_matches_stay_inside_qemus_4k_window() {
        // Random bytes, each repeated four times, the whole pattern again every 8196 bytes:
        // the best matches reach back 8196 bytes, past QEMU's window. Decoding into a ring
        // buffer of exactly 4 KiB fails on any distance beyond it.
        let mut seed = 0x1234_5678_u32;
        let pattern: Vec<u8> = (0..2049)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        let cluster: Vec<u8> = (0..65536).map(|i| pattern[(i / 4) % pattern.len()]).collect();
        let packed = compress_cluster(Compression::Deflate, &cluster).expect("compresses");
        let mut ring = vec![0u8; DEFLATE_WINDOW];
        let mut state = DecompressorOxide::new();
        let (mut read, mut produced) = (0, Vec::new());
        let mut at = 0;
        loop {
            let (status, r, w) = decompress(&mut state, &packed[read..], &mut ring, at, 0);
            read += r;
            produced.extend_from_slice(&ring[at..at + w]);
            at = (at + w) % DEFLATE_WINDOW;
            match status {
                TINFLStatus::Done => break,
                TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput => {}
                other => panic!("a 4 KiB window cannot inflate it: {other:?}"),
            }
        }
        assert!(produced == cluster);
    }

    #[test]
    fn incompressible_clusters_are_left_alone() {
        let mut seed = 7u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert_eq!(compress_cluster(Compression::Deflate, &noise), None);
        assert_eq!(compress_cluster(Compression::Zstd, &noise), None);
    }

    #[test]
    fn zstd_refuses_garbage_and_short_data() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(Compression::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress_cluster(Compression::Zstd, &[], &mut out).is_err());
        let packed = compress_cluster(Compression::Zstd, &sample(2048)).unwrap();
        assert!(decompress_cluster(Compression::Zstd, &packed, &mut out).is_err());
    }
}
