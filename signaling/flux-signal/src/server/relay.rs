//! The opt-in web relay (`thruserv --web-relay`): lets someone with only a browser or curl
//! download what a `thru host --web` offers, or upload to a `thru join --web`.
//!
//! The relay never stores file data. Each HTTP download is a pipe: the server asks the host,
//! over the host's control WebSocket ([`HOST_PATH`]), to open a data WebSocket
//! ([`PUSH_PATH`]`/TOKEN`) for that one request, and copies its binary frames into the HTTP
//! response through a channel of [`PIPE_FRAMES`] frames of at most [`MAX_FRAME_BYTES`].
//! A reader that stops reading stops the host's sender (TCP backpressure end to end); one
//! that stays stopped past the idle timeout is cut. Uploads are the same pipe the other way:
//! an HTTP `PUT` body (curl) or a browser's WebSocket ([`UPLOAD_WS_PATH`]) into a data
//! WebSocket the receiving `thru join` opened ([`PULL_PATH`]).
//!
//! In end-to-end mode (the default of `thru host --web`) the host encrypts every chunk with
//! a key that lives in the link's fragment, which browsers never send: the relay sees an
//! opaque manifest, ciphertext and sizes. In plain mode it sees names and bytes.
//!
//! Limits ([`RelayConfig`]): relays in total and per client IP, bytes per relay, a byte
//! rate per relay, concurrent streams per relay, an idle timeout on every pipe and a total
//! lifetime. Links that are unknown, used up and expired all get the same 404.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::http::{Body, full, header_has_token};
use super::state::{Shared, ip_key};

/// The host's control WebSocket (`thru host --web`).
pub const HOST_PATH: &str = "/v1/relay/host";
/// The receiver's control WebSocket (`thru join --web`).
pub const RECV_PATH: &str = "/v1/relay/recv";
/// Where a host opens the data WebSocket of one download: `PUSH_PATH/TOKEN`.
pub const PUSH_PATH: &str = "/v1/relay/push/";
/// Where a receiver opens the data WebSocket of one upload: `PULL_PATH/TOKEN`.
pub const PULL_PATH: &str = "/v1/relay/pull/";
/// A browser's upload WebSocket: `UPLOAD_WS_PATH/ID`.
pub const UPLOAD_WS_PATH: &str = "/v1/relay/upload/";

/// Largest binary frame on a data WebSocket.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Frames buffered between the two sides of one pipe.
pub const PIPE_FRAMES: usize = 4;
/// Largest control message (a manifest of many files).
const MAX_CONTROL_BYTES: usize = 1 << 20;
/// Most files one offer may list.
const MAX_FILES: usize = 100_000;

/// What the operator allows. [`Default`] gives the documented `thruserv` defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Serve the relay routes at all (`--web-relay`). Off: they are 404 and thruserv
    /// never carries file data.
    pub enabled: bool,
    /// Most live relays (links); 0 = unlimited.
    pub max_relays: usize,
    /// Most live relays opened from one client IP (IPv6: /64); 0 = unlimited.
    pub max_relays_per_ip: usize,
    /// Most bytes one relay carries over its life, all streams together; 0 = unlimited.
    pub max_bytes: u64,
    /// Bytes per second one relay carries, all streams together; 0 = unlimited.
    pub rate: u64,
    /// Most downloads or uploads in flight on one relay at once.
    pub max_streams: usize,
    /// A pipe (or a waiting request) that moves no byte for this long is cut.
    pub idle_timeout: Duration,
    /// A relay ends this long after it was opened, whatever its activity.
    pub lifetime: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_relays: 100,
            max_relays_per_ip: 4,
            max_bytes: 64 << 30,
            rate: 0,
            max_streams: 4,
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// Relay counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Relays opened.
    pub opened: AtomicU64,
    /// Relay opens refused by a limit.
    pub refused: AtomicU64,
    /// Streams (downloads and uploads) started.
    pub streams: AtomicU64,
    /// Streams cut by a limit or timeout.
    pub cut: AtomicU64,
    /// Bytes carried, all relays.
    pub bytes: AtomicU64,
    /// Requests for unknown, used or expired links.
    pub not_found: AtomicU64,
}

