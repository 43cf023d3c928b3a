//! `signal-load`: a load benchmark for `thruserv` (not a test; run it by hand).
//!
//! It starts a `thruserv` (the release binary next to its own, unless `--server` names
//! another) with its caps and per-IP limits lifted, then:
//!
//! 1. opens `--sessions` host connections, each creating a session, and holds them idle;
//!    it reports the server's resident memory (VmRSS from `/proc/PID/status`) before and
//!    after, and per session;
//! 2. with those sessions still held, runs `--pairings` pairings, `--concurrency` at a
//!    time. One pairing = host connects and creates, joiner connects and joins, the host
//!    sees the join and relays one message, the joiner receives it. Latency is measured
//!    from the host's connect to the joiner's receipt and recorded in an hdrhistogram.
//!
//! Fleets: `--redis URL --instances N` starts N servers sharing that Redis, and
//! `--servers A,B,C` uses servers already running instead of starting any (no RSS then).
//! With several servers, idle sessions are spread over them round-robin and every pairing
//! puts its host and its joiner on different servers, so each one crosses instances.
//!
//! Everything runs on this machine over loopback; clients spread their source addresses
//! over 127.0.0.0/8 to stay clear of ephemeral-port exhaustion. Client and server share
//! the CPU, so the pairing rate is a floor for what the server alone could do.
//!
//! ```text
//! cargo build --release -p thruserv -p signal-load
//! target/release/signal-load --sessions 10000 --pairings 5000 --concurrency 32
//! target/release/signal-load --redis redis://127.0.0.1:6379 --instances 3
//! target/release/signal-load --servers 10.0.0.1:8080,10.0.0.2:8080
//! ```

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use flux_signal::client::{ClientConfig, SignalClient};
use flux_signal::proto::{PeerId, ServerMsg};
use futures_util::StreamExt;
use hdrhistogram::Histogram;

/// Load benchmark for thruserv: idle sessions held and pairing rate.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The thruserv binary to start (default: `thruserv` next to this binary).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Idle sessions to create and hold.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Pairings to run while the idle sessions are held.
    #[arg(long, default_value_t = 5_000)]
    pairings: usize,
    /// Pairings in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections opened at once while filling the idle sessions.
    #[arg(long, default_value_t = 256)]
    open_concurrency: usize,
    /// Servers already running (`HOST:PORT` or `ws://` URLs, comma-separated) to load
    /// instead of starting one; their RSS is not reported.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["server", "redis", "instances"])]
    servers: Vec<String>,
    /// Start the servers with `--redis URL` (sessions in Redis).
    #[arg(long)]
    redis: Option<String>,
    /// Servers to start (more than one needs --redis).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Distinct 127.0.0.x source addresses to spread clients over.
    #[arg(long, default_value_t = 50)]
    source_ips: u8,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = raise_nofile_limit();
    println!("signal-load: open-file limit {nofile:?}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server_bin = match args.server.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("thruserv"),
    };
    if args.instances > 1 && args.redis.is_none() {
        bail!("--instances above 1 needs --redis: separate in-memory servers share no sessions");
    }
    let servers: Vec<ServerProcess> = if args.servers.is_empty() {
        (0..args.instances.max(1))
            .map(|_| ServerProcess::start(&server_bin, args.redis.as_deref()))
            .collect::<anyhow::Result<_>>()?
    } else {
        Vec::new()
    };
    let urls: Vec<String> = if args.servers.is_empty() {
        servers.iter().map(|s| format!("ws://{}", s.addr)).collect()
    } else {
        args.servers
            .iter()
            .map(|s| {
                if s.contains("://") {
                    s.clone()
                } else {
                    format!("ws://{s}")
                }
            })
            .collect()
    };
    let n = urls.len();
    println!("servers: {}", urls.join(", "));
    let source = |i: usize| -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            10 + (i % usize::from(args.source_ips.max(1))) as u8,
        ))
    };
    let config = |i: usize| {
        ClientConfig::default()
            .local_ip(source(i))
            .ping_interval(None)
            .timeout(Duration::from_secs(30))
    };

    // Phase 1: idle sessions.
    let rss_start = rss_all(&servers)?;
    let started = Instant::now();
    let hosts: Vec<SignalClient> = futures_util::stream::iter(0..args.sessions)
        .map(|i| {
            let url = urls[i % n].clone();
            let cfg = config(i);
            async move {
                let mut c = SignalClient::connect(&url, &cfg).await?;
                c.create_session().await?;
                anyhow::Ok(c)
            }
        })
        .buffer_unordered(args.open_concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let fill = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_all(&servers)?;
    println!(
        "idle sessions: {} held over {n} server(s) (opened in {:.1} s)",
        hosts.len(),
        fill.as_secs_f64(),
    );
    let per_server = hosts.len().div_ceil(n).max(1);
    for (s, (start, idle)) in servers.iter().zip(rss_start.iter().zip(&rss_idle)) {
        println!(
            "  pid {}: RSS {:.1} MiB at start, {:.1} MiB with its ~{per_server} sessions \
             ({:.1} KiB per session)",
            s.child.id(),
            *start as f64 / 1024.0,
            *idle as f64 / 1024.0,
            idle.saturating_sub(*start) as f64 / per_server as f64,
        );
    }

    // Phase 2: pairing rate with the idle sessions still held.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..args.pairings)
        .map(|i| {
            // With several servers the joiner always lands on another one than the host.
            let (host_url, join_url) = (urls[i % n].clone(), urls[(i + 1) % n].clone());
            let (host_cfg, join_cfg) = (config(2 * i), config(2 * i + 1));
            async move { pair_once(&host_url, &join_url, &host_cfg, &join_cfg).await }
        })
        .buffer_unordered(args.concurrency);
    let mut failures = 0usize;
    while let Some(r) = results.next().await {
        match r {
            Ok(latency) => hist.record(latency.as_micros().max(1) as u64)?,
            Err(e) => {
                failures += 1;
                if failures <= 5 {
                    eprintln!("pairing failed: {e:#}");
                }
            }
        }
    }
    let wall = started.elapsed();
    let rss_after = rss_all(&servers)?;
    println!(
        "pairings: {} ok, {} failed in {:.2} s = {:.0} pairings/s at concurrency {} over {n} server(s)",
        hist.len(),
        failures,
        wall.as_secs_f64(),
        hist.len() as f64 / wall.as_secs_f64(),
        args.concurrency
    );
    println!(
        "pairing latency (connect+create, connect+join, relay): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.90) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    for (s, rss) in servers.iter().zip(&rss_after) {
        println!(
            "  pid {}: RSS after pairings {:.1} MiB (peak {:.1} MiB)",
            s.child.id(),
            *rss as f64 / 1024.0,
            s.status_kib("VmHWM:")? as f64 / 1024.0
        );
    }
    drop(hosts);
    if failures > 0 {
        bail!("{failures} pairings failed");
    }
    Ok(())
}

