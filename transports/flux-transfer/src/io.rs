//! What the machines exchange with their driver: streams, outgoing bytes, disk requests, events.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use flux_wire::{DecodeError, ErrorCode, Hash, Message};

use crate::manifest::ManifestError;

/// A QUIC stream as the transfer machines name it. The driver maps these to real stream ids:
/// the control stream is the bidirectional stream the receiver opens first; lanes are
/// unidirectional streams the sender opens, numbered by the receiver in the order they arrive.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Stream {
    /// The control stream.
    Control,
    /// Data lane `n`.
    Lane(u16),
}

/// A received chunk as the pieces QUIC delivered it in, kept without copying until the driver
/// gathers them into the buffer it writes from.
#[derive(Clone, Default)]
pub struct ChunkData {
    pieces: Vec<Bytes>,
    len: usize,
}

impl ChunkData {
    /// Appends a piece.
    pub fn push(&mut self, b: Bytes) {
        self.len += b.len();
        if !b.is_empty() {
            self.pieces.push(b);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Copies every piece, in order, to the front of `out` (at least [`len`](Self::len) long).
    pub fn copy_to(&self, out: &mut [u8]) {
        let mut at = 0;
        for p in &self.pieces {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    }

    /// The bytes in one contiguous buffer: the single piece itself, or a copy.
    pub fn to_contiguous(&self) -> Bytes {
        match self.pieces.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            _ => {
                let mut v = vec![0u8; self.len];
                self.copy_to(&mut v);
                v.into()
            }
        }
    }
}

impl From<Bytes> for ChunkData {
    fn from(b: Bytes) -> Self {
        let mut c = Self::default();
        c.push(b);
        c
    }
}

impl From<Vec<u8>> for ChunkData {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

impl std::fmt::Debug for ChunkData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChunkData({} bytes in {} pieces)",
            self.len,
            self.pieces.len()
        )
    }
}

/// An id the machine gives a disk request; the driver returns it with the result.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct OpId(pub u64);

/// A disk operation the machine asks its driver to perform. Files are named by their manifest
/// index; the driver maps indices to paths under the destination (receiver) or the shared roots
/// (sender).
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum DiskOp {
    /// Sender: read `len` bytes at `offset` of file `file` and hash them. Complete with
    /// [`DiskResult::Read`] holding exactly `len` bytes (fewer means the file shrank) and their
    /// [`chunk_hash`](crate::digest::chunk_hash). With `compress`, also compress them with
    /// zstd at that level (off the network thread, like the hash) and return the frame when it
    /// is smaller than the plain bytes; the machine decides whether it pays.
    Read {
        /// Request id.
        id: OpId,
        /// Manifest index.
        file: u32,
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// zstd level to try, if any.
        compress: Option<i32>,
    },
    /// Receiver: verify a received chunk, write it into the file's partial (temporary) file at
    /// `offset`, then append the sidecar record for `(index, hash)`, in that order. Complete
    /// with [`DiskResult::Done`]. If the [`chunk_hash`](crate::digest::chunk_hash) of `data`
    /// is not `hash`, nothing is written and the request fails with [`DiskFailure::Corrupt`]:
    /// hashing is the driver's work (inline or on a pool), never the machine's.
    ///
    /// With `compressed: Some(n)`, `data` is a zstd frame that must decompress to exactly `n`
    /// bytes (the chunk's length in the manifest), and `hash` is over those plain bytes. The
    /// driver decompresses into a buffer of `n` bytes and no more (a frame that would grow
    /// past it, or falls short, fails with [`DiskFailure::Decompress`]).
    WriteChunk {
        /// Request id.
        id: OpId,
        /// Manifest index.
        file: u32,
        /// Chunk index.
        index: u32,
        /// Byte offset.
        offset: u64,
        /// The hash the sender announced for the chunk.
        hash: Hash,
        /// The chunk, as the pieces it arrived in.
        data: ChunkData,
        /// Plain length when `data` is zstd-compressed.
        compressed: Option<u32>,
    },
    /// Receiver: put entry `file` in place. A file's partial data is flushed, given the
    /// manifest's mode and mtime and renamed to its final name, and its sidecar removed; a
    /// directory is created; a link is created. An existing entry at the final path is replaced
    /// only if `replace` is set; otherwise the driver fails with [`DiskFailure::Exists`].
    Finalize {
        /// Request id.
        id: OpId,
        /// Manifest index.
        file: u32,
        /// Whether an existing entry may be replaced.
        replace: bool,
        /// A stream's size, learned at its end ([`flux_wire::Message::StreamEnd`]); `None`
        /// for every other entry, whose size is the manifest's.
        size: Option<u64>,
    },
    /// Receiver: every entry is in place; apply directory modes and times (deepest first, since
    /// creating entries changes a directory's mtime).
    Finish {
        /// Request id.
        id: OpId,
    },
}

