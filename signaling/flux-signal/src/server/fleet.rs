//! The fleet store: sessions kept in Redis so several `thruserv` instances behind a load
//! balancer serve one pool of sessions (`thruserv --redis URL`).
//!
//! What lives in Redis: each session (host and joiner locations, counters, pairing budgets,
//! failed joins, lifetime as a TTL), the fleet-wide session and per-IP caps, and the per-IP
//! token buckets (creates, connects, pre-pairing bytes). Every change is one Lua script
//! ([`fleet_lua`](super::fleet_lua)), so limits hold across instances.
//!
//! What stays in the instance: the WebSocket connections themselves, per-connection message
//! rates, and the per-instance connection and handshake caps (they protect this process's
//! sockets). Messages reach a connection on another instance through that instance's one
//! pub/sub channel; since each script publishes as it runs, messages keep the order in
//! which Redis ran them. Each instance subscribes only to its own channel.
//!
//! Liveness: every instance writes a heartbeat each second and, in the same script, removes
//! instances silent for [`STALE`] from their sessions (a `kill -9` is noticed within a few
//! seconds). While Redis is unreachable, new sessions, joins and relays are refused with
//! `store_unavailable` and `/healthz` answers 503; connections stay open, and the instance
//! resumes by itself when Redis is back.
//!
//! Redis is trusted with the sessions' routing but not for memory safety: whatever another
//! client writes there (wrong types, huge values, junk on our channel) is validated and
//! refused, never a panic. It must still be private to the fleet (see signaling/README.md).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flux_signal_proto::{ErrorCode, PeerId, PeerLeftReason, RoutingId, ServerMsg, decode_server};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Value};
use tracing::{debug, info, warn};

use super::fleet_lua::Scripts;
use super::limits::LogLimiter;
use super::state::{
    PAIRING_BYTES_PER_JOINER, PAIRING_BYTES_PER_SESSION, PAIRING_TAGS, PeerHandle, RouteKind,
    RouteRefusal, ip_key,
};
use super::{ServerConfig, ServerError};

/// An instance whose heartbeat is older than this is taken for dead.
pub(crate) const STALE: Duration = Duration::from_secs(3);
/// How often each instance writes its heartbeat (and reaps dead ones).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Deadline for one Redis command; past it the command counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for (re)connecting to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Key prefix.
const PREFIX: &str = "thruserv:";
/// Redis keeps a session at most this long when `--session-lifetime` is off.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A Redis failure (unreachable, timed out, or an answer we refuse to believe).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis gave an unexpected answer: {0}")]
    Bad(&'static str),
}

/// The connection to Redis and this instance's bookkeeping.
pub(crate) struct Fleet {
    client: Client,
    conn: ConnectionManager,
    scripts: Scripts,
    /// This instance's id: 16 hex digits, random per start.
    instance: String,
    /// Connections of this instance that are in a session, by connection id.
    conns: Mutex<HashMap<u64, PeerHandle>>,
    heartbeat_ok: AtomicBool,
    subscribed: AtomicBool,
    /// Live sessions in the whole fleet, as of the last heartbeat.
    sessions: AtomicUsize,
    max_text: usize,
    /// The subscription made at start, before the server listens, handed to the
    /// subscriber task: nothing published for our connections is missed in between.
    first_pubsub: Mutex<Option<redis::aio::PubSub>>,
}

