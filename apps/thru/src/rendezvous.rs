//! Rendezvous: finding the peer and running the pairing handshake over some channel.
//!
//! Two channels carry the [`crate::pake`] messages:
//!
//! - **Through `thruserv`** ([`host_server`], [`join_server`]): the host creates a session
//!   (the server assigns the routing id; the code is built from it plus a fresh secret),
//!   joiners join with the routing part, the handshake goes through `relay` payloads, and
//!   each side also sends its QUIC addresses as `candidate` messages before its handshake
//!   message. Candidates are checked against the addresses the handshake authenticated: a
//!   candidate the peer did not vouch for (the server or a relay injected or altered it)
//!   ends the pairing. Several joiners (up to `max_receivers`) each run their own handshake.
//! - **On a LAN, no server** ([`host_lan`], [`join_lan`]): the host listens on TCP (port
//!   [`DEFAULT_LAN_PORT`] when free) and advertises itself with mDNS as service
//!   [`MDNS_SERVICE`] under an instance name derived from a hash of the routing part
//!   ([`mdns_instance`]), so the code itself never appears on the network. The joiner browses
//!   for that name, or skips mDNS when given the host's address (`--peer`). The handshake
//!   then runs as newline-delimited JSON over that TCP connection. LAN codes carry no
//!   addresses.
//!
//! Failure policy (one guess per attempt, [`GuessBudget`]): every reply the host sends is
//! charged before it goes out, and only a valid confirmation gives the charge back. A joiner
//! that got the host's reply but did not complete a valid confirmation (bad MAC, abort,
//! disconnect, reported gone by the server for any reason, timeout) is a failed attempt; the
//! server is told (`reject_peer`) and after `max_failed_attempts` the host ends the session.
//! At most one handshake is in flight: a `hello` arriving meanwhile waits, unanswered, in a
//! queue of at most [`MAX_WAITING`] joiners (more are refused as `full`), in both modes.
//!
//! **Trickle** (through `thruserv` only): after pairing, each joiner and the host keep their
//! signaling connections open and exchange ICE candidate lines through a [`Trickle`], as
//! `relay` payloads `{"t":"ice","seq":N,"line":"…","mac":"hex"}`. The MAC is a BLAKE3 keyed
//! hash over `seq` (8 bytes, big-endian) and the line, under a key derived from
//! [`Paired::session_key`], one key per direction: the server or a relay cannot forge,
//! alter, replay, reorder or reflect a line. A receiver delivers only lines with a valid MAC
//! and a strictly increasing `seq`; anything else, a line over [`MAX_TRICKLE_LINE`] bytes,
//! or lines beyond [`MAX_TRICKLE_LINES`] is dropped with a warning (the transfer goes on).
//! Sending is paced at [`TRICKLE_SEND_RATE`] messages a second per connection (burst
//! [`TRICKLE_SEND_BURST`]), below thruserv's default flood limit (50/s, burst 100, which
//! closes the connection). A LAN pairing has no trickle: its authenticated addresses suffice.
//!
//! What this module does not do: move file data, open QUIC, gather STUN/TURN candidates
//! (only local interface addresses are advertised in the handshake; the engine's ICE agent
//! gathers and hands its lines to the [`Trickle`]), retry or reconnect. It runs on tokio,
//! the control plane only.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flux_signal::client::{ClientConfig, ClientError, SignalClient};
use flux_signal_proto::{
    Candidate, CandidateKind, CandidatePolicy, ErrorCode, PeerId, PeerLeftReason, RoutingId,
    ServerMsg, TransportProtocol, check_candidate_addr,
};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use rand::rngs::OsRng;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::code::JoinCode;
use crate::pairing::{Paired, Rendezvous, Role};
use crate::pake::{
    AbortReason, GuessBudget, HostAwaitConfirm, JoinerStart, LocalInfo, PairMsg, PakeError,
    PeerInfo,
};
use crate::ui::safe_text;

/// TCP port a LAN host listens on for pairing when it is free (else any port).
pub const DEFAULT_LAN_PORT: u16 = 47115;
/// mDNS service type of a LAN host.
pub const MDNS_SERVICE: &str = "_thruflux._tcp.local.";
/// Longest LAN handshake line.
const MAX_LINE: u64 = 16 * 1024;
/// Most candidates remembered per peer.
const MAX_CANDIDATES: usize = 64;
/// Most joiners a host keeps waiting for their handshake (through thruserv: joined and not
/// yet settled; on a LAN: connections). More are refused as `full`.
pub const MAX_WAITING: usize = 32;

/// Settings shared by both host flavours.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// This host's QUIC identity and addresses.
    pub local: LocalInfo,
    /// Joiners to pair at most; then the host stops taking new ones.
    pub max_receivers: u32,
    /// Failed attempts (wrong code, tampering) after which the session ends. The CLI uses 1.
    pub max_failed_attempts: u32,
    /// Limit for one joiner's handshake, from its arrival.
    pub handshake_timeout: Duration,
    /// Accept loopback addresses from joiners (single-machine use).
    pub allow_loopback: bool,
    /// Once `max_receivers` joiners paired, keep the session (refusing newcomers as full)
    /// instead of ending pairing, so that a slot given back with [`HostSession::release`]
    /// can be taken again; the caller ends the session with [`HostSession::stop`].
    pub reusable_slots: bool,
}

impl HostOptions {
    /// Defaults: 4 receivers, the first failed attempt ends the session, 30 s handshakes.
    pub fn new(local: LocalInfo) -> Self {
        Self {
            local,
            max_receivers: 4,
            max_failed_attempts: 1,
            handshake_timeout: Duration::from_secs(30),
            allow_loopback: false,
            reusable_slots: false,
        }
    }
}

/// Settings of a joiner.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// This joiner's QUIC identity and addresses.
    pub local: LocalInfo,
    /// Limit for the whole pairing (finding the host included).
    pub timeout: Duration,
    /// Accept loopback addresses from the host (single-machine use).
    pub allow_loopback: bool,
}

impl JoinOptions {
    /// Defaults: 30 s, no loopback.
    pub fn new(local: LocalInfo) -> Self {
        Self {
            local,
            timeout: Duration::from_secs(30),
            allow_loopback: false,
        }
    }
}

/// mDNS use on a LAN.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum Mdns {
    /// On every interface the OS reports (the default).
    #[default]
    AllInterfaces,
    /// Only on interfaces with these names (for example `lo` in tests).
    Interfaces(Vec<String>),
    /// No mDNS: joiners need the host's address (`--peer`).
    Off,
}

/// LAN host settings.
#[derive(Clone, Debug)]
pub struct LanHostConfig {
    /// Where to listen for pairing connections. Port 0 tries [`DEFAULT_LAN_PORT`], then any.
    pub bind: SocketAddr,
    /// mDNS advertisement.
    pub mdns: Mdns,
}

impl Default for LanHostConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            mdns: Mdns::AllInterfaces,
        }
    }
}

/// How a LAN joiner finds the host.
#[derive(Clone, Debug)]
pub enum LanTarget {
    /// Connect to this address directly.
    Peer(SocketAddr),
    /// Browse mDNS.
    Mdns(Mdns),
}

