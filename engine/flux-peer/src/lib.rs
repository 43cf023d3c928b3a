//! The Thruflux driver layer: everything between the sans-IO transfer machines and the outside.
//!
//! - [`session`] runs a transfer machine over one QUIC connection (any stack behind
//!   `flux_quic::conn`): it maps the machine's streams to QUIC streams and moves bytes both ways
//!   under flow control.
//! - [`disk`] performs the machines' disk requests with `std::fs` (the portable path), keeping
//!   every received entry inside the destination: no symbolic link under it is followed, partial
//!   files live under temporary names with a resume sidecar, and nothing is replaced unless
//!   allowed.
//! - [`scan`] turns the paths a user shares into a manifest.
//! - [`node`] is the sans-IO peer core: the QUIC endpoint and connections, the machines on
//!   them, the ICE links and the end-of-transfer policy; datagrams, commands, completions and
//!   `now` in, transmits, disk requests, events and deadlines out.
//! - [`exec`] performs disk requests through io_uring with `O_DIRECT` (or blocking `std::fs`),
//!   and [`net`] is the engine's worker: one thread drives a node with a UDP socket and its
//!   disk I/O (io_uring or the portable `poll(2)` driver).
//! - [`pipe`] is a receiver's destination that is stdout: one file, in order.
//! - [`compress`] compresses chunks for sending and decompresses received ones, bounded by their
//!   declared length; the executors run it where they run hashing.
//! - [`sim`] is the third driver of [`node::Node`]: whole transfers between two nodes over an
//!   emulated lossy, reordering, rate-limited link on a virtual clock, for tests.
//! - [`stack`] names the QUIC stacks a worker can run (quinn-proto, s2n-quic) and sets s2n-quic
//!   up from the engine's transport settings.
//!
//! What this crate does not do: socket options and ring internals (`flux-udp`, `flux-engine`),
//! pairing (signaling), terminal output (the `thru` binary).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![forbid(unsafe_code)]

pub mod compress;
pub mod disk;
pub mod error;
pub mod exec;
pub mod ice;
pub mod net;
pub mod node;
pub mod pipe;
pub mod scan;
pub mod session;
pub mod sim;
pub mod stack;
mod work;
