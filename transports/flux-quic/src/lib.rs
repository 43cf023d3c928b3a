//! QUIC for Thruflux, over quinn-proto: identities, certificate pinning and transport tuning.
//!
//! Each side of a transfer has a throwaway self-signed [`Identity`]. A peer is authenticated by
//! the BLAKE3 fingerprint of its certificate, learned through the pairing channel (which the
//! PAKE protects), never by a certificate authority: a client built with [`client_config`]
//! refuses any server whose certificate does not hash to the pinned fingerprint.
//!
//! What this crate does not do: sockets, timers or the connection loop. quinn-proto is already
//! sans-IO; the engine and the simulator drive its `Endpoint` and `Connection` directly, and this
//! crate only builds their configuration. TLS uses rustls with the *ring* provider (AES-GCM
//! first, as quinn requires for its initial keys).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::sync::Arc;
use std::time::Duration;

pub use quinn_proto;

mod window;
use quinn_proto::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, ServerConfig, TransportConfig,
    VarInt,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
pub use window::WindowTuner;

/// ALPN protocol id of the transfer protocol.
pub const ALPN: &[u8] = b"thruflux/1";
/// Server name used in the TLS handshake; certificates are pinned, so it carries no trust.
pub const SERVER_NAME: &str = "thruflux.peer";

/// A BLAKE3 fingerprint of a DER certificate.
pub type Fingerprint = [u8; 32];

/// Failures building QUIC configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the TLS configuration (no TLS 1.3 or no initial cipher suite).
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// A self-signed certificate and its key.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Identity {
    /// A fresh identity. Key generation draws from the OS through *ring*, as TLS itself does.
    pub fn generate() -> Result<Self, ConfigError> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
        Ok(Self {
            cert: ck.cert.der().clone(),
            key: ck.key_pair.serialize_der(),
        })
    }

    /// The fingerprint a peer pins.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert)
    }
}

/// The fingerprint of the certificate the peer of `conn` presented, once the handshake has
/// authenticated it (`None` before, or for a client that presented none).
pub fn peer_fingerprint(conn: &quinn_proto::Connection) -> Option<Fingerprint> {
    let any = conn.crypto_session().peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(fingerprint)
}

/// The fingerprint of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Fingerprint {
    *blake3::hash(cert.as_ref()).as_bytes()
}

/// Flow-control and stream limits (defaults match the `thru` flags).
#[derive(Clone, Debug)]
pub struct TransportParams {
    /// Largest connection-level receive window (`--quic-conn-window-bytes`). Connections
    /// start at [`WindowTuner::INITIAL`] (or this, if lower) and a receiver grows the window
    /// towards twice the measured bandwidth-delay product, up to this.
    pub conn_window: u64,
    /// Per-stream receive window (`--quic-stream-window-bytes`).
    pub stream_window: u64,
    /// Most unacknowledged and unsent stream data buffered for sending, per connection. This,
    /// not the peer's receive window, bounds the sender's memory.
    pub send_window: u64,
    /// Streams the peer may open (`--quic-max-incoming-streams`).
    pub max_incoming_streams: u32,
    /// Idle time after which a silent connection is dropped: how soon a dead peer (killed,
    /// suspended, cut off) is noticed. quinn stretches it to three probe timeouts on a
    /// slow path (RFC 9000 §10.1), so it follows the path's RTT.
    pub idle_timeout: Duration,
    /// Keep-alive interval: while a user reads a prompt, or a transfer is paused, each side
    /// still hears from the other several times per `idle_timeout`.
    pub keep_alive: Duration,
    /// Initial datagram size; path MTU discovery raises it.
    pub initial_mtu: u16,
    /// Upper bound for path MTU discovery (UDP payload bytes). 1452 fits a 1500-byte
    /// Ethernet path over IPv6; loopback and jumbo-frame paths can go higher.
    pub max_mtu: u16,
    /// Congestion controller.
    pub congestion: Congestion,
}

/// Congestion controllers quinn-proto offers. Pacing is always on in quinn-proto.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR (v1, experimental in quinn-proto).
    Bbr,
    /// NewReno (RFC 9002).
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            "newreno" | "reno" => Ok(Self::NewReno),
            other => Err(format!(
                "unknown congestion controller {other:?} (expected cubic, bbr or newreno)"
            )),
        }
    }
}

impl Default for TransportParams {
    fn default() -> Self {
        Self {
            conn_window: 1 << 30,
            stream_window: 32 << 20,
            send_window: 64 << 20,
            max_incoming_streams: 100,
            // The first packet we send after the last one heard restarts the timer once, so a
            // dead peer is noticed after 3 s plus at most one keep-alive: within 5 s.
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(1),
            initial_mtu: 1200,
            max_mtu: 1452,
            congestion: Congestion::Cubic,
        }
    }
}

impl TransportParams {
    /// The quinn transport configuration.
    pub fn to_transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        let initial = self.conn_window.min(WindowTuner::INITIAL);
        t.receive_window(VarInt::from_u64(initial).unwrap_or(VarInt::MAX))
            .stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_incoming_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .keep_alive_interval(Some(self.keep_alive))
            .initial_mtu(self.initial_mtu.max(1200));
        let mut mtud = MtuDiscoveryConfig::default();
        mtud.upper_bound(self.max_mtu.max(self.initial_mtu).max(1200));
        t.mtu_discovery_config(Some(mtud));
        match self.congestion {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
        };
        t
    }
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
    cfg.transport_config(Arc::new(params.to_transport()));
    Ok(cfg)
}

/// The certificate fingerprints a host lets in: one per joiner that completed pairing. Read
/// once per TLS handshake, never on the data path.
#[derive(Debug, Default)]
pub struct AllowList(std::sync::RwLock<std::collections::HashSet<Fingerprint>>);

impl AllowList {
    /// An empty list: nobody gets in.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `fp` in.
    pub fn allow(&self, fp: Fingerprint) {
        if let Ok(mut s) = self.0.write() {
            s.insert(fp);
        }
    }

    /// Whether `fp` may connect.
    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.0.read().is_ok_and(|s| s.contains(fp))
    }
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
    cfg.transport_config(Arc::new(params.to_transport()));
    Ok(cfg)
}

/// The cipher suite both ends prefer, so every connection between Thruflux peers uses it.
pub const CIPHER_SUITE: &str = "TLS13_AES_128_GCM_SHA256";

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