/// Why pairing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// Talking to the signaling server failed.
    #[error("signaling server: {0}")]
    Signal(#[from] ClientError),
    /// The server knows no session with the code's routing part.
    #[error(
        "no session for join code {0}-…: the host has left, the session expired, or the code \
         is mistyped"
    )]
    NoSuchSession(RoutingId),
    /// The handshake with a peer failed.
    #[error("{peer}: {source}")]
    Handshake {
        /// `host` or `joiner N`.
        peer: String,
        /// What went wrong.
        #[source]
        source: PakeError,
    },
    /// The host refused this joiner (its check of our confirmation failed).
    #[error("the host refused the pairing: the join code is wrong, or the handshake was altered")]
    HostRejected,
    /// The host's session ended before pairing completed.
    #[error("the session ended before pairing completed: {0}")]
    SessionClosed(ErrorCode),
    /// The host left the signaling server (stopped, killed, or cut off) while we paired.
    #[error("the host is no longer online; ask for a new code")]
    HostGone,
    /// A peer announced a candidate its authenticated handshake does not contain.
    #[error(
        "candidate {addr} from {peer} is not one the peer vouched for in the handshake \
         (altered in transit)"
    )]
    ForeignCandidate {
        /// The address.
        addr: SocketAddr,
        /// Who it claims to come from.
        peer: String,
    },
    /// The peer went away during the handshake.
    #[error("{0} disconnected during pairing")]
    PeerGone(String),
    /// Something took too long.
    #[error("pairing timed out after {after:?} while {what}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The host ended the session after failed attempts.
    #[error(
        "the session ended after {}: the join code is burned",
        crate::ui::plural(u64::from(*.0), "failed pairing attempt", "failed pairing attempts")
    )]
    TooManyFailures(u32),
    /// No LAN host with this code answered mDNS.
    #[error("no host for this code answered on the LAN (mDNS) within {0:?}")]
    NotFound(Duration),
    /// LAN networking failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// mDNS could not start.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// The OS random generator failed.
    #[error("random generator: {0}")]
    Random(getrandom::Error),
}

impl PairError {
    /// True when the failure is about authentication (wrong code, tampering, refusal), as
    /// opposed to connectivity.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Self::Handshake { .. }
                | Self::HostRejected
                | Self::ForeignCandidate { .. }
                | Self::TooManyFailures(_)
        )
    }
}

/// What a host session reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum HostEvent {
    /// A joiner paired, with its candidate exchange: `Some` through thruserv, `None` on a
    /// LAN. Keep the [`Trickle`] (its `to_peer`) alive while candidates may still flow; the
    /// session stays on the server, after [`HostEvent::Ended`] too, until every trickle is
    /// dropped or the [`HostSession`] is.
    Paired(Box<Paired>, Option<Trickle>),
    /// A joiner's pairing failed.
    Failed {
        /// `joiner N`.
        peer: String,
        /// Why.
        error: PairError,
    },
    /// Pairing is over (all receivers paired, too many failures, server gone). The last
    /// event; trickles of paired joiners go on until dropped.
    Ended {
        /// Why, when it is an error.
        error: Option<PairError>,
    },
}

/// A running host rendezvous. Dropping it ends the session, and every host-side
/// [`Trickle`] with it.
#[derive(Debug)]
pub struct HostSession {
    code: JoinCode,
    lan_addr: Option<SocketAddr>,
    events: mpsc::Receiver<HostEvent>,
    stop: Option<oneshot::Sender<()>>,
    release: mpsc::UnboundedSender<()>,
}

impl HostSession {
    /// The code to show the user.
    pub fn code(&self) -> &JoinCode {
        &self.code
    }

    /// LAN mode: the TCP address pairing listens on (for the `--peer` hint).
    pub fn lan_addr(&self) -> Option<SocketAddr> {
        self.lan_addr
    }

    /// The next event; `None` after [`HostEvent::Ended`].
    pub async fn next_event(&mut self) -> Option<HostEvent> {
        self.events.recv().await
    }

    /// Gives back the receiver slot of a paired joiner that took nothing (`thru join
    /// --list`): another joiner may pair in its place. Needs
    /// [`HostOptions::reusable_slots`] once the session is full.
    pub fn release(&self) {
        let _ = self.release.send(());
    }

