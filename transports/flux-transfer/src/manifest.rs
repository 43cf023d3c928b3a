//! The manifest: every entry of a share, with the chunk geometry both sides derive from it.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;

use flux_wire::{Entry, EntryKind, MAX_FRAME_BODY, Message};

use crate::path::{self, PathError};

/// Smallest chunk size accepted (and the alignment every chunk size must have, so that chunks
/// are O_DIRECT-aligned on any filesystem).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Chunk sizes must be a multiple of this.
pub const CHUNK_ALIGN: u32 = 4096;

/// Memory an [`Assembler`] counts for one entry, besides the bytes of its path and link target:
/// the entry record itself, twice (a growing list may hold up to double its length).
///
/// Every entry also costs at least its encoded size on the wire (path, link target and under
/// 40 bytes of fields), so the memory limit caps the manifest's bytes on the wire as well.
pub const ENTRY_COST: u64 = 192;
/// Memory an [`Assembler`] counts for one distinct path component (a node of its index of
/// paths), besides the bytes of the component's name: the node's slot in a hash table that may
/// be at half its capacity or growing, and its kind.
///
/// Every prefix of every path is stored once, as one node naming one component, so the index
/// costs at most `NODE_COST` per component plus the path bytes, never depth × length.
pub const NODE_COST: u64 = 128;
/// Default of [`Limits::max_manifest_memory`]: 512 MiB, enough for [`DEFAULT_MAX_ENTRIES`]
/// entries whose paths average over 100 bytes.
pub const DEFAULT_MAX_MANIFEST_MEMORY: u64 = 512 << 20;
/// Default of [`Limits::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// Limits a receiver applies to a manifest before allocating for it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most entries accepted.
    pub max_entries: u64,
    /// Largest share accepted, in bytes.
    pub max_total_bytes: u64,
    /// Most memory the manifest may cost while it is assembled and held, counted by this rule:
    /// each entry costs [`ENTRY_COST`] plus the bytes of its path and link target, and each
    /// distinct path prefix costs [`NODE_COST`] plus the bytes of its last component. An entry
    /// that would take the count over this limit is refused with
    /// [`ManifestError::TooMuchMemory`] before anything is allocated for it.
    pub max_manifest_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            // 1 PiB: far above any real share, far below overflow in offset arithmetic.
            max_total_bytes: 1 << 50,
            max_manifest_memory: DEFAULT_MAX_MANIFEST_MEMORY,
        }
    }
}

/// Why a manifest was refused. Each variant names the entry concerned.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// An unsafe or malformed path.
    #[error("entry {path:?}: {source}")]
    Path {
        /// The path, as received (print it with [`path::Escaped`]).
        path: String,
        /// What is wrong with it.
        source: PathError,
    },
    /// The same path twice, or a file and a directory at one path.
    #[error("entry {0:?} appears more than once")]
    Duplicate(String),
    /// An entry below a path that is a file or link.
    #[error("entry {0:?} lies below a file or link")]
    ParentNotDir(String),
    /// More entries than allowed.
    #[error("manifest claims {claimed} entries; the limit is {max}")]
    TooManyEntries {
        /// Entries claimed.
        claimed: u64,
        /// The limit.
        max: u64,
    },
    /// More bytes than allowed.
    #[error("manifest claims {claimed} bytes; the limit is {max}")]
    TooLarge {
        /// Bytes claimed.
        claimed: u64,
        /// The limit.
        max: u64,
    },
    /// The sizes of the entries do not add up to the claimed total.
    #[error("entries add up to {actual} bytes, not the {claimed} announced")]
    TotalMismatch {
        /// Total announced in the header.
        claimed: u64,
        /// Sum of entry sizes.
        actual: u64,
    },
    /// Fewer or more entries arrived than announced.
    #[error("manifest announced {claimed} entries but carried {actual}")]
    CountMismatch {
        /// Entries announced.
        claimed: u64,
        /// Entries received.
        actual: u64,
    },
    /// A chunk size that is not a multiple of 4 KiB within 64 KiB..=16 MiB.
    #[error("chunk size {0} is not a multiple of 4096 between 64 KiB and 16 MiB")]
    BadChunkSize(u32),
    /// A directory or link with a non-zero size.
    #[error("entry {0:?} is not a file but has a size")]
    SizeOnNonFile(String),
    /// A file with more chunks than a chunk index can count.
    #[error("entry {0:?} is too large for the chunk size")]
    TooManyChunks(String),
    /// A stream entry ([`EntryKind::Stream`]) with a size, or beside other entries: a stream
    /// is offered alone, and its size comes at its end.
    #[error("entry {0:?} is a stream, which must be the only entry and declare no size")]
    BadStream(String),
    /// Holding the manifest would cost more memory than [`Limits::max_manifest_memory`].
    #[error(
        "entry {path:?} would take the manifest to {needed} bytes of memory, over the \
         manifest memory limit of {max} bytes"
    )]
    TooMuchMemory {
        /// The entry refused.
        path: String,
        /// Memory the manifest would cost with it, by the rule of [`Limits::max_manifest_memory`].
        needed: u64,
        /// The limit.
        max: u64,
    },
}

