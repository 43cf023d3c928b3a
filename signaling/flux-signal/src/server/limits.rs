//! Rate limits (governor) and their housekeeping.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ServerConfig;
use super::state::{Shared, ip_key};

/// The per-IP limiters and the per-connection quota.
pub(crate) struct Limiters {
    connects: Option<DefaultKeyedRateLimiter<IpAddr>>,
    creates: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Pre-pairing relay bytes per client IP; one cell per byte.
    pairing_bytes: Option<DefaultKeyedRateLimiter<IpAddr>>,
    messages: Option<Quota>,
}

impl Limiters {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        let per_min = |rate: u32, burst: u32| {
            let rate = NonZeroU32::new(rate)?;
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            Some(Quota::per_minute(rate).allow_burst(burst))
        };
        let messages = NonZeroU32::new(config.ws_msgs_per_sec).map(|rate| {
            let burst = NonZeroU32::new(config.ws_msgs_burst).unwrap_or(NonZeroU32::MIN);
            Quota::per_second(rate).allow_burst(burst)
        });
        Self {
            connects: per_min(config.ws_connects_per_min, config.ws_connects_burst)
                .map(RateLimiter::keyed),
            creates: per_min(config.session_creates_per_min, config.session_creates_burst)
                .map(RateLimiter::keyed),
            pairing_bytes: per_min(
                config.pre_pairing_bytes_per_ip,
                config.pre_pairing_bytes_per_ip,
            )
            .map(RateLimiter::keyed),
            messages,
        }
    }

    /// Takes one WebSocket-connect token for `ip`.
    pub(crate) fn allow_connect(&self, ip: IpAddr) -> bool {
        self.connects
            .as_ref()
            .is_none_or(|l| l.check_key(&ip_key(ip)).is_ok())
    }

    /// Takes one session-create token for `ip` (joins naming unknown ids also take one).
    pub(crate) fn allow_create(&self, ip: IpAddr) -> bool {
        self.creates
            .as_ref()
            .is_none_or(|l| l.check_key(&ip_key(ip)).is_ok())
    }

    /// Takes `len` pre-pairing relay bytes from `ip`'s budget; all or nothing, so a refused
    /// message costs nothing. A message larger than the whole budget is always refused.
    pub(crate) fn allow_pairing_bytes(&self, ip: IpAddr, len: usize) -> bool {
        let Some(limiter) = &self.pairing_bytes else {
            return true;
        };
        let Some(n) = u32::try_from(len).ok().and_then(NonZeroU32::new) else {
            return len == 0;
        };
        matches!(limiter.check_key_n(&ip_key(ip), n), Ok(Ok(())))
    }

    /// A fresh per-connection message limiter, or `None` when unlimited.
    pub(crate) fn message_limiter(&self) -> Option<DefaultDirectRateLimiter> {
        self.messages.map(RateLimiter::direct)
    }

    fn purge(&self) {
        for limiter in [&self.connects, &self.creates, &self.pairing_bytes]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Forgets per-IP state that has fully refilled, so the tables hold only recent clients.
pub(crate) async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        shared.limiters.purge();
    }
}

/// Lets a repeated warning through at most once per interval (STYLE §4).
pub(crate) struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
}

impl LogLimiter {
    pub(crate) fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}
