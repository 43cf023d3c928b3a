//! TURN server URLs for the command line: RFC 7065 `turn:`/`turns:` URIs with the long-term
//! credentials in front of the host, which is what `thru --turn-server` takes:
//!
//! ```text
//! turn:USER:PASS@HOST[:PORT][?transport=udp|tcp]     UDP (default) or TCP, port 3478
//! turns:USER:PASS@HOST[:PORT]                         TLS over TCP, port 5349 (use :443)
//! ```
//!
//! The password may contain `:` and `@` (the last `@` ends it). The host is a name or an IP
//! literal (`[v6]` in brackets); resolving a name is the caller's I/O, after which
//! [`TurnUrl::server`] builds the [`TurnServer`].

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::agent::{TurnServer, TurnTransport};

/// A parsed TURN URL.
#[derive(Clone, Eq, PartialEq)]
pub struct TurnUrl {
    /// Transport towards the server.
    pub transport: TurnTransport,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Long-term credential user name.
    pub username: String,
    /// Long-term credential password.
    pub password: String,
}

impl TurnUrl {
    /// The server entry for the agent, once `host` resolved to `ip` (the port is ours).
    pub fn server(&self, ip: std::net::IpAddr) -> TurnServer {
        TurnServer {
            addr: SocketAddr::new(ip, self.port),
            transport: self.transport,
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }
}

impl fmt::Debug for TurnUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // why: keep the password out of logs.
        write!(
            f,
            "TurnUrl({} {}:{} user {})",
            self.transport.as_str(),
            self.host,
            self.port,
            self.username
        )
    }
}

/// Why a TURN URL was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BadTurnUrl {
    /// Not `turn:` or `turns:`.
    #[error("TURN URL must start with turn: or turns:")]
    Scheme,
    /// No `USER:PASS@` in front of the host.
    #[error("TURN URL needs USER:PASS@ before the host")]
    Credentials,
    /// Empty or malformed host, or a bad port.
    #[error("TURN URL has a bad host or port")]
    HostPort,
    /// An unknown `?transport=` value or query.
    #[error("TURN URL transport must be udp or tcp (turns: is always TLS)")]
    Transport,
}

impl FromStr for TurnUrl {
    type Err = BadTurnUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("turns:") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("turn:") {
            (false, r)
        } else {
            return Err(BadTurnUrl::Scheme);
        };
        let (rest, query) = match rest.rsplit_once('?') {
            Some((r, q)) if !q.contains('@') => (r, Some(q)),
            _ => (rest, None),
        };
        let (creds, hostport) = rest.rsplit_once('@').ok_or(BadTurnUrl::Credentials)?;
        let (username, password) = creds.split_once(':').ok_or(BadTurnUrl::Credentials)?;
        if username.is_empty() {
            return Err(BadTurnUrl::Credentials);
        }
        let transport = match (tls, query) {
            (true, None | Some("transport=tcp")) => TurnTransport::Tls,
            (false, None | Some("transport=udp")) => TurnTransport::Udp,
            (false, Some("transport=tcp")) => TurnTransport::Tcp,
            _ => return Err(BadTurnUrl::Transport),
        };
        let default_port = if tls { 5349 } else { 3478 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(BadTurnUrl::HostPort)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| BadTurnUrl::HostPort)?,
                None if after.is_empty() => default_port,
                None => return Err(BadTurnUrl::HostPort),
            };
            (host, port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| BadTurnUrl::HostPort)?),
                None => (hostport, default_port),
            }
        };
        if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
            return Err(BadTurnUrl::HostPort);
        }
        Ok(Self {
            transport,
            host: host.to_owned(),
            port,
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> TurnUrl {
        s.parse().unwrap()
    }

    #[test]
    fn forms() {
        let u = url("turn:flux:fluxpass@198.51.100.2");
        assert_eq!(
            (u.transport, u.host.as_str(), u.port),
            (TurnTransport::Udp, "198.51.100.2", 3478)
        );
        assert_eq!(
            (u.username.as_str(), u.password.as_str()),
            ("flux", "fluxpass")
        );
        let u = url("turn:u:p@relay.example.com:3479?transport=tcp");
        assert_eq!(
            (u.transport, u.host.as_str(), u.port),
            (TurnTransport::Tcp, "relay.example.com", 3479)
        );
        let u = url("turns:u:p:with@signs@relay.example.com:443");
        assert_eq!((u.transport, u.port), (TurnTransport::Tls, 443));
        assert_eq!(u.password, "p:with@signs");
        let u = url("turns:u:p@[2001:db8::1]");
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 5349));
        let s = url("turn:u:p@[2001:db8::1]:9").server("2001:db8::1".parse().unwrap());
        assert_eq!(s.addr, "[2001:db8::1]:9".parse().unwrap());
        let secret = url("turn:user:s3cret@h");
        assert!(!format!("{secret:?}").contains("s3cret"));
    }

    #[test]
    fn refusals() {
        for (s, e) in [
            ("stun:1.2.3.4", BadTurnUrl::Scheme),
            ("turn:1.2.3.4", BadTurnUrl::Credentials),
            ("turn::p@1.2.3.4", BadTurnUrl::Credentials),
            ("turn:u@1.2.3.4", BadTurnUrl::Credentials),
            ("turn:u:p@", BadTurnUrl::HostPort),
            ("turn:u:p@h:0", BadTurnUrl::HostPort),
            ("turn:u:p@h:99999", BadTurnUrl::HostPort),
            ("turn:u:p@[::1", BadTurnUrl::HostPort),
            ("turn:u:p@h?transport=sctp", BadTurnUrl::Transport),
            ("turns:u:p@h?transport=udp", BadTurnUrl::Transport),
        ] {
            assert_eq!(s.parse::<TurnUrl>(), Err(e), "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s: String) {
            let _ = s.parse::<TurnUrl>();
            let _ = format!("turn:{s}").parse::<TurnUrl>();
        }
    }
}
