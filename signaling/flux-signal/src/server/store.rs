//! Where sessions live: the seam between connections and the session table.
//!
//! A connection task only calls the `async` methods here. With [`Store::Memory`] they run
//! the in-process table of [`state`](super::state) (one instance, no dependency); with
//! [`Store::Fleet`] they run the Redis scripts of [`fleet`](super::fleet), shared by every
//! instance. Either way the checks, budgets and messages are the same; only a fleet store
//! can fail, and then the request is refused with `store_unavailable`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use flux_signal_proto::{ErrorCode, PeerId, PeerLeftReason, RoutingId};
use tokio::time::Instant;
use tracing::debug;

use super::fleet::{CreateOutcome, Fleet, StoreError};
use super::state::{Created, PeerHandle, RouteKind, RouteRefusal, Shared, random_u64};

/// The session table's home.
pub(crate) enum Store {
    /// This process's memory.
    Memory,
    /// Redis, shared with the other instances of a fleet.
    Fleet(Arc<Fleet>),
}

/// What a client is told when the fleet store cannot be reached.
pub(crate) const UNAVAILABLE: &str =
    "the server cannot reach its session store (redis); try again shortly";

fn unavailable(error: &StoreError) -> ErrorCode {
    debug!(%error, "session store unavailable");
    ErrorCode::StoreUnavailable
}

impl Shared {
    /// Whether new sessions can be served (always, in memory).
    pub(crate) fn store_healthy(&self) -> bool {
        match &self.store {
            Store::Memory => true,
            Store::Fleet(fleet) => fleet.healthy(),
        }
    }

    /// Live sessions: this process's, or the whole fleet's as of the last heartbeat.
    pub(crate) fn live_sessions(&self) -> usize {
        match &self.store {
            Store::Memory => self.session_count(),
            Store::Fleet(fleet) => fleet.session_count(),
        }
    }

    /// Takes a WebSocket-connect token for `ip`. With the fleet store unreachable the
    /// connect is let through: whatever the client then asks for is refused clearly.
    pub(crate) async fn allow_connect(&self, ip: IpAddr) -> bool {
        match &self.store {
            Store::Memory => self.limiters.allow_connect(ip),
            Store::Fleet(fleet) => {
                let c = &self.config;
                let rate = (c.ws_connects_per_min, c.ws_connects_burst);
                fleet
                    .allow("connect", ip, rate.0, rate.1)
                    .await
                    .unwrap_or(true)
            }
        }
    }

    /// Takes a session-create token for `ip` (unknown-id joins take one too).
    pub(crate) async fn allow_create(&self, ip: IpAddr) -> Result<bool, ErrorCode> {
        match &self.store {
            Store::Memory => Ok(self.limiters.allow_create(ip)),
            Store::Fleet(fleet) => {
                let c = &self.config;
                fleet
                    .allow(
                        "create",
                        ip,
                        c.session_creates_per_min,
                        c.session_creates_burst,
                    )
                    .await
                    .map_err(|e| unavailable(&e))
            }
        }
    }

    /// Creates a session hosted by `host`, connected from `ip`.
    pub(crate) async fn open_session(
        &self,
        host: &PeerHandle,
        ip: IpAddr,
    ) -> Result<Created, (ErrorCode, &'static str)> {
        let fleet = match &self.store {
            Store::Memory => return self.create(host, ip),
            Store::Fleet(fleet) => fleet,
        };
        const FULL: &str = "the server has no room for another session";
        // Ids are random; a taken one (rare) is retried a few times, as in memory.
        for _ in 0..8 {
            let entropy = random_u64().ok_or((ErrorCode::TooManySessions, FULL))?;
            let id = RoutingId::from_entropy(entropy);
            match fleet.create(&self.config, id, host, ip).await {
                Ok(CreateOutcome::Created) => {
                    self.metrics
                        .sessions_created
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(Created {
                        id,
                        expires_at: self.config.session_lifetime.map(|d| Instant::now() + d),
                    });
                }
                Ok(CreateOutcome::Taken) => {}
                Ok(CreateOutcome::Refused(why)) => return Err((ErrorCode::TooManySessions, why)),
                Err(error) => {
                    fleet.unregister(host.conn_id);
                    return Err((unavailable(&error), UNAVAILABLE));
                }
            }
        }
        Err((ErrorCode::TooManySessions, FULL))
    }