/// The RSS of each started server, in KiB.
fn rss_all(servers: &[ServerProcess]) -> anyhow::Result<Vec<u64>> {
    servers.iter().map(ServerProcess::rss_kib).collect()
}

async fn pair_once(
    host_url: &str,
    join_url: &str,
    host_cfg: &ClientConfig,
    join_cfg: &ClientConfig,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut host = SignalClient::connect(host_url, host_cfg).await?;
    let created = host.create_session().await?;
    let mut joiner = SignalClient::connect(join_url, join_cfg).await?;
    let joined = joiner.join_session(created.session).await?;
    match host.recv().await? {
        ServerMsg::PeerJoined { peer } if peer == joined.peer => {}
        other => bail!("host expected peer_joined, got {other:?}"),
    }
    host.relay(joined.peer, serde_json::json!({"t": "reply", "pake": "x"}))
        .await?;
    match joiner.recv().await? {
        ServerMsg::Relay {
            from: PeerId::HOST, ..
        } => {}
        other => bail!("joiner expected relay, got {other:?}"),
    }
    let latency = t0.elapsed();
    joiner.close().await;
    host.close().await;
    Ok(latency)
}

/// The thruserv child, killed on drop.
struct ServerProcess {
    child: Child,
    addr: String,
}

impl ServerProcess {
    fn start(bin: &PathBuf, redis: Option<&str>) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        if let Some(url) = redis {
            cmd.args(["--redis", url]);
        }
        let mut child = cmd
            .args(["--bind", "127.0.0.1", "--port", "0"])
            // Lift caps and per-IP limits: this measures capacity, not the abuse limits.
            .args(["--max-sessions", "0", "--max-ws-connections", "0"])
            .args([
                "--max-sessions-per-ip",
                "0",
                "--max-ws-connections-per-ip",
                "0",
            ])
            .args([
                "--ws-connects-per-min",
                "0",
                "--session-creates-per-min",
                "0",
            ])
            .args(["--max-pending-per-ip", "0", "--max-pending-handshakes", "0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("thruserv stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .context("thruserv did not print its address")?
            .to_string();
        println!("thruserv {} pid {} on {addr}", bin.display(), child.id());
        Ok(Self { child, addr })
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{field} missing from /proc status"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises the soft open-file limit to the hard limit; returns the effective soft limit.
fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    getrlimit(Resource::Nofile).current
}
