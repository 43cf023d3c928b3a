//! The messages of the transfer protocol and their encodings.

use crate::codec::{Reader, bytes_len, put_bytes, put_varint, varint_len};
use crate::{DecodeError, MAX_CHUNK_LEN, MAX_MESSAGE_BYTES, MAX_PATH_BYTES, MAX_TEXT_BYTES};

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// One message of the transfer protocol. See the crate docs for who sends what, and when.
#[derive(Clone, Debug, Eq, PartialEq)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum Message {
    /// First message each way: the protocol versions a side speaks.
    Hello {
        /// Lowest version spoken.
        min_version: u16,
        /// Highest version spoken.
        max_version: u16,
        /// Optional-feature bits; unknown bits are ignored.
        features: u64,
    },
    /// Opens the manifest: how many entries follow and how large the share is.
    ManifestBegin {
        /// Entries that will follow in [`Message::ManifestEntries`] frames.
        entry_count: u64,
        /// Sum of all file sizes.
        total_bytes: u64,
        /// Chunk size used for every file of this transfer.
        chunk_size: u32,
    },
    /// A batch of manifest entries, in order.
    ManifestEntries(Vec<Entry>),
    /// Closes the manifest.
    ManifestEnd,
    /// The receiver accepts the share.
    Accept,
    /// The receiver declines the share.
    Reject {
        /// Why, for the sender's log.
        reason: String,
    },
    /// Resume claim: the receiver already holds these verified chunks of `file`.
    Have {
        /// Index of the file in the manifest.
        file: u32,
        /// Chunks held, as ranges.
        ranges: Vec<ChunkRange>,
        /// BLAKE3 over the held chunks' hashes in index order (see `flux-transfer`).
        digest: Hash,
    },
    /// The receiver has sent all its [`Message::Have`] claims.
    HaveDone,
    /// The sender's answer to one [`Message::Have`].
    Verdict {
        /// Index of the file in the manifest.
        file: u32,
        /// Whether the claimed chunks match the sender's file.
        accepted: bool,
    },
    /// Precedes `len` raw bytes of chunk `index` of `file` on a data lane.
    ChunkHeader {
        /// Index of the file in the manifest.
        file: u32,
        /// Chunk index within the file.
        index: u32,
        /// Payload bytes that follow.
        len: u32,
        /// BLAKE3 of the payload.
        hash: Hash,
    },
    /// The receiver asks for a chunk again (it failed verification).
    Refetch {
        /// Index of the file in the manifest.
        file: u32,
        /// Chunk index within the file.
        index: u32,
    },
    /// The sender has sent every missing chunk of `file`; `digest` closes it.
    FileDone {
        /// Index of the file in the manifest.
        file: u32,
        /// Whole-file digest (see `flux-transfer`).
        digest: Hash,
    },
    /// Receiver progress, for the sender's display.
    Progress {
        /// Verified bytes, including those held before the transfer.
        bytes_done: u64,
        /// Completed files.
        files_done: u64,
    },
    /// A fatal error; the transfer ends.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// The file concerned, if any.
        file: Option<u32>,
        /// Human-readable detail.
        message: String,
    },
    /// The receiver has every file, verified and in place.
    Complete,
    /// The sender acknowledges [`Message::Complete`]; the connection may close.
    Close,
    /// Receiver, before [`Message::Accept`]: only these manifest entries are wanted (runs of
    /// entry indices, ascending; a [`ChunkRange`] here counts entries, not chunks). Entries
    /// outside them are neither sent nor expected. Sent only to a sender whose hello carries
    /// [`crate::FEATURE_SELECT`].
    Select {
        /// The chosen entries.
        ranges: Vec<ChunkRange>,
    },
    /// Receiver, instead of an answer: it only looked at the manifest (`thru join --list`)
    /// and wants nothing now. Not a refusal: the sender may serve it again later. Needs
    /// [`crate::FEATURE_SELECT`].
    Browsed,
    /// Receiver: pause (`true`) or resume (`false`) the transfer. While paused the receiver
    /// stops reading the data lanes (flow control holds the sender) and neither side counts
    /// the silence as a stall. Needs [`crate::FEATURE_PAUSE`].
    Pause {
        /// Paused after this message.
        paused: bool,
    },
    /// A short text the sender offers instead of (or beside) files, before the manifest; only
    /// sent to a receiver whose hello has [`FEATURE_TEXT`](crate::FEATURE_TEXT).
    Text {
        /// The text, at most [`MAX_MESSAGE_BYTES`].
        body: String,
    },
    /// Precedes `wire_len` bytes of a zstd frame that decompresses to chunk `index` of `file`
    /// (`len` plain bytes, hashed as plain bytes); only sent to a receiver whose hello has
    /// [`FEATURE_ZSTD`](crate::FEATURE_ZSTD).
    ZChunkHeader {
        /// Index of the file in the manifest.
        file: u32,
        /// Chunk index within the file.
        index: u32,
        /// Plain bytes the payload decompresses to.
        len: u32,
        /// Compressed payload bytes that follow.
        wire_len: u32,
        /// BLAKE3 of the plain bytes.
        hash: Hash,
    },
    /// Sender: the stream entry `file` ([`EntryKind::Stream`]) ended after `size` bytes; its
    /// chunks are those that cover `size`, and its [`Message::FileDone`] follows. Only sent to
    /// a receiver whose hello has [`FEATURE_STREAM`](crate::FEATURE_STREAM).
    StreamEnd {
        /// Index of the stream entry in the manifest.
        file: u32,
        /// Bytes the stream held.
        size: u64,
    },
}

