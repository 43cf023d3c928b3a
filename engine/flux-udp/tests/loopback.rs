//! Loopback tests of the UDP layer: GSO, GRO, fallback, ECN, packet info, buffer sizes.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use flux_udp::{EcnCodepoint, GRO_BUF_LEN, RecvMeta, SocketConfig, Transmit, UdpError, UdpSocket};

fn sock(addr: &str, gro: bool) -> UdpSocket {
    let cfg = SocketConfig {
        gro,
        ..SocketConfig::default()
    };
    UdpSocket::bind(addr.parse().expect("addr"), &cfg).expect("bind")
}

/// Receives until `want` payload bytes arrived or 2 s passed.
fn recv_all(s: &UdpSocket, want: usize) -> Vec<(RecvMeta, Vec<u8>)> {
    let mut out = Vec::new();
    let mut got = 0;
    let mut buf = vec![0u8; GRO_BUF_LEN];
    let deadline = Instant::now() + Duration::from_secs(2);
    while got < want && Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(m) => {
                got += m.len;
                out.push((m, buf[..m.len].to_vec()));
            }
            Err(e) if e.is_would_block() => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("recv: {e}"),
        }
    }
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn gso_batch_arrives_as_separate_datagrams_without_gro() {
    let tx = sock("127.0.0.1:0", false);
    let rx = sock("127.0.0.1:0", false);
    if !tx.capabilities().gso {
        eprintln!("SKIP: kernel lacks UDP GSO");
        return;
    }
    let data = pattern(10 * 1200);
    let t = Transmit {
        destination: rx.local_addr().expect("addr"),
        contents: &data,
        segment_size: Some(1200),
        ecn: None,
        src_ip: None,
    };
    assert_eq!(tx.send(&t).expect("send"), 10);
    let got = recv_all(&rx, data.len());
    assert_eq!(got.len(), 10, "one datagram per segment");
    for (i, (m, bytes)) in got.iter().enumerate() {
        assert_eq!(m.len, 1200);
        assert_eq!(m.stride, 1200);
        assert_eq!(m.addr, tx.local_addr().expect("addr"));
        assert_eq!(bytes[..], data[i * 1200..(i + 1) * 1200]);
    }
}

#[test]
fn gso_batch_arrives_as_one_gro_batch() {
    let tx = sock("127.0.0.1:0", false);
    let rx = sock("127.0.0.1:0", true);
    if !tx.capabilities().gso || !rx.capabilities().gro {
        eprintln!("SKIP: kernel lacks UDP GSO or GRO");
        return;
    }
    for (seg, n) in [(1452usize, 45usize), (1200, 10), (9000, 7)] {
        let data = pattern(seg * n);
        let t = Transmit {
            destination: rx.local_addr().expect("addr"),
            contents: &data,
            segment_size: Some(seg),
            ecn: None,
            src_ip: None,
        };
        assert_eq!(tx.send(&t).expect("send"), n);
        let got = recv_all(&rx, data.len());
        assert_eq!(got.len(), 1, "one GRO batch for {n}x{seg}");
        let (m, bytes) = &got[0];
        assert_eq!(m.len, data.len());
        assert_eq!(m.stride, seg);
        assert_eq!(m.segments(bytes).count(), n);
        assert_eq!(bytes[..], data[..]);
    }
}

#[test]
fn shorter_last_segment() {
    let tx = sock("127.0.0.1:0", false);
    let plain = sock("127.0.0.1:0", false);
    let gro = sock("127.0.0.1:0", true);
    let data = pattern(4 * 1000 + 333);
    for rx in [&plain, &gro] {
        let t = Transmit {
            destination: rx.local_addr().expect("addr"),
            contents: &data,
            segment_size: Some(1000),
            ecn: None,
            src_ip: None,
        };
        assert_eq!(tx.send(&t).expect("send"), 5);
        let got = recv_all(rx, data.len());
        let segs: Vec<Vec<u8>> = got
            .iter()
            .flat_map(|(m, b)| m.segments(b).map(<[u8]>::to_vec).collect::<Vec<_>>())
            .collect();
        assert_eq!(segs.len(), 5);
        assert_eq!(segs[4].len(), 333);
        assert_eq!(segs.concat(), data);
    }
}

