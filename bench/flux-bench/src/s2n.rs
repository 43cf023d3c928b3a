//! The `s2n-mem` row: s2n-quic driven by our own loop (flux-quic-s2n over a flux-udp socket
//! with GSO/GRO, one thread, no tokio), memory to memory like `quinn-mem`: the host sends the
//! file's size in 4 MiB pieces of one buffer, the joiner drops what it reads.
//!
//! Both sides pin each other. The joiner generates its identity first and leaves its
//! fingerprint in `s2n-joiner.fp` next to its report; the host pins it from there before the
//! joiner's certificate can arrive.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use flux_quic_s2n::udp::UdpPump;
use flux_quic_s2n::{Config, Connection, Endpoint, Identity, PinSet, Read};
use flux_udp::{SocketConfig, UdpSocket};

use crate::side::{SideReport, finish, hex, mono_ns, unhex};

/// Bytes per piece, as the quinn reference.
const PIECE: usize = 4 << 20;
/// Longest a side runs before it gives up.
const LIMIT: Duration = Duration::from_secs(600);

fn fp_file(out: &Path) -> std::path::PathBuf {
    out.with_file_name("s2n-joiner.fp")
}

/// s2n counts IP and UDP headers in its MTU; `max_mtu` is the UDP payload, as for quinn.
fn config(max_mtu: u16, bind: SocketAddr) -> Config {
    let headers = if bind.is_ipv4() { 28 } else { 48 };
    Config {
        max_mtu: max_mtu.saturating_add(headers),
        ..Config::default()
    }
}

fn socket(bind: SocketAddr, r: &mut SideReport) -> Result<UdpPump> {
    let s =
        UdpSocket::bind(bind, &SocketConfig::default()).map_err(|e| anyhow!("bind {bind}: {e}"))?;
    let caps = s.capabilities();
    r.gso = Some(caps.gso);
    r.gro = Some(caps.gro);
    Ok(UdpPump::new(s))
}

fn stats(r: &mut SideReport, c: &Connection) {
    let s = c.stats();
    r.mtu = Some(s.mtu);
    r.rtt_ms = Some(s.rtt.as_secs_f64() * 1e3);
    r.packets_sent = s.sent_datagrams;
    r.packets_lost = s.lost_packets;
}

/// One loop turn's I/O: receive, then send; waits when nothing moved.
fn turn(pump: &mut UdpPump, ep: &mut Endpoint, busy: bool) -> Result<()> {
    let now = Instant::now();
    let got = pump.recv(ep, now).map_err(|e| anyhow!("recv: {e}"))?;
    let drained = pump.send(ep, now).map_err(|e| anyhow!("send: {e}"))?;
    if got == 0 && !busy && !ep.take_woken() {
        pump.wait(ep, now, !drained, Duration::from_millis(50))
            .map_err(|e| anyhow!("poll: {e}"))?;
        let now = Instant::now();
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
    }
    Ok(())
}

