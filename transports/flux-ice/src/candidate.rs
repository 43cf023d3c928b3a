//! Candidates as they travel through signaling, and the filter for remote ones.
//!
//! The string form is the SDP `candidate` attribute (RFC 8839 §5.1), which is also what the
//! `is` agent parses:
//!
//! ```text
//! candidate:<foundation> <component> udp <priority> <ip> <port> typ <host|srflx|prflx|relay>
//!           [raddr <ip> rport <port>]
//! ```
//!
//! It maps one to one onto `flux_signal_proto::Candidate` (kind, address, protocol, priority,
//! foundation, component, related address).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest candidate string accepted, in bytes: far above any real candidate (about 100), low
/// enough that a hostile peer cannot make parsing expensive.
pub const MAX_CANDIDATE_LEN: usize = 512;
/// Longest foundation (RFC 8445 §5.1.1.3: 1 to 32 ice-chars).
pub const MAX_FOUNDATION_LEN: usize = 32;

/// Candidate type (RFC 8445 §5.1.1).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum CandidateKind {
    /// An address of a local interface.
    Host,
    /// Server reflexive: the address a STUN server saw (the NAT's mapping).
    Srflx,
    /// Peer reflexive: an address learned from a connectivity check.
    Prflx,
    /// A TURN relay allocation.
    Relay,
}

impl CandidateKind {
    /// The SDP name: `host`, `srflx`, `prflx` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Srflx => "srflx",
            Self::Prflx => "prflx",
            Self::Relay => "relay",
        }
    }
}

impl fmt::Display for CandidateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One ICE candidate (UDP; the only transport between peers here — TURN over TCP/TLS still
/// yields a UDP relayed candidate).
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Candidate {
    /// Type.
    pub kind: CandidateKind,
    /// Transport address.
    pub addr: SocketAddr,
    /// ICE priority (RFC 8445 §5.1.2).
    pub priority: u32,
    /// Foundation: 1 to 32 characters of `[A-Za-z0-9+/]`.
    pub foundation: String,
    /// Component id (always 1: one data stream, one component).
    pub component: u16,
    /// Related address of reflexive and relayed candidates; informational only.
    pub related: Option<SocketAddr>,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "candidate:{} {} udp {} {} {} typ {}",
            self.foundation,
            self.component,
            self.priority,
            self.addr.ip(),
            self.addr.port(),
            self.kind
        )?;
        if let Some(r) = self.related {
            write!(f, " raddr {} rport {}", r.ip(), r.port())?;
        }
        Ok(())
    }
}

/// Why a candidate string was not understood.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseCandidateError {
    /// Longer than [`MAX_CANDIDATE_LEN`].
    #[error("candidate longer than {MAX_CANDIDATE_LEN} bytes")]
    TooLong,
    /// No `candidate:` prefix.
    #[error("missing `candidate:` prefix")]
    Prefix,
    /// A required field is missing or malformed.
    #[error("bad or missing {0}")]
    Field(&'static str),
    /// A transport other than UDP.
    #[error("unsupported transport (only udp)")]
    Transport,
}

impl FromStr for Candidate {
    type Err = ParseCandidateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use ParseCandidateError::{Field, Prefix, TooLong, Transport};
        if s.len() > MAX_CANDIDATE_LEN {
            return Err(TooLong);
        }
        let s = s.trim();
        let s = s.strip_prefix("a=").unwrap_or(s);
        let rest = s.strip_prefix("candidate:").ok_or(Prefix)?;
        let mut it = rest.split_ascii_whitespace();
        let foundation = it.next().ok_or(Field("foundation"))?;
        if foundation.is_empty()
            || foundation.len() > MAX_FOUNDATION_LEN
            || !foundation
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        {
            return Err(Field("foundation"));
        }
        let component: u16 = parse_next(&mut it, "component")?;
        if !it
            .next()
            .ok_or(Field("transport"))?
            .eq_ignore_ascii_case("udp")
        {
            return Err(Transport);
        }
        let priority: u32 = parse_next(&mut it, "priority")?;
        let ip: IpAddr = parse_next(&mut it, "address")?;
        let port: u16 = parse_next(&mut it, "port")?;
        if it.next() != Some("typ") {
            return Err(Field("typ"));
        }
        let kind = match it.next() {
            Some("host") => CandidateKind::Host,
            Some("srflx") => CandidateKind::Srflx,
            Some("prflx") => CandidateKind::Prflx,
            Some("relay") => CandidateKind::Relay,
            _ => return Err(Field("type")),
        };
        let (mut raddr, mut rport) = (None, None);
        // Extension attributes come in name/value pairs; unknown ones are skipped.
        while let Some(name) = it.next() {
            let value = it.next().ok_or(Field("extension value"))?;
            match name {
                "raddr" => raddr = Some(value.parse::<IpAddr>().map_err(|_| Field("raddr"))?),
                "rport" => rport = Some(value.parse::<u16>().map_err(|_| Field("rport"))?),
                _ => {}
            }
        }
        let related = match (raddr, rport) {
            (Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
            _ => None,
        };
        Ok(Self {
            kind,
            addr: SocketAddr::new(ip, port),
            priority,
            foundation: foundation.to_owned(),
            component,
            related,
        })
    }
}