/// A validated share: entries in order, and the chunk size every file is cut with.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Manifest {
    entries: Vec<Entry>,
    chunk_size: u32,
    total_bytes: u64,
}

impl Manifest {
    /// Builds and validates a manifest from entries, as the sender does before offering them.
    pub fn new(entries: Vec<Entry>, chunk_size: u32) -> Result<Self, ManifestError> {
        let total = entries
            .iter()
            .map(|e| e.size)
            .fold(0u64, u64::saturating_add);
        let mut a = Assembler::begin(
            entries.len() as u64,
            total,
            chunk_size,
            // The sender's own files: no limits.
            Limits {
                max_entries: u64::MAX,
                max_total_bytes: u64::MAX,
                max_manifest_memory: u64::MAX,
            },
        )?;
        for e in entries {
            a.push(e)?;
        }
        a.finish()
    }

    /// All entries, in order. The index of an entry is its `file` number on the wire.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry at `index`.
    pub fn entry(&self, index: u32) -> Option<&Entry> {
        self.entries.get(index as usize)
    }

    /// The chunk size of every file.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Sum of all file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of files (not directories or links; a stream counts as a file).
    pub fn file_count(&self) -> usize {
        self.entries.iter().filter(|e| e.kind.has_data()).count()
    }

    /// The index of the stream entry, if this share is a stream ([`EntryKind::Stream`]; it is
    /// then the only entry).
    pub fn stream(&self) -> Option<u32> {
        (self.entries.len() == 1 && self.entries[0].kind == EntryKind::Stream).then_some(0)
    }

    /// Byte offset and largest length of chunk `chunk` of a stream whose size is not known
    /// yet: every chunk but the last is whole.
    pub fn stream_chunk_span(&self, chunk: u32) -> (u64, u32) {
        (
            u64::from(chunk) * u64::from(self.chunk_size),
            self.chunk_size,
        )
    }

    /// Chunks of the entry at `index` (0 for directories, links and empty files).
    pub fn chunk_count(&self, index: u32) -> u32 {
        self.entry(index)
            .map_or(0, |e| chunks_for(e.size, self.chunk_size))
    }

    /// Byte offset and length of chunk `chunk` of file `index`, if it exists.
    pub fn chunk_span(&self, index: u32, chunk: u32) -> Option<(u64, u32)> {
        let e = self.entry(index)?;
        if e.kind != EntryKind::File || chunk >= chunks_for(e.size, self.chunk_size) {
            return None;
        }
        let off = u64::from(chunk) * u64::from(self.chunk_size);
        // off < size because chunk < chunk count; the difference fits u32 after min().
        let len = (e.size - off).min(u64::from(self.chunk_size)) as u32;
        Some((off, len))
    }

    /// The manifest as wire messages, each frame within the frame limit.
    pub fn to_messages(&self) -> Vec<Message> {
        let mut out = vec![Message::ManifestBegin {
            entry_count: self.entries.len() as u64,
            total_bytes: self.total_bytes,
            chunk_size: self.chunk_size,
        }];
        let budget = MAX_FRAME_BODY - 16;
        let mut batch = Vec::new();
        let mut size = 0;
        for e in &self.entries {
            // Upper bound of one entry's encoding: two strings, kind, size, time, mode.
            let len = e.path.len() + e.link_target.len() + 40;
            if size + len > budget && !batch.is_empty() {
                out.push(Message::ManifestEntries(std::mem::take(&mut batch)));
                size = 0;
            }
            size += len;
            batch.push(e.clone());
        }
        if !batch.is_empty() {
            out.push(Message::ManifestEntries(batch));
        }
        out.push(Message::ManifestEnd);
        out
    }
}

/// Chunks needed for `size` bytes.
pub fn chunks_for(size: u64, chunk_size: u32) -> u32 {
    // Validated manifests guarantee this fits; saturate rather than wrap otherwise.
    u32::try_from(size.div_ceil(u64::from(chunk_size.max(1)))).unwrap_or(u32::MAX)
}

