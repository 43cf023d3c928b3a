//! The quinn-proto backend: configuration (pinned certificates, transport tuning) and the
//! endpoint and connection wrappers that put quinn-proto behind [`crate::conn`]'s neutral
//! types. This module is the only place quinn-proto's types appear in the public API.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, EcnCodepoint, EndpointConfig, IdleTimeout,
    MtuDiscoveryConfig, ServerConfig, TransportConfig, VarInt,
};
use rustls::pki_types::CertificateDer;

use crate::conn::{
    Closed, ConnEvent, ConnId, Dir, Incoming, PathStats, QuicConnection, QuicEndpoint, ReadEnd,
    StreamId, Transmit, WriteError,
};
use crate::{
    AllowList, ConfigError, Congestion, Fingerprint, Identity, SERVER_NAME, TransportParams,
    WindowTuner, fingerprint,
};

/// The fingerprint of the certificate the peer of `conn` presented, once the handshake has
/// authenticated it (`None` before, or for a client that presented none).
fn peer_fingerprint(conn: &quinn_proto::Connection) -> Option<Fingerprint> {
    let any = conn.crypto_session().peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(fingerprint)
}

/// The quinn transport configuration for `params`.
pub fn transport_config(params: &TransportParams) -> TransportConfig {
    let mut t = TransportConfig::default();
    let initial = params.conn_window.min(WindowTuner::INITIAL);
    t.receive_window(VarInt::from_u64(initial).unwrap_or(VarInt::MAX))
        .stream_receive_window(VarInt::from_u64(params.stream_window).unwrap_or(VarInt::MAX))
        .send_window(params.send_window)
        .max_concurrent_uni_streams(VarInt::from_u32(params.max_incoming_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .max_idle_timeout(IdleTimeout::try_from(params.idle_timeout).ok())
        .keep_alive_interval(Some(params.keep_alive))
        .initial_mtu(params.initial_mtu.max(1200));
    let mut mtud = MtuDiscoveryConfig::default();
    mtud.upper_bound(params.max_mtu.max(params.initial_mtu).max(1200));
    t.mtu_discovery_config(Some(mtud));
    match params.congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
        Congestion::NewReno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
    };
    t
}

/// The endpoint configuration for a socket that QUIC shares with STUN/TURN.
pub fn endpoint_config() -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    // STUN and TURN are told apart from QUIC by QUIC's fixed bit (RFC 9443): never invite the
    // peer to grease it (RFC 9287).
    cfg.grease_quic_bit(false);
    cfg
}

/// Server (host) configuration presenting `id`.
pub fn server_config(id: &Identity, params: &TransportParams) -> Result<ServerConfig, ConfigError> {
    server_with(id, params, None)
}

/// The server configuration, with client certificates checked by `clients` when given.
fn server_with(
    id: &Identity,
    params: &TransportParams,
    clients: Option<Arc<AllowList>>,
) -> Result<ServerConfig, ConfigError> {
    let tls = crate::tls::server(id, clients)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(params)));
    Ok(cfg)
}

/// Server (host) configuration presenting `id` that also requires a client certificate whose
/// fingerprint is on `allowed` (mutual pinning: a party that did not pair cannot connect).
pub fn server_config_mutual(
    id: &Identity,
    params: &TransportParams,
    allowed: Arc<AllowList>,
) -> Result<ServerConfig, ConfigError> {
    server_with(id, params, Some(allowed))
}

/// Client configuration that pins the server's `pinned` fingerprint and presents `id`.
pub fn client_config_with_identity(
    pinned: Fingerprint,
    id: &Identity,
    params: &TransportParams,
) -> Result<ClientConfig, ConfigError> {
    client_with(pinned, Some(id), params)
}

/// Client (joiner) configuration that accepts only a server whose certificate hashes to
/// `pinned`.
pub fn client_config(
    pinned: Fingerprint,
    params: &TransportParams,
) -> Result<ClientConfig, ConfigError> {
    client_with(pinned, None, params)
}