impl DiskOp {
    /// The request's id, to complete (or fail) it.
    pub fn id(&self) -> OpId {
        match self {
            Self::Read { id, .. }
            | Self::WriteChunk { id, .. }
            | Self::Finalize { id, .. }
            | Self::Finish { id } => *id,
        }
    }
}

/// The outcome of a [`DiskOp`].
#[derive(Debug)]
pub enum DiskResult {
    /// A read completed with these bytes and their chunk hash.
    Read {
        /// The bytes read.
        data: Bytes,
        /// [`chunk_hash`](crate::digest::chunk_hash) of `data`.
        hash: Hash,
        /// The zstd frame of `data`, when compression was asked for and made it smaller.
        compressed: Option<Bytes>,
    },
    /// A write, finalize or finish completed.
    Done,
}

/// Why a disk operation failed, as the driver reports it.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DiskFailure {
    /// The final path is taken and replacing was not allowed.
    #[error("{0}: already exists")]
    Exists(String),
    /// A chunk's bytes do not match the hash announced for it; nothing was written.
    #[error("chunk data does not match its hash")]
    Corrupt,
    /// A compressed chunk did not decompress to its declared length (a decompression bomb,
    /// a short or corrupt frame); nothing was written.
    #[error("{0}")]
    Decompress(String),
    /// The filesystem holding this path is full (`ENOSPC`, or a quota: `EDQUOT`).
    #[error("{0}: no space left on device")]
    NoSpace(String),
    /// Any other I/O failure, with its context.
    #[error("{0}")]
    Io(String),
}

/// Something the driver or the user should know.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Receiver: the manifest is complete; show it and call `accept` or `reject`.
    ManifestReady,
    /// Sender: the receiver accepted.
    Accepted,
    /// Sender: the receiver's resume claim for `file` was checked.
    ResumeChecked {
        /// Manifest index.
        file: u32,
        /// Whether the held chunks matched.
        accepted: bool,
        /// Bytes the receiver already held and will not be sent again.
        bytes: u64,
    },
    /// Sender: a chunk was handed to its lane.
    ChunkSent {
        /// Manifest index.
        file: u32,
        /// Chunk index.
        index: u32,
        /// Bytes of the file.
        len: u32,
        /// Payload bytes on the wire (below `len` when compressed).
        wire: u32,
    },
    /// Receiver: a chunk arrived, matched its hash and is on disk.
    ChunkVerified {
        /// Manifest index.
        file: u32,
        /// Chunk index.
        index: u32,
        /// Bytes of the file.
        len: u32,
        /// Payload bytes it took on the wire (below `len` when compressed).
        wire: u32,
    },
    /// Receiver: a chunk did not match its hash and was requested again.
    ChunkCorrupt {
        /// Manifest index.
        file: u32,
        /// Chunk index.
        index: u32,
    },
    /// A file (or directory, or link) is complete and in place.
    FileComplete {
        /// Manifest index.
        file: u32,
    },
    /// Receiver: an identical file was already in place; nothing was written.
    FileSkipped {
        /// Manifest index.
        file: u32,
    },
    /// Sender: the receiver's progress report.
    PeerProgress {
        /// Bytes verified.
        bytes_done: u64,
        /// Files completed.
        files_done: u64,
    },
    /// Sender: the receiver chose a subset ([`flux_wire::Message::Select`]): these entries,
    /// nothing else is sent. Comes just before [`Event::Accepted`].
    Selected(std::collections::BTreeSet<u32>),
    /// Sender: the receiver only looked at the manifest and left (`thru join --list`); the
    /// transfer is over without an error.
    Browsed,
    /// The receiver paused (`true`) or resumed the transfer.
    Paused(bool),
    /// A stream share ([`flux_wire::EntryKind::Stream`]) ended: it held `size` bytes. Raised
    /// by the sender when its reads reach the end, and by the receiver when it is told.
    StreamEnded {
        /// Bytes in the stream.
        size: u64,
    },
    /// The transfer finished successfully.
    Done,
    /// The transfer failed; the machine accepts no further input.
    Failed(TransferError),
}

