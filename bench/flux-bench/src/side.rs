//! One side of a measured transfer, run as its own process so its CPU time and peak memory are
//! its own: the engine (either driver) or the quinn-on-tokio reference.
//!
//! A host prints `READY <addr> <fingerprint-hex>` on stdout once it listens; every side writes
//! a [`SideReport`] as JSON to `--out` when it ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use flux_peer::exec::DiskMode;
use flux_peer::net::{self, Control, Driver, NetConfig, NetEvent};
use flux_peer::scan::scan;
use flux_peer::stack::QuicStack;
use flux_quic::Identity;
use flux_transfer::Event;
use flux_udp::{SocketConfig, UdpSocket};
use serde::{Deserialize, Serialize};

/// What one side measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SideReport {
    /// What ran (`engine-uring`, `quinn-tokio`, ...).
    pub kind: String,
    /// Wall seconds from start (joiner: before connecting) to the end.
    pub wall_s: f64,
    /// User + system CPU seconds of the process.
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`) in KiB.
    pub max_rss_kib: u64,
    /// File bytes moved.
    pub bytes: u64,
    /// Host: chunk payload bytes sent on the wire (fewer than the file bytes when compressed).
    #[serde(default)]
    pub wire_bytes: u64,
    /// Seconds to the completed QUIC handshake (joiner).
    pub connect_s: Option<f64>,
    /// Seconds to the first chunk verified and written (joiner).
    pub first_chunk_s: Option<f64>,
    /// Seconds to the offer being accepted (joiner; the engine accepts when the manifest is
    /// complete): first byte after accept is `first_chunk_s - accept_s`.
    #[serde(default)]
    pub accept_s: Option<f64>,
    /// Joiner with `FLUX_BENCH_DURABLE=1`: seconds spent syncing (inside `wall_s`).
    #[serde(default)]
    pub sync_s: Option<f64>,
    /// `(file, chunk, CLOCK_MONOTONIC ns)` when the host sent / the joiner wrote each chunk.
    pub chunks: Vec<(u32, u32, u64)>,
    /// Path MTU (UDP payload) at the end.
    pub mtu: Option<u16>,
    /// GSO / GRO in use on the socket.
    pub gso: Option<bool>,
    /// GRO enabled on the socket.
    pub gro: Option<bool>,
    /// Chunk I/O done with O_DIRECT / buffered.
    pub direct_ops: u64,
    /// Buffered chunk operations.
    pub buffered_ops: u64,
    /// What `--disk` chose, and why.
    #[serde(default)]
    pub disk_choice: Option<String>,
    /// Smoothed RTT at the end, ms.
    pub rtt_ms: Option<f64>,
    /// Packets sent and declared lost by QUIC.
    pub packets_sent: u64,
    /// Packets declared lost.
    pub packets_lost: u64,
    /// The failure, if any.
    pub error: Option<String>,
}

/// CLOCK_MONOTONIC in ns: comparable between the two side processes on one machine.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// User + system CPU seconds and peak RSS of this process, from `/proc/self`.
pub fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) = 11 and 12 after the ')'.
    let hz = 100.0; // USER_HZ is 100 on Linux.
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

/// Engine settings for a run.
#[derive(Clone, Debug)]
pub struct EngineOpts {
    /// The driver.
    pub driver: Driver,
    /// Page cache or `O_DIRECT`.
    pub disk: DiskMode,
    /// GSO and GRO on the socket.
    pub offload: bool,
    /// The QUIC stack.
    pub quic: QuicStack,
    /// Host: zstd compression.
    pub compress: flux_transfer::Compress,
    /// Largest path MTU to probe.
    pub max_mtu: u16,
    /// Address to bind.
    pub bind: SocketAddr,
}

fn engine_socket(o: &EngineOpts) -> Result<UdpSocket> {
    let cfg = SocketConfig {
        gso: o.offload,
        gro: o.offload,
        ..SocketConfig::default()
    };
    UdpSocket::bind(o.bind, &cfg).map_err(|e| anyhow!("bind {}: {e}", o.bind))
}

fn net_config(o: &EngineOpts) -> NetConfig {
    let mut cfg = NetConfig {
        driver: o.driver,
        disk: o.disk,
        quic: o.quic,
        ..NetConfig::default()
    };
    cfg.transport.max_mtu = o.max_mtu;
    cfg.sender.compress = o.compress;
    // Experiment knobs (queue-discipline measurements in bench/README.md).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(v) = env("FLUX_BENCH_CONN_WINDOW") {
        cfg.transport.conn_window = v;
    }
    if let Some(v) = env("FLUX_BENCH_STREAM_WINDOW") {
        cfg.transport.stream_window = v;
    }
    if let Some(v) = env("FLUX_BENCH_SEND_WINDOW") {
        cfg.transport.send_window = v;
    }
    if let Some(v) = env("FLUX_BENCH_LANES") {
        cfg.sender.parallel_files = v as u16;
    }
    if let Some(v) = env("FLUX_BENCH_WORK_THREADS") {
        cfg.work_threads = v as usize;
    }
    if let Some(v) = env("FLUX_BENCH_DURABLE") {
        cfg.durable = v != 0;
    }
    if let Some(v) = env("FLUX_BENCH_READ_AHEAD") {
        cfg.sender.read_ahead = v as u32;
    }
    cfg
}

pub(crate) fn finish(mut r: SideReport, start: Instant, out: &Path) -> Result<()> {
    r.wall_s = start.elapsed().as_secs_f64();
    let (cpu, rss) = usage();
    r.cpu_s = cpu;
    r.max_rss_kib = rss;
    std::fs::write(out, serde_json::to_vec(&r)?).with_context(|| format!("{}", out.display()))?;
    match r.error {
        Some(e) => bail!("{}: {e}", r.kind),
        None => Ok(()),
    }
}

/// Serves `file` to one joiner through the engine.
pub fn engine_host(file: &Path, o: &EngineOpts, out: &Path) -> Result<()> {
    let start = Instant::now();
    // Experiment knob: the chunk size (default: chosen from the file's size, as `thru` does).
    let chunk = std::env::var("FLUX_BENCH_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    let share = scan(&[file.to_owned()], chunk)?;
    let id = Identity::generate()?;
    let sock = engine_socket(o)?;
    let addr = sock.local_addr().map_err(|e| anyhow!("{e}"))?;
    println!("READY {addr} {}", hex(&id.fingerprint()));
    let (control, events, _commands) = Control::channels();
    let cfg = net_config(o);
    let manifest = Arc::new(share.manifest);
    let total = manifest.total_bytes();
    let worker =
        std::thread::spawn(move || net::host(sock, &id, manifest, share.sources, &cfg, control));
    let mut r = SideReport {
        kind: format!("engine-{}", o.driver.name()),
        bytes: total,
        ..SideReport::default()
    };
    for ev in events.iter() {
        if let NetEvent::Transfer {
            event: Event::ChunkSent {
                file, index, wire, ..
            },
            ..
        } = ev
        {
            r.wire_bytes += u64::from(wire);
            r.chunks.push((file, index, mono_ns()));
        }
    }
    let rep = worker
        .join()
        .map_err(|_| anyhow!("engine thread panicked"))??;
    fill(&mut r, &rep);
    finish(r, start, out)
}

/// Receives from an engine host into `dest`.
pub fn engine_join(
    peer: SocketAddr,
    fp_hex: &str,
    dest: &Path,
    o: &EngineOpts,
    out: &Path,
) -> Result<()> {
    let start = Instant::now();
    let fp = unhex(fp_hex)?;
    let sock = engine_socket(o)?;
    let (control, events, _commands) = Control::channels();
    let cfg = net_config(o);
    let dest = dest.to_owned();
    let worker = std::thread::spawn(move || net::join(sock, peer, fp, dest, &cfg, control));
    let mut r = SideReport {
        kind: format!("engine-{}", o.driver.name()),
        ..SideReport::default()
    };
    for ev in events.iter() {
        match ev {
            NetEvent::Connected { at, .. } => {
                r.connect_s = Some(at.duration_since(start).as_secs_f64());
            }
            NetEvent::Transfer {
                event: Event::ManifestReady,
                at,
                ..
            } => {
                r.accept_s = Some(at.duration_since(start).as_secs_f64());
            }
            NetEvent::Transfer {
                event:
                    Event::ChunkVerified {
                        file, index, len, ..
                    },
                at,
                ..
            } => {
                r.first_chunk_s
                    .get_or_insert(at.duration_since(start).as_secs_f64());
                r.bytes += u64::from(len);
                r.chunks.push((file, index, mono_ns()));
            }
            _ => {}
        }
    }
    let rep = worker
        .join()
        .map_err(|_| anyhow!("engine thread panicked"))??;
    fill(&mut r, &rep);
    finish(r, start, out)
}

fn fill(r: &mut SideReport, rep: &net::NetReport) {
    r.gso = Some(rep.gso);
    r.gro = Some(rep.gro);
    r.direct_ops = rep.disk.direct_ops;
    r.buffered_ops = rep.disk.buffered_ops;
    r.disk_choice = rep.disk_choice.describe();
    if let Some(c) = rep.conns.first() {
        r.mtu = Some(c.mtu);
        r.rtt_ms = Some(c.rtt.as_secs_f64() * 1e3);
        r.packets_sent = c.packets_sent;
        r.packets_lost = c.packets_lost;
    }
    r.error = rep.error.as_ref().map(ToString::to_string);
    r.sync_s = rep.sync_time.map(|d| d.as_secs_f64());
}

/// Hex of a fingerprint.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        bail!("fingerprint must be 64 hex digits");
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("fingerprint hex")?;
    }
    Ok(out)
}

/// Bytes per read/write of the quinn reference (the engine's chunk size for 2 GiB).
const QUINN_CHUNK: usize = 4 << 20;

fn quinn_transport(max_mtu: u16) -> flux_quic::TransportParams {
    flux_quic::TransportParams {
        max_mtu,
        ..flux_quic::TransportParams::default()
    }
}

fn quinn_socket(bind: SocketAddr) -> Result<std::net::UdpSocket> {
    // The same socket buffers the engine asks for, so the reference is not handicapped by the
    // kernel's 208 KiB default (platform pitfall 2).
    let s = UdpSocket::bind(bind, &SocketConfig::default()).map_err(|e| anyhow!("{e}"))?;
    Ok(s.into_std())
}

fn quinn_stats(r: &mut SideReport, conn: &quinn::Connection) {
    let st = conn.stats();
    r.mtu = Some(st.path.current_mtu);
    r.rtt_ms = Some(conn.rtt().as_secs_f64() * 1e3);
    r.packets_sent = st.path.sent_packets;
    r.packets_lost = st.path.lost_packets;
}

/// The quinn-on-tokio reference host: one unidirectional stream carrying the file, read with
/// `tokio::fs` in 4 MiB pieces, each hashed with BLAKE3 when `hash` (as the engine does).
pub fn quinn_host(
    file: &Path,
    hash: bool,
    mem: bool,
    max_mtu: u16,
    bind: SocketAddr,
    out: &Path,
) -> Result<()> {
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut r = SideReport {
        kind: match (mem, hash) {
            (true, _) => "quinn-tokio-mem",
            (false, true) => "quinn-tokio",
            (false, false) => "quinn-tokio-nohash",
        }
        .into(),
        ..SideReport::default()
    };
    let res: Result<()> = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let id = Identity::generate()?;
        let server = flux_quic::quinn::server_config(&id, &quinn_transport(max_mtu))?;
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            quinn_socket(bind)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        println!("READY {} {}", ep.local_addr()?, hex(&id.fingerprint()));
        let conn = ep
            .accept()
            .await
            .ok_or_else(|| anyhow!("endpoint closed"))?
            .await?;
        let mut s = conn.open_uni().await?;
        if mem {
            // Memory to memory, like quinn's perf tool: the file's size in 4 MiB pieces of
            // one buffer handed over as `Bytes` (no read, no copy, no hash).
            let size = std::fs::metadata(file)?.len();
            let piece = bytes::Bytes::from(vec![0x5au8; QUINN_CHUNK]);
            let mut left = size;
            let mut idx = 0u32;
            while left > 0 {
                let n = left.min(QUINN_CHUNK as u64) as usize;
                s.write_chunk(piece.slice(..n)).await?;
                left -= n as u64;
                r.bytes += n as u64;
                r.chunks.push((0, idx, mono_ns()));
                idx += 1;
            }
            s.finish()?;
            let _ = conn.closed().await;
            quinn_stats(&mut r, &conn);
            ep.wait_idle().await;
            return Ok(());
        }
        let mut f = tokio::fs::File::open(file).await?;
        let mut buf = vec![0u8; QUINN_CHUNK];
        let mut idx = 0u32;
        loop {
            let mut n = 0;
            while n < buf.len() {
                let k = f.read(&mut buf[n..]).await?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                break;
            }
            if hash {
                std::hint::black_box(blake3::hash(&buf[..n]));
            }
            s.write_all(&buf[..n]).await?;
            r.bytes += n as u64;
            r.chunks.push((0, idx, mono_ns()));
            idx += 1;
        }
        s.finish()?;
        // The joiner closes once it has everything.
        let _ = conn.closed().await;
        quinn_stats(&mut r, &conn);
        ep.wait_idle().await;
        Ok(())
    });
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    finish(r, start, out)
}

/// The quinn-on-tokio reference joiner: writes the stream to `dest/<name>` with `tokio::fs`.
#[allow(clippy::too_many_arguments)] // one flag per side option, as for the host
pub fn quinn_join(
    peer: SocketAddr,
    fp_hex: &str,
    dest_file: &Path,
    hash: bool,
    mem: bool,
    max_mtu: u16,
    bind: SocketAddr,
    out: &Path,
) -> Result<()> {
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut r = SideReport {
        kind: match (mem, hash) {
            (true, _) => "quinn-tokio-mem",
            (false, true) => "quinn-tokio",
            (false, false) => "quinn-tokio-nohash",
        }
        .into(),
        ..SideReport::default()
    };
    let fp = unhex(fp_hex)?;
    let dest_file: PathBuf = dest_file.to_owned();
    let res: Result<()> = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let client = flux_quic::quinn::client_config(fp, &quinn_transport(max_mtu))?;
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            quinn_socket(bind)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        ep.set_default_client_config(client);
        let conn = ep.connect(peer, flux_quic::SERVER_NAME)?.await?;
        r.connect_s = Some(start.elapsed().as_secs_f64());
        let mut s = conn.accept_uni().await?;
        if mem {
            // A sink: chunks are dropped as they arrive (QUINN_CHUNK bytes count as a chunk).
            let mut idx = 0u32;
            let mut in_chunk = 0usize;
            while let Some(c) = s.read_chunk(usize::MAX, true).await? {
                r.first_chunk_s.get_or_insert(start.elapsed().as_secs_f64());
                r.bytes += c.bytes.len() as u64;
                in_chunk += c.bytes.len();
                while in_chunk >= QUINN_CHUNK {
                    in_chunk -= QUINN_CHUNK;
                    r.chunks.push((0, idx, mono_ns()));
                    idx += 1;
                }
            }
            quinn_stats(&mut r, &conn);
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            return Ok(());
        }
        let mut f = tokio::fs::File::create(&dest_file).await?;
        let mut buf = vec![0u8; QUINN_CHUNK];
        let mut idx = 0u32;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match s.read(&mut buf[n..]).await? {
                    Some(k) => n += k,
                    None => break,
                }
            }
            if n == 0 {
                break;
            }
            if hash {
                std::hint::black_box(blake3::hash(&buf[..n]));
            }
            f.write_all(&buf[..n]).await?;
            r.first_chunk_s.get_or_insert(start.elapsed().as_secs_f64());
            r.bytes += n as u64;
            r.chunks.push((0, idx, mono_ns()));
            idx += 1;
        }
        // No fsync: the engine's receiver does not fsync either.
        f.flush().await?;
        quinn_stats(&mut r, &conn);
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok(())
    });
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    finish(r, start, out)
}