/// The client configuration pinning `pinned`, presenting `id` when given.
fn client_with(
    pinned: Fingerprint,
    id: Option<&Identity>,
    params: &TransportParams,
) -> Result<ClientConfig, ConfigError> {
    let tls = crate::tls::client(AllowList::of(pinned), id)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(params)));
    Ok(cfg)
}

fn stream(id: StreamId) -> quinn_proto::StreamId {
    quinn_proto::StreamId::from(VarInt::from_u64(id).unwrap_or(VarInt::MAX))
}

fn dir(d: Dir) -> quinn_proto::Dir {
    match d {
        Dir::Bi => quinn_proto::Dir::Bi,
        Dir::Uni => quinn_proto::Dir::Uni,
    }
}

fn transmit(conn: Option<ConnId>, t: &quinn_proto::Transmit) -> Transmit {
    Transmit {
        conn,
        destination: t.destination,
        size: t.size,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

/// GSO batches a connection sends before [`QuinnEndpoint::poll_transmit`] turns to the next
/// one and, after every connection had its turn, returns `None`.
const SEND_ROUNDS: u32 = 8;

/// A quinn-proto endpoint and its connections behind [`QuicEndpoint`].
pub struct QuinnEndpoint {
    ep: quinn_proto::Endpoint,
    client: Option<ClientConfig>,
    /// Connections by [`ConnId`] (ids are never reused; the slots of ended connections stay,
    /// small, until the endpoint goes).
    conns: Vec<Slot>,
    handles: HashMap<ConnectionHandle, ConnId>,
    incoming: VecDeque<(u64, quinn_proto::Incoming)>,
    next_incoming: u64,
    /// Stateless responses (refusals, version negotiation, resets) waiting to be sent.
    responses: VecDeque<(Vec<u8>, Transmit)>,
    /// The connection [`QuicEndpoint::poll_transmit`] serves now.
    tx_next: usize,
    scratch: Vec<u8>,
}

struct Slot {
    conn: QuinnConn,
    handle: ConnectionHandle,
    tx_rounds: u32,
}

impl std::fmt::Debug for QuinnEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuinnEndpoint")
            .field("client", &self.client.is_some())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl QuinnEndpoint {
    fn new(
        server: Option<ServerConfig>,
        client: Option<ClientConfig>,
        seed: Option<[u8; 32]>,
    ) -> Self {
        Self {
            ep: quinn_proto::Endpoint::new(
                Arc::new(endpoint_config()),
                server.map(Arc::new),
                true,
                seed,
            ),
            client,
            conns: Vec::new(),
            handles: HashMap::new(),
            incoming: VecDeque::new(),
            next_incoming: 0,
            responses: VecDeque::new(),
            tx_next: 0,
            scratch: Vec::with_capacity(2048),
        }
    }

    /// A host's endpoint presenting `id`; with `allowed`, clients must present a certificate
    /// on that list (mutual pinning). `seed` makes its random choices repeatable (simulation).
    pub fn server(
        id: &Identity,
        params: &TransportParams,
        allowed: Option<Arc<AllowList>>,
        seed: Option<[u8; 32]>,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(
            Some(server_with(id, params, allowed)?),
            None,
            seed,
        ))
    }

    /// A joiner's endpoint that accepts only a server whose certificate hashes to `pinned`,
    /// presenting `id` when given.
    pub fn client(
        pinned: Fingerprint,
        id: Option<&Identity>,
        params: &TransportParams,
        seed: Option<[u8; 32]>,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(
            None,
            Some(client_with(pinned, id, params)?),
            seed,
        ))
    }

    fn add(&mut self, handle: ConnectionHandle, conn: quinn_proto::Connection) -> ConnId {
        let id = self.conns.len();
        self.handles.insert(handle, id);
        self.conns.push(Slot {
            conn: QuinnConn { conn },
            handle,
            tx_rounds: 0,
        });
        id
    }

    fn respond(&mut self, t: &quinn_proto::Transmit) {
        let data = self.scratch[..t.size.min(self.scratch.len())].to_vec();
        self.responses.push_back((data, transmit(None, t)));
    }

    /// Carries what passes between connection `slot` and the endpoint (connection IDs, its
    /// end).
    fn sync(ep: &mut quinn_proto::Endpoint, slot: &mut Slot) {
        while let Some(ev) = slot.conn.conn.poll_endpoint_events() {
            if let Some(ce) = ep.handle_event(slot.handle, ev) {
                slot.conn.conn.handle_event(ce);
            }
        }
    }
}

