//! One WebSocket connection: decode, enforce, route, and close with a code.
//!
//! Each connection is a task running one `select!` loop over: the shutdown signal, messages
//! queued for it by other connections, its own socket, and three deadlines (idle, slow
//! frame, session lifetime). Nothing in here panics on peer input: every refusal is either
//! an `error` message (the connection goes on) or an `error` with `fatal: true` followed by
//! a close frame whose reason is the same stable code.

use std::future::pending;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use flux_signal_proto::{
    CandidatePolicy, ClientMsg, DecodeError, ErrorCode, PROTOCOL_VERSION, PeerId, PeerLeftReason,
    RoutingId, ServerMsg, check_candidate_addr, decode_client,
};
use futures_util::{SinkExt, StreamExt};
use governor::DefaultDirectRateLimiter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{Instrument, debug, debug_span, trace};

use super::state::{Outbound, PeerHandle, RouteKind, RouteRefusal, Shared, WsSlot};
use super::store::UNAVAILABLE;

/// Runs one upgraded connection to completion.
pub(crate) async fn run<S>(io: S, ip: IpAddr, shared: Arc<Shared>, slot: WsSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = ActivityIo {
        inner: io,
        activity: activity.clone(),
    };
    let max = shared.config.max_message_bytes;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(max))
        // A frame header announcing more than the cap is refused before its payload is read.
        .max_frame_size(Some(max))
        // Small buffers keep 10k idle connections cheap; they grow for large messages.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4));
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
    let conn_id = shared.new_conn_id();
    let (me, rx) = PeerHandle::new(conn_id);
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let limiter = shared.limiters.message_limiter();
    let conn = Conn {
        ws,
        shared,
        ip,
        me,
        rx,
        member: None,
        limiter,
        activity,
        _slot: slot,
    };
    conn.run()
        .instrument(debug_span!("ws", conn = conn_id, %ip))
        .await;
}

struct Conn<S> {
    ws: WebSocketStream<ActivityIo<S>>,
    shared: Arc<Shared>,
    ip: IpAddr,
    me: PeerHandle,
    rx: mpsc::UnboundedReceiver<Outbound>,
    member: Option<Member>,
    limiter: Option<DefaultDirectRateLimiter>,
    activity: Arc<Activity>,
    _slot: WsSlot,
}

/// This connection's place in a session.
#[derive(Clone, Copy)]
struct Member {
    session: RoutingId,
    peer: PeerId,
    expires_at: Option<Instant>,
}

