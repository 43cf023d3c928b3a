//! The resume sidecar: a small append-only record of the verified chunks of a partial file.
//!
//! The receiver writes the sidecar next to the partial file; the driver performs the I/O, this
//! module only defines the bytes. A sidecar is a 64-byte header bound to the manifest entry
//! (size, mtime, chunk size) followed by 40-byte records `index | chunk hash | check`, where
//! `check` guards each record against corruption and tampering. A torn last record (a crash in
//! the middle of an append) is ignored; any other damage, or a header for another version of the
//! file, makes the whole sidecar unusable and the file restarts from zero.
//!
//! Records only say what the receiver once verified. Before claiming them, the driver re-hashes
//! the partial file's bytes for each record and drops records the data no longer matches.

use std::collections::BTreeMap;

use flux_wire::{Entry, Hash};

use crate::manifest::chunks_for;

/// Length of the header.
pub const HEADER_LEN: usize = 64;
/// Length of one record.
pub const RECORD_LEN: usize = 40;
const MAGIC: &[u8; 8] = b"THRUPART";
const VERSION: u8 = 1;

/// Why a sidecar cannot be used.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// Not a sidecar, or a damaged header.
    #[error("not a valid resume sidecar")]
    Corrupt,
    /// The sidecar belongs to another version of the file (size, mtime or chunk size differ).
    #[error("resume sidecar describes another version of the file")]
    Stale,
    /// A record failed its check or names a chunk outside the file.
    #[error("resume sidecar record {0} is damaged")]
    BadRecord(usize),
}

/// The header for a partial file of `entry` cut in `chunk_size` chunks.
pub fn header(entry: &Entry, chunk_size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = VERSION;
    h[9..17].copy_from_slice(&entry.size.to_le_bytes());
    h[17..25].copy_from_slice(&entry.mtime.secs.to_le_bytes());
    h[25..29].copy_from_slice(&entry.mtime.nanos.to_le_bytes());
    h[29..33].copy_from_slice(&chunk_size.to_le_bytes());
    let check = blake3::hash(&h[..48]);
    h[48..].copy_from_slice(&check.as_bytes()[..16]);
    h
}

/// One record: chunk `index` was verified with `hash`.
pub fn record(index: u32, hash: &Hash) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..4].copy_from_slice(&index.to_le_bytes());
    r[4..36].copy_from_slice(hash);
    let check = record_check(&r[..36]);
    r[36..].copy_from_slice(&check);
    r
}

/// Parses a sidecar for `entry`, returning the verified chunks it records (the last record for
/// an index wins).
pub fn parse(
    bytes: &[u8],
    entry: &Entry,
    chunk_size: u32,
) -> Result<BTreeMap<u32, Hash>, SidecarError> {
    let head = bytes.get(..HEADER_LEN).ok_or(SidecarError::Corrupt)?;
    if &head[..8] != MAGIC
        || head[8] != VERSION
        || blake3::hash(&head[..48]).as_bytes()[..16] != head[48..]
    {
        return Err(SidecarError::Corrupt);
    }
    if head != header(entry, chunk_size) {
        return Err(SidecarError::Stale);
    }
    let chunks = chunks_for(entry.size, chunk_size);
    let mut out = BTreeMap::new();
    // A trailing partial record is a torn append: ignore it.
    for (n, r) in bytes[HEADER_LEN..].chunks_exact(RECORD_LEN).enumerate() {
        if record_check(&r[..36]) != r[36..] {
            return Err(SidecarError::BadRecord(n));
        }
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&r[..4]);
        let index = u32::from_le_bytes(idx);
        if index >= chunks {
            return Err(SidecarError::BadRecord(n));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&r[4..36]);
        out.insert(index, hash);
    }
    Ok(out)
}

fn record_check(body: &[u8]) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(b"thruflux sidecar record");
    h.update(body);
    let mut c = [0u8; 4];
    c.copy_from_slice(&h.finalize().as_bytes()[..4]);
    c
}

#[cfg(test)]
mod tests {
    use flux_wire::{EntryKind, Timestamp};

    use super::*;

    fn entry() -> Entry {
        Entry {
            path: "f".into(),
            kind: EntryKind::File,
            size: 10 * 65536,
            mtime: Timestamp { secs: 5, nanos: 6 },
            mode: 0o644,
            link_target: String::new(),
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let e = entry();
        let mut b = header(&e, 65536).to_vec();
        b.extend_from_slice(&record(3, &[7; 32]));
        b.extend_from_slice(&record(9, &[8; 32]));
        b.extend_from_slice(&record(3, &[9; 32]));
        b.extend_from_slice(&record(4, &[1; 32])[..17]);
        let got = parse(&b, &e, 65536).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&3], [9; 32]);
        assert_eq!(got[&9], [8; 32]);
    }

    #[test]
    fn stale_tampered_and_foreign_sidecars_are_refused() {
        let e = entry();
        let mut b = header(&e, 65536).to_vec();
        b.extend_from_slice(&record(3, &[7; 32]));
        let changed = Entry {
            mtime: Timestamp { secs: 6, nanos: 6 },
            ..entry()
        };
        assert_eq!(parse(&b, &changed, 65536), Err(SidecarError::Stale));
        assert_eq!(parse(&b, &e, 131072), Err(SidecarError::Stale));
        let mut tampered = b.clone();
        tampered[HEADER_LEN + 10] ^= 1;
        assert_eq!(parse(&tampered, &e, 65536), Err(SidecarError::BadRecord(0)));
        let mut bad_head = b.clone();
        bad_head[12] ^= 1;
        assert_eq!(parse(&bad_head, &e, 65536), Err(SidecarError::Corrupt));
        assert_eq!(parse(b"hello", &e, 65536), Err(SidecarError::Corrupt));
        let mut beyond = header(&e, 65536).to_vec();
        beyond.extend_from_slice(&record(10, &[7; 32]));
        assert_eq!(parse(&beyond, &e, 65536), Err(SidecarError::BadRecord(0)));
    }
}
