//! The ICE agent: gathering (host, STUN, TURN), checks and nomination through `is`, relaying
//! through `turn-client-proto`, and the application-data path once a pair is selected.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use is::stun::{StunMessage, StunPacket};
use is::{IceAgent, IceAgentEvent, IceCreds, Protocol};
use tracing::{debug, info, trace, warn};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::Instant as TurnInstant;
use turn_client_proto::stun::agent::Transmit as TurnTransmit;
use turn_client_proto::stun::types::TransportType;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::udp::TurnClientUdp;

use crate::candidate::{Candidate, CandidateKind, check_remote_addr};
use crate::demux::{Packet, classify};
use crate::rto::RttEstimator;
use crate::stun;

turn_client_proto::impl_client!(TurnClient, (Udp, TurnClientUdp), (Tcp, TurnClientTcp));

/// Which side of the ICE session this agent is (RFC 8445 §6.1.1). The host of a transfer is
/// controlling; joiners are controlled.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Role {
    /// Nominates the pair.
    Controlling,
    /// Follows the peer's nomination.
    Controlled,
}

/// ICE username fragment and password (RFC 8445 §5.3), exchanged through signaling.
#[derive(Clone, Eq, PartialEq)]
pub struct Credentials {
    /// Username fragment: at least 4 ice-chars.
    pub ufrag: String,
    /// Password: at least 22 ice-chars.
    pub pwd: String,
}

impl Credentials {
    /// Credentials from 18 random bytes the caller supplies (sans-IO: no RNG in here):
    /// an 8-character ufrag and a 28-character password, hex.
    pub fn from_random(bytes: &[u8; 18]) -> Self {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        Self {
            ufrag: hex(&bytes[..4]),
            pwd: hex(&bytes[4..]),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // why: the password authenticates checks; keep it out of logs.
        write!(f, "Credentials({}:…)", self.ufrag)
    }
}

/// `ufrag:pwd`, the form sent through signaling.
impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ufrag, self.pwd)
    }
}

impl FromStr for Credentials {
    type Err = BadCredentials;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ufrag, pwd) = s.split_once(':').ok_or(BadCredentials)?;
        let ice_chars = |v: &str| {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        };
        // RFC 8445 §5.3: ufrag 4..=256, pwd 22..=256 ice-chars.
        if !(4..=256).contains(&ufrag.len())
            || !(22..=256).contains(&pwd.len())
            || !ice_chars(ufrag)
            || !ice_chars(pwd)
        {
            return Err(BadCredentials);
        }
        Ok(Self {
            ufrag: ufrag.to_owned(),
            pwd: pwd.to_owned(),
        })
    }
}

/// Credentials string that is not `ufrag:pwd` with RFC 8445 lengths and characters.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[error("bad ICE credentials (want ufrag:pwd, 4+ and 22+ ice-chars)")]
pub struct BadCredentials;

/// How the agent talks to a TURN server.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TurnTransport {
    /// UDP on the engine's socket.
    Udp,
    /// A TCP stream the caller opens ([`Event::ConnectTurnStream`]).
    Tcp,
    /// A TLS stream (usually on port 443) the caller opens; the agent sees the plaintext.
    Tls,
}

impl TurnTransport {
    /// `udp`, `tcp` or `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// One TURN server with its long-term credentials.
#[derive(Clone, Eq, PartialEq)]
pub struct TurnServer {
    /// Server address.
    pub addr: SocketAddr,
    /// Transport towards the server.
    pub transport: TurnTransport,
    /// Long-term credential user name.
    pub username: String,
    /// Long-term credential password.
    pub password: String,
}

impl fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TurnServer({} {} user {})",
            self.transport.as_str(),
            self.addr,
            self.username
        )
    }
}

/// Agent configuration. [`Config::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Controlling or controlled.
    pub role: Role,
    /// Our credentials (send them to the peer).
    pub credentials: Credentials,
    /// Random number for role conflicts (RFC 8445 §7.3.1.1); supply it from a real RNG.
    pub tie_breaker: u64,
    /// STUN servers for server-reflexive candidates.
    pub stun_servers: Vec<SocketAddr>,
    /// TURN servers for relayed candidates.
    pub turn_servers: Vec<TurnServer>,
    /// Remote candidates beyond this many are ignored (with one warning).
    pub max_remote_candidates: usize,
    /// Pacing of connectivity checks, Ta (RFC 8445 §14.2): at most one new check per Ta.
    pub check_interval: Duration,
    /// Give up ([`Event::Failed`]) when no pair is selected this long after the peer's
    /// credentials arrived.
    pub connect_timeout: Duration,
    /// After selection, give up when the selected path gets no check response this long
    /// (consent freshness, RFC 7675 §5.1: 30 s).
    pub consent_timeout: Duration,
    /// Accept loopback remote candidates (single-host tests only).
    pub allow_loopback: bool,
    /// Relayed candidates (ours and the peer's) join the checks this long after checking
    /// starts, so direct pairs get a head start and a relay is chosen only when nothing else
    /// works: the controlling side nominates the first pair that succeeds, and a relay pair
    /// that wins a race against a lost direct check would otherwise carry traffic until the
    /// direct pair is renominated. Zero disables the hold.
    pub relay_hold: Duration,
    /// Lowest retransmission time-out for connectivity checks. The RTO follows the measured
    /// RTT (RFC 6298: `srtt + 4·rttvar`, from STUN-server queries and checks) between this
    /// floor and 250 ms; before any sample it is 100 ms. While no pair is selected, a pair's
    /// retransmissions back off to at most 4× the RTO (200 ms–1 s), so a lost check or
    /// nomination costs one short wait, and earlier transactions stay valid: several checks
    /// per pair are in flight on a lossy path.
    pub check_rto_floor: Duration,
}

impl Config {
    /// Defaults: Ta 50 ms, 100 remote candidates, 10 s to connect, 30 s consent, relays held
    /// back 500 ms, check RTO floor 50 ms.
    pub fn new(role: Role, credentials: Credentials, tie_breaker: u64) -> Self {
        Self {
            role,
            credentials,
            tie_breaker,
            stun_servers: Vec::new(),
            turn_servers: Vec::new(),
            max_remote_candidates: DEFAULT_MAX_REMOTE_CANDIDATES,
            check_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(10),
            consent_timeout: Duration::from_secs(30),
            allow_loopback: false,
            relay_hold: Duration::from_millis(500),
            check_rto_floor: Duration::from_millis(50),
        }
    }
}

/// A stream to a TURN server (TCP or TLS) that the caller owns; the index of the server in
/// [`Config::turn_servers`].
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct StreamId(pub usize);

/// Bytes to send.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Transmit {
    /// Where to write them: `None` = a UDP datagram from `from` to `to`; `Some(s)` = append
    /// to the caller's TCP/TLS stream `s` (whose peer is `to`).
    pub stream: Option<StreamId>,
    /// Local address to send from (the socket, or the stream's local address).
    pub from: SocketAddr,
    /// Destination.
    pub to: SocketAddr,
    /// The datagram, or stream bytes.
    pub data: Vec<u8>,
}