fn parse_next<'a, T: FromStr>(
    it: &mut impl Iterator<Item = &'a str>,
    what: &'static str,
) -> Result<T, ParseCandidateError> {
    it.next()
        .ok_or(ParseCandidateError::Field(what))?
        .parse()
        .map_err(|_| ParseCandidateError::Field(what))
}

/// Why a remote candidate address is never checked. Mirrors the signaling server's filter
/// (`flux_signal_proto::check_candidate_addr`), so a candidate that reaches us by another
/// path is judged the same way.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrRejection {
    /// Port 0.
    #[error("port 0")]
    PortZero,
    /// 0.0.0.0/8 or `::`.
    #[error("unspecified address")]
    Unspecified,
    /// 127.0.0.0/8 or `::1` (unless allowed for tests).
    #[error("loopback address")]
    Loopback,
    /// 169.254.0.0/16 or fe80::/10.
    #[error("link-local address")]
    LinkLocal,
    /// Multicast or broadcast.
    #[error("multicast or broadcast address")]
    Multicast,
}

/// Checks that a remote candidate's address is one we would ever send checks to.
pub fn check_remote_addr(addr: SocketAddr, allow_loopback: bool) -> Result<(), AddrRejection> {
    if addr.port() == 0 {
        return Err(AddrRejection::PortZero);
    }
    match addr.ip() {
        IpAddr::V4(v4) => check_v4(v4, allow_loopback),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => check_v4(v4, allow_loopback),
            None => check_v6(v6, allow_loopback),
        },
    }
}

fn check_v4(ip: Ipv4Addr, allow_loopback: bool) -> Result<(), AddrRejection> {
    if ip.octets()[0] == 0 {
        Err(AddrRejection::Unspecified)
    } else if ip.is_loopback() {
        if allow_loopback {
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

fn check_v6(ip: Ipv6Addr, allow_loopback: bool) -> Result<(), AddrRejection> {
    if ip.is_unspecified() {
        Err(AddrRejection::Unspecified)
    } else if ip.is_loopback() {
        if allow_loopback {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Candidate {
            kind: CandidateKind::Srflx,
            addr: "198.51.100.11:40000".parse().unwrap(),
            priority: 1_694_498_815,
            foundation: "abc+/9".into(),
            component: 1,
            related: Some("10.0.1.2:40000".parse().unwrap()),
        };
        let s = c.to_string();
        assert_eq!(
            s,
            "candidate:abc+/9 1 udp 1694498815 198.51.100.11 40000 typ srflx raddr 10.0.1.2 rport 40000"
        );
        assert_eq!(s.parse::<Candidate>().unwrap(), c);
        let v6 = Candidate {
            kind: CandidateKind::Host,
            addr: "[2001:db8::1]:5".parse().unwrap(),
            related: None,
            ..c
        };
        assert_eq!(v6.to_string().parse::<Candidate>().unwrap(), v6);
        // The `is` agent reads our format.
        assert!(is::Candidate::from_sdp_string(&v6.to_string()).is_ok());
    }

    #[test]
    fn rejects_bad_strings() {
        for s in [
            "",
            "candidate:",
            "candidate:1 1 tcp 1 1.2.3.4 5 typ host",
            "candidate:1 1 udp x 1.2.3.4 5 typ host",
            "candidate:1 1 udp 1 1.2.3.4 70000 typ host",
            "candidate:1 1 udp 1 1.2.3.4 5 typ bogus",
            "candidate:1 1 udp 1 1.2.3.4 5 host",
            "candidate:f\u{e9} 1 udp 1 1.2.3.4 5 typ host",
            "candidate:1 1 udp 1 1.2.3.4 5 typ host raddr",
        ] {
            assert!(s.parse::<Candidate>().is_err(), "{s}");
        }
        assert_eq!(
            "x".repeat(600).parse::<Candidate>(),
            Err(ParseCandidateError::TooLong)
        );
    }

    #[test]
    fn address_filter() {
        let bad = [
            ("127.0.0.1:5", AddrRejection::Loopback),
            ("[::1]:5", AddrRejection::Loopback),
            ("[::ffff:127.0.0.1]:5", AddrRejection::Loopback),
            ("169.254.1.1:5", AddrRejection::LinkLocal),
            ("[fe80::1]:5", AddrRejection::LinkLocal),
            ("0.0.0.0:5", AddrRejection::Unspecified),
            ("[::]:5", AddrRejection::Unspecified),
            ("224.0.0.1:5", AddrRejection::Multicast),
            ("255.255.255.255:5", AddrRejection::Multicast),
            ("1.2.3.4:0", AddrRejection::PortZero),
        ];
        for (a, why) in bad {
            assert_eq!(
                check_remote_addr(a.parse().unwrap(), false),
                Err(why),
                "{a}"
            );
        }
        assert!(check_remote_addr("127.0.0.1:5".parse().unwrap(), true).is_ok());
        assert!(check_remote_addr("10.0.0.1:5".parse().unwrap(), false).is_ok());
        assert!(check_remote_addr("[2001:db8::1]:5".parse().unwrap(), false).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s: String) {
            let _ = s.parse::<Candidate>();
        }

        #[test]
        fn parse_fields_never_panic(parts: Vec<String>) {
            let _ = format!("candidate:{}", parts.join(" ")).parse::<Candidate>();
        }
    }
}
