//! Pairing through a real `thruserv` process: right code, wrong code, three joiners, the
//! candidate trickle after pairing, and a malicious relay in front of the server that
//! tampers with the handshake or the trickle.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::{PATIENCE, Thruserv, client, local, within};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use thru::code::JoinCode;
use thru::pairing::{Paired, Rendezvous, Role};
use thru::pake::{LocalInfo, PakeError};
use thru::rendezvous::{
    HostEvent, HostOptions, HostSession, JoinOptions, PairError, Trickle, host_server, join_server,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

fn host_opts(local: LocalInfo, max_receivers: u32) -> HostOptions {
    let mut o = HostOptions::new(local);
    o.max_receivers = max_receivers;
    o.allow_loopback = true;
    o.handshake_timeout = PATIENCE;
    o
}

fn join_opts(local: LocalInfo) -> JoinOptions {
    let mut o = JoinOptions::new(local);
    o.allow_loopback = true;
    o.timeout = PATIENCE;
    o
}

/// Collects host events until `Ended`.
async fn host_events(mut s: HostSession) -> (Vec<Paired>, Vec<String>, Option<PairError>) {
    let mut paired = Vec::new();
    let mut failed = Vec::new();
    loop {
        match within("host event", s.next_event()).await {
            Some(HostEvent::Paired(p, _)) => paired.push(*p),
            Some(HostEvent::Failed { peer, error }) => failed.push(format!("{peer}: {error}")),
            Some(HostEvent::Ended { error }) => return (paired, failed, error),
            Some(_) => {}
            None => panic!("host session ended without Ended"),
        }
    }
}

#[tokio::test]
async fn right_code_pairs_with_the_right_fingerprints_on_both_sides() {
    let server = Thruserv::start(&[]);
    let host_local = local(4001);
    let joiner_local = local(5001);
    let session = host_server(&server.url(), &client(), host_opts(host_local.clone(), 1))
        .await
        .unwrap();
    let code: JoinCode = session.code().to_string().parse().unwrap();
    let host_task = tokio::spawn(host_events(session));

    let (joined, _trickle) = join_server(
        &server.url(),
        &client(),
        &code,
        join_opts(joiner_local.clone()),
    )
    .await
    .unwrap();
    assert_eq!(joined.role, Role::Joiner);
    assert_eq!(joined.rendezvous, Rendezvous::Server);
    assert_eq!(joined.peer_fingerprint, host_local.fingerprint);
    assert_eq!(joined.peer_addrs, host_local.addrs);
    assert_eq!(joined.local_fingerprint, joiner_local.fingerprint);

    let (paired, failed, end) = within("host", host_task).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(end.is_none(), "{end:?}");
    assert_eq!(paired.len(), 1);
    let h = &paired[0];
    assert_eq!(h.role, Role::Host);
    assert_eq!(h.peer_label, "joiner 1");
    assert_eq!(h.peer_fingerprint, joiner_local.fingerprint);
    assert_eq!(h.peer_addrs, joiner_local.addrs);
    assert_eq!(h.session_key, joined.session_key);
}

#[tokio::test]
async fn wrong_code_fails_on_both_sides_within_seconds_and_burns_the_code() {
    let server = Thruserv::start(&[]);
    let session = host_server(&server.url(), &client(), host_opts(local(4002), 4))
        .await
        .unwrap();
    let right = session.code().clone();
    // Same session, different secret.
    let wrong: JoinCode = format!("{}-0000-0000", right.routing()).parse().unwrap();
    assert_ne!(wrong, right);
    let started = Instant::now();
    let host_task = tokio::spawn(host_events(session));

    let err = join_server(&server.url(), &client(), &wrong, join_opts(local(5002)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PairError::Handshake {
                source: PakeError::ConfirmFailed,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("join code is wrong"), "{err}");

    let (paired, failed, end) = within("host", host_task).await.unwrap();
    assert!(paired.is_empty());
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        matches!(end, Some(PairError::TooManyFailures(1))),
        "{end:?}"
    );
    // A hang guard: a wrong code fails within about a second; PATIENCE is 15 s.
    assert!(started.elapsed() < PATIENCE);

    // The session is gone: even the right code now finds nothing.
    let err = join_server(&server.url(), &client(), &right, join_opts(local(5003)))
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::NoSuchSession(_)), "{err:?}");
}