/// One entry of the manifest.
#[derive(Clone, Debug, Eq, PartialEq)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
pub struct Entry {
    /// Relative path, `/`-separated. Validated by the receiver, never trusted.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Size in bytes (0 for directories and links).
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Unix permission bits (`0o7777` at most).
    pub mode: u32,
    /// Target of a symbolic link (empty otherwise).
    pub link_target: String,
}

/// Kinds of manifest entries.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory (sent so that empty directories arrive too).
    Dir,
    /// A symbolic link; the receiver only creates links that stay inside the destination.
    Symlink,
    /// A regular file whose size is not known when it is offered (`thru host -` reads stdin):
    /// its manifest size is 0 and [`Message::StreamEnd`] gives the real one. Only offered to a
    /// receiver whose hello has [`FEATURE_STREAM`](crate::FEATURE_STREAM).
    Stream,
}

impl EntryKind {
    /// Whether entries of this kind carry bytes in chunks (files and streams).
    pub fn has_data(self) -> bool {
        matches!(self, Self::File | Self::Stream)
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, Eq, Hash, Ord, PartialEq, PartialOrd)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
pub struct Timestamp {
    /// Whole seconds (negative before 1970).
    pub secs: i64,
    /// Nanoseconds, below 10^9.
    pub nanos: u32,
}

/// A run of chunk indices `[start, start + len)`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
pub struct ChunkRange {
    /// First chunk.
    pub start: u32,
    /// Number of chunks.
    pub len: u32,
}

/// Stable error codes carried by [`Message::Error`].
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[cfg_attr(feature = "__fuzzing", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer broke the protocol.
    Protocol,
    /// No protocol version in common.
    VersionMismatch,
    /// The manifest is unacceptable (unsafe path, limits, duplicates).
    BadManifest,
    /// A local disk operation failed.
    Io,
    /// A destination file exists and overwriting was not allowed.
    Exists,
    /// The user cancelled.
    Cancelled,
    /// A chunk kept failing verification.
    Integrity,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The numeric wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Protocol => 1,
            Self::VersionMismatch => 2,
            Self::BadManifest => 3,
            Self::Io => 4,
            Self::Exists => 5,
            Self::Cancelled => 6,
            Self::Integrity => 7,
            Self::Other(v) => v,
        }
    }

    /// The code for a wire value; unknown values are kept as [`ErrorCode::Other`].
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Protocol,
            2 => Self::VersionMismatch,
            3 => Self::BadManifest,
            4 => Self::Io,
            5 => Self::Exists,
            6 => Self::Cancelled,
            7 => Self::Integrity,
            v => Self::Other(v),
        }
    }
}

/// The frame type byte of each message.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum MessageType {
    Hello = 0x01,
    ManifestBegin = 0x02,
    ManifestEntries = 0x03,
    ManifestEnd = 0x04,
    Accept = 0x05,
    Reject = 0x06,
    Have = 0x07,
    HaveDone = 0x08,
    Verdict = 0x09,
    ChunkHeader = 0x0a,
    Refetch = 0x0b,
    FileDone = 0x0c,
    Progress = 0x0d,
    Error = 0x0e,
    Complete = 0x0f,
    Close = 0x10,
    Select = 0x22,
    Browsed = 0x23,
    Pause = 0x24,
    Text = 0x20,
    ZChunkHeader = 0x21,
    StreamEnd = 0x25,
}

