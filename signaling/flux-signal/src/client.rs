//! The async signaling client `thru` uses: connect, create or join a session, exchange
//! candidates and relayed payloads.
//!
//! ```no_run
//! # async fn demo() -> Result<(), flux_signal::client::ClientError> {
//! use flux_signal::client::{ClientConfig, SignalClient};
//! use flux_signal::proto::{PeerId, ServerMsg};
//!
//! let mut host = SignalClient::connect("ws://127.0.0.1:8080", &ClientConfig::default()).await?;
//! let created = host.create_session().await?;
//! println!("routing id: {}", created.session);
//! while let ServerMsg::PeerJoined { peer } = host.recv().await? {
//!     host.relay(peer, serde_json::json!({ "pake": "…" })).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! The client sends WebSocket pings every [`ClientConfig::ping_interval`] while it waits in
//! [`SignalClient::recv`], so a host waiting for joiners is not closed by the server's idle
//! timeout. It does not retry or reconnect: callers decide.
//!
//! `wss://` URLs need [`ClientConfig::tls`]: the caller chooses the trust roots.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flux_signal_proto::{
    Candidate, ClientMsg, DecodeError, ErrorCode, PROTOCOL_VERSION, PeerId, RoutingId, ServerMsg,
    WS_PATH, decode_server,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// How to reach the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Bind the local socket to this address before connecting (e.g. one interface, or a
    /// second loopback address in tests).
    pub local_ip: Option<IpAddr>,
    /// TLS settings for `wss://` URLs, with the caller's trust roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// WebSocket ping period while waiting for messages; `None` disables pings.
    pub ping_interval: Option<Duration>,
    /// Limit for TCP connect, TLS and the WebSocket handshake together, and for each reply
    /// awaited by [`SignalClient::create_session`] / [`SignalClient::join_session`].
    pub timeout: Duration,
    /// Largest message accepted from the server.
    pub max_message_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            local_ip: None,
            tls: None,
            ping_interval: Some(Duration::from_secs(30)),
            timeout: Duration::from_secs(15),
            max_message_bytes: 1 << 20,
        }
    }
}

impl ClientConfig {
    /// Sets [`ClientConfig::local_ip`].
    pub fn local_ip(mut self, ip: IpAddr) -> Self {
        self.local_ip = Some(ip);
        self
    }

    /// Sets [`ClientConfig::tls`].
    pub fn tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`ClientConfig::ping_interval`].
    pub fn ping_interval(mut self, every: Option<Duration>) -> Self {
        self.ping_interval = every;
        self
    }

    /// Sets [`ClientConfig::timeout`].
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }
}

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `ws://`, `wss://`, `http://` or `https://` with a host.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// As given.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// TCP connect (or name resolution) failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Host and port.
        addr: String,
        /// The last error seen.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {host} failed")]
    Tls {
        /// Server name.
        host: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The server answered the upgrade with an HTTP error and a stable code.
    #[error("server refused the connection: HTTP {status} ({code})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code from the JSON body, [`ErrorCode::Unknown`] without one.
        code: ErrorCode,
    },
    /// The server refused a request.
    #[error("server error {code}: {message}")]
    Server {
        /// Stable code.
        code: ErrorCode,
        /// Detail text.
        message: String,
        /// Whether the server is closing the connection.
        fatal: bool,
    },
    /// The session ended (host left, expired, too many failed joins, rejected…).
    #[error("session closed: {reason}")]
    SessionClosed {
        /// Why.
        reason: ErrorCode,
    },
    /// The connection closed. `reason` is the server's stable code when it gave one.
    #[error("connection closed (WebSocket code {code}, {reason})")]
    Closed {
        /// WebSocket close code (1006 when the connection dropped without one).
        code: u16,
        /// [`ErrorCode`] parsed from the close reason.
        reason: ErrorCode,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol {0}, this client speaks {PROTOCOL_VERSION}")]
    Version(u32),
    /// The server sent something that is not a valid message here.
    #[error("unexpected message from the server: {0}")]
    Unexpected(String),
    /// The server sent a frame that does not decode.
    #[error("malformed message from the server")]
    Decode(#[from] DecodeError),
    /// No answer within [`ClientConfig::timeout`].
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    /// WebSocket transport error.
    #[error("WebSocket error")]
    WebSocket(#[source] Box<tungstenite::Error>),
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(e))
    }
}

/// The server's greeting.
#[derive(Clone, Debug)]
pub struct Welcome {
    /// Protocol version.
    pub protocol: u32,
    /// Server name and version.
    pub server: String,
    /// Largest message the server accepts.
    pub max_message_bytes: u64,
}

