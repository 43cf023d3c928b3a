//! thruserv as a fleet (`--redis`): real `redis-server` and two or three real `thruserv`
//! processes. Sessions span instances, limits hold across them, the loss of an instance or
//! of Redis is reported to the clients it concerns, and junk in Redis is refused.
//!
//! Each test starts its own Redis on a free loopback port, so they run in parallel. They
//! skip (with a note on stderr) where `redis-server` is not installed.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::fleet::{Redis, signal};
use common::{
    PATIENCE, Thruserv, expect_error, expect_fatal, expect_session_closed, http_get, pair, recv,
};
use flux_signal::client::ClientError;
use flux_signal::proto::{ErrorCode, PeerId, PeerLeftReason, ServerMsg};
use serde_json::json;

/// `n` instances sharing `redis`, each with `extra` flags.
fn fleet(redis: &Redis, n: usize, extra: &[&str]) -> Vec<Thruserv> {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    (0..n).map(|_| Thruserv::start(&args)).collect()
}

/// Polls `/healthz` until it answers `status`.
async fn wait_health(server: &Thruserv, status: u16) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if http_get(server.addr, "/healthz").await.0 == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Expects a refusal with `code` from a create or join.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) {
    match result {
        Err(ClientError::Server { code: got, .. }) => assert_eq!(got, code),
        other => panic!("expected {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_host_on_one_instance_pairs_with_a_joiner_on_another_in_order() {
    let Some(redis) = Redis::start() else { return };
    let servers = fleet(&redis, 2, &[]);
    let (a, b) = (&servers[0], &servers[1]);

    let mut host = a.client().await;
    let created = host.create_session().await.unwrap();
    let mut joiner = b.client().await;
    let joined = joiner.join_session(created.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: joined.peer }
    );
    joiner
        .relay(PeerId::HOST, json!({"t": "hello", "pake": "j"}))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::Relay {
            from: joined.peer,
            payload: json!({"t": "hello", "pake": "j"})
        }
    );
    pair(&mut host, &mut joiner, joined.peer).await;
    // After acceptance any payload passes, in the order sent.
    for i in 0..30 {
        host.relay(joined.peer, json!({"t": "line", "i": i}))
            .await
            .unwrap();
    }
    for i in 0..30 {
        assert_eq!(
            recv(&mut joiner).await,
            ServerMsg::Relay {
                from: PeerId::HOST,
                payload: json!({"t": "line", "i": i})
            }
        );
    }
    // Before acceptance only pairing messages pass, across instances as in one.
    let mut second = b.client().await;
    let j2 = second.join_session(created.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j2.peer }
    );
    second
        .relay(PeerId::HOST, json!({"t": "file", "x": 1}))
        .await
        .unwrap();
    expect_error(&mut second, ErrorCode::NotAllowed).await;

    joiner.leave().await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerLeft {
            peer: joined.peer,
            reason: PeerLeftReason::Left
        }
    );
    host.close().await;
    expect_session_closed(&mut second, ErrorCode::HostLeft).await;
    a.assert_healthy().await;
    b.assert_healthy().await;
}

