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

pub use io::{DiskFailure, DiskOp, DiskResult, Event, OpId, Outbox, Stream, TransferError};
pub use manifest::{Limits, Manifest, ManifestError};
pub use receiver::{LocalFile, Receiver, ReceiverConfig};
pub use sender::{Sender, SenderConfig};

fn hello() -> Message {
    Message::Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        features: 0,
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
