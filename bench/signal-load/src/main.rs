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
//! Everything runs on this machine over loopback; clients spread their source addresses
//! over 127.0.0.0/8 to stay clear of ephemeral-port exhaustion. Client and server share
//! the CPU, so the pairing rate is a floor for what the server alone could do.
//!
//! ```text
//! cargo build --release -p thruserv -p signal-load
//! target/release/signal-load --sessions 10000 --pairings 5000 --concurrency 32
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
    let server = ServerProcess::start(&server_bin)?;
    let url = format!("ws://{}", server.addr);
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
    let rss_start = server.rss_kib()?;
    let started = Instant::now();
    let hosts: Vec<SignalClient> = futures_util::stream::iter(0..args.sessions)
        .map(|i| {
            let url = url.clone();
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
    let rss_idle = server.rss_kib()?;
    println!(
        "idle sessions: {} held (opened in {:.1} s); server RSS {:.1} MiB at start, {:.1} MiB with them \
         ({:.1} KiB per session)",
        hosts.len(),
        fill.as_secs_f64(),
        rss_start as f64 / 1024.0,
        rss_idle as f64 / 1024.0,
        (rss_idle.saturating_sub(rss_start)) as f64 / hosts.len().max(1) as f64,
    );

    // Phase 2: pairing rate with the idle sessions still held.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..args.pairings)
        .map(|i| {
            let url = url.clone();
            let (host_cfg, join_cfg) = (config(2 * i), config(2 * i + 1));
            async move { pair_once(&url, &host_cfg, &join_cfg).await }
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
    let rss_after = server.rss_kib()?;
    let hwm = server.status_kib("VmHWM:")?;
    println!(
        "pairings: {} ok, {} failed in {:.2} s = {:.0} pairings/s at concurrency {}",
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
    println!(
        "server RSS after pairings: {:.1} MiB (peak {:.1} MiB)",
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(hosts);
    if failures > 0 {
        bail!("{failures} pairings failed");
    }
    Ok(())
}

async fn pair_once(
    url: &str,
    host_cfg: &ClientConfig,
    join_cfg: &ClientConfig,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut host = SignalClient::connect(url, host_cfg).await?;
    let created = host.create_session().await?;
    let mut joiner = SignalClient::connect(url, join_cfg).await?;
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
    fn start(bin: &PathBuf) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
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
