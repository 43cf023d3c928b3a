//! The engine's worker loop: one thread owns a UDP socket, a quinn-proto endpoint with its
//! connections, the transfer machines on them and their disk I/O, and drives them all without
//! an async runtime.
//!
//! Two drivers run the same loop and differ only in how they wait and do disk I/O:
//! - [`Driver::Uring`]: chunk reads and writes go through io_uring (`O_DIRECT` where the
//!   filesystem allows), and the thread sleeps in `io_uring_enter` on a readiness poll of the
//!   socket, disk completions and the next protocol deadline together. UDP itself is sent and
//!   received with direct `sendmsg`/`recvmmsg` + GSO/GRO, which measured at least as fast as
//!   io_uring `SENDMSG`/`RECVMSG` on this kernel (engine/README.md, platform pitfall 7).
//! - [`Driver::Epoll`]: the portable driver. It sleeps in `poll(2)` on the socket and performs
//!   disk requests with blocking, buffered `std::fs` calls, for kernels or sandboxes without
//!   io_uring.
//!
//! Control crosses threads only through channels: the loop reports [`NetEvent`]s and takes
//! [`Command`]s (accept an offer, cancel) without any lock on the data path.
//!
//! NAT traversal: with ICE ([`join_ice`], [`Command::AddPeer`]) the same socket carries one
//! `flux_ice` agent per peer ([`crate::ice`]). Each datagram is demultiplexed per GRO segment
//! by its first byte (RFC 9443): STUN goes to the agents, TURN ChannelData to the agent whose
//! TURN server sent it, QUIC to the endpoint under the peer's constant QUIC address; each
//! connection's QUIC packets leave through its agent's selected pair (directly as GSO
//! batches, or framed for TURN). Without ICE, non-QUIC datagrams are counted and dropped.
//!
//! What it does not do: pairing, signaling or user interface. It is handed a bound socket and
//! the peer's address or ICE settings, the pinned certificate fingerprint (joiner) or its own
//! identity (host); candidates go in and out through the channels.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver as Rx, Sender as Tx, TryRecvError};
use flux_engine::{BackendKind, DiskIo, Op};
use flux_quic::quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, ServerConfig,
};
use flux_quic::{AllowList, Fingerprint, Identity, TransportParams};
use flux_transfer::{
    Event, LocalFile, Manifest, Receiver, ReceiverConfig, Sender, SenderConfig, TransferError,
};
use flux_udp::{GRO_BUF_LEN, RecvMeta, UdpSocket};

use crate::disk::{Destination, ModePolicy, Resolutions, SourceFiles};
use crate::exec::{DiskChoice, DiskExec, DiskMode, DiskStats};
use crate::ice::{IceSetup, Link, LinkNote};
use crate::session::{Session, Side};

/// How the worker waits and performs disk I/O.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Driver {
    /// io_uring for disk and waiting, `O_DIRECT` files.
    Uring,
    /// `poll(2)` and blocking buffered file I/O.
    Epoll,
}

impl Driver {
    /// io_uring when the kernel offers it (and `FLUX_ENGINE_NO_URING` is unset), else epoll.
    pub fn auto() -> Self {
        match DiskIo::new(BackendKind::Uring) {
            Ok(_) => Self::Uring,
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; using the epoll driver");
                Self::Epoll
            }
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        }
    }
}

impl std::str::FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "epoll" => Ok(Self::Epoll),
            "auto" => Ok(Self::auto()),
            other => Err(format!(
                "unknown I/O driver {other:?} (expected uring, epoll or auto)"
            )),
        }
    }
}

/// Settings of one worker.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Wait and disk strategy.
    pub driver: Driver,
    /// Whether chunk I/O bypasses the page cache (io_uring driver only; filesystems that
    /// refuse `O_DIRECT` fall back to buffered).
    pub disk: DiskMode,
    /// QUIC settings.
    pub transport: TransportParams,
    /// Sender machine settings.
    pub sender: SenderConfig,
    /// Receiver machine settings.
    pub receiver: ReceiverConfig,
    /// Receiver: accept the offer without asking (else wait for [`Command::Accept`]).
    pub auto_accept: bool,
    /// Receiver: only look: report the offer ([`NetEvent::Offer`], nothing scanned at the
    /// destination) and leave without receiving (`thru join --list`).
    pub browse: bool,
    /// Receiver: how the sender's modes apply to received entries.
    pub modes: ModePolicy,
    /// Threads that hash and verify chunks beside the loop thread (io_uring driver; 0: the
    /// loop thread does it inline).
    pub work_threads: usize,
    /// Receiver: sync files and directories before the transfer counts as done
    /// ([`Destination::set_durable`]); [`NetReport::sync_time`] says how long it took.
    pub durable: bool,
    /// Host: most receivers connected at once; more are refused.
    pub max_receivers: usize,
    /// Host: stop after this many transfers ended (`None`: serve until cancelled).
    pub serve: Option<usize>,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Host: require joiners to present a certificate on this list (mutual pinning); `None`
    /// lets any client that pins the host's certificate in.
    pub allowed_joiners: Option<Arc<AllowList>>,
    /// Joiner: the identity to present to a host that requires one.
    pub client_identity: Option<Arc<Identity>>,
    /// Receiver: write the share's one file to stdout, in order, instead of under the
    /// destination ([`crate::pipe`]; `thru join --out -`). A share of anything but one file is
    /// refused before a byte is written.
    pub pipe: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            driver: Driver::Uring,
            disk: DiskMode::Auto,
            transport: TransportParams::default(),
            sender: SenderConfig::default(),
            receiver: ReceiverConfig::default(),
            auto_accept: true,
            browse: false,
            modes: ModePolicy::Safe,
            durable: false,
            // Inline: on this project's 2-core machine, with both ends on it, a work thread
            // measured neutral (bench/README.md); more cores per side are where it pays.
            work_threads: 0,
            max_receivers: 10,
            serve: Some(1),
            connect_timeout: Duration::from_secs(10),
            allowed_joiners: None,
            client_identity: None,
            pipe: false,
        }
    }
}

/// Instructions to a running worker.
#[derive(Debug)]
pub enum Command {
    /// Receiver: accept the offered transfer.
    Accept,
    /// Receiver: accept, with the user's answers for entries that clash with what is here.
    AcceptResolved(Resolutions),
    /// Receiver: accept only the `chosen` manifest entries (the directories they lie in
    /// included), with the user's answers for clashes.
    AcceptChosen {
        /// Answers for clashing entries.
        resolved: Resolutions,
        /// The entries to receive.
        chosen: std::collections::BTreeSet<u32>,
    },
    /// Receiver: refuse the offer with this reason.
    Reject(String),
    /// Receiver: pause (`true`) or resume the transfer; the connection stays up.
    Pause(bool),
    /// Receiver: leave without receiving anything, as after only looking at the offer
    /// (the host does not count it as a refusal).
    Leave,
    /// Stop everything and end.
    Cancel,
    /// Stop everything and end, telling each peer why (`the host stopped (Ctrl-C)`); a
    /// receiver adds how much it keeps for a resume.
    CancelWith(String),
    /// Host: start ICE with a new peer, numbered `link` by the caller.
    AddPeer {
        /// The caller's number for this peer.
        link: u64,
        /// ICE settings.
        ice: Box<IceSetup>,
    },
    /// A candidate the peer trickled (a `flux_ice::Candidate` line).
    RemoteCandidate {
        /// The peer.
        link: u64,
        /// The candidate line.
        candidate: String,
    },
}

