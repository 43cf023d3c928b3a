//! zstd chunk compression (issue 14): whole transfers through the simulated network with
//! compression on, auto and towards a receiver too old for it, and a hostile sender's
//! compressed chunks (a decompression bomb, a frame of the wrong length) against a real
//! destination: each ends the transfer with an error naming the file, and nothing is written.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use flux_peer::disk::Destination;
use flux_peer::scan::scan;
use flux_peer::sim::{self, SimConfig, Stop};
use flux_transfer::digest::chunk_hash;
use flux_transfer::{Compress, Event, Receiver, ReceiverConfig, Stream, TransferError};
use flux_wire::{Entry, EntryKind, Message, Timestamp};

fn log_text(len: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < len {
        s.push_str(&format!(
            "{i} GET /items/{} 200 {}\n",
            i % 313,
            i * 7 % 1000
        ));
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}

fn run(src: &Path, dest: &Path, compress: Compress, receiver_features: u64) -> sim::Outcome {
    let share = scan(&[src.to_path_buf()], Some(256 << 10)).unwrap();
    let mut cfg = SimConfig::with_seed(7);
    cfg.sender.compress = compress;
    cfg.receiver.features = receiver_features;
    sim::run(
        Arc::new(share.manifest),
        share.sources,
        dest.to_path_buf(),
        cfg,
        Stop::Complete,
        None,
    )
}

#[test]
fn compressed_chunks_arrive_identical_and_an_old_receiver_gets_plain_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("app.log");
    let data = log_text(3 << 20);
    fs::write(&src, &data).unwrap();
    for (compress, features, smaller) in [
        (Compress::Auto, flux_transfer::FEATURES, true),
        (Compress::On, flux_transfer::FEATURES, true),
        (Compress::Off, flux_transfer::FEATURES, false),
        // A receiver from before compression: it never sees a compressed chunk.
        (Compress::On, 0, false),
    ] {
        let dest = tempfile::tempdir().unwrap();
        let o = run(&src, dest.path(), compress, features);
        assert!(
            o.done,
            "{compress:?}/{features}: {:?} {:?}",
            o.sender_error, o.receiver_error
        );
        assert_eq!(fs::read(dest.path().join("app.log")).unwrap(), data);
        if smaller {
            assert!(
                o.wire_bytes * 4 < data.len() as u64,
                "{compress:?}: {}",
                o.wire_bytes
            );
        } else {
            assert_eq!(o.wire_bytes, data.len() as u64, "{compress:?}/{features}");
        }
    }
}

#[test]
fn auto_never_compresses_random_data_or_media_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("share");
    fs::create_dir_all(&dir).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let random: Vec<u8> = (0..2 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(dir.join("noise.bin"), &random).unwrap();
    // Compressible bytes under a media name: `auto` trusts the name and does not try.
    fs::write(dir.join("movie.mp4"), log_text(1 << 20)).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let o = run(&dir, dest.path(), Compress::Auto, flux_transfer::FEATURES);
    assert!(o.done, "{:?} {:?}", o.sender_error, o.receiver_error);
    assert_eq!(o.wire_bytes, (3 << 20) as u64);
}

/// A receiver that accepted a one-file manifest of `size` bytes, and its destination.
fn receiver(root: &Path, size: u64) -> (Receiver, Destination) {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    let entry = Entry {
        path: "victim.txt".into(),
        kind: EntryKind::File,
        size,
        mtime: Timestamp::default(),
        mode: 0o644,
        link_target: String::new(),
    };
    let mut control = Vec::new();
    for m in [
        Message::Hello {
            min_version: 1,
            max_version: 1,
            features: flux_transfer::FEATURES,
        },
        Message::ManifestBegin {
            entry_count: 1,
            total_bytes: size,
            chunk_size: 1 << 20,
        },
        Message::ManifestEntries(vec![entry]),
        Message::ManifestEnd,
    ] {
        m.encode(&mut control);
    }
    r.handle_stream_data(now, Stream::Control, &control);
    while let Some(ev) = r.poll_event() {
        if let Event::ManifestReady = ev {
            r.accept(now, Default::default());
        }
    }
    let d = Destination::new(root.to_path_buf(), r.manifest().unwrap().clone());
    (r, d)
}

