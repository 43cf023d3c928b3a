//! What the engine needs from a QUIC stack, in types of no particular stack:
//!
//! - [`QuicEndpoint`]: datagrams in, connection attempts out for the host to accept or refuse,
//!   connections made, and the endpoint's transmits and timers (for all of its connections: a
//!   stack that batches across connections, like s2n-quic, can);
//! - [`QuicConnection`]: streams with flow control, events, path figures, close.
//!
//! [`crate::quinn`] implements both over quinn-proto; a second stack (s2n-quic,
//! `flux-quic-s2n`) can implement them without the engine changing.
//!
//! Like quinn-proto, nothing here does I/O or reads a clock: `now` comes in, datagrams go out
//! through [`QuicEndpoint::poll_transmit`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::{ConfigError, Fingerprint};

/// A stream of one connection, numbered by the stack.
pub type StreamId = u64;

/// A connection of an endpoint, numbered by the endpoint (never reused).
pub type ConnId = usize;

/// A peer's connection attempt, waiting for the host to accept or refuse it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Incoming {
    /// The endpoint's number for the attempt.
    pub id: u64,
    /// Where it comes from.
    pub remote: SocketAddr,
}

/// Stream directionality.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Dir {
    /// Both ways.
    Bi,
    /// From the opener to the peer only.
    Uni,
}

/// Why a connection closed.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum Closed {
    /// Nothing was heard from the peer for the idle timeout.
    #[error("timed out")]
    TimedOut,
    /// Anything else, in the stack's words (`closed by peer: …`, `reset by peer`…).
    #[error("{0}")]
    Other(String),
}

/// Something that happened on a connection.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum ConnEvent {
    /// The peer opened streams of this direction: take them with
    /// [`QuicConnection::accept_stream`].
    StreamOpened(Dir),
    /// A stream has data (or its end) to read.
    Readable(StreamId),
    /// The connection closed.
    Lost(Closed),
}

/// How a [`QuicConnection::read`] ended.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ReadEnd {
    /// The byte budget was used up: more may be waiting.
    More,
    /// Nothing more to read now.
    Blocked,
    /// The stream finished: everything was read.
    Finished,
    /// The peer reset the stream.
    Reset,
}

/// Why a write took nothing.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum WriteError {
    /// Flow or congestion control: try again later.
    Blocked,
    /// The stream or connection is gone (stopped by the peer, closed).
    Gone,
}

/// Path figures of a connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Path MTU (UDP payload bytes).
    pub mtu: u16,
    /// Congestion events.
    pub congestion_events: u64,
    /// UDP payload bytes sent.
    pub udp_tx_bytes: u64,
    /// UDP payload bytes received.
    pub udp_rx_bytes: u64,
}

/// A datagram or GSO batch to send: `size` bytes of the caller's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Transmit {
    /// The connection it belongs to, when the stack says (stateless responses belong to none).
    pub conn: Option<ConnId>,
    /// Where to.
    pub destination: SocketAddr,
    /// Bytes of the buffer.
    pub size: usize,
    /// GSO segment size, when the batch holds more than one datagram.
    pub segment_size: Option<usize>,
    /// The local address to send from, when the stack cares.
    pub src_ip: Option<IpAddr>,
}

/// One QUIC connection, as the engine's sessions use it.
pub trait QuicConnection {
    /// The next event.
    fn poll_event(&mut self) -> Option<ConnEvent>;
    /// Opens a stream; `None` while the peer's stream limit (or the handshake) does not allow.
    fn open_stream(&mut self, dir: Dir) -> Option<StreamId>;
    /// Takes a stream the peer opened.
    fn accept_stream(&mut self, dir: Dir) -> Option<StreamId>;
    /// Refuses a stream the peer opened (asks it to stop sending).
    fn refuse_stream(&mut self, id: StreamId);
    /// Reads in-order bytes of stream `id` into `out`, as owned pieces, up to about `max`
    /// bytes.
    fn read(&mut self, id: StreamId, max: usize, out: &mut Vec<Bytes>) -> ReadEnd;
    /// Writes as much of `data` as flow control allows (by reference: the stack keeps the
    /// `Bytes` until acknowledged); returns the count taken.
    fn write(&mut self, id: StreamId, data: Bytes) -> Result<usize, WriteError>;
    /// Marks the end of stream `id`.
    fn finish(&mut self, id: StreamId);
    /// Caps the bytes written and not yet acknowledged on the connection.
    fn set_send_window(&mut self, bytes: u64);
    /// Sets the connection's receive window.
    fn set_receive_window(&mut self, bytes: u64);
    /// Smoothed RTT.
    fn rtt(&self) -> Duration;
    /// Congestion window, bytes.
    fn congestion_window(&self) -> u64;
    /// Path figures.
    fn stats(&self) -> PathStats;
    /// The fingerprint of the certificate the peer presented, once authenticated.
    fn peer_fingerprint(&self) -> Option<Fingerprint>;
    /// Whether the handshake is still going.
    fn is_handshaking(&self) -> bool;
    /// Whether the connection has closed.
    fn is_closed(&self) -> bool;
    /// Closes with an application `code` and `reason` (sent to the peer).
    fn close(&mut self, now: Instant, code: u32, reason: Bytes);
}

/// A QUIC endpoint on one socket, owning its connections.
pub trait QuicEndpoint {
    /// Its connections.
    type Conn: QuicConnection;
    /// One received datagram (a GRO segment), from `from` to `dst_ip`, with ECN bits `ecn`.
    fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: BytesMut,
    );
    /// The next connection attempt from a peer (a server endpoint).
    fn poll_incoming(&mut self) -> Option<Incoming>;
    /// Accepts attempt `id`; `None` if the handshake cannot go on (a response may be queued).
    fn accept(&mut self, now: Instant, id: u64) -> Option<ConnId>;
    /// Refuses attempt `id` (the peer is told).
    fn refuse(&mut self, id: u64);
    /// Connects to `peer` (a client endpoint).
    fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<ConnId, ConfigError>;
    /// Connection `id`.
    fn conn(&mut self, id: ConnId) -> Option<&mut Self::Conn>;
    /// Why connection attempt `id` (one this side started) failed before it was handed out,
    /// once. A stack that completes the handshake before handing a connection out (s2n-quic)
    /// reports a refused certificate here; quinn reports it as the connection's
    /// [`ConnEvent::Lost`] and keeps the default.
    fn connect_failure(&mut self, _id: ConnId) -> Option<String> {
        None
    }
    /// The next datagram (or GSO batch of up to `max_segments`) to send, written into `buf`.
    /// `None` once every connection has had a fair turn: the caller should receive before
    /// asking again.
    fn poll_transmit(
        &mut self,
        now: Instant,
        max_segments: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit>;
    /// When [`QuicEndpoint::handle_timeout`] must be called next.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// Advances the timers of every connection due.
    fn handle_timeout(&mut self, now: Instant);
}