#[test]
fn gro_batch_may_end_with_foreign_datagram() {
    // A short datagram of the same 5-tuple (think: a STUN check) sent right after a GSO batch
    // may be appended to the batch as its last segment; per-segment demux must see it whole.
    let tx = sock("127.0.0.1:0", false);
    let rx = sock("127.0.0.1:0", true);
    let data = pattern(3 * 1000);
    let stun = [0x00u8, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    let dst = rx.local_addr().expect("addr");
    tx.send(&Transmit {
        destination: dst,
        contents: &data,
        segment_size: Some(1000),
        ecn: None,
        src_ip: None,
    })
    .expect("send batch");
    tx.send(&Transmit {
        destination: dst,
        contents: &stun,
        segment_size: None,
        ecn: None,
        src_ip: None,
    })
    .expect("send stun");
    let got = recv_all(&rx, data.len() + stun.len());
    let segs: Vec<Vec<u8>> = got
        .iter()
        .flat_map(|(m, b)| m.segments(b).map(<[u8]>::to_vec).collect::<Vec<_>>())
        .collect();
    assert_eq!(segs.len(), 4);
    assert_eq!(segs[3], stun);
    assert_eq!(segs[..3].concat(), data);
}

#[test]
fn fallback_without_gso_sends_all_segments() {
    let tx = sock("127.0.0.1:0", false);
    tx.disable_gso();
    assert!(!tx.capabilities().gso);
    let rx = sock("127.0.0.1:0", false);
    let data = pattern(20 * 1452 + 7);
    let t = Transmit {
        destination: rx.local_addr().expect("addr"),
        contents: &data,
        segment_size: Some(1452),
        ecn: None,
        src_ip: None,
    };
    assert_eq!(tx.send(&t).expect("send"), 21);
    let got = recv_all(&rx, data.len());
    assert_eq!(got.len(), 21);
    let all: Vec<u8> = got.into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(all, data);

    // Same through recvmmsg.
    assert_eq!(tx.send(&t).expect("send"), 21);
    std::thread::sleep(Duration::from_millis(20));
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 2048]).collect();
    let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut meta = [RecvMeta {
        addr: "0.0.0.0:0".parse().expect("addr"),
        len: 0,
        stride: 0,
        ecn: None,
        dst_ip: None,
    }; 32];
    let n = rx.recv_batch(&mut slices, &mut meta).expect("recvmmsg");
    assert_eq!(n, 21);
    assert_eq!(meta[20].len, 7);
    assert_eq!(&bufs[20][..7], &data[20 * 1452..]);
}

#[test]
fn gso_limits_are_enforced() {
    let tx = sock("127.0.0.1:0", false);
    let data = vec![0u8; 46 * 1452];
    let t = Transmit {
        destination: "127.0.0.1:9".parse().expect("addr"),
        contents: &data,
        segment_size: Some(1452),
        ecn: None,
        src_ip: None,
    };
    assert!(matches!(
        tx.send(&t),
        Err(UdpError::GsoBatchTooLarge {
            segments: 46,
            max_segments: 45,
            ..
        })
    ));
    let t = Transmit {
        segment_size: Some(0),
        ..t
    };
    assert!(matches!(tx.send(&t), Err(UdpError::ZeroSegmentSize)));
}

#[test]
fn ecn_and_pktinfo_round_trip_v4() {
    let tx = sock("127.0.0.1:0", false);
    let rx = sock("0.0.0.0:0", true);
    let caps = rx.capabilities();
    let port = rx.local_addr().expect("addr").port();
    let dst: SocketAddr = ([127, 0, 0, 1], port).into();
    for ecn in [EcnCodepoint::Ect0, EcnCodepoint::Ect1, EcnCodepoint::Ce] {
        let data = pattern(3000);
        tx.send(&Transmit {
            destination: dst,
            contents: &data,
            segment_size: Some(1000),
            ecn: Some(ecn),
            src_ip: None,
        })
        .expect("send");
        let got = recv_all(&rx, data.len());
        for (m, _) in &got {
            if caps.ecn {
                assert_eq!(m.ecn, Some(ecn));
            }
            if caps.pktinfo {
                assert_eq!(m.dst_ip, Some(IpAddr::from([127, 0, 0, 1])));
            }
        }
    }
    if !caps.ecn {
        eprintln!("SKIP ECN assertions: ECN reporting unsupported");
    }
}

