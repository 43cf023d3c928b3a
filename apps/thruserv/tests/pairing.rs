//! Pairing and relay against a real `thruserv` process, plus operations: metrics, TLS,
//! SIGTERM, environment, version, log format, candidate filtering.

// Test helpers outside #[test] fns panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flux_signal::client::{ClientConfig, ClientError, SignalClient};
use flux_signal::proto::{
    Candidate, CandidateKind, ClientMsg, ErrorCode, PeerId, PeerLeftReason, ServerMsg,
    TransportProtocol,
};
use serde_json::json;

fn candidate(addr: &str) -> Candidate {
    Candidate {
        addr: addr.parse().unwrap(),
        kind: CandidateKind::Host,
        protocol: TransportProtocol::Udp,
        priority: 2_130_706_431,
        foundation: "1".into(),
        component: 1,
        related: None,
    }
}

#[tokio::test]
async fn host_and_joiners_pair_and_relay_both_ways_up_to_the_cap() {
    let srv = Thruserv::start(&[
        "--max-receivers-per-sender",
        "3",
        "--allow-loopback-candidates",
    ]);
    let mut host = srv.client().await;
    assert_eq!(host.welcome().protocol, 1);
    let created = host.create_session().await.unwrap();
    assert_eq!(created.max_receivers, 3);

    let mut joiners = Vec::new();
    for n in 1..=3u32 {
        let mut j = srv.client().await;
        let joined = j.join_session(created.session).await.unwrap();
        assert_eq!(joined.peer, PeerId(n));
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerJoined { peer: PeerId(n) }
        );
        joiners.push(j);
    }

    // The cap+1th joiner is refused with its code, and the session is unaffected.
    let mut extra = srv.client().await;
    match extra.join_session(created.session).await {
        Err(ClientError::Server {
            code: ErrorCode::SessionFull,
            fatal: false,
            ..
        }) => {}
        other => panic!("expected session_full, got {other:?}"),
    }

    // Joiner → host, each tagged with its sender.
    for (i, j) in joiners.iter_mut().enumerate() {
        j.relay(PeerId::HOST, json!({"t": "hello", "n": i}))
            .await
            .unwrap();
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::Relay {
                from: PeerId(i as u32 + 1),
                payload: json!({"t": "hello", "n": i})
            }
        );
    }
    // Host → each joiner; each gets only its own.
    for n in (1..=3u32).rev() {
        host.relay(PeerId(n), json!({"t": "reply", "to": n}))
            .await
            .unwrap();
    }
    for (i, j) in joiners.iter_mut().enumerate() {
        assert_eq!(
            recv(j).await,
            ServerMsg::Relay {
                from: PeerId::HOST,
                payload: json!({"t": "reply", "to": i + 1})
            }
        );
    }
    // Candidates both ways (loopback allowed by the flag).
    host.candidate(PeerId(1), candidate("127.0.0.1:40000"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut joiners[0]).await,
        ServerMsg::Candidate {
            from: PeerId::HOST,
            candidate: candidate("127.0.0.1:40000")
        }
    );
    joiners[0]
        .candidate(PeerId::HOST, candidate("127.0.0.1:40001"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Candidate {
            from: PeerId(1),
            candidate: candidate("127.0.0.1:40001")
        }
    );

    // Joiners cannot address each other; the host cannot address a stranger.
    joiners[1].relay(PeerId(1), json!(1)).await.unwrap();
    expect_error(&mut joiners[1], ErrorCode::NotAllowed).await;
    host.relay(PeerId(99), json!(1)).await.unwrap();
    expect_error(&mut host, ErrorCode::NoSuchPeer).await;

    // A joiner leaving frees a place, and the host hears why.
    let j2 = joiners.remove(1);
    j2.leave().await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerLeft {
            peer: PeerId(2),
            reason: PeerLeftReason::Left
        }
    );
    let joined = extra.join_session(created.session).await.unwrap();
    assert_eq!(joined.peer, PeerId(4), "peer ids are never reused");
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: PeerId(4) }
    );

    // The host leaving ends the session for everyone.
    host.leave().await.unwrap();
    for j in joiners.iter_mut().chain([&mut extra]) {
        expect_session_closed(j, ErrorCode::HostLeft).await;
    }
    srv.assert_healthy().await;
}

