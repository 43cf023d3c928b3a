//! Free space at the destination, compared with what an offer still needs before it is
//! accepted.

use std::collections::HashMap;
use std::path::Path;

use flux_transfer::{LocalFile, Manifest};

/// Bytes an offer still needs at the destination: its total, minus what resume and
/// skip-identical will not fetch. A file replaced with `--force` counts whole: the new copy is
/// written beside the old one before it replaces it.
pub fn still_needed(manifest: &Manifest, local: &HashMap<u32, LocalFile>) -> u64 {
    let held: u64 = local
        .iter()
        .map(|(&i, l)| match l {
            LocalFile::Partial(chunks) => chunks
                .keys()
                .filter_map(|&c| manifest.chunk_span(i, c))
                .map(|(_, len)| u64::from(len))
                .sum(),
            LocalFile::Existing(_) => manifest.entry(i).map_or(0, |e| e.size),
            LocalFile::Conflict => 0,
        })
        .sum();
    manifest.total_bytes().saturating_sub(held)
}

/// Bytes this user may still write on the filesystem holding `dir` (`statvfs`: available
/// blocks × fragment size).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Not enough free space for an offer.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error(
    "the files need {needed} bytes ({}) at {dir} but only {free} bytes ({}) are free; free some \
     space or choose another --out",
    indicatif::HumanBytes(*.needed),
    indicatif::HumanBytes(*.free)
)]
pub struct Short {
    /// Bytes still needed.
    pub needed: u64,
    /// Bytes free.
    pub free: u64,
    /// The destination, for the message.
    pub dir: String,
}

/// Whether an offer needing `needed` bytes fits in `free`: `Ok(None)` if it does, `Ok(Some)`
/// with a warning when it does not but `yes` accepts regardless, `Err` (refuse) otherwise.
pub fn decide(needed: u64, free: u64, dir: &Path, yes: bool) -> Result<Option<Short>, Short> {
    if needed <= free {
        return Ok(None);
    }
    let short = Short {
        needed,
        free,
        dir: crate::ui::safe_name(&dir.display().to_string()),
    };
    if yes { Ok(Some(short)) } else { Err(short) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flux_wire::{Entry, EntryKind, Timestamp};

    use super::*;

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size,
            mtime: Timestamp::default(),
            mode: 0o644,
            link_target: String::new(),
        }
    }

    #[test]
    fn held_bytes_are_not_needed_again() {
        let m = Manifest::new(
            vec![file("a", 3 * 65536 + 5), file("b", 1000), file("c", 7)],
            65536,
        )
        .unwrap();
        assert_eq!(still_needed(&m, &HashMap::new()), m.total_bytes());
        let local = HashMap::from([
            // Chunks 0 and 3 of `a`: 65536 + 5 bytes held.
            (
                0,
                LocalFile::Partial(BTreeMap::from([(0, [0; 32]), (3, [0; 32])])),
            ),
            (1, LocalFile::Existing(vec![[0; 32]])),
            (2, LocalFile::Conflict),
        ]);
        assert_eq!(still_needed(&m, &local), 2 * 65536 + 7);
    }

    #[test]
    fn short_space_refuses_or_warns_naming_both_numbers() {
        let dir = Path::new("/dest");
        assert_eq!(decide(10, 10, dir, false), Ok(None));
        let err = decide(3 << 30, 1 << 20, dir, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&(3u64 << 30).to_string()) && msg.contains(&(1u64 << 20).to_string()),
            "{msg}"
        );
        assert!(msg.contains("3.00 GiB") && msg.contains("/dest"), "{msg}");
        assert_eq!(decide(3 << 30, 1 << 20, dir, true), Ok(Some(err)));
    }

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
