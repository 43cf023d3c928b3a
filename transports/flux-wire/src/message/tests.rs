use proptest::prelude::*;

use super::*;
use crate::codec::VARINT_MAX;
use crate::{MAX_FRAME_BODY, decode_frame, frame_len};

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>()
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}"))
        .expect("valid regex")
        .prop_filter("fits the byte limit", move |s| s.len() <= max)
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        text(64),
        prop_oneof![
            Just(EntryKind::File),
            Just(EntryKind::Dir),
            Just(EntryKind::Symlink),
            Just(EntryKind::Stream)
        ],
        0..=VARINT_MAX,
        any::<i64>(),
        0..1_000_000_000u32,
        0..=0o7777u32,
        text(32),
    )
        .prop_map(|(path, kind, size, secs, nanos, mode, link_target)| Entry {
            path,
            kind,
            size,
            mtime: Timestamp { secs, nanos },
            mode,
            link_target,
        })
}

fn message() -> impl Strategy<Value = Message> {
    let varint = 0..=VARINT_MAX;
    prop_oneof![
        (any::<u16>(), any::<u16>(), varint.clone()).prop_map(|(a, b, f)| Message::Hello {
            min_version: a,
            max_version: b,
            features: f
        }),
        (varint.clone(), any::<u64>(), any::<u32>()).prop_map(|(n, t, c)| {
            Message::ManifestBegin {
                entry_count: n,
                total_bytes: t,
                chunk_size: c,
            }
        }),
        proptest::collection::vec(entry(), 0..20).prop_map(Message::ManifestEntries),
        Just(Message::ManifestEnd),
        Just(Message::Accept),
        text(MAX_TEXT_BYTES).prop_map(|reason| Message::Reject { reason }),
        (
            any::<u32>(),
            proptest::collection::vec(
                (any::<u32>(), any::<u32>()).prop_map(|(start, len)| ChunkRange { start, len }),
                0..50
            ),
            hash()
        )
            .prop_map(|(file, ranges, digest)| Message::Have {
                file,
                ranges,
                digest
            }),
        Just(Message::HaveDone),
        (any::<u32>(), any::<bool>())
            .prop_map(|(file, accepted)| Message::Verdict { file, accepted }),
        (any::<u32>(), any::<u32>(), 0..=MAX_CHUNK_LEN, hash()).prop_map(
            |(file, index, len, hash)| Message::ChunkHeader {
                file,
                index,
                len,
                hash
            }
        ),
        (any::<u32>(), any::<u32>()).prop_map(|(file, index)| Message::Refetch { file, index }),
        (any::<u32>(), hash()).prop_map(|(file, digest)| Message::FileDone { file, digest }),
        (varint.clone(), varint).prop_map(|(b, f)| Message::Progress {
            bytes_done: b,
            files_done: f
        }),
        (
            any::<u16>(),
            proptest::option::of(any::<u32>()),
            text(MAX_TEXT_BYTES)
        )
            .prop_map(|(c, file, message)| Message::Error {
                code: ErrorCode::from_u16(c),
                file,
                message
            }),
        Just(Message::Complete),
        Just(Message::Close),
        proptest::collection::vec(
            (any::<u32>(), any::<u32>()).prop_map(|(start, len)| ChunkRange { start, len }),
            0..50
        )
        .prop_map(|ranges| Message::Select { ranges }),
        Just(Message::Browsed),
        any::<bool>().prop_map(|paused| Message::Pause { paused }),
        text(1000).prop_map(|body| Message::Text { body }),
        (
            any::<u32>(),
            any::<u32>(),
            0..=MAX_CHUNK_LEN,
            0..=MAX_CHUNK_LEN,
            hash()
        )
            .prop_map(|(file, index, len, wire_len, hash)| Message::ZChunkHeader {
                file,
                index,
                len,
                wire_len,
                hash
            }),
        (any::<u32>(), 0..=VARINT_MAX).prop_map(|(file, size)| Message::StreamEnd { file, size }),
    ]
}

#[test]
fn text_over_the_limit_is_refused() {
    let ok = Message::Text {
        body: "x".repeat(crate::MAX_MESSAGE_BYTES),
    };
    let mut out = Vec::new();
    ok.encode(&mut out);
    assert_eq!(decode_frame(&out).unwrap().unwrap().0, ok);
    let over = Message::Text {
        body: "x".repeat(crate::MAX_MESSAGE_BYTES + 1),
    };
    let mut out = Vec::new();
    over.encode(&mut out);
    assert!(matches!(
        decode_frame(&out),
        Err(DecodeError::TooLong { .. })
    ));
}