/// One file of an offer, as the server sees it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RelayFile {
    /// Relative path (plain mode); empty in end-to-end mode.
    #[serde(default)]
    pub name: String,
    /// Bytes the stream of this file carries (ciphertext size in end-to-end mode).
    pub size: u64,
}

/// Control messages from the host or receiver.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum FromOwner {
    /// A host's offer.
    Offer {
        /// `plain` or `e2e`.
        mode: Mode,
        /// The files, in order; downloads name them by index (e2e) or path (plain).
        files: Vec<RelayFile>,
        /// The encrypted manifest (e2e), opaque to the server.
        #[serde(default)]
        blob: Option<String>,
    },
    /// A receiver's request for an upload link.
    Receive {
        /// `plain` or `e2e`.
        mode: Mode,
    },
}

/// Whether the relay can read what it carries.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The server sees names and bytes.
    Plain,
    /// The server sees an opaque manifest, ciphertext and sizes.
    E2e,
}

enum Kind {
    Download {
        files: Vec<RelayFile>,
        blob: Option<String>,
    },
    Upload {
        /// Set by the first uploader: a link works once.
        used: AtomicBool,
    },
}

struct Relay {
    mode: Mode,
    kind: Kind,
    to_owner: mpsc::UnboundedSender<String>,
    bytes: AtomicU64,
    streams: AtomicUsize,
    /// When the rate limit next lets a byte through.
    pace: Mutex<Instant>,
    closed: watch::Receiver<bool>,
}

/// The end of a pipe left for the data WebSocket that attaches to its token.
enum PipeEnd {
    /// Download: frames the host pushes go here, on to the HTTP response.
    Push(mpsc::Sender<io::Result<Bytes>>),
    /// Upload: the receiver reads the uploaded frames from here, and reports its verdict.
    Pull {
        rx: mpsc::Receiver<Bytes>,
        verdict: oneshot::Sender<String>,
    },
}

struct Pending {
    relay: Arc<Relay>,
    end: PipeEnd,
    /// Told when the data WebSocket attached.
    attached: oneshot::Sender<()>,
}

/// The relay table.
pub(crate) struct Relays {
    pub(crate) config: RelayConfig,
    pub(crate) metrics: RelayMetrics,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    relays: HashMap<String, Arc<Relay>>,
    by_ip: HashMap<IpAddr, usize>,
    pending: HashMap<String, Pending>,
}

/// Removes a relay from the table when its owner's connection ends.
struct RelayGuard {
    shared: Arc<Shared>,
    id: String,
    ip: Option<IpAddr>,
    closed: watch::Sender<bool>,
}

impl Drop for RelayGuard {
    fn drop(&mut self) {
        let _ = self.closed.send(true);
        let mut t = self.shared.relays.lock();
        t.relays.remove(&self.id);
        if let Some(ip) = self.ip
            && let Some(n) = t.by_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                t.by_ip.remove(&ip);
            }
        }
        // Requests waiting on this relay's owner fail at once.
        t.pending.retain(|_, p| !*p.relay.closed.borrow());
    }
}