#[tokio::test]
async fn three_joiners_pair_with_one_host() {
    let server = Thruserv::start(&[]);
    let host_local = local(4003);
    let session = host_server(&server.url(), &client(), host_opts(host_local.clone(), 3))
        .await
        .unwrap();
    let code = session.code().clone();
    let host_task = tokio::spawn(host_events(session));

    let mut joiners = Vec::new();
    for i in 0..3u16 {
        let (url, code) = (server.url(), code.clone());
        let me = local(6000 + i);
        joiners.push(tokio::spawn(async move {
            let p = join_server(&url, &client(), &code, join_opts(me.clone())).await;
            (me, p)
        }));
    }
    let mut joiner_fps = Vec::new();
    for j in joiners {
        let (me, p) = within("joiner", j).await.unwrap();
        let (p, _trickle) = p.unwrap();
        assert_eq!(p.peer_fingerprint, host_local.fingerprint);
        joiner_fps.push(me.fingerprint);
    }
    let (paired, failed, end) = within("host", host_task).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(end.is_none(), "{end:?}");
    let mut got: Vec<_> = paired.iter().map(|p| p.peer_fingerprint).collect();
    got.sort();
    joiner_fps.sort();
    assert_eq!(
        got, joiner_fps,
        "the host paired each joiner with its own fingerprint"
    );
    let mut labels: Vec<_> = paired.iter().map(|p| p.peer_label.clone()).collect();
    labels.sort();
    assert_eq!(labels, ["joiner 1", "joiner 2", "joiner 3"]);
}

#[tokio::test]
async fn unknown_session_is_a_clear_error() {
    let server = Thruserv::start(&[]);
    let code: JoinCode = "K7QF2M-XD4P-RT9A".parse().unwrap();
    let err = join_server(&server.url(), &client(), &code, join_opts(local(5004)))
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::NoSuchSession(_)), "{err:?}");
    assert!(err.to_string().contains("K7QF2M"), "{err}");
}

const LINES: [&str; 3] = [
    "candidate:1 1 udp 2130706431 192.0.2.1 4001 typ host",
    "candidate:2 1 udp 1694498815 198.51.100.7 40001 typ srflx raddr 192.0.2.1 rport 4001",
    "candidate:3 1 udp 16777215 203.0.113.9 3478 typ relay raddr 198.51.100.7 rport 40001",
];
/// Sent after [`LINES`] so that a receiver knows it has everything that will arrive.
const END: &str = "end-of-candidates";

fn lines_from(who: &str) -> Vec<String> {
    LINES.iter().map(|l| format!("{l} {who}")).collect()
}

/// Sends [`LINES`] (tagged with `who`), then [`END`].
fn send_lines(t: &Trickle, who: &str) {
    for l in lines_from(who) {
        t.to_peer.send(l).unwrap();
    }
    t.to_peer.send(END.into()).unwrap();
}

/// The lines received before [`END`].
async fn lines_until_end(t: &mut Trickle) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match within("trickle line", t.from_peer.recv()).await {
            Some(l) if l == END => return got,
            Some(l) => got.push(l),
            None => panic!("the trickle ended after {got:?}"),
        }
    }
}

/// The host's first paired joiner and its trickle.
async fn first_paired(s: &mut HostSession) -> (Paired, Trickle) {
    match within("host event", s.next_event()).await {
        Some(HostEvent::Paired(p, t)) => (*p, t.expect("a trickle through a server")),
        other => panic!("expected a pairing, got {other:?}"),
    }
}

/// Pairs one joiner with a host (max 1 receiver) through `url`.
async fn pair_one(url: &str, port: u16) -> (HostSession, (Paired, Trickle), (Paired, Trickle)) {
    let mut session = host_server(url, &client(), host_opts(local(port), 1))
        .await
        .unwrap();
    let (url2, code) = (url.to_string(), session.code().clone());
    let joiner = tokio::spawn(async move {
        join_server(&url2, &client(), &code, join_opts(local(port + 1000))).await
    });
    let host_side = first_paired(&mut session).await;
    let joiner_side = within("joiner", joiner).await.unwrap().unwrap();
    (session, host_side, joiner_side)
}