/// What a worker reports while it runs. `conn` numbers the connections of a worker.
#[derive(Debug)]
pub enum NetEvent {
    /// The QUIC handshake with a peer completed.
    Connected {
        /// Connection number.
        conn: usize,
        /// The peer's address.
        peer: SocketAddr,
        /// The fingerprint of the certificate the peer presented (a joiner's, under mutual
        /// pinning; the host's, on the joiner).
        fingerprint: Option<Fingerprint>,
        /// When.
        at: Instant,
    },
    /// Receiver: the sender's manifest arrived and the destination was scanned; answer with
    /// [`Command::Accept`] or [`Command::Reject`] unless `auto_accept` is set.
    Offer {
        /// The offered entries.
        manifest: Arc<Manifest>,
        /// What the destination already holds, per entry.
        local: Arc<HashMap<u32, LocalFile>>,
        /// The text the sender offered with it (`thru host --text`); show it once accepted.
        text: Option<Arc<str>>,
    },
    /// A transfer machine's event.
    Transfer {
        /// Connection number.
        conn: usize,
        /// The event.
        event: Event,
        /// When the worker saw it.
        at: Instant,
    },
    /// A local ICE candidate to trickle to peer `link`.
    LocalCandidate {
        /// The peer.
        link: u64,
        /// The candidate line.
        candidate: String,
    },
    /// ICE selected a pair with peer `link` (again, when the selection changes).
    Route {
        /// The peer.
        link: u64,
        /// The pair.
        route: flux_ice::Selected,
        /// From the start of ICE with this peer to the first selection.
        after: Duration,
    },
    /// ICE with peer `link` failed (`failed to establish ICE connection: …`).
    IceFailed {
        /// The peer.
        link: u64,
        /// Why.
        error: String,
    },
    /// A connection's transfer ended.
    Ended {
        /// Connection number.
        conn: usize,
        /// The failure, if it failed.
        error: Option<String>,
        /// Statistics of the connection.
        stats: ConnReport,
    },
}

/// Statistics of one connection.
#[derive(Clone, Debug, Default)]
pub struct ConnReport {
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// Smoothed round-trip time at the end.
    pub rtt: Duration,
    /// UDP datagrams sent and lost (declared lost by QUIC).
    pub packets_sent: u64,
    /// Packets QUIC declared lost.
    pub packets_lost: u64,
    /// Path MTU (UDP payload) at the end.
    pub mtu: u16,
    /// Congestion events.
    pub congestion_events: u64,
    /// Payload bytes on the wire (UDP), sent and received.
    pub udp_tx_bytes: u64,
    /// UDP payload bytes received.
    pub udp_rx_bytes: u64,
    /// The ICE pair the connection ran on last, when ICE was used.
    pub route: Option<flux_ice::Selected>,
    /// From the start of ICE to the first selected pair.
    pub ice_connect: Option<Duration>,
    /// The caller's number of the ICE link the connection ran over.
    pub link: Option<u64>,
    /// That link's ICE counters (checks sent, candidates ignored, STUN refused…).
    pub ice_stats: Option<flux_ice::Stats>,
}

/// What a worker did, returned when it ends.
#[derive(Clone, Debug, Default)]
pub struct NetReport {
    /// Driver used.
    pub driver: Option<Driver>,
    /// Disk operations by kind.
    pub disk: DiskStats,
    /// Whether the socket sent GSO batches / received GRO batches.
    pub gso: bool,
    /// GRO state of the socket.
    pub gro: bool,
    /// Transfers that ended successfully and with a failure.
    pub succeeded: usize,
    /// Transfers that failed.
    pub failed: usize,
    /// The first failure, for a single transfer.
    pub error: Option<String>,
    /// Per-connection statistics, in connection order.
    pub conns: Vec<ConnReport>,
    /// Datagrams that were neither QUIC nor ICE/STUN/TURN (dropped).
    pub foreign_datagrams: u64,
    /// What the disk strategy chose, and why.
    pub disk_choice: DiskChoice,
    /// Receiver with [`NetConfig::durable`]: time spent syncing to stable storage.
    pub sync_time: Option<Duration>,
}

/// The channels a worker talks through.
#[derive(Debug)]
pub struct Control {
    /// Where events go (a disconnected receiver is ignored).
    pub events: Option<Tx<NetEvent>>,
    /// Where commands come from.
    pub commands: Option<Rx<Command>>,
}

impl Control {
    /// No channels: run silently to the end.
    pub fn none() -> Self {
        Self {
            events: None,
            commands: None,
        }
    }

    /// A control with fresh channels, and the caller's ends of them.
    pub fn channels() -> (Self, Rx<NetEvent>, Tx<Command>) {
        let (etx, erx) = crossbeam_channel::unbounded();
        let (ctx, crx) = crossbeam_channel::unbounded();
        (
            Self {
                events: Some(etx),
                commands: Some(crx),
            },
            erx,
            ctx,
        )
    }
}

/// Serves the share (`manifest`, read from `sources`) on `socket` to receivers that connect,
/// presenting `identity`. Returns when `cfg.serve` transfers have ended, or on
/// [`Command::Cancel`].
pub fn host(
    socket: UdpSocket,
    identity: &Identity,
    manifest: Arc<Manifest>,
    sources: Vec<Option<PathBuf>>,
    cfg: &NetConfig,
    control: Control,
) -> Result<NetReport, TransferError> {
    let server = match &cfg.allowed_joiners {
        Some(allowed) => flux_quic::server_config_mutual(identity, &cfg.transport, allowed.clone()),
        None => flux_quic::server_config(identity, &cfg.transport),
    }
    .map_err(|e| TransferError::Io(format!("QUIC configuration: {e}")))?;
    // A stream share is read from stdin (`thru host -`).
    let stream = match manifest.stream() {
        Some(_) => Some(
            crate::pipe::PipeSource::new(Box::new(std::io::stdin()))
                .map_err(|e| TransferError::Io(format!("stdin reader: {e}")))?,
        ),
        None => None,
    };
    let role = Role::Host {
        manifest,
        sources: SourceFiles::new(sources),
        stream,
    };
    Worker::new(socket, cfg, control, Some(server), role)?.run()
}

/// Connects to the host at `peer`, accepting only the certificate `pinned`, and receives into
/// the existing directory `dest`.
pub fn join(
    socket: UdpSocket,
    peer: SocketAddr,
    pinned: Fingerprint,
    dest: PathBuf,
    cfg: &NetConfig,
    control: Control,
) -> Result<NetReport, TransferError> {
    let (mut w, client) = Worker::joiner(socket, pinned, dest, cfg, control)?;
    w.connect(client, peer, None)?;
    w.run()
}

