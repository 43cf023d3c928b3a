//! QUIC over s2n-quic, driven by the Thruflux engine's own loop, socket and clock.
//!
//! # What it does
//!
//! s2n-quic normally owns its event loop: its default I/O provider spawns a tokio task that
//! reads the socket, runs the endpoint and sleeps on its timers. This crate plugs in an I/O
//! provider of its own (module `io`) that spawns nothing. It takes the endpoint s2n hands to the
//! provider and drives it from the caller's thread, the way the engine drives quinn-proto:
//!
//! - [`Endpoint::handle`]: one received datagram or GRO batch, `(from, bytes, ECN)`, borrowed
//!   and decrypted in place;
//! - [`Endpoint::poll_transmit`]: the next datagram or GSO batch to send, `(to, bytes, segment
//!   size, ECN)`; segments are batched as s2n-quic's own socket layer batches them;
//! - [`Endpoint::poll_timeout`] / [`Endpoint::handle_timeout`]: the caller's clock (an
//!   [`Instant`] passed in on every call; a virtual clock works as well as the real one);
//! - [`Connection`], [`SendStream`], [`RecvStream`]: s2n-quic's poll-based handles, polled with
//!   a waker that only raises a flag ([`Endpoint::take_woken`]), so no runtime is involved.
//! - [`S2nConn`]: a connection behind flux-quic's stack-neutral `QuicConnection` seam (stream
//!   ids, exact `Readable` events); its transmits and timers stay with the [`Endpoint`].
//! - [`S2nEndpoint`]: an endpoint owning its connections by [`ConnId`], transmitting into the
//!   caller's buffer: the endpoint-level shape the engine's `Node` needs for s2n.
//!
//! TLS is flux-quic's (`flux_quic::tls`, the same configuration quinn gets): 1.3 only, on
//! rustls with *ring*, ALPN `thruflux/1`, certificates pinned by BLAKE3 fingerprint
//! ([`PinSet`], flux-quic's `AllowList`); identities are flux-quic's [`Identity`]. Windows, idle
//! timeout and keep-alive come from [`Config`]. s2n bounds each stream's send buffer; [`S2nConn`]
//! adds the connection-wide bound the engine's sessions set (`set_send_window`).
//!
//! # What it does not do
//!
//! - No socket, no thread, no clock reads: the caller owns all three (flux-udp in the engine,
//!   an in-memory link in the tests).
//! - No close reason text: s2n-quic's application close carries an error code only.
//! - No receive-window auto-tuning like flux-quic's `WindowTuner`: s2n-quic sets windows once
//!   per endpoint.
//! - TLS is configured per endpoint, not per connection (s2n-quic's model): a client that
//!   connects to several peers pins all of them in one [`PinSet`] and checks
//!   [`Connection::peer_fingerprint`].
//! - It does not avoid aws-lc: s2n-quic's address-token provider and its rustls glue depend on
//!   `s2n-quic-crypto`, which builds aws-lc-rs, even though the handshake and packet keys here
//!   come from *ring*.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod conn;
mod events;
mod io;
mod node;
mod tls;
#[cfg(feature = "udp")]
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use s2n_quic::client::Connect;
use s2n_quic::provider::congestion_controller;
use s2n_quic::provider::limits::Limits;

pub use conn::S2nConn;
pub use events::Stats;
pub use flux_quic::Identity;
pub use io::Transmit;
use io::{Clock, Driven, EngineIo, RxDatagram, Slot, TxQueue};
pub use node::{ConnId, EndpointEvent, S2nEndpoint};
pub use tls::PinSet;

/// ALPN protocol id of the transfer protocol (as flux-quic).
pub const ALPN: &[u8] = b"thruflux/1";
/// Server name used in the TLS handshake; certificates are pinned, so it carries no trust.
pub const SERVER_NAME: &str = "thruflux.peer";

/// A BLAKE3 fingerprint of a DER certificate.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    *blake3::hash(der).as_bytes()
}

