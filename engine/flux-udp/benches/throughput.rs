//! Loopback send/receive throughput, memory to memory: GSO on/off × GRO on/off × segment size.
//!
//! Modelled on quinn-udp's `benches/throughput.rs`: one thread sends a batch and then drains
//! the receiver, so the measurement covers both syscall paths and the kernel's loopback work
//! (on loopback the receiver's softirq work runs on the sender's thread anyway, pitfall 9).
//! With GSO off, a batch goes out through `sendmmsg` as single datagrams (the crate's fallback);
//! with GRO off, the receiver uses `recvmmsg` with 32 buffers.

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flux_udp::{GRO_BUF_LEN, RecvMeta, SocketConfig, Transmit, UdpSocket, max_gso_segments};

/// Bytes moved per measured iteration.
const TOTAL: usize = 8 << 20;

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("loopback");
    group
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .throughput(Throughput::Bytes(TOTAL as u64));
    for seg in [1452usize, 8952] {
        for gso in [true, false] {
            for gro in [true, false] {
                let name = format!("gso={}/gro={}", on(gso), on(gro));
                let id = BenchmarkId::new(name.clone(), format!("seg={seg}"));
                let cfg = SocketConfig {
                    gro,
                    ..SocketConfig::default()
                };
                let tx =
                    UdpSocket::bind("127.0.0.1:0".parse().expect("addr"), &cfg).expect("bind tx");
                let rx =
                    UdpSocket::bind("127.0.0.1:0".parse().expect("addr"), &cfg).expect("bind rx");
                if !gso {
                    tx.disable_gso();
                }
                eprintln!(
                    "{name} seg={seg}: tx {:?} rx {:?}",
                    tx.capabilities(),
                    rx.capabilities()
                );
                let mut state = Pair::new(tx, rx, seg);
                group.bench_function(id, |b| b.iter(|| state.run(TOTAL)));
            }
        }
    }
    group.finish();
}

struct Pair {
    tx: UdpSocket,
    rx: UdpSocket,
    dst: std::net::SocketAddr,
    seg: usize,
    payload: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    lost: usize,
}

impl Pair {
    fn new(tx: UdpSocket, rx: UdpSocket, seg: usize) -> Self {
        let dst = rx.local_addr().expect("addr");
        let payload = vec![0xab; seg * max_gso_segments(seg)];
        let bufs = (0..32).map(|_| vec![0u8; GRO_BUF_LEN]).collect();
        Self {
            tx,
            rx,
            dst,
            seg,
            payload,
            bufs,
            lost: 0,
        }
    }

    fn run(&mut self, total: usize) {
        let mut sent = 0;
        let mut received = 0;
        let mut meta = [RecvMeta {
            addr: self.dst,
            len: 0,
            stride: 0,
            ecn: None,
            dst_ip: None,
        }; 32];
        while sent < total {
            let t = Transmit {
                destination: self.dst,
                contents: &self.payload,
                segment_size: Some(self.seg),
                ecn: None,
                src_ip: None,
            };
            match self.tx.send(&t) {
                Ok(n) => sent += (n * self.seg).min(self.payload.len()),
                Err(e) if e.is_would_block() => {}
                Err(e) => panic!("send: {e}"),
            }
            // Drain what arrived; wait briefly only once everything is sent.
            loop {
                let mut slices: Vec<IoSliceMut<'_>> =
                    self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match self.rx.recv_batch(&mut slices, &mut meta) {
                    Ok(n) => received += meta[..n].iter().map(|m| m.len).sum::<usize>(),
                    Err(e) if e.is_would_block() => {
                        if sent < total || received >= sent || !wait_readable(&self.rx) {
                            break;
                        }
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        self.lost += sent.saturating_sub(received);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if self.lost > 0 {
            eprintln!("lost {} bytes", self.lost);
        }
    }
}

fn wait_readable(s: &UdpSocket) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut p, 1, 50) > 0 }
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