impl QuicEndpoint for QuinnEndpoint {
    type Conn = QuinnConn;

    fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: BytesMut,
    ) {
        let ecn = ecn.and_then(EcnCodepoint::from_bits);
        self.scratch.clear();
        match self
            .ep
            .handle(now, from, dst_ip, ecn, data, &mut self.scratch)
        {
            Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                if let Some(&id) = self.handles.get(&h) {
                    self.conns[id].conn.conn.handle_event(ev);
                }
            }
            Some(DatagramEvent::NewConnection(inc)) => {
                self.next_incoming += 1;
                self.incoming.push_back((self.next_incoming, inc));
            }
            Some(DatagramEvent::Response(t)) => self.respond(&t),
            None => {}
        }
    }

    fn poll_incoming(&mut self) -> Option<Incoming> {
        self.incoming.front().map(|(id, inc)| Incoming {
            id: *id,
            remote: inc.remote_address(),
        })
    }

    fn accept(&mut self, now: Instant, id: u64) -> Option<ConnId> {
        let pos = self.incoming.iter().position(|(i, _)| *i == id)?;
        let (_, inc) = self.incoming.remove(pos)?;
        self.scratch.clear();
        match self.ep.accept(inc, now, &mut self.scratch, None) {
            Ok((handle, conn)) => Some(self.add(handle, conn)),
            Err(e) => {
                if let Some(t) = e.response {
                    self.respond(&t);
                }
                None
            }
        }
    }

    fn refuse(&mut self, id: u64) {
        let Some(pos) = self.incoming.iter().position(|(i, _)| *i == id) else {
            return;
        };
        if let Some((_, inc)) = self.incoming.remove(pos) {
            self.scratch.clear();
            let t = self.ep.refuse(inc, &mut self.scratch);
            self.respond(&t);
        }
    }

    fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<ConnId, ConfigError> {
        let cfg = self
            .client
            .clone()
            .ok_or_else(|| ConfigError::Quic("a host's endpoint does not connect".into()))?;
        let (handle, conn) = self
            .ep
            .connect(now, cfg, peer, SERVER_NAME)
            .map_err(|e| ConfigError::Quic(format!("connect to {peer}: {e}")))?;
        Ok(self.add(handle, conn))
    }

    fn conn(&mut self, id: ConnId) -> Option<&mut QuinnConn> {
        self.conns.get_mut(id).map(|s| &mut s.conn)
    }

    fn poll_transmit(
        &mut self,
        now: Instant,
        max_segments: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        if let Some((data, t)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(t);
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.tx_next + k) % n;
            let slot = &mut self.conns[i];
            if slot.tx_rounds >= SEND_ROUNDS {
                continue;
            }
            Self::sync(&mut self.ep, slot);
            buf.clear();
            match slot.conn.conn.poll_transmit(now, max_segments, buf) {
                Some(t) => {
                    slot.tx_rounds += 1;
                    self.tx_next = i;
                    return Some(transmit(Some(i), &t));
                }
                None => slot.tx_rounds = SEND_ROUNDS,
            }
        }
        // Every connection had its turn: a new round starts with the next call.
        for s in &mut self.conns {
            s.tx_rounds = 0;
        }
        None
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.conns
            .iter_mut()
            .filter_map(|s| s.conn.conn.poll_timeout())
            .min()
    }

    fn handle_timeout(&mut self, now: Instant) {
        for slot in &mut self.conns {
            if slot.conn.conn.poll_timeout().is_some_and(|t| t <= now) {
                slot.conn.conn.handle_timeout(now);
            }
            Self::sync(&mut self.ep, slot);
        }
    }
}

