//! Scenarios shared by the in-memory and the loopback-UDP tests: the same checks over two
//! kinds of wire.

#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_quic_s2n::{
    Config, Connection, Endpoint, Error, Fingerprint, Identity, PinSet, Read, StreamError,
};

/// What carries datagrams between the two endpoints, and whose clock they run on.
pub trait Wire {
    /// Local addresses for the client and the server endpoint.
    fn addrs(&self) -> (std::net::SocketAddr, std::net::SocketAddr);
    /// The clock now.
    fn now(&self) -> Instant;
    /// Moves what both endpoints send, delivers what has arrived, runs due timers; may wait
    /// (real time) or jump (virtual time). False when nothing can ever happen again.
    fn step(&mut self, client: &mut Endpoint, server: &mut Endpoint) -> bool;
}

/// A client and a server endpoint on a wire.
pub struct Pair<W: Wire> {
    pub client: Endpoint,
    pub server: Endpoint,
    pub wire: W,
}

impl<W: Wire> Pair<W> {
    pub fn new(wire: W, ids: (&Identity, &Identity), pins: (Arc<PinSet>, Arc<PinSet>)) -> Self {
        let cfg = Config::default();
        let (ca, sa) = wire.addrs();
        let now = wire.now();
        let client = Endpoint::client(ca, ids.0, pins.0, &cfg, now).expect("client endpoint");
        let server = Endpoint::server(sa, ids.1, pins.1, &cfg, now).expect("server endpoint");
        Self {
            client,
            server,
            wire,
        }
    }

    /// Runs until `done` returns a value (it is called before every step), or fails after
    /// `limit` on the wire's clock.
    pub fn run_until<T>(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&mut Endpoint, &mut Endpoint) -> Option<T>,
    ) -> T {
        let end = self.wire.now() + limit;
        loop {
            if let Some(t) = done(&mut self.client, &mut self.server) {
                return t;
            }
            assert!(self.wire.now() < end, "nothing finished within {limit:?}");
            if !self.wire.step(&mut self.client, &mut self.server) {
                if let Some(t) = done(&mut self.client, &mut self.server) {
                    return t;
                }
                panic!("the wire went quiet before the test finished");
            }
        }
    }

    /// Connects; returns the client's outcome and the server's connection, if any.
    pub fn handshake(&mut self) -> (Result<Connection, Error>, Option<Connection>) {
        let server_addr = self.server.local_addr();
        let mut connecting = self.client.connect(server_addr).expect("connect");
        let mut accepted = None;
        let outcome = self.run_until(Duration::from_secs(10), |_, s| {
            if accepted.is_none() {
                accepted = s.accept();
            }
            connecting.poll()
        });
        if outcome.is_ok() && accepted.is_none() {
            accepted = Some(self.run_until(Duration::from_secs(5), |_, s| s.accept()));
        }
        (outcome, accepted)
    }
}

pub fn ids() -> (Identity, Identity) {
    (
        Identity::generate().expect("identity"),
        Identity::generate().expect("identity"),
    )
}