    /// Ends the session (leaves the server, stops listening and advertising).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for HostSession {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Through thruserv.

/// Connects to `url`, creates a session and starts serving joiners in a background task.
pub async fn host_server(
    url: &str,
    client: &ClientConfig,
    opts: HostOptions,
) -> Result<HostSession, PairError> {
    let mut signal = SignalClient::connect(url, client).await?;
    let created = signal.create_session().await?;
    let code = JoinCode::with_fresh_secret(created.session).map_err(PairError::Random)?;
    info!(session = %created.session, "session created");
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel();
    let (lines_tx, lines_rx) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    let opts_max_failed = opts.max_failed_attempts;
    let task = ServerHost {
        signal,
        code: code.clone(),
        opts,
        events: tx,
        peers: HashMap::new(),
        paired: 0,
        budget: GuessBudget::new(opts_max_failed),
        handshaking: None,
        queue: VecDeque::new(),
        accepting: true,
        trickles: HashMap::new(),
        lines_tx,
        lines_rx,
        pacer: Pacer::new(Instant::now()),
        release: release_rx,
    };
    tokio::spawn(task.run(stop_rx));
    Ok(HostSession {
        code,
        lan_addr: None,
        events: rx,
        stop: Some(stop_tx),
        release: release_tx,
    })
}

/// Joins the session named by `code` through `url` and pairs with its host.
///
/// On success the signaling connection stays open in a background task that carries the
/// returned [`Trickle`]; it leaves the session when every `to_peer` sender is dropped, and
/// closes `from_peer` when the server connection ends.
pub async fn join_server(
    url: &str,
    client: &ClientConfig,
    code: &JoinCode,
    opts: JoinOptions,
) -> Result<(Paired, Trickle), PairError> {
    let limit = opts.timeout;
    let mut signal = SignalClient::connect(url, client).await?;
    let res = match timeout(limit, join_server_inner(&mut signal, code, &opts)).await {
        Ok(r) => r,
        Err(_) => Err(PairError::Timeout {
            what: "waiting for the host's answer",
            after: limit,
        }),
    };
    let e = match res {
        Ok(paired) => {
            let trickle = spawn_joiner_trickle(signal, &paired);
            return Ok((paired, trickle));
        }
        Err(e) => e,
    };
    // Tell the host, so that it counts the attempt at once instead of timing out.
    if !matches!(
        e,
        PairError::Signal(_) | PairError::SessionClosed(_) | PairError::HostGone
    ) {
        let abort = match &e {
            PairError::Handshake { source, .. } => source.abort_msg(),
            _ => PairMsg::abort(AbortReason::ConfirmFailed),
        };
        let _ = signal.relay(PeerId::HOST, abort.to_json()).await;
    }
    let _ = timeout(Duration::from_secs(2), signal.leave()).await;
    Err(e)
}

async fn join_server_inner(
    signal: &mut SignalClient,
    code: &JoinCode,
    opts: &JoinOptions,
) -> Result<Paired, PairError> {
    match signal.join_session(code.routing()).await {
        Ok(_) => {}
        Err(ClientError::Server {
            code: ErrorCode::NoSuchSession,
            ..
        }) => return Err(PairError::NoSuchSession(code.routing())),
        Err(e) => return Err(e.into()),
    }
    for (i, addr) in opts.local.addrs.iter().enumerate() {
        signal.candidate(PeerId::HOST, candidate(*addr, i)).await?;
    }
    let (state, hello) = JoinerStart::start(code, opts.local.clone(), &mut OsRng);
    signal.relay(PeerId::HOST, hello.to_json()).await?;
    let hs = |source| PairError::Handshake {
        peer: "host".into(),
        source,
    };
    let mut state = Some(state);
    let mut await_accept = None;
    let mut candidates = Vec::new();
    loop {
        match signal.recv().await? {
            ServerMsg::Candidate { from, candidate } if from == PeerId::HOST => {
                if candidates.len() < MAX_CANDIDATES {
                    candidates.push(candidate.addr);
                }
            }
            ServerMsg::Relay { from, payload } if from == PeerId::HOST && is_trickle(&payload) => {
                debug!("trickle line before pairing completed, ignored");
            }
            ServerMsg::Relay { from, payload } if from == PeerId::HOST => {
                let msg = PairMsg::from_json(payload).map_err(hs)?;
                if let Some(s) = state.take() {
                    let (next, confirm) = s.handle_reply(msg).map_err(hs)?;
                    // Reply verified: its address list is authentic. Candidates sent before it
                    // (the host sends them first; the server keeps order) must be in it.
                    let host_addrs = &next.peer().addrs;
                    check_candidates(&candidates, host_addrs, "host")?;
                    signal.relay(PeerId::HOST, confirm.to_json()).await?;
                    await_accept = Some(next);
                } else if let Some(s) = await_accept.take() {
                    let peer = s.handle_accepted(msg).map_err(hs)?;
                    return Ok(paired(
                        Role::Joiner,
                        Rendezvous::Server,
                        "host".into(),
                        peer,
                        &opts.local,
                        opts.allow_loopback,
                        None,
                    ));
                }
            }
            ServerMsg::SessionClosed {
                reason: ErrorCode::RejectedByHost,
            } => return Err(PairError::HostRejected),
            ServerMsg::SessionClosed {
                reason: ErrorCode::HostLeft,
            } => return Err(PairError::HostGone),
            ServerMsg::SessionClosed { reason } => return Err(PairError::SessionClosed(reason)),
            ServerMsg::Error {
                code, fatal: true, ..
            } => return Err(PairError::SessionClosed(code)),
            other => debug!(?other, "ignored while pairing"),
        }
    }
}

enum Stage {
    AwaitHello,
    /// Its `hello` arrived while another handshake was in flight: not answered yet.
    Queued(Box<PairMsg>),
    AwaitConfirm(Box<HostAwaitConfirm>),
}

struct PeerState {
    stage: Stage,
    deadline: Instant,
    candidates: Vec<SocketAddr>,
}

/// The host's end of one paired joiner's trickle.
struct HostTrickle {
    auth: TrickleAuth,
    /// Towards the app's [`Trickle::from_peer`].
    from_peer: mpsc::UnboundedSender<String>,
}

struct ServerHost {
    signal: SignalClient,
    code: JoinCode,
    opts: HostOptions,
    events: mpsc::Sender<HostEvent>,
    peers: HashMap<PeerId, PeerState>,
    paired: u32,
    /// Every reply sent is charged here; one handshake in flight at a time.
    budget: GuessBudget,
    /// The joiner whose handshake is in flight (it has our reply).
    handshaking: Option<PeerId>,
    /// Joiners whose `hello` waits for the handshake in flight, oldest first.
    queue: VecDeque<PeerId>,
    /// False once pairing is over ([`HostEvent::Ended`] sent); trickles may go on.
    accepting: bool,
    trickles: HashMap<PeerId, HostTrickle>,
    /// Lines from every joiner's [`Trickle::to_peer`] (`None`: that trickle was dropped).
    lines_tx: mpsc::UnboundedSender<(PeerId, Option<String>)>,
    lines_rx: mpsc::UnboundedReceiver<(PeerId, Option<String>)>,
    pacer: Pacer,
    /// Slots given back ([`HostSession::release`]).
    release: mpsc::UnboundedReceiver<()>,
}

/// What to do after handling one server message.
enum Flow {
    Continue,
    /// Pairing is over; serve the trickles of paired joiners until they end.
    Drain(Option<PairError>),
    /// Leave the session now.
    End(Option<PairError>),
}

impl ServerHost {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // Whether `Ended` went out already (pairing over, trickles still served).
        let mut reported = false;
        let end = loop {
            let next_deadline = self.peers.values().map(|p| p.deadline).min();
            let ready = self.pacer.ready(Instant::now());
            let flow = tokio::select! {
                _ = &mut stop => Flow::End(None),
                msg = self.signal.recv() => match msg {
                    Ok(msg) => self.handle(msg).await,
                    Err(e) => Flow::End(Some(e.into())),
                },
                () = deadline(next_deadline) => self.expire().await,
                Some((peer, line)) = self.lines_rx.recv(), if ready => {
                    self.send_line(peer, line).await
                }
                () = sleep_until(self.pacer.next_token()), if !ready => Flow::Continue,
                Some(()) = self.release.recv() => {
                    self.paired = self.paired.saturating_sub(1);
                    Flow::Continue
                }
            };
            let flow = match flow {
                Flow::Continue => self.next_queued().await,
                other => other,
            };
            match flow {
                Flow::Continue => {}
                Flow::End(e) => break e,
                Flow::Drain(e) => {
                    if !self.accepting {
                        continue;
                    }
                    self.accepting = false;
                    if self.trickles.is_empty() {
                        break e;
                    }
                    // The session stays for the trickles: joiners still in their handshake
                    // are told now that they will not be paired.
                    self.queue.clear();
                    self.handshaking = None;
                    for peer in std::mem::take(&mut self.peers).into_keys() {
                        let abort = PairMsg::abort(AbortReason::Full);
                        let _ = self.signal.relay(peer, abort.to_json()).await;
                    }
                    debug!(
                        trickles = self.trickles.len(),
                        "pairing over; serving trickles"
                    );
                    reported = true;
                    if self
                        .events
                        .send(HostEvent::Ended { error: e })
                        .await
                        .is_err()
                    {
                        break None;
                    }
                }
            }
            if !self.accepting && self.trickles.is_empty() {
                debug!("every trickle ended");
                break None;
            }
        };
        // Leave first: once `Ended` is seen the session is gone at the server too (a joiner
        // arriving right after finds no session rather than one whose host is leaving).
        let _ = timeout(Duration::from_secs(2), self.signal.leave()).await;
        if !reported {
            let _ = self.events.send(HostEvent::Ended { error: end }).await;
        } else if let Some(e) = end {
            debug!(%e, "session ended after pairing");
        }
    }

    /// Sends one of our lines to `peer` (`None`: the app dropped that trickle).
    async fn send_line(&mut self, peer: PeerId, line: Option<String>) -> Flow {
        let Some(t) = self.trickles.get_mut(&peer) else {
            debug!(%peer, "trickle line for a joiner that has left, dropped");
            return Flow::Continue;
        };
        let Some(line) = line else {
            debug!(%peer, "trickle dropped by the app");
            self.trickles.remove(&peer);
            return Flow::Continue;
        };
        match t.auth.seal(&line) {
            Ok(payload) => {
                self.pacer.take();
                if let Err(e) = self.signal.relay(peer, payload).await {
                    return Flow::End(Some(e.into()));
                }
            }
            Err(why) => warn!(peer = %label(peer), reason = why.as_str(), "trickle line not sent"),
        }
        Flow::Continue
    }

    /// A trickle line from `from`: delivered when authentic, else dropped with a warning.
    fn receive_line(&mut self, from: PeerId, payload: &Value) {
        let Some(t) = self.trickles.get_mut(&from) else {
            debug!(peer = %from, "trickle line from a joiner that has not paired, ignored");
            return;
        };
        match t.auth.open(payload) {
            Ok(line) => {
                let _ = t.from_peer.send(line);
            }
            Err(why) => warn!(peer = %label(from), reason = why.as_str(), "trickle line dropped"),
        }
    }

    async fn handle(&mut self, msg: ServerMsg) -> Flow {
        match msg {
            ServerMsg::PeerJoined { peer } => {
                if !self.accepting
                    || self.paired >= self.opts.max_receivers
                    || self.peers.len() >= MAX_WAITING
                    || self.peers.contains_key(&peer)
                    || self.trickles.contains_key(&peer)
                {
                    let abort = PairMsg::abort(AbortReason::Full);
                    let _ = self.signal.relay(peer, abort.to_json()).await;
                } else {
                    debug!(%peer, "joiner arrived");
                    self.peers.insert(
                        peer,
                        PeerState {
                            stage: Stage::AwaitHello,
                            deadline: Instant::now() + self.opts.handshake_timeout,
                            candidates: Vec::new(),
                        },
                    );
                }
                Flow::Continue
            }
            ServerMsg::PeerLeft { peer, reason } => match self.peers.remove(&peer) {
                None if self.trickles.remove(&peer).is_some() => {
                    debug!(%peer, "paired joiner left; its trickle ends");
                    Flow::Continue
                }
                // It had our reply: a guess was made, whatever the server says about why it
                // left. (Our own `reject_peer` comes back as `rejected` too, but by then the
                // joiner is no longer in `peers`.)
                Some(PeerState {
                    stage: Stage::AwaitConfirm(_),
                    ..
                }) => {
                    if reason == PeerLeftReason::Rejected {
                        warn!(%peer, "the server reports a joiner we did not reject as rejected");
                    }
                    self.fail(peer, PairError::PeerGone(label(peer)), true)
                        .await
                }
                Some(_) => {
                    self.queue.retain(|p| *p != peer);
                    Flow::Continue
                }
                None => Flow::Continue,
            },
            ServerMsg::Candidate { from, candidate } => {
                if let Some(p) = self.peers.get_mut(&from)
                    && p.candidates.len() < MAX_CANDIDATES
                {
                    p.candidates.push(candidate.addr);
                }
                Flow::Continue
            }
            ServerMsg::Relay { from, payload } => self.handle_relay(from, payload).await,
            ServerMsg::SessionClosed { reason } => {
                Flow::End(Some(PairError::SessionClosed(reason)))
            }
            ServerMsg::Error {
                code, fatal: true, ..
            } => Flow::End(Some(PairError::SessionClosed(code))),
            ServerMsg::Error { code, message, .. } => {
                server_refused(&code, &message);
                Flow::Continue
            }
            other => {
                debug!(?other, "ignored");
                Flow::Continue
            }
        }
    }