#[tokio::test]
async fn per_ip_limits_and_the_failed_join_budget_hold_across_instances() {
    let Some(redis) = Redis::start() else { return };
    let servers = fleet(
        &redis,
        2,
        &[
            "--ws-connects-per-min",
            "1",
            "--ws-connects-burst",
            "6",
            "--session-creates-per-min",
            "1",
            "--session-creates-burst",
            "3",
            "--max-sessions-per-ip",
            "2",
            "--max-failed-joins",
            "3",
        ],
    );
    let on = |i: usize| &servers[i % 2];

    // Connects: one IP spreading over both instances gets the burst of 6, no more.
    let mut open = Vec::new();
    for i in 0..10 {
        match on(i).try_client_from("127.0.0.21").await {
            Ok(c) => open.push(c),
            Err(ClientError::Refused { status, code }) => {
                assert_eq!((status, code), (429, ErrorCode::ConnectRateLimited));
            }
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }
    assert_eq!(open.len(), 6, "connect budget across two instances");
    drop(open);

    // Sessions: 2 live per IP, then the create budget of 3 is spent, whichever instance.
    let mut hosts = Vec::new();
    for i in 0..4 {
        hosts.push(on(i).client_from("127.0.0.22").await);
    }
    hosts[0].create_session().await.unwrap();
    hosts[1].create_session().await.unwrap();
    assert_refused(hosts[2].create_session().await, ErrorCode::TooManySessions);
    assert_refused(
        hosts[3].create_session().await,
        ErrorCode::CreateRateLimited,
    );

    // Failed joins: the host on instance 0 rejects joiners arriving on both instances;
    // the third rejection closes the session.
    let mut host = on(0).client_from("127.0.0.23").await;
    let created = host.create_session().await.unwrap();
    for n in 1..=3u32 {
        let mut joiner = on(n as usize)
            .client_from(&format!("127.0.0.{}", 30 + n))
            .await;
        let joined = joiner.join_session(created.session).await.unwrap();
        assert_eq!(joined.peer, PeerId(n));
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerJoined { peer: joined.peer }
        );
        host.reject_peer(joined.peer, Some("wrong code".into()))
            .await
            .unwrap();
        expect_session_closed(&mut joiner, ErrorCode::RejectedByHost).await;
        if n < 3 {
            assert_eq!(
                recv(&mut host).await,
                ServerMsg::PeerLeft {
                    peer: joined.peer,
                    reason: PeerLeftReason::Rejected
                }
            );
        }
    }
    expect_session_closed(&mut host, ErrorCode::TooManyFailedJoins).await;
    let mut late = on(1).client_from("127.0.0.40").await;
    assert_refused(
        late.join_session(created.session).await,
        ErrorCode::NoSuchSession,
    );
}

#[tokio::test]
async fn kill_9_of_an_instance_reaches_its_peers_and_spares_the_rest() {
    let Some(redis) = Redis::start() else { return };
    let mut servers = fleet(&redis, 3, &[]);
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);

    // Session 1: host on A (to be killed), joiner on B.
    let mut host1 = a.client().await;
    let s1 = host1.create_session().await.unwrap();
    let mut joiner1 = b.client().await;
    joiner1.join_session(s1.session).await.unwrap();
    // Session 2: host on B, joiner on A.
    let mut host2 = b.client().await;
    let s2 = host2.create_session().await.unwrap();
    let mut joiner2 = a.client().await;
    let j2 = joiner2.join_session(s2.session).await.unwrap();
    assert_eq!(
        recv(&mut host2).await,
        ServerMsg::PeerJoined { peer: j2.peer }
    );
    // Session 3: B and C only.
    let mut host3 = b.client().await;
    let s3 = host3.create_session().await.unwrap();
    let mut joiner3 = c.client().await;
    let j3 = joiner3.join_session(s3.session).await.unwrap();
    assert_eq!(
        recv(&mut host3).await,
        ServerMsg::PeerJoined { peer: j3.peer }
    );

    signal(a.pid(), "KILL");

    // The joiner whose host died hears that the host is gone; the host whose joiner died
    // hears that it disconnected. (recv's PATIENCE is only a hang guard.)
    expect_session_closed(&mut joiner1, ErrorCode::HostLeft).await;
    let left = loop {
        match recv(&mut host2).await {
            ServerMsg::PeerLeft { peer, reason } => break (peer, reason),
            ServerMsg::PeerJoined { .. } => continue,
            other => panic!("expected peer_left, got {other:?}"),
        }
    };
    assert_eq!(left, (j2.peer, PeerLeftReason::Disconnected));

    // Session 3 is untouched, and new sessions still span the survivors.
    host3
        .relay(j3.peer, json!({"t": "reply", "pake": "x"}))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut joiner3).await,
        ServerMsg::Relay {
            from: PeerId::HOST,
            payload: json!({"t": "reply", "pake": "x"})
        }
    );
    servers.remove(0);
    let (b, c) = (&servers[0], &servers[1]);
    let mut host = b.client().await;
    let s = host.create_session().await.unwrap();
    let mut joiner = c.client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );
}

