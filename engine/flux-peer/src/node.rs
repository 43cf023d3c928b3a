//! The peer core: everything one engine worker decides, and none of what it does.
//!
//! A [`Node`] owns the QUIC endpoint and its connections (any
//! `flux_quic::conn::QuicEndpoint`; quinn-proto's by default), the transfer machine on each
//! connection (a [`Session`] of a [`Sender`] or a [`Receiver`]), the ICE links to peers and
//! the end-of-transfer policy (linger, cancel, connect time-outs, how many receivers). Like
//! quinn-proto under quinn, it does no I/O and reads no clock:
//!
//! - input: [`Node::handle_datagram`], [`Node::handle_command`], [`Node::handle_disk_done`],
//!   [`Node::handle_turn`], and [`Node::handle_timeout`] (called every loop turn with `now`);
//! - output: [`Node::poll_transmit`] (UDP batches, GSO-sized), [`Node::poll_disk`] (disk,
//!   hash and compress requests, see `flux_transfer::DiskOp`), [`Node::poll_turn`] (TURN
//!   stream work), [`Node::poll_event`] ([`NetEvent`]s) and [`Node::poll_timeout`].
//!
//! Drivers move bytes, completions and time: [`crate::net`] (io_uring or epoll on a real UDP
//! socket) and [`crate::sim`] (an emulated link on a virtual clock) drive the same `Node`, so
//! simulated runs cover linger, cancel and ICE as well.
//!
//! What it does not decide: what the receiver's destination holds (scanning it is disk I/O:
//! the driver answers [`Event::ManifestReady`] with [`Node::accept`]), and where a disk
//! request goes (files, stdin, stdout).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flux_quic::conn::{Closed, ConnId, PathStats, QuicConnection, QuicEndpoint};
use flux_quic::quinn::QuinnEndpoint;
use flux_transfer::{
    DiskFailure, DiskOp, DiskResult, Event, LocalFile, Manifest, OpId, Receiver, Sender,
    TransferError,
};

use crate::error::NetError;
use crate::ice::{IceSetup, Link, LinkNote, TurnReport};
use crate::net::{Command, ConnReport, NetConfig, NetEvent, NetReport};
use crate::session::{Session, Side, Tamper};

/// How long a sender that completed waits for the receiver to close the connection.
pub const SENDER_LINGER: Duration = Duration::from_secs(3);

/// How long a side that failed (or was cancelled) and told its peer why waits for the peer
/// to close: closing at once would discard that message if QUIC had not sent it yet.
pub const FAILURE_LINGER: Duration = Duration::from_secs(1);

/// Longest failure text carried in a CONNECTION_CLOSE (it must fit one packet).
const MAX_CLOSE_REASON: usize = 512;

/// A UDP batch to send: `size` bytes of the caller's buffer, `segment_size` apart.
#[derive(Clone, Copy, Debug)]
pub struct Transmit {
    /// Where to.
    pub destination: SocketAddr,
    /// Bytes of the buffer to send.
    pub size: usize,
    /// GSO segment size, when the batch holds more than one datagram.
    pub segment_size: Option<usize>,
    /// ICE traffic and stateless responses: a send error only loses this datagram (ICE
    /// retransmits; a candidate may be an address this host cannot reach).
    pub best_effort: bool,
}

/// Work on a TURN stream (TCP or TLS) the driver carries out; it reports back with
/// [`Node::handle_turn`].
#[derive(Debug)]
pub enum TurnOp {
    /// Connect stream `id` of link `link` to `addr` (TLS when `tls`).
    Open {
        /// The link (the caller's peer number).
        link: u64,
        /// The stream.
        id: flux_ice::StreamId,
        /// The TURN server.
        addr: SocketAddr,
        /// `turns:`.
        tls: bool,
    },
    /// Append bytes to a stream.
    Write {
        /// The link.
        link: u64,
        /// The stream.
        id: flux_ice::StreamId,
        /// The bytes (STUN or framed QUIC).
        data: Vec<u8>,
    },
}

/// The transfer machine of a connection.
enum Machine {
    Send(Session<Sender>),
    Recv(Session<Receiver>),
}

/// Calls `$body` with the session bound to `$s`, whichever machine it runs.
macro_rules! with_session {
    ($m:expr, $s:ident => $body:expr) => {
        match $m {
            Machine::Send($s) => $body,
            Machine::Recv($s) => $body,
        }
    };
}

