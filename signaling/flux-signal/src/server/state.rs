//! Shared server state: the in-memory session table and the connection bookkeeping.
//!
//! Connections reach the table through [`store`](super::store), which sends them to Redis
//! instead when the server runs as part of a fleet.
//!
//! All session mutations happen under one `Mutex` and never await while holding it;
//! messages to other connections go through their unbounded channels with a byte budget
//! ([`MAX_QUEUED_BYTES`]) so one slow reader cannot make the server buffer without bound.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use flux_signal_proto::{ErrorCode, PeerId, PeerLeftReason, RoutingId, ServerMsg};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ServerConfig;
use super::limits::Limiters;
use super::metrics::Metrics;
use super::store::Store;

/// State every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limiters: Limiters,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) store: Store,
    pub(crate) relays: super::relay::Relays,
    sessions: Mutex<HashMap<RoutingId, Session>>,
    ws_connections: AtomicUsize,
    pending_handshakes: AtomicUsize,
    pending_by_ip: Mutex<HashMap<IpAddr, usize>>,
    ws_by_ip: Mutex<HashMap<IpAddr, usize>>,
    next_conn_id: AtomicU64,
}

/// What a connection's task receives from other tasks.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// An encoded server message; its length is charged to the recipient's budget.
    Text(String),
    /// The connection's session ended for this reason: tell the client and close.
    Closed(ErrorCode),
}

/// How other tasks reach one connection.
#[derive(Clone, Debug)]
pub(crate) struct PeerHandle {
    pub(crate) conn_id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    queued: Arc<AtomicUsize>,
}

/// Kinds of routed message, each with its own per-session budget.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RouteKind<'a> {
    Candidate,
    /// A relay whose payload has this `t` field.
    Relay {
        tag: Option<&'a str>,
    },
}

struct Session {
    host: PeerHandle,
    /// The host's per-IP key ([`ip_key`]).
    host_ip: IpAddr,
    joiners: HashMap<PeerId, PeerHandle>,
    next_peer: u32,
    failed_joins: u32,
    relays: u64,
    candidates: u64,
    /// Joiners the host has accepted (it relayed them `{"t":"accepted"}`): payloads of any
    /// shape flow between them and the host. Before that only [`PAIRING_TAGS`] pass.
    paired: HashSet<PeerId>,
    /// Relay bytes each unpaired joiner's pairing used, both directions.
    pairing_bytes: HashMap<PeerId, usize>,
    /// Relay bytes used by every pairing in the session together.
    pairing_bytes_total: usize,
}

/// `t` tags of the pairing (PAKE) messages, the only relay payloads that pass between a
/// host and a joiner it has not accepted yet.
pub(crate) const PAIRING_TAGS: [&str; 5] = ["hello", "reply", "confirm", "accepted", "abort"];

/// Relay bytes (encoded messages) one joiner's pairing may use before the host accepts it,
/// both directions together: a pairing needs about 2 KiB with 32 addresses each way.
pub(crate) const PAIRING_BYTES_PER_JOINER: usize = 8 * 1024;

/// Relay bytes all pairings of one session may use together before acceptance.
pub(crate) const PAIRING_BYTES_PER_SESSION: usize = 64 * 1024;

/// Why a relay was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum RouteRefusal {
    /// A general refusal with its code.
    Code(ErrorCode),
    /// Not a pairing message, and the joiner is not paired.
    NotPaired,
    /// The pairing byte budget (per joiner or per session) is spent.
    PairingBudget,
    /// The sending IP's pre-pairing byte budget is spent for now.
    PairingIpBudget,
}

impl From<ErrorCode> for RouteRefusal {
    fn from(code: ErrorCode) -> Self {
        Self::Code(code)
    }
}

/// The answer to `create_session`.
pub(crate) struct Created {
    pub(crate) id: RoutingId,
    pub(crate) expires_at: Option<Instant>,
}

impl Shared {
    pub(crate) fn new(config: ServerConfig, shutdown: watch::Receiver<bool>, store: Store) -> Self {
        Self {
            relays: super::relay::Relays::new(config.relay.clone()),
            store,
            limiters: Limiters::new(&config),
            metrics: Arc::new(Metrics::default()),
            config,
            shutdown,
            sessions: Mutex::new(HashMap::new()),
            ws_connections: AtomicUsize::new(0),
            pending_handshakes: AtomicUsize::new(0),
            pending_by_ip: Mutex::new(HashMap::new()),
            ws_by_ip: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
        }
    }