/// One stream slot of a relay, released on drop.
struct StreamSlot(Arc<Relay>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Relays {
    pub(crate) fn new(config: RelayConfig) -> Self {
        Self {
            config,
            metrics: RelayMetrics::default(),
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live relays.
    pub(crate) fn live(&self) -> usize {
        self.lock().relays.len()
    }

    /// Streams in flight, all relays.
    pub(crate) fn streams(&self) -> usize {
        self.lock()
            .relays
            .values()
            .map(|r| r.streams.load(Ordering::Relaxed))
            .sum()
    }

    fn get(&self, id: &str) -> Option<Arc<Relay>> {
        self.lock()
            .relays
            .get(id)
            .filter(|r| !*r.closed.borrow())
            .cloned()
    }
}

impl Relay {
    fn try_stream(self: &Arc<Self>, max: usize) -> Option<StreamSlot> {
        let before = self.streams.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(StreamSlot(self.clone()))
    }

    /// Charges `n` bytes: `Err` when the relay's byte budget is spent, else how long to
    /// wait to respect its rate.
    fn charge(&self, n: usize, config: &RelayConfig) -> Result<Option<Instant>, ()> {
        let total = self.bytes.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        if config.max_bytes != 0 && total > config.max_bytes {
            return Err(());
        }
        if config.rate == 0 {
            return Ok(None);
        }
        let mut pace = self.pace.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let start = (*pace).max(now);
        *pace = start + Duration::from_secs_f64(n as f64 / config.rate as f64);
        Ok((*pace > now).then_some(*pace))
    }

    fn budget_left(&self, config: &RelayConfig) -> bool {
        config.max_bytes == 0 || self.bytes.load(Ordering::Acquire) < config.max_bytes
    }
}

/// Whether `path` belongs to the relay; with the relay off nothing does and every such
/// path is 404 like any other.
pub(crate) fn is_relay_path(path: &str) -> bool {
    path.starts_with("/w/")
        || path.starts_with("/u/")
        || path.starts_with("/v1/relay/")
        || path == "/w"
        || path == "/u"
}

/// Routes one relay request. `long_lived` is set once the request may outlast the
/// handshake deadline (a pipe with its own idle timeout).
pub(crate) async fn route(
    req: Request<Incoming>,
    ip: IpAddr,
    shared: &Arc<Shared>,
    long_lived: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == HOST_PATH || path == RECV_PATH {
        return owner_upgrade(req, ip, shared, path == RECV_PATH);
    }
    if let Some(token) = path.strip_prefix(PUSH_PATH) {
        return data_upgrade(req, shared, token, false);
    }
    if let Some(token) = path.strip_prefix(PULL_PATH) {
        return data_upgrade(req, shared, token, true);
    }
    if let Some(id) = path.strip_prefix(UPLOAD_WS_PATH) {
        return browser_upload(req, shared, id);
    }
    if let Some(asset) = super::web::asset(&path) {
        return asset;
    }
    if let Some(rest) = path.strip_prefix("/w/") {
        if method != Method::GET && method != Method::HEAD {
            return status(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        return download(req, shared, rest, long_lived).await;
    }
    if let Some(rest) = path.strip_prefix("/u/") {
        return upload_route(req, shared, rest, long_lived).await;
    }
    not_found(shared)
}

/// The one answer for unknown, used and expired links: it never tells them apart.
fn not_found(shared: &Shared) -> Response<Body> {
    shared
        .relays
        .metrics
        .not_found
        .fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(full(super::web::GONE_PAGE));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

pub(crate) fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn random_hex(bytes: usize) -> Option<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).ok()?;
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A link id: 12 characters of an unambiguous alphabet (60 bits).
fn new_id() -> Option<String> {
    const ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz_";
    let mut buf = [0u8; 12];
    getrandom::fill(&mut buf).ok()?;
    Some(
        buf.iter()
            .map(|b| ALPHABET[(*b & 31) as usize] as char)
            .collect(),
    )
}

/// Checks an RFC 6455 upgrade and answers 101, returning the upgrade future.
// The error is the response to send: built once per refused request, never hot.
#[allow(clippy::result_large_err)]
fn accept_ws(
    mut req: Request<Incoming>,
) -> Result<(Response<Body>, hyper::upgrade::OnUpgrade), Response<Body>> {
    let headers = req.headers();
    let ok = req.method() == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            == Some(b"13");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).filter(|_| ok) else {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade\n",
        ));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok((resp, on_upgrade))
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn server_ws(on_upgrade: hyper::upgrade::OnUpgrade, max: usize) -> Option<Ws> {
    let upgraded = on_upgrade.await.ok()?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(max * 2);
    Some(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await)
}

async fn close_ws(ws: &mut Ws, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: reason.to_string().into(),
    };
    let _ = timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
}

/// `HOST_PATH` / `RECV_PATH`: a `thru` process opens a relay and owns it while connected.
fn owner_upgrade(
    req: Request<Incoming>,
    ip: IpAddr,
    shared: &Arc<Shared>,
    recv: bool,
) -> Response<Body> {
    let relays = &shared.relays;
    let (resp, on_upgrade) = match accept_ws(req) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    // Limits are checked before the upgrade completes so a refused opener gets an HTTP
    // status it can show.
    let key = (relays.config.max_relays_per_ip != 0).then(|| ip_key(ip));
    {
        let mut t = relays.lock();
        let total_full =
            relays.config.max_relays != 0 && t.relays.len() >= relays.config.max_relays;
        let ip_full = key.is_some_and(|k| {
            t.by_ip.get(&k).copied().unwrap_or(0) >= relays.config.max_relays_per_ip
        });
        if total_full || ip_full {
            drop(t);
            relays.metrics.refused.fetch_add(1, Ordering::Relaxed);
            let mut r = status(
                StatusCode::SERVICE_UNAVAILABLE,
                "{\"error\":{\"code\":\"too_many_relays\",\"message\":\"relay limit reached\"}}",
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        // Reserve the per-IP slot now; the relay itself is inserted once the offer is in.
        if let Some(k) = key {
            *t.by_ip.entry(k).or_insert(0) += 1;
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let (closed_tx, closed_rx) = watch::channel(false);
        let mut guard = RelayGuard {
            shared: shared.clone(),
            id: String::new(),
            ip: key,
            closed: closed_tx,
        };
        let Some(mut ws) = server_ws(on_upgrade, MAX_CONTROL_BYTES).await else {
            return;
        };
        owner_session(&mut ws, &shared, &mut guard, closed_rx, recv).await;
        drop(guard);
    });
    resp
}

async fn owner_session(
    ws: &mut Ws,
    shared: &Arc<Shared>,
    guard: &mut RelayGuard,
    closed: watch::Receiver<bool>,
    recv: bool,
) {
    let relays = &shared.relays;
    let first = timeout(shared.config.handshake_timeout, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Some(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return None,
            }
        }
    })
    .await;
    let Ok(Some(text)) = first else {
        return close_ws(ws, "expected an offer").await;
    };
    let msg: FromOwner = match serde_json::from_str(text.as_str()) {
        Ok(m) => m,
        Err(_) => return close_ws(ws, "invalid_message").await,
    };
    let (mode, kind) = match msg {
        FromOwner::Offer { mode, files, blob } if !recv => {
            if files.len() > MAX_FILES || !offer_ok(mode, &files) {
                return close_ws(ws, "invalid_offer").await;
            }
            (mode, Kind::Download { files, blob })
        }
        FromOwner::Receive { mode } if recv => (
            mode,
            Kind::Upload {
                used: AtomicBool::new(false),
            },
        ),
        _ => return close_ws(ws, "invalid_message").await,
    };
    let Some(id) = new_id() else {
        return close_ws(ws, "internal").await;
    };
    let (to_owner, mut from_server) = mpsc::unbounded_channel();
    let relay = Arc::new(Relay {
        mode,
        kind,
        to_owner,
        bytes: AtomicU64::new(0),
        streams: AtomicUsize::new(0),
        pace: Mutex::new(Instant::now()),
        closed,
    });
    relays.lock().relays.insert(id.clone(), relay.clone());
    guard.id = id.clone();
    relays.metrics.opened.fetch_add(1, Ordering::Relaxed);
    let lifetime = relays.config.lifetime;
    let ready = serde_json::json!({
        "t": "ready",
        "id": id,
        "expires_in_ms": lifetime.as_millis() as u64,
        "max_streams": relays.config.max_streams,
    });
    if ws.send(Message::text(ready.to_string())).await.is_err() {
        return;
    }
    let end = Instant::now() + lifetime;
    let idle = shared.config.ws_idle_timeout;
    let mut idle_at = idle.map(|d| Instant::now() + d);
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return close_ws(ws, "server_shutdown").await,
            () = sleep_until(end) => return close_ws(ws, "relay_expired").await,
            () = async { match idle_at { Some(t) => sleep_until(t).await, None => std::future::pending().await } } => {
                return close_ws(ws, "idle_timeout").await;
            }
            Some(text) = from_server.recv() => {
                if timeout(shared.config.frame_timeout, ws.send(Message::text(text))).await.map_or(true, |r| r.is_err()) {
                    return;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => idle_at = idle.map(|d| Instant::now() + d),
            },
        }
    }
}

/// Plain offers must name files safely: the names become download paths and tar entries.
fn offer_ok(mode: Mode, files: &[RelayFile]) -> bool {
    files.iter().all(|f| match mode {
        Mode::E2e => true,
        Mode::Plain => {
            !f.name.is_empty()
                && f.name.len() <= 4096
                && !f.name.starts_with('/')
                && !f.name.chars().any(char::is_control)
                && f.name
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..")
        }
    })
}

/// `PUSH_PATH/TOKEN` (host, download data) or `PULL_PATH/TOKEN` (receiver, upload data).
fn data_upgrade(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    token: &str,
    pull: bool,
) -> Response<Body> {
    let mut t = shared.relays.lock();
    let Some(pending) = t
        .pending
        .remove(token)
        .filter(|p| matches!(p.end, PipeEnd::Pull { .. }) == pull)
    else {
        drop(t);
        return not_found(shared);
    };
    drop(t);
    let (resp, on_upgrade) = match accept_ws(req) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let Some(ws) = server_ws(on_upgrade, MAX_FRAME_BYTES).await else {
            return;
        };
        let _ = pending.attached.send(());
        match pending.end {
            PipeEnd::Push(tx) => push_pipe(ws, &shared, pending.relay, tx).await,
            PipeEnd::Pull { rx, verdict } => {
                pull_pipe(ws, &shared, pending.relay, rx, verdict).await;
            }
        }
    });
    resp
}