    async fn handle_relay(&mut self, from: PeerId, payload: Value) -> Flow {
        if is_trickle(&payload) {
            self.receive_line(from, &payload);
            return Flow::Continue;
        }
        let Some(state) = self.peers.remove(&from) else {
            return Flow::Continue;
        };
        let hs = |source| PairError::Handshake {
            peer: label(from),
            source,
        };
        let msg = match PairMsg::from_json(payload) {
            Ok(m) => m,
            Err(e) => {
                let counted = matches!(state.stage, Stage::AwaitConfirm(_));
                self.queue.retain(|p| *p != from);
                return self.fail(from, hs(e), counted).await;
            }
        };
        match state.stage {
            Stage::AwaitHello
                if self.budget.in_flight() && matches!(msg, PairMsg::Hello { .. }) =>
            {
                // One handshake at a time: this one waits, unanswered.
                debug!(peer = %from, "hello queued behind the handshake in flight");
                self.queue.push_back(from);
                self.peers.insert(
                    from,
                    PeerState {
                        stage: Stage::Queued(Box::new(msg)),
                        ..state
                    },
                );
                Flow::Continue
            }
            Stage::AwaitHello => self.answer_hello(from, state, msg).await,
            Stage::Queued(_) => {
                // A second message before its hello was answered.
                self.queue.retain(|p| *p != from);
                let e = PakeError::Unexpected {
                    expected: "nothing until the reply",
                    got: msg.kind(),
                };
                self.fail(from, hs(e), false).await
            }
            Stage::AwaitConfirm(s) => match s.handle_confirm(msg) {
                Ok((peer, accepted)) => {
                    if let Err(e) = check_candidates(&state.candidates, &peer.addrs, &label(from)) {
                        return self.fail(from, e, true).await;
                    }
                    self.budget.succeeded();
                    self.handshaking = None;
                    if let Err(e) = self.signal.relay(from, accepted.to_json()).await {
                        return Flow::End(Some(e.into()));
                    }
                    self.paired += 1;
                    let p = paired(
                        Role::Host,
                        Rendezvous::Server,
                        label(from),
                        peer,
                        &self.opts.local,
                        self.opts.allow_loopback,
                        None,
                    );
                    info!(peer = %from, "joiner paired");
                    let trickle = self.open_trickle(from, &p);
                    if self
                        .events
                        .send(HostEvent::Paired(Box::new(p), Some(trickle)))
                        .await
                        .is_err()
                    {
                        return Flow::End(None);
                    }
                    if self.paired >= self.opts.max_receivers && !self.opts.reusable_slots {
                        Flow::Drain(None)
                    } else {
                        Flow::Continue
                    }
                }
                Err(e) => self.fail(from, hs(e), true).await,
            },
        }
    }

