//! What a hostile sender's manifest may cost the receiver in memory, counted by a global
//! allocator: the assembler's allocations grow with the bytes of the manifest (never with the
//! square of its path depth), and accepting a share allocates nothing proportional to the sizes
//! it declares.

// Tests are drivers: they may read the clock the machines take as input.
#![allow(clippy::disallowed_methods)]
// A counting allocator needs `unsafe impl GlobalAlloc`; it only forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use flux_transfer::manifest::Assembler;
use flux_transfer::{Event, Limits, ManifestError, Receiver, ReceiverConfig, Stream};
use flux_wire::{Entry, EntryKind, Message, Timestamp};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The tests in this file measure one at a time (the harness runs tests on threads).
static SERIAL: Mutex<()> = Mutex::new(());

// SAFETY: every call forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            let now = CURRENT.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it held allocated at once beyond what
/// was allocated when it started.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

fn entry(path: String, kind: EntryKind, size: u64) -> Entry {
    Entry {
        path,
        kind,
        size,
        mtime: Timestamp::default(),
        mode: 0o644,
        link_target: String::new(),
    }
}

/// Paths as deep and long as the path rules allow (256 components of 255 bytes), each under
/// its own top directory so that no prefix is shared.
fn deep_paths(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let mut parts = vec![format!("{i:0>255}")];
            parts.extend((1..256).map(|d| format!("{:x>255}", d % 7)));
            entry(parts.join("/"), EntryKind::File, 0)
        })
        .collect()
}

#[test]
fn deep_long_paths_cost_memory_linear_in_the_manifest() {
    let _serial = SERIAL.lock();
    let entries = deep_paths(8);
    let input: usize = entries.iter().map(|e| e.path.len()).sum();
    let n = entries.len() as u64;
    let ((result, counted), grew) = peak_growth(move || {
        let mut a = Assembler::begin(n, 0, 1 << 20, Limits::default()).expect("header");
        for e in entries {
            a.push(e).expect("a valid entry");
        }
        let counted = a.memory();
        (a.finish().map(|m| m.len()), counted)
    });
    assert_eq!(result, Ok(8));
    // Each entry is moved in (its path is already counted in `input`); what the assembler adds
    // must stay within a small multiple of the path bytes, not grow with depth × length (which
    // was 68 MB here), and within what its own accounting (the rule the limit applies) says.
    assert!(
        grew as u64 <= counted,
        "assembling allocated {grew} bytes but counted only {counted}"
    );
    assert!(
        counted <= 3 * input as u64 + (64 << 10),
        "assembling {input} bytes of paths counted {counted} bytes"
    );
}

#[test]
fn the_manifest_memory_limit_refuses_a_deep_manifest_before_allocating() {
    let _serial = SERIAL.lock();
    let entries = deep_paths(64);
    let limits = Limits {
        max_manifest_memory: 1 << 20,
        ..Limits::default()
    };
    let (err, grew) = peak_growth(move || {
        let mut a = Assembler::begin(64, 0, 1 << 20, limits).expect("header");
        for e in entries {
            if let Err(err) = a.push(e) {
                return Some(err);
            }
        }
        None
    });
    let Some(ManifestError::TooMuchMemory { needed, max, .. }) = err else {
        panic!("expected the memory limit, got {err:?}");
    };
    assert!(needed > max && max == 1 << 20);
    assert!(
        grew <= 1 << 20,
        "{grew} bytes allocated under a 1 MiB limit"
    );
}

#[test]
fn a_huge_declared_size_allocates_nothing_proportional_at_accept() {
    let _serial = SERIAL.lock();
    // One file of 1 PiB (the default share limit) in 16 MiB chunks: 2^26 chunks.
    let size = 1u64 << 50;
    let mut control = Vec::new();
    for m in [
        Message::Hello {
            min_version: 1,
            max_version: 1,
            features: 0,
        },
        Message::ManifestBegin {
            entry_count: 1,
            total_bytes: size,
            chunk_size: 16 << 20,
        },
        Message::ManifestEntries(vec![entry("huge.bin".into(), EntryKind::File, size)]),
        Message::ManifestEnd,
    ] {
        m.encode(&mut control);
    }
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    r.handle_stream_data(now, Stream::Control, &control);
    let mut ready = false;
    while let Some(ev) = r.poll_event() {
        ready |= matches!(ev, Event::ManifestReady);
    }
    assert!(ready, "the manifest is valid and completes");
    let ((), grew) = peak_growth(|| r.accept(now, Default::default()));
    assert!(!r.is_over(), "the share was accepted");
    assert!(
        grew < 64 << 10,
        "accepting a declared 1 PiB file allocated {grew} bytes"
    );
}

#[test]
fn a_typical_manifest_allocates_no_more_than_it_counts() {
    let _serial = SERIAL.lock();
    let entries: Vec<Entry> = (0..100_000)
        .map(|i| entry(format!("d{}/file-{i:06}.bin", i % 100), EntryKind::File, 1))
        .collect();
    let (counted, grew) = peak_growth(move || {
        let mut a = Assembler::begin(100_000, 100_000, 1 << 20, Limits::default()).expect("header");
        for e in entries {
            a.push(e).expect("a valid entry");
        }
        a.memory()
    });
    // The entries' own strings were allocated before; what assembling adds stays within the
    // count the limit applies to.
    assert!(
        grew as u64 <= counted,
        "allocated {grew} bytes, counted {counted}"
    );
}
