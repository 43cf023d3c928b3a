//! Entry points for the cargo-fuzz targets: a hostile sender's message sequences against a
//! [`Receiver`], hostile manifests against the assembler, damaged sidecars against the reader.

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use flux_wire::Message;

use crate::{DiskFailure, DiskOp, DiskResult, Event, Receiver, ReceiverConfig, Stream};

/// One step of a hostile peer (or of a flaky disk).
#[derive(Arbitrary, Debug)]
pub enum Step {
    /// A well-formed message on the control stream.
    Control(Message),
    /// Raw bytes on the control stream.
    ControlRaw(Vec<u8>),
    /// A message followed by raw bytes on a data lane.
    Lane(u8, Message, Vec<u8>),
    /// The peer ends a stream.
    End(u8),
    /// Time passes.
    Wait(u16),
    /// The next disk request fails.
    FailDisk,
}

/// Runs `steps` against a receiver that accepts whatever manifest completes. Panics only on a
/// broken invariant of the receiver (which is what the fuzzer looks for).
pub fn receiver_script(steps: Vec<Step>) {
    let mut now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    let mut fail_next = false;
    for step in steps {
        match step {
            Step::Control(m) => {
                let mut b = Vec::new();
                m.encode(&mut b);
                r.handle_stream_data(now, Stream::Control, &b);
            }
            Step::ControlRaw(b) => r.handle_stream_data(now, Stream::Control, &b),
            Step::Lane(n, m, raw) => {
                let mut b = Vec::new();
                m.encode(&mut b);
                b.extend_from_slice(&raw);
                r.handle_stream_data(now, Stream::Lane(u16::from(n % 20)), &b);
            }
            Step::End(n) => {
                let s = if n == 0 {
                    Stream::Control
                } else {
                    Stream::Lane(u16::from(n))
                };
                r.handle_stream_end(now, s);
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                r.handle_timeout(now);
            }
            Step::FailDisk => fail_next = true,
        }
        while let Some(op) = r.poll_disk() {
            // Like a driver: a chunk write verifies the bytes against their hash first.
            let (id, corrupt) = match op {
                DiskOp::WriteChunk { id, hash, data, .. } => {
                    (id, crate::digest::chunk_hash(&data.to_contiguous()) != hash)
                }
                DiskOp::Finalize { id, .. } | DiskOp::Finish { id } | DiskOp::Read { id, .. } => {
                    (id, false)
                }
            };
            let res = if std::mem::take(&mut fail_next) {
                Err(DiskFailure::Io("injected".into()))
            } else if corrupt {
                Err(DiskFailure::Corrupt)
            } else {
                Ok(DiskResult::Done)
            };
            r.handle_disk_done(now, id, res);
        }
        while let Some(ev) = r.poll_event() {
            if let Event::ManifestReady = ev {
                r.accept(now, Default::default());
            }
        }
        for s in r.outbox().ready() {
            let n = r.outbox().queued(s);
            r.outbox().advance(s, n);
            let _ = r.outbox().take_fin(s);
        }
    }
}

/// One manifest entry for [`manifest_assembler`]: a path built from a small alphabet of
/// components (so that duplicates, shared prefixes and files over directories are common), or
/// a raw path.
#[derive(Arbitrary, Debug)]
pub struct FuzzEntry {
    /// Components, each naming one of a few short names.
    pub parts: Vec<u8>,
    /// A raw path used instead of `parts`, when present.
    pub raw: Option<String>,
    /// Kind of the entry.
    pub kind: flux_wire::EntryKind,
    /// Size of the entry.
    pub size: u32,
    /// Link target (links only matter, but any entry may carry one).
    pub link_target: String,
}

/// A manifest header and entries for [`manifest_assembler`].
#[derive(Arbitrary, Debug)]
pub struct ManifestInput {
    /// Entry count announced, relative to the entries supplied.
    pub count_delta: i8,
    /// Total announced, relative to the entries' sum.
    pub total_delta: i16,
    /// Chunk size announced, in 4 KiB units.
    pub chunk_units: u16,
    /// Memory limit, in KiB (0: the default).
    pub memory_kib: u16,
    /// The entries.
    pub entries: Vec<FuzzEntry>,
}

const NAMES: [&str; 6] = ["a", "b", "dir", "x.txt", "CON", ".."];

