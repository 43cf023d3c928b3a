//! A hostile sender against a receiver, message by message: every case ends in a typed error
//! naming what was wrong, and no disk request is ever issued (nothing is written anywhere).

// Tests are drivers: they may read the clock the machines take as input.
#![allow(clippy::disallowed_methods)]

use std::time::Instant;

use flux_transfer::{Event, Receiver, ReceiverConfig, Stream, TransferError};
use flux_wire::{Entry, EntryKind, Message, Timestamp};

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

fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

fn hello() -> Message {
    Message::Hello {
        min_version: 1,
        max_version: 1,
        features: 0,
    }
}

fn manifest(entries: Vec<Entry>) -> Vec<Message> {
    let total = entries.iter().map(|e| e.size).sum();
    vec![
        hello(),
        Message::ManifestBegin {
            entry_count: entries.len() as u64,
            total_bytes: total,
            chunk_size: 1 << 20,
        },
        Message::ManifestEntries(entries),
        Message::ManifestEnd,
    ]
}

/// Feeds control bytes, accepting the manifest if one completes; returns the failure.
fn run(control: &[u8], lane: Option<&[u8]>) -> TransferError {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    r.handle_stream_data(now, Stream::Control, control);
    let mut failure = None;
    while let Some(ev) = r.poll_event() {
        match ev {
            Event::ManifestReady => r.accept(now, Default::default()),
            Event::Failed(e) => failure = Some(e),
            _ => {}
        }
    }
    // Directory finalizes are the only legitimate requests before data; none of these cases
    // has directories, so any disk request at all would be a defect.
    if let Some(lane) = lane {
        r.handle_stream_data(now, Stream::Lane(0), lane);
        while let Some(ev) = r.poll_event() {
            if let Event::Failed(e) = ev {
                failure = Some(e);
            }
        }
    }
    assert!(
        r.poll_disk().is_none(),
        "a hostile sender caused a disk request"
    );
    assert!(r.is_over());
    failure.expect("the receiver must fail")
}

fn manifest_err(entries: Vec<Entry>) -> String {
    match run(&frames(&manifest(entries)), None) {
        TransferError::Manifest(e) => e.to_string(),
        other => panic!("expected a manifest error, got {other:?}"),
    }
}

#[test]
fn unsafe_paths_are_refused_by_name() {
    for (path, needle) in [
        ("../x", "\"..\""),
        ("/etc/x", "absolute"),
        ("a/../../x", "\"..\""),
        ("C:\\x", "reserved character"),
        ("CON", "reserved device name"),
        ("x.", "ends in a dot or space"),
        ("a\u{1b}[31mred", "control character"),
    ] {
        let msg = manifest_err(vec![file(path, 1)]);
        assert!(msg.contains(needle), "{path:?}: {msg}");
        assert!(
            msg.contains("entry"),
            "{path:?}: error must name the entry: {msg}"
        );
    }
}

#[test]
fn ten_megabyte_name_is_refused_at_the_frame_header() {
    let mut control = frames(&[
        hello(),
        Message::ManifestBegin {
            entry_count: 1,
            total_bytes: 1,
            chunk_size: 1 << 20,
        },
    ]);
    control.extend(frames(&[Message::ManifestEntries(vec![file(
        &"n".repeat(10_000_000),
        1,
    )])]));
    let e = run(&control, None);
    assert!(
        matches!(
            e,
            TransferError::Decode(flux_wire::DecodeError::FrameTooLarge { .. })
        ),
        "{e:?}"
    );
}

#[test]
fn absurd_totals_and_counts_are_refused_up_front() {
    let big = run(
        &frames(&[
            hello(),
            Message::ManifestBegin {
                entry_count: 1,
                total_bytes: u64::MAX,
                chunk_size: 1 << 20,
            },
        ]),
        None,
    );
    assert!(
        big.to_string().contains("18446744073709551615 bytes"),
        "{big}"
    );
    let many = run(
        &frames(&[
            hello(),
            Message::ManifestBegin {
                entry_count: 1_000_000_000,
                total_bytes: 0,
                chunk_size: 1 << 20,
            },
        ]),
        None,
    );
    assert!(many.to_string().contains("1000000000 entries"), "{many}");
}

#[test]
fn duplicate_and_clashing_entries_are_refused() {
    let dup = manifest_err(vec![file("a", 1), file("a", 1)]);
    assert!(dup.contains("\"a\" appears more than once"), "{dup}");
    let mut d = file("a", 0);
    d.kind = EntryKind::Dir;
    let clash = manifest_err(vec![file("a", 1), d]);
    assert!(clash.contains("\"a\" appears more than once"), "{clash}");
}

#[test]
fn link_leading_outside_is_refused() {
    let mut l = file("l", 0);
    l.kind = EntryKind::Symlink;
    l.link_target = "../../etc/passwd".into();
    let msg = manifest_err(vec![l]);
    assert!(msg.contains("leads outside"), "{msg}");
}

