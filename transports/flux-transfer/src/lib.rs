//! Thruflux's transfer protocol as sans-IO state machines.
//!
//! A [`Sender`] offers a [`Manifest`] to one receiver; a [`Receiver`] validates it, lets the user
//! decide, reports what it already holds, and takes in verified chunks. Both are plain structs:
//! stream bytes, disk completions and `now` go in; stream bytes (through an [`Outbox`]), disk
//! requests ([`DiskOp`]), events and a timeout come out. They open no file or socket, read no
//! clock, spawn nothing and use no randomness, so a whole transfer runs the same on the io_uring
//! engine, on a portable driver, or in a simulated network with virtual time.
//!
//! What this crate does not do: QUIC (the driver maps [`Stream`]s to QUIC streams), disk I/O
//! (the driver performs [`DiskOp`]s, and must refuse to follow symbolic links under the
//! destination and never replace an existing entry unless told), scanning the sender's files
//! into a manifest, or talking to the user.
//!
//! # Integrity and resume
//!
//! - Each chunk is hashed with BLAKE3 as it is sent; the receiver checks the hash before the
//!   chunk counts, and asks again ([`flux_wire::Message::Refetch`]) when it does not match.
//! - A whole-file digest over the chunk hashes ([`digest::file_digest`]) closes each file.
//! - The receiver's [`sidecar`] records verified chunks next to the partial file. On restart the
//!   driver turns it into [`LocalFile::Partial`]; the receiver claims those chunks, and the sender
//!   checks the claim against its own file before skipping them. A complete identical file
//!   ([`LocalFile::Existing`]) is skipped the same way without being touched.
//!
//! # Compression
//!
//! When both hellos carry [`flux_wire::FEATURE_ZSTD`], the sender may send a chunk as a zstd
//! frame ([`flux_wire::Message::ZChunkHeader`]). Chunk hashes, resume claims and whole-file
//! digests are always over the plain bytes, so resume and skipping work the same whether or
//! not a chunk was compressed. The sender decides per file ([`Compress`]); compressing and
//! decompressing are the driver's work, requested with [`DiskOp::Read`]'s `compress` and
//! carried out for [`DiskOp::WriteChunk`]'s `compressed`, like hashing.
//!
//! # Driving
//!
//! After every input, move bytes out of the outbox, then drain `poll_disk` and `poll_event`
//! until both are empty, then arm a timer for `poll_timeout`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod digest;
mod io;
pub mod manifest;
pub mod path;
mod receiver;
mod sender;
pub mod sidecar;

use flux_wire::{MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION};

pub use io::{
    ChunkData, DiskFailure, DiskOp, DiskResult, Event, OpId, Outbox, Stream, TransferError,
};
pub use manifest::{Limits, Manifest, ManifestError};
pub use receiver::{LocalFile, Receiver, ReceiverConfig};
pub use sender::{AUTO_MAX_RATIO, Compress, Sender, SenderConfig, level_for};

/// Every optional feature this crate implements (see [`flux_wire::FEATURE_TEXT`]); a side may
/// advertise fewer (tests play an older peer that way).
pub const FEATURES: u64 =
    flux_wire::FEATURE_TEXT | flux_wire::FEATURE_ZSTD | flux_wire::FEATURE_STREAM;

fn hello(features: u64) -> Message {
    Message::Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        features: features | flux_wire::FEATURE_SELECT | flux_wire::FEATURE_PAUSE,
    }
}

fn check_hello(min: u16, max: u16) -> Result<(), TransferError> {
    if min > max || max < MIN_PROTOCOL_VERSION || min > PROTOCOL_VERSION {
        return Err(TransferError::Version { min, max });
    }
    Ok(())
}

/// Entry points for the cargo-fuzz targets; not a stable API.
#[cfg(feature = "__fuzzing")]
pub mod fuzzing;

/// The interface a driver uses for either side of a transfer.
///
/// Inputs are `handle_*`; outputs are the outbox and the `poll_*` methods, drained after every
/// input (see the crate docs).
pub trait Machine {
    /// Bytes arrived on `stream`.
    fn handle_stream_data(&mut self, now: std::time::Instant, stream: Stream, data: &[u8]);
    /// Bytes arrived on `stream`, owned: a machine that keeps them (the receiver's chunk data)
    /// holds them without copying.
    fn handle_stream_bytes(&mut self, now: std::time::Instant, stream: Stream, data: bytes::Bytes);
    /// The peer finished or reset `stream`.
    fn handle_stream_end(&mut self, now: std::time::Instant, stream: Stream);
    /// A disk request completed.
    fn handle_disk_done(
        &mut self,
        now: std::time::Instant,
        id: OpId,
        res: Result<DiskResult, DiskFailure>,
    );
    /// Time passed.
    fn handle_timeout(&mut self, now: std::time::Instant);
    /// When `handle_timeout` should next be called.
    fn poll_timeout(&self) -> Option<std::time::Instant>;
    /// The next disk request.
    fn poll_disk(&mut self) -> Option<DiskOp>;
    /// The next event.
    fn poll_event(&mut self) -> Option<Event>;
    /// Outgoing stream bytes.
    fn outbox(&mut self) -> &mut Outbox;
    /// Whether data lanes should be read now.
    fn wants_data(&self) -> bool;
    /// Whether the transfer has ended.
    fn is_over(&self) -> bool;
    /// What the path carries now, in bytes per second (the driver's estimate: congestion
    /// window over RTT). The sender picks its zstd level from it; the receiver ignores it.
    fn set_path_rate(&mut self, bytes_per_sec: u64);
}

macro_rules! impl_machine {
    ($t:ty, $wants:expr, $rate:expr) => {
        impl Machine for $t {
            fn handle_stream_data(&mut self, now: std::time::Instant, s: Stream, d: &[u8]) {
                <$t>::handle_stream_data(self, now, s, d)
            }
            fn handle_stream_bytes(&mut self, now: std::time::Instant, s: Stream, d: bytes::Bytes) {
                <$t>::handle_stream_bytes(self, now, s, d)
            }
            fn handle_stream_end(&mut self, now: std::time::Instant, s: Stream) {
                <$t>::handle_stream_end(self, now, s)
            }
            fn handle_disk_done(
                &mut self,
                now: std::time::Instant,
                id: OpId,
                res: Result<DiskResult, DiskFailure>,
            ) {
                <$t>::handle_disk_done(self, now, id, res)
            }
            fn handle_timeout(&mut self, now: std::time::Instant) {
                <$t>::handle_timeout(self, now)
            }
            fn poll_timeout(&self) -> Option<std::time::Instant> {
                <$t>::poll_timeout(self)
            }
            fn poll_disk(&mut self) -> Option<DiskOp> {
                <$t>::poll_disk(self)
            }
            fn poll_event(&mut self) -> Option<Event> {
                <$t>::poll_event(self)
            }
            fn outbox(&mut self) -> &mut Outbox {
                <$t>::outbox(self)
            }
            fn wants_data(&self) -> bool {
                let f: fn(&$t) -> bool = $wants;
                f(self)
            }
            fn is_over(&self) -> bool {
                <$t>::is_over(self)
            }
            fn set_path_rate(&mut self, bytes_per_sec: u64) {
                let f: fn(&mut $t, u64) = $rate;
                f(self, bytes_per_sec)
            }
        }
    };
}

impl_machine!(Sender, |_| true, Sender::set_path_rate);
impl_machine!(Receiver, Receiver::wants_data, |_, _| {});
