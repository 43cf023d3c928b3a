//! One QUIC stream, memory to memory, over two `flux-udp` sockets on loopback: quinn-proto
//! driven by a plain single-threaded loop, GSO/GRO on and off. The ceiling of the transport
//! without disks or the transfer protocol (compare `flux-bench` for whole transfers).

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flux_quic::{Identity, TransportParams};
use flux_udp::{GRO_BUF_LEN, RecvMeta, SocketConfig, UdpSocket};
use quinn_proto::{Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, StreamEvent};

const BYTES: usize = 64 << 20;

struct Side {
    sock: UdpSocket,
    ep: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
}

fn pump(side: &mut Side, bufs: &mut [Vec<u8>], now: Instant, accept: bool) {
    let mut meta = [RecvMeta {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        len: 0,
        stride: 0,
        ecn: None,
        dst_ip: None,
    }; 8];
    loop {
        let n = {
            let mut sl: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            side.sock.recv_batch(&mut sl, &mut meta).unwrap_or_default()
        };
        if n == 0 {
            break;
        }
        for (i, m) in meta.iter().enumerate().take(n) {
            let mut data = BytesMut::from(&bufs[i][..m.len]);
            while !data.is_empty() {
                let seg = data.split_to(m.stride.max(1).min(data.len()));
                let mut resp = Vec::new();
                match side.ep.handle(now, m.addr, None, None, seg, &mut resp) {
                    Some(DatagramEvent::NewConnection(inc)) if accept => {
                        side.conn = side.ep.accept(inc, now, &mut resp, None).ok();
                    }
                    Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                        if let Some((ch, c)) = side.conn.as_mut()
                            && *ch == h
                        {
                            c.handle_event(ev);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let Some((h, c)) = side.conn.as_mut() else {
        return;
    };
    if c.poll_timeout().is_some_and(|t| t <= now) {
        c.handle_timeout(now);
    }
    while let Some(ev) = c.poll_endpoint_events() {
        if let Some(ce) = side.ep.handle_event(*h, ev) {
            c.handle_event(ce);
        }
    }
}

fn flush(side: &mut Side, tx: &mut Vec<u8>, now: Instant) {
    let segs = side.sock.capabilities().max_gso_segments(1452).max(1);
    let Some((_, c)) = side.conn.as_mut() else {
        return;
    };
    for _ in 0..64 {
        tx.clear();
        let Some(t) = c.poll_transmit(now, segs, tx) else {
            break;
        };
        let _ = side.sock.send(&flux_udp::Transmit {
            destination: t.destination,
            contents: &tx[..t.size],
            segment_size: t.segment_size,
            ecn: None,
            src_ip: None,
        });
    }
}

fn one_stream(offload: bool) {
    let id = Identity::generate().unwrap();
    let params = TransportParams::default();
    let server_cfg = flux_quic::quinn::server_config(&id, &params).unwrap();
    let client_cfg = flux_quic::quinn::client_config(id.fingerprint(), &params).unwrap();
    let sc = SocketConfig {
        gso: offload,
        gro: offload,
        ..SocketConfig::default()
    };
    let bind = "127.0.0.1:0".parse().unwrap();
    let ecfg = Arc::new(flux_quic::quinn::endpoint_config());
    let mut server = Side {
        sock: UdpSocket::bind(bind, &sc).unwrap(),
        ep: Endpoint::new(ecfg.clone(), Some(Arc::new(server_cfg)), true, None),
        conn: None,
    };
    let mut client = Side {
        sock: UdpSocket::bind(bind, &sc).unwrap(),
        ep: Endpoint::new(ecfg, None, true, None),
        conn: None,
    };
    let saddr = server.sock.local_addr().unwrap();
    client.conn = Some(
        client
            .ep
            .connect(Instant::now(), client_cfg, saddr, flux_quic::SERVER_NAME)
            .unwrap(),
    );
    let payload = vec![0x5au8; 1 << 20];
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; GRO_BUF_LEN]).collect();
    let mut tx = Vec::with_capacity(GRO_BUF_LEN);
    let (mut written, mut read) = (0usize, 0usize);
    let mut stream = None;
    let mut finished = false;
    while read < BYTES {
        let now = Instant::now();
        pump(&mut client, &mut bufs, now, false);
        pump(&mut server, &mut bufs, now, true);
        if let Some((_, c)) = client.conn.as_mut() {
            while c.poll().is_some() {}
            if stream.is_none() {
                stream = c.streams().open(Dir::Uni);
            }
            if let Some(id) = stream {
                while written < BYTES {
                    let n = (BYTES - written).min(payload.len());
                    match c.send_stream(id).write(&payload[..n]) {
                        Ok(k) if k > 0 => written += k,
                        _ => break,
                    }
                }
                if written == BYTES && !finished {
                    finished = c.send_stream(id).finish().is_ok();
                }
            }
        }
        if let Some((_, c)) = server.conn.as_mut() {
            while let Some(ev) = c.poll() {
                if let Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) = ev {
                    let _ = c.streams().accept(Dir::Uni);
                }
            }
            // The client's first uni stream has id 2 (client-initiated, unidirectional).
            let sid = quinn_proto::StreamId::new(quinn_proto::Side::Client, Dir::Uni, 0);
            if let Ok(mut rs) = c.recv_stream(sid).read(true) {
                while let Ok(Some(ch)) = rs.next(usize::MAX) {
                    read += ch.bytes.len();
                }
                let _ = rs.finalize();
            }
        }
        flush(&mut client, &mut tx, now);
        flush(&mut server, &mut tx, now);
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("loopback_quic_stream");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BYTES as u64));
    for offload in [true, false] {
        let name = if offload { "gso_gro_on" } else { "gso_gro_off" };
        g.bench_with_input(BenchmarkId::from_parameter(name), &offload, |b, &o| {
            b.iter(|| one_stream(o))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
