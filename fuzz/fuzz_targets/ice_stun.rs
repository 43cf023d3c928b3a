//! Arbitrary datagrams and stream bytes into an ICE agent with a STUN server and TURN servers
//! over UDP and TCP: STUN, TURN (Allocate, ChannelData, Data indications) and check parsing
//! from every source the engine feeds it. Never a panic, and the agent's queues stay bounded.
//!
//! Input: records of `[source, len_hi, len_lo, bytes…]`; source 0 = the STUN/TURN server over
//! UDP, 1 = the peer, 2 = the TURN TCP stream, 3 = 50 ms pass.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flux_ice::{Agent, Config, Credentials, Role, StreamId, TurnServer, TurnTransport};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let server: SocketAddr = "198.51.100.2:3478".parse().expect("addr");
    let local: SocketAddr = "10.0.0.1:1000".parse().expect("addr");
    let peer: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
    let mut config = Config::new(Role::Controlled, Credentials::from_random(&[1; 18]), 7);
    config.stun_servers = vec![server];
    for transport in [TurnTransport::Udp, TurnTransport::Tcp] {
        config.turn_servers.push(TurnServer {
            addr: server,
            transport,
            username: "u".into(),
            password: "p".into(),
        });
    }
    let mut a = Agent::new(config, t0);
    a.add_host(local, t0);
    a.turn_stream_connected(StreamId(1), "10.0.0.1:40000".parse().expect("addr"), t0);
    a.set_remote_credentials(&Credentials::from_random(&[2; 18]), t0);
    let mut now = t0;
    let mut rest = data;
    while let [source, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        match source % 4 {
            0 => {
                a.handle_datagram(now, server, local, bytes);
            }
            1 => {
                a.handle_datagram(now, peer, local, bytes);
            }
            2 => a.handle_stream_data(now, StreamId(1), bytes),
            _ => {
                now += Duration::from_millis(50);
                a.handle_timeout(now);
            }
        }
        let mut n = 0;
        while a.poll_transmit().is_some() || a.poll_event().is_some() || a.poll_app().is_some() {
            n += 1;
            assert!(n < 100_000, "unbounded output");
        }
    }
});
