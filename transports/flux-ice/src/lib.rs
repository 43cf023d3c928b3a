//! ICE (RFC 8445) for Thruflux, on the engine's own UDP socket, sans-IO.
//!
//! The engine owns one UDP socket per interface (and, when a TURN server is reached over TCP
//! or TLS, that stream). This crate decides what to send where: it gathers host,
//! server-reflexive (STUN) and relayed (TURN over UDP, TCP or TLS) candidates, pairs them
//! with the peer's trickled candidates, runs paced connectivity checks, follows nomination,
//! keeps the selected path fresh, and wraps/unwraps application (QUIC) datagrams when they go
//! through a relay. QUIC then runs on the same socket; [`classify`] tells the packets apart by
//! their first byte (RFC 7983 / RFC 9443).
//!
//! **What it does not do:** no sockets, clock, threads or interface enumeration. The caller
//! passes `now`, the socket's local addresses, received datagrams and stream bytes, opens the
//! TCP/TLS streams to TURN servers when asked (TLS is the caller's, the agent sees plaintext),
//! and carries candidates and credentials through signaling. No ICE over TCP between peers
//! (RFC 6544): TCP/TLS exists only towards TURN, which still gives a UDP relayed candidate.
//!
//! # Driving it
//!
//! ```text
//! let mut agent = Agent::new(config, now);      // Config: role, credentials, STUN/TURN
//! agent.add_host(socket_local_addr, now);         // each interface address of the socket
//! // signaling: send our Credentials (Display) and every Event::LocalCandidate (Display);
//! //            on the peer's: set_remote_credentials / add_remote_candidate(parsed)
//! loop {
//!     // per received datagram (per GRO segment):
//!     match agent.classify(from, seg) {
//!         Packet::Quic => quic.handle(from, seg),          // hot path, no agent work
//!         Packet::Other => {}
//!         _ => if let Received::App { peer, data } = agent.handle_datagram(now, from, local, seg) {
//!             quic.handle(peer, data)                      // relayed QUIC, unwrapped in place
//!         }
//!     }
//!     // TURN stream bytes: agent.handle_stream_data(now, id, bytes); then poll_app()
//!     // timers:            if now >= agent.poll_timeout() { agent.handle_timeout(now) }
//!     // drain, in order:   poll_transmit() (UDP or stream bytes), poll_timeout(), poll_event()
//!     // QUIC output:       match agent.wrap(now, pkt, &mut buf)? {
//!     //                        SendVia::Direct { from, to } => send pkt,
//!     //                        SendVia::TurnUdp { from, to } => send buf,
//!     //                        SendVia::TurnStream(id) => write buf to the stream }
//!     // zero-copy relay:   if let Some(rc) = agent.relay_channel() { write
//!     //                    channel_header(rc.channel, len) into 4 bytes of headroom before
//!     //                    each QUIC packet (each GSO segment) and send from rc.from to rc.to }
//! }
//! ```
//!
//! Route preference: host and server-reflexive pairs are checked first; relayed candidates
//! (ours and the peer's) join [`Config::relay_hold`] (500 ms) later, so a relay carries
//! traffic only when no direct pair works (or until one does: the controlling side upgrades
//! the nomination).
//!
//! Drain contract: after any input, drain `poll_transmit`, then `poll_timeout`, then
//! `poll_event` before the next input. Checks are paced by the Ta timer
//! ([`Config::check_interval`], 50 ms): the agent runs its check scheduler only when its own
//! timer is due, however often it is called, so a peer trickling thousands of candidates
//! cannot turn it into a packet storm towards third parties (and remote candidates are capped,
//! [`Config::max_remote_candidates`]; loopback, link-local, unspecified and multicast
//! addresses are ignored with a log line). STUN with a bad MESSAGE-INTEGRITY is refused.
//! [`Event::Selected`] can come more than once: the controlling side may upgrade the
//! nomination (for example from a relay to a direct pair); always send on the latest.
//!
//! **Addresses.** `local` in [`Agent::handle_datagram`] must be the host address the datagram
//! arrived on, exactly as given to [`Agent::add_host`] (with a wildcard-bound socket, read it
//! from `IP_PKTINFO`): checks are matched to candidates by it.
//!
//! **QUIC on top.** Give quinn-proto one constant peer address for the connection (for example
//! the first selected remote) and send every QUIC datagram through [`Agent::wrap`], which
//! knows the current path; feed every [`Received::App`] to that connection whatever its
//! `peer`. Why: the path can change under QUIC (renomination: the controlling side upgrades, the
//! controlled side follows the latest nomination), so per-packet addresses are ICE's
//! business, not QUIC's. Never negotiate QUIC-bit greasing on this socket.
//!
//! # Implementation choice
//!
//! The check list, nomination and consent come from `is` 0.12 (str0m's ICE agent, extracted
//! as a sans-IO crate; used in production inside str0m). TURN comes from `turn-client-proto`
//! 0.7 (sans-IO, UDP and TCP; TLS is the caller's stream). STUN binding for server-reflexive
//! candidates, gathering, TURN multiplexing on the shared socket, the remote-candidate filter
//! and cap, the relay hold, route classification, failure time-outs and the controlled
//! side's choice of send pair are this crate's. That last one: the controlled side follows
//! the controlling side's latest nomination, so both directions use one pair; `is` alone
//! keeps the best-priority pair ever nominated, which in the lab left the two directions on
//! different relays after a renomination (working, but two relays and confusing reports).
//!
//! Why not `rice-proto`, which gathers and relays by itself: in the NAT lab on this machine
//! its controlled side stayed "Connecting" behind a cone NAT in about 4 of 6 runs (success
//! handling records the matching non-nominating check as valid when the mapped address
//! differs from the host candidate: "unknown nomination for pair"), it wants its own socket
//! for TURN and has no consent freshness (shared/notes/platform-facts.md). `webrtc-ice` owns
//! the socket and has no TURN over TCP/TLS. `is` has none of those problems — it only lacks
//! gathering and TURN, which is the part we want to control on the engine's socket anyway.
//! The NAT lab (`tools/natlab`, `tools/ice-probe`) is the evidence: every case (same LAN,
//! cone↔cone, cone↔symmetric, symmetric↔symmetric, UDP blocked → TURN over TLS 443, TURN
//! over TCP, 2% loss, a bad TURN password) passed 5 of 5 runs, repeatedly; see its README.
//! STUN server replies carry no MESSAGE-INTEGRITY, which the `is` codec refuses, hence the
//! small binding codec of our own (`stun.rs`).
//!
//! Randomness: credentials and the tie-breaker are inputs ([`Credentials::from_random`]);
//! transaction ids of checks come from `is`'s internal non-cryptographic generator and those
//! of TURN requests from `stun-proto`'s `rand::thread_rng` (through `getrandom`, hence `libc`
//! in the dependency tree) — the one place a dependency reads global randomness; fine for
//! transaction ids (RFC 8489 §6 asks for uniqueness; integrity protects the messages).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod agent;
mod candidate;
mod demux;
mod rto;
mod stun;
mod url;

pub use agent::{
    Agent, AppDatagram, BadCredentials, Config, Credentials, Event, FailReason, Received,
    RelayChannel, Role, RouteKind, Selected, SendVia, Stats, StreamId, Transmit, TurnServer,
    TurnTransport, WrapError,
};
pub use candidate::{
    AddrRejection, Candidate, CandidateKind, MAX_CANDIDATE_LEN, MAX_FOUNDATION_LEN,
    ParseCandidateError, check_remote_addr,
};
pub use demux::{Packet, channel_data, channel_header, classify};
pub use url::{BadTurnUrl, TurnUrl};