/// Like [`join`], but the host is reached through ICE: the worker gathers candidates (reported
/// as [`NetEvent::LocalCandidate`] with link 0), takes the host's through
/// [`Command::RemoteCandidate`], and connects QUIC over the selected pair.
pub fn join_ice(
    socket: UdpSocket,
    ice: IceSetup,
    pinned: Fingerprint,
    dest: PathBuf,
    cfg: &NetConfig,
    control: Control,
) -> Result<NetReport, TransferError> {
    let (mut w, client) = Worker::joiner(socket, pinned, dest, cfg, control)?;
    w.links.push(Link::new(0, ice, Instant::now()));
    w.pending_client = Some(client);
    w.run()
}

enum Role {
    Host {
        manifest: Arc<Manifest>,
        sources: SourceFiles,
        /// A stream share's reader (stdin).
        stream: Option<crate::pipe::PipeSource>,
    },
    Join {
        dest_root: PathBuf,
        dest: Option<Box<Destination>>,
        /// With [`NetConfig::pipe`]: stdout instead of `dest`.
        pipe: Option<crate::pipe::PipeSink>,
        offered: bool,
    },
}

enum Machine {
    Send(Session<Sender>),
    Recv(Session<Receiver>),
}

struct Conn {
    handle: ConnectionHandle,
    machine: Machine,
    peer: SocketAddr,
    connected: bool,
    /// When the connection attempt began (the handshake must finish within the timeout).
    created: Instant,
    ended: bool,
    error: Option<String>,
    /// A GSO batch the socket refused with EAGAIN, to send first when writable again.
    blocked: Option<(Vec<u8>, Option<usize>, SocketAddr)>,
    /// The ICE link the connection runs over (index into `Worker::links`).
    link: Option<usize>,
    /// Sender: when its transfer completed; it then waits for the receiver to close.
    done_at: Option<Instant>,
    /// Receiver: grows the connection's receive window with the measured bandwidth-delay
    /// product (flux_quic::WindowTuner has the reasons).
    tuner: Option<flux_quic::WindowTuner>,
}

impl Conn {
    fn new(
        handle: ConnectionHandle,
        machine: Machine,
        peer: SocketAddr,
        now: Instant,
        link: Option<usize>,
    ) -> Self {
        Self {
            handle,
            machine,
            peer,
            connected: false,
            created: now,
            ended: false,
            error: None,
            blocked: None,
            link,
            done_at: None,
            tuner: None,
        }
    }

    fn conn(&mut self) -> &mut flux_quic::quinn_proto::Connection {
        match &mut self.machine {
            Machine::Send(s) => &mut s.conn,
            Machine::Recv(s) => &mut s.conn,
        }
    }
}

struct Worker {
    socket: UdpSocket,
    cfg: NetConfig,
    control: Control,
    endpoint: Endpoint,
    conns: Vec<Conn>,
    role: Role,
    exec: DiskExec,
    report: NetReport,
    ended: usize,
    cancelled: bool,
    bufs: Vec<Vec<u8>>,
    tx_buf: Vec<u8>,
    resp_buf: Vec<u8>,
    poll_in: Option<Op<()>>,
    poll_out: Option<Op<()>>,
    /// ICE, one link per peer.
    links: Vec<Link>,
    /// Every remote address a link selected, to its link: QUIC from there belongs to it.
    link_addrs: HashMap<SocketAddr, usize>,
    /// Joiner over ICE: the QUIC client settings, until a pair is selected.
    pending_client: Option<ClientConfig>,
    /// The socket's own address (its port, and the address when not bound to a wildcard).
    local: SocketAddr,
    /// Scratch for TURN ChannelData batches.
    relay_buf: Vec<u8>,
}

/// GRO buffers read per `recvmmsg`.
const RECV_BUFS: usize = 16;
/// `recvmmsg` calls per loop turn before the loop turns to sending.
const RECV_ROUNDS: usize = 2;
/// GSO batches sent per connection per loop turn before the loop turns to receiving.
const SEND_ROUNDS: usize = 8;

impl Worker {
    fn new(
        socket: UdpSocket,
        cfg: &NetConfig,
        control: Control,
        server: Option<ServerConfig>,
        role: Role,
    ) -> Result<Self, TransferError> {
        let io = match cfg.driver {
            Driver::Uring => DiskIo::new(BackendKind::Uring)
                .map_err(|e| TransferError::Io(format!("io_uring driver: {e}")))?,
            Driver::Epoll => DiskIo::new(BackendKind::Std)
                .map_err(|e| TransferError::Io(format!("epoll driver: {e}")))?,
        };
        let mode = match cfg.driver {
            Driver::Uring => cfg.disk,
            Driver::Epoll => DiskMode::Buffered,
        };
        let mut exec = DiskExec::new(io, mode);
        exec.set_durable(cfg.durable);
        if cfg.driver == Driver::Uring {
            exec.set_work_threads(cfg.work_threads)
                .map_err(|e| TransferError::Io(format!("work threads: {e}")))?;
        }
        let caps = socket.capabilities();
        let local = socket
            .local_addr()
            .map_err(|e| TransferError::Io(format!("socket address: {e}")))?;
        let endpoint = Endpoint::new(
            Arc::new(flux_quic::endpoint_config()),
            server.map(Arc::new),
            true,
            None,
        );
        Ok(Self {
            socket,
            cfg: cfg.clone(),
            control,
            endpoint,
            conns: Vec::new(),
            role,
            exec,
            report: NetReport {
                driver: Some(cfg.driver),
                gso: caps.gso,
                gro: caps.gro,
                ..NetReport::default()
            },
            ended: 0,
            cancelled: false,
            bufs: (0..RECV_BUFS).map(|_| vec![0u8; GRO_BUF_LEN]).collect(),
            tx_buf: Vec::with_capacity(GRO_BUF_LEN),
            resp_buf: Vec::with_capacity(2048),
            poll_in: None,
            poll_out: None,
            links: Vec::new(),
            link_addrs: HashMap::new(),
            pending_client: None,
            local,
            relay_buf: Vec::with_capacity(GRO_BUF_LEN),
        })
    }

    /// A receiving worker and the QUIC client settings that pin the host.
    fn joiner(
        socket: UdpSocket,
        pinned: Fingerprint,
        dest: PathBuf,
        cfg: &NetConfig,
        control: Control,
    ) -> Result<(Self, ClientConfig), TransferError> {
        let client = match &cfg.client_identity {
            Some(id) => flux_quic::client_config_with_identity(pinned, id, &cfg.transport),
            None => flux_quic::client_config(pinned, &cfg.transport),
        }
        .map_err(|e| TransferError::Io(format!("QUIC configuration: {e}")))?;
        let role = Role::Join {
            dest_root: dest,
            dest: None,
            pipe: None,
            offered: false,
        };
        Ok((Self::new(socket, cfg, control, None, role)?, client))
    }

