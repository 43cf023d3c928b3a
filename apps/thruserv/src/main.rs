//! `thruserv`: the Thruflux signaling server.
//!
//! A thin binary: it parses flags (every flag also reads a `THRUSERV_*` environment
//! variable), installs the tracing subscriber, raises the open-file limit, and runs
//! [`flux_signal::server::Server`] until SIGTERM or Ctrl-C. All behaviour lives in the
//! library.
//!
//! On start it prints one line to stdout, `listening on ADDR` (or `listening on ADDR (tls)`),
//! so scripts and tests can use `--port 0`.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Parser, ValueEnum};
use flux_signal::server::{Cidr, RedisUrl, Server, ServerConfig, ServerError, load_tls};
use tracing::{info, warn};

/// Thruflux signaling server: pairs hosts with joiners and relays their ICE candidates and
/// handshake messages, then gets out of the way.
#[derive(Debug, Parser)]
#[command(
    name = "thruserv",
    version,
    disable_version_flag = true,
    after_help = "Durations take units: 500ms, 30s, 10m, 1h. A value of 0 disables the limit where noted.\n\n\
                  Exit codes: 0 clean shutdown (SIGTERM/Ctrl-C), 2 usage or setup error (bad flag, port in \
                  use, unreadable TLS files, --redis unreachable). Once listening, nothing a client sends ends the process."
)]
struct Args {
    /// Print the version and exit.
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    version: Option<bool>,

    /// TCP port to listen on (0 picks a free port).
    #[arg(long, env = "THRUSERV_PORT", default_value_t = 8080)]
    port: u16,

    /// Address to listen on (`::` for dual-stack).
    #[arg(long, env = "THRUSERV_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,

    /// Most concurrent sessions (0 disables the cap).
    #[arg(long, env = "THRUSERV_MAX_SESSIONS", default_value_t = 1000)]
    max_sessions: usize,

    /// Most joiners connected to one session at once.
    #[arg(long, env = "THRUSERV_MAX_RECEIVERS_PER_SENDER", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_receivers_per_sender: u32,

    /// Largest WebSocket message in bytes; a larger frame closes that connection.
    #[arg(long, env = "THRUSERV_MAX_MESSAGE_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    max_message_bytes: u64,

    /// WebSocket connects per minute per client IP (IPv6: per /64; 0 disables).
    #[arg(long, env = "THRUSERV_WS_CONNECTS_PER_MIN", default_value_t = 30)]
    ws_connects_per_min: u32,

    /// Burst allowance for --ws-connects-per-min.
    #[arg(long, env = "THRUSERV_WS_CONNECTS_BURST", default_value_t = 10)]
    ws_connects_burst: u32,

    /// Messages per second per connection; a flood closes it (0 disables).
    #[arg(long, env = "THRUSERV_WS_MSGS_PER_SEC", default_value_t = 50)]
    ws_msgs_per_sec: u32,

    /// Burst allowance for --ws-msgs-per-sec.
    #[arg(long, env = "THRUSERV_WS_MSGS_BURST", default_value_t = 100)]
    ws_msgs_burst: u32,

    /// Session creates per minute per client IP; joins to unknown sessions count too (0 disables).
    #[arg(long, env = "THRUSERV_SESSION_CREATES_PER_MIN", default_value_t = 10)]
    session_creates_per_min: u32,

    /// Burst allowance for --session-creates-per-min.
    #[arg(long, env = "THRUSERV_SESSION_CREATES_BURST", default_value_t = 5)]
    session_creates_burst: u32,

    /// Most open WebSocket connections (0 disables the cap).
    #[arg(long, env = "THRUSERV_MAX_WS_CONNECTIONS", default_value_t = 2000)]
    max_ws_connections: usize,

    /// Most open WebSocket connections from one client IP (IPv6: per /64; 0 disables).
    #[arg(long, env = "THRUSERV_MAX_WS_CONNECTIONS_PER_IP", default_value_t = 64)]
    max_ws_connections_per_ip: usize,

    /// Most live sessions hosted from one client IP (IPv6: per /64; 0 disables).
    #[arg(long, env = "THRUSERV_MAX_SESSIONS_PER_IP", default_value_t = 20)]
    max_sessions_per_ip: usize,

