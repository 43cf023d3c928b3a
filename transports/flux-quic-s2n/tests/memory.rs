//! Two s2n-quic endpoints in one thread, joined by an in-memory link with a virtual clock:
//! no socket, no runtime, no sleeping. Time jumps to the next delivery or timer.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Wire;
use flux_quic_s2n::{Endpoint, Transmit};

const ONE_WAY: Duration = Duration::from_millis(5);

/// A lossless link with a fixed one-way delay, GSO batches delivered whole (as GRO would).
struct Memory {
    now: Instant,
    /// `(arrival, to the server, from, datagram)`, in arrival order.
    wire: VecDeque<(Instant, bool, SocketAddr, Transmit)>,
    batches: usize,
    /// Drop every n-th datagram (segment), if set.
    drop_every: Option<usize>,
    segments: usize,
}

impl Memory {
    fn new() -> Self {
        // The virtual clock's origin; from here time moves only when the link says so.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Self {
            now,
            wire: VecDeque::new(),
            batches: 0,
            drop_every: None,
            segments: 0,
        }
    }

    fn lossy(every: usize) -> Self {
        Self {
            drop_every: Some(every),
            ..Self::new()
        }
    }
}

impl Wire for Memory {
    fn addrs(&self) -> (SocketAddr, SocketAddr) {
        (
            "10.0.0.1:5000".parse().expect("addr"),
            "10.0.0.2:6000".parse().expect("addr"),
        )
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn step(&mut self, client: &mut Endpoint, server: &mut Endpoint) -> bool {
        let at = self.now + ONE_WAY;
        for (to_server, ep) in [(true, &mut *client), (false, &mut *server)] {
            let from = ep.local_addr();
            while let Some(t) = ep.poll_transmit(self.now) {
                self.batches += usize::from(t.segment_size.is_some());
                self.wire.push_back((at, to_server, from, t));
            }
        }
        let next = [
            self.wire.front().map(|p| p.0),
            client.poll_timeout(),
            server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        self.now = self.now.max(next);
        while self.wire.front().is_some_and(|p| p.0 <= self.now) {
            let Some((_, to_server, from, mut t)) = self.wire.pop_front() else {
                break;
            };
            let ep = if to_server {
                &mut *server
            } else {
                &mut *client
            };
            match self.drop_every {
                None => ep.handle(self.now, from, t.ecn, &mut t.contents, t.segment_size),
                Some(n) => {
                    // Segment by segment, so single datagrams of a batch can be lost.
                    let stride = t.segment_size.unwrap_or(t.contents.len()).max(1);
                    for seg in t.contents.chunks_mut(stride) {
                        self.segments += 1;
                        if !self.segments.is_multiple_of(n) {
                            ep.handle(self.now, from, t.ecn, seg, None);
                        }
                    }
                }
            }
            ep.recycle(t.contents);
        }
        for ep in [client, server] {
            if ep.poll_timeout().is_some_and(|t| t <= self.now) {
                ep.handle_timeout(self.now);
            }
        }
        true
    }
}

#[test]
fn pinned_handshake_succeeds_and_names_both_peers() {
    common::pinned_handshake(Memory::new());
}

#[test]
fn server_with_the_wrong_fingerprint_is_refused() {
    common::wrong_server_refused(Memory::new());
}

#[test]
fn client_with_the_wrong_fingerprint_is_refused() {
    let seen = common::wrong_client_refused(Memory::new());
    assert!(
        seen.contains("HANDSHAKE_FAILURE") || seen.contains("closed"),
        "{seen}"
    );
}

#[test]
fn moves_64_mib_on_one_uni_stream_byte_identical() {
    let stats = common::bulk(Memory::new(), 64 << 20, Duration::from_secs(600));
    assert!(stats.rtt >= 2 * ONE_WAY, "{stats:?}");
    assert_eq!(
        stats.lost_packets, 0,
        "a lossless link lost packets: {stats:?}"
    );
}

#[test]
fn recovers_from_loss_on_virtual_time() {
    // Every 50th datagram lost, both ways: loss detection and retransmission run on the
    // caller's (virtual) clock through handle_timeout.
    let stats = common::bulk(Memory::lossy(50), 8 << 20, Duration::from_secs(600));
    assert!(stats.lost_packets > 0, "{stats:?}");
}

#[test]
fn gso_batches_are_formed() {
    let mut mem = Memory::new();
    let stats = common::bulk(CountingMemory(&mut mem), 4 << 20, Duration::from_secs(60));
    assert!(stats.sent_datagrams > 0);
    assert!(mem.batches > 0, "no GSO batch came out of poll_transmit");
}

/// A `Memory` borrowed, so the test can read its counters afterwards.
struct CountingMemory<'a>(&'a mut Memory);

impl Wire for CountingMemory<'_> {
    fn addrs(&self) -> (SocketAddr, SocketAddr) {
        self.0.addrs()
    }
    fn now(&self) -> Instant {
        self.0.now()
    }
    fn step(&mut self, client: &mut Endpoint, server: &mut Endpoint) -> bool {
        self.0.step(client, server)
    }
}

#[test]
fn a_reset_stream_is_seen_by_the_reader() {
    common::reset_seen(Memory::new());
}

#[test]
fn two_connections_share_one_path() {
    common::two_connections_one_path(Memory::new());
}

#[test]
fn the_flux_quic_seam_carries_a_transfer() {
    common::through_the_seam(Memory::new(), 16 << 20);
}
