//! NAT-lab matrix (issue 6): two real `ice-probe` processes in network namespaces built by
//! `tools/natlab/natlab.sh`, each case run five times; every run must connect over the
//! expected route and move 20 MiB byte-identical.
//!
//! Needs root, `ip`, `nft`, `turnserver` and `openssl` (ci/install.sh installs them); without
//! them each test prints `SKIP: reason` and passes. Cases run one at a time (a file lock, and
//! the `natlab` nextest group), each on its own freshly built lab that is torn down on drop.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const RUNS: usize = 5;
const SERVER: &str = "198.51.100.2";

fn natlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../natlab/natlab.sh")
}

/// A built lab; dropping it tears everything down (namespaces, coturn).
struct Lab {
    prefix: String,
    dir: PathBuf,
    _lock: File,
}

impl Lab {
    /// Builds the lab, or prints `SKIP: …` and returns `None` when this machine cannot.
    fn up(code: &str) -> Option<Self> {
        let check = Command::new("bash").arg(natlab()).arg("check").output();
        match check {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                println!("SKIP: {}", String::from_utf8_lossy(&o.stdout).trim());
                return None;
            }
            Err(e) => {
                println!("SKIP: cannot run bash: {e}");
                return None;
            }
        }
        // why: labs are heavy (14 namespaces, coturn, 20 MiB transfers) on a 2-core machine:
        // one at a time, across test processes too.
        let lock = File::create(std::env::temp_dir().join("thruflux-natlab-tests.lock")).unwrap();
        lock.lock().unwrap();
        let prefix = format!("{code}{:04}", std::process::id() % 10_000);
        let dir = std::env::temp_dir().join(format!("natlab-test-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Self {
            prefix,
            dir,
            _lock: lock,
        };
        // A lab left behind by a killed run with the same prefix (we hold the lock, so it is
        // not running).
        let _ = lab.natlab(&["down"]);
        let out = lab.natlab(&["up"]);
        assert!(out.status.success(), "natlab up failed: {out:?}");
        Some(lab)
    }

    fn natlab(&self, args: &[&str]) -> std::process::Output {
        let (sub, rest) = args.split_first().unwrap();
        Command::new("bash")
            .arg(natlab())
            .arg(sub)
            .args(["--prefix", &self.prefix, "--dir"])
            .arg(&self.dir)
            .args(rest)
            .output()
            .unwrap()
    }