    /// Adds `joiner` to session `id` and tells the host.
    pub(crate) async fn join_session(
        &self,
        id: RoutingId,
        joiner: &PeerHandle,
    ) -> Result<PeerId, ErrorCode> {
        match &self.store {
            Store::Memory => self.join(id, joiner),
            Store::Fleet(fleet) => {
                let peer = fleet
                    .join(&self.config, id, joiner)
                    .await
                    .map_err(|e| unavailable(&e))??;
                self.metrics.joins.fetch_add(1, Ordering::Relaxed);
                Ok(peer)
            }
        }
    }

    /// Routes one message; see [`Shared::route`] for the rules.
    pub(crate) async fn route_msg(
        &self,
        id: RoutingId,
        me: (u64, IpAddr),
        from: PeerId,
        to: PeerId,
        kind: RouteKind<'_>,
        text: String,
    ) -> Result<(), RouteRefusal> {
        match &self.store {
            Store::Memory => self.route(id, me, from, to, kind, text),
            Store::Fleet(fleet) => fleet
                .route(&self.config, id, me, from, to, kind, text)
                .await
                .map_err(|e| RouteRefusal::Code(unavailable(&e)))?,
        }
    }

    /// Host `me` rejects `peer`; `Ok(true)` when that closed the session.
    pub(crate) async fn reject_peer(
        &self,
        id: RoutingId,
        me: u64,
        peer: PeerId,
    ) -> Result<bool, ErrorCode> {
        match &self.store {
            Store::Memory => self.reject(id, me, peer),
            Store::Fleet(fleet) => {
                let closed = fleet
                    .reject(&self.config, id, me, peer)
                    .await
                    .map_err(|e| unavailable(&e))??;
                self.metrics.failed_joins.fetch_add(1, Ordering::Relaxed);
                if closed {
                    self.metrics.reject(ErrorCode::TooManyFailedJoins);
                }
                Ok(closed)
            }
        }
    }

    /// Member `peer` (connection `me`) leaves session `id`. A fleet store that cannot be
    /// reached forgets nothing it would keep: the session's TTL, or the instance reaper,
    /// removes the member later.
    pub(crate) async fn leave_session(
        &self,
        id: RoutingId,
        me: u64,
        peer: PeerId,
        reason: PeerLeftReason,
    ) {
        match &self.store {
            Store::Memory => self.leave(id, me, peer, reason),
            Store::Fleet(fleet) => {
                if let Err(error) = fleet.leave(id, me, peer, reason).await {
                    debug!(%error, "leave not recorded in redis");
                }
            }
        }
    }

    /// Ends session `id` for every member with `reason`. `false` when the fleet store could
    /// not be told: the members elsewhere then learn from the session's TTL running out,
    /// and the caller must close its own connection itself.
    pub(crate) async fn end_session(&self, id: RoutingId, reason: ErrorCode) -> bool {
        match &self.store {
            Store::Memory => {
                self.close_session(id, reason);
                true
            }
            Store::Fleet(fleet) => match fleet.close(id, reason).await {
                Ok(()) => true,
                Err(error) => {
                    debug!(%error, "session end not recorded in redis");
                    false
                }
            },
        }
    }

    /// Forgets connection `me` in the fleet's delivery table (no-op in memory).
    pub(crate) fn forget_conn(&self, me: u64) {
        if let Store::Fleet(fleet) = &self.store {
            fleet.unregister(me);
        }
    }
}
