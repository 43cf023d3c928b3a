//! TLS 1.3 with mutual certificate pinning, on the workspace's rustls + *ring*.
//!
//! s2n-quic's rustls provider accepts a ready `rustls::ServerConfig` / `ClientConfig`, so the
//! pinning verifiers are the same kind flux-quic gives quinn: any certificate whose BLAKE3
//! fingerprint is on the [`PinSet`] passes (its handshake signature is still checked), any
//! other is refused. A refusal is remembered, so the endpoint can name the fingerprint it saw.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{ALPN, Error, Fingerprint, Identity, fingerprint};

/// The certificate fingerprints one endpoint accepts from its peers: one per peer that
/// completed pairing. s2n-quic configures TLS per endpoint, not per connection, so a client
/// that connects to several hosts pins all of them here and checks
/// [`crate::Connection::peer_fingerprint`] to tell which one answered.
#[derive(Debug, Default)]
pub struct PinSet {
    allowed: RwLock<HashSet<Fingerprint>>,
    /// The last fingerprint refused, for the error message.
    refused: Mutex<Option<Fingerprint>>,
}

impl PinSet {
    /// An empty set: nobody gets in.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding exactly `fp`.
    pub fn of(fp: Fingerprint) -> Arc<Self> {
        let s = Self::new();
        s.allow(fp);
        Arc::new(s)
    }

    /// Lets `fp` in.
    pub fn allow(&self, fp: Fingerprint) {
        if let Ok(mut s) = self.allowed.write() {
            s.insert(fp);
        }
    }

    /// Whether `fp` may connect.
    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.allowed.read().is_ok_and(|s| s.contains(fp))
    }

    /// The fingerprint most recently refused, if any (cleared by the read).
    pub fn take_refused(&self) -> Option<Fingerprint> {
        self.refused.lock().ok().and_then(|mut r| r.take())
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = fingerprint(cert.as_ref());
        if self.contains(&fp) {
            return Ok(());
        }
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(fp);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// The cipher suites in the order flux-quic uses (AES-128-GCM first), on *ring*.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn key_of(id: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone()))
}

/// Server TLS: presents `id`, requires a client certificate on `pins`.
pub(crate) fn server(id: &Identity, pins: Arc<PinSet>) -> Result<rustls::ServerConfig, Error> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Pinned { pins, algs }))
        .with_single_cert(vec![id.cert.clone()], key_of(id))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // s2n-quic sizes CRYPTO frames itself (as its own rustls builder does).
    tls.max_fragment_size = None;
    tls.ignore_client_order = true;
    Ok(tls)
}

/// Client TLS: presents `id`, accepts only a server certificate on `pins`.
pub(crate) fn client(id: &Identity, pins: Arc<PinSet>) -> Result<rustls::ClientConfig, Error> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pins, algs }))
        .with_client_auth_cert(vec![id.cert.clone()], key_of(id))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_fragment_size = None;
    Ok(tls)
}

/// Accepts certificates on a [`PinSet`], in either direction; signatures are still checked.
#[derive(Debug)]
struct Pinned {
    pins: Arc<PinSet>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// Both configurations offer TLS 1.3 only.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.pins
            .check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.pins
            .check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
