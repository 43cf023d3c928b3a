//! Per-connection statistics and the peer's fingerprint, gathered from s2n-quic's events.
//!
//! s2n-quic exposes no stats getter on a connection; it publishes events to a `Subscriber`,
//! which may keep one context value per connection that the application can query
//! (`Connection::query_event_context`). This subscriber keeps [`Stats`] there.

use std::time::Duration;

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};

use crate::{Fingerprint, fingerprint};

/// A connection's counters and path state, as s2n last reported them.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest round-trip time seen.
    pub min_rtt: Duration,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Bytes sent and not yet acknowledged or declared lost.
    pub bytes_in_flight: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes of the packets declared lost.
    pub lost_bytes: u64,
    /// UDP payload bytes sent (every segment counted).
    pub sent_bytes: u64,
    /// Datagrams sent.
    pub sent_datagrams: u64,
    /// UDP payload bytes received.
    pub received_bytes: u64,
    /// Datagrams received.
    pub received_datagrams: u64,
    /// Largest UDP payload the path carries now (MTU discovery moves it).
    pub mtu: u16,
    /// QUIC packets sent (several may share a datagram).
    pub sent_packets: u64,
    /// Congestion events (loss or ECN CE that made the controller back off).
    pub congestion_events: u64,
}

/// What the subscriber keeps per connection.
#[derive(Debug, Default)]
pub(crate) struct Context {
    pub stats: Stats,
    pub peer: Option<Fingerprint>,
    pub closed: Option<s2n_quic::connection::Error>,
}

/// The endpoint's event subscriber.
#[derive(Debug, Default)]
pub(crate) struct Events;

impl Subscriber for Events {
    type ConnectionContext = Context;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        _info: &ConnectionInfo<'_>,
    ) -> Context {
        Context::default()
    }

    fn on_tls_exporter_ready(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::TlsExporterReady<'_>,
    ) {
        // `peer_cert_chain_der` is public but hidden in s2n's docs ("intended only for
        // unstable usage"); it is the only way to read the peer's certificate after the
        // handshake. The verifier already pinned it; this names which pin answered.
        if let Ok(chain) = event.session.peer_cert_chain_der() {
            context.peer = chain.first().map(|leaf| fingerprint(leaf));
        }
    }

    fn on_recovery_metrics(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::RecoveryMetrics<'_>,
    ) {
        let s = &mut context.stats;
        s.rtt = event.smoothed_rtt;
        s.min_rtt = event.min_rtt;
        s.cwnd = event.congestion_window.into();
        s.bytes_in_flight = event.bytes_in_flight.into();
    }

    fn on_packet_sent(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        _event: &events::PacketSent,
    ) {
        context.stats.sent_packets += 1;
    }

    fn on_congestion(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        _event: &events::Congestion<'_>,
    ) {
        context.stats.congestion_events += 1;
    }

    fn on_packet_lost(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::PacketLost<'_>,
    ) {
        context.stats.lost_packets += 1;
        context.stats.lost_bytes += u64::from(event.bytes_lost);
    }

    fn on_datagram_sent(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::DatagramSent,
    ) {
        context.stats.sent_datagrams += 1;
        context.stats.sent_bytes += u64::from(event.len);
    }

    fn on_datagram_received(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::DatagramReceived,
    ) {
        context.stats.received_datagrams += 1;
        context.stats.received_bytes += u64::from(event.len);
    }

    fn on_mtu_updated(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::MtuUpdated,
    ) {
        context.stats.mtu = event.mtu;
    }

    fn on_connection_closed(
        &mut self,
        context: &mut Context,
        _meta: &ConnectionMeta,
        event: &events::ConnectionClosed,
    ) {
        context.closed = Some(event.error);
    }
}