fn hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// Failures of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] flux_quic::ConfigError),
    /// s2n-quic refused a setting or failed to start.
    #[error("s2n-quic configuration: {0}")]
    Config(String),
    /// The peer presented a certificate that is not pinned.
    #[error(
        "the peer's certificate (BLAKE3 {}) is not the paired one: connection refused",
        hex(.0)
    )]
    NotPinned(Fingerprint),
    /// The connection failed or was closed.
    #[error("QUIC connection: {0}")]
    Connection(String),
    /// The operation needs the other role (e.g. `connect` on a server).
    #[error("{0}")]
    Role(&'static str),
}

/// Failures of one stream.
#[derive(Debug, thiserror::Error, Eq, PartialEq)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer reset the stream (or stopped it) with this application code.
    #[error("stream reset by the peer with code {0}")]
    Reset(u64),
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(String),
    /// Anything else s2n reports (finished stream, invalid code...).
    #[error("stream: {0}")]
    Other(String),
}

impl From<s2n_quic::stream::Error> for StreamError {
    fn from(e: s2n_quic::stream::Error) -> Self {
        use s2n_quic::stream::Error as E;
        match e {
            E::StreamReset { error, .. } => Self::Reset(u64::from(error)),
            E::ConnectionError { error, .. } => Self::Connection(error.to_string()),
            other => Self::Other(other.to_string()),
        }
    }
}

/// Explicit Congestion Notification codepoint of a datagram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Ecn {
    /// ECT(0).
    Ect0,
    /// ECT(1).
    Ect1,
    /// Congestion experienced.
    Ce,
}

/// Congestion controllers s2n-quic offers.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Congestion {
    /// CUBIC, s2n's default.
    #[default]
    Cubic,
    /// BBRv2.
    Bbr,
}

/// Transport settings (the same knobs as flux-quic's `TransportParams` where s2n has them).
#[derive(Clone, Debug)]
pub struct Config {
    /// Connection receive window in bytes (s2n caps it at `u32::MAX`).
    pub conn_window: u64,
    /// Per-stream receive window in bytes.
    pub stream_window: u64,
    /// Per-stream send buffer: how much written data s2n holds until it is acknowledged.
    pub send_buffer: u32,
    /// Unidirectional streams the peer may have open at once.
    pub max_incoming_streams: u64,
    /// Idle time after which a silent connection is dropped.
    pub idle_timeout: Duration,
    /// Keep-alive PING interval (s2n uses the smaller of this and 3/4 of the idle timeout).
    pub keep_alive: Duration,
    /// Starting IP MTU (s2n counts IP and UDP headers).
    pub initial_mtu: u16,
    /// Largest IP MTU path MTU discovery may reach.
    pub max_mtu: u16,
    /// Most segments per GSO batch from [`Endpoint::poll_transmit`] (1: no batching).
    pub max_gso_segments: usize,
    /// Most packets one [`Endpoint::poll_transmit`] round lets s2n write before the caller
    /// sends them.
    pub transmit_round: usize,
    /// Congestion controller.
    pub congestion: Congestion,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            conn_window: 64 << 20,
            stream_window: 32 << 20,
            send_buffer: 16 << 20,
            max_incoming_streams: 100,
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(1),
            initial_mtu: 1248,
            max_mtu: 1500,
            max_gso_segments: 64,
            transmit_round: 256,
            congestion: Congestion::Cubic,
        }
    }
}

impl Config {
    fn limits(&self) -> Result<Limits, Error> {
        let conf =
            |e: s2n_quic_core::connection::limits::ValidationError| Error::Config(e.to_string());
        let window = |w: u64| w.min(u64::from(u32::MAX));
        Limits::new()
            .with_data_window(window(self.conn_window))
            .and_then(|l| l.with_bidirectional_local_data_window(window(self.stream_window)))
            .and_then(|l| l.with_bidirectional_remote_data_window(window(self.stream_window)))
            .and_then(|l| l.with_unidirectional_data_window(window(self.stream_window)))
            .and_then(|l| l.with_max_open_remote_unidirectional_streams(self.max_incoming_streams))
            .and_then(|l| l.with_max_open_remote_bidirectional_streams(4))
            .and_then(|l| l.with_max_send_buffer_size(self.send_buffer))
            .and_then(|l| l.with_max_idle_timeout(self.idle_timeout))
            .and_then(|l| l.with_max_keep_alive_period(self.keep_alive))
            .map_err(conf)
    }
}