/// How the loop ended.
enum End {
    /// We refuse to go on: send `error{fatal}` and a close frame with this code.
    Fatal(ErrorCode, String),
    /// The session ended: send `session_closed` and a close frame.
    SessionClosed(ErrorCode),
    /// The client sent `leave`.
    Left,
    /// The client sent a close frame.
    ClientClosed,
    /// The transport is gone or stalled; nothing more can be sent.
    Gone,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(mut self) {
        let welcome = ServerMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            server: self.shared.config.server_name.clone(),
            max_message_bytes: self.shared.config.max_message_bytes as u64,
        };
        let end = match self.write(welcome.encode()).await {
            Ok(()) => self.serve().await,
            Err(end) => end,
        };
        self.finish(end).await;
    }

    async fn serve(&mut self) -> End {
        let mut shutdown = self.shared.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return End::Fatal(ErrorCode::ServerShutdown, "server is shutting down".into());
        }
        let idle = self.shared.config.ws_idle_timeout;
        let frame_timeout = self.shared.config.frame_timeout;
        let mut idle_deadline = idle.map(|d| Instant::now() + d);
        let activity = self.activity.clone();
        loop {
            let session_deadline = self.member.and_then(|m| m.expires_at);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return End::Fatal(ErrorCode::ServerShutdown, "server is shutting down".into());
                }
                Some(out) = self.rx.recv() => match out {
                    Outbound::Text(text) => {
                        let len = text.len();
                        let written = self.write(text).await;
                        self.me.sent(len);
                        if let Err(end) = written {
                            return end;
                        }
                    }
                    Outbound::Closed(reason) => {
                        self.member = None;
                        return End::SessionClosed(reason);
                    }
                },
                frame = self.ws.next() => {
                    idle_deadline = idle.map(|d| Instant::now() + d);
                    if let Err(end) = self.on_frame(frame).await {
                        return end;
                    }
                }
                () = deadline(idle_deadline) => {
                    return End::Fatal(ErrorCode::IdleTimeout, "no message within the idle timeout".into());
                }
                () = frame_watch(&activity, frame_timeout) => {
                    return End::Fatal(ErrorCode::FrameTimeout, "frame not completed in time".into());
                }
                () = deadline(session_deadline) => {
                    if let Some(m) = self.member.as_mut() {
                        m.expires_at = None;
                        // Queues `Closed(SessionExpired)` to every member, us included.
                        if !self.shared.end_session(m.session, ErrorCode::SessionExpired).await {
                            self.member = None;
                            return End::SessionClosed(ErrorCode::SessionExpired);
                        }
                    }
                }
            }
        }
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<(), End> {
        let msg = match frame {
            None => return Err(End::Gone),
            Some(Ok(msg)) => msg,
            Some(Err(error)) => return Err(ws_error_end(error)),
        };
        self.activity.clear();
        self.shared
            .metrics
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        if let Message::Close(_) = msg {
            return Err(End::ClientClosed);
        }
        if self.limiter.as_ref().is_some_and(|l| l.check().is_err()) {
            return Err(End::Fatal(
                ErrorCode::RateLimited,
                "too many messages per second".into(),
            ));
        }
        match msg {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => Err(End::Fatal(
                ErrorCode::BinaryFrame,
                "binary frames are not supported".into(),
            )),
            // tungstenite queues the pong; flush it now rather than with the next write.
            Message::Ping(_) => {
                match timeout(self.shared.config.frame_timeout, self.ws.flush()).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(End::Gone),
                }
            }
            _ => Ok(()),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let msg = match decode_client(text) {
            Ok(msg) => msg,
            // A newer client may send types we lack: answer, but keep the connection.
            Err(DecodeError::UnknownType) => {
                return self
                    .refuse(ErrorCode::UnknownType, "unknown message type")
                    .await;
            }
            Err(error) => return Err(End::Fatal(error.code(), error.to_string())),
        };
        trace!(?msg, "received");
        match msg {
            ClientMsg::CreateSession => self.create().await,
            ClientMsg::JoinSession { session } => self.join(session).await,
            ClientMsg::Candidate { to, candidate } => {
                let Some(m) = self.member else {
                    return self
                        .refuse(ErrorCode::NotInSession, "join or create a session first")
                        .await;
                };
                let policy = CandidatePolicy {
                    allow_loopback: self.shared.config.allow_loopback_candidates,
                };
                if let Err(reason) = check_candidate_addr(candidate.addr, policy) {
                    self.shared.metrics.filtered(reason);
                    debug!(session = %m.session, addr = %candidate.addr, reason = reason.as_str(), "candidate dropped");
                    let message = format!("candidate address not relayed: {}", reason.as_str());
                    return self.refuse(ErrorCode::CandidateRejected, &message).await;
                }
                let text = ServerMsg::Candidate {
                    from: m.peer,
                    candidate,
                }
                .encode();
                self.route(m, to, RouteKind::Candidate, text).await
            }
            ClientMsg::Relay { to, payload } => {
                let Some(m) = self.member else {
                    return self
                        .refuse(ErrorCode::NotInSession, "join or create a session first")
                        .await;
                };
                let tag = payload.get("t").and_then(|t| t.as_str()).map(str::to_owned);
                let text = ServerMsg::Relay {
                    from: m.peer,
                    payload,
                }
                .encode();
                let kind = RouteKind::Relay {
                    tag: tag.as_deref(),
                };
                self.route(m, to, kind, text).await
            }
            ClientMsg::RejectPeer { peer, reason } => {
                let Some(m) = self.member else {
                    return self
                        .refuse(ErrorCode::NotInSession, "join or create a session first")
                        .await;
                };
                if m.peer != PeerId::HOST {
                    return self
                        .refuse(ErrorCode::NotAllowed, "only the host may reject peers")
                        .await;
                }
                match self
                    .shared
                    .reject_peer(m.session, self.me.conn_id, peer)
                    .await
                {
                    Ok(closed) => {
                        debug!(session = %m.session, %peer, ?reason, closed, "joiner rejected by host");
                        Ok(())
                    }
                    Err(code) => {
                        self.refuse(code, why(code, "cannot reject that peer"))
                            .await
                    }
                }
            }
            ClientMsg::Leave => Err(End::Left),
            _ => {
                self.refuse(ErrorCode::UnknownType, "unsupported message type")
                    .await
            }
        }
    }

    async fn create(&mut self) -> Result<(), End> {
        if self.member.is_some() {
            return self
                .refuse(
                    ErrorCode::AlreadyInSession,
                    "this connection is already in a session",
                )
                .await;
        }
        match self.shared.allow_create(self.ip).await {
            Ok(true) => {}
            Ok(false) => {
                return self
                    .refuse(
                        ErrorCode::CreateRateLimited,
                        "too many sessions created from this address",
                    )
                    .await;
            }
            Err(code) => return self.refuse(code, UNAVAILABLE).await,
        }
        let created = match self.shared.open_session(&self.me, self.ip).await {
            Ok(created) => created,
            Err((code, why)) => return self.refuse(code, why).await,
        };
        self.member = Some(Member {
            session: created.id,
            peer: PeerId::HOST,
            expires_at: created.expires_at,
        });
        debug!(session = %created.id, "session created");
        let reply = ServerMsg::SessionCreated {
            session: created.id,
            peer: PeerId::HOST,
            max_receivers: self.shared.config.max_receivers_per_sender,
            expires_in_ms: self
                .shared
                .config
                .session_lifetime
                .map(|d| d.as_millis() as u64),
        };
        self.write(reply.encode()).await
    }

    async fn join(&mut self, session: RoutingId) -> Result<(), End> {
        if self.member.is_some() {
            return self
                .refuse(
                    ErrorCode::AlreadyInSession,
                    "this connection is already in a session",
                )
                .await;
        }
        match self.shared.join_session(session, &self.me).await {
            Ok(peer) => {
                self.member = Some(Member {
                    session,
                    peer,
                    expires_at: None,
                });
                debug!(%session, %peer, "joined");
                let reply = ServerMsg::Joined {
                    session,
                    peer,
                    host: PeerId::HOST,
                };
                self.write(reply.encode()).await
            }
            Err(ErrorCode::NoSuchSession) => {
                // Guessing ids costs the same tokens as creating sessions; a scanner that
                // runs out is disconnected.
                match self.shared.allow_create(self.ip).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(End::Fatal(
                            ErrorCode::CreateRateLimited,
                            "too many joins to unknown sessions from this address".into(),
                        ));
                    }
                    Err(code) => return self.refuse(code, UNAVAILABLE).await,
                }
                self.refuse(ErrorCode::NoSuchSession, "no session with that code")
                    .await
            }
            Err(code) => {
                self.refuse(code, why(code, "cannot join that session"))
                    .await
            }
        }
    }

    async fn route(
        &mut self,
        m: Member,
        to: PeerId,
        kind: RouteKind<'_>,
        text: String,
    ) -> Result<(), End> {
        let routed = self
            .shared
            .route_msg(
                m.session,
                (self.me.conn_id, self.ip),
                m.peer,
                to,
                kind,
                text,
            )
            .await;
        match routed {
            Ok(()) => {
                let counter = match kind {
                    RouteKind::Candidate => &self.shared.metrics.candidates,
                    RouteKind::Relay { .. } => &self.shared.metrics.relays,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(RouteRefusal::Code(code)) => {
                self.refuse(code, why(code, "message not relayed")).await
            }
            Err(RouteRefusal::NotPaired) => {
                self.refuse(
                    ErrorCode::NotAllowed,
                    "not relayed: until the host accepts the joiner only pairing messages \
                     (t: hello, reply, confirm, accepted, abort) pass",
                )
                .await
            }
            Err(RouteRefusal::PairingBudget) => {
                self.refuse(
                    ErrorCode::SessionQuotaExceeded,
                    "not relayed: the pairing byte budget is spent",
                )
                .await
            }
            Err(RouteRefusal::PairingIpBudget) => {
                self.refuse(
                    ErrorCode::PairingRateLimited,
                    "not relayed: this address has sent its budget of pairing bytes for now \
                     (--pre-pairing-bytes-per-ip per minute); try again later",
                )
                .await
            }
        }
    }

    /// A non-fatal refusal: count it and tell the client.
    async fn refuse(&mut self, code: ErrorCode, message: &str) -> Result<(), End> {
        self.shared.metrics.reject(code);
        let msg = ServerMsg::Error {
            code,
            message: message.into(),
            fatal: false,
        };
        self.write(msg.encode()).await
    }

    async fn write(&mut self, text: String) -> Result<(), End> {
        match timeout(
            self.shared.config.frame_timeout,
            self.ws.send(Message::text(text)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => {
                self.shared.metrics.reject(ErrorCode::FrameTimeout);
                debug!("write stalled; dropping connection");
                Err(End::Gone)
            }
        }
    }

    async fn finish(mut self, end: End) {
        // Leave first, so the other side of the session hears about it at once.
        if let Some(m) = self.member.take() {
            let reason = match end {
                End::Left | End::ClientClosed => PeerLeftReason::Left,
                _ => PeerLeftReason::Disconnected,
            };
            self.shared
                .leave_session(m.session, self.me.conn_id, m.peer, reason)
                .await;
        }
        self.shared.forget_conn(self.me.conn_id);
        let close = match end {
            End::Fatal(code, message) => {
                self.shared.metrics.reject(code);
                debug!(code = code.as_str(), %message, "closing connection");
                let _ = self
                    .write(
                        ServerMsg::Error {
                            code,
                            message,
                            fatal: true,
                        }
                        .encode(),
                    )
                    .await;
                Some(code)
            }
            End::SessionClosed(reason) => {
                let _ = self
                    .write(ServerMsg::SessionClosed { reason }.encode())
                    .await;
                Some(reason)
            }
            End::Left => None,
            End::ClientClosed => {
                // tungstenite has queued the close reply; push it out.
                let _ = timeout(CLOSE_LINGER, self.ws.flush()).await;
                return;
            }
            End::Gone => return,
        };
        let frame = match close {
            Some(code) => CloseFrame {
                code: CloseCode::from(code.close_code()),
                reason: code.as_str().into(),
            },
            None => CloseFrame {
                code: CloseCode::Normal,
                reason: "left".into(),
            },
        };
        if let Ok(Ok(())) = timeout(CLOSE_LINGER, self.ws.close(Some(frame))).await {
            // Wait briefly for the client's close reply so our close frame is not lost to a
            // TCP reset caused by unread data; bounded, whatever the client does.
            let _ = timeout(CLOSE_LINGER, async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
    }
}

/// The refusal text for `code`: `otherwise`, unless the session store is unreachable.
fn why(code: ErrorCode, otherwise: &'static str) -> &'static str {
    if code == ErrorCode::StoreUnavailable {
        UNAVAILABLE
    } else {
        otherwise
    }
}

fn ws_error_end(error: WsError) -> End {
    let (code, message) = match error {
        WsError::Capacity(e) => (ErrorCode::MessageTooLarge, e.to_string()),
        WsError::Utf8(_) => (
            ErrorCode::InvalidUtf8,
            "text frame is not valid UTF-8".to_string(),
        ),
        WsError::Protocol(e) => (ErrorCode::ProtocolError, e.to_string()),
        WsError::AttackAttempt => (ErrorCode::ProtocolError, "attack attempt".to_string()),
        _ => return End::Gone,
    };
    End::Fatal(code, message)
}

/// Resolves when a message has been in progress for longer than `limit`. Woken by the
/// reader's first byte, since the socket read itself stays pending mid-frame.
async fn frame_watch(activity: &Activity, limit: Duration) {
    loop {
        match activity.partial_since() {
            Some(since) => {
                sleep_until(since + limit).await;
                if activity.partial_since() == Some(since) {
                    return;
                }
            }
            None => activity.wake.notified().await,
        }
    }
}

async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

/// Remembers when bytes of a not-yet-complete message first arrived.
///
/// The reader marks it on every read that returns data (if unset); the connection clears
/// it when tungstenite yields a whole message. A frame trickled a byte at a time therefore
/// still has to finish within the frame timeout of its first byte.
struct Activity {
    base: Instant,
    /// Milliseconds since `base` plus one; 0 = nothing pending.
    since: AtomicU64,
    /// Signalled when `since` goes from unset to set.
    wake: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            since: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn mark(&self) {
        if self.since.load(Ordering::Relaxed) == 0 {
            let ms = self.base.elapsed().as_millis() as u64 + 1;
            self.since.store(ms, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    fn clear(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    fn partial_since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms - 1)),
        }
    }
}

/// The upgraded stream, with reads reported to [`Activity`].
struct ActivityIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.mark();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Initial read buffer per connection. Signaling messages are small; tungstenite grows the
/// buffer for larger ones, up to `max_message_bytes`.
const READ_BUFFER_BYTES: usize = 4096;

/// Longest we wait to deliver our close frame, and then for the client's reply.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
