//! LAN pairing without a server: over loopback with `--peer` (library level), and with mDNS
//! between two network namespaces joined by a veth pair (real `thru` processes).
//!
//! Why namespaces for mDNS: the loopback interface carries no multicast on Linux (`lo` has no
//! MULTICAST flag, and mdns-sd does not send there), and sending mDNS on this machine's real
//! interfaces would put packets on a network that is not ours. Two namespaces with a veth
//! pair are a private two-machine LAN. The test needs root and `ip`; without `ip` it prints
//! SKIP.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{PATIENCE, local, thru_bin, within};
use serde_json::Value;
use thru::code::JoinCode;
use thru::pairing::{Rendezvous, Role};
use thru::pake::PakeError;
use thru::rendezvous::{
    HostEvent, HostOptions, JoinOptions, LanHostConfig, LanTarget, Mdns, PairError, host_lan,
    join_lan,
};

fn lan_host_config() -> LanHostConfig {
    LanHostConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        mdns: Mdns::Off,
    }
}

fn opts_host(l: thru::pake::LocalInfo) -> HostOptions {
    let mut o = HostOptions::new(l);
    o.allow_loopback = true;
    o.handshake_timeout = PATIENCE;
    o
}

fn opts_join(l: thru::pake::LocalInfo) -> JoinOptions {
    let mut o = JoinOptions::new(l);
    o.allow_loopback = true;
    o.timeout = PATIENCE;
    o
}

#[tokio::test]
async fn lan_pairs_over_loopback_with_peer() {
    let host_local = local(7001);
    let joiner_local = local(7002);
    let mut opts = opts_host(host_local.clone());
    opts.max_receivers = 1;
    let mut session = host_lan(lan_host_config(), opts).await.unwrap();
    let code = session.code().clone();
    let addr = session.lan_addr().unwrap();

    let joined = join_lan(
        &code,
        LanTarget::Peer(addr),
        opts_join(joiner_local.clone()),
    )
    .await
    .unwrap();
    assert_eq!(joined.role, Role::Joiner);
    assert_eq!(joined.rendezvous, Rendezvous::LanDirect);
    assert_eq!(joined.peer_fingerprint, host_local.fingerprint);
    // The address pairing reached the host at comes first.
    assert_eq!(joined.peer_addrs[0].ip(), addr.ip());

    match within("host event", session.next_event()).await {
        Some(HostEvent::Paired(p, trickle)) => {
            assert!(trickle.is_none(), "a LAN pairing has no trickle");
            assert_eq!(p.peer_fingerprint, joiner_local.fingerprint);
            assert_eq!(p.peer_addrs, joiner_local.addrs);
            assert_eq!(p.session_key, joined.session_key);
        }
        other => panic!("expected Paired, got {other:?}"),
    }
    assert!(matches!(
        within("host end", session.next_event()).await,
        Some(HostEvent::Ended { error: None })
    ));
}

#[tokio::test]
async fn lan_wrong_code_fails_on_both_sides() {
    let mut session = host_lan(lan_host_config(), opts_host(local(7003)))
        .await
        .unwrap();
    let wrong: JoinCode = format!("{}-0000-0000", session.code().routing())
        .parse()
        .unwrap();
    let err = join_lan(
        &wrong,
        LanTarget::Peer(session.lan_addr().unwrap()),
        opts_join(local(7004)),
    )
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
    assert!(matches!(
        within("host failed", session.next_event()).await,
        Some(HostEvent::Failed { .. })
    ));
    assert!(matches!(
        within("host end", session.next_event()).await,
        Some(HostEvent::Ended {
            error: Some(PairError::TooManyFailures(1))
        })
    ));
}