/// Assembles a hostile manifest under a small memory limit: never a panic, never more memory
/// counted than the limit, and every verdict the same as a simple (quadratic) reference model's
/// where the limit is not reached.
pub fn manifest_assembler(input: ManifestInput) {
    use std::collections::HashMap;

    use flux_wire::{Entry, EntryKind, Timestamp};

    use crate::manifest::{Assembler, Limits, ManifestError};

    let entries: Vec<Entry> = input
        .entries
        .into_iter()
        .map(|e| Entry {
            path: e.raw.unwrap_or_else(|| {
                let names: Vec<&str> = e
                    .parts
                    .iter()
                    .map(|&p| NAMES[usize::from(p) % NAMES.len()])
                    .collect();
                names.join("/")
            }),
            kind: e.kind,
            size: u64::from(e.size),
            mtime: Timestamp::default(),
            mode: 0o644,
            link_target: e.link_target,
        })
        .collect();
    let count = (entries.len() as u64).saturating_add_signed(i64::from(input.count_delta));
    let total = entries
        .iter()
        .map(|e| e.size)
        .sum::<u64>()
        .saturating_add_signed(i64::from(input.total_delta));
    let chunk_size = u32::from(input.chunk_units).saturating_mul(4096);
    let limits = Limits {
        max_manifest_memory: match input.memory_kib {
            0 => Limits::default().max_manifest_memory,
            k => u64::from(k) << 10,
        },
        ..Limits::default()
    };
    let Ok(mut a) = Assembler::begin(count, total, chunk_size, limits) else {
        return;
    };
    // The reference: every prefix of every path as its own string, as the assembler once did.
    let mut seen: HashMap<String, (EntryKind, bool)> = HashMap::new();
    for e in entries {
        let expected = reference_clash(&mut seen, &e);
        let before = a.memory();
        match a.push(e) {
            Ok(()) => assert_eq!(expected, None, "the reference refused what was accepted"),
            Err(ManifestError::TooMuchMemory { needed, max, .. }) => {
                assert!(needed > max && a.memory() == before);
                return;
            }
            Err(ManifestError::Duplicate(_)) => {
                assert_eq!(expected, Some(true), "duplicate not in the reference")
            }
            Err(ManifestError::ParentNotDir(_)) => {
                assert_eq!(expected, Some(false), "parent clash not in the reference")
            }
            // Path, size and count errors come before or after the clash checks; the
            // reference does not model them.
            Err(_) => return,
        }
        assert!(a.memory() <= limits.max_manifest_memory);
    }
    if let Ok(m) = a.finish() {
        assert_eq!(m.len() as u64, count);
        assert_eq!(m.total_bytes(), total);
    }
}

/// The old prefix-string check: `Some(true)` for a duplicate, `Some(false)` for an entry below
/// a file or link, `None` (and the entry recorded) otherwise. Paths that fail validation are
/// not recorded.
fn reference_clash(
    kinds: &mut std::collections::HashMap<String, (flux_wire::EntryKind, bool)>,
    e: &flux_wire::Entry,
) -> Option<bool> {
    use flux_wire::EntryKind;
    let Ok(parts) = crate::path::validate(&e.path) else {
        return None;
    };
    let mut prefix = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(part);
        let last = i + 1 == parts.len();
        match kinds.get(&prefix) {
            Some((EntryKind::Dir, false)) if last && e.kind == EntryKind::Dir => {}
            Some(_) if last => return Some(true),
            Some((EntryKind::Dir, _)) => {}
            Some(_) => return Some(false),
            None => {}
        }
    }
    // No clash: record the prefixes (as the assembler will, if nothing else is wrong).
    let mut prefix = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(part);
        let last = i + 1 == parts.len();
        let kind = if last { e.kind } else { EntryKind::Dir };
        let slot = kinds.entry(prefix.clone()).or_insert((kind, false));
        if last {
            slot.1 = true;
        }
    }
    None
}

/// A sidecar for [`sidecar_reader`]: raw bytes, or a valid header followed by records and
/// damage, so that record parsing is reached despite the header's check.
#[derive(Arbitrary, Debug)]
pub struct SidecarInput {
    /// Size of the file the sidecar is read for.
    pub size: u64,
    /// Chunk size, in 4 KiB units.
    pub chunk_units: u16,
    /// Records to encode after a valid header; raw bytes only when `None`.
    pub records: Option<Vec<(u32, [u8; 32])>>,
    /// Bytes appended (or the whole sidecar, without records).
    pub tail: Vec<u8>,
    /// A byte to flip, by position, if any.
    pub flip: Option<u16>,
}

/// Parses a hostile or damaged sidecar: never a panic, only indices inside the file, and what
/// parses re-encodes to a sidecar that parses the same.
pub fn sidecar_reader(input: SidecarInput) {
    use flux_wire::{Entry, EntryKind, Timestamp};

    use crate::sidecar::{HEADER_LEN, header, parse, record};

    let entry = Entry {
        path: "f".into(),
        kind: EntryKind::File,
        size: input.size,
        mtime: Timestamp { secs: 1, nanos: 2 },
        mode: 0o644,
        link_target: String::new(),
    };
    let chunk_size = u32::from(input.chunk_units).saturating_mul(4096).max(1);
    let mut bytes = Vec::new();
    if let Some(records) = &input.records {
        bytes.extend_from_slice(&header(&entry, chunk_size));
        for (i, h) in records {
            bytes.extend_from_slice(&record(*i, h));
        }
    }
    bytes.extend_from_slice(&input.tail);
    if let Some(at) = input.flip
        && let Some(b) = bytes.get_mut(usize::from(at))
    {
        *b ^= 0x5a;
    }
    let Ok(got) = parse(&bytes, &entry, chunk_size) else {
        return;
    };
    let chunks = crate::manifest::chunks_for(entry.size, chunk_size);
    assert!(got.keys().all(|&i| i < chunks), "an index beyond the file");
    let mut again = header(&entry, chunk_size).to_vec();
    for (i, h) in &got {
        again.extend_from_slice(&record(*i, h));
    }
    assert_eq!(parse(&again, &entry, chunk_size).ok(), Some(got));
    assert!(bytes.len() >= HEADER_LEN);
}
