//! Pairing through a real `thruserv` process: right code, wrong code, three joiners, and a
//! malicious relay in front of the server that tampers with the handshake.
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
    HostEvent, HostOptions, HostSession, JoinOptions, PairError, host_server, join_server,
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
            Some(HostEvent::Paired(p)) => paired.push(*p),
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

    let joined = join_server(
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
        let p = p.unwrap();
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
}

const ATTACKER_FP: [u8; 32] = [0xEE; 32];
const ATTACKER_ADDR: &str = "127.0.0.66:6666";

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

/// A WebSocket man in the middle in front of a real `thruserv`: forwards every frame both
/// ways, editing the handshake as `mode` says. Returns its URL.
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
                let to_server = async {
                    while let Some(Ok(m)) = down_rx.next().await {
                        let m = match m {
                            Message::Text(t) => Message::text(tamper(mode, t.as_str())),
                            other => other,
                        };
                        if up_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                };
                let to_client = async {
                    while let Some(Ok(m)) = up_rx.next().await {
                        let m = match m {
                            Message::Text(t) => Message::text(tamper(mode, t.as_str())),
                            other => other,
                        };
                        if down_tx.send(m).await.is_err() {
                            break;
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