/// How the selected path runs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum RouteKind {
    /// Host to host, no NAT in between (same LAN).
    Host,
    /// Direct through NATs (server or peer reflexive): hole-punched.
    Srflx,
    /// Through a TURN relay (ours, the peer's or both).
    Relay,
}

impl RouteKind {
    /// `host`, `srflx` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Srflx => "srflx",
            Self::Relay => "relay",
        }
    }
}

/// The pair ICE selected.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Selected {
    /// Our side: the socket address, or our relayed address when we relay.
    pub local: SocketAddr,
    /// The peer's address as we send to it.
    pub remote: SocketAddr,
    /// Route summary.
    pub kind: RouteKind,
    /// Type of our candidate.
    pub local_kind: CandidateKind,
    /// Type of the peer's candidate.
    pub remote_kind: CandidateKind,
    /// Transport towards our TURN server when we relay; UDP otherwise.
    pub transport: TurnTransport,
}

/// Why ICE gave up.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FailReason {
    /// No pair succeeded within [`Config::connect_timeout`].
    #[error("no candidate pair succeeded within {0:?}")]
    Timeout(Duration),
    /// The selected path stopped answering for [`Config::consent_timeout`].
    #[error("consent lost: no check response for {0:?}")]
    ConsentLost(Duration),
}

/// What happened, for the driver.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A local candidate: trickle it to the peer.
    LocalCandidate(Candidate),
    /// Open a stream to a TURN server (TCP, or TLS when `tls`), then call
    /// [`Agent::turn_stream_connected`] or [`Agent::turn_stream_failed`].
    ConnectTurnStream {
        /// Stream id to use in the calls back.
        stream: StreamId,
        /// Server address.
        addr: SocketAddr,
        /// Wrap the stream in TLS.
        tls: bool,
    },
    /// A pair was selected, or the selection changed: send application data this way.
    Selected(Selected),
    /// ICE gave up.
    Failed(FailReason),
}

/// What a received datagram turned out to be.
#[derive(Debug, Eq, PartialEq)]
pub enum Received<'a> {
    /// ICE, STUN or TURN traffic, consumed.
    Handled,
    /// Application data (QUIC) from `peer`: a sub-slice of the input when it came directly or
    /// in ChannelData over UDP.
    App {
        /// The peer's address (its relayed address when it relays).
        peer: SocketAddr,
        /// The application datagram.
        data: &'a [u8],
    },
    /// Not ours (unknown source or unparsable): dropped.
    Ignored,
}

/// An application datagram that arrived relayed on a stream, or in a form that needed a copy.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct AppDatagram {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The datagram.
    pub data: Vec<u8>,
}

/// Where [`Agent::wrap`] says to send an application datagram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SendVia {
    /// Send the datagram unchanged from `from` to `to` (the output buffer is untouched).
    Direct {
        /// Local socket address.
        from: SocketAddr,
        /// Peer.
        to: SocketAddr,
    },
    /// Send the output buffer (TURN-framed) as a UDP datagram from `from` to the TURN server.
    TurnUdp {
        /// Local socket address.
        from: SocketAddr,
        /// TURN server.
        to: SocketAddr,
    },
    /// Append the output buffer to the TURN stream.
    TurnStream(StreamId),
}

/// A bound TURN channel for the selected pair ([`Agent::relay_channel`]).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RelayChannel {
    /// Channel number (0x4000..=0x4FFF).
    pub channel: u16,
    /// Local socket address.
    pub from: SocketAddr,
    /// TURN server.
    pub to: SocketAddr,
}

/// Why an application datagram cannot be sent.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// No pair is selected yet.
    #[error("no ICE pair selected")]
    NotSelected,
    /// The relay refused (no allocation or no permission yet).
    #[error("TURN relay not ready")]
    RelayNotReady,
}

/// Counters for tests, logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Stats {
    /// Connectivity checks sent (including retransmissions).
    pub checks_sent: u64,
    /// Remote candidates accepted.
    pub remote_candidates: u64,
    /// Remote candidates ignored (bad address, over the cap, unparsable).
    pub remote_candidates_ignored: u64,
    /// STUN messages refused (bad MESSAGE-INTEGRITY, unknown user, not for us).
    pub stun_refused: u64,
    /// Datagrams dropped as unknown.
    pub dropped: u64,
    /// Application datagrams wrapped in ChannelData (4-byte header).
    pub wrapped_channel_data: u64,
    /// Application datagrams wrapped in Send indications (36+ bytes: before the channel is
    /// bound, and on TCP/TLS).
    pub wrapped_send_indication: u64,
}

struct StunQuery {
    base: SocketAddr,
    server: SocketAddr,
    /// Unique per query; each transmission carries its own transaction id (this plus the
    /// attempt number), so a response times exactly the request it answers (no Karn
    /// ambiguity: a lost first query still gives an RTT sample).
    id: u32,
    /// When each attempt left.
    sent_at: Vec<Instant>,
    next: Instant,
    done: bool,
}

/// A pair the controlling side nominated, as the controlled side saw it.
struct Nomination {
    local: SocketAddr,
    remote: SocketAddr,
    last: Instant,
}

struct TurnSlot {
    server: TurnServer,
    client: Option<TurnClient>,
    relayed: Option<SocketAddr>,
    failed: bool,
    wait_until: Option<Instant>,
    channel_peer: Option<SocketAddr>,
    /// The bound channel's number, once turn-client-proto reports it created.
    channel: Option<(SocketAddr, u16)>,
    /// Transaction ids of Allocate errors the client handled (the authentication challenge).
    challenges: Vec<[u8; 12]>,
}

impl TurnSlot {
    fn stream(&self, idx: usize) -> Option<StreamId> {
        (self.server.transport != TurnTransport::Udp).then_some(StreamId(idx))
    }
}