/// Sets a flag when s2n wakes a task: the caller's loop polls again when it is set.
#[derive(Debug, Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

enum Role {
    Client(s2n_quic::Client),
    Server(s2n_quic::Server),
}

/// An s2n-quic endpoint (client or server) run by the caller's loop.
pub struct Endpoint {
    driven: Box<dyn Driven>,
    role: Role,
    clock: Clock,
    local: SocketAddr,
    tx: TxQueue,
    round: usize,
    flag: Arc<Flag>,
    waker: Waker,
    pins: Arc<PinSet>,
    closed: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("server", &matches!(self.role, Role::Server(_)))
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

fn start_err(e: impl std::fmt::Display) -> Error {
    Error::Config(e.to_string())
}

macro_rules! build {
    ($builder:expr, $tls:expr, $io:expr, $cfg:expr) => {{
        let b = $builder
            .with_tls($tls)
            .map_err(start_err)?
            .with_io($io)
            .map_err(start_err)?
            .with_limits($cfg.limits()?)
            .map_err(start_err)?
            .with_event(events::Events)
            .map_err(start_err)?;
        match $cfg.congestion {
            Congestion::Cubic => b
                .with_congestion_controller(congestion_controller::Cubic::default())
                .map_err(start_err)?
                .start()
                .map_err(start_err)?,
            Congestion::Bbr => b
                .with_congestion_controller(congestion_controller::Bbr::default())
                .map_err(start_err)?
                .start()
                .map_err(start_err)?,
        }
    }};
}

impl Endpoint {
    /// A server at `local` (the socket's address) presenting `id`, letting in clients whose
    /// certificate is on `pins`. `now` is the caller's clock at creation.
    pub fn server(
        local: SocketAddr,
        id: &Identity,
        pins: Arc<PinSet>,
        cfg: &Config,
        now: Instant,
    ) -> Result<Self, Error> {
        Self::server_with(local, id, Some(pins), cfg, now)
    }

    /// A server at `local` presenting `id`; with `clients`, only clients whose certificate is
    /// on it get in, else any client that pins this server does (it presents no certificate).
    pub fn server_with(
        local: SocketAddr,
        id: &Identity,
        clients: Option<Arc<PinSet>>,
        cfg: &Config,
        now: Instant,
    ) -> Result<Self, Error> {
        let pins = clients.clone().unwrap_or_default();
        let tls = s2n_quic::provider::tls::rustls::Server::from(tls::server(id, clients)?);
        let (slot, io) = Self::io(local, cfg)?;
        let server = build!(s2n_quic::Server::builder(), tls, io, cfg);
        Self::new(slot, Role::Server(server), local, pins, cfg, now)
    }

    /// A client at `local` presenting `id`, accepting only servers whose certificate is on
    /// `pins`.
    pub fn client(
        local: SocketAddr,
        id: &Identity,
        pins: Arc<PinSet>,
        cfg: &Config,
        now: Instant,
    ) -> Result<Self, Error> {
        Self::client_with(local, Some(id), pins, cfg, now)
    }

    /// A client at `local`, presenting `id` when given (a host that pins its joiners needs
    /// one), accepting only servers whose certificate is on `pins`.
    pub fn client_with(
        local: SocketAddr,
        id: Option<&Identity>,
        pins: Arc<PinSet>,
        cfg: &Config,
        now: Instant,
    ) -> Result<Self, Error> {
        let tls = s2n_quic::provider::tls::rustls::Client::from(tls::client(id, pins.clone())?);
        let (slot, io) = Self::io(local, cfg)?;
        let client = build!(s2n_quic::Client::builder(), tls, io, cfg);
        Self::new(slot, Role::Client(client), local, pins, cfg, now)
    }