proptest! {
    #[test]
    fn round_trip(msg in message()) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        prop_assert_eq!(out.len(), msg.encoded_len());
        let (back, used) = decode_frame(&out).unwrap().unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error(msg in message()) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        for cut in 0..out.len() {
            prop_assert_eq!(decode_frame(&out[..cut]), Ok(None));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = frame_len(&data);
        let _ = decode_frame(&data);
    }

    #[test]
    fn mutated_frames_never_panic(msg in message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        for (at, b) in flips {
            let i = at % out.len();
            out[i] ^= b;
        }
        let _ = decode_frame(&out);
    }

    #[test]
    fn back_to_back_frames_split_correctly(msgs in proptest::collection::vec(message(), 1..10)) {
        let mut out = Vec::new();
        for m in &msgs {
            m.encode(&mut out);
        }
        let mut at = 0;
        for m in &msgs {
            let (back, used) = decode_frame(&out[at..]).unwrap().unwrap();
            prop_assert_eq!(&back, m);
            at += used;
        }
        prop_assert_eq!(at, out.len());
    }
}

fn frame(ty: MessageType, body: &[u8]) -> Vec<u8> {
    let mut out = vec![ty as u8];
    crate::put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(body);
    out
}

#[test]
fn unknown_type_is_refused() {
    assert_eq!(
        decode_frame(&[0x7f, 0]),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(decode_frame(&[0x00]), Err(DecodeError::UnknownType(0)));
}

#[test]
fn oversized_frame_is_refused_from_its_header() {
    // A 10 MB path: refused as soon as the length is readable, before the body arrives.
    let mut hdr = vec![MessageType::ManifestEntries as u8];
    crate::put_varint(&mut hdr, 10_000_000);
    assert_eq!(
        frame_len(&hdr),
        Err(DecodeError::FrameTooLarge {
            len: 10_000_000,
            max: MAX_FRAME_BODY as u64
        })
    );
}

#[test]
fn path_longer_than_limit_is_refused() {
    let mut body = Vec::new();
    crate::put_varint(&mut body, 1);
    crate::put_bytes(&mut body, &vec![b'a'; MAX_PATH_BYTES + 1]);
    body.extend_from_slice(&[0; 20]);
    assert_eq!(
        decode_frame(&frame(MessageType::ManifestEntries, &body)),
        Err(DecodeError::TooLong {
            len: MAX_PATH_BYTES as u64 + 1,
            max: MAX_PATH_BYTES as u64
        })
    );
}

#[test]
fn billion_entries_claim_is_refused_without_allocating() {
    let mut body = Vec::new();
    crate::put_varint(&mut body, 1_000_000_000);
    body.extend_from_slice(&[0; 64]);
    assert_eq!(
        decode_frame(&frame(MessageType::ManifestEntries, &body)),
        Err(DecodeError::BadLength)
    );
}

#[test]
fn invalid_utf8_path_is_refused() {
    let mut body = Vec::new();
    crate::put_varint(&mut body, 1);
    crate::put_bytes(&mut body, &[0xff, 0xfe]);
    body.extend_from_slice(&[0; 20]);
    assert_eq!(
        decode_frame(&frame(MessageType::ManifestEntries, &body)),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn trailing_bytes_are_refused() {
    assert_eq!(
        decode_frame(&frame(MessageType::Accept, &[0])),
        Err(DecodeError::TrailingBytes)
    );
}

#[test]
fn chunk_header_over_limit_is_refused() {
    let mut body = Vec::new();
    crate::put_varint(&mut body, 0);
    crate::put_varint(&mut body, 0);
    crate::put_varint(&mut body, u64::from(MAX_CHUNK_LEN) + 1);
    body.extend_from_slice(&[0; 32]);
    assert!(matches!(
        decode_frame(&frame(MessageType::ChunkHeader, &body)),
        Err(DecodeError::TooLong { .. })
    ));
}

#[test]
fn out_of_domain_fields_are_refused() {
    let bad_mode = Entry {
        path: "a".into(),
        kind: EntryKind::File,
        size: 0,
        mtime: Timestamp::default(),
        mode: 0o7777,
        link_target: String::new(),
    };
    let mut out = Vec::new();
    Message::ManifestEntries(vec![bad_mode]).encode(&mut out);
    // Flip the mode varint (0o7777 = 4095, two bytes) to 0o17777.
    let mode_at = out.len() - 3;
    out[mode_at] = 0x40 | 0x1f;
    assert_eq!(decode_frame(&out), Err(DecodeError::BadValue("mode bits")));
    assert_eq!(
        decode_frame(&frame(MessageType::Verdict, &[0, 2])),
        Err(DecodeError::BadValue("verdict flag"))
    );
}

#[test]
fn huge_total_decodes_so_the_transfer_layer_can_name_it() {
    // 2^64-1 bytes is well-formed on the wire; flux-transfer refuses it with a clear error.
    let m = Message::ManifestBegin {
        entry_count: 1,
        total_bytes: u64::MAX,
        chunk_size: 1 << 20,
    };
    let mut out = Vec::new();
    m.encode(&mut out);
    assert_eq!(decode_frame(&out).unwrap().unwrap().0, m);
}
