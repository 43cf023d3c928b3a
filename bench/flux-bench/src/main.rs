//! `flux-bench`: real file transfers on this machine, through the engine's io_uring and epoll
//! drivers, with GSO/GRO on and off, next to the same transfer over `quinn` on tokio (the
//! in-house reference) and iperf3 / scp when they are installed — all in one run, medians of
//! several runs, as a table and as JSON.
//!
//! Each side of each transfer runs as its own process (`flux-bench side ...`), so CPU time and
//! peak memory are per side; the runner spawns them on loopback or, with `--veth`, in two
//! network namespaces joined by a 1500-MTU veth pair set up like a real NIC.
//!
//! The `thru` row runs the real `thru host` / `thru join` through a loopback `thruserv`; the
//! `relay-curl` and `relay-browser` rows download through the web relay instead: a real
//! `thru host --web` behind a real `thruserv --web-relay`, fetched by curl or by headless
//! Chromium ([`thru`]).
//!
//! `flux-bench natlab` runs real `thru host` / `thru join` pairs across the NAT lab
//! (`tools/natlab`) and reports the route ICE chose, the connect time and the rate per case.
//!
//! What it does not do: assert anything. It measures; targets live in `bench/README.md`.

mod disk;
mod natlab;
mod plot;
mod s2n;
mod side;
mod thru;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use flux_peer::exec::DiskMode;
use flux_peer::net::Driver;
use flux_peer::stack::QuicStack;
use serde::Serialize;
use side::{EngineOpts, SideReport};

#[derive(Parser)]
#[command(name = "flux-bench", version, about = "Thruflux transfer benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the matrix and prints a table (and JSON with --json).
    Run(RunArgs),
    /// Real `thru` pairs across the NAT lab (tools/natlab): route, connect time and rate per
    /// case (needs root; builds and removes the lab).
    Natlab(natlab::NatlabArgs),
    /// One side of one transfer (spawned by `run`).
    #[command(hide = true)]
    Side {
        #[command(subcommand)]
        side: SideCmd,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// File size, e.g. 2GiB, 512MiB.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Runs per row (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Directory for the source and received files (a real disk for O_DIRECT).
    #[arg(long, default_value = "/var/tmp/flux-bench")]
    dir: PathBuf,
    /// Rows to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "uring,epoll,uring-no-gso,epoll-no-gso,quinn,quinn-no-hash,quinn-mem,s2n-mem,iperf3,scp"
    )]
    rows: Vec<Row>,
    /// Run between two network namespaces over a 1500-MTU veth pair instead of loopback.
    #[arg(long)]
    veth: bool,
    /// With --veth: limit the pair to this rate (Mbit/s, a `tbf` qdisc on each end; this
    /// machine has no netem), like a real link of that speed.
    #[arg(long, value_name = "MBIT", requires = "veth")]
    rate: Option<u32>,
    /// What the source file holds: `random` (incompressible) or `text` (log lines, which zstd
    /// compresses about tenfold): the `compress-*` rows compare them.
    #[arg(long, value_enum, default_value_t = Content::Random)]
    content: Content,
    /// Upper bound of QUIC path MTU discovery (UDP payload bytes) for engine and quinn.
    #[arg(long, default_value_t = 1452)]
    max_mtu: u16,
    /// QUIC stack of the engine rows other than `uring-s2n` and `epoll-s2n`: `quinn`, `s2n`,
    /// or `auto` (what `thru host --quic auto` runs).
    #[arg(long, default_value = "quinn", value_parser = ["quinn", "s2n", "auto"])]
    quic: String,
    /// Pin each side to CPUs, `HOST:JOIN` in taskset's list form (`0:1`, `0-3:4-7`), so that a
    /// machine with more cores can measure per-side scaling. Applies to the rows whose sides
    /// are flux-bench processes (engine, quinn, s2n); iperf3, scp and the thru rows are not
    /// pinned.
    #[arg(long, value_name = "HOST:JOIN", value_parser = parse_cpuset)]
    cpuset: Option<(String, String)>,
    /// Do not drop the page cache before each run (it is dropped when running as root).
    #[arg(long)]
    keep_cache: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw `throughput.svg` and `chunk-latency.svg` into this directory.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// The `thru` binary of the `thru` and relay rows (default: next to this executable).
    #[arg(long)]
    thru: Option<PathBuf>,
    /// The `thruserv` binary of the `thru` and relay rows (default: next to this executable).
    #[arg(long)]
    thruserv: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Row {
    /// Engine, io_uring driver, GSO/GRO on, `--disk auto`.
    Uring,
    /// Engine, io_uring driver, `O_DIRECT` files.
    UringDirect,
    /// Engine, io_uring driver, buffered files.
    UringBuffered,
    /// Engine, epoll driver, GSO/GRO on.
    Epoll,
    /// Engine on s2n-quic, io_uring driver, GSO/GRO on, `--disk auto`.
    UringS2n,
    /// Engine on s2n-quic, epoll driver, GSO/GRO on.
    EpollS2n,
    /// Engine, io_uring driver, GSO/GRO off.
    UringNoGso,
    /// Engine, io_uring driver, `--compress off`.
    CompressOff,
    /// Engine, io_uring driver, `--compress auto` (the default).
    CompressAuto,
    /// Engine, io_uring driver, `--compress on`.
    CompressOn,
    /// Engine, epoll driver, GSO/GRO off.
    EpollNoGso,
    /// quinn on tokio, BLAKE3 per 4 MiB like the engine.
    Quinn,
    /// quinn on tokio, no hashing.
    QuinnNoHash,
    /// quinn on tokio, memory to memory: no disk, no hashing (like quinn's perf tool).
    QuinnMem,
    /// s2n-quic driven by our own loop (flux-quic-s2n on a flux-udp socket, no tokio), memory
    /// to memory like `quinn-mem`.
    S2nMem,
    /// iperf3 TCP, memory to memory, no encryption.
    Iperf3,
    /// scp to localhost.
    Scp,
    /// Real `thru host` to `thru join --benchmark` through a loopback `thruserv`.
    Thru,
    /// `thru host --web --plain` through `thruserv --web-relay`, downloaded with curl.
    RelayCurl,
    /// `thru host --web` (end to end) through `thruserv --web-relay`, downloaded by headless
    /// Chromium through the page.
    RelayBrowser,
}