    fn io(local: SocketAddr, cfg: &Config) -> Result<(Slot, EngineIo), Error> {
        let slot: Slot = Arc::new(Mutex::new(None));
        let mtu = io::mtu_config(cfg.initial_mtu, cfg.max_mtu).map_err(start_err)?;
        let io = EngineIo {
            slot: slot.clone(),
            local,
            mtu,
        };
        Ok((slot, io))
    }

    fn new(
        slot: Slot,
        role: Role,
        local: SocketAddr,
        pins: Arc<PinSet>,
        cfg: &Config,
        now: Instant,
    ) -> Result<Self, Error> {
        let driven = slot
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| Error::Config("s2n-quic did not start the I/O provider".into()))?;
        let flag = Arc::new(Flag::default());
        // IPv4 headers are the smaller ones: the largest payload s2n may write.
        let max_payload = usize::from(cfg.max_mtu.max(1248)) - 28;
        Ok(Self {
            driven,
            role,
            clock: Clock::new(now),
            local,
            tx: TxQueue::new(max_payload, cfg.max_gso_segments),
            round: cfg.transmit_round.max(1),
            waker: Waker::from(flag.clone()),
            flag,
            pins,
            closed: false,
        })
    }

    /// The local address given at creation.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Feeds one received datagram, or a GRO batch of `stride`-byte segments (the last may be
    /// shorter), from `from`. The bytes are decrypted in place.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        ecn: Option<Ecn>,
        data: &mut [u8],
        stride: Option<usize>,
    ) {
        let stride = stride.unwrap_or(data.len());
        let mut rx = RxDatagram {
            header: s2n_quic_core::inet::datagram::Header {
                path: io::tuple(self.local, from),
                ecn: io::to_s2n_ecn(ecn),
            },
            payload: data,
            stride,
            done: false,
        };
        let stamp = self.clock.stamp(now);
        self.driven.receive(&mut rx, stamp);
        self.drive(now);
    }

    /// Lets s2n take in what the application did through connection and stream handles (new
    /// connections, written data, closes). Called by the other methods; cheap.
    pub fn drive(&mut self, now: Instant) {
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(Err(_)) = self.driven.poll_wakeups(&mut cx, self.clock.stamp(now)) {
            self.closed = true;
        }
    }

    /// The next datagram or GSO batch to send, if any. Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.tx.out.is_empty() && !self.closed {
            self.round(now);
        }
        self.tx.out.pop_front()
    }

    fn round(&mut self, now: Instant) {
        self.drive(now);
        self.tx.set_capacity(self.round);
        self.driven.transmit(&mut self.tx, self.clock.stamp(now));
        s2n_quic_core::io::tx::Queue::flush(&mut self.tx);
    }

    /// Gives a sent [`Transmit`]'s buffer back for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.tx.recycle(buf);
    }

    /// When [`Self::handle_timeout`] is next due (`None`: only input can make progress).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.driven.timeout().map(|t| self.clock.instant(t))
    }

    /// Runs s2n's timers at `now` (loss detection, pacing, idle and keep-alive). Packets this
    /// produces come out of [`Self::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        // s2n runs its timers at the start of every transmit round.
        if !self.closed {
            self.round(now);
        }
    }

    /// Whether s2n woke a connection or stream since the last call: poll the handles again.
    pub fn take_woken(&self) -> bool {
        self.flag.0.swap(false, Ordering::AcqRel)
    }

    /// Whether the endpoint has shut down (its handle dropped and its connections closed).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Starts a connection to `remote` (client only). Poll the result with
    /// [`Connecting::poll`] while the loop runs.
    pub fn connect(&mut self, remote: SocketAddr) -> Result<Connecting, Error> {
        let Role::Client(client) = &self.role else {
            return Err(Error::Role("connect needs a client endpoint"));
        };
        let attempt = client.connect(Connect::new(remote).with_server_name(SERVER_NAME));
        Ok(Connecting {
            attempt: Some(attempt),
            waker: self.waker.clone(),
            pins: self.pins.clone(),
        })
    }

    /// The next connection whose handshake completed (server only).
    pub fn accept(&mut self) -> Option<Connection> {
        let Role::Server(server) = &mut self.role else {
            return None;
        };
        let mut cx = Context::from_waker(&self.waker);
        match server.poll_accept(&mut cx) {
            Poll::Ready(Some(conn)) => Some(Connection::new(conn, self.waker.clone())),
            _ => None,
        }
    }
}

