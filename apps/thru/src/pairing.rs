//! The result of pairing: what the data engine needs to connect to one peer.
//!
//! [`Paired`] is a plain value. [`crate::rendezvous`] produces one per peer (the host gets
//! one per joiner, a joiner one for the host); the engine consumes it: the joiner dials one
//! of [`Paired::peer_addrs`] and pins [`Paired::peer_fingerprint`] with
//! `flux_quic::client_config`; the host accepts the connection whose client certificate
//! hashes to [`Paired::peer_fingerprint`].
//!
//! Nothing here does I/O.

use std::fmt;
use std::net::SocketAddr;

use flux_quic::Fingerprint;

use crate::pake::hex;

/// Which end of a transfer this process is.
#[derive(Clone, Copy, Debug, Eq, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Offers files; QUIC server.
    Host,
    /// Receives files; QUIC client.
    Joiner,
}

/// How the peers found each other (not yet the data path: the engine reports that).
#[derive(Clone, Copy, Debug, Eq, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rendezvous {
    /// Through a `thruserv` signaling server.
    Server,
    /// Directly on a LAN, found by mDNS.
    LanMdns,
    /// Directly on a LAN, at an address the user gave (`--peer`).
    LanDirect,
}

/// A successfully authenticated peer.
#[derive(Clone, Eq, PartialEq)]
pub struct Paired {
    /// This side's role.
    pub role: Role,
    /// How the peer was reached for pairing.
    pub rendezvous: Rendezvous,
    /// A short label for the peer in messages: `host`, or `joiner 1`, `joiner 2`…
    pub peer_label: String,
    /// The peer's QUIC certificate fingerprint, authenticated by the PAKE: pin it.
    pub peer_fingerprint: Fingerprint,
    /// The peer's QUIC addresses as it advertised them (authenticated), most promising
    /// first. On a LAN the address pairing reached the host at is moved to the front.
    pub peer_addrs: Vec<SocketAddr>,
    /// This side's fingerprint, as the peer will pin it.
    pub local_fingerprint: Fingerprint,
    /// This side's advertised addresses.
    pub local_addrs: Vec<SocketAddr>,
    /// The QUIC stack both sides agreed on (the host's).
    pub quic: flux_peer::stack::QuicStack,
    /// Shared by both peers only, bound to the pairing transcript. For an optional
    /// exporter-bound check inside QUIC; not needed when certificates are pinned.
    pub session_key: [u8; 32],
}

impl Paired {
    /// The peer's fingerprint as lower-case hex.
    pub fn peer_fingerprint_hex(&self) -> String {
        hex(&self.peer_fingerprint)
    }

    /// This side's fingerprint as lower-case hex.
    pub fn local_fingerprint_hex(&self) -> String {
        hex(&self.local_fingerprint)
    }

    /// ICE credentials for this pair, derived from [`Paired::session_key`] (never sent
    /// anywhere, so the server cannot learn them): (ours, the peer's). Both ends derive the
    /// same two; each calls its own role's "ours".
    pub fn ice_credentials(&self) -> (flux_ice::Credentials, flux_ice::Credentials) {
        let host = ice_credentials_for(ICE_CREDENTIALS_HOST, &self.session_key);
        let joiner = ice_credentials_for(ICE_CREDENTIALS_JOINER, &self.session_key);
        match self.role {
            Role::Host => (host, joiner),
            Role::Joiner => (joiner, host),
        }
    }
}

/// BLAKE3 `derive_key` contexts for the two ends' ICE credentials.
const ICE_CREDENTIALS_HOST: &str = "thruflux 2026 ice credentials host";
const ICE_CREDENTIALS_JOINER: &str = "thruflux 2026 ice credentials joiner";

fn ice_credentials_for(context: &str, session_key: &[u8; 32]) -> flux_ice::Credentials {
    let key = blake3::derive_key(context, session_key);
    let mut bytes = [0u8; 18];
    bytes.copy_from_slice(&key[..18]);
    flux_ice::Credentials::from_random(&bytes)
}

impl fmt::Debug for Paired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The session key stays out of logs.
        f.debug_struct("Paired")
            .field("role", &self.role)
            .field("rendezvous", &self.rendezvous)
            .field("peer_label", &self.peer_label)
            .field("peer_fingerprint", &self.peer_fingerprint_hex())
            .field("peer_addrs", &self.peer_addrs)
            .field("local_fingerprint", &self.local_fingerprint_hex())
            .field("local_addrs", &self.local_addrs)
            .field("quic", &self.quic)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(role: Role, session_key: [u8; 32]) -> Paired {
        Paired {
            role,
            rendezvous: Rendezvous::Server,
            peer_label: "peer".into(),
            peer_fingerprint: [1; 32],
            peer_addrs: vec![],
            local_fingerprint: [2; 32],
            local_addrs: vec![],
            quic: flux_peer::stack::QuicStack::Quinn,
            session_key,
        }
    }

    #[test]
    fn ice_credentials_agree_across_roles_and_differ_across_pairs() {
        let (h_ours, h_theirs) = pair(Role::Host, [7; 32]).ice_credentials();
        let (j_ours, j_theirs) = pair(Role::Joiner, [7; 32]).ice_credentials();
        assert_eq!(h_ours, j_theirs);
        assert_eq!(j_ours, h_theirs);
        assert_ne!(h_ours, h_theirs);
        assert_ne!(h_ours.ufrag, h_theirs.ufrag);

        let (other, _) = pair(Role::Host, [8; 32]).ice_credentials();
        assert_ne!(other, h_ours);
        // Valid RFC 8445 credentials: they survive the signaling form.
        let text = h_ours.to_string();
        assert_eq!(text.parse::<flux_ice::Credentials>().ok(), Some(h_ours));
    }
}
