//! GSO batches over loopback: plain `sendmsg`/`recvmsg` against io_uring `SENDMSG`/`RECVMSG`,
//! both built with the crate's [`SendHeader`]/[`RecvHeader`] so only the submission path
//! differs. One thread; each round sends one GSO batch (≤ 64 KiB) and receives it as one GRO
//! batch. The io_uring variant keeps `DEPTH` send+receive pairs per `io_uring_enter`.
//!
//! Run: `cargo bench -p flux-udp --bench uring_vs_syscall` (prints Gbit/s, median of 5 runs).

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use flux_udp::{
    GRO_BUF_LEN, RecvHeader, SendHeader, SocketConfig, Transmit, UdpSocket, max_gso_segments,
};
use io_uring::{IoUring, opcode, types};

const RUN: Duration = Duration::from_millis(1500);
const RUNS: usize = 5;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for seg in [1452usize, 8952] {
        let batch = seg * max_gso_segments(seg);
        println!(
            "segment {seg} B, {} segments/batch ({batch} B), loopback MTU 65536",
            batch / seg
        );
        let cases: [(&str, Case); 3] = [
            ("syscalls sendmsg+recvmsg", run_syscalls),
            ("io_uring SENDMSG+RECVMSG depth 1", |s| run_uring(s, 1)),
            ("io_uring SENDMSG+RECVMSG depth 8", |s| run_uring(s, 8)),
        ];
        for (name, f) in cases {
            if filter.as_deref().is_some_and(|flt| !name.contains(flt)) {
                continue;
            }
            let mut rates: Vec<f64> = Vec::new();
            let mut lost = 0;
            for _ in 0..RUNS {
                let (r, l) = f(seg);
                rates.push(r);
                lost += l;
            }
            rates.sort_by(f64::total_cmp);
            println!(
                "  {name:36} median {:6.1} Gbit/s (min {:5.1}, max {:5.1}) lost batches {lost}",
                rates[RUNS / 2],
                rates[0],
                rates[RUNS - 1]
            );
        }
    }
}

/// A measured variant: segment size in, (Gbit/s, lost batches) out.
type Case = fn(usize) -> (f64, usize);

fn pair() -> (UdpSocket, UdpSocket) {
    let cfg = SocketConfig::default();
    let tx = UdpSocket::bind("127.0.0.1:0".parse().expect("a"), &cfg).expect("bind");
    let rx = UdpSocket::bind("127.0.0.1:0".parse().expect("a"), &cfg).expect("bind");
    assert!(
        tx.capabilities().gso && rx.capabilities().gro,
        "needs GSO and GRO"
    );
    (tx, rx)
}

/// Returns (Gbit/s of bytes received, batches lost).
fn run_syscalls(seg: usize) -> (f64, usize) {
    let (tx, rx) = pair();
    let payload = vec![0x5a; seg * max_gso_segments(seg)];
    let mut buf = vec![0u8; GRO_BUF_LEN];
    let t = Transmit {
        destination: rx.local_addr().expect("a"),
        contents: &payload,
        segment_size: Some(seg),
        ecn: None,
        src_ip: None,
    };
    let (mut bytes, mut lost) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed() < RUN {
        for _ in 0..64 {
            tx.send(&t).expect("send");
            match rx.recv(&mut buf) {
                Ok(m) => bytes += m.len,
                Err(e) if e.is_would_block() => lost += 1,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }
    (gbit(bytes, start.elapsed()), lost)
}

fn run_uring(seg: usize, depth: usize) -> (f64, usize) {
    let (tx, rx) = pair();
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(64)
        .or_else(|_| IoUring::new(64))
        .expect("io_uring");
    let payload = vec![0x5a; seg * max_gso_segments(seg)];
    let t = Transmit {
        destination: rx.local_addr().expect("a"),
        contents: &payload,
        segment_size: Some(seg),
        ecn: None,
        src_ip: None,
    };
    // Headers and buffers are boxed and live until the end, so every pointer handed to the
    // ring stays valid until its CQE has been reaped (we wait for all before returning).
    let mut send_hdrs: Vec<Box<SendHeader>> = (0..depth).map(|_| Box::default()).collect();
    let mut recv_hdrs: Vec<Box<RecvHeader>> = (0..depth).map(|_| Box::default()).collect();
    let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; GRO_BUF_LEN]).collect();
    let send_ptrs: Vec<*const libc::msghdr> = send_hdrs
        .iter_mut()
        .map(|h| tx.prepare_send(h, &t).expect("prepare"))
        .collect();
    let recv_ptrs: Vec<*mut libc::msghdr> = recv_hdrs
        .iter_mut()
        .zip(bufs.iter_mut())
        .map(|(h, b)| h.prepare(b))
        .collect();
    let (txfd, rxfd) = (types::Fd(tx.as_raw_fd()), types::Fd(rx.as_raw_fd()));
    let (mut bytes, mut lost) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed() < RUN {
        for i in 0..depth {
            let s = opcode::SendMsg::new(txfd, send_ptrs[i])
                .build()
                .user_data(i as u64);
            let r = opcode::RecvMsg::new(rxfd, recv_ptrs[i])
                .build()
                .user_data((1 << 32) | i as u64);
            // SAFETY: the msghdrs and everything they point to (boxed headers, `payload`,
            // `bufs`) outlive the ring's use of them: all 2*depth CQEs are reaped below before
            // the next round re-prepares or anything is dropped.
            unsafe {
                let mut sq = ring.submission();
                sq.push(&r).expect("sq room");
                sq.push(&s).expect("sq room");
            }
        }
        let mut done = 0;
        while done < 2 * depth {
            ring.submit_and_wait(2 * depth - done).expect("enter");
            for cqe in ring.completion() {
                done += 1;
                let res = cqe.result();
                if cqe.user_data() >> 32 == 1 {
                    if res > 0 {
                        let i = (cqe.user_data() & 0xffff_ffff) as usize;
                        // Re-prepare (resets namelen/controllen) for the next round.
                        bytes += res as usize;
                        let _ = recv_hdrs[i].meta(res as usize);
                    } else {
                        lost += 1;
                    }
                } else {
                    assert!(res >= 0, "sendmsg failed: {res}");
                }
            }
        }
        for (h, b) in recv_hdrs.iter_mut().zip(bufs.iter_mut()) {
            h.prepare(b);
        }
    }
    (gbit(bytes, start.elapsed()), lost)
}

fn gbit(bytes: usize, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}
