//! TLS for every QUIC stack of the engine: TLS 1.3 only, on rustls with *ring*, ALPN
//! `thruflux/1`, peers authenticated by the BLAKE3 fingerprint of their certificate.
//!
//! Both backends (quinn-proto here, s2n-quic in `flux-quic-s2n`) take a ready
//! `rustls::ServerConfig` / `rustls::ClientConfig`, so the pinning rules live once, in this
//! module: a certificate whose fingerprint is on an [`AllowList`] passes (its handshake
//! signature is still checked, so the peer must hold the key), any other is refused, and the
//! refused fingerprint is remembered so the caller can name it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{ALPN, ConfigError, Fingerprint, Identity, fingerprint};

/// The certificate fingerprints an endpoint accepts from its peers: a host's joiners that
/// completed pairing (it grows while the host runs), or the one host a joiner paired with.
/// Read once per TLS handshake, never on the data path.
#[derive(Debug, Default)]
pub struct AllowList {
    allowed: RwLock<HashSet<Fingerprint>>,
    /// The last fingerprint refused, for the error message.
    refused: Mutex<Option<Fingerprint>>,
}

impl AllowList {
    /// An empty list: nobody gets in.
    pub fn new() -> Self {
        Self::default()
    }

    /// A list holding exactly `fp`.
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
        let fp = fingerprint(cert);
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

/// *ring* with AES-128-GCM first: as strong as a one-off session key needs and cheaper per
/// byte than AES-256 (quinn also requires an AES-GCM suite for its initial keys); the other
/// suites stay as fallbacks.
pub fn provider() -> Arc<CryptoProvider> {
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

/// The host's TLS: presents `id`; with `clients`, requires a client certificate on it
/// (mutual pinning: a party that did not pair cannot connect), else asks for none.
pub fn server(
    id: &Identity,
    clients: Option<Arc<AllowList>>,
) -> Result<rustls::ServerConfig, ConfigError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match clients {
        Some(pins) => builder.with_client_cert_verifier(Arc::new(Pinned { pins, algs })),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(vec![id.cert.clone()], key_of(id))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// A joiner's TLS: accepts only a server certificate on `servers`, and presents `id` when
/// given (a host that pins its joiners requires it).
pub fn client(
    servers: Arc<AllowList>,
    id: Option<&Identity>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            pins: servers,
            algs,
        }));
    let mut tls = match id {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], key_of(id))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Accepts certificates on an [`AllowList`], in either direction; signatures are still
/// checked.
#[derive(Debug)]
struct Pinned {
    pins: Arc<AllowList>,
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