impl MessageType {
    /// The type for a frame's first byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        use MessageType::*;
        Some(match b {
            0x01 => Hello,
            0x02 => ManifestBegin,
            0x03 => ManifestEntries,
            0x04 => ManifestEnd,
            0x05 => Accept,
            0x06 => Reject,
            0x07 => Have,
            0x08 => HaveDone,
            0x09 => Verdict,
            0x0a => ChunkHeader,
            0x0b => Refetch,
            0x0c => FileDone,
            0x0d => Progress,
            0x0e => Error,
            0x0f => Complete,
            0x10 => Close,
            0x22 => Select,
            0x23 => Browsed,
            0x24 => Pause,
            0x20 => Text,
            0x21 => ZChunkHeader,
            0x25 => StreamEnd,
            _ => return None,
        })
    }
}

impl Message {
    /// The frame type of this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Hello { .. } => MessageType::Hello,
            Self::ManifestBegin { .. } => MessageType::ManifestBegin,
            Self::ManifestEntries(_) => MessageType::ManifestEntries,
            Self::ManifestEnd => MessageType::ManifestEnd,
            Self::Accept => MessageType::Accept,
            Self::Reject { .. } => MessageType::Reject,
            Self::Have { .. } => MessageType::Have,
            Self::HaveDone => MessageType::HaveDone,
            Self::Verdict { .. } => MessageType::Verdict,
            Self::ChunkHeader { .. } => MessageType::ChunkHeader,
            Self::Refetch { .. } => MessageType::Refetch,
            Self::FileDone { .. } => MessageType::FileDone,
            Self::Progress { .. } => MessageType::Progress,
            Self::Error { .. } => MessageType::Error,
            Self::Complete => MessageType::Complete,
            Self::Close => MessageType::Close,
            Self::Select { .. } => MessageType::Select,
            Self::Browsed => MessageType::Browsed,
            Self::Pause { .. } => MessageType::Pause,
            Self::Text { .. } => MessageType::Text,
            Self::ZChunkHeader { .. } => MessageType::ZChunkHeader,
            Self::StreamEnd { .. } => MessageType::StreamEnd,
        }
    }

    /// Bytes [`Message::encode`] will append.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        1 + varint_len(body as u64) + body
    }

    /// Appends the frame for this message.
    ///
    /// Encoding never fails; it is the caller's job to keep values within the limits the decoder
    /// enforces (the transfer machines build messages only from validated values).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(self.message_type() as u8);
        put_varint(out, self.body_len() as u64);
        match self {
            Self::Hello {
                min_version,
                max_version,
                features,
            } => {
                out.extend_from_slice(&min_version.to_be_bytes());
                out.extend_from_slice(&max_version.to_be_bytes());
                put_varint(out, *features);
            }
            Self::ManifestBegin {
                entry_count,
                total_bytes,
                chunk_size,
            } => {
                put_varint(out, *entry_count);
                out.extend_from_slice(&total_bytes.to_be_bytes());
                put_varint(out, u64::from(*chunk_size));
            }
            Self::ManifestEntries(entries) => {
                put_varint(out, entries.len() as u64);
                for e in entries {
                    e.encode(out);
                }
            }
            Self::Reject { reason } => put_bytes(out, reason.as_bytes()),
            Self::Have {
                file,
                ranges,
                digest,
            } => {
                put_varint(out, u64::from(*file));
                put_varint(out, ranges.len() as u64);
                for r in ranges {
                    put_varint(out, u64::from(r.start));
                    put_varint(out, u64::from(r.len));
                }
                out.extend_from_slice(digest);
            }
            Self::Verdict { file, accepted } => {
                put_varint(out, u64::from(*file));
                out.push(u8::from(*accepted));
            }
            Self::ChunkHeader {
                file,
                index,
                len,
                hash,
            } => {
                put_varint(out, u64::from(*file));
                put_varint(out, u64::from(*index));
                put_varint(out, u64::from(*len));
                out.extend_from_slice(hash);
            }
            Self::Refetch { file, index } => {
                put_varint(out, u64::from(*file));
                put_varint(out, u64::from(*index));
            }
            Self::FileDone { file, digest } => {
                put_varint(out, u64::from(*file));
                out.extend_from_slice(digest);
            }
            Self::Progress {
                bytes_done,
                files_done,
            } => {
                put_varint(out, *bytes_done);
                put_varint(out, *files_done);
            }
            Self::Error {
                code,
                file,
                message,
            } => {
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                match file {
                    None => out.push(0),
                    Some(f) => {
                        out.push(1);
                        put_varint(out, u64::from(*f));
                    }
                }
                put_bytes(out, message.as_bytes());
            }
            Self::Select { ranges } => {
                put_varint(out, ranges.len() as u64);
                for r in ranges {
                    put_varint(out, u64::from(r.start));
                    put_varint(out, u64::from(r.len));
                }
            }
            Self::Pause { paused } => out.push(u8::from(*paused)),
            Self::StreamEnd { file, size } => {
                put_varint(out, u64::from(*file));
                put_varint(out, *size);
            }
            Self::Text { body } => put_bytes(out, body.as_bytes()),
            Self::ZChunkHeader {
                file,
                index,
                len,
                wire_len,
                hash,
            } => {
                put_varint(out, u64::from(*file));
                put_varint(out, u64::from(*index));
                put_varint(out, u64::from(*len));
                put_varint(out, u64::from(*wire_len));
                out.extend_from_slice(hash);
            }
            Self::ManifestEnd
            | Self::Accept
            | Self::HaveDone
            | Self::Complete
            | Self::Close
            | Self::Browsed => {}
        }
    }

    fn body_len(&self) -> usize {
        let v = |x: u64| varint_len(x);
        match self {
            Self::Hello { features, .. } => 4 + v(*features),
            Self::ManifestBegin {
                entry_count,
                chunk_size,
                ..
            } => v(*entry_count) + 8 + v(u64::from(*chunk_size)),
            Self::ManifestEntries(entries) => {
                v(entries.len() as u64) + entries.iter().map(Entry::encoded_len).sum::<usize>()
            }
            Self::Reject { reason } => bytes_len(reason.len()),
            Self::Have { file, ranges, .. } => {
                v(u64::from(*file))
                    + v(ranges.len() as u64)
                    + ranges
                        .iter()
                        .map(|r| v(u64::from(r.start)) + v(u64::from(r.len)))
                        .sum::<usize>()
                    + 32
            }
            Self::Verdict { file, .. } => v(u64::from(*file)) + 1,
            Self::ChunkHeader {
                file, index, len, ..
            } => v(u64::from(*file)) + v(u64::from(*index)) + v(u64::from(*len)) + 32,
            Self::Refetch { file, index } => v(u64::from(*file)) + v(u64::from(*index)),
            Self::FileDone { file, .. } => v(u64::from(*file)) + 32,
            Self::Progress {
                bytes_done,
                files_done,
            } => v(*bytes_done) + v(*files_done),
            Self::Error { file, message, .. } => {
                2 + 1 + file.map_or(0, |f| v(u64::from(f))) + bytes_len(message.len())
            }
            Self::Select { ranges } => {
                v(ranges.len() as u64)
                    + ranges
                        .iter()
                        .map(|r| v(u64::from(r.start)) + v(u64::from(r.len)))
                        .sum::<usize>()
            }
            Self::Pause { .. } => 1,
            Self::StreamEnd { file, size } => v(u64::from(*file)) + v(*size),
            Self::Text { body } => bytes_len(body.len()),
            Self::ZChunkHeader {
                file,
                index,
                len,
                wire_len,
                ..
            } => {
                v(u64::from(*file))
                    + v(u64::from(*index))
                    + v(u64::from(*len))
                    + v(u64::from(*wire_len))
                    + 32
            }
            Self::ManifestEnd
            | Self::Accept
            | Self::HaveDone
            | Self::Complete
            | Self::Close
            | Self::Browsed => 0,
        }
    }

    pub(crate) fn decode_body(ty: MessageType, r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match ty {
            MessageType::Hello => Self::Hello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                features: r.varint()?,
            },
            MessageType::ManifestBegin => Self::ManifestBegin {
                entry_count: r.varint()?,
                total_bytes: r.u64()?,
                chunk_size: r.varint_u32()?,
            },
            MessageType::ManifestEntries => {
                let n = r.count(Entry::MIN_ENCODED_LEN)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(Entry::decode(r)?);
                }
                Self::ManifestEntries(entries)
            }
            MessageType::ManifestEnd => Self::ManifestEnd,
            MessageType::Accept => Self::Accept,
            MessageType::Reject => Self::Reject {
                reason: r.string(MAX_TEXT_BYTES)?,
            },
            MessageType::Have => {
                let file = r.varint_u32()?;
                // The 32-byte digest follows the ranges; each range is at least 2 bytes.
                let n = r.count(2)?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push(ChunkRange {
                        start: r.varint_u32()?,
                        len: r.varint_u32()?,
                    });
                }
                Self::Have {
                    file,
                    ranges,
                    digest: r.array()?,
                }
            }
            MessageType::HaveDone => Self::HaveDone,
            MessageType::Verdict => Self::Verdict {
                file: r.varint_u32()?,
                accepted: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadValue("verdict flag")),
                },
            },
            MessageType::ChunkHeader => {
                let file = r.varint_u32()?;
                let index = r.varint_u32()?;
                let len = r.varint_u32()?;
                if len > MAX_CHUNK_LEN {
                    return Err(DecodeError::TooLong {
                        len: u64::from(len),
                        max: u64::from(MAX_CHUNK_LEN),
                    });
                }
                Self::ChunkHeader {
                    file,
                    index,
                    len,
                    hash: r.array()?,
                }
            }
            MessageType::Refetch => Self::Refetch {
                file: r.varint_u32()?,
                index: r.varint_u32()?,
            },
            MessageType::FileDone => Self::FileDone {
                file: r.varint_u32()?,
                digest: r.array()?,
            },
            MessageType::Progress => Self::Progress {
                bytes_done: r.varint()?,
                files_done: r.varint()?,
            },
            MessageType::Error => Self::Error {
                code: ErrorCode::from_u16(r.u16()?),
                file: match r.u8()? {
                    0 => None,
                    1 => Some(r.varint_u32()?),
                    _ => return Err(DecodeError::BadValue("optional file flag")),
                },
                message: r.string(MAX_TEXT_BYTES)?,
            },
            MessageType::Complete => Self::Complete,
            MessageType::Close => Self::Close,
            MessageType::Select => {
                let n = r.count(2)?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push(ChunkRange {
                        start: r.varint_u32()?,
                        len: r.varint_u32()?,
                    });
                }
                Self::Select { ranges }
            }
            MessageType::Browsed => Self::Browsed,
            MessageType::Pause => Self::Pause {
                paused: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadValue("pause flag")),
                },
            },
            MessageType::Text => Self::Text {
                body: r.string(MAX_MESSAGE_BYTES)?,
            },
            MessageType::StreamEnd => Self::StreamEnd {
                file: r.varint_u32()?,
                size: r.varint()?,
            },
            MessageType::ZChunkHeader => {
                let file = r.varint_u32()?;
                let index = r.varint_u32()?;
                let len = r.varint_u32()?;
                let wire_len = r.varint_u32()?;
                for n in [len, wire_len] {
                    if n > MAX_CHUNK_LEN {
                        return Err(DecodeError::TooLong {
                            len: u64::from(n),
                            max: u64::from(MAX_CHUNK_LEN),
                        });
                    }
                }
                Self::ZChunkHeader {
                    file,
                    index,
                    len,
                    wire_len,
                    hash: r.array()?,
                }
            }
        })
    }
}