/// Sends one compressed chunk `frame` announced as `len` plain bytes hashing to `hash`, runs
/// the receiver's disk requests on a real destination, and returns its failure.
fn hostile_chunk(frame: &[u8], len: u32, hash: [u8; 32]) -> (TransferError, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut r, mut d) = receiver(tmp.path(), u64::from(len));
    let now = Instant::now();
    let mut lane = Vec::new();
    Message::ZChunkHeader {
        file: 0,
        index: 0,
        len,
        wire_len: frame.len() as u32,
        hash,
    }
    .encode(&mut lane);
    lane.extend_from_slice(frame);
    r.handle_stream_data(now, Stream::Lane(0), &lane);
    while let Some(op) = r.poll_disk() {
        let (id, res) = d.execute(op);
        r.handle_disk_done(now, id, res);
    }
    let mut failure = None;
    while let Some(ev) = r.poll_event() {
        if let Event::Failed(e) = ev {
            failure = Some(e);
        }
    }
    assert!(r.is_over());
    (failure.expect("the receiver must fail"), tmp)
}

#[test]
fn a_decompression_bomb_ends_the_transfer_naming_the_file() {
    // 64 MiB of zeros squeezed into a few KiB, announced as a 1 MiB chunk.
    let zeros = vec![0u8; 64 << 20];
    let bomb = flux_peer::compress::compress(&zeros, 3).unwrap();
    let plain = vec![0u8; 1 << 20];
    let (e, tmp) = hostile_chunk(&bomb, 1 << 20, chunk_hash(&plain));
    let msg = e.to_string();
    assert!(
        msg.contains("victim.txt") && msg.contains("declared"),
        "{msg}"
    );
    // Nothing reached the destination, not even a partial file's data.
    let partial = tmp.path().join(".victim.txt.thrupart");
    assert!(fs::metadata(&partial).map_or(true, |m| m.len() == 0));
}

#[test]
fn a_frame_shorter_than_its_declared_length_ends_the_transfer_naming_the_file() {
    let data = log_text(1 << 20);
    let frame = flux_peer::compress::compress(&data[..1000], 1).unwrap();
    let (e, _tmp) = hostile_chunk(&frame, 1 << 20, chunk_hash(&data));
    let msg = e.to_string();
    assert!(msg.contains("victim.txt") && msg.contains("1000"), "{msg}");
}

#[test]
fn a_transfer_cut_while_compressed_resumes_uncompressed_without_resending() {
    // Resume claims are hashes of plain bytes: chunks that arrived compressed are claimed and
    // accepted by a sender that no longer compresses, and none is sent twice.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big.log");
    let data = log_text(8 << 20);
    fs::write(&src, &data).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let share = scan(std::slice::from_ref(&src), Some(256 << 10)).unwrap();
    let manifest = Arc::new(share.manifest);
    let mut cfg = SimConfig::with_seed(11);
    cfg.sender.compress = Compress::On;
    let first = sim::run(
        manifest.clone(),
        share.sources.clone(),
        dest.path().to_path_buf(),
        cfg.clone(),
        Stop::AfterVerified(12),
        None,
    );
    assert!(first.interrupted && first.wire_bytes < first.sent.len() as u64 * (256 << 10));
    cfg.sender.compress = Compress::Off;
    let second = sim::run(
        manifest,
        share.sources,
        dest.path().to_path_buf(),
        cfg,
        Stop::Complete,
        None,
    );
    assert!(
        second.done,
        "{:?} {:?}",
        second.sender_error, second.receiver_error
    );
    let again: Vec<_> = second
        .sent
        .iter()
        .filter(|c| first.verified.contains(c))
        .collect();
    assert!(again.is_empty(), "resent {again:?}");
    assert!(!first.verified.is_empty());
    assert_eq!(fs::read(dest.path().join("big.log")).unwrap(), data);
}