/// What the source file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Content {
    /// Pseudo-random bytes: incompressible.
    Random,
    /// Web-server-like log lines.
    Text,
}

/// Flags every side takes.
#[derive(Parser)]
struct SideCommon {
    /// Upper bound of QUIC path MTU discovery.
    #[arg(long)]
    max_mtu: u16,
    /// Local address to bind.
    #[arg(long)]
    bind: SocketAddr,
    /// Where to write the side's JSON report.
    #[arg(long)]
    out: PathBuf,
}

/// Where a joiner side connects and writes.
#[derive(Parser)]
struct JoinTo {
    /// The host's address.
    #[arg(long)]
    peer: SocketAddr,
    /// The host's certificate fingerprint (hex).
    #[arg(long)]
    fp: String,
    /// Destination (engine: a directory; quinn: the file).
    #[arg(long)]
    dest: PathBuf,
}

/// Engine flags.
#[derive(Parser)]
struct EngineFlags {
    /// `uring` or `epoll`.
    #[arg(long)]
    driver: String,
    /// `auto`, `direct` or `buffered` (io_uring driver).
    #[arg(long, default_value = "auto")]
    disk: String,
    /// GSO and GRO on.
    #[arg(long)]
    offload: bool,
    /// QUIC stack: `quinn` or `s2n`.
    #[arg(long, default_value = "quinn")]
    quic: String,
    /// Host: `off`, `auto` or `on` (zstd).
    #[arg(long, default_value = "auto")]
    compress: String,
}

#[derive(Subcommand)]
enum SideCmd {
    EngineHost {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        engine: EngineFlags,
        #[command(flatten)]
        common: SideCommon,
    },
    EngineJoin {
        #[command(flatten)]
        to: JoinTo,
        #[command(flatten)]
        engine: EngineFlags,
        #[command(flatten)]
        common: SideCommon,
    },
    QuinnHost {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        hash: bool,
        /// Send the file's size from memory; the joiner drops what it gets.
        #[arg(long)]
        mem: bool,
        #[command(flatten)]
        common: SideCommon,
    },
    QuinnJoin {
        #[command(flatten)]
        to: JoinTo,
        #[arg(long)]
        hash: bool,
        #[arg(long)]
        mem: bool,
        #[command(flatten)]
        common: SideCommon,
    },
    /// s2n-quic host, memory to memory (the file only gives the size).
    S2nHost {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        common: SideCommon,
    },
    /// s2n-quic joiner, reading into nothing.
    S2nJoin {
        #[command(flatten)]
        to: JoinTo,
        #[command(flatten)]
        common: SideCommon,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => format!("size {s:?} is too large"),
            _ => format!("{s:?} is not a size (a number with K, M, G or T, powers of 1024; examples: 256MiB, 1GiB, 2GiB)"),
        })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Side { side } => run_side(side),
        Cmd::Run(args) => run_matrix(&args),
        Cmd::Natlab(args) => natlab::run(&args),
    }
}

fn run_side(side: SideCmd) -> Result<()> {
    let engine = |e: &EngineFlags, c: &SideCommon| -> Result<EngineOpts> {
        Ok(EngineOpts {
            driver: e.driver.parse::<Driver>().map_err(|e| anyhow!(e))?,
            disk: e.disk.parse::<DiskMode>().map_err(|e| anyhow!(e))?,
            offload: e.offload,
            quic: e.quic.parse::<QuicStack>().map_err(|e| anyhow!(e))?,
            compress: match e.compress.as_str() {
                "off" => flux_transfer::Compress::Off,
                "on" => flux_transfer::Compress::On,
                "auto" => flux_transfer::Compress::Auto,
                other => bail!("--compress {other:?}: expected off, auto or on"),
            },
            max_mtu: c.max_mtu,
            bind: c.bind,
        })
    };
    match side {
        SideCmd::EngineHost {
            file,
            engine: e,
            common: c,
        } => side::engine_host(&file, &engine(&e, &c)?, &c.out),
        SideCmd::EngineJoin {
            to,
            engine: e,
            common: c,
        } => side::engine_join(to.peer, &to.fp, &to.dest, &engine(&e, &c)?, &c.out),
        SideCmd::QuinnHost {
            file,
            hash,
            mem,
            common: c,
        } => side::quinn_host(&file, hash, mem, c.max_mtu, c.bind, &c.out),
        SideCmd::QuinnJoin {
            to,
            hash,
            mem,
            common: c,
        } => side::quinn_join(
            to.peer, &to.fp, &to.dest, hash, mem, c.max_mtu, c.bind, &c.out,
        ),
        SideCmd::S2nHost { file, common: c } => s2n::host(&file, c.max_mtu, c.bind, &c.out),
        SideCmd::S2nJoin { to, common: c } => s2n::join(to.peer, &to.fp, c.max_mtu, c.bind, &c.out),
    }
}