#[tokio::test]
async fn candidates_naming_local_or_metadata_addresses_are_not_relayed() {
    let srv = Thruserv::start(&[]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));

    for bad in [
        "127.0.0.1:5000",
        "[::1]:5000",
        "0.0.0.0:5000",
        "169.254.169.254:80",
        "[fe80::1]:5000",
        "[::ffff:127.0.0.1]:5000",
    ] {
        joiner
            .candidate(PeerId::HOST, candidate(bad))
            .await
            .unwrap();
        expect_error(&mut joiner, ErrorCode::CandidateRejected).await;
    }
    joiner
        .candidate(PeerId::HOST, candidate("203.0.113.5:4000"))
        .await
        .unwrap();
    // The first thing the host sees is the one acceptable candidate.
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Candidate {
            from: PeerId(1),
            candidate: candidate("203.0.113.5:4000")
        }
    );
    assert_eq!(
        srv.metric("thruserv_candidates_filtered_total{reason=\"loopback\"}")
            .await,
        3
    );
    assert_eq!(
        srv.metric("thruserv_candidates_filtered_total{reason=\"metadata\"}")
            .await,
        1
    );
    assert_eq!(
        srv.metric("thruserv_candidates_filtered_total{reason=\"link_local\"}")
            .await,
        1
    );
    assert_eq!(
        srv.metric("thruserv_candidates_filtered_total{reason=\"unspecified\"}")
            .await,
        1
    );
}

#[tokio::test]
async fn metrics_and_healthz_report_live_state() {
    let srv = Thruserv::start(&[]);
    srv.assert_healthy().await;
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    assert!(matches!(recv(&mut host).await, ServerMsg::Relay { .. }));
    joiner.join_session(created.session).await.unwrap_err();

    let text = srv.metrics().await;
    assert!(
        text.contains("# TYPE thruserv_sessions_active gauge"),
        "{text}"
    );
    assert_eq!(srv.metric("thruserv_sessions_active").await, 1);
    assert_eq!(srv.metric("thruserv_connections_active").await, 2);
    assert_eq!(srv.metric("thruserv_sessions_created_total").await, 1);
    assert_eq!(srv.metric("thruserv_joins_total").await, 1);
    assert_eq!(
        srv.metric("thruserv_messages_relayed_total{kind=\"relay\"}")
            .await,
        1
    );
    assert_eq!(
        srv.metric("thruserv_rejections_total{reason=\"already_in_session\"}")
            .await,
        1
    );

    let (status, body) = http_get(srv.addr, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));
    let (status, body) = http_get(srv.addr, "/v1/signal").await;
    assert_eq!(status, 400, "a plain GET on the WebSocket path is refused");
    assert!(body.contains("bad_request"));

    host.close().await;
    srv.wait_metric("thruserv_sessions_active", |v| v == 0)
        .await;
}