struct Conn {
    machine: Machine,
    peer: SocketAddr,
    connected: bool,
    /// When the connection attempt began (the handshake must finish within the timeout).
    created: Instant,
    ended: bool,
    error: Option<NetError>,
    /// The ICE link the connection runs over (index into `Node::links`).
    link: Option<usize>,
    /// Until when the connection waits for the peer to close it: a sender that completed,
    /// or a side that told its peer of its failure.
    linger_until: Option<Instant>,
    /// This side's machine failed (or was cancelled) and told the peer why.
    reported: bool,
    /// Receiver: grows the connection's receive window with the measured bandwidth-delay
    /// product (flux_quic::WindowTuner has the reasons).
    tuner: Option<flux_quic::WindowTuner>,
    /// The endpoint's number for the QUIC connection.
    id: ConnId,
}

impl Conn {
    fn new(
        id: ConnId,
        machine: Machine,
        peer: SocketAddr,
        now: Instant,
        link: Option<usize>,
    ) -> Self {
        Self {
            machine,
            peer,
            connected: false,
            created: now,
            ended: false,
            error: None,
            link,
            linger_until: None,
            reported: false,
            tuner: None,
            id,
        }
    }

    fn is_over(&self) -> bool {
        with_session!(&self.machine, s => s.machine.is_over())
    }
}

/// A datagram (or GSO batch) queued for the driver: ICE, stateless responses, relayed QUIC.
struct Queued {
    to: SocketAddr,
    data: Vec<u8>,
    segment_size: Option<usize>,
    best_effort: bool,
}

/// The sans-IO peer core of one worker (module docs).
pub struct Node<E = QuinnEndpoint> {
    cfg: NetConfig,
    endpoint: E,
    conns: Vec<Conn>,
    /// Host: the share. Joiner: `None`.
    share: Option<Arc<Manifest>>,
    links: Vec<Link>,
    /// Every remote address a link selected, to its link: QUIC from there belongs to it.
    link_addrs: HashMap<SocketAddr, usize>,
    /// Joiner over ICE: connect once a pair is selected.
    pending_connect: bool,
    /// The socket's own address (its port, and the address when not bound to a wildcard).
    local: SocketAddr,
    /// Most segments per GSO batch the driver's socket takes.
    max_segments: usize,
    report: NetReport,
    ended: usize,
    cancelled: bool,
    /// Inputs arrived since the sessions were last driven.
    dirty: bool,
    events: VecDeque<NetEvent>,
    out: VecDeque<Queued>,
    turn: VecDeque<TurnOp>,
    /// The connection [`Node::poll_disk`] asks first.
    disk_next: usize,
    /// Given to the next receiving session (tests alter received bytes with it).
    tamper: Option<Tamper>,
}

impl<E> std::fmt::Debug for Node<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("host", &self.share.is_some())
            .field("conns", &self.conns.len())
            .field("links", &self.links.len())
            .field("ended", &self.ended)
            .field("cancelled", &self.cancelled)
            .finish_non_exhaustive()
    }
}

impl<E: QuicEndpoint> Node<E> {
    fn new(
        cfg: &NetConfig,
        endpoint: E,
        share: Option<Arc<Manifest>>,
        local: SocketAddr,
        max_segments: usize,
    ) -> Self {
        Self {
            cfg: cfg.clone(),
            endpoint,
            conns: Vec::new(),
            share,
            links: Vec::new(),
            link_addrs: HashMap::new(),
            pending_connect: false,
            local,
            max_segments: max_segments.max(1),
            report: NetReport::default(),
            ended: 0,
            cancelled: false,
            dirty: true,
            events: VecDeque::new(),
            out: VecDeque::new(),
            turn: VecDeque::new(),
            disk_next: 0,
            tamper: None,
        }
    }

    /// A host serving `share` on a server `endpoint` (its identity, and the joiners it lets
    /// in), on a socket bound to `local` that takes GSO batches of up to `max_segments`.
    pub fn host(
        cfg: &NetConfig,
        endpoint: E,
        share: Arc<Manifest>,
        local: SocketAddr,
        max_segments: usize,
    ) -> Self {
        Self::new(cfg, endpoint, Some(share), local, max_segments)
    }

    /// A joiner on a client `endpoint` (which pins the host); it connects with
    /// [`Node::connect`], or over ICE with [`Node::connect_over_ice`].
    pub fn join(cfg: &NetConfig, endpoint: E, local: SocketAddr, max_segments: usize) -> Self {
        Self::new(cfg, endpoint, None, local, max_segments)
    }

    /// Alters received bytes before the receiving machine sees them (tests inject corruption).
    pub fn set_tamper(&mut self, tamper: Tamper) {
        self.tamper = Some(tamper);
    }

    /// Joiner: connects to `peer`.
    pub fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<(), TransferError> {
        self.connect_link(now, peer, None)
    }

    /// Joiner: runs ICE with the host (link 0) and connects over the first selected pair.
    pub fn connect_over_ice(&mut self, now: Instant, ice: IceSetup) {
        self.links.push(Link::new(0, ice, now));
        self.pending_connect = true;
    }

