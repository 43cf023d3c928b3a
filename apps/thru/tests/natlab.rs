//! NAT-lab matrix with the real binaries: `thruserv` in the lab's public network (TCP 443 on
//! 198.51.100.3, reachable from every lab network), `thru host`
//! behind one NAT and `thru join` behind another (namespaces built by
//! `tools/natlab/natlab.sh`), pairing through the server with STUN and TURN (coturn) from the
//! lab. Each case runs five times; every run must move an 8 MiB file byte-identical, both
//! processes must exit 0, and both sides' `--json` summary must report the expected path
//! (`path.kind`: `host`, `srflx` or `relay`). Each run prints its route, connect time
//! (`path.connect_ms`, pairing done → pair selected, host / joiner) and the joiner's
//! `--benchmark` rate.
//!
//! Needs root, `ip`, `nft`, `turnserver` and `openssl` (ci/install.sh installs them); without
//! them each test prints `SKIP: reason` and passes. Cases run one at a time, also against the
//! `ice-probe` lab tests (the same lock file, and the `natlab` nextest group), each on its own
//! freshly built lab that is torn down on drop. A `thru` process that runs longer than
//! [`PROC_LIMIT`] is killed and the run fails with both sides' logs.
//!
//! ```bash
//! sudo cargo test -p thru --test natlab -- --nocapture --test-threads 1
//! ```
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const RUNS: usize = 5;
/// coturn (STUN and TURN) in the `wan` namespace.
const SERVER: &str = "198.51.100.2";
/// Where `thruserv` listens in the `wan` namespace: TCP 443 on the lab's second server
/// address, because the `fw` network reaches nothing but TCP 443 (and coturn's TLS listener
/// holds 443 on `SERVER`). Every case uses it, so all cases pair the same way.
const SIGNAL: &str = "198.51.100.3";
const SIGNAL_PORT: u16 = 443;
const FILE_BYTES: usize = 8 << 20;
/// Longest a `thru` process may run before it is killed and the run fails.
const PROC_LIMIT: Duration = Duration::from_secs(60);
/// Longest the host may take to print its join code (it has reached `thruserv` then).
const CODE_LIMIT: Duration = Duration::from_secs(20);

fn natlab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/natlab/natlab.sh")
}

/// The lab lock: `flock(2)` on the file `tools/ice-probe/tests/natlab.rs` locks with
/// `File::lock`, so these tests and those never build labs at the same time. Held by a
/// `flock(1)` child (`File::lock` is newer than this package's minimum Rust) until dropped,
/// or until this process dies and the child reads end of file.
struct LabLock(Child);

impl LabLock {
    fn take() -> Self {
        let mut child = Command::new("flock")
            .arg("-o")
            .arg(std::env::temp_dir().join("thruflux-natlab-tests.lock"))
            .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run flock(1)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "flock(1) failed");
        Self(child)
    }
}

