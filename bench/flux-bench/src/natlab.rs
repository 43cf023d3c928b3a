//! `flux-bench natlab`: real `thru host` / `thru join --benchmark` pairs across the NAT lab
//! (`tools/natlab/natlab.sh`: namespaces, kernel NAT, coturn), with `thruserv` in the lab's
//! public network. One row per case: the route ICE selected (`path.kind` and the TURN
//! transport), the connect time (`path.connect_ms`: pairing done → pair selected) and the
//! joiner's `--benchmark` rate, median of a few runs; every run's copy is checked against the
//! source (BLAKE3). The lab is built once for all cases and torn down at the end.
//!
//! Needs root and what `natlab.sh check` checks, and `thru` / `thruserv` binaries (by default
//! next to this one: `cargo build --release -p thru -p thruserv -p flux-bench`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::Value;

/// coturn (STUN and TURN) in the lab's public network.
const SERVER: &str = "198.51.100.2";
/// `thruserv`: TCP 443 on the lab's second server address, the only port the `fw` network
/// reaches (coturn's TLS listener holds 443 on `SERVER`).
const SIGNAL: &str = "198.51.100.3";
const SIGNAL_PORT: u16 = 443;

#[derive(Parser, Clone)]
pub struct NatlabArgs {
    /// Cases to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lan,cone-cone,cone-sym,sym-sym,udp-blocked,loss"
    )]
    cases: Vec<Case>,
    /// Runs per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// File size, e.g. 64MiB (relayed cases go through coturn: keep it modest).
    #[arg(long, default_value = "64MiB", value_parser = super::parse_size)]
    size: u64,
    /// Directory for the source file, received copies and logs.
    #[arg(long, default_value = "/var/tmp/flux-bench")]
    dir: PathBuf,
    /// The `thru` binary (default: next to this executable).
    #[arg(long)]
    thru: Option<PathBuf>,
    /// The `thruserv` binary (default: next to this executable).
    #[arg(long)]
    thruserv: Option<PathBuf>,
    /// The lab script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/natlab/natlab.sh"))]
    natlab: PathBuf,
    /// Lab namespace prefix (at most 6 characters).
    #[arg(long, default_value = "fbnl")]
    prefix: String,
    /// Kill a `thru` process that runs longer than this many seconds (the run fails).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One NAT-lab case: host on the first-named peer, joiner on the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Case {
    /// lan1 ↔ lan2 behind one router: host candidates.
    Lan,
    /// cone1 ↔ cone2: hole-punched (server-reflexive).
    ConeCone,
    /// cone1 ↔ sym2: relayed (port-restricted filtering meets a random port).
    ConeSym,
    /// sym1 ↔ sym2: relayed.
    SymSym,
    /// fw (only TCP 443 out; TURN over TLS) ↔ cone2: relayed over TLS.
    UdpBlocked,
    /// cone1 ↔ cone2 with 2% random drop on rcone1.
    Loss,
    /// cone1 ↔ cone2 with 10% random drop on rcone1.
    Loss10,
}

impl Case {
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Self::Lan => ("lan1", "lan2"),
            Self::ConeCone | Self::Loss | Self::Loss10 => ("cone1", "cone2"),
            Self::ConeSym => ("cone1", "sym2"),
            Self::SymSym => ("sym1", "sym2"),
            Self::UdpBlocked => ("fw", "cone2"),
        }
    }

    /// The `path.kind` the lab's design makes ICE select.
    fn expected_kind(self) -> &'static str {
        match self {
            Self::Lan => "host",
            Self::ConeCone | Self::Loss | Self::Loss10 => "srflx",
            Self::ConeSym | Self::SymSym | Self::UdpBlocked => "relay",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Lan => "same LAN (lan1 ↔ lan2)",
            Self::ConeCone => "cone ↔ cone",
            Self::ConeSym => "cone ↔ symmetric",
            Self::SymSym => "symmetric ↔ symmetric",
            Self::UdpBlocked => "UDP blocked, TURN TLS 443 ↔ cone",
            Self::Loss => "cone ↔ cone, 2% loss on rcone1",
            Self::Loss10 => "cone ↔ cone, 10% loss on rcone1",
        }
    }

    /// Random drop (percent) on rcone1 for this case.
    fn loss_pct(self) -> Option<u32> {
        match self {
            Self::Loss => Some(2),
            Self::Loss10 => Some(10),
            _ => None,
        }
    }
}