    fn connect_link(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        link: Option<usize>,
    ) -> Result<(), TransferError> {
        let id = self
            .endpoint
            .connect(now, peer)
            .map_err(|e| TransferError::Io(e.to_string()))?;
        let mut rcfg = self.cfg.receiver.clone();
        if self.cfg.pipe {
            rcfg.features |= flux_wire::FEATURE_IN_ORDER;
        }
        let mut session = Session::new(
            Receiver::new(rcfg),
            Side::Client,
            self.cfg.transport.send_window,
        );
        session.tamper = self.tamper.take();
        let mut c = Conn::new(id, Machine::Recv(session), peer, now, link);
        c.tuner = Some(flux_quic::WindowTuner::new(self.cfg.transport.conn_window));
        self.conns.push(c);
        self.dirty = true;
        Ok(())
    }

    /// Whether any connection was made (or attempted) yet.
    pub fn has_connections(&self) -> bool {
        !self.conns.is_empty()
    }

    /// Whether this node is the host.
    pub fn is_host(&self) -> bool {
        self.share.is_some()
    }

    /// Whether the node has nothing left to do: every connection ended and, for a host, the
    /// transfers it was to serve are over (or it was cancelled).
    pub fn is_done(&self) -> bool {
        let all_ended = self.conns.iter().all(|c| c.ended);
        if self.cancelled {
            return all_ended;
        }
        match self.share {
            None => !self.pending_connect && all_ended,
            Some(_) => self.cfg.serve.is_some_and(|n| self.ended >= n && all_ended),
        }
    }

    /// Whether ICE is still looking for a pair on some link (candidates may trickle in: the
    /// driver looks at its commands more often).
    pub fn ice_waiting(&self) -> bool {
        self.links
            .iter()
            .any(|l| l.live() && l.selected_after.is_none())
    }

    /// Whether link `id` is still driven (its TURN streams still matter).
    pub fn link_live(&self, id: u64) -> bool {
        self.links.iter().any(|l| l.id == id && l.live())
    }

    /// The receiving machine of connection `conn`, to answer a manifest.
    pub fn receiver(&mut self, conn: usize) -> Option<&mut Receiver> {
        match self.conns.get_mut(conn).map(|c| &mut c.machine) {
            Some(Machine::Recv(s)) => {
                self.dirty = true;
                Some(&mut s.machine)
            }
            _ => None,
        }
    }