#[tokio::test]
async fn trickle_carries_lines_both_ways_in_order_then_ends_when_the_joiner_drops_it() {
    let server = Thruserv::start(&[]);
    let (mut session, (host_p, mut host_t), (join_p, mut join_t)) =
        pair_one(&server.url(), 4200).await;
    let (host_ours, host_theirs) = host_p.ice_credentials();
    let (join_ours, join_theirs) = join_p.ice_credentials();
    assert_eq!(host_ours, join_theirs);
    assert_eq!(join_ours, host_theirs);

    send_lines(&host_t, "from the host");
    send_lines(&join_t, "from the joiner");
    assert_eq!(
        lines_until_end(&mut join_t).await,
        lines_from("from the host")
    );
    assert_eq!(
        lines_until_end(&mut host_t).await,
        lines_from("from the joiner")
    );
    // Pairing is over (one receiver), the trickle goes on.
    assert!(matches!(
        within("host event", session.next_event()).await,
        Some(HostEvent::Ended { error: None })
    ));
    send_lines(&host_t, "later");
    assert_eq!(lines_until_end(&mut join_t).await, lines_from("later"));

    // The joiner drops its trickle: it leaves the session, the host's side ends, and with
    // no trickle left the host leaves too.
    drop(join_t);
    assert_eq!(
        within("host trickle end", host_t.from_peer.recv()).await,
        None
    );
    assert!(
        within("host session end", session.next_event())
            .await
            .is_none()
    );
}

#[tokio::test]
async fn trickle_paces_a_burst_of_lines_below_the_server_flood_limit() {
    // thruserv's default: 50 messages/s per connection, burst 100; more closes it.
    let server = Thruserv::start(&[]);
    let (_session, (_, mut host_t), (_, join_t)) = pair_one(&server.url(), 4201).await;
    let lines: Vec<String> = (0..130).map(|i| format!("{} {i}", LINES[0])).collect();
    for l in &lines {
        join_t.to_peer.send(l.clone()).unwrap();
    }
    join_t.to_peer.send(END.into()).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(2 * common::PATIENCE, host_t.from_peer.recv())
            .await
            .unwrap()
        {
            Some(l) if l == END => break,
            Some(l) => got.push(l),
            None => panic!("the trickle ended after {} lines", got.len()),
        }
    }
    assert_eq!(got, lines);
    eprintln!("130 lines in {:?}", started.elapsed());
}

/// What the malicious relay does to the traffic it forwards.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Replaces the joiner's fingerprint in its `hello` with the attacker's.
    HelloFingerprint,
    /// Replaces the host's fingerprint in its `reply` with the attacker's.
    ReplyFingerprint,
    /// Points the host's advertised addresses (in the reply) at the attacker.
    ReplyAddrs,
    /// Rewrites the host's `candidate` messages to the attacker's address.
    CandidateAddr,
    /// Swaps in the attacker's own SPAKE2 message (a guessed secret) for the joiner's.
    HelloPake,
    /// Changes the line of the second trickle message each way (MAC left as it was).
    IceAlter,
    /// Delivers every trickle message twice.
    IceReplay,
    /// Injects a forged trickle line (its own `seq`, a copied MAC) before every real one.
    IceForge,
    /// Sends every trickle message back to its sender as if the peer had sent it.
    IceReflect,
}

const ATTACKER_FP: [u8; 32] = [0xEE; 32];
const ATTACKER_ADDR: &str = "127.0.0.66:6666";
const ATTACKER_LINE: &str = "candidate:9 1 udp 2130706431 127.0.0.66 6666 typ host";

fn tamper(mode: Tamper, text: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return text.to_string();
    };
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
    };
    let kind = v["type"].as_str().unwrap_or("").to_string();
    let t = v["payload"]["t"].as_str().unwrap_or("").to_string();
    match (mode, kind.as_str(), t.as_str()) {
        (Tamper::HelloFingerprint, "relay", "hello") => {
            v["payload"]["fp"] = b64(&ATTACKER_FP).into();
        }
        (Tamper::HelloPake, "relay", "hello") => {
            // A SPAKE2 side-B message for a guessed secret.
            let guess: JoinCode = "000000-0000-0000".parse().unwrap();
            let (_, hello) = thru::pake::JoinerStart::start(
                &guess,
                LocalInfo {
                    fingerprint: ATTACKER_FP,
                    addrs: vec![],
                    quic: None,
                },
                &mut rand::rngs::OsRng,
            );
            v["payload"]["pake"] = hello.to_json()["pake"].clone();
        }
        (Tamper::ReplyFingerprint, "relay", "reply") => {
            v["payload"]["fp"] = b64(&ATTACKER_FP).into();
        }
        (Tamper::ReplyAddrs, "relay", "reply") => {
            v["payload"]["addrs"] = serde_json::json!([ATTACKER_ADDR]);
        }
        (Tamper::CandidateAddr, "candidate", _) if v.get("from").is_some() => {
            v["candidate"]["addr"] = ATTACKER_ADDR.into();
        }
        _ => return text.to_string(),
    }
    v.to_string()
}