    /// Answers the oldest queued `hello` once no handshake is in flight.
    async fn next_queued(&mut self) -> Flow {
        while self.accepting && !self.budget.in_flight() {
            let Some(from) = self.queue.pop_front() else {
                break;
            };
            let Some(state) = self.peers.remove(&from) else {
                continue;
            };
            let Stage::Queued(hello) = state.stage else {
                self.peers.insert(from, state);
                continue;
            };
            let state = PeerState {
                stage: Stage::AwaitHello,
                ..state
            };
            let flow = self.answer_hello(from, state, *hello).await;
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        Flow::Continue
    }

    /// Answers `from`'s hello: the reply is charged to the budget before it goes out.
    async fn answer_hello(&mut self, from: PeerId, state: PeerState, msg: PairMsg) -> Flow {
        let hs = |source| PairError::Handshake {
            peer: label(from),
            source,
        };
        match HostAwaitConfirm::respond(&self.code, &self.opts.local, msg, &mut OsRng) {
            Ok((next, reply)) => {
                if let Err(why) = self.budget.begin() {
                    // Not reached (hellos wait while one is in flight, and a spent budget
                    // ends pairing), but no reply ever goes out past the budget.
                    warn!(peer = %from, %why, "hello not answered");
                    let abort = PairMsg::abort(AbortReason::Full);
                    let _ = self.signal.relay(from, abort.to_json()).await;
                    return Flow::Continue;
                }
                self.handshaking = Some(from);
                self.peers.insert(
                    from,
                    PeerState {
                        stage: Stage::AwaitConfirm(Box::new(next)),
                        ..state
                    },
                );
                // Candidates first: the joiner checks them against the reply.
                for (i, addr) in self.opts.local.addrs.iter().enumerate() {
                    if let Err(e) = self.signal.candidate(from, candidate(*addr, i)).await {
                        return Flow::End(Some(e.into()));
                    }
                }
                if let Err(e) = self.signal.relay(from, reply.to_json()).await {
                    return Flow::End(Some(e.into()));
                }
                Flow::Continue
            }
            // No reply was sent: no guess was made.
            Err(e) => self.fail(from, hs(e), false).await,
        }
    }

    /// Expires handshakes past their deadline.
    async fn expire(&mut self) -> Flow {
        let now = Instant::now();
        let late: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for peer in late {
            if let Some(state) = self.peers.remove(&peer) {
                let counted = matches!(state.stage, Stage::AwaitConfirm(_));
                self.queue.retain(|p| *p != peer);
                let err = PairError::Timeout {
                    what: "waiting for a joiner's handshake",
                    after: self.opts.handshake_timeout,
                };
                let flow = self.fail(peer, err, counted).await;
                if !matches!(flow, Flow::Continue) {
                    return flow;
                }
            }
        }
        Flow::Continue
    }

    /// Reports a failed joiner, tells it and the server, and ends the session when the
    /// attempt counted and the budget is spent.
    async fn fail(&mut self, peer: PeerId, error: PairError, counted: bool) -> Flow {
        warn!(%peer, %error, counted, "pairing failed");
        let abort = match &error {
            PairError::Handshake { source, .. } => source.abort_msg(),
            _ => PairMsg::abort(AbortReason::ConfirmFailed),
        };
        let _ = self.signal.relay(peer, abort.to_json()).await;
        let _ = self
            .signal
            .reject_peer(peer, Some("pairing failed".into()))
            .await;
        let _ = self
            .events
            .send(HostEvent::Failed {
                peer: label(peer),
                error,
            })
            .await;
        // `counted`: this joiner had our reply, so it is the handshake in flight; its guess
        // was charged when the reply went out.
        if counted && self.handshaking == Some(peer) {
            self.handshaking = None;
            if self.budget.failed() {
                return Flow::Drain(Some(PairError::TooManyFailures(self.budget.charged())));
            }
        }
        Flow::Continue
    }

    /// Starts the trickle with a joiner that just paired.
    fn open_trickle(&mut self, peer: PeerId, paired: &Paired) -> Trickle {
        let (to_peer, ours) = mpsc::unbounded_channel();
        let (theirs, from_peer) = mpsc::unbounded_channel();
        self.trickles.insert(
            peer,
            HostTrickle {
                auth: TrickleAuth::new(Role::Host, &paired.session_key),
                from_peer: theirs,
            },
        );
        tokio::spawn(forward_lines(peer, ours, self.lines_tx.clone()));
        Trickle {
            to_peer,
            from_peer,
            host_gone: Arc::default(),
        }
    }
}

/// Moves one joiner's outgoing lines into the host task's shared queue, then `None` when
/// the app drops the trickle. Ends early when the host task is gone.
async fn forward_lines(
    peer: PeerId,
    mut lines: mpsc::UnboundedReceiver<String>,
    out: mpsc::UnboundedSender<(PeerId, Option<String>)>,
) {
    loop {
        tokio::select! {
            line = lines.recv() => {
                let end = line.is_none();
                if out.send((peer, line)).is_err() || end {
                    return;
                }
            }
            () = out.closed() => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Trickle.

/// Post-pairing candidate exchange with one peer through thruserv. Lines are opaque here
/// (flux-ice candidate strings, `Display` of `flux_ice::Candidate`).
#[derive(Debug)]
pub struct Trickle {
    /// Our candidate lines, to the peer. Dropping every sender ends the exchange.
    pub to_peer: mpsc::UnboundedSender<String>,
    /// The peer's lines, authenticated, in order. Ends when the signaling connection does.
    pub from_peer: mpsc::UnboundedReceiver<String>,
    /// Joiner: set as soon as the server says the host left the session (it stopped, was
    /// killed or lost its connection): the transfer can end at once instead of waiting for
    /// QUIC to time out. Never set on the host's side.
    pub host_gone: Arc<std::sync::atomic::AtomicBool>,
}

/// Longest trickle line in bytes; longer ones are neither sent nor accepted.
pub const MAX_TRICKLE_LINE: usize = 512;
/// Most trickle lines sent to, and accepted from, one peer.
pub const MAX_TRICKLE_LINES: u64 = 200;
/// Trickle messages sent per second on one signaling connection (all of a host's joiners
/// together). thruserv closes a connection above `--ws-msgs-per-sec` (default 50).
pub const TRICKLE_SEND_RATE: u32 = 20;
/// Burst allowance for [`TRICKLE_SEND_RATE`] (thruserv's default `--ws-msgs-burst`: 100).
pub const TRICKLE_SEND_BURST: u32 = 40;

/// `t` of a trickle relay payload; pairing messages use other tags.
const TRICKLE_TAG: &str = "ice";
/// BLAKE3 `derive_key` contexts of the two directions' MAC keys: distinct, so that a line
/// cannot be reflected back to its sender.
const TRICKLE_MAC_HOST: &str = "thruflux 2026 ice trickle mac host to joiner";
const TRICKLE_MAC_JOINER: &str = "thruflux 2026 ice trickle mac joiner to host";

fn is_trickle(payload: &Value) -> bool {
    payload.get("t").and_then(Value::as_str) == Some(TRICKLE_TAG)
}

/// Why a trickle line was not sent or not delivered.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum LineDropped {
    /// Missing or mistyped fields, or a line that is not one printable line.
    Malformed,
    /// Over [`MAX_TRICKLE_LINE`] bytes.
    TooLong,
    /// The MAC does not verify: forged or altered.
    BadMac,
    /// `seq` not above the last accepted one: replayed or reordered.
    Replayed,
    /// Over [`MAX_TRICKLE_LINES`].
    TooMany,
}

impl LineDropped {
    fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLong => "line too long",
            Self::BadMac => "bad MAC (forged or altered)",
            Self::Replayed => "replayed or out-of-order seq",
            Self::TooMany => "too many lines",
        }
    }
}

/// Sealing and opening the trickle lines of one pair, one end. Plain state, no I/O.
struct TrickleAuth {
    send_key: [u8; 32],
    recv_key: [u8; 32],
    /// `seq` of the last line sealed (the first is 1).
    sent: u64,
    /// Highest `seq` accepted.
    received: u64,
    accepted: u64,
}

impl TrickleAuth {
    fn new(role: Role, session_key: &[u8; 32]) -> Self {
        let host = blake3::derive_key(TRICKLE_MAC_HOST, session_key);
        let joiner = blake3::derive_key(TRICKLE_MAC_JOINER, session_key);
        let (send_key, recv_key) = match role {
            Role::Host => (host, joiner),
            Role::Joiner => (joiner, host),
        };
        Self {
            send_key,
            recv_key,
            sent: 0,
            received: 0,
            accepted: 0,
        }
    }

    /// The relay payload carrying `line`.
    fn seal(&mut self, line: &str) -> Result<Value, LineDropped> {
        check_line(line)?;
        if self.sent >= MAX_TRICKLE_LINES {
            return Err(LineDropped::TooMany);
        }
        self.sent += 1;
        let mac = line_mac(&self.send_key, self.sent, line);
        Ok(serde_json::json!({
            "t": TRICKLE_TAG,
            "seq": self.sent,
            "line": line,
            "mac": mac.to_hex().as_str(),
        }))
    }

    /// The line in a peer's payload, when authentic and new.
    fn open(&mut self, payload: &Value) -> Result<String, LineDropped> {
        let field = |name| payload.get(name).ok_or(LineDropped::Malformed);
        let seq = field("seq")?.as_u64().ok_or(LineDropped::Malformed)?;
        let line = field("line")?.as_str().ok_or(LineDropped::Malformed)?;
        let mac = field("mac")?.as_str().ok_or(LineDropped::Malformed)?;
        check_line(line)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| LineDropped::Malformed)?;
        // `blake3::Hash` compares in constant time.
        if mac != line_mac(&self.recv_key, seq, line) {
            return Err(LineDropped::BadMac);
        }
        if seq <= self.received {
            return Err(LineDropped::Replayed);
        }
        if self.accepted >= MAX_TRICKLE_LINES {
            return Err(LineDropped::TooMany);
        }
        self.received = seq;
        self.accepted += 1;
        Ok(line.to_owned())
    }
}

/// Lines are UTF-8 by construction (JSON strings); also one line, no control characters.
fn check_line(line: &str) -> Result<(), LineDropped> {
    if line.len() > MAX_TRICKLE_LINE {
        Err(LineDropped::TooLong)
    } else if line.is_empty() || line.chars().any(char::is_control) {
        Err(LineDropped::Malformed)
    } else {
        Ok(())
    }
}

fn line_mac(key: &[u8; 32], seq: u64, line: &str) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&seq.to_be_bytes());
    h.update(line.as_bytes());
    h.finalize()
}

/// Token bucket for the messages one signaling connection sends.
struct Pacer {
    tokens: u32,
    /// When the last token was added (or the bucket was last full).
    last: Instant,
}

impl Pacer {
    const STEP: Duration = Duration::from_millis(1000 / TRICKLE_SEND_RATE as u64);

    fn new(now: Instant) -> Self {
        Self {
            tokens: TRICKLE_SEND_BURST,
            last: now,
        }
    }

    /// Refills, then says whether a message may go now.
    fn ready(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() / Self::STEP.as_nanos()).min(u128::from(TRICKLE_SEND_BURST));
        // `add` is at most the burst, a u32.
        let add = u32::try_from(add).unwrap_or(TRICKLE_SEND_BURST);
        self.tokens = (self.tokens + add).min(TRICKLE_SEND_BURST);
        self.last = if self.tokens == TRICKLE_SEND_BURST {
            now
        } else {
            self.last + Self::STEP * add
        };
        self.tokens > 0
    }

    fn take(&mut self) {
        self.tokens = self.tokens.saturating_sub(1);
    }

    /// When the next token arrives.
    fn next_token(&self) -> Instant {
        self.last + Self::STEP
    }
}