/// Both sides pin each other: the handshake succeeds and each names the other's certificate.
pub fn pinned_handshake<W: Wire>(wire: W) {
    let (c, s) = ids();
    let pins = (PinSet::of(s.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let (client, server) = p.handshake();
    let client = client.expect("client connection");
    let server = server.expect("server accepted");
    assert_eq!(client.peer_fingerprint(), Some(s.fingerprint()));
    assert_eq!(server.peer_fingerprint(), Some(c.fingerprint()));
}

/// The client pins another certificate: it refuses the server and names what it saw.
pub fn wrong_server_refused<W: Wire>(wire: W) {
    let (c, s) = ids();
    let other = Identity::generate().expect("identity");
    let pins = (PinSet::of(other.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let (client, server) = p.handshake();
    let err = client.expect_err("a server that is not pinned must be refused");
    assert!(
        matches!(err, Error::NotPinned(fp) if fp == s.fingerprint()),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("not the paired one"), "{msg}");
    assert!(
        server.is_none(),
        "the server must not hand out a connection"
    );
}

/// The server pins another certificate: the client never gets a usable connection, and the
/// server names the certificate it refused.
pub fn wrong_client_refused<W: Wire>(wire: W) -> String {
    let (c, s) = ids();
    let other = Identity::generate().expect("identity");
    let server_pins = PinSet::of(other.fingerprint());
    let mut p = Pair::new(
        wire,
        (&c, &s),
        (PinSet::of(s.fingerprint()), server_pins.clone()),
    );
    let server_addr = p.server.local_addr();
    let mut connecting = p.client.connect(server_addr).expect("connect");
    let outcome = p.run_until(Duration::from_secs(10), |_, srv| {
        assert!(srv.accept().is_none(), "an unpaired client got in");
        connecting.poll()
    });
    // In TLS 1.3 the client may complete before the server has checked its certificate; the
    // server's alert then closes the connection at its first use.
    let seen = match outcome {
        Err(e) => e.to_string(),
        Ok(mut conn) => p.run_until(Duration::from_secs(10), |_, srv| {
            assert!(srv.accept().is_none(), "an unpaired client got in");
            match conn.open_uni() {
                Ok(Some(mut st)) => st
                    .write(&mut Bytes::from_static(b"x"))
                    .err()
                    .map(|e| e.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            }
        }),
    };
    let refused: Option<Fingerprint> = server_pins.take_refused();
    assert_eq!(
        refused,
        Some(c.fingerprint()),
        "the server names the refused certificate"
    );
    seen
}

/// Deterministic pseudo-random bytes (xorshift): not compressible by accident.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Moves `len` bytes on one unidirectional stream and compares BLAKE3 hashes. Returns the
/// sender's stats.
pub fn bulk<W: Wire>(wire: W, len: usize, limit: Duration) -> flux_quic_s2n::Stats {
    let (c, s) = ids();
    let pins = (PinSet::of(s.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let (client, server) = p.handshake();
    let (mut client, mut server) = (client.expect("client"), server.expect("server"));
    let data = Bytes::from(pattern(len, 0x5eed));
    let want = blake3::hash(&data);

    let mut tx = client
        .open_uni()
        .expect("open")
        .expect("a stream is available");
    let mut rest = data;
    let mut finished = false;
    let mut rx = None;
    let mut hasher = blake3::Hasher::new();
    let mut got = 0usize;
    p.run_until(limit, |_, _| {
        while !rest.is_empty() {
            if tx.write(&mut rest).expect("write") == 0 {
                break;
            }
        }
        if rest.is_empty() && !finished {
            tx.finish().expect("finish");
            finished = true;
        }
        if rx.is_none() {
            rx = server.accept_uni().expect("accept");
        }
        let r = rx.as_mut()?;
        loop {
            match r.read().expect("read") {
                Read::Data(b) => {
                    got += b.len();
                    hasher.update(&b);
                }
                Read::Blocked => return None,
                Read::Finished => return Some(()),
            }
        }
    });
    assert_eq!(got, len);
    assert_eq!(hasher.finalize(), want, "the received bytes differ");
    let stats = client.stats();
    assert!(stats.sent_bytes >= len as u64, "{stats:?}");
    stats
}

/// The writer resets a stream the reader has started on: the reader sees the reset and its
/// code.
pub fn reset_seen<W: Wire>(wire: W) {
    let (c, s) = ids();
    let pins = (PinSet::of(s.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let (client, server) = p.handshake();
    let (mut client, mut server) = (client.expect("client"), server.expect("server"));
    let mut tx = client
        .open_uni()
        .expect("open")
        .expect("a stream is available");
    let mut head = Bytes::from(pattern(10_000, 7));
    assert!(tx.write(&mut head).expect("write") > 0);
    let mut rx = None;
    let mut reset = false;
    let mut seen = 0usize;
    let err = p.run_until(Duration::from_secs(10), |_, _| {
        if rx.is_none() {
            rx = server.accept_uni().expect("accept");
        }
        let r = rx.as_mut()?;
        loop {
            match r.read() {
                Ok(Read::Data(b)) => seen += b.len(),
                Ok(Read::Blocked) => break,
                Ok(Read::Finished) => panic!("the stream finished instead of being reset"),
                Err(e) => return Some(e),
            }
        }
        // Reset once the reader has data, so it sees data first and then the reset.
        if seen > 0 && !reset {
            tx.reset(7).expect("reset");
            reset = true;
        }
        None
    });
    assert_eq!(err, StreamError::Reset(7));
}

/// Two connections between the same two endpoints (one 5-tuple, told apart by connection ID),
/// each carrying its own stream: what several workers sharing the path ICE chose would need.
pub fn two_connections_one_path<W: Wire>(wire: W) {
    let (c, s) = ids();
    let pins = (PinSet::of(s.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let server_addr = p.server.local_addr();
    let mut attempts = vec![
        p.client.connect(server_addr).expect("connect"),
        p.client.connect(server_addr).expect("connect"),
    ];
    let mut clients: Vec<Connection> = Vec::new();
    let mut servers: Vec<Connection> = Vec::new();
    p.run_until(Duration::from_secs(10), |_, srv| {
        while let Some(conn) = srv.accept() {
            servers.push(conn);
        }
        attempts.retain_mut(|a| match a.poll() {
            Some(r) => {
                clients.push(r.expect("handshake"));
                false
            }
            None => true,
        });
        (clients.len() == 2 && servers.len() == 2).then_some(())
    });
    // Each client connection sends its index on a stream of its own; each server connection
    // must receive exactly one of them, and both must arrive.
    let mut sent = Vec::new();
    for (i, conn) in clients.iter_mut().enumerate() {
        let mut tx = conn
            .open_uni()
            .expect("open")
            .expect("a stream is available");
        let mut msg = Bytes::from(pattern(100_000, i as u64 + 1));
        while !msg.is_empty() {
            assert!(
                tx.write(&mut msg).expect("write") > 0,
                "100 kB fits the send buffer"
            );
        }
        tx.finish().expect("finish");
        sent.push(blake3::hash(&pattern(100_000, i as u64 + 1)));
    }
    let mut got: Vec<Option<blake3::Hasher>> = vec![None, None];
    let mut rx: Vec<Option<flux_quic_s2n::RecvStream>> = vec![None, None];
    let mut done = [false, false];
    p.run_until(Duration::from_secs(10), |_, _| {
        for i in 0..2 {
            if rx[i].is_none() {
                rx[i] = servers[i].accept_uni().expect("accept");
            }
            let Some(r) = rx[i].as_mut() else { continue };
            let h = got[i].get_or_insert_with(blake3::Hasher::new);
            loop {
                match r.read().expect("read") {
                    Read::Data(b) => {
                        h.update(&b);
                    }
                    Read::Blocked => break,
                    Read::Finished => {
                        done[i] = true;
                        break;
                    }
                }
            }
        }
        (done == [true, true]).then_some(())
    });
    let mut hashes: Vec<blake3::Hash> = got
        .into_iter()
        .map(|h| h.expect("hasher").finalize())
        .collect();
    hashes.sort_by_key(|h| *h.as_bytes());
    sent.sort_by_key(|h| *h.as_bytes());
    assert_eq!(
        hashes, sent,
        "each connection carried its own stream intact"
    );
    let addrs: Vec<_> = servers.iter().map(|c| c.remote_addr()).collect();
    assert_eq!(addrs[0], addrs[1], "both connections share one 5-tuple");
}

/// The same bulk transfer through flux-quic's stack-neutral seam (`QuicConnection`), driven
/// by its events as the engine's sessions drive quinn; then a reset stream and a close.
pub fn through_the_seam<W: Wire>(wire: W, len: usize) {
    use flux_quic::conn::{ConnEvent, Dir, QuicConnection, ReadEnd};
    use flux_quic_s2n::S2nConn;

    let (c, s) = ids();
    let pins = (PinSet::of(s.fingerprint()), PinSet::of(c.fingerprint()));
    let mut p = Pair::new(wire, (&c, &s), pins);
    let (client, server) = p.handshake();
    let mut tx: S2nConn = client.expect("client").into();
    let mut rx: S2nConn = server.expect("server").into();
    assert_eq!(tx.peer_fingerprint(), Some(s.fingerprint()));
    assert!(!tx.is_handshaking());

    let data = Bytes::from(pattern(len, 99));
    let want = blake3::hash(&data);
    let sid = tx.open_stream(Dir::Uni).expect("a stream is available");
    let mut off = 0usize;
    let mut finished = false;
    let mut rsid = None;
    let mut hasher = blake3::Hasher::new();
    let mut got = 0usize;
    let mut readable_events = 0usize;
    p.run_until(Duration::from_secs(600), |_, _| {
        while off < len {
            match tx.write(sid, data.slice(off..)) {
                Ok(n) => off += n,
                Err(_) => break,
            }
        }
        if off == len && !finished {
            tx.finish(sid);
            finished = true;
        }
        while let Some(ev) = rx.poll_event() {
            match ev {
                ConnEvent::StreamOpened(Dir::Uni) => {
                    rsid = rx.accept_stream(Dir::Uni);
                }
                ConnEvent::Readable(id) => {
                    assert_eq!(Some(id), rsid, "Readable names the stream");
                    readable_events += 1;
                    let mut out = Vec::new();
                    loop {
                        let end = rx.read(id, 1 << 20, &mut out);
                        for b in out.drain(..) {
                            got += b.len();
                            hasher.update(&b);
                        }
                        match end {
                            ReadEnd::More => continue,
                            ReadEnd::Blocked => break,
                            ReadEnd::Finished => return Some(()),
                            ReadEnd::Reset => panic!("the stream was reset"),
                        }
                    }
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        None
    });
    assert_eq!(got, len);
    assert_eq!(hasher.finalize(), want, "the bytes differ through the seam");
    assert!(
        readable_events > 1,
        "data arrived in several Readable events"
    );
    let st = tx.stats();
    assert!(
        st.sent_packets > 0 && st.udp_tx_bytes >= len as u64,
        "{st:?}"
    );

    // A reset stream reads as Reset.
    let sid = tx.open_stream(Dir::Uni).expect("a second stream");
    tx.write(sid, Bytes::from_static(b"partial"))
        .expect("write");
    let mut reset = false;
    let end = p.run_until(Duration::from_secs(10), |_, _| {
        while let Some(ev) = rx.poll_event() {
            match ev {
                ConnEvent::StreamOpened(Dir::Uni) => {
                    rx.accept_stream(Dir::Uni).expect("accept");
                }
                ConnEvent::Readable(id) => {
                    let mut out = Vec::new();
                    match rx.read(id, 1 << 20, &mut out) {
                        ReadEnd::Reset => return Some(ReadEnd::Reset),
                        ReadEnd::Finished => return Some(ReadEnd::Finished),
                        ReadEnd::More | ReadEnd::Blocked => {
                            if !out.is_empty() && !reset {
                                // Seen data: now the writer gives up on the stream.
                                tx.reset(sid, 3);
                                reset = true;
                            }
                        }
                    }
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        None
    });
    assert_eq!(end, ReadEnd::Reset);

    // Closing one side ends the other with Lost.
    tx.close(p.wire.now(), 5, Bytes::from_static(b"bye"));
    let lost = p.run_until(Duration::from_secs(10), |_, _| {
        std::iter::from_fn(|| rx.poll_event()).find(|e| matches!(e, ConnEvent::Lost(_)))
    });
    assert!(matches!(lost, ConnEvent::Lost(_)));
    assert!(rx.is_closed());
}