    /// Close a connection that sends nothing (not even a ping) for this long (0 disables).
    #[arg(long, env = "THRUSERV_WS_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    ws_idle_timeout: Duration,

    /// Close every session this long after it was created, active or not (0 disables).
    #[arg(long, env = "THRUSERV_SESSION_LIFETIME", default_value = "1h", value_parser = parse_duration)]
    session_lifetime: Duration,

    /// Close a session once its host has rejected this many joiners (0 disables).
    #[arg(long, env = "THRUSERV_MAX_FAILED_JOINS", default_value_t = 5)]
    max_failed_joins: u32,

    /// Most relayed messages per session, both directions together (0 disables).
    #[arg(long, env = "THRUSERV_MAX_SESSION_MESSAGES", default_value_t = 2000)]
    max_session_messages: u64,

    /// Most relayed candidates per session, both directions together (0 disables).
    #[arg(long, env = "THRUSERV_MAX_SESSION_CANDIDATES", default_value_t = 1000)]
    max_session_candidates: u64,

    /// Relay bytes one client IP (IPv6: per /64) may send per minute between hosts and
    /// joiners not yet paired; more are refused with pairing_rate_limited (0 disables).
    #[arg(long, env = "THRUSERV_PRE_PAIRING_BYTES_PER_IP", default_value_t = 256 * 1024)]
    pre_pairing_bytes_per_ip: u32,

    /// Deadline for the TLS handshake and HTTP request of a new connection.
    #[arg(long, env = "THRUSERV_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_nonzero_duration)]
    handshake_timeout: Duration,

    /// Deadline for a started WebSocket frame to arrive completely, and for each write.
    #[arg(long, env = "THRUSERV_FRAME_TIMEOUT", default_value = "10s", value_parser = parse_nonzero_duration)]
    frame_timeout: Duration,

    /// Most connections still in their handshake; more are dropped at accept (0 disables).
    #[arg(long, env = "THRUSERV_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    max_pending_handshakes: usize,

    /// Most connections in their handshake from one client IP (0 disables; not applied
    /// with --trust-forwarded-for).
    #[arg(long, env = "THRUSERV_MAX_PENDING_PER_IP", default_value_t = 16)]
    max_pending_per_ip: usize,

    /// Relay candidates naming loopback addresses (tests and single-machine development only).
    #[arg(long, env = "THRUSERV_ALLOW_LOOPBACK_CANDIDATES")]
    allow_loopback_candidates: bool,

    /// A reverse proxy (address or CIDR range, repeatable) whose X-Forwarded-For is believed:
    /// per-IP limits of connections from it are keyed on the header's rightmost entry. The
    /// header is ignored from every other peer.
    #[arg(
        long,
        env = "THRUSERV_TRUSTED_PROXY",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    trusted_proxy: Vec<Cidr>,

    /// Obsolete: X-Forwarded-For is believed only from --trusted-proxy; given alone this is
    /// a usage error (it trusted the header from anyone).
    #[arg(long, env = "THRUSERV_TRUST_FORWARDED_FOR", hide = true)]
    trust_forwarded_for: bool,

    /// PEM certificate chain; with --tls-key, serve HTTPS/WSS directly.
    #[arg(long, env = "THRUSERV_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "THRUSERV_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, env = "THRUSERV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Keep sessions in this Redis (redis://HOST:PORT/DB, or rediss:// for TLS), shared with
    /// the other instances of a fleet behind a load balancer. Without it sessions live in
    /// this process. Redis must be private to the fleet.
    #[arg(long, env = "THRUSERV_REDIS", value_name = "URL")]
    redis: Option<String>,

    /// Serve the web relay: browser and curl downloads from `thru host --web`, uploads to
    /// `thru join --web`. Off by default; off, thruserv never carries file data.
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_WEB_RELAY")]
    web_relay: bool,

