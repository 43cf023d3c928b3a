//! `thru`: the Thruflux command-line tool, as a library so tests can drive its parts.
//!
//! - [`cli`]: the clap definition (help, man pages, completions, exit codes).
//! - [`config`]: the config file and the precedence flag > environment > file > default.
//! - [`code`]: join codes (routing part + secret part), parsing and formatting.
//! - [`pake`]: the sans-IO SPAKE2 pairing handshake bound to both peers' QUIC identities.
//! - [`rendezvous`]: carrying that handshake through `thruserv` or directly on a LAN (mDNS,
//!   `--peer`), on tokio.
//! - [`pairing`]: [`pairing::Paired`], the result the data engine consumes.
//! - [`ui`]: JSON events, human output, progress bars and the receiver's prompt.
//! - [`transfer`]: the hand-over to the data engine: the joiner's receive and the host's serving worker.
//!
//! What this crate does not do: move file data or traverse NATs (the engine does, in
//! `engine/` and `transports/`; this crate hands it the paired peer, the STUN/TURN servers
//! and the trickled candidates).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod choose;
pub mod cli;
pub mod code;
pub mod config;
pub mod pairing;
pub mod pake;
pub mod rendezvous;
pub mod space;
pub mod transfer;
pub mod ui;
pub mod web;