/// Why a transfer failed.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The peer broke the protocol (the code was sent to it).
    #[error("protocol violation by peer: {0}")]
    Protocol(String),
    /// A frame did not decode.
    #[error("malformed message from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The manifest was refused.
    #[error("refused manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// No protocol version in common.
    #[error("no protocol version in common: peer speaks {min}..={max}")]
    Version {
        /// Peer's lowest version.
        min: u16,
        /// Peer's highest version.
        max: u16,
    },
    /// The peer reported an error.
    #[error("peer reported {code:?}: {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The receiver declined the share.
    #[error("receiver declined: {0}")]
    Declined(String),
    /// A destination entry exists and overwriting was not allowed.
    #[error("{0} already exists (allow overwriting to replace it)")]
    Exists(String),
    /// A chunk kept failing verification.
    #[error("chunk {index} of file {file} failed verification {times} times")]
    Integrity {
        /// Manifest index.
        file: u32,
        /// Chunk index.
        index: u32,
        /// Failures.
        times: u32,
    },
    /// The receiver's disk filled up; what was verified stays for a resume.
    #[error(
        "no space left on the device holding {path}: about {} MiB more are needed to finish; \
         the verified data is kept, so free some space and run the same join again to resume",
        needed.div_ceil(1 << 20)
    )]
    NoSpace {
        /// The file being written when the device filled.
        path: String,
        /// Bytes still to receive.
        needed: u64,
    },
    /// A local disk operation failed.
    #[error("disk: {0}")]
    Io(String),
    /// The peer lacks a feature this transfer needs (it runs an older version).
    #[error("{0}")]
    Unsupported(String),
    /// Nothing happened for too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The local user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The local user stopped the transfer, saying why (for the peer, e.g. `the receiver
    /// stopped (Ctrl-C); 12.0 MiB kept`).
    #[error("{0}")]
    Stopped(String),
}

impl TransferError {
    /// The wire code that tells the peer about this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Protocol(_) | Self::Decode(_) | Self::Timeout(_) => ErrorCode::Protocol,
            Self::Manifest(_) => ErrorCode::BadManifest,
            Self::Version { .. } | Self::Unsupported(_) => ErrorCode::VersionMismatch,
            Self::Peer { code, .. } => *code,
            Self::Declined(_) | Self::Cancelled | Self::Stopped(_) => ErrorCode::Cancelled,
            Self::Exists(_) => ErrorCode::Exists,
            Self::Integrity { .. } => ErrorCode::Integrity,
            Self::Io(_) | Self::NoSpace { .. } => ErrorCode::Io,
        }
    }
}

/// Outgoing bytes per stream, waiting for the driver to move them into QUIC.
///
/// The driver takes bytes with [`Outbox::front`] / [`Outbox::advance`] as flow control allows,
/// and finishes a stream once [`Outbox::take_fin`] says so. Machines bound what they queue here,
/// so memory stays bounded whatever the path's speed.
///
/// Every piece is numbered in the order it was queued, so a driver can move the oldest bytes
/// first across streams ([`Outbox::oldest`]): chunks then leave in the order they were read
/// instead of several lanes' chunks finishing together, which is what bounds chunk latency and
/// gets the first chunk out alone.
#[derive(Debug, Default)]
pub struct Outbox {
    queues: BTreeMap<Stream, Queue>,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    /// Queue order of each piece in `chunks`.
    seqs: VecDeque<u64>,
    bytes: usize,
    fin: bool,
}