impl Entry {
    /// Smallest encoding: empty path, kind, zero size, 12-byte time, mode, empty target.
    const MIN_ENCODED_LEN: usize = 1 + 1 + 1 + 12 + 1 + 1;

    fn encoded_len(&self) -> usize {
        bytes_len(self.path.len())
            + 1
            + varint_len(self.size)
            + 12
            + varint_len(u64::from(self.mode))
            + bytes_len(self.link_target.len())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_bytes(out, self.path.as_bytes());
        out.push(match self.kind {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
            EntryKind::Stream => 3,
        });
        put_varint(out, self.size);
        out.extend_from_slice(&self.mtime.secs.to_be_bytes());
        out.extend_from_slice(&self.mtime.nanos.to_be_bytes());
        put_varint(out, u64::from(self.mode));
        put_bytes(out, self.link_target.as_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let path = r.string(MAX_PATH_BYTES)?;
        let kind = match r.u8()? {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            3 => EntryKind::Stream,
            _ => return Err(DecodeError::BadValue("entry kind")),
        };
        let size = r.varint()?;
        let secs = r.i64()?;
        let nanos = r.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(DecodeError::BadValue("mtime nanoseconds"));
        }
        let mode = r.varint_u32()?;
        if mode > 0o7777 {
            return Err(DecodeError::BadValue("mode bits"));
        }
        let link_target = r.string(MAX_PATH_BYTES)?;
        Ok(Self {
            path,
            kind,
            size,
            mtime: Timestamp { secs, nanos },
            mode,
            link_target,
        })
    }
}

#[cfg(test)]
mod tests;