/// The ICE agent. See the crate documentation for the driving loop.
pub struct Agent {
    config: Config,
    ice: IceAgent,
    epoch: Instant,
    hosts: Vec<SocketAddr>,
    queries: Vec<StunQuery>,
    turns: Vec<TurnSlot>,
    remote: HashMap<SocketAddr, CandidateKind>,
    remote_ips: BTreeSet<IpAddr>,
    remote_creds: bool,
    checking_since: Option<Instant>,
    ice_due: Option<Instant>,
    ice_ran: Option<Instant>,
    held_local: Vec<(is::Candidate, SocketAddr, TurnTransport)>,
    nominations: Vec<Nomination>,
    held_remote: Vec<is::Candidate>,
    last_check_response: Option<Instant>,
    selected: Option<Selected>,
    failed: bool,
    cap_warned: bool,
    query_counter: u32,
    events: VecDeque<Event>,
    transmits: VecDeque<Transmit>,
    app: VecDeque<AppDatagram>,
    stats: Stats,
    /// RTT from STUN transactions; drives the check RTO.
    rtt: RttEstimator,
    /// Our recent Binding requests to the peer (transaction id, sent at), for RTT samples.
    checks_in_flight: VecDeque<([u8; 12], Instant)>,
    /// The retransmission timing last given to `is` (initial RTO, max RTO, retransmits).
    timing: Option<(Duration, Duration, usize)>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("role", &self.config.role)
            .field("hosts", &self.hosts)
            .field("selected", &self.selected)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// A new agent. `now` is the time base for everything after. TURN servers over TCP/TLS
    /// produce [`Event::ConnectTurnStream`] right away.
    pub fn new(config: Config, now: Instant) -> Self {
        let mut ice = IceAgent::new(IceCreds {
            ufrag: config.credentials.ufrag.clone(),
            pass: config.credentials.pwd.clone(),
        });
        ice.set_controlling(config.role == Role::Controlling);
        ice.set_control_tie_breaker(config.tie_breaker);
        ice.set_timing_advance(config.check_interval);
        // why: pairs = local × remote; the remote cap already bounds them, this is the
        // second fence (RFC 8445 §6.1.2.5 default 100).
        ice.set_max_candidate_pairs(config.max_remote_candidates.max(1) * 4);
        let turns: Vec<TurnSlot> = config
            .turn_servers
            .iter()
            .map(|s| TurnSlot {
                server: s.clone(),
                client: None,
                relayed: None,
                failed: false,
                wait_until: None,
                channel_peer: None,
                channel: None,
                challenges: Vec::new(),
            })
            .collect();
        let rtt = RttEstimator::new(config.check_rto_floor, CHECK_RTO_CEILING);
        let mut events = VecDeque::new();
        for (i, t) in turns.iter().enumerate() {
            if t.server.transport != TurnTransport::Udp {
                events.push_back(Event::ConnectTurnStream {
                    stream: StreamId(i),
                    addr: t.server.addr,
                    tls: t.server.transport == TurnTransport::Tls,
                });
            }
        }
        let mut agent = Self {
            config,
            ice,
            epoch: now,
            hosts: Vec::new(),
            queries: Vec::new(),
            turns,
            remote: HashMap::new(),
            remote_ips: BTreeSet::new(),
            remote_creds: false,
            checking_since: None,
            ice_due: Some(now),
            ice_ran: None,
            held_local: Vec::new(),
            nominations: Vec::new(),
            held_remote: Vec::new(),
            last_check_response: None,
            selected: None,
            failed: false,
            cap_warned: false,
            query_counter: 0,
            events,
            transmits: VecDeque::new(),
            app: VecDeque::new(),
            stats: Stats::default(),
            rtt,
            checks_in_flight: VecDeque::new(),
            timing: None,
        };
        agent.tune_checks();
        agent
    }

    /// Adds the engine socket's local address on one interface (a host candidate) and starts
    /// STUN queries from it; the first one added also carries the UDP TURN allocations.
    /// Loopback, link-local and unspecified addresses are refused (`false`).
    pub fn add_host(&mut self, addr: SocketAddr, now: Instant) -> bool {
        if check_remote_addr(addr, self.config.allow_loopback).is_err() {
            debug!(%addr, "not a usable host address");
            return false;
        }
        if self.hosts.contains(&addr) {
            return true;
        }
        let Ok(c) = is::Candidate::host(addr, "udp") else {
            return false;
        };
        self.hosts.push(addr);
        if let Some(c) = self.ice.add_local_candidate(c) {
            let c = from_is(c);
            info!(candidate = %c, "local candidate");
            self.events.push_back(Event::LocalCandidate(c));
        }
        for &server in &self.config.stun_servers {
            if server.is_ipv4() != addr.is_ipv4() {
                continue;
            }
            self.query_counter += 1;
            self.queries.push(StunQuery {
                base: addr,
                server,
                id: self.query_counter,
                sent_at: Vec::new(),
                next: now,
                done: false,
            });
        }
        if self.hosts.len() == 1 {
            for slot in &mut self.turns {
                if slot.server.transport == TurnTransport::Udp
                    && slot.server.addr.is_ipv4() == addr.is_ipv4()
                {
                    let cfg = turn_config(&slot.server);
                    slot.client = Some(TurnClient::Udp(TurnClientUdp::allocate(
                        addr,
                        slot.server.addr,
                        cfg,
                    )));
                    slot.wait_until = Some(now);
                }
            }
        }
        self.process(now);
        true
    }

    /// The caller connected the stream for TURN server `stream` (TLS handshake done when TLS);
    /// `local` is the stream's local address.
    pub fn turn_stream_connected(&mut self, stream: StreamId, local: SocketAddr, now: Instant) {
        let Some(slot) = self.turns.get_mut(stream.0) else {
            return;
        };
        if slot.server.transport == TurnTransport::Udp || slot.client.is_some() {
            return;
        }
        let cfg = turn_config(&slot.server);
        slot.client = Some(TurnClient::Tcp(TurnClientTcp::allocate(
            local,
            slot.server.addr,
            cfg,
        )));
        slot.wait_until = Some(now);
        self.process(now);
    }

    /// The caller could not connect the stream for TURN server `stream`, or it closed.
    pub fn turn_stream_failed(&mut self, stream: StreamId, now: Instant) {
        if let Some(slot) = self.turns.get_mut(stream.0) {
            warn!(server = ?slot.server, "TURN stream failed");
            slot.failed = true;
            slot.client = None;
        }
        self.process(now);
    }

    /// The peer's credentials, from signaling. Checks start once they are known.
    pub fn set_remote_credentials(&mut self, creds: &Credentials, now: Instant) {
        self.ice.set_remote_credentials(IceCreds {
            ufrag: creds.ufrag.clone(),
            pass: creds.pwd.clone(),
        });
        self.remote_creds = true;
        self.checking_since.get_or_insert(now);
        self.schedule_ice(now);
        self.process(now);
    }