#[test]
fn ecn_src_ip_round_trip_v6() {
    let (Ok(tx), Ok(rx)) = (
        UdpSocket::bind("[::]:0".parse().expect("a"), &SocketConfig::default()),
        UdpSocket::bind("[::]:0".parse().expect("a"), &SocketConfig::default()),
    ) else {
        eprintln!("SKIP: no IPv6");
        return;
    };
    let dst: SocketAddr = format!("[::1]:{}", rx.local_addr().expect("a").port())
        .parse()
        .expect("a");
    let data = pattern(2500);
    if let Err(e) = tx.send(&Transmit {
        destination: dst,
        contents: &data,
        segment_size: Some(1000),
        ecn: Some(EcnCodepoint::Ect1),
        src_ip: Some("::1".parse().expect("ip")),
    }) {
        eprintln!("SKIP: IPv6 loopback unusable: {e}");
        return;
    }
    let got = recv_all(&rx, data.len());
    let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(all, data);
    for (m, _) in &got {
        assert_eq!(m.addr.ip(), "::1".parse::<IpAddr>().expect("ip"));
        if rx.capabilities().ecn {
            assert_eq!(m.ecn, Some(EcnCodepoint::Ect1));
        }
        if rx.capabilities().pktinfo {
            assert_eq!(m.dst_ip, Some("::1".parse().expect("ip")));
        }
    }
    // An IPv4 peer reaches a dual-stack socket as a v4-mapped address.
    let tx4 = sock("127.0.0.1:0", false);
    let dst4: SocketAddr = ([127, 0, 0, 1], rx.local_addr().expect("a").port()).into();
    tx4.send(&Transmit {
        destination: dst4,
        contents: &data[..100],
        segment_size: None,
        ecn: Some(EcnCodepoint::Ect0),
        src_ip: None,
    })
    .expect("send v4");
    let got = recv_all(&rx, 100);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].0.addr.ip(),
        "::ffff:127.0.0.1".parse::<IpAddr>().expect("ip")
    );
    if rx.capabilities().ecn {
        assert_eq!(got[0].0.ecn, Some(EcnCodepoint::Ect0));
    }
}

#[test]
fn v6_destination_on_v4_socket_is_an_error() {
    let tx = sock("127.0.0.1:0", false);
    let r = tx.send(&Transmit {
        destination: "[::1]:9".parse().expect("a"),
        contents: &[1, 2, 3],
        segment_size: None,
        ecn: None,
        src_ip: None,
    });
    assert!(matches!(r, Err(UdpError::AddressFamily { .. })));
}

#[test]
fn buffer_sizes_read_back() {
    let cfg = SocketConfig {
        recv_buffer: 1 << 20,
        send_buffer: 1 << 20,
        ..SocketConfig::default()
    };
    let s = UdpSocket::bind("127.0.0.1:0".parse().expect("a"), &cfg).expect("bind");
    let caps = s.capabilities();
    // Linux doubles the requested value; without CAP_NET_ADMIN it caps at {r,w}mem_max.
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if caps.buffers_forced || rmem_max >= 1 << 20 {
        assert_eq!(caps.recv_buffer, 2 << 20, "{caps:?}");
        assert_eq!(caps.send_buffer, 2 << 20, "{caps:?}");
    } else {
        assert!(
            caps.recv_buffer >= 2 * rmem_max.min(1 << 20) / 2,
            "{caps:?}"
        );
    }
    // The default config asks for DEFAULT_SOCKET_BUFFER; the kernel reports it doubled.
    let s = sock("127.0.0.1:0", true);
    let caps = s.capabilities();
    if caps.buffers_forced {
        assert_eq!(caps.recv_buffer, 2 * flux_udp::DEFAULT_SOCKET_BUFFER);
    } else {
        assert!(caps.recv_buffer >= 208 * 1024, "{caps:?}");
    }
}