    /// Connects to `peer` (over ICE link `link` when given).
    fn connect(
        &mut self,
        client: ClientConfig,
        peer: SocketAddr,
        link: Option<usize>,
    ) -> Result<(), TransferError> {
        let (handle, conn) = self
            .endpoint
            .connect(Instant::now(), client, peer, flux_quic::SERVER_NAME)
            .map_err(|e| TransferError::Io(format!("connect to {peer}: {e}")))?;
        let mut rcfg = self.cfg.receiver.clone();
        if self.cfg.pipe {
            rcfg.features |= flux_wire::FEATURE_IN_ORDER;
        }
        let m = Receiver::new(rcfg);
        let machine = Machine::Recv(Session::new(
            conn,
            m,
            Side::Client,
            self.cfg.transport.send_window,
        ));
        let mut c = Conn::new(handle, machine, peer, Instant::now(), link);
        c.tuner = Some(flux_quic::WindowTuner::new(self.cfg.transport.conn_window));
        self.conns.push(c);
        Ok(())
    }

    fn run(mut self) -> Result<NetReport, TransferError> {
        loop {
            let now = Instant::now();
            self.commands(now);
            let mut busy = self.receive(now)?;
            busy |= self.ice(now)?;
            self.timers(now);
            busy |= self.drive(now);
            busy |= self.transmit(now)?;
            self.check_ended(now);
            if self.done() {
                break;
            }
            self.wait(busy)?;
        }
        // Let the final CONNECTION_CLOSE frames leave.
        let now = Instant::now();
        let _ = self.transmit(now);
        self.report.disk = self.exec.stats();
        self.report.disk_choice = self.exec.choice().clone();
        if let Some(why) = self.report.disk_choice.describe() {
            tracing::info!("disk: {why}");
        }
        if let Role::Join { dest: Some(d), .. } = &self.role
            && self.cfg.durable
        {
            self.report.sync_time = Some(d.sync_time());
        }
        let links = &self.links;
        self.report.conns = self
            .conns
            .iter_mut()
            .map(|c| conn_report(c, links))
            .collect();
        if self.report.error.is_none() {
            self.report.error = self.conns.iter().find_map(|c| c.error.clone());
        }
        Ok(self.report)
    }

    fn done(&self) -> bool {
        if self.cancelled {
            return self.conns.iter().all(|c| c.ended);
        }
        match &self.role {
            Role::Join { .. } => {
                self.pending_client.is_none() && self.conns.iter().all(|c| c.ended)
            }
            Role::Host { .. } => self
                .cfg
                .serve
                .is_some_and(|n| self.ended >= n && self.conns.iter().all(|c| c.ended)),
        }
    }

    fn emit(&self, ev: NetEvent) {
        if let Some(tx) = &self.control.events {
            let _ = tx.send(ev);
        }
    }

    fn commands(&mut self, now: Instant) {
        let Some(rx) = self.control.commands.clone() else {
            return;
        };
        loop {
            match rx.try_recv() {
                Ok(Command::CancelWith(reason)) => {
                    if !self.cancelled {
                        self.cancel_with(Some(&reason));
                    }
                }
                Ok(Command::Cancel) | Err(TryRecvError::Disconnected) => {
                    if !self.cancelled {
                        self.cancel();
                    }
                    if matches!(rx.try_recv(), Err(TryRecvError::Disconnected)) {
                        self.control.commands = None;
                        return;
                    }
                }
                Ok(Command::Accept) => self.accept(now, Resolutions::default(), None),
                Ok(Command::AcceptResolved(r)) => self.accept(now, r, None),
                Ok(Command::AcceptChosen { resolved, chosen }) => {
                    self.accept(now, resolved, Some(&chosen));
                }
                Ok(Command::Pause(paused)) => {
                    for c in &mut self.conns {
                        if let Machine::Recv(s) = &mut c.machine
                            && !s.machine.set_paused(now, paused)
                        {
                            tracing::info!("this transfer cannot be paused now");
                        }
                    }
                }
                Ok(Command::AddPeer { link, ice }) => {
                    if self.cancelled || self.links.iter().any(|l| l.id == link) {
                        continue;
                    }
                    tracing::debug!(link, "ICE with a new peer");
                    self.links.push(Link::new(link, *ice, now));
                }
                Ok(Command::RemoteCandidate { link, candidate }) => {
                    if let Some(l) = self.links.iter_mut().find(|l| l.id == link && l.live()) {
                        l.remote_candidate(&candidate, now);
                    }
                }
                Ok(Command::Leave) => {
                    for c in &mut self.conns {
                        if let Machine::Recv(s) = &mut c.machine {
                            s.machine.browse_done();
                        }
                    }
                }
                Ok(Command::Reject(reason)) => {
                    for c in &mut self.conns {
                        if let Machine::Recv(s) = &mut c.machine {
                            s.machine.reject(&reason);
                        }
                    }
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    fn cancel(&mut self) {
        self.cancel_with(None);
    }

    fn cancel_with(&mut self, reason: Option<&str>) {
        self.cancelled = true;
        if self.pending_client.take().is_some() {
            self.report.error.get_or_insert_with(|| "cancelled".into());
        }
        for c in &mut self.conns {
            // A transfer that completed (a sender waiting for the receiver to close) stays a
            // success; it just stops waiting (cancelling a machine that is over does nothing).
            let over = match &mut c.machine {
                Machine::Send(s) => s.machine.is_over(),
                Machine::Recv(s) => s.machine.is_over(),
            };
            if !over {
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
                    c.error.get_or_insert_with(|| "cancelled".into());
                }
            }
        }
        if self.conns.is_empty() {
            self.report.error.get_or_insert_with(|| "cancelled".into());
        }
    }

    fn accept(
        &mut self,
        now: Instant,
        resolved: Resolutions,
        chosen: Option<&std::collections::BTreeSet<u32>>,
    ) {
        let Role::Join { dest, pipe, .. } = &mut self.role else {
            return;
        };
        if pipe.is_some() {
            // A pipe holds nothing to resume or skip.
            for c in &mut self.conns {
                if let Machine::Recv(s) = &mut c.machine {
                    s.machine.accept_chosen(now, HashMap::new(), chosen);
                }
            }
            return;
        }
        let Some(d) = dest.as_mut() else { return };
        let answered: Vec<u32> = resolved.answered().collect();
        d.set_resolutions(resolved);
        let mut local = match d.scan() {
            Ok(l) => l,
            Err(e) => {
                self.report.error = Some(e.to_string());
                return self.cancel();
            }
        };
        // An answered clash is no clash for the machine: the entry is fetched whole, then
        // dropped, put under its new name or in place of what is here (Destination).
        for i in answered {
            local.remove(&i);
        }
        for c in &mut self.conns {
            if let Machine::Recv(s) = &mut c.machine {
                s.machine.accept_chosen(now, local.clone(), chosen);
            }
        }
    }

    /// Reads every datagram waiting on the socket into the endpoint.
    fn receive(&mut self, now: Instant) -> Result<bool, TransferError> {
        let mut got_any = false;
        let mut meta = [RecvMeta {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            stride: 0,
            ecn: None,
            dst_ip: None,
        }; RECV_BUFS];
        for _ in 0..RECV_ROUNDS {
            let n = {
                // On the stack: no allocation per receive round.
                let mut bufs = self.bufs.iter_mut();
                let mut slices: [IoSliceMut<'_>; RECV_BUFS] = std::array::from_fn(|_| {
                    IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
                });
                match self.socket.recv_batch(&mut slices, &mut meta) {
                    Ok(n) => n,
                    Err(e) if e.is_would_block() => break,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        // An ICMP error for an earlier datagram; QUIC's timers handle it.
                        continue;
                    }
                    Err(e) => return Err(TransferError::Io(format!("receive: {e}"))),
                }
            };
            if n == 0 {
                break;
            }
            got_any = true;
            for (i, m) in meta.iter().enumerate().take(n) {
                self.datagrams(now, i, *m);
            }
            if n < RECV_BUFS {
                break;
            }
        }
        Ok(got_any)
    }

    fn datagrams(&mut self, now: Instant, buf: usize, m: RecvMeta) {
        let len = m.len.min(self.bufs[buf].len());
        let mut data = BytesMut::from(&self.bufs[buf][..len]);
        let stride = m.stride.max(1);
        let ecn = m
            .ecn
            .and_then(|e| flux_quic::quinn_proto::EcnCodepoint::from_bits(e as u8));
        let local = SocketAddr::new(m.dst_ip.unwrap_or(self.local.ip()), self.local.port());
        while !data.is_empty() {
            let seg = data.split_to(stride.min(data.len()));
            // RFC 9443: QUIC packets have the fixed bit (0x40) set; STUN starts 0..=3, TURN
            // ChannelData 64..=79 (only from a TURN server). Demultiplex per segment
            // (platform facts: GRO may append a STUN datagram to a QUIC batch).
            let mut from = m.addr;
            let seg = if self.links.is_empty() {
                if seg[0] & 0x40 == 0 {
                    self.report.foreign_datagrams += 1;
                    continue;
                }
                seg
            } else {
                match self.demux_ice(now, from, local, seg) {
                    Some((addr, seg)) => {
                        from = addr;
                        seg
                    }
                    None => continue,
                }
            };
            self.feed_quic(now, from, m.dst_ip, ecn, seg);
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
        dst_ip: Option<std::net::IpAddr>,
        ecn: Option<flux_quic::quinn_proto::EcnCodepoint>,
        seg: BytesMut,
    ) {
        {
            self.resp_buf.clear();
            let ev = self
                .endpoint
                .handle(now, from, dst_ip, ecn, seg, &mut self.resp_buf);
            match ev {
                Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                    if let Some(c) = self.conns.iter_mut().find(|c| c.handle == h) {
                        c.conn().handle_event(ev);
                    }
                }
                Some(DatagramEvent::NewConnection(inc)) => self.incoming(now, inc),
                Some(DatagramEvent::Response(t)) => self.respond(&t),
                None => {}
            }
        }
    }

    fn incoming(&mut self, now: Instant, inc: flux_quic::quinn_proto::Incoming) {
        let Role::Host { manifest, .. } = &self.role else {
            self.resp_buf.clear();
            let t = self.endpoint.refuse(inc, &mut self.resp_buf);
            self.respond(&t);
            return;
        };
        let live = self.conns.iter().filter(|c| !c.ended).count();
        let serving_done = self.cfg.serve.is_some_and(|n| self.ended + live >= n);
        if self.cancelled || live >= self.cfg.max_receivers || serving_done {
            self.resp_buf.clear();
            let t = self.endpoint.refuse(inc, &mut self.resp_buf);
            self.respond(&t);
            return;
        }
        let peer = inc.remote_address();
        self.resp_buf.clear();
        match self.endpoint.accept(inc, now, &mut self.resp_buf, None) {
            Ok((handle, conn)) => {
                let link = self
                    .links
                    .iter()
                    .position(|l| l.live() && l.quic_addr == Some(peer));
                let m = Sender::new(manifest.clone(), self.cfg.sender.clone());
                let machine = Machine::Send(Session::new(
                    conn,
                    m,
                    Side::Server,
                    self.cfg.transport.send_window,
                ));
                self.conns.push(Conn::new(handle, machine, peer, now, link));
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e.cause, "refused a connection");
                if let Some(t) = e.response {
                    self.respond(&t);
                }
            }
        }
    }

