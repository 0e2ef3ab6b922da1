//! The on-disk form of the tables of 64-bit entries (the L1 table, L2 tables, the refcount
//! table): big-endian, 8 bytes an entry. Decoded once when a table is read, encoded when it
//! is written.

/// The entries of a table stored as `raw` (a trailing partial entry is ignored).
pub(crate) fn decode_table(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|entry| u64::from_be_bytes(entry.try_into().expect("chunks_exact(8) yields 8 bytes")))
}

/// `table` as it is stored.
pub(crate) fn encode_table(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|entry| entry.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_big_endian_and_round_trip() {
        let table = [0x0102_0304_0506_0708, 0, u64::MAX];
        let raw = encode_table(&table);
        assert_eq!(raw[..8], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_table(&raw).collect::<Vec<_>>(), table);
        assert_eq!(decode_table(&raw[..20]).count(), 2, "a partial entry is no entry");
    }
}