impl Drop for LabLock {
    fn drop(&mut self) {
        // End of file on its stdin ends `cat`, then `flock` exits and the lock is released.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A built lab; dropping it tears everything down (namespaces, coturn).
struct Lab {
    prefix: String,
    dir: PathBuf,
    _lock: LabLock,
}

impl Lab {
    /// Builds the lab, or prints `SKIP: …` and returns `None` when this machine cannot.
    fn up(code: &str) -> Option<Self> {
        match Command::new("bash").arg(natlab_sh()).arg("check").output() {
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
        if Command::new("flock").arg("--version").output().is_err() {
            println!("SKIP: flock(1) not installed");
            return None;
        }
        // why: a lab is 14 namespaces and coturn on a 2-core machine, and connect times are
        // part of what is printed: one lab at a time, across test processes too.
        let lock = LabLock::take();
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
            .arg(natlab_sh())
            .arg(sub)
            .args(["--prefix", &self.prefix, "--dir"])
            .arg(&self.dir)
            .args(rest)
            .output()
            .unwrap()
    }

    /// A command run inside the lab namespace `name`.
    fn exec(&self, name: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{name}", self.prefix)])
            .arg(program);
        c
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

/// `thruserv` in the lab's `wan` namespace on `SIGNAL:SIGNAL_PORT`; killed on drop (before
/// the lab goes: declare it after the [`Lab`]).
struct Signal(Child);

impl Signal {
    fn start(lab: &Lab) -> Self {
        let log = File::create(lab.dir.join("thruserv.log")).unwrap();
        let mut child = lab
            .exec("wan", &common::thruserv_bin())
            .args(["--bind", SIGNAL, "--port", &SIGNAL_PORT.to_string()])
            // Every run pairs from the same router addresses: lift the per-IP budgets.
            .args([
                "--ws-connects-per-min",
                "0",
                "--session-creates-per-min",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let signal = Self(child);
        assert!(
            line.starts_with(&format!("listening on {SIGNAL}:{SIGNAL_PORT}")),
            "thruserv did not start in the wan namespace: {line:?}\n{}",
            std::fs::read_to_string(lab.dir.join("thruserv.log")).unwrap_or_default()
        );
        signal
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a side reaches the TURN server.
#[derive(Clone, Copy)]
enum Turn {
    /// `turn:` over UDP 3478.
    Udp,
    /// `turns:` over TLS 443, pinning the lab's self-signed certificate (`--turn-cert`).
    Tls,
    /// No TURN server: only the peer's relay can carry a relayed path.
    None,
}

/// One side of a case: its namespace and TURN transport.
#[derive(Clone, Copy)]
struct Side {
    ns: &'static str,
    turn: Turn,
}

const fn udp(ns: &'static str) -> Side {
    Side {
        ns,
        turn: Turn::Udp,
    }
}

/// The flags both `thru host` and `thru join` take in the lab.
fn net_flags(lab: &Lab, side: Side) -> Vec<String> {
    let mut v: Vec<String> = [
        "--json",
        "--verbose",
        "--server",
        &format!("ws://{SIGNAL}:{SIGNAL_PORT}"),
        "--stun-server",
        &format!("stun:{SERVER}:3478"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match side.turn {
        Turn::None => {}
        Turn::Udp => {
            v.push("--turn-server".into());
            v.push(format!("turn:flux:fluxpass@{SERVER}:3478"));
        }
        Turn::Tls => {
            v.push("--turn-server".into());
            v.push(format!("turns:flux:fluxpass@{SERVER}:443"));
            v.push("--turn-cert".into());
            v.push(lab.dir.join("turn.der").display().to_string());
        }
    }
    v
}

/// A `thru` process in a lab namespace: its stdout JSON lines read on a thread, stderr (the
/// `--verbose` log) in a file; killed on drop.
struct Thru {
    role: &'static str,
    child: Child,
    started: Instant,
    lines: mpsc::Receiver<String>,
    events: Vec<Value>,
    stderr: PathBuf,
}

impl Thru {
    fn spawn(lab: &Lab, role: &'static str, ns: &str, args: &[String], stderr: PathBuf) -> Self {
        let mut child = lab
            .exec(ns, Path::new(env!("CARGO_BIN_EXE_thru")))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            role,
            child,
            started: Instant::now(),
            lines,
            events: Vec::new(),
            stderr,
        }
    }

    fn record(&mut self, line: &str) -> Value {
        let v = serde_json::from_str(line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
        self.events.push(v.clone());
        v
    }

    /// The first (further) event named `name`, waiting at most until `until`.
    fn event(&mut self, name: &str, until: Instant) -> Option<Value> {
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let v = self.record(&line);
            if v["event"] == name {
                return Some(v);
            }
        }
    }

    /// Waits for the exit (killing the process once it has run [`PROC_LIMIT`]) and reads
    /// the rest of its output. `Err` when it had to be killed.
    fn finish(&mut self) -> Result<i32, String> {
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break Ok(st.code().unwrap_or(-1));
            }
            if self.started.elapsed() > PROC_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break Err(format!(
                    "{} still running after {PROC_LIMIT:?}: killed",
                    self.role
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.record(&line);
        }
        code
    }

    /// The last event named `name`.
    fn last(&self, name: &str) -> Option<&Value> {
        self.events.iter().rev().find(|v| v["event"] == name)
    }

    /// Its events and the end of its log, for a failure message.
    fn report(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        let events: Vec<String> = self
            .events
            .iter()
            .filter(|v| v["event"] != "progress")
            .map(Value::to_string)
            .collect();
        format!(
            "--- {} events\n{}\n--- {} stderr (last {} of {} lines, {})\n{}",
            self.role,
            events.join("\n"),
            self.role,
            tail.len(),
            lines.len(),
            self.stderr.display(),
            tail.join("\n")
        )
    }
}

impl Drop for Thru {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A case: host on the first-named side, joiner on the second, and the `path.kind` both
/// must report.
struct Case {
    name: &'static str,
    host: Side,
    joiner: Side,
    kind: &'static str,
    /// The host's `--quic` (the joiner stays at `auto` and must take it), and the runs.
    quic: Quic,
}

/// The QUIC stack a case runs and how many times.
#[derive(Clone, Copy)]
struct Quic {
    stack: &'static str,
    runs: usize,
}

/// The default stack, [`RUNS`] times.
const QUINN: Quic = Quic {
    stack: "quinn",
    runs: RUNS,
};

/// s2n-quic: three runs (the stack's own cases; the NAT behaviour is the lab's and is run
/// five times over quinn).
const S2N: Quic = Quic {
    stack: "s2n",
    runs: 3,
};

/// What one run reported, for the per-case checks.
struct Run {
    host: Value,
    joiner: Value,
}

/// The `route` of the summary that goes with a `path.kind`.
fn route_for(kind: &str) -> &'static str {
    match kind {
        "host" => "lan_direct",
        "srflx" => "hole_punched",
        _ => "relayed",
    }
}

/// A source file of random bytes.
fn source(dir: &Path) -> PathBuf {
    let p = dir.join("payload.bin");
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    let mut buf = vec![0u8; FILE_BYTES];
    blake3::Hasher::new_keyed(&seed)
        .finalize_xof()
        .fill(&mut buf);
    File::create(&p).unwrap().write_all(&buf).unwrap();
    p
}

/// Runs `case` [`RUNS`] times in `lab` (with `thruserv` up); every run must pass.
fn run_case(lab: &Lab, case: &Case) -> Vec<Run> {
    let src = source(&lab.dir);
    let want = std::fs::read(&src).unwrap();
    let mut runs = Vec::new();
    for n in 1..=case.quic.runs {
        let rdir = lab.dir.join(format!("{}-{n}", case.name));
        let out = rdir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let wall = Instant::now();

        let mut args: Vec<String> = vec!["host".into(), src.display().to_string()];
        args.extend(["--max-receivers".into(), "1".into()]);
        args.extend(["--quic".into(), case.quic.stack.into()]);
        args.extend(net_flags(lab, case.host));
        let mut host = Thru::spawn(lab, "host", case.host.ns, &args, rdir.join("host.log"));
        let Some(code) = host.event("code", Instant::now() + CODE_LIMIT) else {
            let exited = host.child.try_wait().unwrap();
            let _ = host.child.kill();
            let _ = host.finish();
            panic!(
                "{} run {n}: the host printed no join code ({}; thruserv unreachable from \
                 {}?)\n{}",
                case.name,
                exited.map_or(format!("nothing within {CODE_LIMIT:?}"), |st| format!(
                    "exited with {st}"
                )),
                case.host.ns,
                host.report()
            );
        };
        let code = code["code"].as_str().unwrap().to_string();

        let mut args: Vec<String> = vec![
            "join".into(),
            code.clone(),
            "--out".into(),
            out.display().to_string(),
            "--yes".into(),
            "--benchmark".into(),
        ];
        args.extend(net_flags(lab, case.joiner));
        let mut joiner = Thru::spawn(lab, "joiner", case.joiner.ns, &args, rdir.join("join.log"));

        let jexit = joiner.finish();
        let hexit = host.finish();
        let fail = |what: String, host: &Thru, joiner: &Thru| -> ! {
            panic!(
                "{} run {n} (code {code}): {what}\n{}\n{}",
                case.name,
                host.report(),
                joiner.report()
            )
        };
        // Progress up to pairing, so a failure further on says how far it got.
        let paired = (host.last("peer").is_some(), joiner.last("peer").is_some());
        match (&hexit, &jexit) {
            (Ok(0), Ok(0)) => {}
            _ => fail(
                format!(
                    "host exit {hexit:?}, joiner exit {jexit:?} (paired: host {}, joiner {})",
                    paired.0, paired.1
                ),
                &host,
                &joiner,
            ),
        }
        let got = std::fs::read(out.join("payload.bin")).unwrap_or_default();
        if got != want {
            fail(
                format!(
                    "received {} bytes, not the source's {}",
                    got.len(),
                    want.len()
                ),
                &host,
                &joiner,
            );
        }
        for side in [&host, &joiner] {
            if side.last("route").is_none() {
                fail(format!("{}: no route event", side.role), &host, &joiner);
            }
            let Some(s) = side.last("summary") else {
                fail(format!("{}: no summary", side.role), &host, &joiner)
            };
            let path = &s["path"];
            if path["kind"] != case.kind || s["route"] != route_for(case.kind) {
                fail(
                    format!(
                        "{}: route {} path {path}, expected kind {:?} ({})",
                        side.role,
                        s["route"],
                        case.kind,
                        route_for(case.kind)
                    ),
                    &host,
                    &joiner,
                );
            }
            if !path["connect_ms"].is_number() {
                fail(
                    format!("{}: no path.connect_ms: {s}", side.role),
                    &host,
                    &joiner,
                );
            }
        }
        let Some(bench) = joiner.last("benchmark") else {
            fail("joiner: no benchmark event".into(), &host, &joiner)
        };
        if bench["quic"] != case.quic.stack {
            fail(
                format!(
                    "joiner ran QUIC {}, the host {}",
                    bench["quic"], case.quic.stack
                ),
                &host,
                &joiner,
            );
        }
        if bench["path"]["kind"] != case.kind {
            fail(
                format!("joiner benchmark path {}", bench["path"]),
                &host,
                &joiner,
            );
        }
        let (hs, js) = (
            host.last("summary").unwrap(),
            joiner.last("summary").unwrap(),
        );
        let p = |s: &Value| {
            let p = &s["path"];
            format!(
                "{}→{} {} {}",
                p["local"].as_str().unwrap_or("?"),
                p["remote"].as_str().unwrap_or("?"),
                p["transport"].as_str().unwrap_or("?"),
                p["family"].as_str().unwrap_or("?")
            )
        };
        println!(
            "{} run {n}: route {} (host {}, joiner {}), connect {} / {} ms, {:.0} Mbit/s, wall {:.1} s",
            case.name,
            js["route"].as_str().unwrap_or("?"),
            p(hs),
            p(js),
            ms(&hs["path"]["connect_ms"]),
            ms(&js["path"]["connect_ms"]),
            bench["avg_gbit_s"].as_f64().unwrap_or(0.0) * 1000.0,
            wall.elapsed().as_secs_f64()
        );
        runs.push(Run {
            host: hs.clone(),
            joiner: js.clone(),
        });
        let _ = std::fs::remove_dir_all(&out);
    }
    runs
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or("?".into(), |x| format!("{x:.0}"))
}

/// Builds a lab, starts `thruserv` in it and runs `case`; `None` when skipped.
fn lab_case(code: &str, case: &Case, prepare: impl FnOnce(&Lab)) -> Option<Vec<Run>> {
    let lab = Lab::up(code)?;
    prepare(&lab);
    let _signal = Signal::start(&lab);
    Some(run_case(&lab, case))
}

#[test]
fn natlab_thru_same_lan_goes_direct_on_host_candidates() {
    lab_case(
        "hl",
        &Case {
            name: "same-lan",
            host: udp("lan1"),
            joiner: udp("lan2"),
            kind: "host",
            quic: QUINN,
        },
        |_| {},
    );
}

/// Hole-punched: both routers are port-preserving cones, so each side's server-reflexive
/// address is where the other can reach it once both have sent. TURN is configured on both
/// sides and must not be chosen.
#[test]
fn natlab_thru_cone_to_cone_hole_punches() {
    lab_case(
        "hc",
        &Case {
            name: "cone-cone",
            host: udp("cone1"),
            joiner: udp("cone2"),
            kind: "srflx",
            quic: QUINN,
        },
        |_| {},
    );
}

/// Relayed, by design of the lab's NATs: the cone router filters by address and port
/// (port-restricted), and the symmetric router gives each destination a new random port. The
/// symmetric side's mapping towards the cone side is unknown until its packet arrives, and
/// that packet is dropped because the cone side never sent to that exact port; the cone
/// side's packets to the symmetric side's server-reflexive port are dropped because that
/// mapping belongs to the STUN server. No direct pair can succeed, so TURN carries it.
#[test]
fn natlab_thru_cone_to_symmetric_relays() {
    lab_case(
        "hx",
        &Case {
            name: "cone-sym",
            host: udp("cone1"),
            joiner: udp("sym2"),
            kind: "relay",
            quic: QUINN,
        },
        |_| {},
    );
}

/// Neither symmetric mapping is predictable: relayed.
#[test]
fn natlab_thru_symmetric_to_symmetric_relays() {
    lab_case(
        "hs",
        &Case {
            name: "sym-sym",
            host: udp("sym1"),
            joiner: udp("sym2"),
            kind: "relay",
            quic: QUINN,
        },
        |_| {},
    );
}

/// Only TCP 443 leaves `fw`: its `thru` reaches coturn with `turns:` on 443 (pinning the
/// lab's certificate) and sends from its relay over TLS.
#[test]
fn natlab_thru_udp_blocked_relays_over_tls_443() {
    udp_blocked("hf", QUINN);
}

fn udp_blocked(code: &str, quic: Quic) {
    let Some(runs) = lab_case(
        code,
        &Case {
            name: "udp-blocked",
            host: Side {
                ns: "fw",
                turn: Turn::Tls,
            },
            joiner: udp("cone2"),
            kind: "relay",
            quic,
        },
        |_| {},
    ) else {
        return;
    };
    for r in &runs {
        assert_eq!(r.host["path"]["local"], "relay", "fw side: {}", r.host);
        assert_eq!(r.host["path"]["transport"], "tls", "fw side: {}", r.host);
        assert_eq!(
            r.joiner["path"]["remote"], "relay",
            "cone side: {}",
            r.joiner
        );
    }
}

/// The cases that involve the QUIC stack's own path handling (hole-punched, relayed over UDP
/// TURN, relayed over TURN/TLS 443) run with `--quic s2n` on the host; the joiner, at `auto`,
/// takes it from pairing.
#[test]
fn natlab_thru_s2n_cone_to_cone_hole_punches() {
    lab_case(
        "sc",
        &Case {
            name: "s2n-cone-cone",
            host: udp("cone1"),
            joiner: udp("cone2"),
            kind: "srflx",
            quic: S2N,
        },
        |_| {},
    );
}

#[test]
fn natlab_thru_s2n_symmetric_to_symmetric_relays() {
    lab_case(
        "ss",
        &Case {
            name: "s2n-sym-sym",
            host: udp("sym1"),
            joiner: udp("sym2"),
            kind: "relay",
            quic: S2N,
        },
        |_| {},
    );
}

#[test]
fn natlab_thru_s2n_udp_blocked_relays_over_tls_443() {
    udp_blocked("sf", S2N);
}

/// 2% random drop on rcone1 (both directions, signaling included): still hole-punched, and
/// QUIC repairs the loss so the copy is byte-identical.
#[test]
fn natlab_thru_two_percent_loss_completes_intact() {
    lab_case(
        "hp",
        &Case {
            name: "loss-2pct",
            host: udp("cone1"),
            joiner: udp("cone2"),
            kind: "srflx",
            quic: QUINN,
        },
        |lab| {
            let out = lab.natlab(&["loss", "rcone1", "2"]);
            assert!(out.status.success(), "natlab loss: {out:?}");
        },
    );
}

/// Two joiners at once, both behind NATs no direct pair crosses (symmetric, and cone against
/// the symmetric host), and neither with a TURN server of its own: both transfers must run
/// through the host's relays. The host's socket can hold one TURN allocation over UDP
/// (coturn refuses a second from the same 5-tuple), so the second joiner's relay must come
/// over TCP to the same server.
#[test]
fn natlab_thru_two_relayed_joiners_at_once_share_the_hosts_turn_server() {
    two_relayed_joiners("h2", QUINN);
}

/// The same over s2n-quic: one endpoint, two connections, each relayed a different way.
#[test]
fn natlab_thru_s2n_two_relayed_joiners_at_once_share_the_hosts_turn_server() {
    two_relayed_joiners("s2", S2N);
}

fn two_relayed_joiners(code: &str, quic: Quic) {
    let Some(lab) = Lab::up(code) else { return };
    let _signal = Signal::start(&lab);
    let src = source(&lab.dir);
    let want = std::fs::read(&src).unwrap();
    for n in 1..=quic.runs {
        let rdir = lab.dir.join(format!("two-joiners-{n}"));
        std::fs::create_dir_all(&rdir).unwrap();
        let mut args: Vec<String> = vec!["host".into(), src.display().to_string()];
        args.extend(["--max-receivers".into(), "2".into()]);
        args.extend(["--quic".into(), quic.stack.into()]);
        args.extend(net_flags(&lab, udp("sym1")));
        let mut host = Thru::spawn(&lab, "host", "sym1", &args, rdir.join("host.log"));
        let code = host
            .event("code", Instant::now() + CODE_LIMIT)
            .unwrap_or_else(|| panic!("run {n}: no join code\n{}", host.report()));
        let code = code["code"].as_str().unwrap().to_string();
        let no_turn = |ns| Side {
            ns,
            turn: Turn::None,
        };
        let mut joiners: Vec<(Thru, PathBuf)> = ["sym2", "cone1"]
            .into_iter()
            .map(|ns| {
                let out = rdir.join(format!("out-{ns}"));
                std::fs::create_dir_all(&out).unwrap();
                let mut args: Vec<String> = vec![
                    "join".into(),
                    code.clone(),
                    "--out".into(),
                    out.display().to_string(),
                    "--yes".into(),
                    "--benchmark".into(),
                ];
                args.extend(net_flags(&lab, no_turn(ns)));
                let log = rdir.join(format!("join-{ns}.log"));
                (Thru::spawn(&lab, "joiner", ns, &args, log), out)
            })
            .collect();
        let exits: Vec<_> = joiners.iter_mut().map(|(j, _)| j.finish()).collect();
        let hexit = host.finish();
        let report = || {
            let mut r = host.report();
            for (j, _) in &joiners {
                r.push('\n');
                r.push_str(&j.report());
            }
            r
        };
        assert!(
            hexit == Ok(0) && exits.iter().all(|e| *e == Ok(0)),
            "run {n}: host {hexit:?}, joiners {exits:?}\n{}",
            report()
        );
        for (j, out) in &joiners {
            let got = std::fs::read(out.join("payload.bin")).unwrap();
            assert!(got == want, "run {n}: a joiner's copy differs");
            let path = &j.last("summary").expect("joiner summary")["path"];
            assert_eq!(path["kind"], "relay", "run {n}: {}", report());
            assert_eq!(
                path["remote"], "relay",
                "run {n}: relayed by the host: {path}"
            );
            let bench = j.last("benchmark").expect("joiner benchmark");
            assert_eq!(bench["quic"], quic.stack, "run {n}: {bench}");
        }
        let mut transports: Vec<String> = host
            .events
            .iter()
            .filter(|v| v["event"] == "summary")
            .map(|v| v["path"]["transport"].as_str().unwrap_or("?").to_string())
            .collect();
        transports.sort();
        assert_eq!(
            transports,
            ["tcp", "udp"],
            "run {n}: the host relays one joiner over UDP, the other over TCP\n{}",
            report()
        );
        println!("two-joiners run {n}: host relays over {transports:?}");
    }
}

/// Only the host has a TURN server (the joiner has none): the path must run from the host's
/// own relay, QUIC framed in ChannelData on the engine's socket.
#[test]
fn natlab_thru_symmetric_pair_relays_through_the_hosts_own_turn_allocation() {
    let Some(runs) = lab_case(
        "ho",
        &Case {
            name: "sym-sym-host-relay",
            host: udp("sym1"),
            joiner: Side {
                ns: "sym2",
                turn: Turn::None,
            },
            kind: "relay",
            quic: QUINN,
        },
        |_| {},
    ) else {
        return;
    };
    for r in &runs {
        assert_eq!(r.host["path"]["local"], "relay", "{}", r.host);
        assert_eq!(r.joiner["path"]["remote"], "relay", "{}", r.joiner);
    }
}