    /// A trickled remote candidate. Ignored, with a log line and `false`, when its address is
    /// loopback, link-local, unspecified or multicast, or past
    /// [`Config::max_remote_candidates`]. Checks towards it are paced by the Ta timer.
    pub fn add_remote_candidate(&mut self, c: &Candidate, now: Instant) -> bool {
        if let Err(why) = check_remote_addr(c.addr, self.config.allow_loopback) {
            self.stats.remote_candidates_ignored += 1;
            // why: a hostile peer can send thousands; the first few tell the story.
            if self.stats.remote_candidates_ignored <= LOGGED_IGNORED {
                info!(candidate = %c, %why, "remote candidate ignored");
            } else {
                debug!(candidate = %c, %why, "remote candidate ignored");
            }
            return false;
        }
        if self.remote.contains_key(&c.addr) {
            return true;
        }
        if self.remote.len() >= self.config.max_remote_candidates {
            self.stats.remote_candidates_ignored += 1;
            if !self.cap_warned {
                self.cap_warned = true;
                warn!(
                    max = self.config.max_remote_candidates,
                    "too many remote candidates; ignoring the rest"
                );
            }
            return false;
        }
        let Ok(ic) = is::Candidate::from_sdp_string(&c.to_string()) else {
            self.stats.remote_candidates_ignored += 1;
            info!(candidate = %c, "remote candidate not understood");
            return false;
        };
        debug!(candidate = %c, "remote candidate");
        self.stats.remote_candidates += 1;
        self.remote.insert(c.addr, c.kind);
        if c.kind == CandidateKind::Relay && !self.relays_released(now) {
            self.held_remote.push(ic);
        } else {
            self.ice.add_remote_candidate(ic);
        }
        if self.remote_ips.insert(c.addr.ip()) {
            let ip = c.addr.ip();
            let tnow = self.turn_now(now);
            for slot in &mut self.turns {
                if slot.relayed.is_some_and(|r| r.is_ipv4() == ip.is_ipv4())
                    && let Some(client) = &mut slot.client
                {
                    let _ = client.create_permission(TransportType::Udp, ip, tnow);
                }
            }
        }
        if self.remote_creds {
            self.checking_since.get_or_insert(now);
        }
        self.schedule_ice(now);
        self.process(now);
        true
    }

    /// Which kind of packet a datagram from `from` is (a TURN server's address makes 64..=79
    /// ChannelData rather than QUIC). Call per GRO segment.
    pub fn classify(&self, from: SocketAddr, data: &[u8]) -> Packet {
        classify(data, self.udp_turn(from).is_some())
    }