    /// Most live relay links (0 disables the cap).
    #[arg(
        help_heading = "Web relay",
        long,
        env = "THRUSERV_RELAY_MAX",
        default_value_t = 100
    )]
    relay_max: usize,

    /// Most live relay links opened from one client IP (IPv6: per /64; 0 disables).
    #[arg(
        help_heading = "Web relay",
        long,
        env = "THRUSERV_RELAY_MAX_PER_IP",
        default_value_t = 4
    )]
    relay_max_per_ip: usize,

    /// Most bytes one relay link carries in its life, all downloads together (0 disables).
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_RELAY_MAX_BYTES", default_value = "64GiB",
          value_parser = parse_size)]
    relay_max_bytes: u64,

    /// Bytes per second one relay link carries, all its streams together (0 disables).
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_RELAY_RATE", default_value = "0",
          value_parser = parse_size)]
    relay_rate: u64,

    /// Most downloads (or uploads) in flight on one relay link at once.
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_RELAY_MAX_STREAMS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    relay_max_streams: u64,

    /// Cut a relay stream, or a request waiting for its sender, that moves no byte this long.
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_RELAY_IDLE_TIMEOUT", default_value = "60s",
          value_parser = parse_nonzero_duration)]
    relay_idle_timeout: Duration,

    /// End a relay link this long after it was opened, whatever its activity.
    #[arg(help_heading = "Web relay", long, env = "THRUSERV_RELAY_LIFETIME", default_value = "24h",
          value_parser = parse_nonzero_duration)]
    relay_lifetime: Duration,

    /// On SIGTERM, how long to wait for connections to close after telling them.
    #[arg(long, env = "THRUSERV_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    // rustls picks a process-wide crypto provider for code that does not name one (the Redis
    // client's `rediss://`, for one). A build that also links aws-lc (s2n-quic does) leaves two
    // candidates and such code panics: name *ring*, the provider every other connection uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    init_tracing(args.log_format);
    match run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("thruserv: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.trust_forwarded_for && args.trusted_proxy.is_empty() {
        anyhow::bail!(
            "--trust-forwarded-for believed X-Forwarded-For from any client; name the proxies \
             whose header to believe with --trusted-proxy CIDR instead"
        );
    }
    raise_nofile_limit();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(load_tls(cert, key).context("loading --tls-cert/--tls-key")?)
        }
        _ => None,
    };
    let config = config_from(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let addr = SocketAddr::new(args.bind, args.port);
        let tls_on = tls.is_some();
        let server = Server::bind(addr, config, tls).await.map_err(|error| {
            let flag = match error {
                ServerError::Redis { .. } => "--redis".to_string(),
                _ => format!("--bind/--port {addr}"),
            };
            anyhow::Error::new(error).context(flag)
        })?;
        let local = server.local_addr();
        info!(addr = %local, tls = tls_on, version = env!("CARGO_PKG_VERSION"), "listening");
        {
            let mut out = std::io::stdout().lock();
            let suffix = if tls_on { " (tls)" } else { "" };
            // A closed stdout (daemonized) is not an error.
            let _ = writeln!(out, "listening on {local}{suffix}");
            let _ = out.flush();
        }
        server.run(shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn config_from(args: &Args) -> ServerConfig {
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let mut c = ServerConfig::default();
    c.max_sessions = args.max_sessions;
    c.max_receivers_per_sender = args.max_receivers_per_sender;
    c.max_message_bytes = args.max_message_bytes as usize;
    c.ws_connects_per_min = args.ws_connects_per_min;
    c.ws_connects_burst = args.ws_connects_burst;
    c.ws_msgs_per_sec = args.ws_msgs_per_sec;
    c.ws_msgs_burst = args.ws_msgs_burst;
    c.session_creates_per_min = args.session_creates_per_min;
    c.session_creates_burst = args.session_creates_burst;
    c.max_ws_connections = args.max_ws_connections;
    c.max_ws_connections_per_ip = args.max_ws_connections_per_ip;
    c.max_sessions_per_ip = args.max_sessions_per_ip;
    c.ws_idle_timeout = nonzero(args.ws_idle_timeout);
    c.session_lifetime = nonzero(args.session_lifetime);
    c.max_failed_joins = args.max_failed_joins;
    c.max_session_messages = args.max_session_messages;
    c.max_session_candidates = args.max_session_candidates;
    c.pre_pairing_bytes_per_ip = args.pre_pairing_bytes_per_ip;
    c.handshake_timeout = args.handshake_timeout;
    c.frame_timeout = args.frame_timeout;
    c.max_pending_handshakes = args.max_pending_handshakes;
    c.max_pending_per_ip = args.max_pending_per_ip;
    c.allow_loopback_candidates = args.allow_loopback_candidates;
    c.trusted_proxies = args.trusted_proxy.clone();
    c.shutdown_grace = args.shutdown_grace;
    c.server_name = format!("thruserv/{}", env!("CARGO_PKG_VERSION"));
    c.redis_url = args.redis.clone().map(RedisUrl);
    c.relay.enabled = args.web_relay;
    c.relay.max_relays = args.relay_max;
    c.relay.max_relays_per_ip = args.relay_max_per_ip;
    c.relay.max_bytes = args.relay_max_bytes;
    c.relay.rate = args.relay_rate;
    c.relay.max_streams = args.relay_max_streams as usize;
    c.relay.idle_timeout = args.relay_idle_timeout;
    c.relay.lifetime = args.relay_lifetime;
    if args.allow_loopback_candidates {
        warn!("--allow-loopback-candidates is on: for tests and local development only");
    }
    c
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: each WebSocket is a descriptor, and the
/// usual soft default (1024) is below the default connection cap.
fn raise_nofile_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut raised = limit;
    raised.current = limit.maximum;
    if raised.current != limit.current
        && let Err(error) = setrlimit(Resource::Nofile, raised)
    {
        warn!(%error, "could not raise the open-file limit");
    }
    let effective = getrlimit(Resource::Nofile).current;
    info!(nofile = ?effective, "open-file limit");
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => if r.is_ok() { info!("interrupt received") },
    }
}

/// Parses `500ms`, `10s`, `10m`, `1h`; a bare `0` means zero (disabled where allowed).
fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 10m, 1h)"))
}