/// The chunk size used when the user does not choose one: about 8192 chunks for the largest
/// file, between 256 KiB and 4 MiB. Small chunks reach the receiver sooner (the first byte
/// waits for a whole chunk) and queue less: on loopback with a 1 GiB file, 512 KiB chunks
/// against 4 MiB gave 3.2 against 2.5 Gbit/s, a first chunk after 12-20 ms against 90-100,
/// and chunk p99 170 against 390 ms (bench/README.md). The per-file chunk count stays
/// bounded (so do the hash tables and resume sidecars that grow with it) until files of
/// 32 GiB, where 4 MiB takes over.
pub fn auto_chunk_size(largest_file: u64) -> u32 {
    let target = (largest_file / 8192).clamp(256 << 10, 4 << 20);
    // A power of two is a multiple of 4096 in this range.
    target.next_power_of_two().min(4 << 20) as u32
}

/// Checks a chunk size against the protocol's rules.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), ManifestError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        || !chunk_size.is_multiple_of(CHUNK_ALIGN)
    {
        return Err(ManifestError::BadChunkSize(chunk_size));
    }
    Ok(())
}

/// Builds a [`Manifest`] from a stream of entries, validating each as it arrives so that a
/// hostile peer is refused at the first bad entry, before the rest is buffered.
///
/// Its memory is bounded by [`Limits::max_manifest_memory`]: paths are indexed as a tree of
/// components, each prefix stored once.
#[derive(Debug)]
pub struct Assembler {
    claimed_entries: u64,
    claimed_total: u64,
    chunk_size: u32,
    max_memory: u64,
    entries: Vec<Entry>,
    total: u64,
    /// Memory counted so far, by the rule of [`Limits::max_manifest_memory`].
    memory: u64,
    /// Every path seen and every implied parent directory, as a tree: `(parent, component)`
    /// to node. The root's children have parent [`ROOT`].
    children: HashMap<(u32, Box<str>), u32>,
    /// Per node: its kind, and whether an entry declared it (rather than only implying it as a
    /// parent directory).
    nodes: Vec<(EntryKind, bool)>,
}

/// The parent of top-level nodes.
const ROOT: u32 = u32::MAX;

impl Assembler {
    /// Starts a manifest from its header, refusing claims beyond `limits` up front.
    pub fn begin(
        entry_count: u64,
        total_bytes: u64,
        chunk_size: u32,
        limits: Limits,
    ) -> Result<Self, ManifestError> {
        if entry_count > limits.max_entries {
            return Err(ManifestError::TooManyEntries {
                claimed: entry_count,
                max: limits.max_entries,
            });
        }
        if total_bytes > limits.max_total_bytes {
            return Err(ManifestError::TooLarge {
                claimed: total_bytes,
                max: limits.max_total_bytes,
            });
        }
        check_chunk_size(chunk_size)?;
        Ok(Self {
            claimed_entries: entry_count,
            claimed_total: total_bytes,
            chunk_size,
            max_memory: limits.max_manifest_memory,
            // Grow with what actually arrives, not with what was claimed.
            entries: Vec::new(),
            total: 0,
            memory: 0,
            children: HashMap::new(),
            nodes: Vec::new(),
        })
    }