/// One measured `thru` transfer.
#[derive(Debug, Serialize)]
struct NatRun {
    gbit_s: f64,
    /// `route` of the joiner's summary (`lan_direct`, `hole_punched`, `relayed`).
    route: String,
    /// The host's and the joiner's `path` objects from their summaries.
    host_path: Value,
    joiner_path: Value,
    /// `path.connect_ms` (pairing done → pair selected), host / joiner.
    host_connect_ms: Option<f64>,
    joiner_connect_ms: Option<f64>,
    rtt_ms: Option<f64>,
    loss_pct: Option<f64>,
    wall_s: f64,
}

#[derive(Debug, Serialize)]
struct NatRow {
    case: Case,
    label: String,
    expected_kind: &'static str,
    skipped: Option<String>,
    runs: Vec<NatRun>,
    median_gbit_s: Option<f64>,
    median_connect_ms: Option<f64>,
    /// Connect time over all runs (the later side's `path.connect_ms`).
    connect_ms: Option<Quantiles>,
    /// Runs that failed (each is reported; the case goes on).
    failed: usize,
}

/// p50 / p90 / max of a sample (nearest rank).
#[derive(Clone, Copy, Debug, Serialize)]
struct Quantiles {
    n: usize,
    p50: f64,
    p90: f64,
    max: f64,
}

impl Quantiles {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            n: v.len(),
            p50: rank(0.5),
            p90: rank(0.9),
            max: v[v.len() - 1],
        })
    }
}

#[derive(Debug, Serialize)]
struct NatMatrix {
    size_bytes: u64,
    path: String,
    cores: usize,
    kernel: String,
    rows: Vec<NatRow>,
}