/// Parses `4096`, `64KiB`, `10MiB`, `64GiB` (powers of 1024; `K`, `KB` and `KiB` alike).
fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => format!("size {s:?} is too large"),
            _ => format!("{s:?} is not a size (a number with K, M, G or T, powers of 1024; examples: 0, 64KiB, 10MiB, 64GiB)"),
        })
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_reference() {
        let a = Args::try_parse_from(["thruserv"]).unwrap();
        assert_eq!(a.port, 8080);
        assert_eq!(a.max_sessions, 1000);
        assert_eq!(a.max_receivers_per_sender, 10);
        assert_eq!(a.max_message_bytes, 65536);
        assert_eq!((a.ws_connects_per_min, a.ws_connects_burst), (30, 10));
        assert_eq!((a.ws_msgs_per_sec, a.ws_msgs_burst), (50, 100));
        assert_eq!(
            (a.session_creates_per_min, a.session_creates_burst),
            (10, 5)
        );
        assert_eq!(a.max_ws_connections, 2000);
        assert_eq!(a.max_ws_connections_per_ip, 64);
        assert_eq!(a.max_sessions_per_ip, 20);
        assert_eq!(a.ws_idle_timeout, Duration::from_secs(600));
        assert_eq!(a.pre_pairing_bytes_per_ip, 256 * 1024);
        // The relay's documented defaults, and they are the library's.
        let (c, d) = (
            config_from(&a).relay,
            flux_signal::server::RelayConfig::default(),
        );
        assert!(!c.enabled);
        assert_eq!(
            (c.max_relays, c.max_relays_per_ip),
            (d.max_relays, d.max_relays_per_ip)
        );
        assert_eq!(
            (c.max_bytes, c.rate, c.max_streams),
            (d.max_bytes, d.rate, d.max_streams)
        );
        assert_eq!((c.idle_timeout, c.lifetime), (d.idle_timeout, d.lifetime));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(
            config_from(&a).pre_pairing_bytes_per_ip,
            ServerConfig::default().pre_pairing_bytes_per_ip
        );
    }

    #[test]
    fn redis_url_reaches_the_config_without_showing_its_password() {
        let a = Args::try_parse_from(["thruserv"]).unwrap();
        assert_eq!(config_from(&a).redis_url, None);
        let a = Args::try_parse_from(["thruserv", "--redis", "redis://:hunter2@10.0.0.5:6379/0"])
            .unwrap();
        let c = config_from(&a);
        assert_eq!(
            c.redis_url,
            Some(RedisUrl("redis://:hunter2@10.0.0.5:6379/0".into()))
        );
        let shown = format!("{c:?}");
        assert!(shown.contains("redis://***@10.0.0.5:6379/0"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_nonzero_duration("0").is_err());
    }
}