    /// Open WebSocket connections plus connections still in their handshake.
    pub(crate) fn open_connections(&self) -> usize {
        self.ws_connections.load(Ordering::Relaxed)
            + self.pending_handshakes.load(Ordering::Relaxed)
    }

    pub(crate) fn ws_connections(&self) -> usize {
        self.ws_connections.load(Ordering::Relaxed)
    }

    pub(crate) fn pending_handshakes(&self) -> usize {
        self.pending_handshakes.load(Ordering::Relaxed)
    }

    pub(crate) fn session_count(&self) -> usize {
        self.lock().len()
    }

    /// Creates a session hosted by `host`, connected from `ip`. The error carries the code
    /// and the refusal's text.
    pub(crate) fn create(
        &self,
        host: &PeerHandle,
        ip: IpAddr,
    ) -> Result<Created, (ErrorCode, &'static str)> {
        const FULL: &str = "the server has no room for another session";
        let mut sessions = self.lock();
        let max = self.config.max_sessions;
        if max != 0 && sessions.len() >= max {
            return Err((ErrorCode::TooManySessions, FULL));
        }
        let host_ip = ip_key(ip);
        let per_ip = self.config.max_sessions_per_ip;
        // A linear count: the table holds at most `max_sessions` entries.
        if per_ip != 0 && sessions.values().filter(|s| s.host_ip == host_ip).count() >= per_ip {
            return Err((
                ErrorCode::TooManySessions,
                "too many live sessions hosted from this address",
            ));
        }
        // 30-bit ids: with ≤ a few thousand live sessions a collision is rare; retry a few
        // times, then report the table as full rather than loop.
        let id = (0..8)
            .filter_map(|_| random_u64().map(RoutingId::from_entropy))
            .find(|id| !sessions.contains_key(id))
            .ok_or((ErrorCode::TooManySessions, FULL))?;
        sessions.insert(
            id,
            Session {
                host: host.clone(),
                host_ip,
                joiners: HashMap::new(),
                next_peer: 1,
                failed_joins: 0,
                relays: 0,
                candidates: 0,
                paired: HashSet::new(),
                pairing_bytes: HashMap::new(),
                pairing_bytes_total: 0,
            },
        );
        self.metrics
            .sessions_created
            .fetch_add(1, Ordering::Relaxed);
        Ok(Created {
            id,
            expires_at: self.config.session_lifetime.map(|d| Instant::now() + d),
        })
    }