#[tokio::test]
async fn permessage_deflate_is_never_negotiated() {
    let srv = Thruserv::start(&[]);
    let ws = RawWs::connect_with(
        srv.addr,
        "127.0.0.1",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await
    .unwrap();
    assert!(
        !ws.head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{}",
        ws.head
    );
    // A frame with RSV1 set (what a compressed frame looks like) is a protocol error.
    let mut ws = ws;
    let mut frame = vec![0x80 | 0x40 | 0x1, 0x80 | 2, 0, 0, 0, 0];
    frame.extend_from_slice(b"{}");
    tokio::io::AsyncWriteExt::write_all(&mut ws.stream, &frame)
        .await
        .unwrap();
    ws.expect_fatal("protocol_error", 1002).await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn forwarded_for_keys_limits_only_when_trusted() {
    let plain = Thruserv::start(&["--ws-connects-per-min", "1", "--ws-connects-burst", "1"]);
    RawWs::connect_with(plain.addr, "127.0.0.1", "X-Forwarded-For: 198.51.100.1\r\n")
        .await
        .unwrap();
    let refused =
        RawWs::connect_with(plain.addr, "127.0.0.1", "X-Forwarded-For: 198.51.100.2\r\n").await;
    assert!(
        refused.err().unwrap().starts_with("HTTP/1.1 429"),
        "an untrusted header must not buy a new key"
    );

    let proxied = Thruserv::start(&[
        "--ws-connects-per-min",
        "1",
        "--ws-connects-burst",
        "1",
        "--trusted-proxy",
        "127.0.0.1",
    ]);
    RawWs::connect_with(
        proxied.addr,
        "127.0.0.1",
        "X-Forwarded-For: 198.51.100.1\r\n",
    )
    .await
    .unwrap();
    RawWs::connect_with(
        proxied.addr,
        "127.0.0.1",
        "X-Forwarded-For: 6.6.6.6, 198.51.100.2\r\n",
    )
    .await
    .unwrap();
    let again = RawWs::connect_with(
        proxied.addr,
        "127.0.0.1",
        "X-Forwarded-For: 198.51.100.2\r\n",
    )
    .await;
    assert!(
        again.err().unwrap().starts_with("HTTP/1.1 429"),
        "keyed on the rightmost entry"
    );
}

#[tokio::test]
async fn tls_serves_wss_with_the_given_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("thruserv-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let srv = Thruserv::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = ClientConfig::default().tls(Arc::new(tls)).timeout(PATIENCE);
    let url = format!("wss://localhost:{}", srv.addr.port());
    let mut host = SignalClient::connect(&url, &config).await.unwrap();
    let created = host.create_session().await.unwrap();
    let mut joiner = SignalClient::connect(&url, &config).await.unwrap();
    joiner.join_session(created.session).await.unwrap();
    joiner
        .relay(PeerId::HOST, json!({"t": "hello", "via": "tls"}))
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { .. }
    ));
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Relay {
            from: PeerId(1),
            payload: json!({"t": "hello", "via": "tls"})
        }
    );

    // Plain ws:// to a TLS port fails cleanly, and the server carries on.
    assert!(SignalClient::connect(&srv.url(), &config).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_zero() {
    let mut srv = Thruserv::start(&[]);
    let mut host = srv.client().await;
    host.create_session().await.unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    expect_fatal(&mut host, ErrorCode::ServerShutdown).await;
    let exit = srv
        .wait_exit(PATIENCE)
        .expect("thruserv exits after SIGTERM");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn port_comes_from_the_environment() {
    // Find a free port, release it, and hand it over through THRUSERV_PORT.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = Thruserv::start_with(&[], &[("THRUSERV_PORT", &port.to_string())]);
    assert_eq!(srv.addr.port(), port);
    srv.assert_healthy().await;
}

#[test]
fn version_flag_prints_the_version() {
    for flag in ["-v", "--version"] {
        let out = Command::new(env!("CARGO_BIN_EXE_thruserv"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("thruserv {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let srv = Thruserv::start(&[
        "--ws-connects-per-min",
        "1",
        "--ws-connects-burst",
        "1",
        "--trusted-proxy",
        "127.0.0.2/32",
        "--trusted-proxy",
        "10.0.0.0/8",
    ]);
    // A client that connects directly, not through the proxy, cannot pick its own key.
    RawWs::connect_with(srv.addr, "127.0.0.1", "X-Forwarded-For: 198.51.100.1\r\n")
        .await
        .unwrap();
    let refused =
        RawWs::connect_with(srv.addr, "127.0.0.1", "X-Forwarded-For: 198.51.100.2\r\n").await;
    assert!(
        refused.err().unwrap().starts_with("HTTP/1.1 429"),
        "the header of a peer that is not a trusted proxy must be ignored"
    );
    // The proxy's clients are keyed on the header.
    for client in ["198.51.100.3", "198.51.100.4"] {
        RawWs::connect_with(
            srv.addr,
            "127.0.0.2",
            &format!("X-Forwarded-For: {client}\r\n"),
        )
        .await
        .unwrap();
    }

    // The old flag alone, which believed anyone, is refused; so is a malformed range.
    for args in [
        &["--trust-forwarded-for"][..],
        &["--trusted-proxy", "10.0.0.0/33"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_thruserv"))
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--trusted-proxy"), "{args:?}: {stderr}");
    }
}

#[test]
fn usage_and_setup_errors_exit_2() {
    let bad_flag = Command::new(env!("CARGO_BIN_EXE_thruserv"))
        .args(["--ws-idle-timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(bad_flag.status.code(), Some(2));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let in_use = Command::new(env!("CARGO_BIN_EXE_thruserv"))
        .args(["--bind", "127.0.0.1", "--port", &port])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(in_use.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&in_use.stderr).contains("--bind/--port"));
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thruserv"))
        .args(["--bind", "127.0.0.1", "--port", "0", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut saw_listening = false;
    for _ in 0..5 {
        let Some(Ok(line)) = lines.next() else { break };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
        if v["message"] == "listening" {
            assert!(v["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
            saw_listening = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(saw_listening);
}

#[tokio::test]
async fn unknown_fields_are_ignored_for_forward_compatibility() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_text(r#"{"type":"create_session","client":"thru/9.9","hint":[1,2]}"#)
        .await;
    let v = ws.next_json().await;
    assert_eq!(v["type"], "session_created");
    assert_eq!(v["session"].as_str().unwrap().len(), 6);
    let _ = ClientMsg::Leave;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn strangers_relay_only_pairing_messages_within_a_budget_until_accepted() {
    let srv = Thruserv::start(&["--ws-msgs-per-sec", "0"]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client().await;
    joiner.join_session(created.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: PeerId(1) }
    );

    // Arbitrary JSON between a host and a joiner it has not accepted: refused both ways.
    let blob = json!({"t": "data", "blob": "x".repeat(1000)});
    joiner.relay(PeerId::HOST, blob.clone()).await.unwrap();
    expect_error(&mut joiner, ErrorCode::NotAllowed).await;
    joiner.relay(PeerId::HOST, json!("untagged")).await.unwrap();
    expect_error(&mut joiner, ErrorCode::NotAllowed).await;
    host.relay(PeerId(1), blob.clone()).await.unwrap();
    expect_error(&mut host, ErrorCode::NotAllowed).await;

    // Pairing messages pass, but only a small budget of them.
    let hello = json!({"t": "hello", "pad": "h".repeat(1000)});
    let mut passed = 0;
    loop {
        joiner.relay(PeerId::HOST, hello.clone()).await.unwrap();
        if let Ok(Ok(ServerMsg::Error { code, .. })) =
            tokio::time::timeout(Duration::from_millis(100), joiner.recv()).await
        {
            assert_eq!(code, ErrorCode::SessionQuotaExceeded);
            break;
        }
        match recv(&mut host).await {
            ServerMsg::Relay { payload, .. } => {
                assert_eq!(payload, hello);
                passed += 1;
                assert!(passed < 64, "the pairing budget never ran out");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((2..=8).contains(&passed), "{passed} KB of pairing passed");

    // Once the host accepts the joiner, payloads of any shape pass.
    pair(&mut host, &mut joiner, PeerId(1)).await;
    joiner.relay(PeerId::HOST, blob.clone()).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Relay {
            from: PeerId(1),
            payload: blob
        }
    );
    srv.assert_healthy().await;
}

/// Sends `payload` from `host` to `peer`, then a probe to a peer that does not exist. The
/// server answers a connection's messages in order, so the next thing `host` hears tells
/// whether the payload was relayed (`None`: only the probe's `no_such_peer` comes back) or
/// refused (`Some(code)`, then the probe's answer).
async fn relay_outcome(
    host: &mut SignalClient,
    peer: PeerId,
    payload: serde_json::Value,
) -> Option<ErrorCode> {
    host.relay(peer, payload).await.unwrap();
    host.relay(PeerId(999_999), json!({"t": "hello"}))
        .await
        .unwrap();
    match recv(host).await {
        ServerMsg::Error {
            code: ErrorCode::NoSuchPeer,
            ..
        } => None,
        ServerMsg::Error { code, .. } => {
            expect_error(host, ErrorCode::NoSuchPeer).await;
            Some(code)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn one_ip_spreading_pairing_bytes_over_sessions_is_cut_off_at_its_budget() {
    // The default per-IP budget (256 KiB per minute); the other per-IP limits are lifted
    // so that only the pairing budget can stop the flood.
    const BUDGET: usize = 256 * 1024;
    // The budget refills continuously (governor), so a slow run sees more pass: every bound
    // below adds what can have refilled in the time measured around it, never less.
    let refill = |since: Instant| since.elapsed().as_secs_f64() * BUDGET as f64 / 60.0;
    let srv = Thruserv::start(&[
        "--ws-connects-per-min",
        "0",
        "--session-creates-per-min",
        "0",
        "--ws-msgs-per-sec",
        "0",
        // A slow run needs more sessions (9 connections each) before the cut-off.
        "--max-ws-connections-per-ip",
        "0",
        "--max-sessions-per-ip",
        "0",
    ]);
    // Pairing-shaped messages of ~1.9 KiB: 4 per joiner stay under the 8 KiB per-joiner
    // budget, 8 joiners per session under the 64 KiB per-session one, so five sessions
    // (~305 KiB) would all pass without a per-IP budget.
    let reply = json!({"t": "reply", "pad": "r".repeat(1900)});
    let encoded = |payload: &serde_json::Value| {
        ServerMsg::Relay {
            from: PeerId::HOST,
            payload: payload.clone(),
        }
        .encode()
        .len()
    };
    let len = encoded(&reply);
    // A fresh session from the same IP, ready before the flood so that it can probe the
    // budget right after the cut-off.
    let mut fresh_host = srv.client().await;
    let fresh = fresh_host.create_session().await.unwrap();
    let mut fresh_joiner = srv.client_from("127.0.0.2").await;
    let fresh_peer = fresh_joiner.join_session(fresh.session).await.unwrap().peer;
    assert_eq!(
        recv(&mut fresh_host).await,
        ServerMsg::PeerJoined { peer: fresh_peer }
    );

    let mut passed_bytes = 0;
    let mut cut = None;
    let mut held = Vec::new();
    let flood = Instant::now();
    'flood: for session in 0..64 {
        let mut host = srv.client().await;
        let created = host.create_session().await.unwrap();
        let mut joiners = Vec::new();
        for _ in 0..8 {
            let mut joiner = srv.client().await;
            let joined = joiner.join_session(created.session).await.unwrap();
            assert_eq!(
                recv(&mut host).await,
                ServerMsg::PeerJoined { peer: joined.peer }
            );
            joiners.push((joined.peer, joiner));
        }
        for (peer, _) in &joiners {
            for _ in 0..4 {
                let sent = Instant::now();
                match relay_outcome(&mut host, *peer, reply.clone()).await {
                    None => passed_bytes += len,
                    Some(code) => {
                        cut = Some((session, code, sent));
                        held.push((host, joiners));
                        break 'flood;
                    }
                }
                assert!(
                    passed_bytes as f64 <= BUDGET as f64 + refill(flood),
                    "{passed_bytes} bytes of pairing from one IP passed without a refusal"
                );
            }
        }
        held.push((host, joiners));
    }
    let (session, code, cut_sent) =
        cut.unwrap_or_else(|| panic!("{passed_bytes} bytes of pairing from one IP passed"));
    assert_eq!(code, ErrorCode::PairingRateLimited);
    assert!(
        session >= 3,
        "cut off in session {session}, before the IP budget"
    );
    // All of the budget passed, less than one message short (a refusal costs nothing).
    assert!(
        passed_bytes + len > BUDGET,
        "{passed_bytes} bytes passed, budget {BUDGET}"
    );
    assert_eq!(
        srv.metric("thruserv_pairing_bytes_relayed_total").await,
        passed_bytes as u64
    );
    assert_eq!(
        srv.metric("thruserv_rejections_total{reason=\"pairing_rate_limited\"}")
            .await,
        1
    );

    // The same IP stays cut off in a fresh session: a message of the whole per-joiner budget
    // is refused, as what was left at the cut (less than one flood message) and what refilled
    // since cannot cover it; only a very slow run may have refilled that much.
    let probe = json!({"t": "reply", "pad": "r".repeat(1900 + 8 * 1024 - len)});
    assert_eq!(encoded(&probe), 8 * 1024);
    let outcome = relay_outcome(&mut fresh_host, fresh_peer, probe).await;
    let could_refill = len as f64 + refill(cut_sent) >= (8 * 1024) as f64;
    assert!(
        outcome == Some(ErrorCode::PairingRateLimited) || (outcome.is_none() && could_refill),
        "probe in a fresh session: {outcome:?}, {:?} after the cut-off",
        cut_sent.elapsed()
    );
    // Others pair as usual.
    srv.assert_pairs("127.0.0.3", "127.0.0.4").await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn pre_pairing_bytes_per_ip_sets_the_budget() {
    let srv = Thruserv::start(&[
        "--ws-msgs-per-sec",
        "0",
        "--pre-pairing-bytes-per-ip",
        "4096",
    ]);
    let mut host = srv.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = srv.client_from("127.0.0.2").await;
    let joined = joiner.join_session(created.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: joined.peer }
    );
    // ~1 KiB messages: the 4 KiB IP budget runs out before the 8 KiB per-joiner one.
    let reply = json!({"t": "reply", "pad": "r".repeat(1000)});
    let mut passed = 0;
    let code = loop {
        match relay_outcome(&mut host, joined.peer, reply.clone()).await {
            None => passed += 1,
            Some(code) => break code,
        }
        assert!(passed < 8, "the per-IP budget never ran out");
    };
    assert_eq!(code, ErrorCode::PairingRateLimited);
    assert_eq!(passed, 3, "three ~1 KiB messages fit in 4 KiB");
    // The joiner's own IP still has its budget: its hello reaches the host.
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Relay {
            from: joined.peer,
            payload: json!({"t": "hello"})
        }
    );
}