/// One measured transfer.
#[derive(Debug, Serialize)]
struct RunResult {
    gbit_s: f64,
    host_cpu_s_per_gib: Option<f64>,
    join_cpu_s_per_gib: Option<f64>,
    host_max_rss_mib: Option<f64>,
    join_max_rss_mib: Option<f64>,
    connect_ms: Option<f64>,
    first_chunk_ms: Option<f64>,
    /// From the joiner's accept to its first chunk verified and written.
    first_byte_after_accept_ms: Option<f64>,
    /// Joiner syncing to stable storage (with FLUX_BENCH_DURABLE=1), part of the wall time.
    durable_sync_ms: Option<f64>,
    chunk_latency_ms: Option<Percentiles>,
    /// The chunk-latency distribution: `(quantile, ms)` pairs, for plots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    latency_cdf_ms: Vec<(f64, f64)>,
    mtu: Option<u16>,
    gso_gro: Option<bool>,
    o_direct: Option<(bool, bool)>,
    /// What `--disk` chose on each side, and why.
    disk_choice: Option<String>,
    loss_pct: Option<f64>,
    rtt_ms: Option<f64>,
    /// Chunk payload bytes on the wire as a share of the file bytes (below 100 when
    /// compressed).
    wire_pct: Option<f64>,
    /// Relay rows: `thruserv`'s CPU seconds per GiB carried, all its threads.
    relay_cpu_s_per_gib: Option<f64>,
    /// Relay rows: `thruserv`'s peak RSS.
    relay_max_rss_mib: Option<f64>,
}

