//! Which QUIC stack a worker runs, and how each one is set up from the engine's settings.
//!
//! Both stacks sit behind flux-quic's `QuicEndpoint` seam and use the same TLS (flux-quic's
//! `tls` module: TLS 1.3, pinning by certificate fingerprint), so a [`crate::node::Node`]
//! runs the same transfer over either. They do not interoperate on the wire in this
//! project: both ends of a connection must run the same stack, which pairing agrees on
//! (`thru --quic`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use flux_quic::{AllowList, Congestion, Fingerprint, Identity, TransportParams};
use flux_quic_s2n::{Endpoint, S2nEndpoint};
use flux_transfer::TransferError;

/// A QUIC implementation the engine can drive.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
pub enum QuicStack {
    /// quinn-proto (`flux_quic::quinn`).
    #[default]
    Quinn,
    /// s2n-quic, driven by the engine's loop through its I/O provider (`flux-quic-s2n`).
    S2n,
}

impl QuicStack {
    /// Every stack, in the order they are listed to users.
    pub const ALL: [Self; 2] = [Self::Quinn, Self::S2n];

    /// The stack `--quic auto` runs on a host (bench/README.md, "QUIC stacks", has the
    /// measurement behind the choice).
    pub const AUTO: Self = Self::Quinn;

    /// The name used on the command line, in pairing and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quinn => "quinn",
            Self::S2n => "s2n",
        }
    }
}

impl std::fmt::Display for QuicStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuicStack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "quinn" | "quinn-proto" => Ok(Self::Quinn),
            "s2n" | "s2n-quic" => Ok(Self::S2n),
            other => Err(format!(
                "unknown QUIC stack {other:?} (expected quinn or s2n)"
            )),
        }
    }
}

/// The largest connection window given to s2n-quic. s2n sets windows once per endpoint (it has
/// no auto-tuning like flux-quic's `WindowTuner`), so a receiver whose disk falls behind could
/// otherwise hold up to the whole `--quic-conn-window-bytes` in memory. 64 MiB is what the
/// s2n rows of flux-bench ran with: above 11 Gbit/s on loopback, and 5 Gbit/s at 100 ms RTT.
const S2N_MAX_CONN_WINDOW: u64 = 64 << 20;

/// s2n-quic's settings for the engine's `params`, batching up to `max_segments` per GSO send
/// on a socket bound to `local`.
pub fn s2n_config(
    params: &TransportParams,
    local: SocketAddr,
    max_segments: usize,
) -> Result<flux_quic_s2n::Config, TransferError> {
    // s2n counts IP and UDP headers in its MTU; the engine's settings are UDP payloads.
    let headers = if local.is_ipv4() { 28 } else { 48 };
    let congestion = match params.congestion {
        Congestion::Cubic => flux_quic_s2n::Congestion::Cubic,
        Congestion::Bbr => flux_quic_s2n::Congestion::Bbr,
        Congestion::NewReno => {
            return Err(TransferError::Io(
                "s2n-quic offers the cubic and bbr congestion controllers, not newreno".into(),
            ));
        }
    };
    let defaults = flux_quic_s2n::Config::default();
    Ok(flux_quic_s2n::Config {
        conn_window: params.conn_window.min(S2N_MAX_CONN_WINDOW),
        stream_window: params.stream_window,
        send_buffer: u32::try_from(params.send_window).unwrap_or(u32::MAX),
        max_incoming_streams: u64::from(params.max_incoming_streams),
        idle_timeout: params.idle_timeout,
        keep_alive: params.keep_alive,
        initial_mtu: params
            .initial_mtu
            .saturating_add(headers)
            .max(defaults.initial_mtu),
        max_mtu: params
            .max_mtu
            .saturating_add(headers)
            .max(defaults.initial_mtu),
        max_gso_segments: max_segments.max(1),
        congestion,
        ..defaults
    })
}

fn s2n_err(e: flux_quic_s2n::Error) -> TransferError {
    TransferError::Io(format!("QUIC configuration (s2n-quic): {e}"))
}

/// A host's s2n endpoint on a socket bound to `local`, presenting `id` and letting in
/// `allowed` joiners (any that pins the host, with `None`).
pub fn s2n_server(
    local: SocketAddr,
    id: &Identity,
    allowed: Option<Arc<AllowList>>,
    params: &TransportParams,
    max_segments: usize,
    now: Instant,
) -> Result<S2nEndpoint, TransferError> {
    let cfg = s2n_config(params, local, max_segments)?;
    Endpoint::server_with(local, id, allowed, &cfg, now)
        .map(S2nEndpoint::from)
        .map_err(s2n_err)
}

/// A joiner's s2n endpoint on a socket bound to `local`, accepting only the host certificate
/// `pinned`, presenting `id` when given.
pub fn s2n_client(
    local: SocketAddr,
    pinned: Fingerprint,
    id: Option<&Identity>,
    params: &TransportParams,
    max_segments: usize,
    now: Instant,
) -> Result<S2nEndpoint, TransferError> {
    let cfg = s2n_config(params, local, max_segments)?;
    Endpoint::client_with(local, id, AllowList::of(pinned), &cfg, now)
        .map(S2nEndpoint::from)
        .map_err(s2n_err)
}