#[tokio::test]
async fn redis_lost_refuses_new_sessions_cleanly_and_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mut servers = fleet(&redis, 2, &[]);
    // A pairing made before the outage.
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let mut joiner = servers[1].client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );

    redis.stop();
    wait_health(&servers[0], 503).await;
    wait_health(&servers[1], 503).await;
    // New sessions and joins are refused with a clear code; the connection stays usable.
    let mut c = servers[0].client().await;
    assert_refused(c.create_session().await, ErrorCode::StoreUnavailable);
    let mut d = servers[1].client().await;
    assert_refused(d.join_session(s.session).await, ErrorCode::StoreUnavailable);
    // Connections made before the outage stay open.
    host.relay(j.peer, json!({"t": "reply"})).await.unwrap();
    expect_error(&mut host, ErrorCode::StoreUnavailable).await;

    redis.restart();
    wait_health(&servers[0], 200).await;
    wait_health(&servers[1], 200).await;
    // Redis came back empty: the members of the lost session are told, not left waiting.
    expect_session_closed(&mut host, ErrorCode::StoreUnavailable).await;
    expect_session_closed(&mut joiner, ErrorCode::StoreUnavailable).await;
    for server in &mut servers {
        assert!(server.is_running(), "an instance exited");
    }
    servers[1].assert_pairs("127.0.0.1", "127.0.0.1").await;
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let mut joiner = servers[1].client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );
}

#[test]
fn redis_unreachable_at_start_is_a_clear_error_and_exit_2() {
    let port = common::fleet::free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thruserv"))
        .args(["--bind", "127.0.0.1", "--port", "0"])
        .args(["--redis", &format!("redis://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "--redis: cannot use redis at redis://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it must not report listening");
}

#[tokio::test]
async fn sigterm_tells_members_and_their_peers_on_other_instances() {
    let Some(redis) = Redis::start() else { return };
    let mut servers = fleet(&redis, 2, &[]);
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let mut joiner = servers[1].client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );

    signal(servers[0].pid(), "TERM");
    expect_fatal(&mut host, ErrorCode::ServerShutdown).await;
    expect_session_closed(&mut joiner, ErrorCode::HostLeft).await;
    let status = servers[0].wait_exit(PATIENCE).expect("exits after SIGTERM");
    assert!(status.success());
    // It retired from Redis on the way out: one instance left registered.
    assert_eq!(redis.list(&["ZRANGE", "thruserv:inst", "0", "-1"]).len(), 1);
    servers[1].assert_pairs("127.0.0.1", "127.0.0.1").await;
}

#[tokio::test]
async fn hostile_values_in_redis_are_refused_without_a_crash() {
    let Some(redis) = Redis::start() else { return };
    let mut servers = fleet(&redis, 2, &[]);
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let key = format!("thruserv:s:{}", s.session);

    // Fields that are not numbers: refused, whichever instance reads them.
    redis.cmd(&["HSET", &key, "np", "many", "j", "-x"]);
    let mut joiner = servers[1].client().await;
    assert_refused(
        joiner.join_session(s.session).await,
        ErrorCode::StoreUnavailable,
    );
    redis.cmd(&["HSET", &key, "np", "1", "j", "0"]);
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );
    // A huge host location that names no instance: the relay reaches nobody.
    redis.cmd(&["HSET", &key, "h", &"z".repeat(1 << 20)]);
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    // A counter that is not a number: refused.
    redis.cmd(&["HSET", &key, "rl", "lots"]);
    joiner
        .relay(PeerId::HOST, json!({"t": "hello"}))
        .await
        .unwrap();
    expect_error(&mut joiner, ErrorCode::StoreUnavailable).await;

    // Wrong types where the scripts expect a hash, a sorted set, a set.
    redis.cmd(&["DEL", &key]);
    redis.cmd(&["SET", &key, "not a hash"]);
    let mut j2 = servers[1].client().await;
    assert_refused(
        j2.join_session(s.session).await,
        ErrorCode::StoreUnavailable,
    );
    redis.cmd(&["SET", "thruserv:all", "not a zset"]);
    let mut h2 = servers[0].client().await;
    assert_refused(h2.create_session().await, ErrorCode::StoreUnavailable);

    // Junk published on every instance's channel.
    for inst in redis.list(&["ZRANGE", "thruserv:inst", "0", "-1"]) {
        let channel = format!("thruserv:c:{inst}");
        for junk in [
            "T1 {\"type\":\"welcome\"}".to_string(),
            "C1 nonsense".into(),
            "J1 0".into(),
            "\u{0}\u{1}".into(),
            format!("T1 {}", "[".repeat(100_000)),
        ] {
            redis.cmd(&["PUBLISH", &channel, &junk]);
        }
    }
    // The instances (and their heartbeat scripts, which read the same keys) live on, and
    // once the junk is gone they serve again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for server in &mut servers {
        assert!(server.is_running(), "an instance exited");
    }
    redis.cmd(&["DEL", "thruserv:all", &key]);
    wait_health(&servers[0], 200).await;
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let mut joiner = servers[1].client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );
}