    fn probe(&self, ns: &str, role: &str, ip: &str, xdir: &Path, extra: &[&str]) -> Probe {
        let (name, peer) = if role == "controlling" {
            ("a", "b")
        } else {
            ("b", "a")
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &format!("{}-{ns}", self.prefix)])
            .arg(env!("CARGO_BIN_EXE_ice-probe"))
            .args(["--role", role, "--bind", ip, "--name", name, "--peer", peer])
            .arg("--dir")
            .arg(xdir)
            .args(["--stun", &format!("{SERVER}:3478"), "--timeout", "40"])
            .arg("--turn-cert")
            .arg(self.dir.join("turn.der"))
            .args(extra)
            .env("RUST_LOG", "flux_ice=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                File::create(xdir.join(format!("{name}.log"))).unwrap(),
            ))
            .spawn()
            .unwrap();
        Probe(Some(child))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.natlab(&["down"]);
        if !out.status.success() {
            eprintln!("natlab down failed: {out:?}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A probe process, killed if the test ends (or panics) first.
struct Probe(Option<Child>);

impl Probe {
    fn result(mut self) -> serde_json::Value {
        let child = self.0.take().unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("{}");
        serde_json::from_str(line)
            .unwrap_or_else(|_| serde_json::json!({ "ok": false, "raw": text }))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One side of a case: namespace, its address, extra probe flags.
struct Side<'a> {
    ns: &'a str,
    ip: &'a str,
    extra: &'a [&'a str],
}

/// Runs a case `RUNS` times; returns each run's (controlling, controlled) results after
/// checking that both sides completed.
fn run_case(
    lab: &Lab,
    name: &str,
    a: &Side<'_>,
    b: &Side<'_>,
) -> Vec<(serde_json::Value, serde_json::Value)> {
    let mut results = Vec::new();
    for run in 1..=RUNS {
        let xdir = lab.dir.join(format!("{name}-{run}"));
        std::fs::create_dir_all(&xdir).unwrap();
        let started = Instant::now();
        let pa = lab.probe(a.ns, "controlling", a.ip, &xdir, a.extra);
        let pb = lab.probe(b.ns, "controlled", b.ip, &xdir, b.extra);
        let (ra, rb) = (pa.result(), pb.result());
        let logs = || {
            let read = |f: &str| std::fs::read_to_string(xdir.join(f)).unwrap_or_default();
            let tail = |s: String| s.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            format!(
                "--- a.log\n{}\n--- b.log\n{}\n--- a.txt\n{}\n--- b.txt\n{}",
                tail(read("a.log")),
                tail(read("b.log")),
                read("a.txt"),
                read("b.txt")
            )
        };
        assert_eq!(
            ra["ok"],
            true,
            "{name} run {run}: controlling: {ra}\n{}",
            logs()
        );
        assert_eq!(
            rb["ok"],
            true,
            "{name} run {run}: controlled: {rb}\n{}",
            logs()
        );
        assert_eq!(ra["bytes"], 20 * 1024 * 1024);
        println!(
            "{name} run {run}: route {} (a {}→{} {}, b {}→{} {}) connect {} ms / {} ms, {} Mbit/s, {} repairs, wall {:.1} s",
            ra["route"],
            ra["local"],
            ra["remote"],
            ra["transport"],
            rb["local"],
            rb["remote"],
            rb["transport"],
            ra["connect_ms"],
            rb["connect_ms"],
            ra["mbit_s"],
            ra["repairs"],
            started.elapsed().as_secs_f64()
        );
        results.push((ra, rb));
    }
    results
}

/// Every run took `route`, on the same pair in both directions. Connect times are printed by
/// [`run_case`], never asserted: they are measured as distributions by `flux-bench natlab`.
fn assert_route(results: &[(serde_json::Value, serde_json::Value)], route: &str) {
    for (a, b) in results {
        assert_eq!(a["route"], route, "controlling: {a}");
        assert_eq!(b["route"], route, "controlled: {b}");
        // Both directions on the same pair: a side sends from its relay exactly when the
        // other sends to a relayed address.
        let relay = |r: &serde_json::Value, k: &str| r[k] == "relay";
        assert_eq!(
            relay(a, "local"),
            relay(b, "remote"),
            "pair differs: {a} / {b}"
        );
        assert_eq!(
            relay(a, "remote"),
            relay(b, "local"),
            "pair differs: {a} / {b}"
        );
        for r in [a, b] {
            assert!(r["connect_ms"].is_u64(), "no connect time reported: {r}");
        }
    }
}

const TURN_UDP: &str = "udp:198.51.100.2:3478";

#[test]
fn natlab_same_lan_uses_host_candidates() {
    let Some(lab) = Lab::up("ln") else { return };
    let r = run_case(
        &lab,
        "same-lan",
        &Side {
            ns: "lan1",
            ip: "10.0.9.2",
            extra: &["--turn", TURN_UDP],
        },
        &Side {
            ns: "lan2",
            ip: "10.0.9.3",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "host");
    for (a, _) in &r {
        assert_eq!(a["local"], "host");
        assert_eq!(a["remote"], "host");
    }
}

#[test]
fn natlab_cone_to_cone_hole_punches_without_relay() {
    let Some(lab) = Lab::up("cc") else { return };
    // A relay is available to both and must not be chosen.
    let r = run_case(
        &lab,
        "cone-cone",
        &Side {
            ns: "cone1",
            ip: "10.0.1.2",
            extra: &["--turn", TURN_UDP],
        },
        &Side {
            ns: "cone2",
            ip: "10.0.2.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "srflx");
}

/// Relayed, by design of the lab's NATs: the cone router filters by address and port
/// (port-restricted), and the symmetric router gives each destination a new random port.
/// The symmetric side's mapping towards the cone side is unknown until its packet arrives,
/// and that packet is dropped because the cone side never sent to that exact port; the cone
/// side's packets to the symmetric side's server-reflexive port are dropped because that
/// mapping belongs to the STUN server. So no direct pair can succeed and the relay (the
/// symmetric side's allocation) carries the data.
#[test]
fn natlab_cone_to_symmetric_relays() {
    let Some(lab) = Lab::up("cs") else { return };
    let r = run_case(
        &lab,
        "cone-sym",
        &Side {
            ns: "cone1",
            ip: "10.0.1.2",
            extra: &["--turn", TURN_UDP],
        },
        &Side {
            ns: "sym2",
            ip: "10.0.4.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "relay");
}

#[test]
fn natlab_symmetric_to_symmetric_relays_through_turn() {
    let Some(lab) = Lab::up("ss") else { return };
    let r = run_case(
        &lab,
        "sym-sym",
        &Side {
            ns: "sym1",
            ip: "10.0.3.2",
            extra: &["--turn", TURN_UDP],
        },
        &Side {
            ns: "sym2",
            ip: "10.0.4.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "relay");
}

/// The `fw` network lets only TCP 443 out: its probe reaches coturn over TLS on 443.
#[test]
fn natlab_udp_blocked_relays_over_tls_443() {
    let Some(lab) = Lab::up("fw") else { return };
    let r = run_case(
        &lab,
        "udp-blocked-tls",
        &Side {
            ns: "fw",
            ip: "10.0.5.2",
            extra: &["--turn", "tls:198.51.100.2:443", "--turn", TURN_UDP],
        },
        &Side {
            ns: "cone2",
            ip: "10.0.2.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "relay");
    for (a, _) in &r {
        assert_eq!(a["local"], "relay", "the blocked side must relay: {a}");
        assert_eq!(a["transport"], "tls");
    }
}

/// TURN over plain TCP (coturn's TCP listener on 3478) from a symmetric NAT.
#[test]
fn natlab_turn_over_tcp() {
    let Some(lab) = Lab::up("tc") else { return };
    let r = run_case(
        &lab,
        "turn-tcp",
        &Side {
            ns: "sym1",
            ip: "10.0.3.2",
            extra: &["--turn", "tcp:198.51.100.2:3478"],
        },
        &Side {
            ns: "sym2",
            ip: "10.0.4.2",
            extra: &[],
        },
    );
    assert_route(&r, "relay");
    for (a, _) in &r {
        assert_eq!(a["local"], "relay");
        assert_eq!(a["transport"], "tcp");
    }
}

#[test]
fn natlab_two_percent_loss_completes_intact() {
    let Some(lab) = Lab::up("ls") else { return };
    let out = lab.natlab(&["loss", "rcone1", "2"]);
    assert!(out.status.success(), "{out:?}");
    let r = run_case(
        &lab,
        "loss-2pct",
        &Side {
            ns: "cone1",
            ip: "10.0.1.2",
            extra: &["--turn", TURN_UDP],
        },
        &Side {
            ns: "cone2",
            ip: "10.0.2.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "srflx");
    for (a, _) in &r {
        // Loss happened and was repaired; the receiver checked every byte.
        assert!(a["repairs"].as_u64().unwrap() > 0, "{a}");
    }
}

/// Wrong TURN password on one side: its allocation is refused (logged), and the pair still
/// relays through the other side's allocation.
#[test]
fn natlab_bad_turn_credentials_on_one_side_still_relays() {
    let Some(lab) = Lab::up("bc") else { return };
    let r = run_case(
        &lab,
        "bad-turn-creds",
        &Side {
            ns: "sym1",
            ip: "10.0.3.2",
            extra: &["--turn", TURN_UDP, "--turn-pass", "wrong"],
        },
        &Side {
            ns: "sym2",
            ip: "10.0.4.2",
            extra: &["--turn", TURN_UDP],
        },
    );
    assert_route(&r, "relay");
    for (a, b) in &r {
        assert_ne!(a["local"], "relay", "{a}");
        assert_eq!(b["local"], "relay", "{b}");
    }
}

/// Symmetric on both sides and no TURN: nothing can work, and both sides say so with the
/// cause, within the connect time-out, instead of hanging.
#[test]
fn natlab_symmetric_without_turn_fails_with_the_cause() {
    let Some(lab) = Lab::up("nf") else { return };
    let xdir = lab.dir.join("no-turn");
    std::fs::create_dir_all(&xdir).unwrap();
    let started = Instant::now();
    let pa = lab.probe(
        "sym1",
        "controlling",
        "10.0.3.2",
        &xdir,
        &["--connect-timeout", "4"],
    );
    let pb = lab.probe(
        "sym2",
        "controlled",
        "10.0.4.2",
        &xdir,
        &["--connect-timeout", "4"],
    );
    for r in [pa.result(), pb.result()] {
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.starts_with("failed to establish ICE connection: no candidate pair succeeded"),
            "{e}"
        );
    }
    let took = started.elapsed();
    println!("no-turn: both sides failed with the cause after {took:?}");
    // A hang guard, not a timing check: both sides give up after their 4 s connect time-out
    // (about 5 s with start-up); 60 s is over 10× that.
    assert!(took.as_secs() < 60, "still running after {took:?}: hung?");
}