pub fn run(a: &NatlabArgs) -> Result<()> {
    let here = std::env::current_exe()?;
    let bin_dir = here.parent().unwrap_or(Path::new("."));
    let thru = a.thru.clone().unwrap_or_else(|| bin_dir.join("thru"));
    let thruserv = a
        .thruserv
        .clone()
        .unwrap_or_else(|| bin_dir.join("thruserv"));
    for b in [&thru, &thruserv] {
        if !b.exists() {
            bail!(
                "{} not found: build it (cargo build --release -p thru -p thruserv) or pass --thru / --thruserv",
                b.display()
            );
        }
    }
    let check = Command::new("bash").arg(&a.natlab).arg("check").output()?;
    if !check.status.success() {
        bail!(
            "this machine cannot run the NAT lab: {}",
            String::from_utf8_lossy(&check.stdout).trim()
        );
    }
    std::fs::create_dir_all(&a.dir).with_context(|| a.dir.display().to_string())?;
    let src = a.dir.join(format!("source-{}.bin", a.size));
    super::ensure_source(&src, a.size, super::Content::Random)?;
    let want = super::file_hash(&src)?;
    let logs = a.dir.join("natlab-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;

    let lab = Lab::up(a)?;
    let _signal = Signal::start(&lab, &thruserv, &logs)?;
    let mut rows = Vec::new();
    for &case in &a.cases {
        eprintln!("== {}", case.label());
        let mut row = NatRow {
            case,
            label: case.label().into(),
            expected_kind: case.expected_kind(),
            skipped: None,
            runs: Vec::new(),
            median_gbit_s: None,
            median_connect_ms: None,
            connect_ms: None,
            failed: 0,
        };
        let loss = case.loss_pct();
        if let Some(pct) = loss {
            lab.sh(&["loss", "rcone1", &pct.to_string()])?;
        }
        for i in 1..=a.runs {
            let dest = a.dir.join("natlab-dest");
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(&dest)?;
            super::drop_caches();
            let name = case.to_possible_value().map(|v| v.get_name().to_owned());
            let tag = format!("{}-{i}", name.unwrap_or_default());
            let res = run_once(a, &lab, case, &thru, &src, &dest, &logs.join(&tag)).and_then(|r| {
                let got = dest.join(src.file_name().unwrap_or_default());
                if super::file_hash(&got)? != want {
                    bail!("received file differs from the source");
                }
                Ok(r)
            });
            match res {
                Ok(r) => {
                    eprintln!(
                        "   run {i}: {} ({}), connect {} / {} ms, {:.3} Gbit/s",
                        r.route,
                        path_text(&r.host_path),
                        opt(r.host_connect_ms, 0),
                        opt(r.joiner_connect_ms, 0),
                        r.gbit_s
                    );
                    if r.host_path["kind"] != case.expected_kind() {
                        eprintln!(
                            "   note: expected path.kind {:?} for this case",
                            case.expected_kind()
                        );
                    }
                    row.runs.push(r);
                }
                Err(e) => {
                    eprintln!("   run {i}: failed: {e:#}");
                    row.failed += 1;
                    row.skipped = Some(format!("failed: {e:#}"));
                    // A broken case (no lab route at all) is not worth 30 time-outs.
                    if row.runs.is_empty() && row.failed >= 3 {
                        break;
                    }
                }
            }
        }
        if loss.is_some() {
            lab.sh(&["loss", "rcone1", "0"])?;
        }
        let _ = std::fs::remove_dir_all(a.dir.join("natlab-dest"));
        row.median_gbit_s = super::median(row.runs.iter().map(|r| r.gbit_s).collect());
        // The later of the two sides: the connection is usable when both selected.
        let connect: Vec<f64> = row
            .runs
            .iter()
            .filter_map(|r| match (r.host_connect_ms, r.joiner_connect_ms) {
                (Some(h), Some(j)) => Some(h.max(j)),
                (h, j) => h.or(j),
            })
            .collect();
        row.median_connect_ms = super::median(connect.clone());
        row.connect_ms = Quantiles::of(connect);
        rows.push(row);
    }
    let m = NatMatrix {
        size_bytes: a.size,
        path: "NAT lab (tools/natlab): network namespaces, nftables NAT, coturn; thru + thruserv"
            .into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rows,
    };
    print_table(&m);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&m)?)?;
        eprintln!("JSON written to {}", p.display());
    }
    eprintln!("logs of every run: {}", logs.display());
    Ok(())
}

/// The lab, torn down on drop. Holds the lab lock the NAT-lab tests take, so a benchmark and
/// those tests never build labs at the same time.
struct Lab {
    script: PathBuf,
    prefix: String,
    dir: PathBuf,
    _lock: File,
}

impl Lab {
    fn up(a: &NatlabArgs) -> Result<Self> {
        let lock = File::create(std::env::temp_dir().join("thruflux-natlab-tests.lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
        let lab = Self {
            script: a.natlab.clone(),
            prefix: a.prefix.clone(),
            dir: std::env::temp_dir().join(format!("natlab-{}", a.prefix)),
            _lock: lock,
        };
        let _ = lab.sh(&["down"]);
        eprintln!("natlab up (prefix {})", lab.prefix);
        lab.sh(&["up"])?;
        Ok(lab)
    }

    fn sh(&self, args: &[&str]) -> Result<()> {
        let (sub, rest) = args.split_first().ok_or_else(|| anyhow!("no subcommand"))?;
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(sub)
            .args(["--prefix", &self.prefix, "--dir"])
            .arg(&self.dir)
            .args(rest)
            .output()?;
        if !out.status.success() {
            bail!(
                "natlab.sh {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{ns}", self.prefix)])
            .arg(program);
        c
    }

    /// The flags both sides take; `fw` reaches TURN only over TLS on 443.
    fn net_flags(&self, ns: &str) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--json".into(),
            "--verbose".into(),
            "--server".into(),
            format!("ws://{SIGNAL}:{SIGNAL_PORT}"),
            "--stun-server".into(),
            format!("stun:{SERVER}:3478"),
            "--turn-server".into(),
        ];
        if ns == "fw" {
            v.push(format!("turns:flux:fluxpass@{SERVER}:443"));
            v.push("--turn-cert".into());
            v.push(self.dir.join("turn.der").display().to_string());
        } else {
            v.push(format!("turn:flux:fluxpass@{SERVER}:3478"));
        }
        v
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match self.sh(&["down"]) {
            Ok(()) => eprintln!("natlab down"),
            Err(e) => eprintln!("{e:#}"),
        }
    }
}