impl Outbox {
    /// Streams with bytes or a finish waiting.
    pub fn ready(&self) -> Vec<Stream> {
        self.queues
            .iter()
            .filter(|(_, q)| q.bytes > 0 || q.fin)
            .map(|(s, _)| *s)
            .collect()
    }

    /// Of the streams with bytes waiting and not in `skip`, the one whose next bytes were queued
    /// first.
    pub fn oldest(&self, skip: &[Stream]) -> Option<Stream> {
        self.queues
            .iter()
            .filter(|(s, q)| q.bytes > 0 && !skip.contains(s))
            .filter_map(|(s, q)| q.seqs.front().map(|seq| (*seq, *s)))
            .min()
            .map(|(_, s)| s)
    }

    /// The next bytes to write on `stream`.
    pub fn front(&self, stream: Stream) -> Option<&Bytes> {
        self.queues.get(&stream)?.chunks.front()
    }

    /// Marks `n` bytes of `stream` as written.
    pub fn advance(&mut self, stream: Stream, mut n: usize) {
        let Some(q) = self.queues.get_mut(&stream) else {
            return;
        };
        q.bytes = q.bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = q.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                q.chunks.pop_front();
                q.seqs.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }

    /// Whether `stream` should now be finished (all bytes written); reported once.
    pub fn take_fin(&mut self, stream: Stream) -> bool {
        match self.queues.get_mut(&stream) {
            Some(q) if q.fin && q.bytes == 0 => {
                q.fin = false;
                true
            }
            _ => false,
        }
    }

    /// Bytes waiting on `stream`.
    pub fn queued(&self, stream: Stream) -> usize {
        self.queues.get(&stream).map_or(0, |q| q.bytes)
    }

    pub(crate) fn push(&mut self, stream: Stream, b: Bytes) {
        if b.is_empty() {
            return;
        }
        let q = self.queues.entry(stream).or_default();
        q.bytes += b.len();
        q.chunks.push_back(b);
        q.seqs.push_back(self.next_seq);
        self.next_seq += 1;
    }

    pub(crate) fn push_msg(&mut self, stream: Stream, m: &Message) {
        let mut v = Vec::with_capacity(m.encoded_len());
        m.encode(&mut v);
        self.push(stream, Bytes::from(v));
    }

    pub(crate) fn finish(&mut self, stream: Stream) {
        self.queues.entry(stream).or_default().fin = true;
    }
}

/// Reassembles frames from stream bytes that arrive in arbitrary pieces.
#[derive(Debug, Default)]
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameBuf {
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame. An oversized frame is refused from its header, before its body
    /// is buffered.
    pub(crate) fn next(&mut self) -> Result<Option<Message>, DecodeError> {
        match flux_wire::decode_frame(&self.buf[self.pos..])? {
            Some((m, used)) => {
                self.pos += used;
                Ok(Some(m))
            }
            None => Ok(None),
        }
    }

    /// Bytes after the last complete frame, handed back for a raw payload that follows a frame.
    pub(crate) fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.pos);
        self.buf.clear();
        self.pos = 0;
        rest
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_follows_queue_order_across_streams_and_partial_writes() {
        let mut out = Outbox::default();
        out.push(Stream::Lane(1), Bytes::from_static(b"aaaa"));
        out.push(Stream::Lane(0), Bytes::from_static(b"bb"));
        out.push(Stream::Lane(1), Bytes::from_static(b"cc"));
        assert_eq!(out.oldest(&[]), Some(Stream::Lane(1)));
        // A partly written piece keeps its place.
        out.advance(Stream::Lane(1), 3);
        assert_eq!(out.oldest(&[]), Some(Stream::Lane(1)));
        assert_eq!(out.oldest(&[Stream::Lane(1)]), Some(Stream::Lane(0)));
        out.advance(Stream::Lane(1), 1);
        assert_eq!(out.oldest(&[]), Some(Stream::Lane(0)));
        out.advance(Stream::Lane(0), 2);
        assert_eq!(out.front(Stream::Lane(1)).map(|b| &b[..]), Some(&b"cc"[..]));
        out.advance(Stream::Lane(1), 2);
        assert_eq!(out.oldest(&[]), None);
    }
}