    /// Records `error` as connection `conn`'s failure (kept if one is already recorded).
    pub fn set_error(&mut self, conn: usize, error: NetError) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.error.get_or_insert(error);
        }
    }

    /// Receiver: accept the offer on every connection, skipping or resuming what `local`
    /// says the destination holds, and receiving only `chosen` entries when given.
    pub fn accept(
        &mut self,
        now: Instant,
        local: &HashMap<u32, LocalFile>,
        chosen: Option<&BTreeSet<u32>>,
    ) {
        self.dirty = true;
        for c in &mut self.conns {
            if let Machine::Recv(s) = &mut c.machine {
                s.machine.accept_chosen(now, local.clone(), chosen);
            }
        }
    }

    /// Ends the node with `error` (a failure before any machine could: the destination cannot
    /// be scanned).
    pub fn fail(&mut self, error: NetError) {
        self.report.error = Some(error);
        self.cancel_with(None);
    }

    /// A command from the user or the pairing layer. `Accept*` commands need the driver's
    /// destination and come through [`Node::accept`] instead; here they are ignored.
    pub fn handle_command(&mut self, now: Instant, cmd: Command) {
        self.dirty = true;
        match cmd {
            Command::CancelWith(reason) => {
                if !self.cancelled {
                    self.cancel_with(Some(&reason));
                }
            }
            Command::Cancel => {
                if !self.cancelled {
                    self.cancel_with(None);
                }
            }
            Command::Accept | Command::AcceptResolved(_) | Command::AcceptChosen { .. } => {
                tracing::debug!("an accept reached the node: the driver answers offers");
            }
            Command::Pause(paused) => {
                for c in &mut self.conns {
                    if let Machine::Recv(s) = &mut c.machine
                        && !s.machine.set_paused(now, paused)
                    {
                        tracing::info!("this transfer cannot be paused now");
                    }
                }
            }
            Command::AddPeer { link, ice } => {
                if self.cancelled || self.links.iter().any(|l| l.id == link) {
                    return;
                }
                tracing::debug!(link, "ICE with a new peer");
                self.links.push(Link::new(link, *ice, now));
            }
            Command::RemoteCandidate { link, candidate } => {
                if let Some(l) = self.links.iter_mut().find(|l| l.id == link && l.live()) {
                    l.remote_candidate(&candidate, now);
                }
            }
            Command::Leave => {
                for c in &mut self.conns {
                    if let Machine::Recv(s) = &mut c.machine {
                        s.machine.browse_done();
                    }
                }
            }
            Command::Reject(reason) => {
                for c in &mut self.conns {
                    if let Machine::Recv(s) = &mut c.machine {
                        s.machine.reject(&reason);
                    }
                }
            }
        }
    }

    fn cancel_with(&mut self, reason: Option<&str>) {
        self.cancelled = true;
        self.dirty = true;
        if std::mem::take(&mut self.pending_connect) {
            self.report.error.get_or_insert(NetError::Cancelled);
        }
        for c in &mut self.conns {
            // A transfer that completed (a sender waiting for the receiver to close) stays a
            // success; it just stops waiting (cancelling a machine that is over does nothing).
            if c.is_over() {
                continue;
            }
            match (&mut c.machine, reason) {
                (Machine::Send(s), Some(r)) => s.machine.stop(r),
                (Machine::Recv(s), Some(r)) => {
                    let kept = s.machine.bytes_done() as f64 / f64::from(1 << 20);
                    s.machine.stop(&format!("{r}; {kept:.1} MiB kept"));
                }
                (Machine::Send(s), None) => s.machine.cancel(),
                (Machine::Recv(s), None) => s.machine.cancel(),
            }
            if !c.ended {
                c.error.get_or_insert(NetError::Cancelled);
            }
        }
        if self.conns.is_empty() {
            self.report.error.get_or_insert(NetError::Cancelled);
        }
    }

    /// A received UDP batch: `data` holds datagrams `stride` bytes apart (GRO), sent by
    /// `from` to `dst_ip` (when the socket reports it) with ECN bits `ecn`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<u8>,
        stride: usize,
        mut data: BytesMut,
    ) {
        self.dirty = true;
        let stride = stride.max(1);
        let local = SocketAddr::new(dst_ip.unwrap_or(self.local.ip()), self.local.port());
        while !data.is_empty() {
            let seg = data.split_to(stride.min(data.len()));
            // RFC 9443: QUIC packets have the fixed bit (0x40) set; STUN starts 0..=3, TURN
            // ChannelData 64..=79 (only from a TURN server). Demultiplex per segment
            // (platform facts: GRO may append a STUN datagram to a QUIC batch).
            let mut source = from;
            let seg = if self.links.is_empty() {
                if seg[0] & 0x40 == 0 {
                    self.report.foreign_datagrams += 1;
                    continue;
                }
                seg
            } else {
                match self.demux_ice(now, from, local, seg) {
                    Some((addr, seg)) => {
                        source = addr;
                        seg
                    }
                    None => continue,
                }
            };
            self.feed_quic(now, source, dst_ip, ecn, seg);
        }
    }

    /// Sorts one segment when ICE shares the socket: ICE traffic is consumed by its link, and
    /// QUIC (direct or unwrapped from TURN) comes back with the address QUIC knows its
    /// sender by. `None`: consumed or dropped.
    fn demux_ice(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: SocketAddr,
        seg: BytesMut,
    ) -> Option<(SocketAddr, BytesMut)> {
        let first = seg[0];
        if (0x40..=0x4F).contains(&first) || first <= 3 {
            // ChannelData from a link's TURN server, or STUN for one of the links (agents
            // refuse what is not theirs: unknown transaction, wrong user name).
            let channel = first >= 0x40;
            for i in 0..self.links.len() {
                let l = &mut self.links[i];
                if !l.live()
                    || (channel && l.agent.classify(from, &seg) != flux_ice::Packet::ChannelData)
                {
                    continue;
                }
                match l.agent.handle_datagram(now, from, local, &seg) {
                    flux_ice::Received::App { data, peer } => {
                        // Relayed QUIC can overtake the selection event: the link is known.
                        let addr = *l.quic_addr.get_or_insert(peer);
                        self.link_addrs.entry(peer).or_insert(i);
                        return Some((addr, BytesMut::from(data)));
                    }
                    flux_ice::Received::Handled if channel => return None,
                    _ => {}
                }
            }
            if !channel {
                return None;
            }
        }
        if first & 0x40 == 0 {
            self.report.foreign_datagrams += 1;
            return None;
        }
        // Direct QUIC: under the link's constant address when it comes from a selected pair.
        let addr = self
            .link_addrs
            .get(&from)
            .and_then(|&i| self.links.get(i))
            .and_then(|l| l.quic_addr)
            .unwrap_or(from);
        Some((addr, seg))
    }

    fn feed_quic(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<u8>,
        seg: BytesMut,
    ) {
        self.endpoint.handle(now, from, dst_ip, ecn, seg);
        while let Some(inc) = self.endpoint.poll_incoming() {
            self.incoming(now, inc);
        }
    }

    /// Accepts or refuses a peer's connection attempt (the receiver caps, a cancel).
    fn incoming(&mut self, now: Instant, inc: flux_quic::conn::Incoming) {
        let live = self.conns.iter().filter(|c| !c.ended).count();
        let serving_done = self.cfg.serve.is_some_and(|n| self.ended + live >= n);
        let share = match self.share.clone() {
            Some(s) if !self.cancelled && live < self.cfg.max_receivers && !serving_done => s,
            _ => return self.endpoint.refuse(inc.id),
        };
        let peer = inc.remote;
        let Some(id) = self.endpoint.accept(now, inc.id) else {
            tracing::debug!(peer = %peer, "refused a connection");
            return;
        };
        let link = self
            .links
            .iter()
            .position(|l| l.live() && l.quic_addr == Some(peer));
        let m = Sender::new(share, self.cfg.sender.clone());
        let machine = Machine::Send(Session::new(
            m,
            Side::Server,
            self.cfg.transport.send_window,
        ));
        self.conns.push(Conn::new(id, machine, peer, now, link));
    }

    /// What a TURN stream of link `link` reported (see [`TurnOp`]).
    pub fn handle_turn(&mut self, now: Instant, link: u64, report: TurnReport) {
        if let Some(l) = self.links.iter_mut().find(|l| l.id == link && l.live()) {
            l.handle_turn(now, report);
        }
    }

    /// Advances time: ICE checks and keep-alives, QUIC and machine timers, the receive-window
    /// tuner. Call every loop turn (it does nothing before a deadline).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.dirty = true;
        self.ice(now);
        self.endpoint.handle_timeout(now);
        for c in &mut self.conns {
            if c.ended {
                continue;
            }
            with_session!(&mut c.machine, s => s.machine.handle_timeout(now));
            if c.connected
                && let Some(t) = c.tuner.as_mut()
                && t.next_sample().is_none_or(|at| now >= at)
                && let Some(q) = self.endpoint.conn(c.id)
            {
                let s = q.stats();
                if let Some(w) = t.sample(now, s.udp_rx_bytes, s.rtt) {
                    tracing::debug!(window = w, rtt = ?s.rtt, "receive window grown");
                    q.set_receive_window(w);
                }
            }
        }
    }

    /// Drives the ICE links: timers, candidates out, selections and failures.
    fn ice(&mut self, now: Instant) {
        let mut notes = Vec::new();
        for i in 0..self.links.len() {
            let out = &mut self.out;
            let mut send = |data: &[u8], to: SocketAddr| {
                out.push_back(Queued {
                    to,
                    data: data.to_vec(),
                    segment_size: None,
                    best_effort: true,
                });
            };
            self.links[i].pump(now, &mut send, &mut notes);
            let id = self.links[i].id;
            for note in notes.drain(..) {
                match note {
                    LinkNote::Candidate(candidate) => {
                        self.events.push_back(NetEvent::LocalCandidate {
                            link: id,
                            candidate,
                        });
                    }
                    LinkNote::Selected(route) => {
                        tracing::info!(
                            link = id,
                            kind = route.kind.as_str(),
                            local = %route.local,
                            remote = %route.remote,
                            transport = route.transport.as_str(),
                            "ICE selected a pair"
                        );
                        self.link_addrs.insert(route.remote, i);
                        let after = self.links[i].selected_after.unwrap_or_default();
                        self.events.push_back(NetEvent::Route {
                            link: id,
                            route,
                            after,
                        });
                        if std::mem::take(&mut self.pending_connect) {
                            let peer = self.links[i].quic_addr.unwrap_or(route.remote);
                            if let Err(e) = self.connect_link(now, peer, Some(i)) {
                                self.report.error.get_or_insert(NetError::Transfer(e));
                            }
                        }
                    }
                    LinkNote::Failed(why) => {
                        let error = NetError::Ice(why);
                        tracing::warn!(link = id, "{error}");
                        if std::mem::take(&mut self.pending_connect) {
                            self.report.error.get_or_insert_with(|| error.clone());
                        }
                        for c in self.conns.iter_mut().filter(|c| c.link == Some(i)) {
                            c.error.get_or_insert_with(|| error.clone());
                        }
                        self.events.push_back(NetEvent::IceFailed {
                            link: id,
                            error: error.to_string(),
                        });
                    }
                    LinkNote::App(d) => {
                        if let Some(addr) = self.links[i].quic_addr {
                            self.feed_quic(now, addr, None, None, BytesMut::from(&d.data[..]));
                        }
                    }
                    LinkNote::OpenStream {
                        id: stream,
                        addr,
                        tls,
                    } => {
                        self.turn.push_back(TurnOp::Open {
                            link: id,
                            id: stream,
                            addr,
                            tls,
                        });
                    }
                    LinkNote::StreamWrite(stream, data) => {
                        self.turn.push_back(TurnOp::Write {
                            link: id,
                            id: stream,
                            data,
                        });
                    }
                }
            }
        }
    }

    /// Moves everything between connections and machines: QUIC events into the machines,
    /// their output into QUIC, handshakes noticed.
    fn drive(&mut self, now: Instant) {
        self.dirty = false;
        for (i, c) in self.conns.iter_mut().enumerate() {
            let Some(q) = self.endpoint.conn(c.id) else {
                continue;
            };
            if c.ended {
                continue;
            }
            if !c.connected && !q.is_handshaking() && !q.is_closed() {
                c.connected = true;
                self.events.push_back(NetEvent::Connected {
                    conn: i,
                    peer: c.peer,
                    fingerprint: q.peer_fingerprint(),
                    at: now,
                });
            }
            with_session!(&mut c.machine, s => s.drive(now, q));
        }
    }

    /// The next disk (or hash, compress) request, with the connection it belongs to; answer
    /// each with [`Node::handle_disk_done`] under the same connection number.
    pub fn poll_disk(&mut self, now: Instant) -> Option<(usize, DiskOp)> {
        if self.dirty {
            self.drive(now);
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.disk_next + k) % n;
            if self.conns[i].ended {
                continue;
            }
            let op = with_session!(&mut self.conns[i].machine, s => s.machine.poll_disk());
            if let Some(op) = op {
                self.disk_next = i;
                return Some((i, op));
            }
        }
        None
    }

    /// A disk request of connection `conn` completed.
    pub fn handle_disk_done(
        &mut self,
        now: Instant,
        conn: usize,
        id: OpId,
        result: Result<DiskResult, DiskFailure>,
    ) {
        self.dirty = true;
        if let Some(c) = self.conns.get_mut(conn) {
            with_session!(&mut c.machine, s => s.machine.handle_disk_done(now, id, result));
        }
    }

    /// The next event for the caller. A receiver's [`Event::ManifestReady`] (inside
    /// [`NetEvent::Transfer`]) asks the driver to look at its destination and call
    /// [`Node::accept`] (or [`Node::receiver`] to reject, browse or cancel).
    pub fn poll_event(&mut self, now: Instant) -> Option<NetEvent> {
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        if self.dirty {
            self.drive(now);
        }
        for (i, c) in self.conns.iter_mut().enumerate() {
            while let Some(ev) = with_session!(&mut c.machine, s => s.machine.poll_event()) {
                if let Event::Failed(e) = &ev {
                    c.error.get_or_insert_with(|| NetError::Transfer(e.clone()));
                    // A failure of our own was sent to the peer; one the peer reported was not.
                    c.reported |=
                        !matches!(e, TransferError::Peer { .. } | TransferError::Declined(_));
                }
                self.events.push_back(NetEvent::Transfer {
                    conn: i,
                    event: ev,
                    at: now,
                });
            }
        }
        self.events.pop_front()
    }

    /// The next UDP batch to send, written into `buf` (cleared first). `None` once every
    /// connection has had its turn: the driver should then receive before asking again. At
    /// the end of each round the node applies its end policy, which may queue
    /// [`NetEvent::Ended`] events and CONNECTION_CLOSE packets (the next round sends them).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        loop {
            if let Some(q) = self.out.pop_front() {
                buf.clear();
                buf.extend_from_slice(&q.data);
                return Some(Transmit {
                    destination: q.to,
                    size: q.data.len(),
                    segment_size: q.segment_size,
                    best_effort: q.best_effort,
                });
            }
            let Some(t) = self.endpoint.poll_transmit(now, self.max_segments, buf) else {
                // The round's bytes are out: connections whose transfer is over close now
                // (closing first would discard stream data not yet sent, such as a last Error
                // message).
                self.check_ended(now);
                if self.out.is_empty() {
                    return None;
                }
                // Something was queued meanwhile: it goes first.
                continue;
            };
            // The connection's link; a stack that does not say which connection a datagram is
            // for (s2n-quic), and stateless responses, go by the address a link selected.
            let link = t
                .conn
                .and_then(|id| self.conns.iter().find(|c| c.id == id))
                .and_then(|c| c.link)
                .or_else(|| self.link_addrs.get(&t.destination).copied());
            let Some(l) = link else {
                return Some(Transmit {
                    destination: t.destination,
                    size: t.size,
                    segment_size: t.segment_size,
                    // A stateless response (a refusal, a reset) is like any lost datagram.
                    best_effort: t.conn.is_none(),
                });
            };
            buf.truncate(t.size);
            if let Some(t) = self.via_link(now, l, buf, t.segment_size) {
                return Some(t);
            }
            // Queued (relayed) or dropped: look again.
        }
    }

    /// Sends one QUIC batch of link `l`'s connection: directly (the whole GSO batch, returned
    /// for the caller to send from `buf`), or framed for TURN into the queue.
    fn via_link(
        &mut self,
        now: Instant,
        l: usize,
        buf: &[u8],
        segment_size: Option<usize>,
    ) -> Option<Transmit> {
        let link = &mut self.links[l];
        let seg = segment_size.unwrap_or(buf.len()).max(1);
        if let Some(rc) = link.agent.relay_channel() {
            // Relayed over UDP with a bound channel: a 4-byte ChannelData header in front of
            // each segment, still GSO batches (UDP needs no padding). The headers make the
            // batch bigger than the one QUIC filled: group it so each stays within a GSO
            // batch's limit (one UDP payload), or it would fail whole.
            let fseg = seg + 4;
            let per_batch = flux_udp::max_gso_segments(fseg).max(1);
            for group in buf.chunks(seg * per_batch) {
                let mut framed = Vec::with_capacity(group.len() + 4 * per_batch);
                for p in group.chunks(seg) {
                    let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
                    framed.extend_from_slice(&flux_ice::channel_header(rc.channel, len));
                    framed.extend_from_slice(p);
                }
                let gso = segment_size.map(|_| fseg).filter(|_| framed.len() > fseg);
                self.out.push_back(Queued {
                    to: rc.to,
                    data: framed,
                    segment_size: gso,
                    best_effort: false,
                });
            }
            return None;
        }
        let id = link.id;
        let mut wrapped = std::mem::take(&mut link.wrapped);
        for (n, p) in buf.chunks(seg).enumerate() {
            match self.links[l].agent.wrap(now, p, &mut wrapped) {
                Ok(flux_ice::SendVia::Direct { to, .. }) if n == 0 => {
                    // The whole batch goes one way: keep GSO.
                    self.links[l].wrapped = wrapped;
                    return Some(Transmit {
                        destination: to,
                        size: buf.len(),
                        segment_size,
                        best_effort: false,
                    });
                }
                Ok(flux_ice::SendVia::Direct { to, .. }) => self.out.push_back(Queued {
                    to,
                    data: p.to_vec(),
                    segment_size: None,
                    best_effort: false,
                }),
                // Before the channel is bound: Send indications, one per packet. A full socket
                // buffer drops the packet, which QUIC recovers like a loss.
                Ok(flux_ice::SendVia::TurnUdp { to, .. }) => self.out.push_back(Queued {
                    to,
                    data: wrapped.clone(),
                    segment_size: None,
                    best_effort: true,
                }),
                Ok(flux_ice::SendVia::TurnStream(stream)) => self.turn.push_back(TurnOp::Write {
                    link: id,
                    id: stream,
                    data: wrapped.clone(),
                }),
                // Not selected yet or relay not ready: dropped like a lost packet.
                Err(_) => {}
            }
        }
        self.links[l].wrapped = wrapped;
        None
    }

    /// The next TURN stream operation for the driver.
    pub fn poll_turn(&mut self) -> Option<TurnOp> {
        self.turn.pop_front()
    }

    /// When [`Node::handle_timeout`] must next be called, at the latest.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                deadline = Some(deadline.map_or(t, |d: Instant| d.min(t)));
            }
        };
        consider(self.endpoint.poll_timeout());
        for c in &mut self.conns {
            if c.ended {
                continue;
            }
            consider(with_session!(&mut c.machine, s => s.machine.poll_timeout()));
            if !c.connected {
                consider(Some(c.created + self.cfg.connect_timeout));
            }
            consider(c.linger_until);
        }
        for l in self.links.iter().filter(|l| l.live()) {
            consider(l.agent.poll_timeout());
        }
        deadline
    }

    /// The end policy: which connections are over (transfer done and flushed, closed, or never
    /// connected in time), each reported once as [`NetEvent::Ended`].
    fn check_ended(&mut self, now: Instant) {
        let mut newly = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.ended {
                continue;
            }
            let over = c.is_over();
            let closed = with_session!(&c.machine, s => s.close_reason().is_some());
            let flushed = with_session!(&mut c.machine, s => s.machine.outbox().ready().is_empty());
            let connect_expired =
                !c.connected && now.duration_since(c.created) > self.cfg.connect_timeout;
            if connect_expired && !over {
                c.error.get_or_insert(NetError::ConnectTimeout(c.peer));
            }
            // A handshake the stack gave up on (a certificate refused) ends it at once, not
            // at the connect timeout.
            let connect_failed = match (c.connected, self.endpoint.connect_failure(c.id)) {
                (false, Some(reason)) => {
                    c.error.get_or_insert(NetError::ConnectFailed {
                        peer: c.peer,
                        reason,
                    });
                    true
                }
                _ => false,
            };
            // A sender that completed lets the receiver close: closing first would discard its
            // final Close message if a packet carrying it was lost (the receiver would see
            // the connection die before the transfer's end). It closes itself only after
            // SENDER_LINGER.
            // A side that failed and told the peer why waits likewise (shorter), so the message
            // is not discarded by the close; the peer, told, closes at once.
            let sender = matches!(c.machine, Machine::Send(_));
            let linger = if sender && c.error.is_none() && !self.cancelled {
                Some(SENDER_LINGER)
            } else if c.reported && c.connected {
                Some(FAILURE_LINGER)
            } else {
                None
            };
            if over
                && flushed
                && !closed
                && let Some(linger) = linger
                && now < *c.linger_until.get_or_insert(now + linger)
            {
                continue;
            }
            if (over && flushed) || closed || connect_expired || connect_failed {
                if !closed {
                    // The failure goes in the close too: a peer that missed the message still
                    // learns why (it shows as `closed by peer: <reason> (code 1)`).
                    let (code, reason) = match &c.error {
                        None => (0u32, bytes::Bytes::new()),
                        Some(e) => {
                            let e = e.to_string();
                            let mut end = e.len().min(MAX_CLOSE_REASON);
                            while !e.is_char_boundary(end) {
                                end -= 1;
                            }
                            (1, bytes::Bytes::copy_from_slice(&e.as_bytes()[..end]))
                        }
                    };
                    if let Some(q) = self.endpoint.conn(c.id) {
                        q.close(now, code, reason);
                    }
                }
                if closed && !over {
                    let reason = with_session!(&c.machine, s => s.close_reason().cloned());
                    let idle = self.cfg.transport.idle_timeout;
                    c.error.get_or_insert_with(|| match reason {
                        // Keep-alives go out every second: silence this long means the peer
                        // is gone (killed, suspended, or the path went down).
                        Some(Closed::TimedOut) => NetError::PeerGone { idle },
                        Some(Closed::Other(r)) => NetError::ConnectionLost(r),
                        None => NetError::ConnectionLost(String::new()),
                    });
                }
                c.ended = true;
                newly.push(i);
            }
        }
        for i in newly {
            if self.is_host() && !self.conns[i].connected {
                // A handshake that failed (an unpaired client, a scan): not a transfer.
                tracing::debug!(peer = %self.conns[i].peer, error = ?self.conns[i].error, "refused a client");
                continue;
            }
            self.ended += 1;
            let error = self.conns[i].error.clone();
            if error.is_some() {
                self.report.failed += 1;
            } else {
                self.report.succeeded += 1;
            }
            if let Some(l) = self.conns[i].link {
                // The transfer is over: stop checks and keepalives towards that peer.
                self.links[l].closed = true;
            }
            let stats = Box::new(conn_report(
                &self.conns[i],
                self.endpoint.conn(self.conns[i].id).map(|q| q.stats()),
                &self.links,
            ));
            self.events.push_back(NetEvent::Ended {
                conn: i,
                error,
                stats,
            });
        }
    }

    /// What the node did: transfers succeeded and failed, the first failure, per-connection
    /// statistics. The driver adds its own (disk, socket) figures.
    pub fn report(&mut self) -> NetReport {
        let links = &self.links;
        let endpoint = &mut self.endpoint;
        let mut r = self.report.clone();
        r.conns = self
            .conns
            .iter()
            .map(|c| conn_report(c, endpoint.conn(c.id).map(|q| q.stats()), links))
            .collect();
        if r.error.is_none() {
            r.error = self.conns.iter().find_map(|c| c.error.clone());
        }
        r
    }
}

fn conn_report(c: &Conn, stats: Option<PathStats>, links: &[Link]) -> ConnReport {
    let peer = c.peer;
    let link = c.link.and_then(|l| links.get(l));
    let s = stats.unwrap_or_default();
    ConnReport {
        peer: Some(peer),
        rtt: s.rtt,
        packets_sent: s.sent_packets,
        packets_lost: s.lost_packets,
        mtu: s.mtu,
        congestion_events: s.congestion_events,
        udp_tx_bytes: s.udp_tx_bytes,
        udp_rx_bytes: s.udp_rx_bytes,
        route: link.and_then(|l| l.agent.selected()),
        ice_connect: link.and_then(|l| l.selected_after),
        link: link.map(|l| l.id),
        ice_stats: link.map(|l| l.agent.stats()),
    }
}