/// Issue 13, item 2: each link alone stays inside lexically, but `notes.txt` passes through
/// `l1` (itself ten levels up), which the kernel follows: together they reach `/etc/passwd`.
#[test]
fn link_chain_through_another_link_is_refused_naming_both() {
    let link = |path: &str, target: &str| Entry {
        kind: EntryKind::Symlink,
        link_target: target.into(),
        ..file(path, 0)
    };
    let l1 = "a1/a2/a3/a4/a5/a6/a7/a8/a9/a10/l1";
    let target = format!("{l1}/{}/etc/passwd", [".."; 11].join("/"));
    let msg = manifest_err(vec![
        link("notes.txt", &target),
        link(l1, &[".."; 10].join("/")),
    ]);
    assert!(msg.contains("\"notes.txt\""), "must name the link: {msg}");
    assert!(msg.contains(&target), "must name its target: {msg}");
    assert!(msg.contains(l1), "must name the link passed through: {msg}");
}

#[test]
fn chunk_beyond_end_and_wrong_length_are_refused() {
    let control = frames(&manifest(vec![file("f", 100)]));
    let beyond = frames(&[Message::ChunkHeader {
        file: 0,
        index: 1,
        len: 100,
        hash: [0; 32],
    }]);
    let e = run(&control, Some(&beyond));
    assert!(e.to_string().contains("beyond the end of f"), "{e}");
    let wrong = frames(&[Message::ChunkHeader {
        file: 0,
        index: 0,
        len: 99,
        hash: [0; 32],
    }]);
    let e = run(&control, Some(&wrong));
    assert!(
        e.to_string()
            .contains("announces 99 bytes but the manifest implies 100"),
        "{e}"
    );
}

#[test]
fn data_before_acceptance_is_refused() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    r.handle_stream_data(
        now,
        Stream::Control,
        &frames(&manifest(vec![file("f", 100)])),
    );
    r.handle_stream_data(
        now,
        Stream::Lane(0),
        &frames(&[Message::ChunkHeader {
            file: 0,
            index: 0,
            len: 100,
            hash: [0; 32],
        }]),
    );
    assert!(r.is_over());
    assert!(r.poll_disk().is_none());
}

fn stream_entry(size: u64) -> Entry {
    Entry {
        kind: EntryKind::Stream,
        ..file("stdin", size)
    }
}

/// Accepts a one-stream manifest, then feeds `control` and `lane` bytes; returns the failure.
fn run_stream(control: &[Message], lane: &[Message]) -> TransferError {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    r.handle_stream_data(
        now,
        Stream::Control,
        &frames(&manifest(vec![stream_entry(0)])),
    );
    let mut failure = None;
    let mut drain = |r: &mut Receiver| {
        while let Some(ev) = r.poll_event() {
            match ev {
                Event::ManifestReady => r.accept(now, Default::default()),
                Event::Failed(e) => failure = Some(e),
                _ => {}
            }
        }
    };
    drain(&mut r);
    r.handle_stream_data(now, Stream::Lane(0), &frames(lane));
    drain(&mut r);
    r.handle_stream_data(now, Stream::Control, &frames(control));
    drain(&mut r);
    assert!(
        r.poll_disk().is_none(),
        "a hostile sender caused a disk request"
    );
    failure.expect("the receiver must fail")
}

#[test]
fn a_stream_must_come_alone_and_sizeless() {
    let e = manifest_err(vec![stream_entry(0), file("f", 1)]);
    assert!(
        e.contains("is a stream, which must be the only entry"),
        "{e}"
    );
    let e = manifest_err(vec![stream_entry(10)]);
    assert!(e.contains("is a stream"), "{e}");
}

#[test]
fn stream_chunks_and_ends_that_do_not_fit_are_refused() {
    let header = |index, len| Message::ChunkHeader {
        file: 0,
        index,
        len,
        hash: [0; 32],
    };
    let e = run_stream(&[], &[header(0, 0)]);
    assert!(e.to_string().contains("a stream's chunks hold 1 to"), "{e}");
    let e = run_stream(&[], &[header(0, (1 << 20) + 1)]);
    assert!(e.to_string().contains("a stream's chunks hold 1 to"), "{e}");
    let end = |size| Message::StreamEnd { file: 0, size };
    let e = run_stream(&[end(5), end(5)], &[]);
    assert!(e.to_string().contains("has ended already"), "{e}");
    let e = run_stream(&[end(1 << 60)], &[]);
    assert!(e.to_string().contains("over the limit"), "{e}");
    let e = run_stream(&[Message::StreamEnd { file: 3, size: 1 }], &[]);
    assert!(e.to_string().contains("not being received"), "{e}");
}
