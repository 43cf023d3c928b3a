//! The Thruflux transfer protocol on the wire: typed messages and their binary encoding.
//!
//! This crate turns [`Message`] values into bytes and untrusted bytes back into messages. It does
//! no I/O, keeps no state between frames and knows nothing of QUIC: the caller cuts a stream into
//! frames with [`decode_frame`] and hands the results to the transfer state machines
//! (`flux-transfer`), which decide whether a well-formed message is also a *sensible* one.
//!
//! # Message flow
//!
//! ```text
//! receiver (QUIC client)                              sender (QUIC server)
//!   control stream (bidirectional, opened by the receiver)
//!   Hello ───────────────────────────────────────────▶
//!        ◀──────────────────────────────────────────── Hello
//!        ◀──── Text (only with --text), ManifestBegin, ManifestEntries…, ManifestEnd
//!   Select (optional: only these entries) ───────────▶
//!   Accept | Reject | Browsed ───────────────────────▶
//!   Have… (resume claims), HaveDone ─────────────────▶
//!        ◀──────────────────────────────────────────── Verdict (one per Have)
//!   data lanes (unidirectional, opened by the sender)
//!        ◀──── ChunkHeader + raw chunk bytes (or ZChunkHeader + a zstd frame), repeated
//!   control stream again
//!   Refetch (a chunk failed verification) ───────────▶
//!        ◀──────────────────────────────────────────── FileDone (whole-file digest)
//!   Progress, Pause (on/off) ────────────────────────▶
//!   Complete ────────────────────────────────────────▶
//!        ◀──────────────────────────────────────────── Close
//!   Error may travel either way at any time and ends the transfer.
//! ```
//!
//! # Encoding
//!
//! A frame is `type: u8 | body_len: varint | body`. Integers that are usually small are QUIC
//! varints; hashes are 32 raw bytes; strings are varint-length-prefixed UTF-8. A
//! [`Message::ChunkHeader`] frame is followed on its stream by exactly `len` raw payload bytes,
//! which are not part of the frame.
//!
//! # Bounds on untrusted input
//!
//! - A frame body is at most [`MAX_FRAME_BODY`] bytes; a longer claim fails before any byte of
//!   the body is buffered by a caller that checks [`frame_len`] first.
//! - Paths are at most [`MAX_PATH_BYTES`], free text at most [`MAX_TEXT_BYTES`].
//! - Element counts are checked against the bytes that remain, so a decoded message never holds
//!   more elements than its body could encode. The heap a decoded message owns is therefore at
//!   most about 32 × its body length (an [`Entry`] is ~80 bytes of struct for a 3-byte minimum
//!   encoding) — under 32 MiB for the largest frame.
//! - The decoder never panics; every failure is a [`DecodeError`].

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod codec;
mod message;

pub use codec::{Reader, VARINT_MAX, put_bytes, put_varint, varint_len};
pub use message::{ChunkRange, Entry, EntryKind, ErrorCode, Hash, Message, MessageType, Timestamp};