#[tokio::test]
async fn a_code_for_another_session_costs_no_guess() {
    let mut opts = opts_host(local(7005));
    opts.max_receivers = 1;
    let mut session = host_lan(lan_host_config(), opts).await.unwrap();
    let addr = session.lan_addr().unwrap();
    let other = JoinCode::generate_local().unwrap();
    let err = join_lan(&other, LanTarget::Peer(addr), opts_join(local(7006)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PairError::Handshake {
                source: PakeError::PeerAborted(thru::pake::AbortReason::WrongSession),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        within("host failed", session.next_event()).await,
        Some(HostEvent::Failed { .. })
    ));
    // Not counted: the right code still pairs.
    let code = session.code().clone();
    join_lan(&code, LanTarget::Peer(addr), opts_join(local(7007)))
        .await
        .unwrap();
    assert!(matches!(
        within("host paired", session.next_event()).await,
        Some(HostEvent::Paired(_, None))
    ));
}

#[tokio::test]
async fn nobody_listening_at_peer_is_a_clear_error() {
    let code = JoinCode::generate_local().unwrap();
    // Bind then drop, so the port is very likely closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let err = join_lan(&code, LanTarget::Peer(addr), opts_join(local(7008)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--peer"), "{err}");
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

/// A child process killed on drop, with its stdout lines delivered through a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(ns: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(thru_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines: rx }
    }

    /// The next JSON event named `event`, skipping others.
    fn event(&self, event: &str) -> Value {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {event:?} event within {PATIENCE:?}"));
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == event {
                return v;
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lan_pairing_by_mdns_between_two_namespaces() {
    if Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP: `ip` (iproute2) is missing; cannot build the two-namespace LAN");
        return;
    }
    let tag = std::process::id();
    let a = Netns::new(format!("thru-lan-a-{tag}"));
    let b = Netns::new(format!("thru-lan-b-{tag}"));
    let (va, vb) = (format!("tla{tag}"), format!("tlb{tag}"));
    // Interface names are limited to 15 characters.
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    run(&[
        "ip", "link", "add", va, "netns", &a.0, "type", "veth", "peer", "name", vb, "netns", &b.0,
    ]);
    run(&["ip", "-n", &a.0, "addr", "add", "10.231.7.1/24", "dev", va]);
    run(&["ip", "-n", &b.0, "addr", "add", "10.231.7.2/24", "dev", vb]);
    run(&["ip", "-n", &a.0, "link", "set", va, "up"]);
    run(&["ip", "-n", &b.0, "link", "set", vb, "up"]);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hello.txt");
    std::fs::write(&file, b"hello over the LAN\n").unwrap();
    let host = Proc::spawn(
        &a.0,
        &[
            "host",
            "--json",
            "--max-receivers",
            "1",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let out = tempfile::tempdir().unwrap();
    let code = host.event("code");
    assert_eq!(code["mode"], "lan");
    let code = code["code"].as_str().unwrap().to_string();
    // The code travels through the environment, not argv.
    let joiner = Proc::spawn(
        &b.0,
        &[
            "join",
            "--json",
            "--yes",
            "--out",
            out.path().to_str().unwrap(),
        ],
        &[("THRU_CODE", code.as_str())],
    );
    let jp = joiner.event("peer");
    let hp = host.event("peer");
    assert_eq!(jp["rendezvous"], "lan_mdns", "{jp}");
    assert_eq!(jp["role"], "joiner");
    assert_eq!(hp["role"], "host");
    assert_eq!(
        jp["fingerprint"], hp["local_fingerprint"],
        "joiner pinned the host"
    );
    assert_eq!(
        hp["fingerprint"], jp["local_fingerprint"],
        "host knows the joiner"
    );
    let host_addrs: Vec<&str> = jp["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        host_addrs[0].starts_with("10.231.7.1:"),
        "the host's LAN address comes first: {host_addrs:?}"
    );
    // The file then crosses the LAN and both end successfully.
    for (p, who) in [(joiner, "joiner"), (host, "host")] {
        let mut p = p;
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                break st;
            }
            assert!(std::time::Instant::now() < deadline, "{who} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{who} exited with {status}");
    }
    assert_eq!(
        std::fs::read(out.path().join("hello.txt")).unwrap(),
        b"hello over the LAN\n"
    );
}

/// One raw guessing LAN joiner: true when the host replied to its hello (one password test).
/// It then hangs up, as a joiner whose check of the reply failed would.
async fn lan_guess(addr: SocketAddr, routing: String, i: usize) -> bool {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let guess: JoinCode = format!("{routing}-{:04}-0000", i).parse().unwrap();
    let (_, hello) = thru::pake::JoinerStart::start(&guess, local(7100), &mut rand::rngs::OsRng);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{}\n", hello.to_json()).as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
    line.contains("\"t\":\"reply\"")
}

#[tokio::test]
async fn lan_nine_concurrent_hellos_get_at_most_one_reply() {
    let mut opts = opts_host(local(7010));
    opts.max_receivers = 9;
    let mut session = host_lan(lan_host_config(), opts).await.unwrap();
    let addr = session.lan_addr().unwrap();
    let routing = session.code().routing().to_string();
    let guesses: Vec<_> = (0..9)
        .map(|i| tokio::spawn(lan_guess(addr, routing.clone(), i)))
        .collect();
    let mut replies = 0;
    for g in guesses {
        if within("guess", g).await.unwrap() {
            replies += 1;
        }
    }
    assert_eq!(replies, 1, "9 concurrent LAN hellos got {replies} replies");
    loop {
        match within("host event", session.next_event()).await {
            Some(HostEvent::Ended { error }) => {
                assert!(
                    matches!(error, Some(PairError::TooManyFailures(1))),
                    "{error:?}"
                );
                break;
            }
            Some(HostEvent::Paired(..)) => panic!("a guess paired"),
            Some(_) => {}
            None => panic!("no Ended"),
        }
    }
}