    /// Adds one entry.
    pub fn push(&mut self, e: Entry) -> Result<(), ManifestError> {
        if self.entries.len() as u64 >= self.claimed_entries {
            return Err(ManifestError::CountMismatch {
                claimed: self.claimed_entries,
                actual: self.entries.len() as u64 + 1,
            });
        }
        let parts = path::validate(&e.path).map_err(|source| ManifestError::Path {
            path: e.path.clone(),
            source,
        })?;
        let stream_alone = self.claimed_entries == 1 && e.size == 0;
        match e.kind {
            EntryKind::File => {}
            EntryKind::Stream if stream_alone => {}
            EntryKind::Stream => return Err(ManifestError::BadStream(e.path)),
            EntryKind::Dir => {
                if e.size != 0 {
                    return Err(ManifestError::SizeOnNonFile(e.path));
                }
            }
            EntryKind::Symlink => {
                if e.size != 0 {
                    return Err(ManifestError::SizeOnNonFile(e.path));
                }
                path::validate_link_target(&e.path, &e.link_target).map_err(|source| {
                    ManifestError::Path {
                        path: e.path.clone(),
                        source,
                    }
                })?;
            }
        }
        if u64::from(chunks_for(e.size, self.chunk_size)) * u64::from(self.chunk_size) < e.size {
            return Err(ManifestError::TooManyChunks(e.path));
        }
        // Walk the part of the path already indexed. Every parent must be (or become) a
        // directory; this entry must not already be declared, nor be an implied parent unless
        // it is a directory itself. Nodes are only ever added below the indexed part, so every
        // clash is found here, before anything is allocated for this entry.
        let mut parent = ROOT;
        let mut known = 0;
        for (i, part) in parts.iter().enumerate() {
            let Some(&node) = self.children.get(&(parent, Box::from(*part))) else {
                break;
            };
            let last = i + 1 == parts.len();
            match self.nodes[node as usize] {
                (EntryKind::Dir, false) if last && e.kind == EntryKind::Dir => {}
                _ if last => return Err(ManifestError::Duplicate(e.path)),
                (EntryKind::Dir, _) => {}
                _ => return Err(ManifestError::ParentNotDir(e.path)),
            }
            parent = node;
            known = i + 1;
        }
        let needed = ENTRY_COST
            + e.path.len() as u64
            + e.link_target.len() as u64
            + parts[known..]
                .iter()
                .map(|p| NODE_COST + p.len() as u64)
                .sum::<u64>();
        let needed = self.memory.saturating_add(needed);
        if needed > self.max_memory {
            return Err(ManifestError::TooMuchMemory {
                path: e.path,
                needed,
                max: self.max_memory,
            });
        }
        if e.size > self.claimed_total - self.total {
            return Err(ManifestError::TotalMismatch {
                claimed: self.claimed_total,
                actual: self.total.saturating_add(e.size),
            });
        }
        for (i, part) in parts.iter().enumerate().skip(known) {
            let kind = if i + 1 == parts.len() {
                e.kind
            } else {
                EntryKind::Dir
            };
            let node = u32::try_from(self.nodes.len()).unwrap_or(ROOT);
            if let Slot::Vacant(v) = self.children.entry((parent, Box::from(*part))) {
                v.insert(node);
            }
            self.nodes.push((kind, false));
            parent = node;
        }
        // `parent` is now this entry's own node.
        if let Some(n) = self.nodes.get_mut(parent as usize) {
            n.1 = true;
        }
        self.memory = needed;
        self.total += e.size;
        self.entries.push(e);
        Ok(())
    }

    /// Memory the manifest costs so far, by the rule of [`Limits::max_manifest_memory`].
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// Entries received so far.
    pub fn received(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Checks that everything announced arrived and returns the manifest.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        if self.entries.len() as u64 != self.claimed_entries {
            return Err(ManifestError::CountMismatch {
                claimed: self.claimed_entries,
                actual: self.entries.len() as u64,
            });
        }
        if self.total != self.claimed_total {
            return Err(ManifestError::TotalMismatch {
                claimed: self.claimed_total,
                actual: self.total,
            });
        }
        // Links are checked together once all are known: a chain can be split in any order.
        let links: Vec<(&str, &str)> = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| (e.path.as_str(), e.link_target.as_str()))
            .collect();
        path::check_link_chains(&links).map_err(|(path, source)| ManifestError::Path {
            path: path.to_owned(),
            source,
        })?;
        Ok(Manifest {
            entries: self.entries,
            chunk_size: self.chunk_size,
            total_bytes: self.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use flux_wire::Timestamp;

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

    fn dir(path: &str) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            ..file(path, 0)
        }
    }

    #[test]
    fn chunk_spans_cover_the_file_exactly() {
        let m = Manifest::new(vec![file("a", 3 * 65536 + 7), file("e", 0)], 65536).unwrap();
        assert_eq!(m.chunk_count(0), 4);
        assert_eq!(m.chunk_span(0, 3), Some((3 * 65536, 7)));
        assert_eq!(m.chunk_span(0, 4), None);
        assert_eq!(m.chunk_count(1), 0);
        assert_eq!(m.chunk_span(1, 0), None);
    }

    #[test]
    fn duplicates_and_kind_clashes_are_refused() {
        let dup = Manifest::new(vec![file("a", 1), file("a", 1)], 65536);
        assert_eq!(dup, Err(ManifestError::Duplicate("a".into())));
        let file_and_dir = Manifest::new(vec![file("a", 1), dir("a")], 65536);
        assert_eq!(file_and_dir, Err(ManifestError::Duplicate("a".into())));
        let below_file = Manifest::new(vec![file("a", 1), file("a/b", 1)], 65536);
        assert_eq!(below_file, Err(ManifestError::ParentNotDir("a/b".into())));
        let file_over_parent = Manifest::new(vec![file("a/b", 1), file("a", 1)], 65536);
        assert_eq!(file_over_parent, Err(ManifestError::Duplicate("a".into())));
        assert!(Manifest::new(vec![dir("a"), file("a/b", 1), dir("a/c")], 65536).is_ok());
    }