/// Answer to [`SignalClient::create_session`].
#[derive(Clone, Debug)]
pub struct SessionCreated {
    /// The routing part of the join code.
    pub session: RoutingId,
    /// Most joiners at once.
    pub max_receivers: u32,
    /// Time until the server closes the session regardless of activity.
    pub expires_in: Option<Duration>,
}

/// Answer to [`SignalClient::join_session`].
#[derive(Clone, Debug)]
pub struct Joined {
    /// The session.
    pub session: RoutingId,
    /// Our peer id in it.
    pub peer: PeerId,
}

/// A connection to a signaling server.
pub struct SignalClient {
    ws: WebSocketStream<ClientStream>,
    welcome: Welcome,
    ping_interval: Option<Duration>,
    next_ping: Option<Instant>,
    reply_timeout: Duration,
}

impl SignalClient {
    /// Connects to `url` (`ws://host[:port][/path]`, `wss://…`; `http`/`https` are read as
    /// `ws`/`wss`; an empty path means [`WS_PATH`]) and reads the welcome.
    pub async fn connect(url: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let target = Target::parse(url)?;
        let limit = config.timeout;
        let ws = timeout(limit, open(&target, config))
            .await
            .map_err(|_| ClientError::Timeout(limit))??;
        let mut client = Self {
            ws,
            welcome: Welcome {
                protocol: 0,
                server: String::new(),
                max_message_bytes: 0,
            },
            ping_interval: config.ping_interval,
            next_ping: None,
            reply_timeout: limit,
        };
        client.arm_ping();
        match client.recv_within().await? {
            ServerMsg::Welcome {
                protocol,
                server,
                max_message_bytes,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ClientError::Version(protocol));
                }
                client.welcome = Welcome {
                    protocol,
                    server,
                    max_message_bytes,
                };
                Ok(client)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The server's greeting.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Creates a session; this connection becomes its host.
    pub async fn create_session(&mut self) -> Result<SessionCreated, ClientError> {
        self.send(&ClientMsg::CreateSession).await?;
        match self.recv_within().await? {
            ServerMsg::SessionCreated {
                session,
                max_receivers,
                expires_in_ms,
                ..
            } => Ok(SessionCreated {
                session,
                max_receivers,
                expires_in: expires_in_ms.map(Duration::from_millis),
            }),
            other => Err(as_error(other)),
        }
    }

    /// Joins session `session` as a joiner.
    pub async fn join_session(&mut self, session: RoutingId) -> Result<Joined, ClientError> {
        self.send(&ClientMsg::JoinSession { session }).await?;
        match self.recv_within().await? {
            ServerMsg::Joined { session, peer, .. } => Ok(Joined { session, peer }),
            other => Err(as_error(other)),
        }
    }

    /// Sends an opaque payload to `to`.
    pub async fn relay(&mut self, to: PeerId, payload: Value) -> Result<(), ClientError> {
        self.send(&ClientMsg::Relay { to, payload }).await
    }

    /// Sends a candidate to `to`.
    pub async fn candidate(&mut self, to: PeerId, candidate: Candidate) -> Result<(), ClientError> {
        self.send(&ClientMsg::Candidate { to, candidate }).await
    }

    /// Host only: reports that joiner `peer` failed authentication.
    pub async fn reject_peer(
        &mut self,
        peer: PeerId,
        reason: Option<String>,
    ) -> Result<(), ClientError> {
        self.send(&ClientMsg::RejectPeer { peer, reason }).await
    }

    /// Sends any client message.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.ws.send(Message::text(msg.encode())).await?;
        Ok(())
    }

    /// Waits for the next server message, sending pings meanwhile. Message types this
    /// version does not know are skipped. A close from the server is
    /// [`ClientError::Closed`].
    pub async fn recv(&mut self) -> Result<ServerMsg, ClientError> {
        loop {
            tokio::select! {
                frame = self.ws.next() => {
                    if let Some(msg) = decode_frame(frame)? {
                        return Ok(msg);
                    }
                }
                () = ping_at(self.next_ping) => {
                    self.ws.send(Message::Ping(Default::default())).await?;
                    self.arm_ping();
                }
            }
        }
    }

    /// Leaves the session and closes the connection.
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.send(&ClientMsg::Leave).await?;
        let _ = timeout(self.reply_timeout, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        Ok(())
    }

    /// Closes the connection without a `leave` (the server treats it the same way).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = timeout(self.reply_timeout, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    async fn recv_within(&mut self) -> Result<ServerMsg, ClientError> {
        let limit = self.reply_timeout;
        timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(limit))?
    }

    fn arm_ping(&mut self) {
        self.next_ping = self.ping_interval.map(|d| Instant::now() + d);
    }
}

/// The transport under a [`connect_relay`] WebSocket: TCP, or TLS over TCP.
pub type RelayStream = ClientStream;

