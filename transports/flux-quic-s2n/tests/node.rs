//! `S2nEndpoint`: connections by id, streams through flux-quic's seam, transmits into the
//! caller's buffer, on an in-memory link with a virtual clock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_quic::conn::{ConnEvent, Dir, QuicConnection, ReadEnd};
use flux_quic_s2n::{Config, Endpoint, EndpointEvent, Identity, PinSet, S2nEndpoint};

#[test]
fn endpoint_hands_out_connections_by_id_and_carries_a_stream() {
    let (done, _) = carry(None);
    assert_eq!(done, 4 << 20);
}

/// s2n bounds each stream's send buffer only; the connection-wide window the engine's sessions
/// set must hold across streams: before any acknowledgement, a writer gets no more than the
/// window in, and the transfer still completes as acknowledgements free it.
#[test]
fn the_connection_send_window_bounds_what_writes_take() {
    let window = 256 << 10;
    let (done, first) = carry(Some(window));
    assert_eq!(done, 4 << 20);
    assert!(
        first > 0 && first <= window as usize,
        "the first burst took {first} bytes with a {window}-byte window"
    );
    // Without the window, s2n's per-stream buffer (64 MiB by default) takes it all at once.
    let (_, unbounded) = carry(None);
    assert_eq!(unbounded, 4 << 20);
}

/// 4 MiB over one stream; returns the bytes delivered and those the first write burst took
/// (before anything was acknowledged), with `window` set on the sending connection.
fn carry(window: Option<u64>) -> (usize, usize) {
    #[allow(clippy::disallowed_methods)] // the virtual clock's origin
    let mut now = Instant::now();
    let (ca, sa): (SocketAddr, SocketAddr) = (
        "10.0.0.1:1".parse().expect("addr"),
        "10.0.0.2:2".parse().expect("addr"),
    );
    let (c, s) = (
        Identity::generate().expect("id"),
        Identity::generate().expect("id"),
    );
    let cfg = Config::default();
    let mut client: S2nEndpoint = Endpoint::client(ca, &c, PinSet::of(s.fingerprint()), &cfg, now)
        .expect("client")
        .into();
    let mut server: S2nEndpoint = Endpoint::server(sa, &s, PinSet::of(c.fingerprint()), &cfg, now)
        .expect("server")
        .into();
    let want_id = client.connect(sa).expect("connect");

    let data = Bytes::from(vec![7u8; 4 << 20]);
    let (mut cid, mut sid_conn, mut stream) = (None, None, None);
    let (mut off, mut finished, mut got) = (0usize, false, 0usize);
    let mut first = None;
    let mut wire: VecDeque<(Instant, bool, Vec<u8>, Option<usize>)> = VecDeque::new();
    let mut buf = Vec::new();
    let end = now + Duration::from_secs(60);
    let done = loop {
        assert!(now < end, "the transfer did not finish");
        while let Some(ev) = client.poll_event() {
            match ev {
                EndpointEvent::Connected(id) => cid = Some(id),
                other => panic!("client: {other:?}"),
            }
        }
        while let Some(ev) = server.poll_event() {
            match ev {
                EndpointEvent::Accepted(id) => sid_conn = Some(id),
                other => panic!("server: {other:?}"),
            }
        }
        if let Some(id) = cid {
            assert_eq!(id, want_id);
            let conn = client.conn(id).expect("held");
            let st = *stream.get_or_insert_with(|| {
                if let Some(w) = window {
                    conn.set_send_window(w);
                }
                conn.open_stream(Dir::Uni).expect("open")
            });
            while off < data.len() {
                match conn.write(st, data.slice(off..)) {
                    Ok(n) => off += n,
                    Err(_) => break,
                }
            }
            first.get_or_insert(off);
            if off == data.len() && !finished {
                conn.finish(st);
                finished = true;
            }
        }
        if let Some(id) = sid_conn {
            let conn = server.conn(id).expect("held");
            let mut out = Vec::new();
            let mut fin = false;
            while let Some(ev) = conn.poll_event() {
                match ev {
                    ConnEvent::StreamOpened(Dir::Uni) => {
                        conn.accept_stream(Dir::Uni).expect("accept");
                    }
                    ConnEvent::Readable(rid) => loop {
                        let e = conn.read(rid, 1 << 20, &mut out);
                        got += out.drain(..).map(|b| b.len()).sum::<usize>();
                        match e {
                            ReadEnd::More => {}
                            ReadEnd::Finished => {
                                fin = true;
                                break;
                            }
                            _ => break,
                        }
                    },
                    other => panic!("unexpected {other:?}"),
                }
            }
            if fin {
                break got;
            }
        }
        // The link: 2 ms one way, batches whole.
        for (to_server, ep) in [(true, &mut client), (false, &mut server)] {
            while let Some(t) = ep.poll_transmit(now, &mut buf) {
                assert_eq!(t.size, buf.len());
                wire.push_back((
                    now + Duration::from_millis(2),
                    to_server,
                    buf.clone(),
                    t.segment_size,
                ));
            }
        }
        let next = [
            wire.front().map(|w| w.0),
            client.poll_timeout(),
            server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("something is due");
        now = now.max(next);
        while wire.front().is_some_and(|w| w.0 <= now) {
            let (_, to_server, mut bytes, seg) = wire.pop_front().expect("front");
            let (ep, from) = if to_server {
                (&mut server, ca)
            } else {
                (&mut client, sa)
            };
            ep.handle(now, from, None, &mut bytes, seg);
        }
        for ep in [&mut client, &mut server] {
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                ep.handle_timeout(now);
            }
        }
    };
    assert_eq!(done, data.len());
    assert_eq!(client.conn_ids().count(), 1);
    (done, first.unwrap_or(0))
}