    #[test]
    fn hostile_headers_are_refused_before_entries() {
        let l = Limits::default();
        assert_eq!(
            Assembler::begin(1_000_000_000, 0, 65536, l).err(),
            Some(ManifestError::TooManyEntries {
                claimed: 1_000_000_000,
                max: 1_000_000
            })
        );
        assert_eq!(
            Assembler::begin(1, u64::MAX, 65536, l).err(),
            Some(ManifestError::TooLarge {
                claimed: u64::MAX,
                max: 1 << 50
            })
        );
        assert_eq!(
            Assembler::begin(1, 1, 1000, l).err(),
            Some(ManifestError::BadChunkSize(1000))
        );
    }

    #[test]
    fn manifest_memory_is_counted_and_capped() {
        // Two entries sharing the directory `d`: the prefix is counted once.
        let mut a = Assembler::begin(3, 0, 65536, Limits::default()).unwrap();
        a.push(file("d/x", 0)).unwrap();
        let one = ENTRY_COST + 3 + (NODE_COST + 1) * 2;
        assert_eq!(a.memory(), one);
        a.push(file("d/y", 0)).unwrap();
        assert_eq!(a.memory(), one + ENTRY_COST + 3 + NODE_COST + 1);
        // A limit that the third entry would cross refuses it, naming the limit.
        let limits = Limits {
            max_manifest_memory: a.memory() + ENTRY_COST,
            ..Limits::default()
        };
        let mut a = Assembler::begin(3, 0, 65536, limits).unwrap();
        a.push(file("d/x", 0)).unwrap();
        a.push(file("d/y", 0)).unwrap();
        let err = a.push(file("e", 0)).unwrap_err();
        assert_eq!(
            err,
            ManifestError::TooMuchMemory {
                path: "e".into(),
                needed: limits.max_manifest_memory + 1 + NODE_COST + 1,
                max: limits.max_manifest_memory,
            }
        );
        assert!(err.to_string().contains("manifest memory limit"), "{err}");
    }

    #[test]
    fn sizes_must_add_up() {
        let mut a = Assembler::begin(1, 10, 65536, Limits::default()).unwrap();
        assert_eq!(
            a.push(file("big", 11)),
            Err(ManifestError::TotalMismatch {
                claimed: 10,
                actual: 11
            })
        );
        let a = Assembler::begin(2, 0, 65536, Limits::default()).unwrap();
        assert_eq!(
            a.finish(),
            Err(ManifestError::CountMismatch {
                claimed: 2,
                actual: 0
            })
        );
    }

    #[test]
    fn large_manifests_split_into_frames_and_reassemble() {
        let entries: Vec<_> = (0..100_000)
            .map(|i| file(&format!("d{}/file-{i:06}.bin", i % 100), i % 3))
            .collect();
        let m = Manifest::new(entries, 1 << 20).unwrap();
        let msgs = m.to_messages();
        assert!(msgs.len() > 3, "100k entries need several frames");
        let mut a = None;
        for msg in msgs {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            assert!(buf.len() <= MAX_FRAME_BODY + 8);
            match msg {
                Message::ManifestBegin {
                    entry_count,
                    total_bytes,
                    chunk_size,
                } => {
                    a = Some(
                        Assembler::begin(entry_count, total_bytes, chunk_size, Limits::default())
                            .unwrap(),
                    )
                }
                Message::ManifestEntries(es) => {
                    for e in es {
                        a.as_mut().unwrap().push(e).unwrap();
                    }
                }
                _ => {}
            }
        }
        assert_eq!(a.unwrap().finish().unwrap(), m);
    }

    #[test]
    fn auto_chunk_size_is_valid_for_all_sizes() {
        for size in [0, 1, 1 << 20, 100 << 20, 1 << 30, 1 << 40, u64::MAX] {
            let c = auto_chunk_size(size);
            check_chunk_size(c).unwrap();
        }
        assert_eq!(auto_chunk_size(0), 256 << 10);
        assert_eq!(auto_chunk_size(1 << 30), 256 << 10);
        assert_eq!(auto_chunk_size(4 << 30), 512 << 10);
        assert_eq!(auto_chunk_size(1 << 40), 4 << 20);
    }
}