/// `thruserv` in the lab's `wan` namespace; killed on drop.
struct Signal(Child);

impl Signal {
    fn start(lab: &Lab, bin: &Path, logs: &Path) -> Result<Self> {
        let mut child = lab
            .exec("wan", bin)
            .args(["--bind", SIGNAL, "--port", &SIGNAL_PORT.to_string()])
            .args([
                "--ws-connects-per-min",
                "0",
                "--session-creates-per-min",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(logs.join("thruserv.log"))?))
            .spawn()
            .context("spawn thruserv")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let s = Self(child);
        if !line.starts_with("listening on") {
            bail!(
                "thruserv did not start: {line:?} (see {}/thruserv.log)",
                logs.display()
            );
        }
        Ok(s)
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `thru` process: stdout JSON lines on a channel, stderr in a log file; killed on drop.
struct Thru {
    child: Child,
    lines: mpsc::Receiver<String>,
    events: Vec<Value>,
    log: PathBuf,
}

impl Thru {
    fn spawn(lab: &Lab, ns: &str, bin: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let mut child = lab
            .exec(ns, bin)
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(&log)?))
            .spawn()
            .context("spawn thru")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            events: Vec::new(),
            log,
        })
    }

    fn event(&mut self, name: &str, until: Instant) -> Option<Value> {
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            self.events.push(v.clone());
            if v["event"] == name {
                return Some(v);
            }
        }
    }

    /// Waits for a successful exit by `until` (killing it then), reading the rest of its
    /// events.
    fn finish(&mut self, what: &str, until: Instant) -> Result<()> {
        let st = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{what} timed out: killed (log: {})", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.events
                .push(serde_json::from_str(&line).unwrap_or(Value::Null));
        }
        if !st.success() {
            let err = self
                .last("error")
                .map(|e| e["message"].to_string())
                .unwrap_or_default();
            bail!(
                "{what} exited with {st} {err} (log: {})",
                self.log.display()
            );
        }
        Ok(())
    }

    fn last(&self, name: &str) -> Option<&Value> {
        self.events.iter().rev().find(|v| v["event"] == name)
    }
}

