//! Every limit, flooded past against a real `thruserv`: the documented refusal is seen, and
//! afterwards a well-behaved client still pairs. Limits are set small through flags so the
//! floods are short; per-IP floods come from 127.0.0.1 and the well-behaved client from
//! other loopback addresses (all of 127/8 is local on Linux), since per-minute quotas do not
//! refill within a test.

// Test helpers outside #[test] fns panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use flux_signal::client::{ClientError, SignalClient};
use flux_signal::proto::{
    Candidate, CandidateKind, ErrorCode, PeerId, PeerLeftReason, ServerMsg, TransportProtocol,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn connects_per_ip() {
    let srv = Thruserv::start(&["--ws-connects-per-min", "1", "--ws-connects-burst", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(srv.client_from("127.0.0.1").await);
    }
    for _ in 0..5 {
        match srv.try_client_from("127.0.0.1").await {
            Err(ClientError::Refused {
                status: 429,
                code: ErrorCode::ConnectRateLimited,
            }) => {}
            other => panic!("expected 429 connect_rate_limited, got {:?}", other.err()),
        }
    }
    assert_eq!(
        srv.metric("thruserv_rejections_total{reason=\"connect_rate_limited\"}")
            .await,
        5
    );
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.2", "127.0.0.3").await;
}

#[tokio::test]
async fn messages_per_second_per_connection() {
    let srv = Thruserv::start(&["--ws-msgs-per-sec", "2", "--ws-msgs-burst", "5"]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    for i in 0..50 {
        if joiner
            .relay(PeerId::HOST, json!({"t": "hello", "n": i}))
            .await
            .is_err()
        {
            break; // already closed by the server
        }
    }
    expect_fatal(&mut joiner, ErrorCode::RateLimited).await;
    // The host saw the joiner arrive, at most a burst's worth of relays, then its departure.
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    let mut relayed = 0;
    loop {
        match recv(&mut host).await {
            ServerMsg::Relay { .. } => relayed += 1,
            ServerMsg::PeerLeft { peer, reason } => {
                assert_eq!((peer, reason), (PeerId(1), PeerLeftReason::Disconnected));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(relayed <= 5, "only the burst gets through, saw {relayed}");
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn session_creates_and_unknown_joins_per_ip() {
    let srv = Thruserv::start(&[
        "--session-creates-per-min",
        "1",
        "--session-creates-burst",
        "2",
    ]);
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let mut h = srv.client().await;
        h.create_session().await.unwrap();
        hosts.push(h);
    }
    let mut third = srv.client().await;
    match third.create_session().await {
        Err(ClientError::Server {
            code: ErrorCode::CreateRateLimited,
            fatal: false,
            ..
        }) => {}
        other => panic!("expected create_rate_limited, got {other:?}"),
    }
    // Guessing routing ids draws on the same per-IP budget; a scanner out of tokens is cut off.
    let mut scanner = srv.client_from("127.0.0.4").await;
    for guess in ["AAAAAA", "BBBBBB"] {
        match scanner.join_session(guess.parse().unwrap()).await {
            Err(ClientError::Server {
                code: ErrorCode::NoSuchSession,
                fatal: false,
                ..
            }) => {}
            other => panic!("expected no_such_session, got {other:?}"),
        }
    }
    match scanner.join_session("CCCCCC".parse().unwrap()).await {
        Err(ClientError::Server {
            code: ErrorCode::CreateRateLimited,
            fatal: true,
            ..
        }) => {}
        other => panic!("expected fatal create_rate_limited, got {other:?}"),
    }
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.2", "127.0.0.3").await;
}

#[tokio::test]
async fn total_connections() {
    let srv = Thruserv::start(&["--max-ws-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(srv.client().await);
    }
    for _ in 0..3 {
        match srv.try_client_from("127.0.0.5").await {
            Err(ClientError::Refused {
                status: 503,
                code: ErrorCode::TooManyConnections,
            }) => {}
            other => panic!("expected 503 too_many_connections, got {:?}", other.err()),
        }
    }
    srv.assert_healthy().await;
    for c in held.drain(..2) {
        c.close().await;
    }
    srv.wait_metric("thruserv_connections_active", |v| v <= 1)
        .await;
    srv.assert_pairs("127.0.0.2", "127.0.0.3").await;
}

#[tokio::test]
async fn max_sessions() {
    let srv = Thruserv::start(&["--max-sessions", "2"]);
    let mut first = srv.client().await;
    first.create_session().await.unwrap();
    let mut second = srv.client().await;
    second.create_session().await.unwrap();
    let mut third = srv.client().await;
    match third.create_session().await {
        Err(ClientError::Server {
            code: ErrorCode::TooManySessions,
            fatal: false,
            ..
        }) => {}
        other => panic!("expected too_many_sessions, got {other:?}"),
    }
    first.leave().await.unwrap();
    srv.wait_metric("thruserv_sessions_active", |v| v == 1)
        .await;
    // The refused connection is still usable and now gets a session.
    let created = third.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    let joined = joiner.join_session(created.session).await.unwrap();
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut third).await,
        ServerMsg::PeerJoined { peer: joined.peer }
    );
    assert_eq!(
        recv(&mut third).await,
        ServerMsg::Relay {
            from: joined.peer,
            payload: json!({"t": "hello"})
        }
    );
}

#[tokio::test]
async fn message_size_closes_only_the_offending_connection() {
    let srv = Thruserv::start(&["--max-message-bytes", "4096"]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));

    // A 1 MiB frame from a third connection: refused from its header, connection closed.
    let mut raw = RawWs::connect(srv.addr).await;
    let big = format!(
        r#"{{"type":"relay","to":0,"payload":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    raw.send_text(&big).await;
    match raw.read_until_close().await.0 {
        RawEnd::Close(code, reason) => {
            assert_eq!((code, reason.as_str()), (1009, "message_too_large"))
        }
        // The server may reset the TCP stream while our megabyte is still arriving.
        RawEnd::Dropped => {}
    }
    srv.wait_metric(
        "thruserv_rejections_total{reason=\"message_too_large\"}",
        |v| v == 1,
    )
    .await;

    // The pair next to it is untouched; once paired, a message just under the cap still
    // relays.
    pair(&mut host, &mut joiner, PeerId(1)).await;
    let payload = json!("y".repeat(3900));
    joiner.relay(PeerId::HOST, payload.clone()).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Relay {
            from: PeerId(1),
            payload
        }
    );
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn idle_timeout() {
    let srv = Thruserv::start(&["--ws-idle-timeout", "500ms"]);
    let silent = config_from("127.0.0.1").ping_interval(None);
    let mut quiet = SignalClient::connect(&srv.url(), &silent).await.unwrap();
    quiet.create_session().await.unwrap();
    // A client that pings stays, however long it waits.
    let pinging = config_from("127.0.0.1").ping_interval(Some(Duration::from_millis(100)));
    let mut alive = SignalClient::connect(&srv.url(), &pinging).await.unwrap();

    // While `quiet` is timed out, `alive` waits three idle periods inside recv(), pinging.
    let (_, waited) = tokio::join!(
        expect_fatal(&mut quiet, ErrorCode::IdleTimeout),
        tokio::time::timeout(Duration::from_millis(1500), alive.recv())
    );
    assert!(
        waited.is_err(),
        "the pinging client got {waited:?} instead of nothing"
    );
    let created = alive.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    assert!(matches!(
        recv(&mut alive).await,
        ServerMsg::PeerJoined { .. }
    ));
}

#[tokio::test]
async fn session_lifetime() {
    let srv = Thruserv::start(&["--session-lifetime", "2s"]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    assert_eq!(created.expires_in, Some(Duration::from_secs(2)));
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    // Both stay busy, and the session still ends at its lifetime.
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    assert!(matches!(recv(&mut host).await, ServerMsg::Relay { .. }));
    expect_session_closed(&mut host, ErrorCode::SessionExpired).await;
    expect_session_closed(&mut joiner, ErrorCode::SessionExpired).await;
    let mut late = srv.client().await;
    match late.join_session(created.session).await {
        Err(ClientError::Server {
            code: ErrorCode::NoSuchSession,
            ..
        }) => {}
        other => panic!("expected no_such_session, got {other:?}"),
    }
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn failed_joins_close_the_session_and_tell_the_host() {
    let srv = Thruserv::start(&["--max-failed-joins", "2"]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    for n in 1..=2u32 {
        let mut guesser = srv.client().await;
        guesser.join_session(created.session).await.unwrap();
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerJoined { peer: PeerId(n) }
        );
        // The host's PAKE fails: it reports the joiner.
        host.reject_peer(PeerId(n), Some("wrong code".into()))
            .await
            .unwrap();
        expect_session_closed(&mut guesser, ErrorCode::RejectedByHost).await;
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerLeft {
                peer: PeerId(n),
                reason: PeerLeftReason::Rejected
            }
        );
    }
    expect_session_closed(&mut host, ErrorCode::TooManyFailedJoins).await;
    let mut third = srv.client().await;
    match third.join_session(created.session).await {
        Err(ClientError::Server {
            code: ErrorCode::NoSuchSession,
            ..
        }) => {}
        other => panic!("expected no_such_session, got {other:?}"),
    }
    assert_eq!(srv.metric("thruserv_failed_joins_total").await, 2);
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn session_message_and_candidate_budgets() {
    let srv = Thruserv::start(&[
        "--max-session-messages",
        "3",
        "--max-session-candidates",
        "2",
    ]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    for i in 0..3 {
        joiner
            .relay(PeerId::HOST, json!({"t": "hello", "n": i}))
            .await
            .unwrap();
    }
    joiner
        .relay(PeerId::HOST, json!({"t": "hello", "n": 3}))
        .await
        .unwrap();
    expect_error(&mut joiner, ErrorCode::SessionQuotaExceeded).await;
    let cand = Candidate {
        addr: "198.51.100.7:5000".parse().unwrap(),
        kind: CandidateKind::Srflx,
        protocol: TransportProtocol::Udp,
        priority: 1,
        foundation: "x".into(),
        component: 1,
        related: None,
    };
    // Exactly the budgeted relays arrived.
    for i in 0..3 {
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::Relay {
                from: PeerId(1),
                payload: json!({"t": "hello", "n": i})
            }
        );
    }
    for _ in 0..2 {
        joiner.candidate(PeerId::HOST, cand.clone()).await.unwrap();
    }
    for _ in 0..2 {
        assert!(matches!(recv(&mut host).await, ServerMsg::Candidate { .. }));
    }
    // Candidates in either direction count against the same budget.
    host.candidate(PeerId(1), cand.clone()).await.unwrap();
    expect_error(&mut host, ErrorCode::SessionQuotaExceeded).await;
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn slow_frame_timeout() {
    let srv = Thruserv::start(&["--frame-timeout", "500ms"]);
    let mut raw = RawWs::connect(srv.addr).await;
    // Announce a 100-byte masked text frame, then trickle its payload a byte at a time,
    // each byte well inside any idle timeout (the default is 10 minutes).
    raw.stream
        .write_all(&[0x81, 0x80 | 100, 0, 0, 0, 0])
        .await
        .unwrap();
    // Trickle from a second handle on the same socket while this task reads, so the
    // server's close frame is read before any reset caused by late bytes.
    let mut writer = std::net::TcpStream::from(raw.stream.as_fd().try_clone_to_owned().unwrap());
    let trickler = std::thread::spawn(move || {
        for _ in 0..30 {
            if std::io::Write::write_all(&mut writer, b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    raw.expect_fatal("frame_timeout", 1008).await;
    trickler.join().unwrap();
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn pending_handshakes_per_ip() {
    let srv = Thruserv::start(&["--max-pending-per-ip", "3", "--handshake-timeout", "5s"]);
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tcp_from("127.0.0.6", srv.addr).await);
    }
    // Let the server accept them before the extra one arrives.
    srv.wait_metric("thruserv_handshakes_pending", |v| v >= 3)
        .await;
    let mut extra = tcp_from("127.0.0.6", srv.addr).await;
    assert!(
        closed_within(&mut extra, PATIENCE).await,
        "a 4th silent connection from one IP is dropped"
    );
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.1", "127.0.0.2").await;
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_bounded() {
    let srv = Thruserv::start(&[
        "--max-message-bytes",
        "1048576",
        "--ws-msgs-per-sec",
        "0",
        "--frame-timeout",
        "1s",
    ]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    pair(&mut host, &mut joiner, PeerId(1)).await;
    // The host now stops reading. Its socket buffers fill, the server's write to it stalls,
    // relays queue up to the 1 MiB budget and are then refused with peer_busy.
    let chunk = json!("z".repeat(1_000_000));
    let mut busy = false;
    for _ in 0..64 {
        if joiner.relay(PeerId::HOST, chunk.clone()).await.is_err() {
            break;
        }
        if let Ok(Ok(ServerMsg::Error { code, .. })) =
            tokio::time::timeout(Duration::from_millis(20), joiner.recv()).await
        {
            assert_eq!(code, ErrorCode::PeerBusy);
            busy = true;
            break;
        }
    }
    assert!(
        busy,
        "relays to a stalled reader must be refused with peer_busy"
    );
    // The stalled write times out, the host is dropped, and the joiner is told.
    expect_session_closed(&mut joiner, ErrorCode::HostLeft).await;
    srv.wait_metric("thruserv_rejections_total{reason=\"frame_timeout\"}", |v| {
        v >= 1
    })
    .await;
    drop(host);
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn connections_and_sessions_per_ip() {
    let srv = Thruserv::start(&[
        "--max-ws-connections-per-ip",
        "3",
        "--max-sessions-per-ip",
        "2",
        "--ws-connects-per-min",
        "0",
        "--session-creates-per-min",
        "0",
    ]);
    // One address holds its 3 connections; a 4th is refused, another address is not.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(srv.client_from("127.0.0.2").await);
    }
    match srv.try_client_from("127.0.0.2").await {
        Err(ClientError::Refused {
            status: 503,
            code: ErrorCode::TooManyConnections,
        }) => {}
        other => panic!("expected 503 too_many_connections, got {:?}", other.err()),
    }
    let other = srv.client_from("127.0.0.3").await;
    // Closing one frees a place for that address.
    held.pop().unwrap().close().await;
    srv.wait_metric("thruserv_connections_active", |v| v == 3)
        .await;
    held.push(srv.client_from("127.0.0.2").await);
    drop(other);
    drop(held);
    srv.wait_metric("thruserv_connections_active", |v| v == 0)
        .await;

    // One address hosts 2 live sessions; a 3rd is refused, another address may host.
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let mut h = srv.client_from("127.0.0.4").await;
        h.create_session().await.unwrap();
        hosts.push(h);
    }
    let mut third = srv.client_from("127.0.0.4").await;
    match third.create_session().await {
        Err(ClientError::Server {
            code: ErrorCode::TooManySessions,
            message,
            fatal: false,
        }) => assert!(message.contains("this address"), "{message}"),
        other => panic!("expected too_many_sessions, got {other:?}"),
    }
    let mut elsewhere = srv.client_from("127.0.0.5").await;
    elsewhere.create_session().await.unwrap();
    // A session ending frees a place.
    hosts.pop().unwrap().leave().await.unwrap();
    srv.wait_metric("thruserv_sessions_active", |v| v == 2)
        .await;
    third.create_session().await.unwrap();
    srv.assert_healthy().await;
}

#[tokio::test]
async fn pings_do_not_keep_an_unpaired_session_past_its_lifetime() {
    let srv = Thruserv::start(&[
        "--session-lifetime",
        "2s",
        "--ws-idle-timeout",
        "1s",
        "--ws-msgs-per-sec",
        "0",
    ]);
    // Host and joiner ping well within the idle timeout and never pair.
    let pinging = config_from("127.0.0.1").ping_interval(Some(Duration::from_millis(100)));
    let mut host = SignalClient::connect(&srv.url(), &pinging).await.unwrap();
    let created = host.create_session().await.unwrap();
    let mut joiner = SignalClient::connect(&srv.url(), &pinging).await.unwrap();
    joiner.join_session(created.session).await.unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    // Both wait in recv(), which sends the pings.
    tokio::join!(
        expect_session_closed(&mut joiner, ErrorCode::SessionExpired),
        expect_session_closed(&mut host, ErrorCode::SessionExpired),
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    srv.wait_metric("thruserv_sessions_active", |v| v == 0)
        .await;
}