/// One text frame through the relay, `up` from client to server: (frames to forward, frames
/// to send back to the client instead).
fn edit(mode: Tamper, text: &str, up: bool) -> (Vec<String>, Vec<String>) {
    let ice = matches!(
        mode,
        Tamper::IceAlter | Tamper::IceReplay | Tamper::IceForge | Tamper::IceReflect
    );
    if !ice {
        return (vec![tamper(mode, text)], vec![]);
    }
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return (vec![text.to_string()], vec![]);
    };
    if v["type"] != "relay" || v["payload"]["t"] != "ice" || v["payload"]["line"] == END {
        return (vec![text.to_string()], vec![]);
    }
    match (mode, up) {
        (Tamper::IceAlter, false) if v["payload"]["seq"] == 2 => {
            v["payload"]["line"] = ATTACKER_LINE.into();
            (vec![v.to_string()], vec![])
        }
        (Tamper::IceReplay, false) => (vec![text.to_string(), text.to_string()], vec![]),
        (Tamper::IceForge, false) => {
            let mut forged = v.clone();
            forged["payload"]["seq"] = 1000.into();
            forged["payload"]["line"] = ATTACKER_LINE.into();
            (vec![forged.to_string(), text.to_string()], vec![])
        }
        (Tamper::IceReflect, true) => {
            let back = serde_json::json!({
                "type": "relay",
                "from": v["to"],
                "payload": v["payload"],
            });
            (vec![text.to_string()], vec![back.to_string()])
        }
        _ => (vec![text.to_string()], vec![]),
    }
}

/// A WebSocket man in the middle in front of a real `thruserv`: forwards every frame both
/// ways, editing the handshake or the trickle as `mode` says. Returns its URL.
async fn malicious_relay(upstream: SocketAddr, mode: Tamper) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(down) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let Ok((up, _)) =
                    tokio_tungstenite::connect_async(format!("ws://{upstream}/v1/signal")).await
                else {
                    return;
                };
                let (mut down_tx, mut down_rx) = down.split();
                let (mut up_tx, mut up_rx) = up.split();
                let (back_tx, mut back_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let to_server = async {
                    while let Some(Ok(m)) = down_rx.next().await {
                        let Message::Text(t) = m else {
                            if up_tx.send(m).await.is_err() {
                                break;
                            }
                            continue;
                        };
                        let (forward, back) = edit(mode, t.as_str(), true);
                        for f in forward {
                            if up_tx.send(Message::text(f)).await.is_err() {
                                return;
                            }
                        }
                        for b in back {
                            let _ = back_tx.send(b);
                        }
                    }
                };
                let to_client = async {
                    loop {
                        let frames = tokio::select! {
                            m = up_rx.next() => match m {
                                Some(Ok(Message::Text(t))) => edit(mode, t.as_str(), false).0,
                                Some(Ok(other)) => {
                                    if down_tx.send(other).await.is_err() {
                                        return;
                                    }
                                    continue;
                                }
                                _ => return,
                            },
                            Some(b) = back_rx.recv() => vec![b],
                        };
                        for f in frames {
                            if down_tx.send(Message::text(f)).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = to_server => {}
                    () = to_client => {}
                }
            });
        }
    });
    format!("ws://{addr}")
}

#[tokio::test]
async fn a_relay_that_tampers_with_the_handshake_is_detected_and_refused() {
    let server = Thruserv::start(&[]);
    for mode in [
        Tamper::HelloFingerprint,
        Tamper::ReplyFingerprint,
        Tamper::ReplyAddrs,
        Tamper::CandidateAddr,
        Tamper::HelloPake,
    ] {
        let url = malicious_relay(server.addr, mode).await;
        let host_local = local(4100);
        let session = host_server(&url, &client(), host_opts(host_local, 1))
            .await
            .unwrap();
        let code = session.code().clone();
        let host_task = tokio::spawn(host_events(session));
        let res = join_server(&url, &client(), &code, join_opts(local(5100))).await;
        let err = match res {
            Ok(p) => panic!("{mode:?}: the joiner paired through a tampering relay: {p:?}"),
            Err(e) => e,
        };
        assert!(err.is_auth_failure(), "{mode:?}: {err:?}");
        let (paired, failed, end) = within("host", host_task).await.unwrap();
        assert!(
            paired.is_empty(),
            "{mode:?}: the host paired with {paired:?}"
        );
        assert_eq!(failed.len(), 1, "{mode:?}: {failed:?}");
        assert!(
            matches!(end, Some(PairError::TooManyFailures(1))),
            "{mode:?}: {end:?}"
        );
        eprintln!("{mode:?}: joiner: {err}; host: {}", failed[0]);
    }
}