impl Drop for Thru {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_once(
    a: &NatlabArgs,
    lab: &Lab,
    case: Case,
    thru: &Path,
    src: &Path,
    dest: &Path,
    log: &Path,
) -> Result<NatRun> {
    let (hns, jns) = case.sides();
    let limit = Duration::from_secs(a.timeout);
    let wall = Instant::now();
    let mut args = vec![
        "host".to_string(),
        src.display().to_string(),
        "--max-receivers".into(),
        "1".into(),
    ];
    args.extend(lab.net_flags(hns));
    let mut host = Thru::spawn(lab, hns, thru, &args, log.with_extension("host.log"))?;
    let Some(code) = host.event("code", Instant::now() + Duration::from_secs(20)) else {
        let why = match host.child.try_wait() {
            Ok(Some(st)) => format!("thru host exited with {st} before printing a join code"),
            _ => format!("no join code within 20 s (thruserv unreachable from {hns}?)"),
        };
        bail!("{why}; log ({}): {}", host.log.display(), tail(&host.log));
    };
    let code = code["code"]
        .as_str()
        .ok_or_else(|| anyhow!("code event without a code: {code}"))?
        .to_string();
    let mut args = vec![
        "join".to_string(),
        code,
        "--out".into(),
        dest.display().to_string(),
        "--yes".into(),
        "--benchmark".into(),
    ];
    args.extend(lab.net_flags(jns));
    let mut joiner = Thru::spawn(lab, jns, thru, &args, log.with_extension("join.log"))?;
    let j = joiner.finish("thru join", wall + limit);
    let h = host.finish("thru host", wall + limit);
    j?;
    h?;
    let summary = |t: &Thru, who: &str| {
        t.last("summary")
            .cloned()
            .ok_or_else(|| anyhow!("{who}: no summary event"))
    };
    let (hs, js) = (summary(&host, "host")?, summary(&joiner, "joiner")?);
    let bench = joiner
        .last("benchmark")
        .cloned()
        .ok_or_else(|| anyhow!("joiner: no benchmark event"))?;
    let f = |v: &Value| v.as_f64();
    Ok(NatRun {
        gbit_s: f(&bench["avg_gbit_s"]).ok_or_else(|| anyhow!("no avg_gbit_s: {bench}"))?,
        route: js["route"].as_str().unwrap_or("?").to_string(),
        host_connect_ms: f(&hs["path"]["connect_ms"]),
        joiner_connect_ms: f(&js["path"]["connect_ms"]),
        host_path: hs["path"].clone(),
        joiner_path: js["path"].clone(),
        rtt_ms: f(&bench["rtt_ms"]),
        loss_pct: f(&bench["loss_pct"]),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

/// The last lines of a log file, one line.
fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// `kind local→remote transport` of a `path` object.
fn path_text(p: &Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or("?").to_string();
    format!(
        "{} {}→{} {}",
        s("kind"),
        s("local"),
        s("remote"),
        s("transport")
    )
}

fn opt(v: Option<f64>, p: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.p$}"))
}

fn print_table(m: &NatMatrix) {
    println!(
        "\nflux-bench natlab: {:.0} MiB file-to-file with thru, {} | {} cores | Linux {}",
        m.size_bytes as f64 / (1u64 << 20) as f64,
        m.path,
        m.cores,
        m.kernel
    );
    println!(
        "{:<34} {:>9} {:>20} {:<13} {:<26} {:<26} {:>15} {:>7} {:>6}",
        "case",
        "Gbit/s",
        "runs",
        "route",
        "host path",
        "joiner path",
        "connect ms h/j",
        "RTT ms",
        "loss%"
    );
    for r in &m.rows {
        if let Some(s) = &r.skipped
            && r.runs.is_empty()
        {
            println!("{:<34} skipped: {s}", r.label);
            continue;
        }
        let runs: Vec<String> = if r.runs.len() <= 5 {
            r.runs.iter().map(|x| format!("{:.3}", x.gbit_s)).collect()
        } else {
            vec![format!("{} runs", r.runs.len())]
        };
        let med = r.median_gbit_s.unwrap_or(0.0);
        let Some(x) = r
            .runs
            .iter()
            .min_by(|a, b| (a.gbit_s - med).abs().total_cmp(&(b.gbit_s - med).abs()))
        else {
            continue;
        };
        // Every run's route, when they differ (they should not).
        let mut routes: HashMap<String, usize> = HashMap::new();
        for y in &r.runs {
            *routes.entry(path_text(&y.host_path)).or_default() += 1;
        }
        let host_path = if routes.len() > 1 {
            format!("mixed ({} kinds)", routes.len())
        } else {
            path_text(&x.host_path)
        };
        println!(
            "{:<34} {:>9} {:>20} {:<13} {:<26} {:<26} {:>15} {:>7} {:>6}",
            r.label,
            opt(r.median_gbit_s, 3),
            runs.join("/"),
            x.route,
            host_path,
            path_text(&x.joiner_path),
            format!(
                "{}/{}",
                opt(x.host_connect_ms, 0),
                opt(x.joiner_connect_ms, 0)
            ),
            opt(x.rtt_ms, 1),
            opt(x.loss_pct, 2),
        );
        if let Some(s) = &r.skipped {
            println!("{:<34} then: {s}", "");
        }
    }
    println!(
        "\nconnect time (pairing done → pair selected on both sides), ms\n{:<34} {:>5} {:>7} {:>8} {:>8} {:>8}",
        "case", "runs", "failed", "p50", "p90", "max"
    );
    for r in &m.rows {
        if let Some(q) = r.connect_ms {
            println!(
                "{:<34} {:>5} {:>7} {:>8.0} {:>8.0} {:>8.0}",
                r.label, q.n, r.failed, q.p50, q.p90, q.max
            );
        }
    }
}
