//! An endpoint that owns its connections and hands them out by id: the shape the engine's
//! `Node` needs for s2n, where transmits and timers belong to the endpoint, not to each
//! connection (engine/README.md, "The QUIC seam").
//!
//! [`S2nEndpoint`] wraps [`Endpoint`]: connections come out as [`EndpointEvent`]s with a
//! [`ConnId`], their streams are reached through [`S2nEndpoint::conn`] as flux-quic
//! `QuicConnection`s, and datagrams go out through [`S2nEndpoint::poll_transmit`] into the
//! caller's buffer, as flux-quic's [`Transmit`] describes them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use flux_quic::ConfigError;
use flux_quic::conn::{Incoming, QuicEndpoint, Transmit};

use crate::{Connecting, Ecn, Endpoint, Error, S2nConn};

/// A connection of one [`S2nEndpoint`].
pub type ConnId = u64;

/// What happened on the endpoint.
#[derive(Debug)]
pub enum EndpointEvent {
    /// A connection this side started completed its handshake.
    Connected(ConnId),
    /// A peer's connection completed its handshake (server).
    Accepted(ConnId),
    /// A connection this side started failed (wrong certificate, timeout...).
    Failed(ConnId, Error),
}

/// An s2n endpoint with its connections, by id.
#[derive(Debug)]
pub struct S2nEndpoint {
    ep: Endpoint,
    conns: HashMap<ConnId, S2nConn>,
    connecting: Vec<(ConnId, Connecting)>,
    events: VecDeque<EndpointEvent>,
    next: ConnId,
    /// Through [`QuicEndpoint`]: connections s2n accepted, not yet taken by the caller.
    accepted: VecDeque<Incoming>,
    /// Through [`QuicEndpoint`]: why connections this side started failed, until asked.
    failed: HashMap<ConnId, String>,
}

impl From<Endpoint> for S2nEndpoint {
    fn from(ep: Endpoint) -> Self {
        Self {
            ep,
            conns: HashMap::new(),
            connecting: Vec::new(),
            events: VecDeque::new(),
            next: 0,
            accepted: VecDeque::new(),
            failed: HashMap::new(),
        }
    }
}

impl S2nEndpoint {
    /// The endpoint underneath.
    pub fn endpoint(&mut self) -> &mut Endpoint {
        &mut self.ep
    }

    fn id(&mut self) -> ConnId {
        self.next += 1;
        self.next
    }

    /// Starts a connection to `remote` (client endpoints); it is reported by
    /// [`Self::poll_event`].
    pub fn connect(&mut self, remote: SocketAddr) -> Result<ConnId, Error> {
        let c = self.ep.connect(remote)?;
        let id = self.id();
        self.connecting.push((id, c));
        Ok(id)
    }

    /// The next endpoint event.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        let mut done = Vec::new();
        self.connecting.retain_mut(|(id, c)| match c.poll() {
            None => true,
            Some(r) => {
                done.push((*id, r));
                false
            }
        });
        for (id, r) in done {
            match r {
                Ok(conn) => {
                    self.conns.insert(id, conn.into());
                    self.events.push_back(EndpointEvent::Connected(id));
                }
                Err(e) => self.events.push_back(EndpointEvent::Failed(id, e)),
            }
        }
        while let Some(conn) = self.ep.accept() {
            let id = self.id();
            self.conns.insert(id, conn.into());
            self.events.push_back(EndpointEvent::Accepted(id));
        }
        self.events.pop_front()
    }

    /// Connection `id`, if it exists.
    pub fn conn(&mut self, id: ConnId) -> Option<&mut S2nConn> {
        self.conns.get_mut(&id)
    }

    /// Forgets connection `id` (dropping s2n's handle closes it if still open).
    pub fn remove(&mut self, id: ConnId) -> Option<S2nConn> {
        self.conns.remove(&id)
    }

    /// Ids of the connections held.
    pub fn conn_ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.keys().copied()
    }

    /// Feeds a received datagram or GRO batch (see [`Endpoint::handle`]).
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        ecn: Option<Ecn>,
        data: &mut [u8],
        stride: Option<usize>,
    ) {
        self.ep.handle(now, from, ecn, data, stride);
    }

    /// The next datagram or GSO batch, put into `buf` (its previous allocation is reused for
    /// a later batch). Segments per batch follow [`crate::Config::max_gso_segments`]. flux-quic's
    /// `Transmit` has no ECN field: use [`Endpoint::poll_transmit`] to keep s2n's ECN marks.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.ep.poll_transmit(now)?;
        let old = std::mem::replace(buf, t.contents);
        self.ep.recycle(old);
        Some(Transmit {
            conn: None,
            destination: t.destination,
            size: buf.len(),
            segment_size: t.segment_size,
            src_ip: None,
        })
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ep.poll_timeout()
    }

    /// Runs the endpoint's timers (every connection's).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
    }
}