/// Opens a WebSocket to `path` on the server of `url` (its own path is ignored), with
/// binary frames up to 1 MiB: the web relay's control and data connections.
pub async fn connect_relay(
    url: &str,
    path: &str,
    config: &ClientConfig,
) -> Result<WebSocketStream<RelayStream>, ClientError> {
    let mut target = Target::parse(url)?;
    target.path = path.to_string();
    let mut config = config.clone();
    config.max_message_bytes = config.max_message_bytes.max(1 << 20);
    let limit = config.timeout;
    timeout(limit, open(&target, &config))
        .await
        .map_err(|_| ClientError::Timeout(limit))?
}

/// Turns one WebSocket read into a message, `None` for frames to skip.
fn decode_frame(
    frame: Option<Result<Message, tungstenite::Error>>,
) -> Result<Option<ServerMsg>, ClientError> {
    match frame {
        None => Err(ClientError::Closed {
            code: 1006,
            reason: ErrorCode::Unknown,
        }),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Message::Text(text))) => match decode_server(text.as_str()) {
            Ok(msg) => Ok(Some(msg)),
            Err(DecodeError::UnknownType) => Ok(None),
            Err(e) => Err(e.into()),
        },
        Some(Ok(Message::Close(frame))) => Err(match frame {
            Some(f) => ClientError::Closed {
                code: f.code.into(),
                reason: ErrorCode::from_wire(f.reason.as_str()),
            },
            None => ClientError::Closed {
                code: 1005,
                reason: ErrorCode::Unknown,
            },
        }),
        Some(Ok(_)) => Ok(None),
    }
}

fn as_error(msg: ServerMsg) -> ClientError {
    match msg {
        ServerMsg::Error {
            code,
            message,
            fatal,
        } => ClientError::Server {
            code,
            message,
            fatal,
        },
        ServerMsg::SessionClosed { reason } => ClientError::SessionClosed { reason },
        other => unexpected(&other),
    }
}

fn unexpected(msg: &ServerMsg) -> ClientError {
    let text = msg.encode();
    ClientError::Unexpected(text.chars().take(120).collect())
}

async fn ping_at(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A parsed server URL.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |reason| ClientError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return Err(bad("scheme must be ws, wss, http or https")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" {
            WS_PATH.to_string()
        } else {
            path.to_string()
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed IPv6 bracket"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after IPv6 address")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("invalid port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains('@') {
            return Err(bad("missing or invalid host"));
        }
        Ok(Self {
            tls,
            host,
            port,
            path,
        })
    }

    fn request_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

async fn open(
    target: &Target,
    config: &ClientConfig,
) -> Result<WebSocketStream<ClientStream>, ClientError> {
    let authority = format!("{}:{}", target.host, target.port);
    let connect_err = |source| ClientError::Connect {
        addr: authority.clone(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(connect_err)?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    let mut tcp = None;
    for addr in addrs {
        match connect_tcp(addr, config.local_ip).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or_else(|| connect_err(last))?;
    let _ = tcp.set_nodelay(true);
    let stream = if target.tls {
        let tls = config.tls.clone().ok_or(ClientError::InvalidUrl {
            url: target.request_url(),
            reason: "wss:// needs ClientConfig::tls",
        })?;
        let name = rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|_| {
            ClientError::InvalidUrl {
                url: target.request_url(),
                reason: "host is not a valid TLS server name",
            }
        })?;
        let tls_stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Tls {
                host: target.host.clone(),
                source,
            })?;
        ClientStream::Tls(Box::new(tls_stream))
    } else {
        ClientStream::Plain(tcp)
    };
    let ws_config = WebSocketConfig::default()
        // Frames are sent as soon as written: relay data must not pile up in a buffer.
        .write_buffer_size(0)
        // Signaling messages are small; the buffer grows when one is not.
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes));
    match tokio_tungstenite::client_async_with_config(target.request_url(), stream, Some(ws_config))
        .await
    {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let code = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| {
                    v.pointer("/error/code")
                        .and_then(Value::as_str)
                        .map(ErrorCode::from_wire)
                })
                .unwrap_or(ErrorCode::Unknown);
            Err(ClientError::Refused {
                status: resp.status().as_u16(),
                code,
            })
        }
        Err(e) => Err(e.into()),
    }
}

async fn connect_tcp(addr: SocketAddr, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// TCP, optionally inside TLS.
#[doc(hidden)]
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(t.request_url(), "ws://127.0.0.1:8080/v1/signal");
        let t = Target::parse("https://signal.example.org/").unwrap();
        assert!(t.tls);
        assert_eq!(t.request_url(), "wss://signal.example.org:443/v1/signal");
        let t = Target::parse("ws://[::1]:9/custom").unwrap();
        assert_eq!(t.request_url(), "ws://[::1]:9/custom");
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("ws://:80").is_err());
        assert!(Target::parse("ws://h:notaport").is_err());
    }
}
