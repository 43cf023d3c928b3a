//! Thruflux signaling over WebSocket: the server behind `thruserv` (feature `server`) and
//! the async client `thru` uses to reach it (feature `client`).
//!
//! The server pairs a host with its joiners by a short routing id and relays ICE candidates
//! and opaque handshake payloads between them; then the peers talk directly and the server
//! is out of the path. It is hardened for the open internet: per-IP connect and
//! session-create limits (governor), per-connection message limits, global caps on
//! connections and sessions, absolute session lifetimes, a failed-join cap, per-session
//! message budgets, handshake/idle/slow-frame timeouts and an address filter on candidates.
//! No peer input can panic it.
//!
//! What it does *not* do: it never sees the secret half of a join code, never reads relayed
//! payloads, stores nothing on disk, and does not relay file data (that is TURN's job). Its
//! state is in memory; a restart ends every session.
//!
//! The wire protocol is defined in `flux-signal-proto` and described in
//! `signaling/PROTOCOL.md`.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub use flux_signal_proto as proto;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;
