//! The signaling server: accept loop, HTTP routes and WebSocket upgrade.
//!
//! Drive it with [`Server::bind`] then [`Server::run`], which returns after the shutdown
//! future resolves and open connections have been told and drained (up to
//! [`ServerConfig::shutdown_grace`]).
//!
//! Sessions live in this process, or with [`ServerConfig::redis_url`] in Redis, shared by
//! a fleet of instances behind a load balancer (see `fleet`).
//!
//! Routes: `GET /healthz` (200 `ok`; 503 while a fleet instance cannot reach Redis), `GET /metrics` (Prometheus text) and the WebSocket
//! endpoint [`flux_signal_proto::WS_PATH`]; with [`RelayConfig::enabled`] also the web relay
//! routes (`/w/…`, `/u/…`, `/v1/relay/…`, see `relay`). Every other path is 404. Plain responses close
//! the connection, and no connection stays in its HTTP phase longer than
//! [`ServerConfig::handshake_timeout`].

mod cidr;
mod conn;
mod fleet;
mod fleet_lua;
mod http;
mod limits;
mod metrics;
mod relay;
mod state;
mod store;
mod web;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use self::cidr::{Cidr, ParseCidrError};
pub use self::metrics::Metrics;
pub use self::relay::{RelayConfig, RelayMetrics};
use self::state::Shared;
use self::store::Store;

/// Everything the server enforces. [`Default`] gives the documented `thruserv` defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Most live sessions; 0 = unlimited.
    pub max_sessions: usize,
    /// Most joiners connected to one session at once.
    pub max_receivers_per_sender: u32,
    /// Largest WebSocket message (and frame) accepted, in bytes.
    pub max_message_bytes: usize,
    /// WebSocket upgrades per minute per client IP (IPv6: per /64); 0 = unlimited.
    pub ws_connects_per_min: u32,
    /// Burst allowance for `ws_connects_per_min`.
    pub ws_connects_burst: u32,
    /// Messages per second per connection; 0 = unlimited.
    pub ws_msgs_per_sec: u32,
    /// Burst allowance for `ws_msgs_per_sec`.
    pub ws_msgs_burst: u32,
    /// Session creates (and joins naming unknown ids) per minute per client IP; 0 = unlimited.
    pub session_creates_per_min: u32,
    /// Burst allowance for `session_creates_per_min`.
    pub session_creates_burst: u32,
    /// Most open WebSocket connections; 0 = unlimited.
    pub max_ws_connections: usize,
    /// Most open WebSocket connections from one client IP (IPv6: /64); 0 = unlimited.
    pub max_ws_connections_per_ip: usize,
    /// Most live sessions hosted from one client IP (IPv6: /64); 0 = unlimited.
    pub max_sessions_per_ip: usize,
    /// Close a connection that sends no frame for this long; `None` = never.
    pub ws_idle_timeout: Option<Duration>,
    /// Close a session this long after its creation, whatever its activity; `None` = never.
    pub session_lifetime: Option<Duration>,
    /// Close a session after its host rejected this many joiners; 0 = unlimited.
    pub max_failed_joins: u32,
    /// Most `relay` messages routed in one session (both directions); 0 = unlimited.
    pub max_session_messages: u64,
    /// Most candidates routed in one session (both directions); 0 = unlimited.
    pub max_session_candidates: u64,
    /// Relay bytes (encoded messages) that one client IP (IPv6: /64) may send between a
    /// host and a joiner that have not paired yet, per minute: a token bucket of this size
    /// that refills continuously. Spent, such relays are refused with
    /// `pairing_rate_limited`. 0 = unlimited.
    pub pre_pairing_bytes_per_ip: u32,
    /// Deadline for the TLS handshake plus the HTTP request (upgrade or plain).
    pub handshake_timeout: Duration,
    /// Deadline for a started WebSocket frame to complete, and for any write to the peer.
    pub frame_timeout: Duration,
    /// Most TCP connections still in the TLS/HTTP handshake; more are dropped at accept.
    /// 0 = unlimited.
    pub max_pending_handshakes: usize,
    /// Most connections in their handshake from one client IP (IPv6: /64); 0 = unlimited.
    /// Not applied to connections from a trusted proxy.
    pub max_pending_per_ip: usize,
    /// Relay loopback candidates (tests and single-machine development only).
    pub allow_loopback_candidates: bool,
    /// Reverse proxies whose `X-Forwarded-For` is believed: a connection from one of these
    /// is keyed for per-IP limits on the rightmost entry of the header; from anyone else
    /// the header is ignored. Empty (the default): never believed.
    pub trusted_proxies: Vec<Cidr>,
    /// How long shutdown waits for connections to close after telling them.
    pub shutdown_grace: Duration,
    /// Name and version sent in the welcome message.
    pub server_name: String,
    /// `redis://` or `rediss://` URL of the store shared by a fleet of instances; `None`
    /// (the default) keeps sessions in this process.
    pub redis_url: Option<RedisUrl>,
    /// The opt-in web relay (`--web-relay`); off by default.
    pub relay: RelayConfig,
}

/// A Redis URL. Its `Debug` and `Display` leave out the user name and password, so a logged
/// configuration does not leak them.
#[derive(Clone, Eq, PartialEq)]
pub struct RedisUrl(pub String);

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({})", fleet::redact(&self.0))
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&fleet::redact(&self.0))
    }
}