/// A quinn-proto connection behind [`QuicConnection`].
pub struct QuinnConn {
    conn: quinn_proto::Connection,
}

impl std::fmt::Debug for QuinnConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuinnConn").finish_non_exhaustive()
    }
}
impl QuicConnection for QuinnConn {
    fn poll_event(&mut self) -> Option<ConnEvent> {
        use quinn_proto::{Event, StreamEvent};
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::Stream(StreamEvent::Opened { dir: d }) => {
                    return Some(ConnEvent::StreamOpened(match d {
                        quinn_proto::Dir::Bi => Dir::Bi,
                        quinn_proto::Dir::Uni => Dir::Uni,
                    }));
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    return Some(ConnEvent::Readable(id.into()));
                }
                Event::ConnectionLost { reason } => {
                    return Some(ConnEvent::Lost(match reason {
                        quinn_proto::ConnectionError::TimedOut => Closed::TimedOut,
                        r => Closed::Other(r.to_string()),
                    }));
                }
                _ => {}
            }
        }
        None
    }

    fn open_stream(&mut self, d: Dir) -> Option<StreamId> {
        self.conn.streams().open(dir(d)).map(Into::into)
    }

    fn accept_stream(&mut self, d: Dir) -> Option<StreamId> {
        self.conn.streams().accept(dir(d)).map(Into::into)
    }

    fn refuse_stream(&mut self, id: StreamId) {
        let _ = self.conn.recv_stream(stream(id)).stop(VarInt::from_u32(1));
    }

    fn read(&mut self, id: StreamId, max: usize, out: &mut Vec<Bytes>) -> ReadEnd {
        let mut recv = self.conn.recv_stream(stream(id));
        let Ok(mut chunks) = recv.read(true) else {
            // A stream already read to its end (or stopped): nothing to read, and its end was
            // reported when it was reached.
            return ReadEnd::Blocked;
        };
        let mut left = max;
        let end = loop {
            if left == 0 {
                break ReadEnd::More;
            }
            match chunks.next(left) {
                Ok(Some(c)) => {
                    left = left.saturating_sub(c.bytes.len());
                    out.push(c.bytes);
                }
                Ok(None) => break ReadEnd::Finished,
                Err(quinn_proto::ReadError::Blocked) => break ReadEnd::Blocked,
                Err(quinn_proto::ReadError::Reset(_)) => break ReadEnd::Reset,
            }
        };
        // Returns the flow-control credit the reads freed (it goes out with the next packets).
        let _ = chunks.finalize();
        end
    }

    fn write(&mut self, id: StreamId, data: Bytes) -> Result<usize, WriteError> {
        let mut one = [data];
        match self.conn.send_stream(stream(id)).write_chunks(&mut one) {
            Ok(w) => Ok(w.bytes),
            Err(quinn_proto::WriteError::Blocked) => Err(WriteError::Blocked),
            Err(_) => Err(WriteError::Gone),
        }
    }

    fn finish(&mut self, id: StreamId) {
        let _ = self.conn.send_stream(stream(id)).finish();
    }

    fn set_send_window(&mut self, bytes: u64) {
        self.conn.set_send_window(bytes);
    }

    fn set_receive_window(&mut self, bytes: u64) {
        self.conn
            .set_receive_window(VarInt::from_u64(bytes).unwrap_or(VarInt::MAX));
    }

    fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    fn congestion_window(&self) -> u64 {
        self.conn.congestion_state().window()
    }

    fn stats(&self) -> PathStats {
        let s = self.conn.stats();
        PathStats {
            rtt: self.conn.rtt(),
            cwnd: self.conn.congestion_state().window(),
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            mtu: s.path.current_mtu,
            congestion_events: s.path.congestion_events,
            udp_tx_bytes: s.udp_tx.bytes,
            udp_rx_bytes: s.udp_rx.bytes,
        }
    }

    fn peer_fingerprint(&self) -> Option<Fingerprint> {
        peer_fingerprint(&self.conn)
    }

    fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    fn close(&mut self, now: Instant, code: u32, reason: Bytes) {
        self.conn.close(now, code.into(), reason);
    }
}