/// Copies the host's frames into the HTTP response of one download.
async fn push_pipe(
    mut ws: Ws,
    shared: &Arc<Shared>,
    relay: Arc<Relay>,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let config = &shared.relays.config;
    let metrics = &shared.relays.metrics;
    let mut closed = relay.closed.clone();
    let idle = config.idle_timeout;
    loop {
        let frame = tokio::select! {
            _ = closed.changed() => None,
            f = timeout(idle, ws.next()) => match f {
                Ok(f) => f,
                Err(_) => {
                    metrics.cut.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
        };
        match frame {
            Some(Ok(Message::Binary(data))) => {
                let n = data.len();
                match relay.charge(n, config) {
                    Err(()) => {
                        metrics.cut.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.try_send(Err(io::Error::other("relay byte limit reached")));
                        return close_ws(&mut ws, "relay_bytes_limit").await;
                    }
                    Ok(Some(at)) => sleep_until(at).await,
                    Ok(None) => {}
                }
                metrics.bytes.fetch_add(n as u64, Ordering::Relaxed);
                // A reader that stops reading holds the host back; one that stays stopped
                // past the idle timeout is cut.
                match timeout(idle, tx.send(Ok(data))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return close_ws(&mut ws, "reader_gone").await,
                    Err(_) => {
                        metrics.cut.fetch_add(1, Ordering::Relaxed);
                        return close_ws(&mut ws, "reader_idle").await;
                    }
                }
            }
            Some(Ok(Message::Text(t))) if t.as_str() == "end" => {
                // Dropping `tx` ends the body cleanly.
                drop(tx);
                let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            _ => {
                // An error, not an end: the response is cut short rather than look complete.
                let _ = tx.try_send(Err(io::Error::other("host stopped sending")));
                return close_ws(&mut ws, "ended").await;
            }
        }
    }
}

/// Copies an upload's frames to the receiver's data WebSocket, then relays its verdict.
async fn pull_pipe(
    mut ws: Ws,
    shared: &Arc<Shared>,
    relay: Arc<Relay>,
    mut rx: mpsc::Receiver<Bytes>,
    verdict: oneshot::Sender<String>,
) {
    let idle = shared.relays.config.idle_timeout;
    let mut closed = relay.closed.clone();
    loop {
        tokio::select! {
            _ = closed.changed() => return close_ws(&mut ws, "ended").await,
            // The receiver may refuse before the end (a hostile name, too many bytes): its
            // verdict goes back to the uploader at once, and the upload stops.
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(t))) => {
                    let _ = verdict.send(t.as_str().to_string());
                    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return,
            },
            next = timeout(idle, rx.recv()) => match next {
                Ok(Some(data)) => {
                    if timeout(idle, ws.send(Message::Binary(data))).await.map_or(true, |r| r.is_err()) {
                        shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                        return close_ws(&mut ws, "receiver_idle").await;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                    return close_ws(&mut ws, "uploader_idle").await;
                }
            },
        }
    }
    if ws.send(Message::text("end")).await.is_err() {
        return;
    }
    // The receiver verifies and writes; its verdict (one text frame) goes back to the uploader.
    let answer = timeout(idle, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Some(t.as_str().to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return None,
            }
        }
    })
    .await;
    if let Ok(Some(text)) = answer {
        let _ = verdict.send(text);
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// A response body fed by a pipe; holds the stream slot until the body is dropped.
struct PipeBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    _slot: StreamSlot,
}

impl hyper::body::Body for PipeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Asks the relay's owner to open a data WebSocket for `msg`, leaving `end` for it, and
/// waits until it attaches. `false`: it did not in time.
async fn request_pipe(
    shared: &Arc<Shared>,
    relay: &Arc<Relay>,
    mut msg: serde_json::Value,
    end: PipeEnd,
) -> bool {
    let Some(token) = random_hex(16) else {
        return false;
    };
    let (attached_tx, attached) = oneshot::channel();
    shared.relays.lock().pending.insert(
        token.clone(),
        Pending {
            relay: relay.clone(),
            end,
            attached: attached_tx,
        },
    );
    msg["req"] = token.clone().into();
    let _ = relay.to_owner.send(msg.to_string());
    let got = timeout(shared.relays.config.idle_timeout, attached).await;
    shared.relays.lock().pending.remove(&token);
    matches!(got, Ok(Ok(())))
}

/// `GET /w/...`: the landing page, the manifest, a file, or (plain) the tar of everything.
async fn download(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    rest: &str,
    long_lived: &AtomicBool,
) -> Response<Body> {
    let (id, sub) = match rest.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (rest, None),
    };
    let (id, tar) = match id.strip_suffix(".tar") {
        Some(id) if sub.is_none() => (id, true),
        _ => (id, false),
    };
    let Some(relay) = shared.relays.get(id) else {
        return not_found(shared);
    };
    let Kind::Download { files, blob } = &relay.kind else {
        return not_found(shared);
    };
    match sub {
        None if !tar => super::web::page("download.html"),
        Some("") => super::web::page("download.html"),
        Some("manifest") if relay.mode == Mode::E2e => {
            let body = serde_json::json!({
                "mode": relay.mode,
                "files": files,
                "blob": blob,
            });
            json(body.to_string())
        }
        Some("manifest") => {
            json(serde_json::json!({ "mode": relay.mode, "files": files }).to_string())
        }
        _ => {
            let file = match (tar, sub) {
                (true, _) if relay.mode == Mode::Plain => None,
                (true, _) => return not_found(shared),
                (false, Some(sub)) => {
                    let i = match relay.mode {
                        Mode::E2e => sub.parse::<usize>().ok(),
                        Mode::Plain => {
                            let name = percent_decode(sub);
                            files.iter().position(|f| Some(&f.name) == name.as_ref())
                        }
                    };
                    match i {
                        Some(i) if i < files.len() => Some(i),
                        _ => return status(StatusCode::NOT_FOUND, "no such file in this link\n"),
                    }
                }
                (false, None) => return not_found(shared),
            };
            stream_download(req, shared, &relay, files, file, long_lived).await
        }
    }
}