/// Keeps a joiner's signaling connection for its trickle with the host.
/// Logs a message the server refused. A loopback candidate refused by a server that does not
/// relay them is expected when both ends share a machine (they still meet over the other
/// addresses), so it is a debug line, not a warning.
fn server_refused(code: &ErrorCode, message: &str) {
    if *code == ErrorCode::CandidateRejected && message.contains("loopback") {
        debug!(%code, message = %safe_text(message), "the signaling server refused a message");
    } else {
        warn!(%code, message = %safe_text(message), "the signaling server refused a message");
    }
}

fn spawn_joiner_trickle(signal: SignalClient, paired: &Paired) -> Trickle {
    let (to_peer, ours) = mpsc::unbounded_channel();
    let (theirs, from_peer) = mpsc::unbounded_channel();
    let auth = TrickleAuth::new(Role::Joiner, &paired.session_key);
    let host_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(joiner_trickle(
        signal,
        auth,
        ours,
        theirs,
        host_gone.clone(),
    ));
    Trickle {
        to_peer,
        from_peer,
        host_gone,
    }
}

async fn joiner_trickle(
    mut signal: SignalClient,
    mut auth: TrickleAuth,
    mut ours: mpsc::UnboundedReceiver<String>,
    theirs: mpsc::UnboundedSender<String>,
    host_gone: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut pacer = Pacer::new(Instant::now());
    loop {
        let ready = pacer.ready(Instant::now());
        tokio::select! {
            line = ours.recv(), if ready => {
                let Some(line) = line else {
                    debug!("trickle dropped by the app; leaving the session");
                    let _ = timeout(Duration::from_secs(2), signal.leave()).await;
                    return;
                };
                match auth.seal(&line) {
                    Ok(payload) => {
                        pacer.take();
                        if let Err(e) = signal.relay(PeerId::HOST, payload).await {
                            warn!(%e, "trickle: the signaling connection failed");
                            return;
                        }
                    }
                    Err(why) => warn!(peer = "host", reason = why.as_str(), "trickle line not sent"),
                }
            }
            () = sleep_until(pacer.next_token()), if !ready => {}
            msg = signal.recv() => match msg {
                Ok(ServerMsg::Relay { from, payload })
                    if from == PeerId::HOST && is_trickle(&payload) =>
                {
                    match auth.open(&payload) {
                        Ok(line) => {
                            let _ = theirs.send(line);
                        }
                        Err(why) => {
                            warn!(peer = "host", reason = why.as_str(), "trickle line dropped");
                        }
                    }
                }
                Ok(ServerMsg::SessionClosed { reason }) => {
                    debug!(%reason, "trickle: the session ended");
                    if reason == ErrorCode::HostLeft {
                        host_gone.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    signal.close().await;
                    return;
                }
                Ok(ServerMsg::Error { code, fatal: true, message }) => {
                    warn!(
                        %code,
                        message = %safe_text(&message),
                        "trickle: the signaling server closed the connection"
                    );
                    return;
                }
                Ok(ServerMsg::Error { code, message, .. }) => server_refused(&code, &message),
                Ok(other) => debug!(?other, "ignored after pairing"),
                Err(e) => {
                    debug!(%e, "trickle: the signaling connection ended");
                    return;
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// LAN.

/// Starts a LAN host: listens for pairing connections and advertises with mDNS.
pub async fn host_lan(config: LanHostConfig, opts: HostOptions) -> Result<HostSession, PairError> {
    let code = JoinCode::generate_local().map_err(PairError::Random)?;
    let listener = bind_lan(config.bind).await?;
    let lan_addr = listener.local_addr().map_err(|source| PairError::Io {
        what: "reading the pairing listener's address".into(),
        source,
    })?;
    let daemon = match &config.mdns {
        Mdns::Off => None,
        m => Some(advertise(m, &code, lan_addr.port())?),
    };
    info!(%lan_addr, mdns = daemon.is_some(), "LAN pairing listening");
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel();
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    tokio::spawn(lan_host_loop(
        listener,
        daemon,
        code.clone(),
        opts,
        tx,
        (stop_rx, release_rx),
    ));
    Ok(HostSession {
        code,
        lan_addr: Some(lan_addr),
        events: rx,
        stop: Some(stop_tx),
        release: release_tx,
    })
}

/// Finds the LAN host for `code` and pairs with it.
pub async fn join_lan(
    code: &JoinCode,
    target: LanTarget,
    opts: JoinOptions,
) -> Result<Paired, PairError> {
    let limit = opts.timeout;
    let fut = async {
        let (stream, how) = match &target {
            LanTarget::Peer(addr) => {
                let s = TcpStream::connect(addr)
                    .await
                    .map_err(|source| PairError::Io {
                        what: format!("cannot reach the host at {addr} (--peer)"),
                        source,
                    })?;
                (s, Rendezvous::LanDirect)
            }
            LanTarget::Mdns(m) => (find_by_mdns(code, m, limit).await?, Rendezvous::LanMdns),
        };
        let reached = stream.peer_addr().ok().map(|a| a.ip());
        lan_join_handshake(stream, code, &opts, how, reached).await
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(PairError::Timeout {
            what: "pairing with the LAN host",
            after: limit,
        }),
    }
}

/// The mDNS instance name of a LAN host with this routing part: a hash, so the code does not
/// appear on the network.
pub fn mdns_instance(routing: RoutingId) -> String {
    let h = blake3::derive_key("thruflux mdns instance v1", routing.as_str().as_bytes());
    format!("thru-{}", crate::pake::hex(&h[..8]))
}

async fn bind_lan(bind: SocketAddr) -> Result<TcpListener, PairError> {
    let io_err = |source| PairError::Io {
        what: format!("cannot listen for LAN pairing on {bind}"),
        source,
    };
    if bind.port() != 0 {
        return TcpListener::bind(bind).await.map_err(io_err);
    }
    let preferred = SocketAddr::new(bind.ip(), DEFAULT_LAN_PORT);
    match TcpListener::bind(preferred).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(bind).await.map_err(io_err),
    }
}

fn daemon(m: &Mdns) -> Result<ServiceDaemon, PairError> {
    let err = |e: mdns_sd::Error| PairError::Mdns(e.to_string());
    let d = ServiceDaemon::new().map_err(err)?;
    if let Mdns::Interfaces(names) = m {
        d.disable_interface(IfKind::All).map_err(err)?;
        for n in names {
            d.enable_interface(IfKind::Name(n.clone())).map_err(err)?;
        }
    }
    Ok(d)
}

fn advertise(m: &Mdns, code: &JoinCode, port: u16) -> Result<ServiceDaemon, PairError> {
    let d = daemon(m)?;
    let instance = mdns_instance(code.routing());
    let info = ServiceInfo::new(
        MDNS_SERVICE,
        &instance,
        &format!("{instance}.local."),
        (),
        port,
        &[("v", "1")][..],
    )
    .map_err(|e| PairError::Mdns(e.to_string()))?
    .enable_addr_auto();
    d.register(info)
        .map_err(|e| PairError::Mdns(e.to_string()))?;
    Ok(d)
}

async fn find_by_mdns(code: &JoinCode, m: &Mdns, limit: Duration) -> Result<TcpStream, PairError> {
    let d = daemon(m)?;
    let rx = d
        .browse(MDNS_SERVICE)
        .map_err(|e| PairError::Mdns(e.to_string()))?;
    let want = format!("{}.{MDNS_SERVICE}", mdns_instance(code.routing()));
    let until = Instant::now() + limit;
    loop {
        let ev = match timeout(
            until.saturating_duration_since(Instant::now()),
            rx.recv_async(),
        )
        .await
        {
            Ok(Ok(ev)) => ev,
            Ok(Err(_)) | Err(_) => break,
        };
        if let ServiceEvent::ServiceResolved(info) = ev
            && info.get_fullname().eq_ignore_ascii_case(&want)
        {
            let mut ips: Vec<IpAddr> = info
                .get_addresses()
                .iter()
                .map(|ip| ip.to_ip_addr())
                .collect();
            // IPv4 first, then IPv6 (link-local v6 needs a scope we do not keep).
            ips.sort_by_key(|ip| (ip.is_ipv6(), ip.is_loopback()));
            let port = info.get_port();
            let mut last = None;
            for ip in ips {
                match TcpStream::connect((ip, port)).await {
                    Ok(s) => {
                        let _ = d.shutdown();
                        return Ok(s);
                    }
                    Err(e) => last = Some((ip, e)),
                }
            }
            if let Some((ip, e)) = last {
                debug!(%ip, %e, "advertised address unreachable");
            }
        }
    }
    let _ = d.shutdown();
    Err(PairError::NotFound(limit))
}

async fn lan_host_loop(
    listener: TcpListener,
    daemon: Option<ServiceDaemon>,
    code: JoinCode,
    opts: HostOptions,
    events: mpsc::Sender<HostEvent>,
    (mut stop, mut release): (oneshot::Receiver<()>, mpsc::UnboundedReceiver<()>),
) {
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Result<Paired, (PairError, bool)>)>(16);
    // Shared by every connection: each reply is charged before it goes out, and `turn` lets
    // one handshake at a time past the hello (the others wait, unanswered, in FIFO order).
    let budget = Arc::new(std::sync::Mutex::new(GuessBudget::new(
        opts.max_failed_attempts,
    )));
    let turn = Arc::new(Semaphore::new(1));
    let mut paired = 0u32;
    let mut in_flight = 0u32;
    let mut failed = 0u32;
    let mut next_id = 1u32;
    let end = loop {
        tokio::select! {
            _ = &mut stop => break None,
            Some(()) = release.recv() => paired = paired.saturating_sub(1),
            acc = listener.accept() => {
                let (stream, from) = match acc {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(%e, "accept failed");
                        continue;
                    }
                };
                let peer = format!("joiner {next_id}");
                next_id += 1;
                debug!(%from, %peer, "pairing connection");
                let full = paired + in_flight >= opts.max_receivers
                    || in_flight as usize >= MAX_WAITING;
                if !full {
                    in_flight += 1;
                }
                let (code, opts, tx) = (code.clone(), opts.clone(), done_tx.clone());
                let shared = LanShared {
                    budget: budget.clone(),
                    turn: turn.clone(),
                };
                tokio::spawn(async move {
                    let res = lan_host_conn(stream, &code, &opts, &peer, full, &shared).await;
                    if !full {
                        let _ = tx.send((peer, res)).await;
                    }
                });
            }
            Some((peer, res)) = done_rx.recv() => {
                in_flight = in_flight.saturating_sub(1);
                match res {
                    Ok(p) => {
                        paired += 1;
                        if events.send(HostEvent::Paired(Box::new(p), None)).await.is_err() {
                            break None;
                        }
                        if paired >= opts.max_receivers && !opts.reusable_slots {
                            break None;
                        }
                    }
                    Err((error, counted)) => {
                        warn!(%peer, %error, counted, "pairing failed");
                        let _ = events.send(HostEvent::Failed { peer, error }).await;
                        if counted {
                            failed += 1;
                            if failed >= opts.max_failed_attempts.max(1) {
                                break Some(PairError::TooManyFailures(failed));
                            }
                        }
                    }
                }
            }
        }
    };
    // Connections still waiting for their turn get no reply.
    lock(&budget).close();
    if let Some(d) = daemon {
        let _ = d.shutdown();
    }
    let _ = events.send(HostEvent::Ended { error: end }).await;
}

/// What the LAN host's connections share.
struct LanShared {
    budget: Arc<std::sync::Mutex<GuessBudget>>,
    /// One permit: the handshake in flight holds it from the reply to its settlement.
    turn: Arc<Semaphore>,
}

fn lock(b: &std::sync::Mutex<GuessBudget>) -> std::sync::MutexGuard<'_, GuessBudget> {
    // Nothing panics while holding it; a poisoned budget is still the right count.
    b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One LAN pairing connection, host side. `Err((error, counted))`: `counted` when this
/// joiner got a reply (one guess) and did not pair.
async fn lan_host_conn(
    stream: TcpStream,
    code: &JoinCode,
    opts: &HostOptions,
    peer: &str,
    full: bool,
    shared: &LanShared,
) -> Result<Paired, (PairError, bool)> {
    let limit = opts.handshake_timeout;
    let until = Instant::now() + limit;
    let timed_out = || PairError::Timeout {
        what: "waiting for a joiner's handshake",
        after: limit,
    };
    let mut conn = Lines::new(stream);
    let hs = |source| PairError::Handshake {
        peer: peer.to_string(),
        source,
    };
    let hello = match timeout_at(until, conn.read()).await {
        Ok(r) => r.map_err(|e| (e, false))?,
        Err(_) => return Err((timed_out(), false)),
    };
    let refuse = PairMsg::abort;
    if full {
        let _ = conn.write(&refuse(AbortReason::Full)).await;
        return Err((PairError::PeerGone(peer.into()), false));
    }
    // Wait, unanswered, for the handshake in flight (if any) to settle.
    let _turn = match timeout_at(until, shared.turn.acquire()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) | Err(_) => return Err((timed_out(), false)),
    };
    let (state, reply) = match HostAwaitConfirm::respond(code, &opts.local, hello, &mut OsRng) {
        Ok(x) => x,
        Err(e) => {
            let _ = conn.write(&e.abort_msg()).await;
            return Err((hs(e), false));
        }
    };
    let begun = lock(&shared.budget).begin();
    if let Err(why) = begun {
        debug!(%peer, %why, "hello not answered");
        let _ = conn.write(&refuse(AbortReason::Full)).await;
        return Err((PairError::PeerGone(peer.into()), false));
    }
    let rest = async {
        conn.write(&reply).await?;
        let confirm = conn.read().await?;
        match state.handle_confirm(confirm) {
            Ok((info, accepted)) => {
                conn.write(&accepted).await?;
                Ok(paired(
                    Role::Host,
                    Rendezvous::LanDirect,
                    peer.to_string(),
                    info,
                    &opts.local,
                    true,
                    None,
                ))
            }
            Err(e) => {
                let _ = conn.write(&e.abort_msg()).await;
                Err(hs(e))
            }
        }
    };
    let res = match timeout_at(until, rest).await {
        Ok(r) => r,
        Err(_) => Err(timed_out()),
    };
    // Settled while still holding the turn: the next hello sees the new count.
    let mut budget = lock(&shared.budget);
    match res {
        Ok(p) => {
            budget.succeeded();
            Ok(p)
        }
        Err(e) => {
            budget.failed();
            Err((e, true))
        }
    }
}

async fn lan_join_handshake(
    stream: TcpStream,
    code: &JoinCode,
    opts: &JoinOptions,
    how: Rendezvous,
    reached: Option<IpAddr>,
) -> Result<Paired, PairError> {
    let mut conn = Lines::new(stream);
    let hs = |source| PairError::Handshake {
        peer: "host".into(),
        source,
    };
    let (state, hello) = JoinerStart::start(code, opts.local.clone(), &mut OsRng);
    conn.write(&hello).await?;
    let reply = conn.read().await?;
    let (state, confirm) = match state.handle_reply(reply) {
        Ok(x) => x,
        Err(e) => {
            let _ = conn.write(&e.abort_msg()).await;
            return Err(hs(e));
        }
    };
    conn.write(&confirm).await?;
    let accepted = conn.read().await?;
    let peer = state.handle_accepted(accepted).map_err(|e| match e {
        PakeError::PeerAborted(AbortReason::ConfirmFailed) => PairError::HostRejected,
        e => hs(e),
    })?;
    Ok(paired(
        Role::Joiner,
        how,
        "host".into(),
        peer,
        &opts.local,
        true,
        reached,
    ))
}

/// Newline-delimited JSON over TCP, each line at most [`MAX_LINE`] bytes.
struct Lines {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Lines {
    fn new(s: TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        let (r, w) = s.into_split();
        Self {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn read(&mut self) -> Result<PairMsg, PairError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| PairError::Io {
                what: "reading from the peer".into(),
                source,
            })?;
        if n == 0 {
            return Err(PairError::PeerGone("the peer".into()));
        }
        if n as u64 > MAX_LINE {
            return Err(PairError::Handshake {
                peer: "peer".into(),
                source: PakeError::Malformed("message too long"),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&line).map_err(|_| PairError::Handshake {
                peer: "peer".into(),
                source: PakeError::Malformed("not JSON"),
            })?;
        PairMsg::from_json(v).map_err(|source| PairError::Handshake {
            peer: "peer".into(),
            source,
        })
    }

    async fn write(&mut self, msg: &PairMsg) -> Result<(), PairError> {
        let mut text = msg.to_json().to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| PairError::Io {
                what: "writing to the peer".into(),
                source,
            })
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// This machine's interface addresses with `port`, IPv4 first; loopback only when asked
/// (and then last). Link-local IPv6 is left out (it needs a scope id).
pub fn local_addrs(port: u16, include_loopback: bool) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| include_loopback || !ip.is_loopback())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_unspecified(),
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6()));
    out.dedup();
    out.truncate(crate::pake::MAX_ADDRS);
    out
}

fn candidate(addr: SocketAddr, index: usize) -> Candidate {
    Candidate {
        addr,
        kind: CandidateKind::Host,
        protocol: TransportProtocol::Udp,
        // RFC 8445 §5.1.2.1: type preference 126 for host candidates, local preference
        // falling with the index, component 1.
        priority: (126 << 24) | ((65535u32.saturating_sub(index as u32)) << 8) | 255,
        foundation: format!("h{index}"),
        component: 1,
        related: None,
    }
}

fn check_candidates(
    got: &[SocketAddr],
    vouched: &[SocketAddr],
    peer: &str,
) -> Result<(), PairError> {
    match got.iter().find(|a| !vouched.contains(a)) {
        Some(addr) => Err(PairError::ForeignCandidate {
            addr: *addr,
            peer: peer.to_string(),
        }),
        None => Ok(()),
    }
}

fn label(peer: PeerId) -> String {
    format!("joiner {peer}")
}

fn paired(
    role: Role,
    rendezvous: Rendezvous,
    peer_label: String,
    peer: PeerInfo,
    local: &LocalInfo,
    allow_loopback: bool,
    reached: Option<IpAddr>,
) -> Paired {
    let policy = CandidatePolicy { allow_loopback };
    let mut addrs: Vec<SocketAddr> = peer
        .addrs
        .into_iter()
        .filter(|a| match check_candidate_addr(*a, policy) {
            Ok(()) => true,
            Err(why) => {
                debug!(%a, why = why.as_str(), "peer address dropped");
                false
            }
        })
        .collect();
    if let Some(ip) = reached {
        // The address pairing reached the host at is known to work: try it first.
        addrs.sort_by_key(|a| a.ip() != ip);
    }
    Paired {
        role,
        rendezvous,
        peer_label,
        peer_fingerprint: peer.fingerprint,
        peer_addrs: addrs,
        quic: peer.quic,
        local_fingerprint: local.fingerprint,
        local_addrs: local.addrs.clone(),
        session_key: peer.session_key,
    }
}

async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [9; 32];
    const LINE: &str = "candidate:1 1 udp 2130706431 192.0.2.1 4001 typ host";

    fn ends() -> (TrickleAuth, TrickleAuth) {
        (
            TrickleAuth::new(Role::Host, &KEY),
            TrickleAuth::new(Role::Joiner, &KEY),
        )
    }

    #[test]
    fn trickle_lines_open_in_order_both_ways() {
        let (mut host, mut joiner) = ends();
        for i in 0..3 {
            let line = format!("{LINE} {i}");
            let p = host.seal(&line).unwrap_or_else(|e| panic!("{e:?}"));
            assert!(is_trickle(&p));
            assert_eq!(joiner.open(&p), Ok(line.clone()));
            let p = joiner.seal(&line).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(host.open(&p), Ok(line));
        }
    }

    #[test]
    fn trickle_refuses_altered_forged_replayed_and_reflected_lines() {
        let (mut host, mut joiner) = ends();
        let first = host.seal(LINE).unwrap_or_else(|e| panic!("{e:?}"));
        let second = host.seal(LINE).unwrap_or_else(|e| panic!("{e:?}"));

        let mut altered = first.clone();
        altered["line"] = "candidate:1 1 udp 2130706431 127.0.0.66 6666 typ host".into();
        assert_eq!(joiner.open(&altered), Err(LineDropped::BadMac));
        let mut reseq = first.clone();
        reseq["seq"] = 7.into();
        assert_eq!(joiner.open(&reseq), Err(LineDropped::BadMac));
        let mut forged = first.clone();
        forged["mac"] = "00".repeat(32).into();
        assert_eq!(joiner.open(&forged), Err(LineDropped::BadMac));
        // The host's own line sent back to it: the other direction's key.
        assert_eq!(host.open(&first), Err(LineDropped::BadMac));
        // Another pair's line.
        let mut other = TrickleAuth::new(Role::Host, &[1; 32]);
        let foreign = other.seal(LINE).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(joiner.open(&foreign), Err(LineDropped::BadMac));

        // Out of order: the second first, then the first is old.
        assert_eq!(joiner.open(&second), Ok(LINE.to_owned()));
        assert_eq!(joiner.open(&first), Err(LineDropped::Replayed));
        assert_eq!(joiner.open(&second), Err(LineDropped::Replayed));

        for bad in [
            serde_json::json!({"t": "ice"}),
            serde_json::json!({"t": "ice", "seq": -1, "line": LINE, "mac": "00"}),
            serde_json::json!({"t": "ice", "seq": 3, "line": 5, "mac": "00"}),
            serde_json::json!({"t": "ice", "seq": 3, "line": LINE, "mac": "zz"}),
        ] {
            assert_eq!(joiner.open(&bad), Err(LineDropped::Malformed), "{bad}");
        }
    }

    #[test]
    fn trickle_caps_line_length_and_count() {
        let (mut host, mut joiner) = ends();
        let long = "a".repeat(MAX_TRICKLE_LINE + 1);
        assert_eq!(host.seal(&long), Err(LineDropped::TooLong));
        assert_eq!(host.seal("two\nlines"), Err(LineDropped::Malformed));
        let mut oversized = TrickleAuth::new(Role::Host, &KEY)
            .seal(LINE)
            .unwrap_or_else(|e| panic!("{e:?}"));
        oversized["line"] = long.into();
        assert_eq!(joiner.open(&oversized), Err(LineDropped::TooLong));

        for _ in 0..MAX_TRICKLE_LINES {
            let p = host.seal(LINE).unwrap_or_else(|e| panic!("{e:?}"));
            assert!(joiner.open(&p).is_ok());
        }
        assert_eq!(host.seal(LINE), Err(LineDropped::TooMany));
        // A peer that ignores the cap is refused at the receiver too.
        let seq = MAX_TRICKLE_LINES + 1;
        let extra = serde_json::json!({
            "t": "ice",
            "seq": seq,
            "line": LINE,
            "mac": line_mac(&host.send_key, seq, LINE).to_hex().as_str(),
        });
        assert_eq!(joiner.open(&extra), Err(LineDropped::TooMany));
    }

    #[test]
    fn pacer_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        for _ in 0..TRICKLE_SEND_BURST {
            assert!(p.ready(t0));
            p.take();
        }
        assert!(!p.ready(t0));
        assert_eq!(p.next_token(), t0 + Pacer::STEP);
        assert!(p.ready(p.next_token()));
        p.take();
        assert!(!p.ready(t0 + Pacer::STEP));
        // A second refills `TRICKLE_SEND_RATE` tokens, never more than the burst.
        let later = t0 + Duration::from_secs(1) + Pacer::STEP;
        assert!(p.ready(later));
        assert_eq!(p.tokens, TRICKLE_SEND_RATE);
        assert!(p.ready(t0 + Duration::from_secs(60)));
        assert_eq!(p.tokens, TRICKLE_SEND_BURST);
    }
}