/// A client connection in its handshake.
pub struct Connecting {
    /// `None` once the attempt has ended: s2n's future must not be polled after that.
    attempt: Option<s2n_quic::client::ConnectionAttempt>,
    waker: Waker,
    pins: Arc<PinSet>,
}

impl std::fmt::Debug for Connecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connecting").finish_non_exhaustive()
    }
}

impl Connecting {
    /// `None` while the handshake runs; then the connection, or why it failed (once: later
    /// calls report that the attempt is over).
    pub fn poll(&mut self) -> Option<Result<Connection, Error>> {
        use std::future::Future;
        let Some(attempt) = self.attempt.as_mut() else {
            return Some(Err(Error::Role(
                "this connection attempt has already ended",
            )));
        };
        let mut cx = Context::from_waker(&self.waker);
        let res = std::pin::Pin::new(attempt).poll(&mut cx);
        if res.is_ready() {
            self.attempt = None;
        }
        match res {
            Poll::Pending => None,
            Poll::Ready(Ok(conn)) => Some(Ok(Connection::new(conn, self.waker.clone()))),
            Poll::Ready(Err(e)) => Some(Err(match self.pins.take_refused() {
                Some(fp) => Error::NotPinned(fp),
                None => Error::Connection(e.to_string()),
            })),
        }
    }
}

/// An established connection.
pub struct Connection {
    inner: s2n_quic::Connection,
    waker: Waker,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id())
            .finish_non_exhaustive()
    }
}

/// Maps s2n's "ready / pending" of an open or accept call.
fn ready<T, U>(
    p: Poll<Result<Option<T>, s2n_quic::connection::Error>>,
    wrap: impl FnOnce(T) -> U,
) -> Result<Option<U>, Error> {
    match p {
        Poll::Pending => Ok(None),
        Poll::Ready(Ok(Some(t))) => Ok(Some(wrap(t))),
        Poll::Ready(Ok(None)) => Err(Error::Connection("the connection is closed".into())),
        Poll::Ready(Err(e)) => Err(Error::Connection(e.to_string())),
    }
}

impl Connection {
    fn new(mut inner: s2n_quic::Connection, waker: Waker) -> Self {
        // Keep-alive PINGs at `Config::keep_alive`; only fails on a closed connection.
        let _ = inner.keep_alive(true);
        Self { inner, waker }
    }

    fn split(&self, s: s2n_quic::stream::BidirectionalStream) -> (SendStream, RecvStream) {
        let (rx, tx) = s.split();
        (
            SendStream {
                inner: tx,
                waker: self.waker.clone(),
            },
            RecvStream {
                inner: rx,
                waker: self.waker.clone(),
            },
        )
    }

    /// Opens a unidirectional stream; `Ok(None)` while the peer's stream limit blocks it.
    pub fn open_uni(&mut self) -> Result<Option<SendStream>, Error> {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let p = self
            .inner
            .poll_open_send_stream(&mut cx)
            .map(|r| r.map(Some));
        ready(p, |inner| SendStream { inner, waker })
    }

    /// Opens a bidirectional stream; `Ok(None)` while the peer's stream limit blocks it.
    pub fn open_bi(&mut self) -> Result<Option<(SendStream, RecvStream)>, Error> {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let p = self
            .inner
            .poll_open_bidirectional_stream(&mut cx)
            .map(|r| r.map(Some));
        ready(p, |s| self.split(s))
    }

    /// The next unidirectional stream the peer opened, if any.
    pub fn accept_uni(&mut self) -> Result<Option<RecvStream>, Error> {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let p = self.inner.poll_accept_receive_stream(&mut cx);
        ready(p, |inner| RecvStream { inner, waker })
    }

