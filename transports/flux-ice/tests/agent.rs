//! Agent behaviour in virtual time: two agents connecting, and the bad-input catalogue
//! (candidate floods, unusable addresses, bad integrity, garbage bytes).
#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    clippy::disallowed_types
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flux_ice::{
    Agent, Candidate, CandidateKind, Config, Credentials, Event, Received, Role, RouteKind,
    StreamId, TurnServer, TurnTransport,
};
use is::Sha1HmacProvider;

fn creds(n: u8) -> Credentials {
    Credentials::from_random(&[n; 18])
}

fn agent(role: Role, n: u8, host: &str, now: Instant) -> Agent {
    let mut a = Agent::new(Config::new(role, creds(n), u64::from(n) * 7919), now);
    assert!(a.add_host(host.parse().unwrap(), now));
    a
}

fn events(a: &mut Agent) -> Vec<Event> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

fn local_candidates(evs: &[Event]) -> Vec<Candidate> {
    evs.iter()
        .filter_map(|e| match e {
            Event::LocalCandidate(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn two_hosts_connect_and_select_a_host_pair() {
    let t0 = Instant::now();
    let mut a = agent(Role::Controlling, 1, "10.0.0.1:1000", t0);
    let mut b = agent(Role::Controlled, 2, "10.0.0.2:2000", t0);
    let ca = local_candidates(&events(&mut a));
    let cb = local_candidates(&events(&mut b));
    assert_eq!(ca.len(), 1);
    a.set_remote_credentials(&creds(2), t0);
    b.set_remote_credentials(&creds(1), t0);
    // Trickled through their string form, as signaling carries them.
    for c in &cb {
        assert!(a.add_remote_candidate(&c.to_string().parse().unwrap(), t0));
    }
    for c in &ca {
        assert!(b.add_remote_candidate(&c.to_string().parse().unwrap(), t0));
    }
    let (mut sel_a, mut sel_b) = (None, None);
    let mut now = t0;
    while now < t0 + Duration::from_secs(5) && (sel_a.is_none() || sel_b.is_none()) {
        now += Duration::from_millis(1);
        step(&mut a, &mut b, now);
        step(&mut b, &mut a, now);
        for e in events(&mut a) {
            if let Event::Selected(s) = e {
                sel_a = Some((s, now));
            }
        }
        for e in events(&mut b) {
            if let Event::Selected(s) = e {
                sel_b = Some((s, now));
            }
        }
    }
    let (sa, ta) = sel_a.expect("controlling side selected a pair");
    let (sb, _) = sel_b.expect("controlled side selected a pair");
    assert_eq!(sa.kind, RouteKind::Host);
    assert_eq!(sb.kind, RouteKind::Host);
    assert_eq!(sa.remote, "10.0.0.2:2000".parse().unwrap());
    assert_eq!(sb.remote, "10.0.0.1:1000".parse().unwrap());
    // Virtual time (deterministic): no real clock is read.
    assert!(ta - t0 < Duration::from_secs(1), "took {:?}", ta - t0);
    // Application data: direct, no framing.
    let mut out = Vec::new();
    assert_eq!(
        a.wrap(now, b"\xc0data", &mut out),
        Ok(flux_ice::SendVia::Direct {
            from: "10.0.0.1:1000".parse().unwrap(),
            to: "10.0.0.2:2000".parse().unwrap()
        })
    );
    assert!(out.is_empty());
    assert_eq!(
        b.handle_datagram(now, sa.local, sb.local, b"\xc0data"),
        Received::App {
            peer: sa.local,
            data: b"\xc0data"
        }
    );
}

/// Runs `from`'s timers and delivers what it sends to `to`; returns the datagram count.
fn step(from: &mut Agent, to: &mut Agent, now: Instant) -> usize {
    if from.poll_timeout().is_some_and(|t| now >= t) {
        from.handle_timeout(now);
    }
    let mut n = 0;
    while let Some(t) = from.poll_transmit() {
        assert!(t.stream.is_none());
        let r = to.handle_datagram(now, t.from, t.to, &t.data);
        assert_eq!(r, Received::Handled);
        n += 1;
    }
    n
}

/// Two connected agents; after connecting, keepalive checks keep the pair alive for a minute
/// at a low rate, and when the peer vanishes the agent reports consent lost.
#[test]
fn keepalives_hold_and_consent_expires_when_the_peer_vanishes() {
    let t0 = Instant::now();
    let mut a = agent(Role::Controlling, 1, "10.0.0.1:1000", t0);
    let mut b = agent(Role::Controlled, 2, "10.0.0.2:2000", t0);
    let ca = local_candidates(&events(&mut a));
    let cb = local_candidates(&events(&mut b));
    a.set_remote_credentials(&creds(2), t0);
    b.set_remote_credentials(&creds(1), t0);
    a.add_remote_candidate(&cb[0], t0);
    b.add_remote_candidate(&ca[0], t0);
    let mut now = t0;
    let mut connected = false;
    let mut packets_after = 0;
    while now < t0 + Duration::from_secs(60) {
        now += Duration::from_millis(5);
        let n = step(&mut a, &mut b, now) + step(&mut b, &mut a, now);
        if connected {
            packets_after += n;
        }
        for e in events(&mut a).into_iter().chain(events(&mut b)) {
            match e {
                Event::Selected(_) => connected = true,
                Event::Failed(r) => panic!("failed while the peer answers: {r}"),
                _ => {}
            }
        }
    }
    assert!(connected);
    // Keepalives, not a stream: both sides together, at most a few per second.
    assert!(
        packets_after < 60 * 10,
        "{packets_after} packets in a minute"
    );
    assert!(packets_after > 10, "no keepalives: {packets_after}");
    // The peer vanishes: nothing is delivered any more.
    let gone = now;
    let mut failed = None;
    while now < gone + Duration::from_secs(90) && failed.is_none() {
        now += Duration::from_millis(5);
        if a.poll_timeout().is_some_and(|t| now >= t) {
            a.handle_timeout(now);
        }
        while a.poll_transmit().is_some() {}
        for e in events(&mut a) {
            if let Event::Failed(r) = e {
                failed = Some((r, now - gone));
            }
        }
    }
    let (reason, after) = failed.expect("consent loss reported");
    assert!(
        matches!(reason, flux_ice::FailReason::ConsentLost(_)),
        "{reason}"
    );
    // Virtual time (deterministic): consent is 30 s.
    assert!(
        after >= Duration::from_secs(25) && after <= Duration::from_secs(60),
        "{after:?}"
    );
}

/// A peer that trickles 10,000 candidates gets 100 accepted, and the checks towards them are
/// paced by Ta (50 ms): no storm towards third parties.
#[test]
fn ten_thousand_candidates_are_capped_and_paced() {
    let t0 = Instant::now();
    let mut a = agent(Role::Controlling, 1, "10.0.0.1:1000", t0);
    a.set_remote_credentials(&creds(2), t0);
    let mut accepted = 0;
    for i in 0..10_000u32 {
        let c = Candidate {
            kind: CandidateKind::Host,
            addr: SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 4000)),
            priority: 2_000_000_000 - i,
            foundation: format!("f{i}"),
            component: 1,
            related: None,
        };
        if a.add_remote_candidate(&c, t0) {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 100);
    assert_eq!(a.stats().remote_candidates_ignored, 9_900);
    let mut sent = 0u32;
    let mut targets = HashSet::new();
    let mut now = t0;
    let run = Duration::from_secs(5);
    while now < t0 + run {
        while let Some(t) = a.poll_transmit() {
            sent += 1;
            targets.insert(t.to);
        }
        now += Duration::from_millis(1);
        // A driver that calls far too often must not speed checks up.
        a.handle_timeout(now);
    }
    let limit = u32::try_from(run.as_millis() / 50).unwrap() + 2;
    println!(
        "{sent} checks to {} targets in {run:?} (limit {limit})",
        targets.len()
    );
    assert!(sent <= limit, "{sent} checks in {run:?}, limit {limit}");
    assert!(sent >= 20, "checks must still run: {sent}");
    assert!(targets.len() <= 100);
}

#[test]
fn loopback_link_local_and_unspecified_candidates_are_ignored() {
    let t0 = Instant::now();
    let mut a = agent(Role::Controlling, 1, "10.0.0.1:1000", t0);
    a.set_remote_credentials(&creds(2), t0);
    let bad = [
        "127.0.0.1:5000",
        "[::1]:5000",
        "169.254.10.1:5000",
        "[fe80::1]:5000",
        "0.0.0.0:5000",
        "[::]:5000",
        "224.0.0.251:5353",
        "255.255.255.255:5000",
        "10.0.0.9:0",
    ];
    for addr in bad {
        let c = Candidate {
            kind: CandidateKind::Host,
            addr: addr.parse().unwrap(),
            priority: 1,
            foundation: "x".into(),
            component: 1,
            related: None,
        };
        assert!(!a.add_remote_candidate(&c, t0), "{addr} accepted");
    }
    assert_eq!(a.stats().remote_candidates_ignored, bad.len() as u64);
    let mut now = t0;
    for _ in 0..2000 {
        now += Duration::from_millis(1);
        a.handle_timeout(now);
        // Only the agent's own STUN gathering would send; there is none configured.
        assert_eq!(a.poll_transmit(), None);
    }
    // Our own host address is refused the same way.
    assert!(!a.add_host("127.0.0.1:1".parse().unwrap(), now));
    assert!(!a.add_host("169.254.0.1:1".parse().unwrap(), now));
}

fn binding_request(username: &str, password: &[u8]) -> Vec<u8> {
    let msg = is::stun::StunMessage::binding_request(
        username,
        is::stun::TransId::new(),
        true,
        42,
        1_862_270_719,
        false,
    );
    let mut buf = vec![0u8; 512];
    let n = msg
        .to_bytes(Some(password), &mut buf, |k, p| {
            is::DefaultSha1HmacProvider.sha1_hmac(k, p)
        })
        .unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn stun_with_bad_integrity_is_refused() {
    let t0 = Instant::now();
    let mut b = agent(Role::Controlled, 2, "10.0.0.2:2000", t0);
    b.set_remote_credentials(&creds(1), t0);
    let _ = std::iter::from_fn(|| b.poll_transmit()).count();
    let me: SocketAddr = "10.0.0.2:2000".parse().unwrap();
    let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
    // Username is "<receiver ufrag>:<sender ufrag>"; the key is the receiver's password.
    let user = format!("{}:{}", creds(2).ufrag, creds(1).ufrag);
    let forged = binding_request(&user, b"not-the-password-at-all");
    assert_eq!(b.handle_datagram(t0, peer, me, &forged), Received::Handled);
    assert_eq!(b.stats().stun_refused, 1);
    assert!(
        std::iter::from_fn(|| b.poll_transmit()).all(|t| t.to != peer),
        "answered a forged check"
    );
    // The same request with the right password is answered: the refusal above is about
    // integrity, not about the message shape.
    let good = binding_request(&user, creds(2).pwd.as_bytes());
    assert_eq!(b.handle_datagram(t0, peer, me, &good), Received::Handled);
    assert_eq!(b.stats().stun_refused, 1);
    assert!(std::iter::from_fn(|| b.poll_transmit()).any(|t| t.to == peer));
}

fn agent_with_turn(now: Instant) -> Agent {
    let mut config = Config::new(Role::Controlling, creds(1), 1);
    config.stun_servers = vec!["198.51.100.2:3478".parse().unwrap()];
    for transport in [TurnTransport::Udp, TurnTransport::Tcp] {
        config.turn_servers.push(TurnServer {
            addr: "198.51.100.2:3478".parse().unwrap(),
            transport,
            username: "u".into(),
            password: "p".into(),
        });
    }
    let mut a = Agent::new(config, now);
    a.add_host("10.0.0.1:1000".parse().unwrap(), now);
    a.turn_stream_connected(StreamId(1), "10.0.0.1:40000".parse().unwrap(), now);
    a.set_remote_credentials(&creds(2), now);
    a
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Garbage from anyone — a peer, the STUN/TURN server, a TURN stream — never panics.
    #[test]
    fn garbage_never_panics(
        packets in proptest::collection::vec(
            (0u8..4, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)),
            1..20,
        )
    ) {
        let t0 = Instant::now();
        let mut a = agent_with_turn(t0);
        let server: SocketAddr = "198.51.100.2:3478".parse().unwrap();
        let local: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let mut now = t0;
        for (who, mut data) in packets {
            now += Duration::from_millis(7);
            match who {
                0 => { let _ = a.handle_datagram(now, server, local, &data); }
                1 => { let _ = a.handle_datagram(now, "203.0.113.9:9".parse().unwrap(), local, &data); }
                2 => a.handle_stream_data(now, StreamId(1), &data),
                _ => {
                    // Something that looks like STUN or ChannelData to reach deeper code.
                    if data.len() >= 4 {
                        data[0] = if data[1] & 1 == 0 { 0x01 } else { 0x40 };
                        data[4..].iter_mut().take(4).zip(0x2112_A442u32.to_be_bytes()).for_each(|(b, c)| *b = c);
                    }
                    let _ = a.handle_datagram(now, server, local, &data);
                }
            }
            a.handle_timeout(now);
            while a.poll_transmit().is_some() {}
            while a.poll_event().is_some() {}
        }
    }
}

/// The engine moves the agent into its worker thread.
#[test]
fn agent_is_send() {
    fn send<T: Send>() {}
    send::<Agent>();
    send::<Event>();
}

/// STUN attribute USE-CANDIDATE (RFC 8445 §16.1).
const USE_CANDIDATE: u16 = 0x0025;

/// Whether `data` is a STUN Binding request carrying USE-CANDIDATE (a nomination).
fn is_nomination(data: &[u8]) -> bool {
    if data.len() < 20 || data[..2] != [0, 1] {
        return false;
    }
    let mut attrs = &data[20..];
    while attrs.len() >= 4 {
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let l = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        if t == USE_CANDIDATE {
            return true;
        }
        attrs = attrs.get((4 + l).next_multiple_of(4)..).unwrap_or(&[]);
    }
    false
}

/// Two host agents over a link with `delay` each way that drops what `drop` says; returns the
/// virtual time until both sides selected a pair (`None`: not within 10 s).
fn connect_through(
    delay: Duration,
    mut drop: impl FnMut(&[u8]) -> bool,
    seed: u8,
) -> Option<Duration> {
    let t0 = Instant::now();
    let mut a = agent(Role::Controlling, seed.wrapping_mul(2), "10.0.0.1:1000", t0);
    let mut b = agent(
        Role::Controlled,
        seed.wrapping_mul(2) + 1,
        "10.0.0.2:2000",
        t0,
    );
    let ca = local_candidates(&events(&mut a));
    let cb = local_candidates(&events(&mut b));
    a.set_remote_credentials(&creds(seed.wrapping_mul(2) + 1), t0);
    b.set_remote_credentials(&creds(seed.wrapping_mul(2)), t0);
    for c in &cb {
        assert!(a.add_remote_candidate(c, t0));
    }
    for c in &ca {
        assert!(b.add_remote_candidate(c, t0));
    }
    // In flight: (arrives at, to a?, from, to, bytes).
    let mut wire: Vec<(Instant, bool, SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
    let (mut sel_a, mut sel_b) = (false, false);
    let mut now = t0;
    while now < t0 + Duration::from_secs(10) {
        now += Duration::from_millis(1);
        for (x, to_a) in [(&mut a, false), (&mut b, true)] {
            if x.poll_timeout().is_some_and(|t| now >= t) {
                x.handle_timeout(now);
            }
            while let Some(t) = x.poll_transmit() {
                if !drop(&t.data) {
                    wire.push((now + delay, to_a, t.from, t.to, t.data));
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = wire.into_iter().partition(|w| w.0 <= now);
        wire = later;
        for (_, to_a, from, to, data) in due {
            let x = if to_a { &mut a } else { &mut b };
            x.handle_datagram(now, from, to, &data);
        }
        sel_a |= events(&mut a)
            .iter()
            .any(|e| matches!(e, Event::Selected(_)));
        sel_b |= events(&mut b)
            .iter()
            .any(|e| matches!(e, Event::Selected(_)));
        if sel_a && sel_b {
            return Some(now - t0);
        }
    }
    None
}

/// A lost nomination costs one short retransmission. `is` counts every earlier, answered
/// check on the pair in its backoff, so with its fixed 250 ms-doubling timing this waited
/// about 2 s on a 1 ms path (the CI failure of issue 18: "connect took 2849 ms"). Virtual
/// time: deterministic.
#[test]
fn a_lost_nomination_costs_one_short_retransmission() {
    let ms = Duration::from_millis;
    let clean = connect_through(ms(1), |_| false, 1).expect("connects");
    let mut dropped = 0;
    let lossy = connect_through(
        ms(1),
        |d| {
            let nom = is_nomination(d) && dropped == 0;
            dropped += usize::from(nom);
            nom
        },
        1,
    )
    .expect("connects");
    assert_eq!(dropped, 1, "a nomination was sent and dropped");
    println!("clean {clean:?}, first nomination lost {lossy:?}");
    assert!(lossy < clean + ms(400), "clean {clean:?}, lossy {lossy:?}");
}

/// 10 % random loss each way on a 5 ms path, 200 seeded runs: nine in ten connect within
/// 400 ms of virtual time and all within 1 s (with `is`'s fixed timing: p90 605 ms, max
/// 1.36 s; now p90 205 ms, max 410 ms).
#[test]
fn checks_under_ten_percent_loss_connect_fast() {
    let mut times = Vec::new();
    for seed in 1..=200u8 {
        let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let lossy = move |_: &[u8]| {
            // xorshift64: deterministic per seed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % 10 == 0
        };
        let t = connect_through(Duration::from_millis(5), lossy, seed)
            .unwrap_or_else(|| panic!("seed {seed}: no pair within 10 s"));
        times.push(t);
    }
    times.sort();
    let p90 = times[times.len() * 9 / 10 - 1];
    println!(
        "p50 {:?} p90 {p90:?} max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(p90 < Duration::from_millis(400), "{times:?}");
    assert!(times[times.len() - 1] < Duration::from_secs(1), "{times:?}");
}
