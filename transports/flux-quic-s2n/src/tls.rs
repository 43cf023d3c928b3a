//! TLS for s2n-quic: flux-quic's configurations (TLS 1.3 on rustls + *ring*, pinning by
//! fingerprint, one set of rules for every backend), adjusted where s2n-quic needs it.

use std::sync::Arc;

use flux_quic::{AllowList, Identity};

use crate::Error;

/// The certificate fingerprints an endpoint accepts: flux-quic's [`AllowList`]. s2n-quic
/// configures TLS per endpoint, not per connection, so a client that connects to several
/// hosts pins all of them here and checks [`crate::Connection::peer_fingerprint`] to tell
/// which one answered.
pub type PinSet = AllowList;

/// Server TLS: presents `id`; with `clients`, requires a client certificate on it.
pub(crate) fn server(
    id: &Identity,
    clients: Option<Arc<PinSet>>,
) -> Result<rustls::ServerConfig, Error> {
    let mut tls = flux_quic::tls::server(id, clients)?;
    // s2n-quic sizes CRYPTO frames itself (as its own rustls builder does).
    tls.max_fragment_size = None;
    tls.ignore_client_order = true;
    Ok(tls)
}

/// Client TLS: accepts only a server certificate on `pins`, presents `id` when given.
pub(crate) fn client(
    id: Option<&Identity>,
    pins: Arc<PinSet>,
) -> Result<rustls::ClientConfig, Error> {
    let mut tls = flux_quic::tls::client(pins, id)?;
    tls.max_fragment_size = None;
    Ok(tls)
}