    /// The next bidirectional stream the peer opened, if any.
    pub fn accept_bi(&mut self) -> Result<Option<(SendStream, RecvStream)>, Error> {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let p = self.inner.poll_accept_bidirectional_stream(&mut cx);
        ready(p, |s| self.split(s))
    }

    /// The BLAKE3 fingerprint of the certificate the peer presented (already checked against
    /// the [`PinSet`] during the handshake).
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.inner
            .query_event_context(|c: &events::Context| c.peer)
            .ok()
            .flatten()
    }

    /// The connection's statistics as s2n last reported them.
    pub fn stats(&self) -> Stats {
        self.inner
            .query_event_context(|c: &events::Context| c.stats.clone())
            .unwrap_or_default()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.inner
            .query_event_context(|c: &events::Context| c.closed.map(|e| e.to_string()))
            .ok()
            .flatten()
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr().ok()
    }

    /// Closes the connection with an application error `code` (s2n carries no reason text).
    pub fn close(&self, code: u32) {
        self.inner.close(code.into());
    }
}

/// The sending half of a stream.
pub struct SendStream {
    inner: s2n_quic::stream::SendStream,
    waker: Waker,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("id", &self.inner.id())
            .finish()
    }
}

impl SendStream {
    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Queues as much of `data` as the send buffer takes and advances `data` past it; returns
    /// how many bytes were taken (0: blocked, retry when woken). No copy: the taken part is a
    /// `Bytes` slice handed to s2n.
    pub fn write(&mut self, data: &mut Bytes) -> Result<usize, StreamError> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut cx = Context::from_waker(&self.waker);
        match self.inner.poll_send_ready(&mut cx) {
            Poll::Pending => Ok(0),
            Poll::Ready(Err(e)) => Err(e.into()),
            Poll::Ready(Ok(room)) => {
                let n = room.min(data.len());
                if n == 0 {
                    return Ok(0);
                }
                self.inner.send_data(data.split_to(n))?;
                Ok(n)
            }
        }
    }

    /// Marks the end of the stream after the queued data.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        Ok(self.inner.finish()?)
    }

    /// Whether everything written was acknowledged by the peer (after [`Self::finish`]).
    pub fn poll_acked(&mut self) -> Result<bool, StreamError> {
        let mut cx = Context::from_waker(&self.waker);
        match self.inner.poll_flush(&mut cx) {
            Poll::Pending => Ok(false),
            Poll::Ready(r) => r.map(|()| true).map_err(Into::into),
        }
    }

    /// Abandons the stream: the peer's reads fail with [`StreamError::Reset`]`(code)`.
    pub fn reset(&mut self, code: u32) -> Result<(), StreamError> {
        Ok(self.inner.reset(code.into())?)
    }
}

/// What one [`RecvStream::read`] found.
#[derive(Debug, Eq, PartialEq)]
pub enum Read {
    /// Received bytes, in order.
    Data(Bytes),
    /// Nothing yet: retry when woken.
    Blocked,
    /// The peer finished the stream and everything was read.
    Finished,
}

/// The receiving half of a stream.
pub struct RecvStream {
    inner: s2n_quic::stream::ReceiveStream,
    waker: Waker,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream")
            .field("id", &self.inner.id())
            .finish()
    }
}

impl RecvStream {
    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// The next received bytes, without copying them.
    pub fn read(&mut self) -> Result<Read, StreamError> {
        let mut cx = Context::from_waker(&self.waker);
        match self.inner.poll_receive(&mut cx) {
            Poll::Pending => Ok(Read::Blocked),
            Poll::Ready(Ok(Some(b))) => Ok(Read::Data(b)),
            Poll::Ready(Ok(None)) => Ok(Read::Finished),
            Poll::Ready(Err(e)) => Err(e.into()),
        }
    }

    /// Asks the peer to stop sending, with an application `code`.
    pub fn stop(&mut self, code: u32) -> Result<(), StreamError> {
        Ok(self.inner.stop_sending(code.into())?)
    }
}