impl RunResult {
    /// A comparator that reports only its rate.
    fn rate_only(gbit_s: f64) -> Self {
        Self {
            gbit_s,
            host_cpu_s_per_gib: None,
            join_cpu_s_per_gib: None,
            host_max_rss_mib: None,
            join_max_rss_mib: None,
            connect_ms: None,
            first_chunk_ms: None,
            first_byte_after_accept_ms: None,
            durable_sync_ms: None,
            chunk_latency_ms: None,
            latency_cdf_ms: Vec::new(),
            mtu: None,
            gso_gro: None,
            o_direct: None,
            disk_choice: None,
            loss_pct: None,
            rtt_ms: None,
            wire_pct: None,
            relay_cpu_s_per_gib: None,
            relay_max_rss_mib: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct RowResult {
    row: Row,
    label: String,
    skipped: Option<String>,
    runs: Vec<RunResult>,
    median_gbit_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Matrix {
    size_bytes: u64,
    path: String,
    max_mtu: u16,
    cipher: &'static str,
    cores: usize,
    /// `--cpuset`: the CPUs the host and joiner sides were pinned to.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpuset: Option<String>,
    kernel: String,
    /// What the source file holds.
    content: Content,
    /// What the filesystem under `--dir` does alone.
    disk: Option<disk::DiskFigures>,
    rows: Vec<RowResult>,
    ratios: Vec<(String, f64)>,
}

/// Where each side runs: loopback, or the two ends of a veth pair.
struct Place {
    host_bind: SocketAddr,
    join_bind: SocketAddr,
    host_ns: Option<String>,
    join_ns: Option<String>,
    /// CPUs each side is pinned to (`--cpuset`).
    host_cpus: Option<String>,
    join_cpus: Option<String>,
}

fn run_matrix(a: &RunArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| a.dir.display().to_string())?;
    let src = match a.content {
        Content::Random => a.dir.join(format!("source-{}.bin", a.size)),
        Content::Text => a.dir.join(format!("source-{}.log", a.size)),
    };
    ensure_source(&src, a.size, a.content)?;
    let want = file_hash(&src)?;
    // The disk alone, before the rows (256 MiB, or the transfer size if smaller).
    let disk = match disk::probe(
        &a.dir,
        a.size.clamp(4 << 20, 256 << 20) / (4 << 20) * (4 << 20),
    ) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("disk probe failed: {e:#}");
            None
        }
    };
    let _lab;
    let place = if a.veth {
        _lab = Some(Veth::up(a.rate)?);
        Place {
            host_bind: "10.201.0.1:0".parse()?,
            join_bind: "10.201.0.2:0".parse()?,
            host_ns: Some(VETH_A.into()),
            join_ns: Some(VETH_B.into()),
            host_cpus: a.cpuset.as_ref().map(|c| c.0.clone()),
            join_cpus: a.cpuset.as_ref().map(|c| c.1.clone()),
        }
    } else {
        Place {
            host_bind: "127.0.0.1:0".parse()?,
            join_bind: "127.0.0.1:0".parse()?,
            host_ns: None,
            join_ns: None,
            host_cpus: a.cpuset.as_ref().map(|c| c.0.clone()),
            join_cpus: a.cpuset.as_ref().map(|c| c.1.clone()),
        }
    };
    let mut rows = Vec::new();
    for &row in &a.rows {
        let label = label(row);
        eprintln!("== {label}");
        let mut rr = RowResult {
            row,
            label,
            skipped: None,
            runs: Vec::new(),
            median_gbit_s: None,
        };
        for i in 0..a.runs {
            let dest = a.dir.join("dest");
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(&dest)?;
            if !a.keep_cache {
                drop_caches();
            }
            let res = match row {
                Row::Uring
                | Row::UringDirect
                | Row::UringBuffered
                | Row::Epoll
                | Row::UringS2n
                | Row::EpollS2n
                | Row::UringNoGso
                | Row::EpollNoGso
                | Row::CompressOff
                | Row::CompressAuto
                | Row::CompressOn => run_engine(row, &src, &dest, a, &place).map(Some),
                Row::Quinn | Row::QuinnNoHash | Row::QuinnMem => {
                    run_quinn(row, &src, &dest, a, &place).map(Some)
                }
                Row::S2nMem => {
                    run_pair(("s2n-host", "s2n-join"), &[], &src, &dest, a, &place).map(Some)
                }
                Row::Iperf3 => run_iperf3(a.size, &place),
                Row::Scp => run_scp(&src, &dest, a.size),
                Row::Thru | Row::RelayCurl | Row::RelayBrowser => run_thru(row, &src, &dest, a),
            };
            match res {
                Ok(Some(r)) => {
                    // Every file-to-file row must have delivered the same bytes.
                    let got = dest.join(src.file_name().unwrap_or_default());
                    if !matches!(row, Row::Iperf3 | Row::QuinnMem | Row::S2nMem)
                        && file_hash(&got)? != want
                    {
                        bail!("{}: received file differs from the source", rr.label);
                    }
                    eprintln!(
                        "   run {}: {:.2} Gbit/s (wire {:.1} % of the file bytes)",
                        i + 1,
                        r.gbit_s,
                        r.wire_pct.unwrap_or(100.0)
                    );
                    rr.runs.push(r);
                }
                Ok(None) => {
                    rr.skipped = Some(skip_reason(row, a));
                    break;
                }
                Err(e) => {
                    eprintln!("   run {}: failed: {e:#}", i + 1);
                    rr.skipped = Some(format!("failed: {e:#}"));
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(a.dir.join("dest"));
        rr.median_gbit_s = median(rr.runs.iter().map(|r| r.gbit_s).collect());
        rows.push(rr);
    }
    let m = |r: Row| {
        rows.iter()
            .find(|x| x.row == r)
            .and_then(|x| x.median_gbit_s)
    };
    let mut ratios = Vec::new();
    for (name, num, den) in [
        ("uring / quinn-tokio", Row::Uring, Row::Quinn),
        (
            "uring / quinn-tokio (no hashing)",
            Row::Uring,
            Row::QuinnNoHash,
        ),
        ("uring / quinn mem->mem", Row::Uring, Row::QuinnMem),
        ("epoll / quinn mem->mem", Row::Epoll, Row::QuinnMem),
        ("s2n mem->mem / quinn mem->mem", Row::S2nMem, Row::QuinnMem),
        ("uring s2n / uring quinn", Row::UringS2n, Row::Uring),
        ("epoll s2n / epoll quinn", Row::EpollS2n, Row::Epoll),
        ("uring s2n / quinn mem->mem", Row::UringS2n, Row::QuinnMem),
        ("uring / epoll", Row::Uring, Row::Epoll),
        ("uring auto / direct", Row::Uring, Row::UringDirect),
        ("uring auto / buffered", Row::Uring, Row::UringBuffered),
        ("uring GSO on / off", Row::Uring, Row::UringNoGso),
        ("epoll GSO on / off", Row::Epoll, Row::EpollNoGso),
        ("compress auto / off", Row::CompressAuto, Row::CompressOff),
        ("compress on / off", Row::CompressOn, Row::CompressOff),
        ("thru / uring", Row::Thru, Row::Uring),
        ("relay curl / thru", Row::RelayCurl, Row::Thru),
        ("relay browser / thru", Row::RelayBrowser, Row::Thru),
        ("relay curl / uring", Row::RelayCurl, Row::Uring),
        ("relay browser / uring", Row::RelayBrowser, Row::Uring),
    ] {
        if let (Some(n), Some(d)) = (m(num), m(den))
            && d > 0.0
        {
            ratios.push((name.to_string(), n / d));
        }
    }
    let matrix = Matrix {
        size_bytes: a.size,
        path: if a.veth {
            format!(
                "veth pair between two network namespaces, MTU 1500, segmentation offloads off{}",
                a.rate
                    .map_or(String::new(), |r| format!(", limited to {r} Mbit/s (tbf)"))
            )
        } else {
            "loopback (MTU 65536)".into()
        },
        max_mtu: a.max_mtu,
        cipher: flux_quic::CIPHER_SUITE,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpuset: a
            .cpuset
            .as_ref()
            .map(|(h, j)| format!("host on CPUs {h}, joiner on CPUs {j}")),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        content: a.content,
        disk,
        rows,
        ratios,
    };
    print_table(&matrix);
    if let Some(dir) = &a.plots {
        plot::draw(&matrix, dir)?;
        eprintln!("plots written to {}", dir.display());
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&matrix)?)?;
        eprintln!("JSON written to {}", p.display());
    }
    Ok(())
}

fn label(row: Row) -> String {
    match row {
        Row::Uring => "engine io_uring, GSO/GRO on",
        Row::UringDirect => "engine io_uring, disk O_DIRECT",
        Row::UringBuffered => "engine io_uring, disk buffered",
        Row::Epoll => "engine epoll, GSO/GRO on",
        Row::UringS2n => "engine io_uring on s2n-quic",
        Row::EpollS2n => "engine epoll on s2n-quic",
        Row::UringNoGso => "engine io_uring, GSO/GRO off",
        Row::EpollNoGso => "engine epoll, GSO/GRO off",
        Row::CompressOff => "engine io_uring, --compress off",
        Row::CompressAuto => "engine io_uring, --compress auto",
        Row::CompressOn => "engine io_uring, --compress on",
        Row::Quinn => "quinn on tokio (BLAKE3 per 4 MiB)",
        Row::QuinnNoHash => "quinn on tokio (no hashing)",
        Row::QuinnMem => "quinn on tokio mem->mem (no disk/hash)",
        Row::S2nMem => "s2n-quic on our loop mem->mem (no disk/hash)",
        Row::Iperf3 => "iperf3 TCP mem->mem, no crypto",
        Row::Scp => "scp localhost",
        Row::Thru => "thru host -> thru join (direct)",
        Row::RelayCurl => "web relay, curl (plain)",
        Row::RelayBrowser => "web relay, Chromium page (E2E)",
    }
    .into()
}

fn skip_reason(row: Row, a: &RunArgs) -> String {
    match row {
        Row::Iperf3 => "iperf3 not installed".into(),
        Row::Scp => "scp/sshd to localhost not usable without a password".into(),
        Row::Thru | Row::RelayCurl | Row::RelayBrowser if a.veth => {
            "loopback only: not with --veth".into()
        }
        Row::RelayCurl | Row::RelayBrowser => {
            thru::missing(row == Row::RelayBrowser).unwrap_or_else(|| "skipped".into())
        }
        _ => "skipped".into(),
    }
}

/// A flux-bench side process, in network namespace `ns` when given, pinned to `cpus` (a
/// taskset CPU list) when given.
fn ns_cmd(ns: &Option<String>, cpus: &Option<String>) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "flux-bench".into());
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(c) = cpus {
        argv.extend(["taskset".into(), "-c".into(), c.into()]);
    }
    if let Some(n) = ns {
        argv.extend(["ip".into(), "netns".into(), "exec".into(), n.into()]);
    }
    argv.push(exe.into());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// `--cpuset HOST:JOIN`: two taskset CPU lists (`0`, `0-3`, `0,2,4`).
fn parse_cpuset(s: &str) -> Result<(String, String), String> {
    let (h, j) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:JOIN, e.g. 0:1 or 0-3:4-7"))?;
    let list = |l: &str| {
        let ok = !l.is_empty()
            && l.split(',').all(|part| {
                let mut ends = part.splitn(2, '-');
                ends.all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
        if ok {
            Ok(l.to_owned())
        } else {
            Err(format!(
                "{l:?} is not a CPU list (numbers, ranges like 0-3, commas) in --cpuset {s:?}"
            ))
        }
    };
    Ok((list(h)?, list(j)?))
}

/// Starts a host side and reads its `READY addr fingerprint` line.
fn start_host(mut cmd: Command) -> Result<(Child, SocketAddr, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn host side")?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let mut it = line.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some("READY"), Some(addr), Some(fp)) => Ok((child, addr.parse()?, fp.to_owned())),
        _ => {
            let _ = child.kill();
            bail!("host side did not start: {line:?}")
        }
    }
}

fn wait_ok(mut c: Child, what: &str) -> Result<()> {
    let st = c.wait()?;
    if !st.success() {
        bail!("{what} exited with {st}");
    }
    Ok(())
}

fn run_engine(row: Row, src: &Path, dest: &Path, a: &RunArgs, p: &Place) -> Result<RunResult> {
    let compress = match row {
        Row::CompressOff => "off",
        Row::CompressOn => "on",
        _ => "auto",
    };
    let (driver, offload, disk) = match row {
        Row::Uring | Row::CompressOff | Row::CompressAuto | Row::CompressOn => {
            ("uring", true, "auto")
        }
        Row::UringDirect => ("uring", true, "direct"),
        Row::UringBuffered => ("uring", true, "buffered"),
        Row::Epoll | Row::EpollS2n => ("epoll", true, "auto"),
        Row::UringS2n => ("uring", true, "auto"),
        Row::UringNoGso => ("uring", false, "auto"),
        _ => ("epoll", false, "auto"),
    };
    let quic = match row {
        Row::UringS2n | Row::EpollS2n => "s2n".to_string(),
        _ if a.quic == "auto" => QuicStack::AUTO.name().to_string(),
        _ => a.quic.clone(),
    };
    let mut common = vec![
        "--quic".to_string(),
        quic,
        "--driver".to_string(),
        driver.into(),
        "--disk".into(),
        disk.into(),
        "--compress".into(),
        compress.into(),
    ];
    if offload {
        common.push("--offload".into());
    }
    run_pair(("engine-host", "engine-join"), &common, src, dest, a, p)
}

fn run_quinn(row: Row, src: &Path, dest: &Path, a: &RunArgs, p: &Place) -> Result<RunResult> {
    let common: Vec<String> = match row {
        Row::Quinn => vec!["--hash".into()],
        Row::QuinnMem => vec!["--mem".into()],
        _ => Vec::new(),
    };
    let dest_file = dest.join(src.file_name().unwrap_or_default());
    run_pair(("quinn-host", "quinn-join"), &common, src, &dest_file, a, p)
}

/// Runs a host side and a joiner side (`flux-bench side <kind> ...`) with the flags both take
/// plus `common`, and combines their reports.
fn run_pair(
    (host_kind, join_kind): (&str, &str),
    common: &[String],
    src: &Path,
    dest: &Path,
    a: &RunArgs,
    p: &Place,
) -> Result<RunResult> {
    let (hout, jout) = (a.dir.join("host.json"), a.dir.join("join.json"));
    let mtu = a.max_mtu.to_string();
    let mut h = ns_cmd(&p.host_ns, &p.host_cpus);
    h.args(["side", host_kind, "--max-mtu", &mtu])
        .args(common)
        .arg("--file")
        .arg(src)
        .args(["--bind", &p.host_bind.to_string()])
        .arg("--out")
        .arg(&hout);
    let (hc, addr, fp) = start_host(h)?;
    let mut j = ns_cmd(&p.join_ns, &p.join_cpus);
    j.args(["side", join_kind, "--max-mtu", &mtu, "--fp", &fp])
        .args(common)
        .args(["--peer", &addr.to_string()])
        .arg("--dest")
        .arg(dest)
        .args(["--bind", &p.join_bind.to_string()])
        .arg("--out")
        .arg(&jout);
    let jc = j.spawn().context("spawn joiner side")?;
    let jr = wait_ok(jc, "joiner");
    let hr = wait_ok(hc, "host");
    jr?;
    hr?;
    combine(&read_report(&hout)?, &read_report(&jout)?)
}

fn read_report(p: &Path) -> Result<SideReport> {
    let b = std::fs::read(p).with_context(|| p.display().to_string())?;
    Ok(serde_json::from_slice(&b)?)
}

fn combine(h: &SideReport, j: &SideReport) -> Result<RunResult> {
    if j.bytes == 0 || j.wall_s <= 0.0 {
        bail!("joiner moved nothing");
    }
    let gib = j.bytes as f64 / (1u64 << 30) as f64;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let sent: std::collections::HashMap<(u32, u32), u64> =
        h.chunks.iter().map(|&(f, i, t)| ((f, i), t)).collect();
    for &(f, i, t) in &j.chunks {
        if let Some(s) = sent.get(&(f, i)) {
            hist.record(t.saturating_sub(*s) / 1000)?;
        }
    }
    let pct = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(RunResult {
        gbit_s: j.bytes as f64 * 8.0 / j.wall_s / 1e9,
        host_cpu_s_per_gib: Some(h.cpu_s / gib),
        join_cpu_s_per_gib: Some(j.cpu_s / gib),
        host_max_rss_mib: Some(h.max_rss_kib as f64 / 1024.0),
        join_max_rss_mib: Some(j.max_rss_kib as f64 / 1024.0),
        connect_ms: j.connect_s.map(|s| s * 1e3),
        first_chunk_ms: j.first_chunk_s.map(|s| s * 1e3),
        first_byte_after_accept_ms: j.first_chunk_s.zip(j.accept_s).map(|(f, a)| (f - a) * 1e3),
        durable_sync_ms: j.sync_s.map(|s| s * 1e3),
        chunk_latency_ms: (!hist.is_empty()).then(|| Percentiles {
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            max: hist.max() as f64 / 1000.0,
        }),
        latency_cdf_ms: if hist.is_empty() {
            Vec::new()
        } else {
            (0..=100)
                .map(|i| f64::from(i) / 100.0)
                .chain([0.995, 0.999])
                .map(|q| (q, pct(q)))
                .collect()
        },
        mtu: j.mtu.or(h.mtu),
        gso_gro: h.gso.zip(j.gro).map(|(a, b)| a && b),
        o_direct: h.gso.map(|_| (h.direct_ops > 0, j.direct_ops > 0)),
        disk_choice: match (&h.disk_choice, &j.disk_choice) {
            (None, None) => None,
            (hc, jc) => Some(format!(
                "host: {}; joiner: {}",
                hc.as_deref().unwrap_or("-"),
                jc.as_deref().unwrap_or("-")
            )),
        },
        loss_pct: (h.packets_sent > 0)
            .then(|| h.packets_lost as f64 * 100.0 / h.packets_sent as f64),
        rtt_ms: h.rtt_ms,
        wire_pct: (h.wire_bytes > 0 && j.bytes > 0)
            .then(|| h.wire_bytes as f64 * 100.0 / j.bytes as f64),
        relay_cpu_s_per_gib: None,
        relay_max_rss_mib: None,
    })
}

/// A run of a row of real `thru` processes, or `None` when its client (curl, Chromium) is
/// missing, or with `--veth` (they run on loopback only).
fn run_thru(row: Row, src: &Path, dest: &Path, a: &RunArgs) -> Result<Option<RunResult>> {
    let browser = row == Row::RelayBrowser;
    if a.veth || (row != Row::Thru && thru::missing(browser).is_some()) {
        return Ok(None);
    }
    let bins = thru::Bins::find(a.thru.as_deref(), a.thruserv.as_deref())?;
    match row {
        Row::Thru => thru::run_direct(&bins, src, dest, &a.dir),
        _ => thru::run(&bins, browser, src, dest, &a.dir),
    }
    .map(Some)
}

fn run_iperf3(size: u64, p: &Place) -> Result<Option<RunResult>> {
    if Command::new("iperf3").arg("--version").output().is_err() {
        return Ok(None);
    }
    let port = "5299";
    let host_ip = p.host_bind.ip().to_string();
    let mut srv = match &p.host_ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, "iperf3"]);
            c
        }
        None => Command::new("iperf3"),
    };
    let mut srv = srv
        .args(["-s", "-1", "-p", port, "-B", &host_ip])
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut cli = match &p.join_ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n, "iperf3"]);
            c
        }
        None => Command::new("iperf3"),
    };
    let out = cli
        .args(["-c", &host_ip, "-p", port, "-J", "-n"])
        .arg(size.to_string())
        .output()?;
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| {
            anyhow!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(Some(RunResult::rate_only(bps / 1e9)))
}

