//! The same scenarios as `memory.rs`, over two real loopback UDP sockets (flux-udp, GSO and
//! GRO when the kernel has them), driven by one thread with a plain poll loop and the real
//! clock.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Wire;
use flux_quic_s2n::Endpoint;
use flux_quic_s2n::udp::UdpPump;
use flux_udp::{SocketConfig, UdpSocket};

struct Loopback {
    client: UdpPump,
    server: UdpPump,
}

impl Loopback {
    fn new() -> Self {
        let bind = || {
            let s = UdpSocket::bind(
                "127.0.0.1:0".parse().expect("addr"),
                &SocketConfig::default(),
            )
            .expect("bind a loopback UDP socket");
            UdpPump::new(s)
        };
        Self {
            client: bind(),
            server: bind(),
        }
    }
}

impl Wire for Loopback {
    fn addrs(&self) -> (SocketAddr, SocketAddr) {
        let a = |p: &UdpPump| p.socket().local_addr().expect("local address");
        (a(&self.client), a(&self.server))
    }

    #[allow(clippy::disallowed_methods)] // this wire is the driver: it owns the real clock
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn step(&mut self, client: &mut Endpoint, server: &mut Endpoint) -> bool {
        let now = self.now();
        let sent_c = self.client.send(client, now).expect("client send");
        let sent_s = self.server.send(server, now).expect("server send");
        let got = self.client.recv(client, now).expect("client recv")
            + self.server.recv(server, now).expect("server recv");
        if got == 0 && sent_c && sent_s {
            // Nothing arrived: sleep briefly on one socket (one thread serves both), at most
            // until either endpoint's next timer.
            let max = Duration::from_millis(1);
            self.server
                .wait(server, now, false, max)
                .and_then(|()| self.client.wait(client, now, false, Duration::ZERO))
                .expect("poll");
        }
        let now = self.now();
        for ep in [client, server] {
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                ep.handle_timeout(now);
            }
        }
        true
    }
}

#[test]
fn pinned_handshake_succeeds_and_names_both_peers() {
    common::pinned_handshake(Loopback::new());
}

#[test]
fn server_with_the_wrong_fingerprint_is_refused() {
    common::wrong_server_refused(Loopback::new());
}

#[test]
fn client_with_the_wrong_fingerprint_is_refused() {
    common::wrong_client_refused(Loopback::new());
}

#[test]
fn moves_64_mib_on_one_uni_stream_byte_identical() {
    let stats = common::bulk(Loopback::new(), 64 << 20, Duration::from_secs(120));
    eprintln!("loopback 64 MiB: {stats:?}");
}

#[test]
fn a_reset_stream_is_seen_by_the_reader() {
    common::reset_seen(Loopback::new());
}

#[test]
fn two_connections_share_one_socket_pair() {
    common::two_connections_one_path(Loopback::new());
}

#[test]
fn the_flux_quic_seam_carries_a_transfer() {
    common::through_the_seam(Loopback::new(), 16 << 20);
}