impl Fleet {
    /// Connects to `url` and checks Redis answers; the error names the (password-free) URL.
    pub(crate) async fn connect(
        url: &str,
        config: &ServerConfig,
    ) -> Result<Arc<Self>, ServerError> {
        let shown = redact(url);
        let fail = |source: redis::RedisError| ServerError::Redis {
            url: shown.clone(),
            source,
        };
        let client = Client::open(url).map_err(fail)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        .map_err(|_| fail(timeout_error()))?
        .map_err(fail)?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        if pong != "PONG" {
            return Err(ServerError::Config(
                "--redis: the server did not answer PING",
            ));
        }
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|_| ServerError::Config("no OS randomness"))?;
        let instance = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        info!(redis = %shown, %instance, "session store: redis");
        let fleet = Arc::new(Self {
            client,
            conn,
            scripts: Scripts::new(),
            instance,
            conns: Mutex::new(HashMap::new()),
            heartbeat_ok: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            max_text: config.max_message_bytes.saturating_mul(2).max(4096),
            first_pubsub: Mutex::new(None),
        });
        // Subscribed and registered before the server listens, so that a heartbeat later
        // finding this instance unregistered means Redis forgot it.
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, fleet.subscribe())
            .await
            .map_err(|_| fail(timeout_error()))?
            .map_err(fail)?;
        *lock(&fleet.first_pubsub) = Some(pubsub);
        fleet.subscribed.store(true, Ordering::Relaxed);
        fleet.beat().await.map_err(|e| match e {
            StoreError::Redis(source) => fail(source),
            StoreError::Bad(_) => ServerError::Config("--redis: unexpected heartbeat answer"),
        })?;
        fleet.heartbeat_ok.store(true, Ordering::Relaxed);
        Ok(fleet)
    }

    fn channel(&self) -> String {
        format!("{PREFIX}c:{}", self.instance)
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, redis::RedisError> {
        let mut p = self.client.get_async_pubsub().await?;
        p.subscribe(self.channel()).await?;
        Ok(p)
    }

    /// One heartbeat: returns (instances reaped, live sessions, whether this instance was
    /// unregistered).
    async fn beat(&self) -> Result<(i64, i64, bool), StoreError> {
        let (reaped, sessions, new): (i64, i64, i64) = self
            .scripts
            .heartbeat
            .arg(PREFIX)
            .arg(&self.instance)
            .arg(STALE.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((reaped, sessions, new == 1))
    }

    /// Whether this instance can serve new sessions (Redis answers and our channel is
    /// subscribed); `/healthz` reports it.
    pub(crate) fn healthy(&self) -> bool {
        self.heartbeat_ok.load(Ordering::Relaxed) && self.subscribed.load(Ordering::Relaxed)
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Starts the heartbeat and subscriber tasks; abort the handles on shutdown.
    pub(crate) fn spawn_tasks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().heartbeat_loop()),
            tokio::spawn(self.clone().subscribe_loop()),
        ]
    }

    /// Removes this instance from every session still recorded for it (after draining).
    pub(crate) async fn retire(&self) {
        let result: Result<Value, _> = self
            .scripts
            .heartbeat
            .arg(PREFIX)
            .arg(&self.instance)
            .arg(0)
            .invoke_async(&mut self.conn.clone())
            .await;
        if let Err(error) = result {
            warn!(%error, "could not remove this instance from redis; the other instances remove it within seconds");
        }
    }

    /// Takes one token from `ip`'s bucket `kind` (`rate` per minute, `burst` deep). With
    /// `rate` 0 the limit is off.
    pub(crate) async fn allow(
        &self,
        kind: &str,
        ip: IpAddr,
        rate: u32,
        burst: u32,
    ) -> Result<bool, StoreError> {
        if rate == 0 {
            return Ok(true);
        }
        let allowed: i64 = self
            .scripts
            .bucket
            .arg(PREFIX)
            .arg(kind)
            .arg(ip_key(ip).to_string())
            .arg(rate)
            .arg(burst.max(1))
            .arg(1)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(allowed == 1)
    }

    fn location(&self, conn: u64) -> String {
        format!("{} {conn}", self.instance)
    }

    fn register(&self, me: &PeerHandle) {
        lock(&self.conns).insert(me.conn_id, me.clone());
    }

    /// Forgets a connection that has left its session.
    pub(crate) fn unregister(&self, conn: u64) {
        lock(&self.conns).remove(&conn);
    }

    /// Creates session `id` hosted by `host`.
    pub(crate) async fn create(
        &self,
        config: &ServerConfig,
        id: RoutingId,
        host: &PeerHandle,
        ip: IpAddr,
    ) -> Result<CreateOutcome, StoreError> {
        let ttl = config.session_lifetime.unwrap_or(MAX_TTL).min(MAX_TTL);
        // A little slack so the host's own lifetime timer ends the session first.
        let ttl_ms = ttl.as_millis() as u64 + 5000;
        self.register(host);
        let status: Result<String, _> = self
            .scripts
            .create
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(self.location(host.conn_id))
            .arg(ip_key(ip).to_string())
            .arg(config.max_sessions)
            .arg(config.max_sessions_per_ip)
            .arg(ttl_ms)
            .arg(&self.instance)
            .invoke_async(&mut self.conn.clone())
            .await;
        let outcome = match status?.as_str() {
            "ok" => return Ok(CreateOutcome::Created),
            "full" => CreateOutcome::Refused("the server has no room for another session"),
            "ip_full" => CreateOutcome::Refused("too many live sessions hosted from this address"),
            "taken" => CreateOutcome::Taken,
            _ => {
                self.unregister(host.conn_id);
                return Err(StoreError::Bad("create"));
            }
        };
        self.unregister(host.conn_id);
        Ok(outcome)
    }

    /// Adds `joiner` to session `id`; the host hears `peer_joined` through its instance.
    pub(crate) async fn join(
        &self,
        config: &ServerConfig,
        id: RoutingId,
        joiner: &PeerHandle,
    ) -> Result<Result<PeerId, ErrorCode>, StoreError> {
        self.register(joiner);
        let answer: Result<(String, i64), _> = self
            .scripts
            .join
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(self.location(joiner.conn_id))
            .arg(config.max_receivers_per_sender)
            .arg(&self.instance)
            .invoke_async(&mut self.conn.clone())
            .await;
        let (status, peer) = answer.inspect_err(|_| self.unregister(joiner.conn_id))?;
        let result = match status.as_str() {
            "ok" => match u32::try_from(peer) {
                Ok(p) if p > 0 => return Ok(Ok(PeerId(p))),
                _ => Err(StoreError::Bad("join: peer id out of range")),
            },
            "no_such_session" => Ok(Err(ErrorCode::NoSuchSession)),
            "session_full" => Ok(Err(ErrorCode::SessionFull)),
            _ => Err(StoreError::Bad("join")),
        };
        self.unregister(joiner.conn_id);
        result
    }

    /// Routes `text` from `from` (connection `me`, client `ip`) to `to` in session `id`,
    /// with the same checks and budgets as the in-memory store.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn route(
        &self,
        config: &ServerConfig,
        id: RoutingId,
        (me, ip): (u64, IpAddr),
        from: PeerId,
        to: PeerId,
        kind: RouteKind<'_>,
        text: String,
    ) -> Result<Result<(), RouteRefusal>, StoreError> {
        let (kind_arg, cap, tag) = match kind {
            RouteKind::Candidate => ("c", config.max_session_candidates, None),
            RouteKind::Relay { tag } => ("r", config.max_session_messages, tag),
        };
        let tag_ok = tag.is_some_and(|t| PAIRING_TAGS.contains(&t));
        let accepted = tag == Some("accepted");
        let status: String = self
            .scripts
            .route
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(self.location(me))
            .arg(from.0)
            .arg(to.0)
            .arg(kind_arg)
            .arg(if tag_ok { "1" } else { "0" })
            .arg(if accepted { "1" } else { "0" })
            .arg(text)
            .arg(cap)
            .arg(ip_key(ip).to_string())
            .arg(config.pre_pairing_bytes_per_ip)
            .arg(PAIRING_BYTES_PER_JOINER)
            .arg(PAIRING_BYTES_PER_SESSION)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match status.as_str() {
            "ok" => Ok(()),
            "not_in_session" => Err(ErrorCode::NotInSession.into()),
            "not_allowed" => Err(ErrorCode::NotAllowed.into()),
            "quota" => Err(ErrorCode::SessionQuotaExceeded.into()),
            "no_such_peer" => Err(ErrorCode::NoSuchPeer.into()),
            "not_paired" => Err(RouteRefusal::NotPaired),
            "pairing_budget" => Err(RouteRefusal::PairingBudget),
            "pairing_ip" => Err(RouteRefusal::PairingIpBudget),
            _ => return Err(StoreError::Bad("route")),
        })
    }

    /// Host `me` rejects `peer`. `Ok(true)`: the failed-join cap closed the session.
    pub(crate) async fn reject(
        &self,
        config: &ServerConfig,
        id: RoutingId,
        me: u64,
        peer: PeerId,
    ) -> Result<Result<bool, ErrorCode>, StoreError> {
        let status: String = self
            .scripts
            .reject
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(self.location(me))
            .arg(peer.0)
            .arg(config.max_failed_joins)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match status.as_str() {
            "ok" => Ok(false),
            "closed" => Ok(true),
            "not_in_session" => Err(ErrorCode::NotInSession),
            "not_allowed" => Err(ErrorCode::NotAllowed),
            "no_such_peer" => Err(ErrorCode::NoSuchPeer),
            _ => return Err(StoreError::Bad("reject")),
        })
    }

    /// Member `peer` (connection `me`) leaves session `id`.
    pub(crate) async fn leave(
        &self,
        id: RoutingId,
        me: u64,
        peer: PeerId,
        reason: PeerLeftReason,
    ) -> Result<(), StoreError> {
        self.unregister(me);
        let _: String = self
            .scripts
            .leave
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(self.location(me))
            .arg(peer.0)
            .arg(reason_str(reason))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Ends session `id` for every member with `reason`.
    pub(crate) async fn close(&self, id: RoutingId, reason: ErrorCode) -> Result<(), StoreError> {
        let _: String = self
            .scripts
            .close
            .arg(PREFIX)
            .arg(id.as_str())
            .arg(reason.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut log = LogLimiter::new(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let beat = self.beat().await;
            match beat {
                Ok((reaped, sessions, new)) => {
                    if !self.heartbeat_ok.swap(true, Ordering::Relaxed) {
                        info!("redis reachable");
                    }
                    if new {
                        self.forgotten();
                    }
                    if reaped > 0 {
                        info!(reaped, "removed silent instances from their sessions");
                    }
                    self.sessions
                        .store(usize::try_from(sessions).unwrap_or(0), Ordering::Relaxed);
                }
                Err(error) => {
                    let was = self.heartbeat_ok.swap(false, Ordering::Relaxed);
                    if was || log.allow() {
                        warn!(%error, "redis unreachable: refusing new sessions until it is back");
                    }
                }
            }
        }
    }

    /// Redis no longer knows this instance: it restarted empty, or the other instances took
    /// this one for dead during an outage and removed it from its sessions. Either way the
    /// sessions of our connections are gone; tell them rather than leave them waiting.
    fn forgotten(&self) {
        let conns: Vec<PeerHandle> = lock(&self.conns).drain().map(|(_, h)| h).collect();
        warn!(
            connections = conns.len(),
            "redis lost this instance's sessions; closing them"
        );
        for handle in conns {
            handle.close(ErrorCode::StoreUnavailable);
        }
    }

    async fn subscribe_loop(self: Arc<Self>) {
        let mut log = LogLimiter::new(Duration::from_secs(30));
        loop {
            let first = lock(&self.first_pubsub).take();
            let pubsub = match first {
                Some(p) => Ok(Ok(p)),
                None => tokio::time::timeout(CONNECT_TIMEOUT, self.subscribe()).await,
            };
            match pubsub {
                Ok(Ok(pubsub)) => {
                    self.subscribed.store(true, Ordering::Relaxed);
                    debug!(channel = %self.channel(), "subscribed");
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        self.deliver(msg.get_payload_bytes());
                    }
                    self.subscribed.store(false, Ordering::Relaxed);
                    warn!("redis subscription lost; resubscribing");
                }
                Ok(Err(error)) => {
                    if log.allow() {
                        warn!(%error, "cannot subscribe to redis");
                    }
                }
                Err(_) => {
                    if log.allow() {
                        warn!("cannot subscribe to redis: timed out");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Hands one published message to the local connection it names. Anything malformed
    /// is dropped: the channel is only as trustworthy as Redis's access control.
    fn deliver(&self, payload: &[u8]) {
        let Some(msg) = parse_published(payload, self.max_text) else {
            debug!(
                len = payload.len(),
                "dropped a malformed message from redis"
            );
            return;
        };
        let Some(handle) = lock(&self.conns).get(&msg.conn).cloned() else {
            return;
        };
        match msg.what {
            Published::Text(text) => {
                if let Err(code) = handle.push(text) {
                    debug!(conn = msg.conn, code = code.as_str(), "relay not delivered");
                }
            }
            Published::Joined(peer) => handle.push_control(ServerMsg::PeerJoined { peer }.encode()),
            Published::Left(peer, reason) => {
                handle.push_control(ServerMsg::PeerLeft { peer, reason }.encode());
            }
            Published::Closed(code) => {
                self.unregister(msg.conn);
                handle.close(code);
            }
        }
    }
}

/// What [`Fleet::create`] did.
pub(crate) enum CreateOutcome {
    Created,
    /// The random id is in use; pick another.
    Taken,
    /// Refused with `too_many_sessions` and this text.
    Refused(&'static str),
}

/// One message from our channel, validated.
#[derive(Debug, PartialEq)]
struct Delivery {
    conn: u64,
    what: Published,
}

#[derive(Debug, PartialEq)]
enum Published {
    Text(String),
    Joined(PeerId),
    Left(PeerId, PeerLeftReason),
    Closed(ErrorCode),
}

/// Parses `KIND CONN SP BODY` (see [`fleet_lua`](super::fleet_lua)); `None` for anything
/// else, including a `T` body that is not a relay or candidate message or is over
/// `max_text` bytes.
fn parse_published(payload: &[u8], max_text: usize) -> Option<Delivery> {
    if payload.len() > max_text + 64 {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let kind = text.get(..1)?;
    let (conn, body) = text.get(1..)?.split_once(' ')?;
    let conn: u64 = conn.parse().ok()?;
    let peer = |s: &str| s.parse::<u32>().ok().filter(|p| *p > 0).map(PeerId);
    let what = match kind {
        "T" => match decode_server(body).ok()? {
            ServerMsg::Relay { .. } | ServerMsg::Candidate { .. } => {
                Published::Text(body.to_owned())
            }
            _ => return None,
        },
        "J" => Published::Joined(peer(body)?),
        "L" => {
            let (p, reason) = body.split_once(' ')?;
            let reason = match reason {
                "left" => PeerLeftReason::Left,
                "disconnected" => PeerLeftReason::Disconnected,
                "rejected" => PeerLeftReason::Rejected,
                _ => return None,
            };
            Published::Left(peer(p)?, reason)
        }
        "C" => match ErrorCode::from_wire(body) {
            ErrorCode::Unknown => return None,
            code => Published::Closed(code),
        },
        _ => return None,
    };
    Some(Delivery { conn, what })
}

fn reason_str(reason: PeerLeftReason) -> &'static str {
    match reason {
        PeerLeftReason::Rejected => "rejected",
        PeerLeftReason::Left => "left",
        _ => "disconnected",
    }
}

/// `url` without its user name and password, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => "(not a redis:// URL)".to_owned(),
    }
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connecting timed out",
    ))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_messages_are_validated() {
        let relay = r#"{"type":"relay","from":0,"payload":{"t":"hello"}}"#;
        assert_eq!(
            parse_published(format!("T12 {relay}").as_bytes(), 4096),
            Some(Delivery {
                conn: 12,
                what: Published::Text(relay.into())
            })
        );
        assert_eq!(
            parse_published(b"J7 3", 4096).map(|d| d.what),
            Some(Published::Joined(PeerId(3)))
        );
        assert_eq!(
            parse_published(b"L7 3 rejected", 4096).map(|d| d.what),
            Some(Published::Left(PeerId(3), PeerLeftReason::Rejected))
        );
        assert_eq!(
            parse_published(b"C7 host_left", 4096).map(|d| d.what),
            Some(Published::Closed(ErrorCode::HostLeft))
        );
        for junk in [
            &b""[..],
            b"T",
            b"T12",
            b"Tx {}",
            b"T1 {\"type\":\"welcome\"}",
            b"T1 not json",
            b"J1 0",
            b"J1 99999999999",
            b"L1 2 eaten",
            b"C1 no_such_code",
            b"X1 y",
            b"T1 \xff\xfe",
            b"T18446744073709551616 {}",
        ] {
            assert_eq!(parse_published(junk, 4096), None, "{junk:?}");
        }
        let huge = format!("T1 {}", "x".repeat(10_000));
        assert_eq!(parse_published(huge.as_bytes(), 4096), None);
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("rediss://h:6380"), "rediss://h:6380");
        assert_eq!(redact("h:6379"), "(not a redis:// URL)");
    }
}
