//! Counters served on `/metrics` in the Prometheus text format (version 0.0.4).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use flux_signal_proto::{AddrRejection, ErrorCode};

/// Live counters. Gauges that are derived from state (open connections, live sessions) are
/// filled in at render time.
#[derive(Debug)]
pub struct Metrics {
    /// WebSocket connections accepted.
    pub connections: AtomicU64,
    /// Sessions created.
    pub sessions_created: AtomicU64,
    /// Successful joins.
    pub joins: AtomicU64,
    /// Joiners rejected by their host.
    pub failed_joins: AtomicU64,
    /// Messages received from clients (all frame types).
    pub messages_received: AtomicU64,
    /// `relay` messages delivered to a peer's queue.
    pub relays: AtomicU64,
    /// Candidates delivered to a peer's queue.
    pub candidates: AtomicU64,
    /// Relay bytes (encoded) delivered between a host and a joiner not yet paired.
    pub pairing_bytes: AtomicU64,
    rejections: [AtomicU64; ErrorCode::ALL.len()],
    filtered: [AtomicU64; FILTER_REASONS.len()],
}

// By hand: `Default` for arrays stops at 32 elements, and there are more error codes.
impl Default for Metrics {
    fn default() -> Self {
        let zero = |_| AtomicU64::new(0);
        Self {
            connections: AtomicU64::new(0),
            sessions_created: AtomicU64::new(0),
            joins: AtomicU64::new(0),
            failed_joins: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            relays: AtomicU64::new(0),
            candidates: AtomicU64::new(0),
            pairing_bytes: AtomicU64::new(0),
            rejections: std::array::from_fn(zero),
            filtered: std::array::from_fn(zero),
        }
    }
}

/// Gauges read from the server state when rendering.
pub(crate) struct Gauges {
    pub(crate) ws_connections: usize,
    pub(crate) pending_handshakes: usize,
    pub(crate) sessions: usize,
    pub(crate) relays: usize,
    pub(crate) relay_streams: usize,
}

impl Metrics {
    /// Counts one refusal, by wire code.
    pub fn reject(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.rejections[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far with this code.
    pub fn rejections(&self, code: ErrorCode) -> u64 {
        ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .map_or(0, |i| self.rejections[i].load(Ordering::Relaxed))
    }

    /// Counts one candidate dropped by the address filter.
    pub fn filtered(&self, reason: AddrRejection) {
        if let Some(i) = FILTER_REASONS.iter().position(|r| *r == reason) {
            self.filtered[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn render(&self, g: &Gauges, relay: &super::RelayMetrics) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "thruserv_connections_active",
            "Open WebSocket connections.",
            g.ws_connections as u64,
        );
        gauge(
            "thruserv_handshakes_pending",
            "TCP connections still in the TLS/HTTP handshake.",
            g.pending_handshakes as u64,
        );
        gauge(
            "thruserv_sessions_active",
            "Live sessions.",
            g.sessions as u64,
        );
        gauge(
            "thruserv_relays_active",
            "Live web relay links (0 without --web-relay).",
            g.relays as u64,
        );
        gauge(
            "thruserv_relay_streams_active",
            "Web relay downloads and uploads in flight.",
            g.relay_streams as u64,
        );
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "thruserv_connections_total",
            "WebSocket connections accepted.",
            load(&self.connections),
        );
        counter(
            "thruserv_sessions_created_total",
            "Sessions created.",
            load(&self.sessions_created),
        );
        counter(
            "thruserv_relays_opened_total",
            "Web relay links opened.",
            load(&relay.opened),
        );
        counter(
            "thruserv_relays_refused_total",
            "Web relay opens refused by the relay limits.",
            load(&relay.refused),
        );
        counter(
            "thruserv_relay_streams_total",
            "Web relay downloads and uploads started.",
            load(&relay.streams),
        );
        counter(
            "thruserv_relay_streams_cut_total",
            "Web relay streams refused or cut by a limit or timeout.",
            load(&relay.cut),
        );
        counter(
            "thruserv_relay_bytes_total",
            "Bytes carried by the web relay (ciphertext in end-to-end mode).",
            load(&relay.bytes),
        );
        counter(
            "thruserv_relay_not_found_total",
            "Requests for unknown, used or expired relay links.",
            load(&relay.not_found),
        );
        counter(
            "thruserv_joins_total",
            "Successful joins.",
            load(&self.joins),
        );
        counter(
            "thruserv_failed_joins_total",
            "Joiners rejected by their host.",
            load(&self.failed_joins),
        );
        counter(
            "thruserv_messages_received_total",
            "Frames received from clients.",
            load(&self.messages_received),
        );
        let _ = writeln!(
            out,
            "# HELP thruserv_messages_relayed_total Messages routed to a peer.\n\
             # TYPE thruserv_messages_relayed_total counter\n\
             thruserv_messages_relayed_total{{kind=\"relay\"}} {}\n\
             thruserv_messages_relayed_total{{kind=\"candidate\"}} {}",
            load(&self.relays),
            load(&self.candidates)
        );
        let _ = writeln!(
            out,
            "# HELP thruserv_pairing_bytes_relayed_total Relay bytes delivered between a host and a joiner not yet paired.\n\
             # TYPE thruserv_pairing_bytes_relayed_total counter\n\
             thruserv_pairing_bytes_relayed_total {}",
            load(&self.pairing_bytes)
        );
        let _ = writeln!(
            out,
            "# HELP thruserv_candidates_filtered_total Candidates not relayed, by address class.\n\
             # TYPE thruserv_candidates_filtered_total counter"
        );
        for (reason, n) in FILTER_REASONS.iter().zip(&self.filtered) {
            let _ = writeln!(
                out,
                "thruserv_candidates_filtered_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                load(n)
            );
        }
        let _ = writeln!(
            out,
            "# HELP thruserv_rejections_total Refused requests and closed connections, by error code.\n\
             # TYPE thruserv_rejections_total counter"
        );
        for (code, n) in ErrorCode::ALL.iter().zip(&self.rejections) {
            if *code != ErrorCode::Unknown {
                let _ = writeln!(
                    out,
                    "thruserv_rejections_total{{reason=\"{}\"}} {}",
                    code.as_str(),
                    load(n)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP thruserv_build_info Build information.\n# TYPE thruserv_build_info gauge\n\
             thruserv_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

const FILTER_REASONS: [AddrRejection; 6] = [
    AddrRejection::Unspecified,
    AddrRejection::Loopback,
    AddrRejection::LinkLocal,
    AddrRejection::Metadata,
    AddrRejection::Multicast,
    AddrRejection::PortZero,
];