/// Host: serves `size` bytes (the file's size) from memory on one unidirectional stream.
pub fn host(file: &Path, max_mtu: u16, bind: SocketAddr, out: &Path) -> Result<()> {
    let start = Instant::now();
    let mut r = SideReport {
        kind: "s2n-mem".into(),
        ..SideReport::default()
    };
    let res = (|| -> Result<()> {
        let size = std::fs::metadata(file)?.len();
        let mut pump = socket(bind, &mut r)?;
        let local = pump.socket().local_addr().map_err(|e| anyhow!("{e}"))?;
        let id = Identity::generate()?;
        // A previous run's fingerprint must not be pinned: the joiner writes a fresh one.
        let _ = std::fs::remove_file(fp_file(out));
        let pins = Arc::new(PinSet::new());
        let mut ep = Endpoint::server(local, &id, pins.clone(), &config(max_mtu, bind), start)?;
        println!("READY {local} {}", hex(&id.fingerprint()));
        let piece = Bytes::from(vec![0x5au8; PIECE]);
        let (mut pinned, mut conn, mut stream) = (false, None::<Connection>, None);
        let (mut left, mut cur, mut idx) = (size, Bytes::new(), 0u32);
        let mut finished = false;
        while start.elapsed() < LIMIT {
            if !pinned && let Ok(s) = std::fs::read_to_string(fp_file(out)) {
                pins.allow(unhex(s.trim())?);
                pinned = true;
            }
            if conn.is_none() {
                conn = ep.accept();
            }
            let mut busy = false;
            if let Some(c) = conn.as_mut() {
                if c.close_reason().is_some() {
                    // The joiner closes once it has read everything.
                    stats(&mut r, c);
                    break;
                }
                if stream.is_none() {
                    stream = c.open_uni()?;
                }
            }
            if let Some(s) = stream.as_mut() {
                loop {
                    if cur.is_empty() && left > 0 {
                        let n = left.min(PIECE as u64) as usize;
                        cur = piece.slice(..n);
                        left -= n as u64;
                    }
                    if cur.is_empty() {
                        break;
                    }
                    let took = s.write(&mut cur)?;
                    r.bytes += took as u64;
                    busy |= took > 0;
                    if cur.is_empty() {
                        r.chunks.push((0, idx, mono_ns()));
                        idx += 1;
                    }
                    if took == 0 {
                        break;
                    }
                }
                if left == 0 && cur.is_empty() && !finished {
                    s.finish()?;
                    finished = true;
                }
            }
            turn(&mut pump, &mut ep, busy)?;
        }
        if conn.as_ref().is_none_or(|c| c.close_reason().is_none()) {
            bail!("the joiner did not finish within {LIMIT:?}");
        }
        Ok(())
    })();
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    finish(r, start, out)
}

/// Joiner: reads the stream into nothing and closes the connection at its end.
pub fn join(
    peer: SocketAddr,
    fp_hex: &str,
    max_mtu: u16,
    bind: SocketAddr,
    out: &Path,
) -> Result<()> {
    let start = Instant::now();
    let mut r = SideReport {
        kind: "s2n-mem".into(),
        ..SideReport::default()
    };
    let res = (|| -> Result<()> {
        let id = Identity::generate()?;
        // Written whole, then renamed, so the host never reads half of it.
        let tmp = fp_file(out).with_extension("tmp");
        std::fs::write(&tmp, hex(&id.fingerprint())).context("write the joiner's fingerprint")?;
        std::fs::rename(&tmp, fp_file(out)).context("publish the joiner's fingerprint")?;
        let mut pump = socket(bind, &mut r)?;
        let local = pump.socket().local_addr().map_err(|e| anyhow!("{e}"))?;
        let pins = PinSet::of(unhex(fp_hex)?);
        let mut ep = Endpoint::client(local, &id, pins, &config(max_mtu, bind), start)?;
        let mut connecting = Some(ep.connect(peer)?);
        let (mut conn, mut stream) = (None::<Connection>, None);
        let (mut idx, mut in_piece) = (0u32, 0usize);
        let mut done_at = None;
        while start.elapsed() < LIMIT {
            if let Some(c) = connecting.as_mut()
                && let Some(res) = c.poll()
            {
                conn = Some(res?);
                connecting = None;
                r.connect_s = Some(start.elapsed().as_secs_f64());
            }
            let mut busy = false;
            if let (Some(c), None) = (conn.as_mut(), stream.as_ref()) {
                stream = c.accept_uni()?;
            }
            if let (Some(s), None) = (stream.as_mut(), done_at) {
                loop {
                    match s.read()? {
                        Read::Data(b) => {
                            r.first_chunk_s.get_or_insert(start.elapsed().as_secs_f64());
                            r.bytes += b.len() as u64;
                            in_piece += b.len();
                            while in_piece >= PIECE {
                                in_piece -= PIECE;
                                r.chunks.push((0, idx, mono_ns()));
                                idx += 1;
                            }
                            busy = true;
                        }
                        Read::Blocked => break,
                        Read::Finished => {
                            let c = conn.as_ref().ok_or_else(|| anyhow!("no connection"))?;
                            stats(&mut r, c);
                            c.close(0);
                            done_at = Some(Instant::now());
                            break;
                        }
                    }
                }
            }
            turn(&mut pump, &mut ep, busy)?;
            // Give the CONNECTION_CLOSE a moment on the wire, then leave.
            if done_at.is_some_and(|t| t.elapsed() > Duration::from_millis(20)) {
                return Ok(());
            }
        }
        bail!("the transfer did not finish within {LIMIT:?}")
    })();
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    finish(r, start, out)
}