async fn stream_download(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    relay: &Arc<Relay>,
    files: &[RelayFile],
    file: Option<usize>,
    long_lived: &AtomicBool,
) -> Response<Body> {
    let config = &shared.relays.config;
    if !relay.budget_left(config) {
        return status(
            StatusCode::FORBIDDEN,
            "this link has carried all the bytes the server allows\n",
        );
    }
    // Range is honoured for single files (so `curl -C -` resumes): one range only.
    let (size, range) = match file {
        Some(i) => {
            let size = files[i].size;
            match req
                .headers()
                .get(header::RANGE)
                .map(|v| parse_range(v.as_bytes(), size))
            {
                None => (Some(size), None),
                Some(Some(r)) => (Some(size), Some(r)),
                Some(None) => {
                    let mut r =
                        status(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return r;
                }
            }
        }
        None => (None, None),
    };
    let head = req.method() == Method::HEAD;
    let (start, end) = range.unwrap_or((0, size.unwrap_or(0)));
    let Some(slot) = relay.try_stream(config.max_streams) else {
        shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
        let mut r = status(
            StatusCode::TOO_MANY_REQUESTS,
            "too many downloads on this link at once; try again\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    };
    let body = if head || (file.is_some() && start == end) {
        Body::default()
    } else {
        long_lived.store(true, Ordering::Release);
        shared
            .relays
            .metrics
            .streams
            .fetch_add(1, Ordering::Relaxed);
        let msg = match file {
            Some(i) => serde_json::json!({ "t": "get", "file": i, "start": start, "end": end }),
            None => serde_json::json!({ "t": "tar" }),
        };
        let (tx, rx) = mpsc::channel(PIPE_FRAMES);
        if !request_pipe(shared, relay, msg, PipeEnd::Push(tx)).await {
            return status(StatusCode::GATEWAY_TIMEOUT, "the sender did not answer\n");
        }
        Body::new(PipeBody { rx, _slot: slot })
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if file.is_none() {
            "application/x-tar"
        } else {
            "application/octet-stream"
        }),
    );
    if let Some(size) = size {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if range.is_some()
            && let Ok(v) =
                HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end.saturating_sub(1)))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if relay.mode == Mode::Plain {
        let name = match file {
            Some(i) => files[i]
                .name
                .rsplit('/')
                .next()
                .unwrap_or("download")
                .to_string(),
            None => "download.tar".to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&content_disposition(&name)) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    resp
}

fn json(body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// `attachment; filename="ascii"; filename*=UTF-8''percent-encoded`.
fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One `bytes=` range of a `size`-byte file as `[start, end)`; `None` if unsatisfiable.
/// Several ranges are answered with the first only.
fn parse_range(value: &[u8], size: u64) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let spec = s.strip_prefix("bytes=")?.split(',').next()?.trim();
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>().ok()?.saturating_add(1).min(size)
        };
        (start, end)
    };
    (start < end || (start == size && size == 0)).then_some((start, end))
}