impl ServerConfig {
    /// Whether `ip` is one of [`ServerConfig::trusted_proxies`].
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_receivers_per_sender: 10,
            max_message_bytes: 65536,
            ws_connects_per_min: 30,
            ws_connects_burst: 10,
            ws_msgs_per_sec: 50,
            ws_msgs_burst: 100,
            session_creates_per_min: 10,
            session_creates_burst: 5,
            max_ws_connections: 2000,
            max_ws_connections_per_ip: 64,
            max_sessions_per_ip: 20,
            ws_idle_timeout: Some(Duration::from_secs(600)),
            session_lifetime: Some(Duration::from_secs(3600)),
            max_failed_joins: 5,
            max_session_messages: 2000,
            max_session_candidates: 1000,
            pre_pairing_bytes_per_ip: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_pending_per_ip: 16,
            allow_loopback_candidates: false,
            trusted_proxies: Vec::new(),
            shutdown_grace: Duration::from_secs(5),
            server_name: format!("flux-signal/{}", env!("CARGO_PKG_VERSION")),
            redis_url: None,
            relay: RelayConfig::default(),
        }
    }
}

/// Failures that stop the server from starting. Nothing a peer sends produces one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A TLS certificate or key file could not be read or parsed.
    #[error("cannot load TLS {what} from {}", path.display())]
    TlsFile {
        /// `"certificate"` or `"key"`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// rustls refused the certificate/key pair.
    #[error("invalid TLS configuration")]
    Tls(#[from] rustls::Error),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The Redis of [`ServerConfig::redis_url`] is unreachable or refused us.
    #[error("cannot use redis at {url}")]
    Redis {
        /// The URL, without credentials.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
}

/// A bound signaling server, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]). With `tls` the
    /// server speaks HTTPS/WSS only.
    pub async fn bind(
        addr: SocketAddr,
        config: ServerConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, ServerError> {
        if config.max_message_bytes < 1024 {
            return Err(ServerError::Config(
                "max_message_bytes must be at least 1024",
            ));
        }
        let store = match &config.redis_url {
            Some(url) => Store::Fleet(fleet::Fleet::connect(&url.0, &config).await?),
            None => Store::Memory,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(Shared::new(config, shutdown_rx, store)),
            shutdown_tx,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live counters also served on `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, sends every open WebSocket a
    /// `server_shutdown` close and waits up to [`ServerConfig::shutdown_grace`] for them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            shared,
            shutdown_tx,
            tls,
            ..
        } = self;
        let housekeeping = tokio::spawn(limits::housekeeping(shared.clone()));
        let fleet_tasks = match &shared.store {
            Store::Fleet(fleet) => fleet.spawn_tasks(),
            Store::Memory => Vec::new(),
        };
        let mut accept_errors = limits::LogLimiter::new(Duration::from_secs(60));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => spawn_connection(&shared, tcp, peer, tls.clone()),
                    Err(error) => {
                        // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the
                        // connection caps normally keep us far from this.
                        if accept_errors.allow() {
                            warn!(%error, "accept failed; backing off");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        info!("shutting down: closing open connections");
        let _ = shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
        while shared.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        housekeeping.abort();
        // Heartbeats stop first, so none re-registers this instance after it retires.
        for task in fleet_tasks {
            task.abort();
        }
        if let Store::Fleet(fleet) = &shared.store {
            // Whatever did not leave by itself in the grace period is removed now, so its
            // peers on other instances hear at once rather than after the heartbeat lapses.
            fleet.retire().await;
        }
        info!(left_open = shared.open_connections(), "shutdown complete");
    }
}

/// Loads a PEM certificate chain and private key into a rustls server config (ring
/// provider, TLS 1.2 and 1.3, ALPN `http/1.1`).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let pem_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| ServerError::TlsFile {
            what,
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err("certificate", cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificate", cert))?;
    if certs.is_empty() {
        return Err(ServerError::TlsFile {
            what: "certificate",
            path: cert.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "no CERTIFICATE block"),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err("key", key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn spawn_connection(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let per_ip = (!shared.config.is_trusted_proxy(peer.ip())).then(|| peer.ip());
    let Some(pending) = state::PendingGuard::try_new(shared, per_ip) else {
        shared
            .metrics
            .reject(flux_signal_proto::ErrorCode::TooManyConnections);
        debug!(%peer, "dropped at accept: too many pending handshakes");
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut pending = Some(pending);
        let _ = tcp.set_nodelay(true);
        let limit = shared.config.handshake_timeout;
        // A relay stream outlives the handshake deadline; it has its own idle timeout.
        let long_lived = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let serve = async {
            match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        http::serve(stream, peer, shared.clone(), long_lived.clone()).await;
                    }
                    Err(error) => debug!(%peer, %error, "TLS handshake failed"),
                },
                None => http::serve(tcp, peer, shared.clone(), long_lived.clone()).await,
            }
        };
        tokio::pin!(serve);
        let served = tokio::select! {
            () = &mut serve => Ok(()),
            () = tokio::time::sleep(limit) => Err(()),
        };
        let served = match served {
            Err(()) if long_lived.load(std::sync::atomic::Ordering::Acquire) => {
                // A relay stream past the deadline is no longer a pending handshake.
                drop(pending.take());
                serve.await;
                Ok(())
            }
            other => other,
        };
        if served.is_err() {
            shared
                .metrics
                .reject(flux_signal_proto::ErrorCode::HandshakeTimeout);
            debug!(%peer, "handshake timed out");
        }
    });
}
