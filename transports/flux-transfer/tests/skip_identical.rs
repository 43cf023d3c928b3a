//! `ReceiverConfig::skip_identical`: by default a file the receiver already holds is claimed
//! (the sender then skips it, and so learns the receiver holds it); with it off nothing is
//! claimed and every byte is asked for.

// Tests are drivers: they may read the clock the machines take as input.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use flux_transfer::digest::chunk_hash;
use flux_transfer::{Event, LocalFile, Receiver, ReceiverConfig, Stream, TransferError};
use flux_wire::{Entry, EntryKind, Message, Timestamp};

/// A receiver holding the offer of one 2-chunk file, accepted with `local` for it; returns
/// the messages it sent after its hello, and its failure if any.
fn accept_with(cfg: ReceiverConfig, local: LocalFile) -> (Vec<Message>, Option<TransferError>) {
    let size = 3 << 16;
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
            chunk_size: 1 << 17,
        },
        Message::ManifestEntries(vec![Entry {
            path: "same.bin".into(),
            kind: EntryKind::File,
            size,
            mtime: Timestamp::default(),
            mode: 0o644,
            link_target: String::new(),
        }]),
        Message::ManifestEnd,
    ] {
        m.encode(&mut control);
    }
    let now = Instant::now();
    let mut r = Receiver::new(cfg);
    r.handle_stream_data(now, Stream::Control, &control);
    let mut failure = None;
    while let Some(ev) = r.poll_event() {
        match ev {
            Event::ManifestReady => r.accept(now, HashMap::from([(0, local.clone())])),
            Event::Failed(e) => failure = Some(e),
            _ => {}
        }
    }
    let mut bytes = Vec::new();
    while let Some(b) = r.outbox().front(Stream::Control) {
        let b = b.clone();
        bytes.extend_from_slice(&b);
        r.outbox().advance(Stream::Control, b.len());
    }
    let mut msgs = Vec::new();
    let mut rest = &bytes[..];
    while let Some((m, used)) = flux_wire::decode_frame(rest).unwrap() {
        msgs.push(m);
        rest = &rest[used..];
    }
    (msgs.split_off(1), failure)
}

fn held() -> Vec<LocalFile> {
    let h = [chunk_hash(b"one"), chunk_hash(b"two")];
    vec![
        LocalFile::Existing(h.to_vec()),
        LocalFile::Partial(BTreeMap::from([(0, h[0])])),
    ]
}

/// Chunks claimed as held (an empty claim only says something is in the way).
fn claims(msgs: &[Message]) -> u32 {
    msgs.iter()
        .map(|m| match m {
            Message::Have { ranges, .. } => ranges.iter().map(|r| r.len).sum(),
            _ => 0,
        })
        .sum()
}

#[test]
fn held_files_are_claimed_by_default() {
    for local in held() {
        let (msgs, failure) = accept_with(ReceiverConfig::default(), local);
        assert_eq!(failure, None);
        assert!(claims(&msgs) > 0, "{msgs:?}");
    }
}

#[test]
fn without_skip_identical_nothing_held_is_claimed() {
    let cfg = ReceiverConfig {
        skip_identical: false,
        overwrite: true,
        ..ReceiverConfig::default()
    };
    for local in held() {
        let (msgs, failure) = accept_with(cfg.clone(), local);
        assert_eq!(failure, None);
        assert!(matches!(msgs[0], Message::Accept), "{msgs:?}");
        assert_eq!(claims(&msgs), 0, "{msgs:?}");
    }
    // An identical file is then a conflict, replaced only when overwriting is allowed.
    let cfg = ReceiverConfig {
        skip_identical: false,
        ..ReceiverConfig::default()
    };
    let (_, failure) = accept_with(cfg, held().remove(0));
    assert_eq!(failure, Some(TransferError::Exists("same.bin".into())));
}