// --- uploads -------------------------------------------------------------------------------

/// `PUT /u/ID/NAME` (curl -T) streams its body to the receiver; `GET /u/ID` is the page.
async fn upload_route(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    rest: &str,
    long_lived: &AtomicBool,
) -> Response<Body> {
    let (id, name) = match rest.split_once('/') {
        Some((id, name)) => (id, name),
        None => (rest, ""),
    };
    let Some(relay) = shared.relays.get(id) else {
        return not_found(shared);
    };
    let Kind::Upload { used } = &relay.kind else {
        return not_found(shared);
    };
    if req.method() == Method::GET || req.method() == Method::HEAD {
        if used.load(Ordering::Acquire) {
            return not_found(shared);
        }
        return super::web::page("upload.html");
    }
    if req.method() != Method::PUT && req.method() != Method::POST {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "use PUT (curl -T FILE URL)\n",
        );
    }
    if relay.mode != Mode::Plain {
        return status(
            StatusCode::BAD_REQUEST,
            "this link takes encrypted uploads from its page only\n",
        );
    }
    let Some(name) = percent_decode(name).filter(|n| !n.is_empty()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "name the file: curl -T FILE https://SERVER/u/ID/\n",
        );
    };
    let size = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if used.swap(true, Ordering::AcqRel) {
        return not_found(shared);
    }
    let Some(slot) = relay.try_stream(shared.relays.config.max_streams) else {
        return status(StatusCode::TOO_MANY_REQUESTS, "busy\n");
    };
    long_lived.store(true, Ordering::Release);
    shared
        .relays
        .metrics
        .streams
        .fetch_add(1, Ordering::Relaxed);
    let config = &shared.relays.config;
    let (tx, rx) = mpsc::channel::<Bytes>(PIPE_FRAMES);
    let (verdict, verdict_rx) = oneshot::channel();
    let msg = serde_json::json!({ "t": "put", "name": name, "size": size });
    if !request_pipe(shared, &relay, msg, PipeEnd::Pull { rx, verdict }).await {
        return status(StatusCode::GATEWAY_TIMEOUT, "the receiver did not answer\n");
    }
    let mut body = req.into_body();
    let idle = config.idle_timeout;
    loop {
        match timeout(idle, body.frame()).await {
            Err(_) => {
                shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                return status(StatusCode::REQUEST_TIMEOUT, "upload stalled\n");
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => return status(StatusCode::BAD_REQUEST, "upload broken off\n"),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if relay.charge(data.len(), config).is_err() {
                    shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                    return status(StatusCode::PAYLOAD_TOO_LARGE, "relay byte limit reached\n");
                }
                shared
                    .relays
                    .metrics
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                // The receiver refusing mid-way drops its end; stop reading then.
                if timeout(idle, tx.send(data))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _slot = slot;
    match timeout(idle, verdict_rx).await {
        Ok(Ok(v)) if v.starts_with("ok") => status_owned(StatusCode::OK, format!("{v}\n")),
        Ok(Ok(v)) => status_owned(StatusCode::UNPROCESSABLE_ENTITY, format!("{v}\n")),
        _ => status(StatusCode::BAD_GATEWAY, "the receiver did not confirm\n"),
    }
}

fn status_owned(code: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// `UPLOAD_WS_PATH/ID`: a browser's end-to-end encrypted upload. Its binary frames (the
/// sealed manifest, then sealed chunks) go to the receiver as they are; its text `end`
/// ends the upload, and the receiver's verdict comes back as one text frame.
fn browser_upload(req: Request<Incoming>, shared: &Arc<Shared>, id: &str) -> Response<Body> {
    let Some(relay) = shared.relays.get(id) else {
        return not_found(shared);
    };
    let Kind::Upload { used } = &relay.kind else {
        return not_found(shared);
    };
    if relay.mode != Mode::E2e || used.load(Ordering::Acquire) {
        return not_found(shared);
    }
    let Some(slot) = relay.try_stream(shared.relays.config.max_streams) else {
        return status(StatusCode::TOO_MANY_REQUESTS, "busy\n");
    };
    let (resp, on_upgrade) = match accept_ws(req) {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if used.swap(true, Ordering::AcqRel) {
        return not_found(shared);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let Some(mut ws) = server_ws(on_upgrade, MAX_FRAME_BYTES).await else {
            return;
        };
        shared
            .relays
            .metrics
            .streams
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Bytes>(PIPE_FRAMES);
        let (verdict, verdict_rx) = oneshot::channel();
        let msg = serde_json::json!({ "t": "put" });
        if !request_pipe(&shared, &relay, msg, PipeEnd::Pull { rx, verdict }).await {
            return close_ws(&mut ws, "receiver_gone").await;
        }
        let config = &shared.relays.config;
        let idle = config.idle_timeout;
        loop {
            match timeout(idle, ws.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => {
                    if relay.charge(data.len(), config).is_err() {
                        shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                        return close_ws(&mut ws, "relay_bytes_limit").await;
                    }
                    shared
                        .relays
                        .metrics
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if timeout(idle, tx.send(data))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        return close_ws(&mut ws, "receiver_stopped").await;
                    }
                }
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "end" => break,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Err(_) => {
                    shared.relays.metrics.cut.fetch_add(1, Ordering::Relaxed);
                    return close_ws(&mut ws, "idle_timeout").await;
                }
                _ => return,
            }
        }
        drop(tx);
        let answer = timeout(idle, verdict_rx).await;
        let text = match answer {
            Ok(Ok(v)) => v,
            _ => "refused: the receiver did not confirm".into(),
        };
        let _ = ws.send(Message::text(text)).await;
        let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-99", 1000), Some((0, 100)));
        assert_eq!(parse_range(b"bytes=500-", 1000), Some((500, 1000)));
        assert_eq!(parse_range(b"bytes=-100", 1000), Some((900, 1000)));
        assert_eq!(parse_range(b"bytes=0-5000", 1000), Some((0, 1000)));
        assert_eq!(parse_range(b"bytes=1000-", 1000), None);
        assert_eq!(parse_range(b"items=0-1", 1000), None);
    }

    #[test]
    fn plain_names_are_checked() {
        let f = |n: &str| RelayFile {
            name: n.into(),
            size: 1,
        };
        assert!(offer_ok(Mode::Plain, &[f("a/b.txt")]));
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "a\nb", "./a"] {
            assert!(!offer_ok(Mode::Plain, &[f(bad)]), "{bad:?}");
        }
    }

    #[test]
    fn disposition() {
        assert_eq!(
            content_disposition("a b\"é.txt"),
            "attachment; filename=\"a b__.txt\"; filename*=UTF-8''a%20b%22%C3%A9.txt"
        );
    }
}
