//! The quinn-proto backend: configuration (pinned certificates, transport tuning) and the
//! endpoint and connection wrappers that put quinn-proto behind [`crate::conn`]'s neutral
//! types. This module is the only place quinn-proto's types appear in the public API.

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
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::conn::{
    Closed, ConnEvent, Dir, PathStats, QuicConnection, ReadEnd, StreamId, Transmit, WriteError,
};
use crate::{
    ALPN, AllowList, ConfigError, Congestion, Fingerprint, Identity, SERVER_NAME, TransportParams,
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
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone()));
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match clients {
        Some(allowed) => {
            builder.with_client_cert_verifier(Arc::new(PinnedClients { allowed, algs }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(vec![id.cert.clone()], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
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

/// Accepts client certificates on an [`AllowList`]; signatures are still checked.
#[derive(Debug)]
struct PinnedClients {
    allowed: Arc<AllowList>,
    algs: WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if self.allowed.contains(&fingerprint(end_entity)) {
            Ok(rustls::server::danger::ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
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
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        algs: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match id {
        Some(id) => {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone()));
            builder.with_client_auth_cert(vec![id.cert.clone()], key)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(params)));
    Ok(cfg)
}

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as strong as needed for a one-off session key and cheaper per byte
    // than AES-256 (fewer rounds); the other suites stay as fallbacks.
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Accepts exactly one certificate, by fingerprint; signatures are still checked, so the peer
/// must hold the matching key.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
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

fn transmit(t: &quinn_proto::Transmit) -> Transmit {
    Transmit {
        destination: t.destination,
        size: t.size,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

/// A quinn-proto endpoint: datagrams in, connections and stateless responses out. The
/// connections it makes are owned by the caller and driven through [`QuicConnection`];
/// [`QuinnEndpoint::sync`] carries what passes between a connection and the endpoint.
pub struct QuinnEndpoint {
    ep: quinn_proto::Endpoint,
    client: Option<ClientConfig>,
}

impl std::fmt::Debug for QuinnEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuinnEndpoint")
            .field("client", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// A connection attempt from a peer, before the host decides on it.
#[derive(Debug)]
pub struct Incoming(quinn_proto::Incoming);

impl Incoming {
    /// Where it comes from.
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }
}

/// Input for one of the endpoint's connections (hand it to the one that [`QuinnConn::takes`]
/// it).
#[derive(Debug)]
pub struct ConnInput(ConnectionHandle, quinn_proto::ConnectionEvent);

/// What a received datagram was.
#[derive(Debug)]
pub enum Received {
    /// Input for an existing connection.
    Conn(ConnInput),
    /// A peer wants to connect.
    Incoming(Incoming),
    /// A stateless response to send, in the buffer given to [`QuinnEndpoint::handle`].
    Response(Transmit),
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

    /// One received datagram (a GRO segment), from `from` to `dst_ip`, with ECN bits `ecn`.
    /// A response is written into `buf`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: BytesMut,
        buf: &mut Vec<u8>,
    ) -> Option<Received> {
        let ecn = ecn.and_then(EcnCodepoint::from_bits);
        buf.clear();
        match self.ep.handle(now, from, dst_ip, ecn, data, buf)? {
            DatagramEvent::ConnectionEvent(h, ev) => Some(Received::Conn(ConnInput(h, ev))),
            DatagramEvent::NewConnection(inc) => Some(Received::Incoming(Incoming(inc))),
            DatagramEvent::Response(t) => Some(Received::Response(transmit(&t))),
        }
    }

    /// Connects to `peer` (a client endpoint).
    pub fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<QuinnConn, ConfigError> {
        let cfg = self
            .client
            .clone()
            .ok_or_else(|| ConfigError::Quic("a host's endpoint does not connect".into()))?;
        let (handle, conn) = self
            .ep
            .connect(now, cfg, peer, SERVER_NAME)
            .map_err(|e| ConfigError::Quic(format!("connect to {peer}: {e}")))?;
        Ok(QuinnConn { handle, conn })
    }

    /// Accepts a connection attempt; a refusal may come with a response to send (in `buf`).
    pub fn accept(
        &mut self,
        now: Instant,
        inc: Incoming,
        buf: &mut Vec<u8>,
    ) -> Result<QuinnConn, Option<Transmit>> {
        buf.clear();
        match self.ep.accept(inc.0, now, buf, None) {
            Ok((handle, conn)) => Ok(QuinnConn { handle, conn }),
            Err(e) => Err(e.response.as_ref().map(transmit)),
        }
    }

    /// Refuses a connection attempt; the response to send is in `buf`.
    pub fn refuse(&mut self, inc: Incoming, buf: &mut Vec<u8>) -> Transmit {
        buf.clear();
        transmit(&self.ep.refuse(inc.0, buf))
    }

    /// Carries what passes between `conn` and the endpoint (connection IDs, its end). Call
    /// after driving the connection and before asking it for transmits.
    pub fn sync(&mut self, conn: &mut QuinnConn) {
        while let Some(ev) = conn.conn.poll_endpoint_events() {
            if let Some(ce) = self.ep.handle_event(conn.handle, ev) {
                conn.conn.handle_event(ce);
            }
        }
    }
}

/// A quinn-proto connection behind [`QuicConnection`].
pub struct QuinnConn {
    handle: ConnectionHandle,
    conn: quinn_proto::Connection,
}

impl std::fmt::Debug for QuinnConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuinnConn")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl QuinnConn {
    /// Whether `input` is for this connection.
    pub fn takes(&self, input: &ConnInput) -> bool {
        input.0 == self.handle
    }

    /// Input the endpoint routed to this connection.
    pub fn handle_input(&mut self, input: ConnInput) {
        self.conn.handle_event(input.1);
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

    fn poll_transmit(
        &mut self,
        now: Instant,
        max_segments: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        self.conn
            .poll_transmit(now, max_segments, buf)
            .map(|t| transmit(&t))
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
    }
}
