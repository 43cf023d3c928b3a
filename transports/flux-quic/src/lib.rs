//! QUIC for Thruflux: identities, certificate pinning, transport settings, and the seam
//! between the engine and a QUIC stack.
//!
//! Each side of a transfer has a throwaway self-signed [`Identity`]. A peer is authenticated by
//! the BLAKE3 fingerprint of its certificate, learned through the pairing channel (which the
//! PAKE protects), never by a certificate authority: a client pins the server's fingerprint,
//! and a host that requires it ([`AllowList`]) pins its joiners'.
//!
//! - [`conn`]: what the engine needs from a QUIC connection ([`conn::QuicConnection`]:
//!   streams with flow control, events, path figures, close, timers, transmits), in types of no
//!   particular stack.
//! - [`quinn`]: the quinn-proto backend (configuration, endpoint, connection). It is the only
//!   module whose public API carries quinn-proto types.
//! - [`tls`]: the rustls configurations every backend uses (TLS 1.3, pinning by
//!   fingerprint, [`AllowList`]).
//!
//! What this crate does not do: sockets, timers or the connection loop (the engine's). TLS is
//! rustls with the *ring* provider (AES-GCM first, as quinn requires for its initial keys).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::time::Duration;

pub mod conn;
pub mod quinn;
pub mod tls;
mod window;

use rustls::pki_types::CertificateDer;
pub use tls::AllowList;
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
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: Vec<u8>,
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

/// The cipher suite both ends prefer, so every connection between Thruflux peers uses it.
pub const CIPHER_SUITE: &str = "TLS13_AES_128_GCM_SHA256";