    /// Adds `joiner` to session `id` and tells the host.
    pub(crate) fn join(&self, id: RoutingId, joiner: &PeerHandle) -> Result<PeerId, ErrorCode> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(&id).ok_or(ErrorCode::NoSuchSession)?;
        if session.joiners.len() >= self.config.max_receivers_per_sender as usize {
            return Err(ErrorCode::SessionFull);
        }
        let peer = PeerId(session.next_peer);
        session.next_peer = session.next_peer.saturating_add(1);
        session.joiners.insert(peer, joiner.clone());
        session
            .host
            .push_control(ServerMsg::PeerJoined { peer }.encode());
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        Ok(peer)
    }

    /// Routes an encoded message from `from` (connection `me`, client IP `ip`) to `to` in
    /// session `id`. Between a host and a joiner it has not accepted, only relays tagged as
    /// pairing messages pass, within byte budgets per joiner, per session and per sending IP.
    pub(crate) fn route(
        &self,
        id: RoutingId,
        (me, ip): (u64, IpAddr),
        from: PeerId,
        to: PeerId,
        kind: RouteKind<'_>,
        text: String,
    ) -> Result<(), RouteRefusal> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(&id).ok_or(ErrorCode::NotInSession)?;
        if !session.is_member(from, me) {
            return Err(ErrorCode::NotInSession.into());
        }
        if from != PeerId::HOST && to != PeerId::HOST {
            return Err(ErrorCode::NotAllowed.into());
        }
        let (used, cap) = match kind {
            RouteKind::Candidate => (&mut session.candidates, self.config.max_session_candidates),
            RouteKind::Relay { .. } => (&mut session.relays, self.config.max_session_messages),
        };
        if cap != 0 && *used >= cap {
            return Err(ErrorCode::SessionQuotaExceeded.into());
        }
        let target = if to == PeerId::HOST {
            Some(&session.host)
        } else {
            session.joiners.get(&to)
        };
        let target = target.ok_or(ErrorCode::NoSuchPeer)?;
        if target.conn_id == me {
            return Err(ErrorCode::NotAllowed.into());
        }
        let joiner = if from == PeerId::HOST { to } else { from };
        let tag = match kind {
            RouteKind::Relay { tag } => tag,
            RouteKind::Candidate => None,
        };
        let pairing = matches!(kind, RouteKind::Relay { .. }) && !session.paired.contains(&joiner);
        let len = text.len();
        if pairing {
            if !tag.is_some_and(|t| PAIRING_TAGS.contains(&t)) {
                return Err(RouteRefusal::NotPaired);
            }
            let mine = session.pairing_bytes.get(&joiner).copied().unwrap_or(0);
            if mine + len > PAIRING_BYTES_PER_JOINER
                || session.pairing_bytes_total + len > PAIRING_BYTES_PER_SESSION
            {
                return Err(RouteRefusal::PairingBudget);
            }
            // Last of the checks, so a message refused by one above costs the IP nothing
            // (one the recipient cannot take, peer_busy, stays charged).
            if !self.limiters.allow_pairing_bytes(ip, len) {
                return Err(RouteRefusal::PairingIpBudget);
            }
        }
        target.push(text)?;
        *used += 1;
        if pairing {
            *session.pairing_bytes.entry(joiner).or_insert(0) += len;
            session.pairing_bytes_total += len;
            self.metrics
                .pairing_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            if from == PeerId::HOST && tag == Some("accepted") {
                session.paired.insert(joiner);
                session.pairing_bytes.remove(&joiner);
            }
        }
        Ok(())
    }

    /// Host `me` rejects joiner `peer`. Returns `true` when the failed-join cap closed
    /// the session (every member, the host included, gets `Outbound::Closed`).
    pub(crate) fn reject(&self, id: RoutingId, me: u64, peer: PeerId) -> Result<bool, ErrorCode> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(&id).ok_or(ErrorCode::NotInSession)?;
        if session.host.conn_id != me {
            return Err(ErrorCode::NotAllowed);
        }
        let joiner = session.joiners.remove(&peer).ok_or(ErrorCode::NoSuchPeer)?;
        session.forget(peer);
        joiner.close(ErrorCode::RejectedByHost);
        session.failed_joins += 1;
        self.metrics.failed_joins.fetch_add(1, Ordering::Relaxed);
        session.host.push_control(
            ServerMsg::PeerLeft {
                peer,
                reason: PeerLeftReason::Rejected,
            }
            .encode(),
        );
        let cap = self.config.max_failed_joins;
        if cap != 0 && session.failed_joins >= cap {
            if let Some(closed) = sessions.remove(&id) {
                closed.close_all(ErrorCode::TooManyFailedJoins);
            }
            self.metrics.reject(ErrorCode::TooManyFailedJoins);
            return Ok(true);
        }
        Ok(false)
    }

    /// Member `peer` (connection `me`) leaves session `id`. A host leaving closes it.
    pub(crate) fn leave(&self, id: RoutingId, me: u64, peer: PeerId, reason: PeerLeftReason) {
        let mut sessions = self.lock();
        let Some(session) = sessions.get_mut(&id) else {
            return;
        };
        if peer == PeerId::HOST {
            if session.host.conn_id == me
                && let Some(closed) = sessions.remove(&id)
            {
                for joiner in closed.joiners.values() {
                    joiner.close(ErrorCode::HostLeft);
                }
            }
        } else if session.joiners.get(&peer).is_some_and(|j| j.conn_id == me) {
            session.joiners.remove(&peer);
            session.forget(peer);
            session
                .host
                .push_control(ServerMsg::PeerLeft { peer, reason }.encode());
        }
    }

    /// Ends session `id` for every member with `reason`.
    pub(crate) fn close_session(&self, id: RoutingId, reason: ErrorCode) {
        if let Some(closed) = self.lock().remove(&id) {
            closed.close_all(reason);
        }
    }

    /// A fresh id for a connection (never 0).
    pub(crate) fn new_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a WebSocket slot for a client at `ip` under `max_ws_connections` and
    /// `max_ws_connections_per_ip`.
    pub(crate) fn try_reserve_ws(self: &Arc<Self>, ip: IpAddr) -> Option<WsSlot> {
        let max = self.config.max_ws_connections;
        let before = self.ws_connections.fetch_add(1, Ordering::AcqRel);
        if max != 0 && before >= max {
            self.ws_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let per_ip = self.config.max_ws_connections_per_ip;
        let ip = (per_ip != 0).then(|| ip_key(ip));
        if let Some(ip) = ip {
            let mut by_ip = lock(&self.ws_by_ip);
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= per_ip {
                drop(by_ip);
                self.ws_connections.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(WsSlot {
            shared: self.clone(),
            ip,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoutingId, Session>> {
        // A poisoned lock means a panic while holding it, which only a bug can cause; the
        // table itself stays consistent (every mutation is a single insert/remove), so
        // keep serving rather than take every session down.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Session {
    /// Drops a departed joiner's pairing state (its bytes stay charged to the session).
    fn forget(&mut self, peer: PeerId) {
        self.paired.remove(&peer);
        self.pairing_bytes.remove(&peer);
    }

    fn is_member(&self, peer: PeerId, conn: u64) -> bool {
        if peer == PeerId::HOST {
            self.host.conn_id == conn
        } else {
            self.joiners.get(&peer).is_some_and(|j| j.conn_id == conn)
        }
    }

    fn close_all(&self, reason: ErrorCode) {
        self.host.close(reason);
        for joiner in self.joiners.values() {
            joiner.close(reason);
        }
    }
}

impl PeerHandle {
    pub(crate) fn new(conn_id: u64) -> (Self, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                conn_id,
                tx,
                queued: Arc::new(AtomicUsize::new(0)),
            },
            rx,
        )
    }

    /// Queues a relayed message, refusing it when the recipient is too far behind.
    pub(crate) fn push(&self, text: String) -> Result<(), ErrorCode> {
        let len = text.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(ErrorCode::PeerBusy);
        }
        if self.tx.send(Outbound::Text(text)).is_err() {
            // The task is gone; it is about to leave the session.
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(ErrorCode::NoSuchPeer);
        }
        Ok(())
    }

    /// Queues a small server notice; charged to the budget but never refused, so the
    /// recipient's view of the session stays complete.
    pub(crate) fn push_control(&self, text: String) {
        self.queued.fetch_add(text.len(), Ordering::AcqRel);
        let _ = self.tx.send(Outbound::Text(text));
    }

    pub(crate) fn close(&self, reason: ErrorCode) {
        let _ = self.tx.send(Outbound::Closed(reason));
    }

    /// Called by the owning task after writing a dequeued text.
    pub(crate) fn sent(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }
}

/// A held WebSocket slot (global and per client IP); released on drop.
pub(crate) struct WsSlot {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl Drop for WsSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut by_ip = lock(&self.shared.ws_by_ip);
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
        self.shared.ws_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A held pending-handshake slot (global and per client IP); released on drop.
pub(crate) struct PendingGuard {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl PendingGuard {
    /// Takes a slot for a connection from `ip`, or `None` if either cap is reached. The
    /// per-IP cap is skipped when `ip` is `None` (behind a trusted proxy every connection
    /// comes from the proxy).
    pub(crate) fn try_new(shared: &Arc<Shared>, ip: Option<IpAddr>) -> Option<Self> {
        let max = shared.config.max_pending_handshakes;
        let before = shared.pending_handshakes.fetch_add(1, Ordering::AcqRel);
        if max != 0 && before >= max {
            shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let per_ip = shared.config.max_pending_per_ip;
        let ip = ip.filter(|_| per_ip != 0).map(ip_key);
        if let Some(ip) = ip {
            let mut by_ip = lock(&shared.pending_by_ip);
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= per_ip {
                drop(by_ip);
                shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut by_ip = lock(&self.shared.pending_by_ip);
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
        self.shared
            .pending_handshakes
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Locks `m`, ignoring poisoning: a poisoned lock means a panic while holding it, which
/// only a bug can cause, and every mutation under these locks is a single map operation, so
/// the data stays consistent; keep serving rather than take every session down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The per-IP key for rate limits: the address for IPv4, the /64 prefix for IPv6 (one
/// subscriber usually holds a whole /64, so per-address limits would be free to dodge).
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

pub(crate) fn random_u64() -> Option<u64> {
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).ok()?;
    Some(u64::from_le_bytes(buf))
}

/// Most bytes queued towards one connection before relays to it are refused with
/// `peer_busy`: 16 maximum-size messages, far above what a pairing needs.
const MAX_QUEUED_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_keyed_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