    /// Feeds one datagram (one GRO segment) received on the socket at `local` from `from`.
    /// Application data comes back as [`Received::App`], without a copy when possible; the
    /// rest is consumed. Then drain the outputs.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: SocketAddr,
        data: &'a [u8],
    ) -> Received<'a> {
        let turn = self.udp_turn(from);
        let r = match classify(data, turn.is_some()) {
            Packet::Quic => return Received::App { peer: from, data },
            Packet::Other => Received::Ignored,
            Packet::Stun => {
                if self.handle_query_response(now, from, data) {
                    Received::Handled
                } else if let Some(r) = turn.and_then(|i| self.turn_recv(i, now, from, local, data))
                {
                    r
                } else if let Some(i) = turn
                    && self.turn_refused(i, data)
                {
                    Received::Handled
                } else {
                    self.handle_stun(now, from, local, data);
                    Received::Handled
                }
            }
            Packet::ChannelData => match turn {
                Some(i) => self
                    .turn_recv(i, now, from, local, data)
                    .unwrap_or(Received::Ignored),
                None => Received::Ignored,
            },
        };
        match r {
            // Hot path (relayed QUIC): nothing changed that needs the timers run.
            Received::App { .. } => return r,
            Received::Ignored => self.stats.dropped += 1,
            Received::Handled => {}
        }
        self.process(now);
        r
    }

    /// Feeds bytes read from the TURN stream `stream` (plaintext after TLS). Application
    /// data that arrives this way is queued for [`Agent::poll_app`].
    pub fn handle_stream_data(&mut self, now: Instant, stream: StreamId, data: &[u8]) {
        let tnow = self.turn_now(now);
        let Some(slot) = self.turns.get_mut(stream.0) else {
            return;
        };
        let relayed = slot.relayed.unwrap_or(UNSPEC);
        let Some(client) = &mut slot.client else {
            return;
        };
        let (server, local) = (client.remote_addr(), client.local_addr());
        let mut peer_data = Vec::new();
        let mut ignored = false;
        match client.recv(
            TurnTransmit::new(data, TransportType::Tcp, server, local),
            tnow,
        ) {
            TurnRecvRet::PeerData(pd) => peer_data.push((pd.peer, pd.data().to_vec())),
            TurnRecvRet::Ignored(_) => ignored = true,
            TurnRecvRet::Handled => note_challenge(slot.relayed, &mut slot.challenges, data),
            TurnRecvRet::PeerIcmp { .. } => {}
        }
        while let Some(pd) = client.poll_recv(tnow) {
            peer_data.push((pd.peer, pd.data().to_vec()));
        }
        // why: a response (the 401 challenge, an allocation) makes the client want to send
        // now; its earlier WaitUntil can be a TCP request time-out tens of seconds away.
        slot.wait_until = Some(now);
        if ignored {
            self.turn_refused(stream.0, data);
        }
        for (peer, inner) in peer_data {
            self.relayed_inner(now, peer, relayed, &inner, true);
        }
        self.process(now);
    }

    /// Advances timers: paced checks, STUN retransmissions, TURN refreshes, time-outs.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.process(now);
    }

    /// The next datagram or stream bytes to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When to call [`Agent::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.ice_due;
        let mut take = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for q in self.queries.iter().filter(|q| !q.done) {
            take(Some(q.next));
        }
        for slot in &self.turns {
            take(slot.wait_until);
        }
        if !self.held_local.is_empty() || !self.held_remote.is_empty() {
            take(self.checking_since.map(|t| t + self.config.relay_hold));
        }
        if !self.failed {
            if self.selected.is_none() {
                take(self.checking_since.map(|t| t + self.config.connect_timeout));
            } else {
                take(
                    self.last_check_response
                        .map(|t| t + self.config.consent_timeout),
                );
            }
        }
        next
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next application datagram that needed a copy (relayed over a stream).
    #[must_use]
    pub fn poll_app(&mut self) -> Option<AppDatagram> {
        self.app.pop_front()
    }

    /// Prepares one application datagram for the selected path. For a direct path `out` is
    /// untouched and the caller sends `data` as is; when we relay, `out` receives the TURN
    /// framing and data (ChannelData over UDP once the channel is bound, a Send indication
    /// before that and on streams) and the caller sends `out`.
    pub fn wrap(
        &mut self,
        now: Instant,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<SendVia, WrapError> {
        let sel = self.selected.ok_or(WrapError::NotSelected)?;
        if sel.local_kind != CandidateKind::Relay {
            return Ok(SendVia::Direct {
                from: sel.local,
                to: sel.remote,
            });
        }
        let tnow = self.turn_now(now);
        let (idx, slot) = self
            .turns
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.relayed == Some(sel.local))
            .ok_or(WrapError::RelayNotReady)?;
        let stream = slot.stream(idx);
        let client = slot.client.as_mut().ok_or(WrapError::RelayNotReady)?;
        let from = client.local_addr();
        let tb = client
            .send_to(TransportType::Udp, sel.remote, data, tnow)
            .map_err(|_| WrapError::RelayNotReady)?
            .ok_or(WrapError::RelayNotReady)?;
        out.clear();
        out.resize(
            turn_client_proto::prelude::DelayedTransmitBuild::len(&tb.data),
            0,
        );
        let n = tb.write_into(out).data.len();
        out.truncate(n);
        if out.first().is_some_and(|b| (0x40..=0x4F).contains(b)) {
            self.stats.wrapped_channel_data += 1;
        } else {
            self.stats.wrapped_send_indication += 1;
        }
        Ok(match stream {
            Some(s) => SendVia::TurnStream(s),
            None => SendVia::TurnUdp {
                from,
                to: slot.server.addr,
            },
        })
    }

    /// When we relay over UDP and the channel to the selected peer is bound: its number and
    /// 5-tuple. The engine can then frame each QUIC packet itself — a 4-byte
    /// [`crate::channel_header`] written into headroom in front of the packet (per GSO
    /// segment) and sent from `from` to `to` — with no copy; [`Agent::wrap`] does the same with
    /// one copy. `None` until the channel is bound (use [`Agent::wrap`] meanwhile) and on
    /// TCP/TLS. turn-client-proto refreshes the binding; check again after each
    /// [`Event::Selected`].
    pub fn relay_channel(&self) -> Option<RelayChannel> {
        let sel = self.selected?;
        if sel.local_kind != CandidateKind::Relay || sel.transport != TurnTransport::Udp {
            return None;
        }
        let slot = self.turns.iter().find(|s| s.relayed == Some(sel.local))?;
        let (peer, channel) = slot.channel?;
        let client = slot.client.as_ref()?;
        (peer == sel.remote).then(|| RelayChannel {
            channel,
            from: client.local_addr(),
            to: slot.server.addr,
        })
    }

    /// The selected pair, if any.
    pub fn selected(&self) -> Option<Selected> {
        self.selected
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.checks_sent = self.ice.stats().bind_request_sent;
        s
    }

    // --- internals ----------------------------------------------------------------------

    fn turn_now(&self, now: Instant) -> TurnInstant {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        TurnInstant::from_nanos(i64::try_from(ns).unwrap_or(i64::MAX))
    }

    fn std_instant(&self, t: TurnInstant) -> Instant {
        self.epoch + Duration::from_nanos(u64::try_from(t.as_nanos()).unwrap_or(0))
    }

    /// Asks for the ICE scheduler to run soon, but never sooner than Ta after its last run:
    /// new candidates, credentials or incoming checks must not bypass the pacing.
    fn schedule_ice(&mut self, now: Instant) {
        let earliest = self
            .ice_ran
            .map_or(now, |t| (t + self.config.check_interval).max(now));
        self.ice_due = Some(self.ice_due.map_or(earliest, |d| d.min(earliest)));
    }

    /// Whether relayed candidates may join the checks ([`Config::relay_hold`]).
    fn relays_released(&self, now: Instant) -> bool {
        self.checking_since
            .is_some_and(|t| now >= t + self.config.relay_hold)
    }

    /// Adds held relayed candidates to the agent (and trickles ours) once the hold is over.
    fn release_relays(&mut self, now: Instant) {
        if !self.relays_released(now) {
            return;
        }
        for (c, local, via) in std::mem::take(&mut self.held_local) {
            if let Some(c) = self.ice.add_local_candidate(c) {
                let mut c = from_is(c);
                c.related = Some(local);
                info!(candidate = %c, via = via.as_str(), "local candidate");
                self.events.push_back(Event::LocalCandidate(c));
            }
        }
        for c in std::mem::take(&mut self.held_remote) {
            self.ice.add_remote_candidate(c);
        }
        self.schedule_ice(now);
    }

    fn udp_turn(&self, from: SocketAddr) -> Option<usize> {
        self.turns.iter().position(|s| {
            s.server.transport == TurnTransport::Udp && s.server.addr == from && s.client.is_some()
        })
    }

    /// Runs everything that is due and moves outputs into the queues.
    fn process(&mut self, now: Instant) {
        // STUN queries for server-reflexive candidates: RFC 8489 §6.2.1 style retransmission,
        // 250 ms doubling, 6 tries (about 8 s), a new transaction id each time.
        for q in &mut self.queries {
            if q.done || now < q.next {
                continue;
            }
            if q.sent_at.len() >= STUN_QUERY_TRIES {
                q.done = true;
                info!(server = %q.server, "STUN server did not answer");
                continue;
            }
            let attempt = q.sent_at.len();
            self.transmits.push_back(Transmit {
                stream: None,
                from: q.base,
                to: q.server,
                data: stun::binding_request(query_trans_id(self.config.tie_breaker, q.id, attempt)),
            });
            q.next = now + Duration::from_millis(250) * (1 << attempt);
            q.sent_at.push(now);
        }
        // TURN clients.
        for i in 0..self.turns.len() {
            self.turn_poll(i, now);
        }
        if !self.held_local.is_empty() || !self.held_remote.is_empty() {
            self.release_relays(now);
        }
        // The ICE agent, never more often than its own schedule: that is what paces checks.
        if self.ice_due.is_some_and(|t| now >= t) {
            self.ice.handle_timeout(now);
            self.ice_ran = Some(now);
            self.ice_due = self.ice.poll_timeout();
        }
        self.drain_ice(now);
        if !self.ice.controlling() {
            self.nomination_failover(now);
        }
        self.check_failure(now);
    }

    fn drain_ice(&mut self, now: Instant) {
        while let Some(t) = self.ice.poll_transmit() {
            let data: Vec<u8> = t.contents.into();
            if let Some(id) = stun::binding_request_id(&data) {
                if self.checks_in_flight.len() >= MAX_CHECKS_TRACKED {
                    self.checks_in_flight.pop_front();
                }
                self.checks_in_flight.push_back((id, now));
            }
            if let Some(i) = self.turns.iter().position(|s| s.relayed == Some(t.source)) {
                self.send_via_turn(i, now, t.destination, &data);
            } else {
                self.transmits.push_back(Transmit {
                    stream: None,
                    from: t.source,
                    to: t.destination,
                    data,
                });
            }
        }
        let mut due_again = false;
        while let Some(e) = self.ice.poll_event() {
            match e {
                IceAgentEvent::NominatedSend {
                    source,
                    destination,
                    ..
                } if self.ice.controlling() => self.select(now, source, destination),
                IceAgentEvent::NominatedSend { .. } => {}
                IceAgentEvent::IceConnectionStateChange(s) => {
                    debug!(state = ?s, "ICE state");
                    if s.is_connected() {
                        self.last_check_response = Some(now);
                    }
                    due_again = true;
                }
                IceAgentEvent::DiscoveredRecv { .. } | IceAgentEvent::IceRestart(_) => {}
            }
        }
        if due_again {
            self.ice_due = self.ice.poll_timeout().or(self.ice_due);
        }
        if self.ice.state().is_connected() {
            self.last_check_response = Some(now);
        }
    }

    /// Gives `is` the check retransmission timing for the current RTT estimate and phase.
    ///
    /// Connecting: retransmissions back off only to 4× the RTO (200 ms–1 s), and the
    /// retransmission count grows so that a pair still needs about [`PAIR_FAIL_AFTER`] of
    /// silence to fail. `is` counts every attempt on a pair (answered or not) in its backoff,
    /// so with its defaults (250 ms doubling to 3 s) a nomination lost after three good checks
    /// waited 2 s. Selected: `is`'s defaults for keep-alives and failure detection, with the
    /// measured RTO as the first step.
    fn tune_checks(&mut self) {
        let initial = self.rtt.rto().unwrap_or(DEFAULT_CHECK_RTO);
        let (max, retransmits) = if self.selected.is_none() {
            let max = (initial * 4).clamp(CONNECTING_MAX_RTO.0, CONNECTING_MAX_RTO.1);
            let n = PAIR_FAIL_AFTER.as_millis().div_ceil(max.as_millis().max(1));
            (
                max,
                usize::try_from(n).unwrap_or(usize::MAX).max(IS_RETRANSMITS),
            )
        } else {
            (SELECTED_MAX_RTO, IS_RETRANSMITS)
        };
        let timing = (initial, max, retransmits);
        if self.timing == Some(timing) {
            return;
        }
        debug!(?initial, ?max, retransmits, srtt = ?self.rtt.srtt(), "check timing");
        self.timing = Some(timing);
        self.ice.set_initial_stun_rto(initial);
        self.ice.set_max_stun_rto(max);
        self.ice.set_max_stun_retransmits(retransmits);
        self.ice_due = self.ice.poll_timeout().or(self.ice_due);
    }

    /// The smoothed RTT of our STUN transactions (STUN servers and checks), once measured.
    #[must_use]
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt.srtt()
    }

    fn select(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr) {
        let relay_slot = self.turns.iter().position(|s| s.relayed == Some(source));
        let remote_kind = self
            .remote
            .get(&destination)
            .copied()
            .unwrap_or(CandidateKind::Prflx);
        let local_kind = if relay_slot.is_some() {
            CandidateKind::Relay
        } else if remote_kind == CandidateKind::Host {
            CandidateKind::Host
        } else {
            // We sent from a host socket to a reflexive address: behind a NAT our side is
            // reached through its mapping (srflx), or the peer's is.
            CandidateKind::Srflx
        };
        let kind = if local_kind == CandidateKind::Relay || remote_kind == CandidateKind::Relay {
            RouteKind::Relay
        } else if remote_kind == CandidateKind::Host {
            RouteKind::Host
        } else {
            RouteKind::Srflx
        };
        let transport = relay_slot.map_or(TurnTransport::Udp, |i| self.turns[i].server.transport);
        let sel = Selected {
            local: source,
            remote: destination,
            kind,
            local_kind,
            remote_kind,
            transport,
        };
        if self.selected == Some(sel) {
            return;
        }
        info!(?sel, "ICE pair selected");
        self.selected = Some(sel);
        self.tune_checks();
        self.last_check_response = Some(now);
        if let Some(i) = relay_slot {
            let tnow = self.turn_now(now);
            let slot = &mut self.turns[i];
            // why: ChannelData (4 bytes) instead of Send indications (36+) on the hot path.
            // Not on streams: turn-client-proto does not pad ChannelData to 4 bytes there.
            if slot.server.transport == TurnTransport::Udp
                && slot.channel_peer != Some(destination)
                && let Some(client) = &mut slot.client
                && client
                    .bind_channel(TransportType::Udp, destination, tnow)
                    .is_ok()
            {
                slot.channel_peer = Some(destination);
            }
        }
        self.events.push_back(Event::Selected(sel));
    }

    fn check_failure(&mut self, now: Instant) {
        if self.failed {
            return;
        }
        let reason = match (self.selected, self.checking_since, self.last_check_response) {
            (None, Some(since), _) if now >= since + self.config.connect_timeout => {
                FailReason::Timeout(self.config.connect_timeout)
            }
            (Some(_), _, Some(last))
                if !self.ice.state().is_connected()
                    && now >= last + self.config.consent_timeout =>
            {
                FailReason::ConsentLost(self.config.consent_timeout)
            }
            _ => return,
        };
        warn!(%reason, "ICE failed");
        self.failed = true;
        self.events.push_back(Event::Failed(reason));
    }

    fn handle_query_response(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        let Some((trans_id, mapped)) = stun::binding_success(data) else {
            return false;
        };
        let tie_breaker = self.config.tie_breaker;
        let Some((q, sent)) = self.queries.iter_mut().find_map(|q| {
            let attempt = (0..q.sent_at.len())
                .find(|&i| q.server == from && query_trans_id(tie_breaker, q.id, i) == trans_id)?;
            let sent = q.sent_at[attempt];
            Some((q, sent))
        }) else {
            return false;
        };
        if q.done {
            return true;
        }
        q.done = true;
        let base = q.base;
        self.rtt.sample(now.saturating_duration_since(sent));
        self.tune_checks();
        if mapped == base {
            debug!(%mapped, "no NAT towards the STUN server");
            return true;
        }
        if let Ok(c) = is::Candidate::server_reflexive(mapped, base, "udp")
            && let Some(c) = self.ice.add_local_candidate(c)
        {
            let mut c = from_is(c);
            c.related = Some(base);
            info!(candidate = %c, "local candidate");
            self.events.push_back(Event::LocalCandidate(c));
        }
        self.schedule_ice(now);
        true
    }

    fn handle_stun(&mut self, now: Instant, from: SocketAddr, local: SocketAddr, data: &[u8]) {
        let message = match StunMessage::parse(data) {
            Ok(m) => m,
            Err(e) => {
                debug!(%from, ?e, "unparsable STUN");
                self.stats.dropped += 1;
                return;
            }
        };
        self.feed_ice(now, from, local, data, message);
    }

    fn feed_ice(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        raw: &[u8],
        message: StunMessage<'_>,
    ) {
        let answered = message
            .is_successful_binding_response()
            .then(|| stun::transaction_id(raw))
            .flatten();
        let nominating = message.is_binding_request() && message.use_candidate();
        let packet = StunPacket {
            proto: Protocol::Udp,
            source,
            destination,
            message,
        };
        if !self.ice.handle_packet(now, packet) {
            self.stats.stun_refused += 1;
            debug!(%source, "STUN refused (bad integrity, unknown user or unexpected)");
            return;
        }
        // Only after `is` accepted it: a forged response must not shape our timers.
        if let Some(id) = answered
            && let Some(i) = self.checks_in_flight.iter().position(|(t, _)| *t == id)
        {
            let (_, sent) = self.checks_in_flight.remove(i).unwrap_or((id, now));
            self.rtt.sample(now.saturating_duration_since(sent));
            self.tune_checks();
        }
        if nominating && !self.ice.controlling() {
            self.nominated(now, destination, source);
        }
        // A request or response can make a check due now (triggered check, nomination).
        self.schedule_ice(now);
    }

    /// Controlled side: a nominating check arrived on (local, remote).
    ///
    /// The controlled side sends on the pair the controlling side nominated most recently
    /// (RFC 8445 §8.1.1). The controlling side nominates a pair only after its check on that
    /// 5-tuple succeeded — our response reached it — so both directions are proven. Why not
    /// `is`'s choice: it keeps the best-priority pair ever nominated, which after a
    /// renomination can leave the two directions on different pairs (each side sending to the
    /// other's relay). Every later check on a nominated pair repeats USE-CANDIDATE, so only
    /// the first one on a pair counts as a (re)nomination; repeats mark the pair alive.
    fn nominated(&mut self, now: Instant, local: SocketAddr, remote: SocketAddr) {
        if let Some(n) = self
            .nominations
            .iter_mut()
            .find(|n| n.local == local && n.remote == remote)
        {
            n.last = now;
            return;
        }
        if self.nominations.len() >= MAX_NOMINATIONS {
            self.nominations.remove(0);
        }
        self.nominations.push(Nomination {
            local,
            remote,
            last: now,
        });
        self.select(now, local, remote);
    }

    /// Controlled side: when the selected pair's nominating checks stop arriving (the
    /// controlling side went back to an older pair because ours died), follow the pair that
    /// is still being checked.
    fn nomination_failover(&mut self, now: Instant) {
        let Some(sel) = self.selected else {
            return;
        };
        let silent = |n: &Nomination| now.saturating_duration_since(n.last) > NOMINATION_SILENCE;
        let current = self
            .nominations
            .iter()
            .find(|n| n.local == sel.local && n.remote == sel.remote);
        if current.is_some_and(|n| !silent(n)) {
            return;
        }
        if let Some(alive) = self
            .nominations
            .iter()
            .filter(|n| !silent(n))
            .max_by_key(|n| n.last)
            .map(|n| (n.local, n.remote))
        {
            info!(local = %alive.0, remote = %alive.1, "selected pair went quiet; following the live nomination");
            self.select(now, alive.0, alive.1);
        }
    }

    /// Data from the TURN server at `from` on the UDP socket.
    fn turn_recv<'a>(
        &mut self,
        i: usize,
        now: Instant,
        from: SocketAddr,
        local: SocketAddr,
        data: &'a [u8],
    ) -> Option<Received<'a>> {
        let tnow = self.turn_now(now);
        let slot = &mut self.turns[i];
        let relayed = slot.relayed.unwrap_or(UNSPEC);
        let client = slot.client.as_mut()?;
        let (peer, inner_range) = match client.recv(
            TurnTransmit::new(data, TransportType::Udp, from, local),
            tnow,
        ) {
            TurnRecvRet::Handled => {
                slot.wait_until = Some(now);
                note_challenge(slot.relayed, &mut slot.challenges, data);
                return Some(Received::Handled);
            }
            TurnRecvRet::Ignored(_) => return None,
            TurnRecvRet::PeerIcmp { .. } => return Some(Received::Handled),
            TurnRecvRet::PeerData(pd) => (pd.peer, sub_range(data, pd.data())),
        };
        let inner: &'a [u8] = match inner_range {
            Some(r) => &data[r],
            None => return Some(Received::Handled),
        };
        Some(self.relayed_inner(now, peer, relayed, inner, false))
    }

    /// An Allocate error the TURN client did not take (turn-client-proto ignores the error
    /// to its authenticated request — wrong credentials — and would retransmit for ~40 s):
    /// give up on that server now, with the cause in the log.
    fn turn_refused(&mut self, i: usize, data: &[u8]) -> bool {
        let Some((kind, code, trans_id)) = stun::error_response(data) else {
            return false;
        };
        let Some(slot) = self.turns.get_mut(i) else {
            return false;
        };
        // why: only a rejection of the authenticated request counts — after a challenge, and
        // not a duplicate of the challenge itself (a retransmitted Allocate under loss gets
        // two 401s with the challenge's transaction id; the client ignores the second).
        if kind != stun::ALLOCATE_ERROR
            || slot.relayed.is_some()
            || slot.client.is_none()
            || slot.challenges.is_empty()
            || slot.challenges.contains(&trans_id)
        {
            return false;
        }
        warn!(server = ?slot.server, code, "TURN server refused the allocation (credentials?)");
        slot.failed = true;
        slot.client = None;
        slot.wait_until = None;
        true
    }

    /// A datagram the peer sent to our relayed address.
    fn relayed_inner<'a>(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        relayed: SocketAddr,
        inner: &'a [u8],
        queue_app: bool,
    ) -> Received<'a> {
        match classify(inner, false) {
            Packet::Stun => {
                if let Ok(message) = StunMessage::parse(inner) {
                    self.feed_ice(now, peer, relayed, inner, message);
                }
                Received::Handled
            }
            Packet::Quic | Packet::ChannelData => {
                if queue_app {
                    self.app.push_back(AppDatagram {
                        peer,
                        data: inner.to_vec(),
                    });
                    Received::Handled
                } else {
                    Received::App { peer, data: inner }
                }
            }
            Packet::Other => Received::Ignored,
        }
    }

    fn send_via_turn(&mut self, i: usize, now: Instant, to: SocketAddr, data: &[u8]) {
        let tnow = self.turn_now(now);
        let slot = &mut self.turns[i];
        let stream = slot.stream(i);
        let Some(client) = &mut slot.client else {
            return;
        };
        match client.send_to(TransportType::Udp, to, data, tnow) {
            Ok(Some(tb)) => {
                let t = tb.build();
                self.transmits.push_back(Transmit {
                    stream,
                    from: t.from,
                    to: t.to,
                    data: t.data,
                });
            }
            Ok(None) => {}
            Err(e) => {
                // Permission still being created: the check is retransmitted later.
                trace!(%to, ?e, "relay not ready for check");
                if !client.have_permission(TransportType::Udp, to.ip()) {
                    let _ = client.create_permission(TransportType::Udp, to.ip(), tnow);
                }
            }
        }
        slot.wait_until = Some(now);
    }

    fn turn_poll(&mut self, i: usize, now: Instant) {
        let tnow = self.turn_now(now);
        let slot = &mut self.turns[i];
        if slot.wait_until.is_none_or(|t| now < t) {
            return;
        }
        let stream = slot.stream(i);
        let Some(client) = &mut slot.client else {
            slot.wait_until = None;
            return;
        };
        let mut wait = None;
        match client.poll(tnow) {
            TurnPollRet::WaitUntil(t) => wait = Some(t),
            TurnPollRet::Closed => {
                if slot.relayed.is_none() && !slot.failed {
                    warn!(server = ?slot.server, "TURN allocation failed");
                }
                slot.failed = true;
            }
            TurnPollRet::AllocateTcpSocket { .. } | TurnPollRet::TcpClose { .. } => {}
        }
        while let Some(t) = client.poll_transmit(tnow) {
            self.transmits.push_back(Transmit {
                stream,
                from: t.from,
                to: t.to,
                data: t.data.to_vec(),
            });
        }
        let mut created = None;
        while let Some(e) = client.poll_event() {
            match e {
                TurnEvent::AllocationCreated(_, relayed) => created = Some(relayed),
                TurnEvent::AllocationCreateFailed(family) => {
                    warn!(server = ?slot.server, ?family, "TURN allocation refused");
                }
                TurnEvent::PermissionCreateFailed(_, ip) => {
                    debug!(%ip, "TURN permission refused");
                }
                TurnEvent::ChannelCreateFailed(_, peer) => {
                    debug!(%peer, "TURN channel refused");
                    slot.channel_peer = None;
                    slot.channel = None;
                }
                TurnEvent::ChannelCreated(_, peer) => {
                    // why: turn-client-proto does not expose the number; an empty ChannelData
                    // it builds (and we never send) carries it in its first two bytes.
                    if let Ok(Some(tb)) =
                        client.send_to(TransportType::Udp, peer, [0u8; 0].as_slice(), tnow)
                    {
                        let b = tb.build().data;
                        if let Some((channel, _)) = crate::demux::channel_data(&b) {
                            debug!(%peer, channel, "TURN channel bound");
                            slot.channel = Some((peer, channel));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(relayed) = created {
            let local = client.local_addr();
            for ip in self
                .remote_ips
                .iter()
                .filter(|ip| ip.is_ipv4() == relayed.is_ipv4())
            {
                let _ = client.create_permission(TransportType::Udp, *ip, tnow);
            }
            slot.relayed = Some(relayed);
            let via = slot.server.transport;
            if let Ok(c) = is::Candidate::relayed(relayed, local, "udp") {
                self.held_local.push((c, local, via));
                self.release_relays(now);
            }
            self.schedule_ice(now);
            // New permissions have transmits: poll again right away.
            let slot = &mut self.turns[i];
            slot.wait_until = Some(now);
            if let Some(client) = &mut slot.client {
                while let Some(t) = client.poll_transmit(tnow) {
                    self.transmits.push_back(Transmit {
                        stream,
                        from: t.from,
                        to: t.to,
                        data: t.data.to_vec(),
                    });
                }
            }
            return;
        }
        let w = wait.map(|t| self.std_instant(t));
        // why: a WaitUntil in the past would spin; turn-client-proto reports "now" when it has
        // nothing better, so poll again no sooner than 10 ms later.
        self.turns[i].wait_until = w.map(|w| w.max(now + Duration::from_millis(10)));
    }
}

/// Remembers an Allocate error the TURN client accepted (the 401 challenge), so a duplicate
/// of it is never mistaken for a refusal.
fn note_challenge(relayed: Option<SocketAddr>, challenges: &mut Vec<[u8; 12]>, data: &[u8]) {
    if relayed.is_none()
        && challenges.len() < 8
        && let Some((stun::ALLOCATE_ERROR, _, trans_id)) = stun::error_response(data)
    {
        challenges.push(trans_id);
    }
}

/// The range of `inner` inside `outer`, when `inner` is a sub-slice of it (no copy made).
fn sub_range(outer: &[u8], inner: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len()).then_some(start..end)
}

fn from_is(c: &is::Candidate) -> Candidate {
    let kind = match c.kind() {
        is::CandidateKind::Host => CandidateKind::Host,
        is::CandidateKind::ServerReflexive => CandidateKind::Srflx,
        is::CandidateKind::PeerReflexive => CandidateKind::Prflx,
        is::CandidateKind::Relayed => CandidateKind::Relay,
    };
    // why: `is` builds the foundation and priority; reuse its own string form for them.
    let parsed = c.to_sdp_string().parse::<Candidate>().ok();
    Candidate {
        kind,
        addr: c.addr(),
        priority: c.prio(),
        foundation: parsed.map_or_else(|| "1".to_owned(), |p| p.foundation),
        component: 1,
        related: None,
    }
}

fn turn_config(server: &TurnServer) -> TurnConfig {
    TurnConfig::new(TurnCredentials::new(&server.username, &server.password))
}

const UNSPEC: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
/// Remote candidates kept. An honest peer sends a handful (host, srflx, a relay or two);
/// RFC 8445 §6.1.2.5 suggests a limit of 100 on the checklist.
const DEFAULT_MAX_REMOTE_CANDIDATES: usize = 100;
/// Nominated pairs remembered by the controlled side (renominations are rare).
const MAX_NOMINATIONS: usize = 16;
/// Check RTO before any RTT sample. Below `is`'s 250 ms: until a pair answers, the peer's
/// NAT may still be closed and the first checks are expected to vanish; libwebrtc pings such
/// not-yet-writable pairs every 48 ms. Checks are small and paced by Ta across pairs.
const DEFAULT_CHECK_RTO: Duration = Duration::from_millis(100);
/// The measured check RTO never exceeds this: `is`'s fixed default, so measuring never makes
/// checks slower than before. A starved process measures its own scheduling delay as RTT (a
/// loaded 2-core lab saw 177 ms on a 1 ms path, an RTO at RFC 8445's 500 ms, and a relay
/// winning the race against a direct pair); on a truly long path an early retransmission only
/// costs a small extra packet, and the earlier transaction stays valid.
const CHECK_RTO_CEILING: Duration = Duration::from_millis(250);
/// While connecting, a pair's retransmissions back off to 4× the RTO, within these bounds.
const CONNECTING_MAX_RTO: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(1));
/// After selection: `is`'s default keep-alive interval and backoff cap.
const SELECTED_MAX_RTO: Duration = Duration::from_secs(3);
/// `is`'s default: unanswered checks before a pair fails.
const IS_RETRANSMITS: usize = 9;
/// While connecting, a pair fails after about this long without an answer (the peer's
/// candidates and NAT bindings may take a while to arrive), however short the RTO.
const PAIR_FAIL_AFTER: Duration = Duration::from_secs(8);
/// Transmissions of a STUN-server query (250 ms doubling: about 8 s).
const STUN_QUERY_TRIES: usize = 6;

/// The transaction id of attempt `attempt` of query `id`: the caller's random tie-breaker
/// (sans-IO: no RNG here), the query and the attempt.
fn query_trans_id(tie_breaker: u64, id: u32, attempt: usize) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&tie_breaker.to_le_bytes());
    t[8..11].copy_from_slice(&id.to_be_bytes()[1..]);
    t[11] = u8::try_from(attempt).unwrap_or(u8::MAX);
    t
}

/// Outgoing checks remembered for RTT samples.
const MAX_CHECKS_TRACKED: usize = 128;
/// A nominated pair with no check for this long is given up by the controlling side: `is`
/// rechecks every pair at least every 3 s (its max RTO), so this is three missed rounds.
const NOMINATION_SILENCE: Duration = Duration::from_secs(9);
/// Ignored remote candidates logged at info level before dropping to debug.
const LOGGED_IGNORED: u64 = 10;
