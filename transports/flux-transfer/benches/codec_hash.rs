//! Micro-benchmarks of the per-chunk CPU work outside QUIC: the wire codec (chunk headers and
//! manifest entries, encode and decode) and BLAKE3 chunk hashing at the chunk sizes the
//! transfer picks.

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flux_transfer::digest::chunk_hash;
use flux_wire::{Entry, EntryKind, Message, Timestamp, decode_frame};

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    let header = Message::ChunkHeader {
        file: 12,
        index: 4096,
        len: 4 << 20,
        hash: [7; 32],
    };
    let mut buf = Vec::with_capacity(64);
    g.throughput(Throughput::Elements(1));
    g.bench_function("chunk_header_encode", |b| {
        b.iter(|| {
            buf.clear();
            std::hint::black_box(&header).encode(&mut buf);
        })
    });
    buf.clear();
    header.encode(&mut buf);
    g.bench_function("chunk_header_decode", |b| {
        b.iter(|| decode_frame(std::hint::black_box(&buf)).unwrap())
    });
    let entries: Vec<Entry> = (0..1000)
        .map(|i| Entry {
            path: format!("photos/2026/album-{}/IMG_{i:05}.jpg", i % 17),
            kind: EntryKind::File,
            size: 3_000_000 + i,
            mtime: Timestamp {
                secs: 1_700_000_000 + i as i64,
                nanos: 0,
            },
            mode: 0o644,
            link_target: String::new(),
        })
        .collect();
    let msg = Message::ManifestEntries(entries);
    let mut mbuf = Vec::new();
    msg.encode(&mut mbuf);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("manifest_1000_entries_encode", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(mbuf.len());
            msg.encode(&mut out);
            out
        })
    });
    g.bench_function("manifest_1000_entries_decode", |b| {
        b.iter(|| decode_frame(std::hint::black_box(&mbuf)).unwrap())
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_hash");
    for size in [256usize << 10, 1 << 20, 4 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, d| {
            b.iter(|| chunk_hash(std::hint::black_box(d)))
        });
    }
    g.finish();
}

criterion_group!(benches, codec, hashing);
criterion_main!(benches);