#[tokio::test]
async fn the_pre_pairing_byte_budget_of_an_ip_is_shared_across_instances() {
    let Some(redis) = Redis::start() else { return };
    let servers = fleet(&redis, 2, &["--pre-pairing-bytes-per-ip", "4000"]);
    let payload = json!({"t": "hello", "pake": "p".repeat(400)});
    let len = ServerMsg::Relay {
        from: PeerId(1),
        payload: payload.clone(),
    }
    .encode()
    .len();

    // Two sessions, hosted on different instances; both joiners come from one address, one
    // through each instance.
    let mut joiners = Vec::new();
    let mut hosts = Vec::new();
    for (h, j) in [(0, 1), (1, 0)] {
        let mut host = servers[h].client_from(&format!("127.0.0.{}", 50 + h)).await;
        let s = host.create_session().await.unwrap();
        let mut joiner = servers[j].client_from("127.0.0.60").await;
        let joined = joiner.join_session(s.session).await.unwrap();
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerJoined { peer: joined.peer }
        );
        assert_eq!(joined.peer, PeerId(1));
        hosts.push(host);
        joiners.push(joiner);
    }
    for _ in 0..6 {
        for joiner in &mut joiners {
            joiner.relay(PeerId::HOST, payload.clone()).await.unwrap();
        }
    }
    // A marker each joiner's refusals end with: joiners may not address joiners.
    let mut accepted = Vec::new();
    for joiner in &mut joiners {
        joiner
            .relay(PeerId(7), json!({"t": "hello"}))
            .await
            .unwrap();
        let mut refused = 0;
        loop {
            match recv(joiner).await {
                ServerMsg::Error {
                    code: ErrorCode::PairingRateLimited,
                    ..
                } => refused += 1,
                ServerMsg::Error {
                    code: ErrorCode::NotAllowed,
                    ..
                } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        accepted.push(6 - refused);
    }
    let relayed: usize = accepted.iter().sum();
    assert_eq!(
        relayed,
        4000 / len,
        "one budget of 4000 bytes, {len} per message"
    );
    // Each host got exactly what its joiner was not refused.
    for (host, n) in hosts.iter_mut().zip(accepted) {
        for _ in 0..n {
            assert!(matches!(recv(host).await, ServerMsg::Relay { .. }));
        }
    }
}

#[tokio::test]
async fn the_session_lifetime_ends_members_on_every_instance() {
    let Some(redis) = Redis::start() else { return };
    let servers = fleet(&redis, 2, &["--session-lifetime", "1s"]);
    let mut host = servers[0].client().await;
    let s = host.create_session().await.unwrap();
    let key = format!("thruserv:s:{}", s.session);
    // Redis holds the session no longer than its lifetime (plus a little slack).
    let ttl: i64 = redis.cmd(&["PTTL", &key])[1..].parse().unwrap();
    assert!(ttl > 0 && ttl <= 6000, "PTTL {ttl}");
    let mut joiner = servers[1].client().await;
    let j = joiner.join_session(s.session).await.unwrap();
    assert_eq!(
        recv(&mut host).await,
        ServerMsg::PeerJoined { peer: j.peer }
    );
    expect_session_closed(&mut host, ErrorCode::SessionExpired).await;
    expect_session_closed(&mut joiner, ErrorCode::SessionExpired).await;
    assert_eq!(redis.cmd(&["EXISTS", &key]), ":0");
}