fn run_scp(src: &Path, dest: &Path, size: u64) -> Result<Option<RunResult>> {
    // Only with key-based access to localhost already set up (BatchMode never prompts).
    let probe = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "localhost",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return Ok(None);
    }
    let t = Instant::now();
    let st = Command::new("scp")
        .args(["-q", "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com"])
        .arg(src)
        .arg(format!("localhost:{}", dest.display()))
        .status()?;
    if !st.success() {
        bail!("scp failed: {st}");
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Some(RunResult::rate_only(size as f64 * 8.0 / secs / 1e9)))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn ensure_source(p: &Path, size: u64, content: Content) -> Result<()> {
    if std::fs::metadata(p).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    use std::io::Write;
    eprintln!("writing a {size}-byte source file at {}", p.display());
    let mut f = std::fs::File::create(p)?;
    if content == Content::Text {
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        let mut left = size;
        let mut line = String::new();
        let mut i = 0u64;
        // A web server's access log: the fields vary as real ones do (ids, paths, sizes,
        // times), so zstd finds structure but not one repeated line.
        let paths = [
            "/",
            "/api/v1/items",
            "/api/v1/users",
            "/static/app.js",
            "/login",
        ];
        let agents = [
            "curl/8.5.0",
            "Mozilla/5.0 (X11; Linux x86_64)",
            "Go-http-client/1.1",
        ];
        while left > 0 {
            line.clear();
            let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
            use std::fmt::Write as _;
            let _ = writeln!(
                line,
                "10.{}.{}.{} - - [07/Dec/2026:{:02}:{:02}:{:02} +0000] \"GET {}/{} HTTP/1.1\" {} {} \"-\" \"{}\" rt={}.{:03}",
                x % 256,
                (x >> 8) % 256,
                (x >> 16) % 256,
                (i / 3_600_000) % 24,
                (i / 60_000) % 60,
                (i / 1000) % 60,
                paths[(x % 5) as usize],
                x % 100_000,
                [200, 200, 200, 304, 404][((x >> 3) % 5) as usize],
                x % 50_000,
                agents[((x >> 5) % 3) as usize],
                x % 3,
                x % 1000
            );
            let n = (line.len() as u64).min(left) as usize;
            w.write_all(&line.as_bytes()[..n])?;
            left -= n as u64;
            i += 1;
        }
        f = w.into_inner().map_err(|e| anyhow!("{e}"))?;
        f.sync_all()?;
        return Ok(());
    }
    // BLAKE3 in XOF mode as a fast pseudo-random stream: incompressible, every block differs.
    let mut xof = blake3::Hasher::new().update(b"flux-bench").finalize_xof();
    let mut buf = vec![0u8; 8 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn file_hash(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize())
}

fn drop_caches() {
    // Each run starts from disk, not from the page cache the previous run filled (platform
    // pitfall 10); needs root, silently skipped otherwise.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

const VETH_A: &str = "fbench-a";
const VETH_B: &str = "fbench-b";

/// Two namespaces joined by a veth pair with MTU 1500 and segmentation offloads off, so GSO
/// batches are split like on a NIC (platform pitfall 3); removed on drop.
struct Veth;

impl Veth {
    fn up(rate_mbit: Option<u32>) -> Result<Self> {
        let _ = Self::down();
        let sh = |args: &str| -> Result<()> {
            let st = Command::new("sh").arg("-c").arg(args).status()?;
            if !st.success() {
                bail!("`{args}` failed: {st}");
            }
            Ok(())
        };
        sh(&format!("ip netns add {VETH_A} && ip netns add {VETH_B}"))?;
        sh(&format!(
            "ip link add fb-va netns {VETH_A} type veth peer name fb-vb netns {VETH_B}"
        ))?;
        for (ns, dev, ip) in [
            (VETH_A, "fb-va", "10.201.0.1"),
            (VETH_B, "fb-vb", "10.201.0.2"),
        ] {
            sh(&format!(
                "ip -n {ns} addr add {ip}/24 dev {dev} && ip -n {ns} link set {dev} mtu 1500 up && ip -n {ns} link set lo up"
            ))?;
            // Best effort: older ethtool may not know every feature name.
            let _ = sh(&format!(
                "ip netns exec {ns} ethtool -K {dev} tso off gso off tx-udp-segmentation off gro on rx-udp-gro-forwarding on >/dev/null 2>&1"
            ));
            if let Some(r) = rate_mbit {
                // A token bucket on each end's egress: the link's rate. The burst must hold
                // at least one timer tick of traffic (HZ 250-1000: ~4 ms at most), and the
                // queue ~50 ms, as a real bottleneck buffer.
                let burst = (u64::from(r) * 1_000_000 / 8 / 250).max(32 << 10);
                sh(&format!(
                    "ip netns exec {ns} tc qdisc replace dev {dev} root tbf rate {r}mbit burst {burst} latency 50ms"
                ))?;
            }
        }
        Ok(Self)
    }

    fn down() -> Result<()> {
        let _ = Command::new("ip").args(["netns", "del", VETH_A]).status();
        let _ = Command::new("ip").args(["netns", "del", VETH_B]).status();
        Ok(())
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Self::down();
    }
}

fn print_table(m: &Matrix) {
    println!(
        "\nflux-bench: {:.2} GiB file-to-file, {} | QUIC max MTU {} | {} | {} cores{} | Linux {}",
        m.size_bytes as f64 / (1u64 << 30) as f64,
        m.path,
        m.max_mtu,
        m.cipher,
        m.cores,
        m.cpuset
            .as_ref()
            .map_or(String::new(), |c| format!(" ({c})")),
        m.kernel
    );
    println!(
        "{:<36} {:>9} {:>13} {:>9} {:>9} {:>9} {:>8} {:>8} {:>18} {:>5} {:>8} {:>9} {:>6} {:>9}",
        "row",
        "Gbit/s",
        "runs",
        "CPU h/GiB",
        "CPU j/GiB",
        "CPU r/GiB",
        "RSS h",
        "RSS j",
        "chunk p50/p99 ms",
        "MTU",
        "GSO/GRO",
        "O_DIRECT",
        "loss%",
        "TTFB ms"
    );
    for r in &m.rows {
        if let Some(s) = &r.skipped
            && r.runs.is_empty()
        {
            println!("{:<36} skipped: {s}", r.label);
            continue;
        }
        let runs: Vec<String> = r.runs.iter().map(|x| format!("{:.2}", x.gbit_s)).collect();
        // Show the other figures of the median run.
        let mid = r.runs.iter().min_by(|a, b| {
            (a.gbit_s - r.median_gbit_s.unwrap_or(0.0))
                .abs()
                .total_cmp(&(b.gbit_s - r.median_gbit_s.unwrap_or(0.0)).abs())
        });
        let f = |v: Option<f64>, p: usize| v.map_or("-".into(), |x| format!("{x:.p$}"));
        let Some(x) = mid else { continue };
        println!(
            "{:<36} {:>9} {:>13} {:>9} {:>9} {:>9} {:>8} {:>8} {:>18} {:>5} {:>8} {:>9} {:>6} {:>9}",
            r.label,
            f(r.median_gbit_s, 2),
            runs.join("/"),
            f(x.host_cpu_s_per_gib, 2),
            f(x.join_cpu_s_per_gib, 2),
            f(x.relay_cpu_s_per_gib, 2),
            f(x.host_max_rss_mib, 0),
            f(x.join_max_rss_mib, 0),
            x.chunk_latency_ms
                .map_or("-".into(), |p| format!("{:.0}/{:.0}", p.p50, p.p99)),
            x.mtu.map_or("-".into(), |v| v.to_string()),
            x.gso_gro.map_or_else(
                || "-".to_string(),
                |v| (if v { "on" } else { "off" }).to_string()
            ),
            x.o_direct
                .map_or("-".into(), |(h, j)| format!("{}/{}", yn(h), yn(j))),
            f(x.loss_pct, 2),
            // After accept where the side reports it (the engine), else from the start.
            f(x.first_byte_after_accept_ms.or(x.first_chunk_ms), 1),
        );
    }
    for (name, v) in &m.ratios {
        println!("ratio {name}: {v:.2}x");
    }
    for r in &m.rows {
        if let Some(c) = r.runs.first().and_then(|x| x.disk_choice.as_ref()) {
            println!("disk choice, {}: {c}", r.label);
        }
    }
    for r in &m.rows {
        if let Some(rss) = r
            .runs
            .iter()
            .filter_map(|x| x.relay_max_rss_mib)
            .reduce(f64::max)
        {
            println!(
                "{}: h = thru host, j = the client (all its processes), r = thruserv (peak RSS {rss:.0} MiB)",
                r.label
            );
        }
    }
    if let Some(d) = &m.disk {
        let g = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "disk alone ({} MiB, 4 MiB requests, GB/s): O_DIRECT write+fsync {}, buffered write \
             {} (+fsync {}), O_DIRECT read {}",
            d.bytes >> 20,
            g(d.direct_write_gb_s),
            g(d.buffered_write_nosync_gb_s),
            g(d.buffered_write_gb_s),
            g(d.direct_read_gb_s)
        );
    }
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::parse_cpuset;

    #[test]
    fn cpusets_are_two_cpu_lists_or_a_clear_error() {
        assert_eq!(parse_cpuset("0:1"), Ok(("0".into(), "1".into())));
        assert_eq!(
            parse_cpuset("0-3,8:4-7"),
            Ok(("0-3,8".into(), "4-7".into()))
        );
        for bad in ["0", "0:", ":1", "a:1", "0-:1", "0:1-x", "0,,1:2"] {
            let e = parse_cpuset(bad).expect_err(bad);
            assert!(e.contains(bad) || e.contains("HOST:JOIN"), "{bad}: {e}");
        }
    }
}
