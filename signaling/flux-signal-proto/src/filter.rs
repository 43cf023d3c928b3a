//! Which candidate addresses a signaling server may pass between peers.
//!
//! A candidate is an address the receiving peer will send packets to. Relaying one that
//! names the receiver's own loopback, a link-local neighbour or the cloud metadata service
//! would let a stranger aim the receiver's ICE checks at its own machine or its provider's
//! internal services, so the server drops them. Private (RFC 1918, ULA) addresses stay:
//! they are how two machines on one LAN find each other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What the server allows beyond the default filter.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct CandidatePolicy {
    /// Relay loopback candidates (127.0.0.0/8, ::1). Only for tests and single-machine
    /// development (`thruserv --allow-loopback-candidates`).
    pub allow_loopback: bool,
}

/// Why a candidate address is not relayed. The string form is used in logs and metrics.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum AddrRejection {
    /// 0.0.0.0/8 or `::`.
    Unspecified,
    /// 127.0.0.0/8 or `::1` (allowed by [`CandidatePolicy::allow_loopback`]).
    Loopback,
    /// 169.254.0.0/16 or fe80::/10.
    LinkLocal,
    /// A cloud instance-metadata endpoint (169.254.169.254, fd00:ec2::254, 100.100.100.200).
    Metadata,
    /// Multicast or the limited broadcast address.
    Multicast,
    /// Port 0 names no socket.
    PortZero,
}

impl AddrRejection {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link_local",
            Self::Metadata => "metadata",
            Self::Multicast => "multicast",
            Self::PortZero => "port_zero",
        }
    }
}

/// Decides whether a candidate naming `addr` may be relayed under `policy`.
///
/// IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) IPv6 addresses are judged by
/// the IPv4 address they carry, so the filter cannot be sidestepped by re-spelling.
pub fn check_candidate_addr(
    addr: SocketAddr,
    policy: CandidatePolicy,
) -> Result<(), AddrRejection> {
    if addr.port() == 0 {
        return Err(AddrRejection::PortZero);
    }
    match addr.ip() {
        IpAddr::V4(v4) => check_v4(v4, policy),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => check_v4(v4, policy),
            None => check_v6(v6, policy),
        },
    }
}

fn check_v4(ip: Ipv4Addr, policy: CandidatePolicy) -> Result<(), AddrRejection> {
    if METADATA_V4.contains(&ip) {
        Err(AddrRejection::Metadata)
    } else if ip.octets()[0] == 0 {
        Err(AddrRejection::Unspecified)
    } else if ip.is_loopback() {
        if policy.allow_loopback {
            Ok(())
        } else {
            Err(AddrRejection::Loopback)
        }
    } else if ip.is_link_local() {
        Err(AddrRejection::LinkLocal)
    } else if ip.is_multicast() || ip.is_broadcast() {
        Err(AddrRejection::Multicast)
    } else {
        Ok(())
    }
}

fn check_v6(ip: Ipv6Addr, policy: CandidatePolicy) -> Result<(), AddrRejection> {
    if METADATA_V6.contains(&ip) {
        Err(AddrRejection::Metadata)
    } else if ip.is_unspecified() {
        Err(AddrRejection::Unspecified)
    } else if ip.is_loopback() {
        if policy.allow_loopback {
            Ok(())
        } else {
            Err(AddrRejection::Loopback)
        }
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Err(AddrRejection::LinkLocal)
    } else if ip.is_multicast() {
        Err(AddrRejection::Multicast)
    } else {
        Ok(())
    }
}

/// The IPv4 address inside an IPv4-mapped or NAT64 well-known-prefix IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    // RFC 6052 §2.1 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

/// AWS/GCP/Azure/OCI use 169.254.169.254; Alibaba Cloud uses 100.100.100.200 (inside the
/// CGNAT range, so it is named explicitly).
const METADATA_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(100, 100, 100, 200),
];
/// AWS's IPv6 instance-metadata endpoint.
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<(), AddrRejection> {
        check_candidate_addr(s.parse().unwrap(), CandidatePolicy::default())
    }

    #[test]
    fn public_and_private_addresses_pass() {
        for ok in [
            "203.0.113.7:4000",
            "192.168.1.20:5000",
            "10.0.0.1:1",
            "[2001:db8::1]:9",
            "[fd12::1]:9",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn dangerous_addresses_are_rejected() {
        use AddrRejection::*;
        let cases = [
            ("127.0.0.1:80", Loopback),
            ("127.9.9.9:80", Loopback),
            ("[::1]:80", Loopback),
            ("[::ffff:127.0.0.1]:80", Loopback),
            ("[64:ff9b::7f00:1]:80", Loopback),
            ("0.0.0.0:80", Unspecified),
            ("[::]:80", Unspecified),
            ("169.254.169.254:80", Metadata),
            ("[::ffff:169.254.169.254]:80", Metadata),
            ("[fd00:ec2::254]:80", Metadata),
            ("100.100.100.200:80", Metadata),
            ("169.254.1.1:80", LinkLocal),
            ("[fe80::1]:80", LinkLocal),
            ("[febf::1]:80", LinkLocal),
            ("224.0.0.251:5353", Multicast),
            ("255.255.255.255:9", Multicast),
            ("[ff02::1]:9", Multicast),
            ("203.0.113.7:0", PortZero),
        ];
        for (addr, want) in cases {
            assert_eq!(check(addr), Err(want), "{addr}");
        }
    }

    #[test]
    fn loopback_allowed_only_by_policy() {
        let policy = CandidatePolicy {
            allow_loopback: true,
        };
        assert_eq!(
            check_candidate_addr("127.0.0.1:9".parse().unwrap(), policy),
            Ok(())
        );
        assert_eq!(
            check_candidate_addr("[::1]:9".parse().unwrap(), policy),
            Ok(())
        );
        // The policy never opens link-local or metadata.
        assert_eq!(
            check_candidate_addr("169.254.169.254:80".parse().unwrap(), policy),
            Err(AddrRejection::Metadata)
        );
    }
}
