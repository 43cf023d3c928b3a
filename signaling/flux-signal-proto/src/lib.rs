//! Thruflux signaling protocol: the messages a `thru` client and `thruserv` exchange over a
//! WebSocket, the routing id that names a session, and the filter that decides which ICE
//! candidate addresses the server may relay.
//!
//! This crate is sans-IO: it holds no sockets, reads no clock and draws no randomness. The
//! server and the client (in `flux-signal`) decode every frame with [`decode_client`] or
//! [`decode_server`] and encode with the `encode` methods; routing ids are made from entropy
//! the caller supplies ([`RoutingId::from_entropy`]).
//!
//! It does *not* carry the secret half of a join code: the server never sees it, so no type
//! here represents it. PAKE and handshake messages travel as opaque [`ClientMsg::Relay`]
//! payloads that the server routes without reading.
//!
//! # Message flow (protocol version [`PROTOCOL_VERSION`])
//!
//! ```text
//! host                       thruserv                      joiner
//!  |  ◀── welcome ─────────────  |  ──── welcome ──────────▶  |
//!  |  ── create_session ──────▶  |                            |
//!  |  ◀── session_created{id} ─  |                            |
//!  |                             |  ◀──── join_session{id} ── |
//!  |  ◀── peer_joined{peer} ───  |  ──── joined{peer} ──────▶ |
//!  |  ── relay/candidate{to} ──▶ |  ──── relay/candidate ───▶ |
//!  |  ◀── relay/candidate ─────  |  ◀─── relay/candidate{to} ─|
//!  |  ── reject_peer{peer} ────▶ |  ──── session_closed ────▶ |  (joiner failed the PAKE)
//! ```
//!
//! The full wire description, with every error code, is `signaling/PROTOCOL.md`.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod filter;
mod msg;
mod routing;

pub use filter::{AddrRejection, CandidatePolicy, check_candidate_addr};
pub use msg::{
    Candidate, CandidateKind, ClientMsg, DecodeError, ErrorCode, PeerId, PeerLeftReason, ServerMsg,
    TransportProtocol, decode_client, decode_server,
};
pub use routing::{ParseRoutingIdError, RoutingId};

/// The protocol version this crate speaks. Sent by the server in [`ServerMsg::Welcome`] and
/// part of the WebSocket path ([`WS_PATH`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// The HTTP path a client upgrades to a WebSocket on.
pub const WS_PATH: &str = "/v1/signal";

/// Longest candidate `foundation` string accepted (RFC 8445 §5.1.1.3 allows 32 ice-chars).
pub const MAX_FOUNDATION_LEN: usize = 32;

/// Longest free-text `reason` accepted in a [`ClientMsg::RejectPeer`].
pub const MAX_REASON_LEN: usize = 256;