/// flux-quic's endpoint seam. s2n completes a handshake (pinning included) before it hands a
/// connection out, so an attempt surfaces as [`Incoming`] only once accepted at the TLS level:
/// [`QuicEndpoint::accept`] takes it, [`QuicEndpoint::refuse`] closes it. A connection this
/// side started is reachable through [`QuicEndpoint::conn`] once its handshake is over; a
/// failed one never is (the caller's connect time-out ends it).
impl QuicEndpoint for S2nEndpoint {
    type Conn = S2nConn;

    fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        _dst_ip: Option<std::net::IpAddr>,
        ecn: Option<u8>,
        mut data: BytesMut,
    ) {
        let ecn = match ecn.map(|e| e & 0b11) {
            Some(0b10) => Some(Ecn::Ect0),
            Some(0b01) => Some(Ecn::Ect1),
            Some(0b11) => Some(Ecn::Ce),
            _ => None,
        };
        let len = data.len();
        self.handle(now, from, ecn, &mut data[..], Some(len));
        self.pump();
    }

    fn poll_incoming(&mut self) -> Option<Incoming> {
        self.pump();
        self.accepted.front().copied()
    }

    fn accept(&mut self, _now: Instant, id: u64) -> Option<flux_quic::conn::ConnId> {
        let at = self.accepted.iter().position(|i| i.id == id)?;
        self.accepted.remove(at);
        usize::try_from(id).ok()
    }

    fn refuse(&mut self, id: u64) {
        if let Some(at) = self.accepted.iter().position(|i| i.id == id) {
            self.accepted.remove(at);
        }
        if let Some(c) = self.remove(id) {
            drop(c);
        }
    }

    fn connect(
        &mut self,
        _now: Instant,
        peer: SocketAddr,
    ) -> Result<flux_quic::conn::ConnId, ConfigError> {
        let id = S2nEndpoint::connect(self, peer).map_err(|e| ConfigError::Quic(e.to_string()))?;
        usize::try_from(id).map_err(|_| ConfigError::Quic("connection ids ran out".into()))
    }

    fn conn(&mut self, id: flux_quic::conn::ConnId) -> Option<&mut S2nConn> {
        self.pump();
        self.conns.get_mut(&(id as u64))
    }

    fn connect_failure(&mut self, id: flux_quic::conn::ConnId) -> Option<String> {
        self.pump();
        self.failed.remove(&(id as u64))
    }

    fn poll_transmit(
        &mut self,
        now: Instant,
        _max_segments: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        S2nEndpoint::poll_transmit(self, now, buf)
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        S2nEndpoint::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant) {
        S2nEndpoint::handle_timeout(self, now);
        self.pump();
    }
}

impl S2nEndpoint {
    /// Takes the endpoint's events for the seam: accepted connections wait in `accepted`.
    fn pump(&mut self) {
        while let Some(ev) = self.poll_event() {
            match ev {
                EndpointEvent::Accepted(id) => {
                    if let Some(remote) = self.conns.get(&id).and_then(S2nConn::remote) {
                        self.accepted.push_back(Incoming { id, remote });
                    }
                }
                EndpointEvent::Failed(id, e) => {
                    self.failed.insert(id, e.to_string());
                }
                EndpointEvent::Connected(_) => {}
            }
        }
    }
}
