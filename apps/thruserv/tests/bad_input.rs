//! Malformed and hostile input against a real `thruserv`: each case gets its documented
//! answer, and the server stays up (`/healthz` answers and a fresh pair still works).

// Test helpers outside #[test] fns panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use flux_signal::proto::{ErrorCode, PeerId};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// After each case: the server is alive and still pairs clients.
async fn still_serving(srv: &Thruserv) {
    srv.assert_healthy().await;
    srv.assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn invalid_json() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_text(r#"{"type":"create_session""#).await;
    ws.expect_fatal("invalid_json", 1008).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn invalid_utf8() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_frame(true, 1, b"{\"type\":\"\xff\xfe\"}").await;
    ws.expect_fatal("invalid_utf8", 1007).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn deeply_nested_json() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    let deep = format!(
        r#"{{"type":"relay","to":0,"payload":{}}}"#,
        "[".repeat(60_000)
    );
    ws.send_text(&deep).await;
    ws.expect_fatal("invalid_json", 1008).await;
    // Nesting inside an unknown field is buffered by serde too; also refused, not a crash.
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_text(&format!(r#"{{"x":{}"#, r#"{"a":"#.repeat(10_000)))
        .await;
    ws.expect_fatal("invalid_json", 1008).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn unknown_message_type_is_answered_and_the_connection_goes_on() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_text(r#"{"type":"teleport","to":"mars"}"#).await;
    let err = ws.next_json().await;
    assert_eq!(
        (
            err["type"].as_str(),
            err["code"].as_str(),
            err["fatal"].as_bool()
        ),
        (Some("error"), Some("unknown_type"), Some(false))
    );
    ws.send_text(r#"{"type":"create_session"}"#).await;
    assert_eq!(ws.next_json().await["type"], "session_created");
    still_serving(&srv).await;
}

#[tokio::test]
async fn wrong_field_types() {
    let srv = Thruserv::start(&[]);
    for bad in [
        r#"{"type":"join_session","session":42}"#,
        r#"{"type":"relay","to":"host","payload":1}"#,
        r#"{"type":"relay","to":-1,"payload":1}"#,
        r#"{"type":"candidate","to":0,"candidate":{"addr":"not-an-addr","kind":"host","priority":1,"foundation":"f"}}"#,
        r#"{"type":7}"#,
        r#"[1,2,3]"#,
        r#""just a string""#,
    ] {
        let mut ws = RawWs::connect(srv.addr).await;
        ws.send_text(bad).await;
        ws.expect_fatal("invalid_message", 1008).await;
    }
    still_serving(&srv).await;
}

#[tokio::test]
async fn join_for_a_session_that_does_not_exist() {
    let srv = Thruserv::start(&[]);
    let mut c = srv.client().await;
    for _ in 0..3 {
        match c.join_session("ZZZZZZ".parse().unwrap()).await {
            Err(flux_signal::client::ClientError::Server {
                code: ErrorCode::NoSuchSession,
                fatal: false,
                ..
            }) => {}
            other => panic!("expected no_such_session, got {other:?}"),
        }
    }
    // The same connection can still create.
    c.create_session().await.unwrap();
    still_serving(&srv).await;
}

#[tokio::test]
async fn messages_to_a_session_never_joined() {
    let srv = Thruserv::start(&[]);
    // A live session exists, but this client never joined it: peer ids are per session, so
    // it has no way to address that session's members.
    let mut host = srv.client().await;
    host.create_session().await.unwrap();
    let mut stranger = srv.client().await;
    stranger
        .relay(PeerId::HOST, json!("let me in"))
        .await
        .unwrap();
    expect_error(&mut stranger, ErrorCode::NotInSession).await;
    stranger.reject_peer(PeerId(1), None).await.unwrap();
    expect_error(&mut stranger, ErrorCode::NotInSession).await;
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_text(r#"{"type":"candidate","to":0,"candidate":{"addr":"203.0.113.1:9","kind":"host","priority":1,"foundation":"f"}}"#).await;
    assert_eq!(ws.next_json().await["code"], "not_in_session");
    // The host heard nothing of it.
    let nothing = tokio::time::timeout(Duration::from_millis(200), host.recv()).await;
    assert!(nothing.is_err(), "host received {nothing:?}");
    still_serving(&srv).await;
}

#[tokio::test]
async fn binary_frames() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_frame(true, 2, &[0, 1, 2, 3]).await;
    ws.expect_fatal("binary_frame", 1003).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn fragmented_frame_flood_past_the_size_cap() {
    let srv = Thruserv::start(&["--max-message-bytes", "8192"]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_frame(false, 1, &[b' '; 1000]).await;
    for _ in 0..40 {
        ws.send_frame(false, 0, &[b' '; 1000]).await;
    }
    match ws.read_until_close().await.0 {
        RawEnd::Close(code, reason) => {
            assert_eq!((code, reason.as_str()), (1009, "message_too_large"))
        }
        RawEnd::Dropped => {}
    }
    srv.wait_metric(
        "thruserv_rejections_total{reason=\"message_too_large\"}",
        |v| v == 1,
    )
    .await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn fragmented_flood_of_empty_continuations() {
    // Zero-length continuations never grow the message, so only the frame timeout can end them.
    let srv = Thruserv::start(&["--frame-timeout", "500ms"]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_frame(false, 1, b"{").await;
    let mut frames = Vec::new();
    for _ in 0..5000 {
        frames.extend_from_slice(&[0x00, 0x80, 0, 0, 0, 0]);
    }
    let _ = ws.stream.write_all(&frames).await;
    ws.expect_fatal("frame_timeout", 1008).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn unmasked_client_frames_are_a_protocol_error() {
    let srv = Thruserv::start(&[]);
    let mut ws = RawWs::connect(srv.addr).await;
    ws.send_frame_raw(true, 1, br#"{"type":"create_session"}"#, false)
        .await;
    ws.expect_fatal("protocol_error", 1002).await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn half_open_tcp_connection() {
    let srv = Thruserv::start(&["--handshake-timeout", "1s"]);
    // Connect and send nothing; the server keeps serving others meanwhile, then drops it.
    let mut silent = tcp_from("127.0.0.7", srv.addr).await;
    srv.assert_healthy().await;
    assert!(
        closed_within(&mut silent, PATIENCE).await,
        "the silent connection is closed"
    );
    srv.wait_metric(
        "thruserv_rejections_total{reason=\"handshake_timeout\"}",
        |v| v >= 1,
    )
    .await;
    still_serving(&srv).await;
}

#[tokio::test]
async fn slow_http_upgrade() {
    let srv = Thruserv::start(&["--handshake-timeout", "1s"]);
    let mut slow = tcp_from("127.0.0.8", srv.addr).await;
    let request = "GET /v1/signal HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    // One byte every 100 ms would take ~15 s; the server gives up after 1 s.
    let mut writer = std::net::TcpStream::from(
        std::os::fd::AsFd::as_fd(&slow)
            .try_clone_to_owned()
            .unwrap(),
    );
    let trickler = std::thread::spawn(move || {
        for b in request.bytes().take(40) {
            if std::io::Write::write_all(&mut writer, &[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    srv.assert_healthy().await;
    assert!(
        closed_within(&mut slow, PATIENCE).await,
        "the slow upgrade is cut off"
    );
    trickler.join().unwrap();
    still_serving(&srv).await;
}

#[tokio::test]
async fn oversized_and_malformed_http() {
    let srv = Thruserv::start(&[]);
    // Headers far beyond the 16 KiB head limit.
    let mut s = tcp_from("127.0.0.1", srv.addr).await;
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    assert!(closed_within(&mut s, PATIENCE).await);
    // Not HTTP at all.
    let mut s = tcp_from("127.0.0.1", srv.addr).await;
    let _ = s
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        .await;
    assert!(closed_within(&mut s, PATIENCE).await);
    // A WebSocket upgrade of the wrong version gets 426 naming the version we speak.
    let mut s = tcp_from("127.0.0.1", srv.addr).await;
    let req = "GET /v1/signal HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut resp),
    )
    .await
    .unwrap()
    .unwrap();
    let (status, body) = parse_http(&resp);
    assert_eq!(status, 426);
    assert!(
        String::from_utf8_lossy(&resp)
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13")
    );
    assert!(body.contains("bad_request"));
    still_serving(&srv).await;
}

#[tokio::test]
async fn ping_flood_is_rate_limited() {
    let srv = Thruserv::start(&["--ws-msgs-per-sec", "5", "--ws-msgs-burst", "10"]);
    let mut ws = RawWs::connect(srv.addr).await;
    for _ in 0..200 {
        ws.send_frame(true, 9, b"p").await;
    }
    let (end, _) = ws.read_until_close().await;
    assert_eq!(end, RawEnd::Close(1008, "rate_limited".into()));
    still_serving(&srv).await;
}