#[tokio::test]
async fn a_relay_that_tampers_with_trickle_lines_gets_nothing_delivered() {
    let server = Thruserv::start(&[]);
    for mode in [
        Tamper::IceAlter,
        Tamper::IceReplay,
        Tamper::IceForge,
        Tamper::IceReflect,
    ] {
        let url = malicious_relay(server.addr, mode).await;
        let (_session, (_, mut host_t), (_, mut join_t)) = pair_one(&url, 4300).await;
        send_lines(&host_t, "from the host");
        send_lines(&join_t, "from the joiner");
        let mut want_joiner = lines_from("from the host");
        let mut want_host = lines_from("from the joiner");
        if matches!(mode, Tamper::IceAlter) {
            // The altered second line is dropped; the others still arrive, in order.
            want_joiner.remove(1);
            want_host.remove(1);
        }
        assert_eq!(lines_until_end(&mut join_t).await, want_joiner, "{mode:?}");
        assert_eq!(lines_until_end(&mut host_t).await, want_host, "{mode:?}");
        // Still working afterwards (the relay altered only `seq` 2).
        send_lines(&join_t, "again");
        assert_eq!(
            lines_until_end(&mut host_t).await,
            lines_from("again"),
            "{mode:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// One online guess per session (issue 13, item 7).

/// A `hello` for `routing` with a guessed (wrong) secret, as JSON.
fn guessing_hello(routing: &str, i: usize) -> Value {
    let guess: JoinCode = format!("{routing}-{:04}-0000", i % 10_000).parse().unwrap();
    let (_, hello) = thru::pake::JoinerStart::start(&guess, local(5500), &mut rand::rngs::OsRng);
    hello.to_json()
}

/// A hostile signaling server for one host connection: it creates the session, announces
/// `hellos` joiners at once, each with a guessing hello, and reports every joiner that gets
/// a reply as `peer_left{reason:"rejected"}` (which the host did not ask for), so that an
/// uncounted attempt could be followed by the next. Returns its URL and, when the host is
/// gone or after a quiet spell, the number of `reply` messages the host produced.
async fn hostile_server(hellos: usize) -> (String, tokio::task::JoinHandle<usize>) {
    use flux_signal_proto::{PeerId, PeerLeftReason, RoutingId, ServerMsg};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let (mut tx, mut rx) = ws.split();
        let send = |m: ServerMsg| Message::text(m.encode());
        tx.send(send(ServerMsg::Welcome {
            protocol: flux_signal_proto::PROTOCOL_VERSION,
            server: "hostile".into(),
            max_message_bytes: 65536,
        }))
        .await
        .unwrap();
        let routing: RoutingId = "K7QF2M".parse().unwrap();
        // Wait for create_session.
        while let Some(Ok(m)) = rx.next().await {
            if m.to_text().unwrap_or("").contains("create_session") {
                break;
            }
        }
        tx.send(send(ServerMsg::SessionCreated {
            session: routing,
            peer: PeerId::HOST,
            max_receivers: 1000,
            expires_in_ms: None,
        }))
        .await
        .unwrap();
        for i in 1..=hellos {
            let peer = PeerId(i as u32);
            tx.send(send(ServerMsg::PeerJoined { peer })).await.unwrap();
            tx.send(send(ServerMsg::Relay {
                from: peer,
                payload: guessing_hello(routing.as_str(), i),
            }))
            .await
            .unwrap();
        }
        let mut replies = 0;
        loop {
            let m = match tokio::time::timeout(std::time::Duration::from_secs(3), rx.next()).await {
                Ok(Some(Ok(m))) => m,
                // The host left, closed, or went quiet.
                _ => break,
            };
            let Ok(v) = serde_json::from_str::<Value>(m.to_text().unwrap_or("")) else {
                continue;
            };
            if v["type"] == "leave" {
                break;
            }
            if v["type"] == "relay" && v["payload"]["t"] == "reply" {
                replies += 1;
                // "The joiner was rejected": not by the host, and not counted by it before.
                let peer = PeerId(v["to"].as_u64().unwrap() as u32);
                let _ = tx
                    .send(send(ServerMsg::PeerLeft {
                        peer,
                        reason: PeerLeftReason::Rejected,
                    }))
                    .await;
            }
        }
        replies
    });
    (url, task)
}

#[tokio::test]
async fn a_hostile_server_gets_at_most_one_reply_from_many_hellos() {
    let (url, server) = hostile_server(50).await;
    let session = host_server(&url, &client(), host_opts(local(4400), 4))
        .await
        .unwrap();
    let (paired, _failed, end) = within("host", host_events(session)).await;
    let replies = within("hostile server", server).await.unwrap();
    assert!(paired.is_empty());
    assert_eq!(
        replies, 1,
        "the host answered {replies} guessing hellos (the budget is 1)"
    );
    assert!(
        matches!(end, Some(PairError::TooManyFailures(1))),
        "a joiner reported gone after our reply is a failed attempt: {end:?}"
    );
}

/// One raw guessing joiner through a real thruserv: true when it got the host's reply (one
/// password test). It then gives up the way a real joiner with the wrong code does.
async fn guessing_joiner(url: String, routing: thru::code::JoinCode, i: usize) -> bool {
    use flux_signal::client::SignalClient;
    use flux_signal_proto::{PeerId, ServerMsg};
    let mut signal = SignalClient::connect(&url, &client()).await.unwrap();
    if signal.join_session(routing.routing()).await.is_err() {
        return false;
    }
    let hello = guessing_hello(routing.routing().as_str(), i);
    if signal.relay(PeerId::HOST, hello).await.is_err() {
        return false;
    }
    loop {
        match signal.recv().await {
            Ok(ServerMsg::Relay { payload, .. }) if payload["t"] == "reply" => {
                let abort = serde_json::json!({"t": "abort", "reason": "confirm_failed"});
                let _ = signal.relay(PeerId::HOST, abort).await;
                return true;
            }
            Ok(ServerMsg::Relay { payload, .. }) if payload["t"] == "abort" => return false,
            Ok(ServerMsg::SessionClosed { .. }) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn nine_concurrent_hellos_through_thruserv_get_at_most_one_reply() {
    let server = Thruserv::start(&[]);
    let mut opts = host_opts(local(4401), 9);
    opts.handshake_timeout = std::time::Duration::from_secs(5);
    let session = host_server(&server.url(), &client(), opts).await.unwrap();
    let code = session.code().clone();
    let host_task = tokio::spawn(host_events(session));
    let joiners: Vec<_> = (0..9)
        .map(|i| tokio::spawn(guessing_joiner(server.url(), code.clone(), i)))
        .collect();
    let mut replies = 0;
    for j in joiners {
        if within("guessing joiner", j).await.unwrap() {
            replies += 1;
        }
    }
    assert_eq!(replies, 1, "9 concurrent hellos got {replies} replies");
    let (paired, _failed, end) = within("host", host_task).await.unwrap();
    assert!(paired.is_empty());
    assert!(
        matches!(end, Some(PairError::TooManyFailures(1))),
        "{end:?}"
    );
}

#[tokio::test]
async fn concurrent_right_code_joiners_still_all_pair_one_at_a_time() {
    // The queue serializes handshakes; honest joiners arriving together all get through.
    let server = Thruserv::start(&[]);
    let session = host_server(&server.url(), &client(), host_opts(local(4402), 4))
        .await
        .unwrap();
    let code = session.code().clone();
    let host_task = tokio::spawn(host_events(session));
    let joiners: Vec<_> = (0..4u16)
        .map(|i| {
            let (url, code) = (server.url(), code.clone());
            tokio::spawn(async move {
                join_server(&url, &client(), &code, join_opts(local(6100 + i))).await
            })
        })
        .collect();
    for j in joiners {
        within("joiner", j).await.unwrap().unwrap();
    }
    let (paired, failed, end) = within("host", host_task).await.unwrap();
    assert_eq!(paired.len(), 4);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(end.is_none(), "{end:?}");
}