/// Highest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Lowest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest frame body accepted, in bytes.
pub const MAX_FRAME_BODY: usize = 1 << 20;
/// Largest relative path accepted, in bytes of UTF-8.
pub const MAX_PATH_BYTES: usize = 4096;
/// Largest free-text field (reasons, error messages) accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Hello feature bit: this side speaks [`Message::Select`] and [`Message::Browsed`]
/// (receiving a chosen subset, browsing without receiving).
pub const FEATURE_SELECT: u64 = 1 << 10;
/// Hello feature bit: this side speaks [`Message::Pause`].
pub const FEATURE_PAUSE: u64 = 1 << 11;
/// Largest chunk a [`Message::ChunkHeader`] may announce.
pub const MAX_CHUNK_LEN: u32 = 64 << 20;
/// Largest [`Message::Text`] body, in bytes of UTF-8 (`thru host --text`).
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// [`Message::Hello`] feature bit: this side understands [`Message::Text`].
///
/// Feature bits are independent: a side ignores bits it does not know, and uses a feature only
/// when both hellos carry its bit, so an older peer still works without it.
pub const FEATURE_TEXT: u64 = 1 << 8;
/// [`Message::Hello`] feature bit: this side can receive zstd-compressed chunks
/// ([`Message::ZChunkHeader`]).
pub const FEATURE_ZSTD: u64 = 1 << 9;
/// [`Message::Hello`] feature bit, receiver only: it writes to a pipe (`thru join --out -`), so
/// the sender should send each file's chunks in order on one lane.
///
/// Bits in use: 8 text, 9 zstd, 10 select, 11 pause, 12 in order, 13 stream. Take the next
/// free one.
pub const FEATURE_IN_ORDER: u64 = 1 << 12;
/// [`Message::Hello`] feature bit: this side can receive a stream entry ([`EntryKind::Stream`],
/// [`Message::StreamEnd`]): a file whose size is known only at its end (`thru host -`).
pub const FEATURE_STREAM: u64 = 1 << 13;

/// Why bytes did not decode. Small and `Copy`: it is the lowest of the three error tiers (see the
/// transfer crate for protocol and local errors).
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("unexpected end of input")]
    UnexpectedEnd,
    /// A count or length cannot be right for the bytes that follow.
    #[error("length or count inconsistent with the data")]
    BadLength,
    /// A frame body had bytes left over after its message.
    #[error("trailing bytes after message")]
    TrailingBytes,
    /// A frame type this version does not know.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A frame body longer than [`MAX_FRAME_BODY`].
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Claimed body length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A string or byte field longer than its limit.
    #[error("field of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Claimed length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A text field that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A field value outside its domain.
    #[error("invalid value: {0}")]
    BadValue(&'static str),
}

/// Length of the complete frame at the start of `buf`, once its header is readable.
///
/// `Ok(None)` means more bytes are needed to read the header. The length is checked against
/// [`MAX_FRAME_BODY`] here, so a caller that buffers a stream can refuse an oversized frame before
/// buffering its body.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    MessageType::from_u8(ty).ok_or(DecodeError::UnknownType(ty))?;
    let mut r = Reader::new(&buf[1..]);
    let body = match r.varint() {
        Ok(v) => v,
        Err(DecodeError::UnexpectedEnd) => return Ok(None),
        Err(e) => return Err(e),
    };
    if body > MAX_FRAME_BODY as u64 {
        return Err(DecodeError::FrameTooLarge {
            len: body,
            max: MAX_FRAME_BODY as u64,
        });
    }
    // body <= MAX_FRAME_BODY, so this cannot overflow.
    Ok(Some(1 + varint_len(body) + body as usize))
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame, or the message and the number of
/// bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let ty = MessageType::from_u8(buf[0]).ok_or(DecodeError::UnknownType(buf[0]))?;
    let mut r = Reader::new(&buf[1..total]);
    r.varint()?;
    let msg = Message::decode_body(ty, &mut r)?;
    r.finish()?;
    Ok(Some((msg, total)))
}

/// Entry points for the cargo-fuzz targets; not a stable API.
#[cfg(feature = "__fuzzing")]
pub mod fuzzing {
    use super::*;

    /// Decodes frames back to back until the input ends or fails; every message that decodes is
    /// re-encoded and must decode to itself with the same length.
    pub fn decode_stream(mut data: &[u8]) {
        while let Ok(Some((msg, used))) = decode_frame(data) {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out.len(), msg.encoded_len(), "encoded_len for {msg:?}");
            let again = decode_frame(&out);
            assert!(
                matches!(&again, Ok(Some((m, n))) if *m == msg && *n == out.len()),
                "re-decode of {msg:?} gave {again:?}"
            );
            data = &data[used..];
        }
    }
}