    /// Sends an endpoint's stateless response (a refusal, a version negotiation, a reset),
    /// best effort: a lost one is like a lost datagram.
    fn respond(&self, t: &flux_quic::quinn_proto::Transmit) {
        let t = flux_udp::Transmit {
            destination: t.destination,
            contents: &self.resp_buf[..t.size.min(self.resp_buf.len())],
            segment_size: t.segment_size,
            ecn: None,
            src_ip: t.src_ip,
        };
        let _ = self.socket.send(&t);
    }

    /// Drives the ICE links: timers, TURN streams, candidates out, selections and failures.
    /// Returns whether anything happened.
    fn ice(&mut self, now: Instant) -> Result<bool, TransferError> {
        if self.links.is_empty() {
            return Ok(false);
        }
        let mut any = false;
        let mut notes = Vec::new();
        for i in 0..self.links.len() {
            let socket = &self.socket;
            let mut send = |data: &[u8], to: SocketAddr| {
                // Best effort, like any datagram: ICE retransmits.
                let _ = socket.send(&flux_udp::Transmit {
                    destination: to,
                    contents: data,
                    segment_size: None,
                    ecn: None,
                    src_ip: None,
                });
            };
            self.links[i].pump(now, &mut send, &mut notes);
            for note in notes.drain(..) {
                any = true;
                let id = self.links[i].id;
                match note {
                    LinkNote::Candidate(candidate) => {
                        self.emit(NetEvent::LocalCandidate {
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
                        self.emit(NetEvent::Route {
                            link: id,
                            route,
                            after,
                        });
                        if let Some(client) = self.pending_client.take() {
                            let peer = self.links[i].quic_addr.unwrap_or(route.remote);
                            self.connect(client, peer, Some(i))?;
                        }
                    }
                    LinkNote::Failed(why) => {
                        let error = format!("failed to establish ICE connection: {why}");
                        tracing::warn!(link = id, "{error}");
                        if self.pending_client.take().is_some() {
                            self.report.error.get_or_insert_with(|| error.clone());
                        }
                        for c in self.conns.iter_mut().filter(|c| c.link == Some(i)) {
                            c.error.get_or_insert_with(|| error.clone());
                        }
                        self.emit(NetEvent::IceFailed { link: id, error });
                    }
                    LinkNote::App(d) => {
                        if let Some(addr) = self.links[i].quic_addr {
                            self.feed_quic(now, addr, None, None, BytesMut::from(&d.data[..]));
                        }
                    }
                }
            }
        }
        Ok(any)
    }

    fn timers(&mut self, now: Instant) {
        for c in &mut self.conns {
            if c.ended {
                continue;
            }
            if c.conn().poll_timeout().is_some_and(|t| t <= now) {
                c.conn().handle_timeout(now);
            }
            match &mut c.machine {
                Machine::Send(s) => s.machine.handle_timeout(now),
                Machine::Recv(s) => s.machine.handle_timeout(now),
            }
            if c.connected
                && let Some(t) = c.tuner.as_mut()
                && t.next_sample().is_none_or(|at| now >= at)
            {
                let (received, rtt) = match &mut c.machine {
                    Machine::Send(s) => (s.conn.stats().udp_rx.bytes, s.conn.rtt()),
                    Machine::Recv(s) => (s.conn.stats().udp_rx.bytes, s.conn.rtt()),
                };
                if let Some(w) = t.sample(now, received, rtt) {
                    tracing::debug!(window = w, ?rtt, "receive window grown");
                    c.conn().set_receive_window(
                        flux_quic::quinn_proto::VarInt::from_u64(w)
                            .unwrap_or(flux_quic::quinn_proto::VarInt::MAX),
                    );
                }
            }
        }
    }

    /// Moves everything between connections, machines and the disk until nothing moves.
    fn drive(&mut self, now: Instant) -> bool {
        let mut any = false;
        // Blocking disk work (a durable finalize syncs each file) must not keep the loop
        // from the network: QUIC's ACKs and keep-alives go out between turns, and a peer
        // that hears nothing for the idle timeout gives the connection up.
        let until = Instant::now() + DRIVE_BUDGET;
        if let Some(r) = self.exec.ring() {
            // Submit queued disk SQEs and collect whatever completed, without waiting.
            let _ = r.submit_and_wait(0, Some(Duration::ZERO));
        }
        for i in 0..self.conns.len() {
            if self.conns[i].ended {
                continue;
            }
            loop {
                let mut progressed = false;
                progressed |= self.step(i, now, until);
                let (dst, pipe, source) = match &mut self.role {
                    Role::Join { dest, pipe, .. } => (dest.as_deref_mut(), pipe.as_mut(), None),
                    Role::Host { stream, .. } => (None, None, stream.as_mut()),
                };
                self.exec.reap(dst);
                let mut piped = Vec::new();
                if let Some(p) = pipe {
                    p.reap();
                    while let Some(d) = p.poll_done() {
                        piped.push(d);
                    }
                }
                if let Some(p) = source {
                    p.reap();
                    while let Some(d) = p.poll_done() {
                        piped.push(d);
                    }
                }
                for (tag, id, res) in piped {
                    progressed = true;
                    match self.conns.get_mut(tag).map(|c| &mut c.machine) {
                        Some(Machine::Recv(s)) => s.machine.handle_disk_done(now, id, res),
                        Some(Machine::Send(s)) => s.machine.handle_disk_done(now, id, res),
                        None => {}
                    }
                }
                while let Some((tag, id, res)) = self.exec.poll_done() {
                    progressed = true;
                    if let Some(c) = self.conns.get_mut(tag) {
                        match &mut c.machine {
                            Machine::Send(s) => s.machine.handle_disk_done(now, id, res),
                            Machine::Recv(s) => s.machine.handle_disk_done(now, id, res),
                        }
                    }
                }
                if !progressed {
                    break;
                }
                any = true;
                if Instant::now() >= until {
                    break;
                }
            }
            let c = &mut self.conns[i];
            let handle = c.handle;
            while let Some(ev) = c.conn().poll_endpoint_events() {
                if let Some(ce) = self.endpoint.handle_event(handle, ev) {
                    c.conn().handle_event(ce);
                }
            }
        }
        // Stopped by the budget: more may be waiting, so the loop must not sleep.
        any || Instant::now() >= until
    }

    /// One pass over connection `i`: drive the session, submit its disk requests, and route
    /// its events. Returns whether anything happened.
    fn step(&mut self, i: usize, now: Instant, until: Instant) -> bool {
        let mut progressed = false;
        let c = &mut self.conns[i];
        if !c.connected && !c.conn().is_handshaking() && !c.conn().is_closed() {
            c.connected = true;
            let peer = c.peer;
            let fingerprint = flux_quic::peer_fingerprint(c.conn());
            if let Some(tx) = &self.control.events {
                let _ = tx.send(NetEvent::Connected {
                    conn: i,
                    peer,
                    fingerprint,
                    at: now,
                });
            }
        }
        let mut events = Vec::new();
        match (&mut c.machine, &mut self.role) {
            (
                Machine::Send(s),
                Role::Host {
                    sources,
                    stream,
                    manifest,
                },
            ) => {
                s.drive(now);
                while let Some(op) = s.machine.poll_disk() {
                    progressed = true;
                    match stream.as_mut() {
                        Some(p) if matches!(op, flux_transfer::DiskOp::Read { file, .. } if manifest.stream() == Some(file)) =>
                        {
                            p.submit(i, op);
                        }
                        _ => self.exec.submit_read(i, sources, op),
                    }
                }
                while let Some(ev) = s.machine.poll_event() {
                    events.push(ev);
                }
            }
            (Machine::Recv(s), Role::Join { dest, pipe, .. }) => {
                s.drive(now);
                while Instant::now() < until
                    && let Some(op) = s.machine.poll_disk()
                {
                    progressed = true;
                    if let Some(p) = pipe.as_mut() {
                        p.submit(i, op);
                        continue;
                    }
                    match dest.as_mut() {
                        Some(d) => self.exec.submit_write(i, d, op),
                        None => s.machine.handle_disk_done(
                            now,
                            op_id(&op),
                            Err(flux_transfer::DiskFailure::Io("no destination".into())),
                        ),
                    }
                }
                while let Some(ev) = s.machine.poll_event() {
                    events.push(ev);
                }
            }
            _ => {}
        }
        for ev in events {
            progressed = true;
            self.on_event(i, now, ev);
        }
        progressed
    }

    fn on_event(&mut self, i: usize, now: Instant, ev: Event) {
        if let Event::Failed(e) = &ev {
            self.conns[i].error.get_or_insert_with(|| e.to_string());
        }
        if let (
            Event::ManifestReady,
            Role::Join {
                dest_root,
                dest,
                pipe,
                offered,
            },
        ) = (&ev, &mut self.role)
        {
            let Machine::Recv(s) = &mut self.conns[i].machine else {
                return;
            };
            let Some(m) = s.machine.manifest().cloned() else {
                return;
            };
            if self.cfg.browse {
                // Nothing at the destination is looked at: the offer is only shown.
                if let Some(tx) = &self.control.events {
                    let _ = tx.send(NetEvent::Offer {
                        manifest: m,
                        local: Arc::default(),
                        text: s.machine.text().map(Arc::from),
                    });
                }
                s.machine.browse_done();
                return;
            }
            if self.cfg.pipe {
                let single = m.len() == 1 && m.file_count() == 1;
                let sink = if single || s.machine.text().is_some() {
                    crate::pipe::PipeSink::new(Box::new(std::io::stdout()))
                        .map_err(|e| format!("stdout writer: {e}"))
                } else {
                    Err(format!(
                        "the host offers {} entries ({} files); --out - writes a single file \
                         to stdout: receive into a directory instead",
                        m.len(),
                        m.file_count()
                    ))
                };
                match sink {
                    Ok(p) => *pipe = Some(p),
                    Err(e) => {
                        s.machine.reject(&e);
                        self.conns[i].error = Some(e);
                        self.emit(NetEvent::Transfer {
                            conn: i,
                            event: ev,
                            at: now,
                        });
                        return;
                    }
                }
                if self.cfg.auto_accept {
                    s.machine.accept(now, HashMap::new());
                } else if !*offered {
                    *offered = true;
                    if let Some(tx) = &self.control.events {
                        let _ = tx.send(NetEvent::Offer {
                            manifest: m,
                            local: Arc::new(HashMap::new()),
                            text: s.machine.text().map(Arc::from),
                        });
                    }
                }
                self.emit(NetEvent::Transfer {
                    conn: i,
                    event: ev,
                    at: now,
                });
                return;
            }
            let mut d = Destination::with_modes(dest_root.clone(), m.clone(), self.cfg.modes);
            d.set_durable(self.cfg.durable);
            let scanned = d.scan();
            *dest = Some(Box::new(d));
            match scanned {
                Ok(local) => {
                    if self.cfg.auto_accept {
                        s.machine.accept(now, local);
                    } else if !*offered {
                        *offered = true;
                        if let Some(tx) = &self.control.events {
                            let _ = tx.send(NetEvent::Offer {
                                manifest: m,
                                local: Arc::new(local),
                                text: s.machine.text().map(Arc::from),
                            });
                        }
                    }
                }
                Err(e) => {
                    s.machine.cancel();
                    self.conns[i].error = Some(e.to_string());
                }
            }
        }
        self.emit(NetEvent::Transfer {
            conn: i,
            event: ev,
            at: now,
        });
    }

    /// Sends what the connections have to send, in GSO batches.
    fn transmit(&mut self, now: Instant) -> Result<bool, TransferError> {
        let mut sent_any = false;
        let max_segments = self.socket.capabilities().max_gso_segments(1452).max(1);
        for i in 0..self.conns.len() {
            if let Some((buf, seg, dst)) = self.conns[i].blocked.take() {
                match self.send_conn(i, &buf, seg, dst) {
                    Ok(true) => sent_any = true,
                    Ok(false) => {
                        self.conns[i].blocked = Some((buf, seg, dst));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            for _ in 0..SEND_ROUNDS {
                self.tx_buf.clear();
                let c = &mut self.conns[i];
                let Some(t) = c.conn().poll_transmit(now, max_segments, &mut self.tx_buf) else {
                    break;
                };
                let buf = std::mem::take(&mut self.tx_buf);
                let ok = self.send_conn(i, &buf[..t.size], t.segment_size, t.destination)?;
                if ok {
                    sent_any = true;
                    self.tx_buf = buf;
                } else {
                    let mut b = buf;
                    b.truncate(t.size);
                    self.conns[i].blocked = Some((b, t.segment_size, t.destination));
                    self.tx_buf = Vec::with_capacity(GRO_BUF_LEN);
                    break;
                }
            }
        }
        Ok(sent_any)
    }

    /// Sends one batch of connection `i`, through its ICE link when it has one; `Ok(false)`
    /// when the socket buffer is full (the caller keeps the batch for later).
    fn send_conn(
        &mut self,
        i: usize,
        buf: &[u8],
        segment_size: Option<usize>,
        dst: SocketAddr,
    ) -> Result<bool, TransferError> {
        let Some(l) = self.conns[i].link else {
            return self.send(buf, segment_size, dst);
        };
        let now = Instant::now();
        let link = &mut self.links[l];
        if let Some(rc) = link.agent.relay_channel() {
            // Relayed over UDP with a bound channel: a 4-byte ChannelData header in front of
            // each segment, still one GSO batch (UDP needs no padding).
            let seg = segment_size.unwrap_or(buf.len()).max(1);
            self.relay_buf.clear();
            for p in buf.chunks(seg) {
                let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
                self.relay_buf
                    .extend_from_slice(&flux_ice::channel_header(rc.channel, len));
                self.relay_buf.extend_from_slice(p);
            }
            // The headers make the batch bigger than the one QUIC filled: send it in groups
            // that stay within a GSO batch's limit (one UDP payload), or it fails whole.
            let framed = std::mem::take(&mut self.relay_buf);
            let fseg = seg + 4;
            let group = flux_udp::max_gso_segments(fseg) * fseg;
            let mut r = Ok(true);
            for (k, batch) in framed.chunks(group).enumerate() {
                let gso = segment_size.map(|_| fseg).filter(|_| batch.len() > fseg);
                match self.send(batch, gso, rc.to) {
                    // Nothing sent yet: the caller keeps the whole batch for later.
                    Ok(false) if k == 0 => {
                        r = Ok(false);
                        break;
                    }
                    // Part sent: the rest is lost like any dropped datagram; QUIC repairs it.
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            self.relay_buf = framed;
            return r;
        }
        let seg = segment_size.unwrap_or(buf.len()).max(1);
        let mut wrapped = std::mem::take(&mut link.wrapped);
        for (n, p) in buf.chunks(seg).enumerate() {
            let via = self.links[l].agent.wrap(now, p, &mut wrapped);
            match via {
                Ok(flux_ice::SendVia::Direct { to, .. }) if n == 0 => {
                    // The whole batch goes one way: keep GSO.
                    self.links[l].wrapped = wrapped;
                    return self.send(buf, segment_size, to);
                }
                Ok(flux_ice::SendVia::Direct { to, .. }) => {
                    let _ = self.send(p, None, to)?;
                }
                Ok(flux_ice::SendVia::TurnUdp { to, .. }) => {
                    // Before the channel is bound: Send indications, one per packet. A full
                    // socket buffer drops the packet, which QUIC recovers like a loss.
                    let _ = self.send(&wrapped, None, to)?;
                }
                Ok(flux_ice::SendVia::TurnStream(id)) => {
                    self.links[l].write_stream(id, &wrapped);
                }
                // Not selected yet or relay not ready: dropped like a lost packet.
                Err(_) => {}
            }
        }
        self.links[l].wrapped = wrapped;
        Ok(true)
    }

    /// Sends one batch; `Ok(false)` when the socket buffer is full.
    fn send(
        &mut self,
        buf: &[u8],
        segment_size: Option<usize>,
        dst: SocketAddr,
    ) -> Result<bool, TransferError> {
        let t = flux_udp::Transmit {
            destination: dst,
            contents: buf,
            segment_size,
            ecn: None,
            src_ip: None,
        };
        match self.socket.send(&t) {
            Ok(_) => Ok(true),
            Err(e) if e.is_would_block() => Ok(false),
            // The peer's port is gone (ICMP); the connection's timers will notice.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                tracing::debug!(size = buf.len(), "datagram too large for the path; dropped");
                Ok(true)
            }
            Err(e) => Err(TransferError::Io(format!("send to {dst}: {e}"))),
        }
    }

    fn check_ended(&mut self, now: Instant) {
        let mut newly = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.ended {
                continue;
            }
            let (over, closed) = match &c.machine {
                Machine::Send(s) => (s.machine.is_over(), s.close_reason().is_some()),
                Machine::Recv(s) => (s.machine.is_over(), s.close_reason().is_some()),
            };
            let flushed = match &mut c.machine {
                Machine::Send(s) => s.machine.outbox().ready().is_empty(),
                Machine::Recv(s) => s.machine.outbox().ready().is_empty(),
            };
            let connect_expired =
                !c.connected && now.duration_since(c.created) > self.cfg.connect_timeout;
            if connect_expired && !over {
                c.error
                    .get_or_insert_with(|| format!("could not connect to {} (timed out)", c.peer));
            }
            // A sender that completed lets the receiver close: closing first would discard its
            // final Close message if a packet carrying it was lost (the receiver would see
            // the connection die before the transfer's end). It closes itself only after
            // SENDER_LINGER.
            let sender = matches!(c.machine, Machine::Send(_));
            if sender && over && flushed && !closed && c.error.is_none() && !self.cancelled {
                let t = *c.done_at.get_or_insert(now);
                if now.duration_since(t) < SENDER_LINGER {
                    continue;
                }
            }
            if (over && flushed) || closed || connect_expired {
                if !closed {
                    c.conn().close(now, 0u32.into(), bytes::Bytes::new());
                }
                if closed && !over {
                    let reason = match &c.machine {
                        Machine::Send(s) => s.close_reason().map(ToString::to_string),
                        Machine::Recv(s) => s.close_reason().map(ToString::to_string),
                    };
                    let idle = self.cfg.transport.idle_timeout.as_secs_f64();
                    c.error.get_or_insert_with(|| match reason.as_deref() {
                        // Keep-alives go out every second: silence this long means the peer
                        // is gone (killed, suspended, or the path went down).
                        Some("timed out") => format!(
                            "connection lost: the peer went away (nothing heard from it for \
                             {idle:.0} s)"
                        ),
                        r => format!("connection lost: {}", r.unwrap_or_default()),
                    });
                }
                c.ended = true;
                newly.push(i);
            }
        }
        for i in newly {
            let is_host = matches!(self.role, Role::Host { .. });
            if is_host && !self.conns[i].connected {
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
            let stats = conn_report(&mut self.conns[i], &self.links);
            self.emit(NetEvent::Ended {
                conn: i,
                error,
                stats,
            });
        }
    }

    /// Sleeps until the socket is readable (or writable when a batch is blocked), a disk
    /// request completes, or the next deadline — unless the last turn did work, in which case
    /// it only checks for commands.
    fn wait(&mut self, busy: bool) -> Result<(), TransferError> {
        if busy {
            return Ok(());
        }
        let now = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                deadline = Some(deadline.map_or(t, |d: Instant| d.min(t)));
            }
        };
        for c in &mut self.conns {
            if c.ended {
                continue;
            }
            consider(c.conn().poll_timeout());
            match &mut c.machine {
                Machine::Send(s) => consider(s.machine.poll_timeout()),
                Machine::Recv(s) => consider(s.machine.poll_timeout()),
            }
        }
        for c in self.conns.iter().filter(|c| !c.connected && !c.ended) {
            consider(Some(c.created + self.cfg.connect_timeout));
        }
        for c in self.conns.iter().filter(|c| !c.ended) {
            consider(c.done_at.map(|t| t + SENDER_LINGER));
        }
        for l in self.links.iter().filter(|l| l.live()) {
            consider(l.agent.poll_timeout());
        }
        // Commands arrive through a channel the loop cannot sleep on: look at least this often
        // (more often while ICE waits for trickled candidates, and while TURN stream threads
        // may have bytes for us).
        let mut timeout = deadline.map_or(COMMAND_POLL, |d| d.saturating_duration_since(now));
        if self.control.commands.is_some() {
            timeout = timeout.min(COMMAND_POLL);
            if self
                .links
                .iter()
                .any(|l| l.live() && l.selected_after.is_none())
            {
                timeout = timeout.min(ICE_POLL);
            }
        }
        if self.links.iter().any(Link::has_streams) {
            timeout = timeout.min(STREAM_POLL);
        }
        let piping = match &self.role {
            Role::Join { pipe: Some(p), .. } => p.working(),
            Role::Host {
                stream: Some(p), ..
            } => p.working(),
            _ => 0,
        };
        if self.exec.working() > 0 || piping > 0 {
            // Work threads (and the pipe's writer) finish without waking the loop: look again
            // soon.
            timeout = timeout.min(WORK_POLL);
        }
        let want_write = self.conns.iter().any(|c| c.blocked.is_some());
        let fd = self.socket.as_raw_fd();
        match self.exec.ring() {
            None => {
                self.socket
                    .wait(want_write, Some(timeout))
                    .map_err(|e| TransferError::Io(format!("poll: {e}")))?;
            }
            Some(ring) => {
                if self.poll_in.as_ref().is_none_or(Op::is_complete) {
                    self.poll_in = Some(
                        ring.poll_add(fd, libc::POLLIN as u32)
                            .map_err(|e| TransferError::Io(format!("io_uring poll: {e}")))?,
                    );
                }
                if want_write && self.poll_out.as_ref().is_none_or(Op::is_complete) {
                    self.poll_out = Some(
                        ring.poll_add(fd, libc::POLLOUT as u32)
                            .map_err(|e| TransferError::Io(format!("io_uring poll: {e}")))?,
                    );
                }
                ring.submit_and_wait(1, Some(timeout))
                    .map_err(|e| TransferError::Io(format!("io_uring wait: {e}")))?;
            }
        }
        Ok(())
    }
}

/// Most time one turn of the loop spends moving data between machines and the disk before it
/// turns to the network again.
const DRIVE_BUDGET: Duration = Duration::from_millis(20);

/// How long a sender that completed waits for the receiver to close the connection.
const SENDER_LINGER: Duration = Duration::from_secs(3);

/// Longest sleep before the loop looks at its command channel.
const COMMAND_POLL: Duration = Duration::from_millis(50);
/// The same while ICE is still looking for a pair (trickled candidates come as commands).
const ICE_POLL: Duration = Duration::from_millis(5);
/// Longest sleep while the work threads hash (a 4 MiB chunk takes about a millisecond).
const WORK_POLL: Duration = Duration::from_micros(200);
/// Longest sleep while TURN stream threads may have bytes for the loop.
const STREAM_POLL: Duration = Duration::from_millis(1);

fn conn_report(c: &mut Conn, links: &[Link]) -> ConnReport {
    let peer = c.peer;
    let link = c.link.and_then(|l| links.get(l));
    let s = c.conn().stats();
    let rtt = c.conn().rtt();
    ConnReport {
        peer: Some(peer),
        rtt,
        packets_sent: s.path.sent_packets,
        packets_lost: s.path.lost_packets,
        mtu: s.path.current_mtu,
        congestion_events: s.path.congestion_events,
        udp_tx_bytes: s.udp_tx.bytes,
        udp_rx_bytes: s.udp_rx.bytes,
        route: link.and_then(|l| l.agent.selected()),
        ice_connect: link.and_then(|l| l.selected_after),
        link: link.map(|l| l.id),
        ice_stats: link.map(|l| l.agent.stats()),
    }
}

fn op_id(op: &flux_transfer::DiskOp) -> flux_transfer::OpId {
    use flux_transfer::DiskOp;
    match op {
        DiskOp::Read { id, .. }
        | DiskOp::WriteChunk { id, .. }
        | DiskOp::Finalize { id, .. }
        | DiskOp::Finish { id } => *id,
        _ => flux_transfer::OpId(u64::MAX),
    }
}
