//! The engine's worker: one thread owns a UDP socket and drives one [`Node`] (the sans-IO
//! peer core: QUIC endpoint and connections, transfer machines, ICE links, end policy) with it,
//! carrying out the node's disk requests, without an async runtime. This module moves bytes,
//! completions and time; every decision is the node's.
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
//! The QUIC stack is [`NetConfig::quic`]: the worker is generic over flux-quic's endpoint seam
//! and builds quinn-proto's or s2n-quic's endpoint on the same socket, so both get the same
//! loop, batches, ICE demultiplexing and TURN framing (engine/README.md, "The QUIC seam").
//!
//! Control crosses threads only through channels: the loop reports [`NetEvent`]s and takes
//! [`Command`]s (accept an offer, cancel) without any lock on the data path.
//!
//! NAT traversal: with ICE ([`join_ice`], [`Command::AddPeer`]) the same socket carries one
//! `flux_ice` agent per peer ([`crate::ice`]), inside the node: it demultiplexes each GRO
//! segment by its first byte (RFC 9443) and frames QUIC for TURN; the worker only runs the TCP
//! or TLS streams to TURN servers that a network without UDP needs.
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
use flux_quic::conn::QuicEndpoint;
use flux_quic::quinn::QuinnEndpoint;
use flux_quic::{AllowList, Fingerprint, Identity, TransportParams};
use flux_transfer::{Event, LocalFile, Manifest, ReceiverConfig, SenderConfig, TransferError};
use flux_udp::{GRO_BUF_LEN, RecvMeta, UdpSocket};

use crate::disk::{Destination, ModePolicy, Resolutions, SourceFiles};
pub use crate::error::NetError;
use crate::exec::{DiskChoice, DiskExec, DiskMode, DiskStats};
use crate::ice::{IceSetup, TurnReport, TurnStreams};
use crate::node::{Node, TurnOp};
pub use crate::stack::QuicStack;

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
    /// The QUIC stack (both ends must run the same one; pairing agrees on it).
    pub quic: QuicStack,
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
            quic: QuicStack::Quinn,
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
        error: Option<NetError>,
        /// Statistics of the connection (boxed: the event is rare and they are large).
        stats: Box<ConnReport>,
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
    pub error: Option<NetError>,
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
    let allowed = cfg.allowed_joiners.clone();
    match cfg.quic {
        QuicStack::Quinn => {
            let endpoint = QuinnEndpoint::server(identity, &cfg.transport, allowed, None)
                .map_err(|e| TransferError::Io(format!("QUIC configuration: {e}")))?;
            Worker::new(socket, cfg, control, endpoint, role)?.run()
        }
        QuicStack::S2n => {
            let (local, segments) = socket_shape(&socket)?;
            let endpoint = crate::stack::s2n_server(
                local,
                identity,
                allowed,
                &cfg.transport,
                segments,
                Instant::now(),
            )?;
            Worker::new(socket, cfg, control, endpoint, role)?.run()
        }
    }
}

/// The socket's address and the most segments per GSO batch it takes.
fn socket_shape(socket: &UdpSocket) -> Result<(SocketAddr, usize), TransferError> {
    let local = socket
        .local_addr()
        .map_err(|e| TransferError::Io(format!("socket address: {e}")))?;
    Ok((local, socket.capabilities().max_gso_segments(1452)))
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
    joiner(socket, pinned, dest, cfg, control, Start::Peer(peer))
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
    joiner(
        socket,
        pinned,
        dest,
        cfg,
        control,
        Start::Ice(Box::new(ice)),
    )
}

/// How a joiner reaches the host.
enum Start {
    Peer(SocketAddr),
    Ice(Box<IceSetup>),
}

/// A receiving worker whose QUIC client pins the host's `pinned` certificate, on the stack
/// `cfg.quic` names.
fn joiner(
    socket: UdpSocket,
    pinned: Fingerprint,
    dest: PathBuf,
    cfg: &NetConfig,
    control: Control,
    start: Start,
) -> Result<NetReport, TransferError> {
    let role = Role::Join {
        dest_root: dest,
        dest: None,
        pipe: None,
        offered: false,
    };
    let id = cfg.client_identity.as_deref();
    match cfg.quic {
        QuicStack::Quinn => {
            let endpoint = QuinnEndpoint::client(pinned, id, &cfg.transport, None)
                .map_err(|e| TransferError::Io(format!("QUIC configuration: {e}")))?;
            Worker::new(socket, cfg, control, endpoint, role)?.start(start)
        }
        QuicStack::S2n => {
            let (local, segments) = socket_shape(&socket)?;
            let endpoint = crate::stack::s2n_client(
                local,
                pinned,
                id,
                &cfg.transport,
                segments,
                Instant::now(),
            )?;
            Worker::new(socket, cfg, control, endpoint, role)?.start(start)
        }
    }
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

/// The I/O driver around one [`Node`]: the socket, the disk executor, the pipes and the TURN
/// stream threads. It moves datagrams, completions and time, and decides nothing the node
/// decides.
struct Worker<E: QuicEndpoint> {
    node: Node<E>,
    socket: UdpSocket,
    cfg: NetConfig,
    control: Control,
    role: Role,
    exec: DiskExec,
    report: NetReport,
    bufs: Vec<Vec<u8>>,
    tx_buf: Vec<u8>,
    /// A GSO batch the socket refused with EAGAIN, to send first when writable again.
    blocked: Option<(Vec<u8>, Option<usize>, SocketAddr)>,
    poll_in: Option<Op<()>>,
    poll_out: Option<Op<()>>,
    /// TURN streams per ICE link, with the link's TLS settings.
    turn: HashMap<u64, TurnStreams>,
    turn_reports: Vec<TurnReport>,
}

/// GRO buffers read per `recvmmsg`.
const RECV_BUFS: usize = 16;
/// `recvmmsg` calls per loop turn before the loop turns to sending.
const RECV_ROUNDS: usize = 2;

impl<E: QuicEndpoint> Worker<E> {
    fn new(
        socket: UdpSocket,
        cfg: &NetConfig,
        control: Control,
        endpoint: E,
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
        let max_segments = caps.max_gso_segments(1452);
        let node = match &role {
            Role::Host { manifest, .. } => {
                Node::host(cfg, endpoint, manifest.clone(), local, max_segments)
            }
            Role::Join { .. } => Node::join(cfg, endpoint, local, max_segments),
        };
        Ok(Self {
            node,
            socket,
            cfg: cfg.clone(),
            control,
            role,
            exec,
            report: NetReport {
                driver: Some(cfg.driver),
                gso: caps.gso,
                gro: caps.gro,
                ..NetReport::default()
            },
            bufs: (0..RECV_BUFS).map(|_| vec![0u8; GRO_BUF_LEN]).collect(),
            tx_buf: Vec::with_capacity(GRO_BUF_LEN),
            blocked: None,
            poll_in: None,
            poll_out: None,
            turn: HashMap::new(),
            turn_reports: Vec::new(),
        })
    }

    /// Joiner: connects as `start` says, then runs.
    fn start(mut self, start: Start) -> Result<NetReport, TransferError> {
        let now = Instant::now();
        match start {
            Start::Peer(peer) => self.node.connect(now, peer)?,
            Start::Ice(ice) => {
                self.add_turn(0, &ice);
                self.node.connect_over_ice(now, *ice);
            }
        }
        self.run()
    }

    /// TURN streams for a new ICE link (the node itself does no I/O).
    fn add_turn(&mut self, link: u64, ice: &IceSetup) {
        self.turn
            .entry(link)
            .or_insert_with(|| TurnStreams::new(ice.turn_tls.clone(), ice.turn_names.clone()));
    }

    fn run(mut self) -> Result<NetReport, TransferError> {
        loop {
            let now = Instant::now();
            self.commands(now);
            let mut busy = self.receive(now)?;
            busy |= self.turn_in(now);
            self.node.handle_timeout(now);
            busy |= self.drive(now);
            busy |= self.transmit(now)?;
            busy |= self.events(now);
            if self.node.is_done() {
                break;
            }
            self.wait(busy)?;
        }
        // Let the final CONNECTION_CLOSE frames leave.
        let now = Instant::now();
        let _ = self.transmit(now);
        let mut report = self.node.report();
        report.driver = self.report.driver;
        report.gso = self.report.gso;
        report.gro = self.report.gro;
        report.disk = self.exec.stats();
        report.disk_choice = self.exec.choice().clone();
        if let Some(why) = report.disk_choice.describe() {
            tracing::info!("disk: {why}");
        }
        if let Role::Join { dest: Some(d), .. } = &self.role
            && self.cfg.durable
        {
            report.sync_time = Some(d.sync_time());
        }
        Ok(report)
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
                Ok(Command::Accept) => self.accept(now, Resolutions::default(), None),
                Ok(Command::AcceptResolved(r)) => self.accept(now, r, None),
                Ok(Command::AcceptChosen { resolved, chosen }) => {
                    self.accept(now, resolved, Some(&chosen));
                }
                Ok(Command::AddPeer { link, ice }) => {
                    self.add_turn(link, &ice);
                    self.node
                        .handle_command(now, Command::AddPeer { link, ice });
                }
                Ok(cmd) => self.node.handle_command(now, cmd),
                Err(TryRecvError::Disconnected) => {
                    // The controller is gone: nobody can answer or watch any more.
                    self.node.handle_command(now, Command::Cancel);
                    self.control.commands = None;
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
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
            return self.node.accept(now, &HashMap::new(), chosen);
        }
        let Some(d) = dest.as_mut() else { return };
        let answered: Vec<u32> = resolved.answered().collect();
        d.set_resolutions(resolved);
        let mut local = match d.scan() {
            Ok(l) => l,
            Err(e) => return self.node.fail(NetError::Destination(e)),
        };
        // An answered clash is no clash for the machine: the entry is fetched whole, then
        // dropped, put under its new name or in place of what is here (Destination).
        for i in answered {
            local.remove(&i);
        }
        self.node.accept(now, &local, chosen);
    }

    /// Reads every datagram waiting on the socket into the node.
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
                let len = m.len.min(self.bufs[i].len());
                // The one user-space copy on receive: the GRO buffers are reused, quinn-proto
                // decrypts in place in this one (engine/README.md).
                let data = BytesMut::from(&self.bufs[i][..len]);
                let ecn = m.ecn.map(|e| e as u8);
                self.node
                    .handle_datagram(now, m.addr, m.dst_ip, ecn, m.stride, data);
            }
            if n < RECV_BUFS {
                break;
            }
        }
        Ok(got_any)
    }

    /// Hands what the TURN stream threads reported to the node.
    fn turn_in(&mut self, now: Instant) -> bool {
        let mut any = false;
        for (&link, streams) in &mut self.turn {
            streams.poll_reports(&mut self.turn_reports);
            for r in self.turn_reports.drain(..) {
                any = true;
                self.node.handle_turn(now, link, r);
            }
        }
        any
    }

    /// Carries out the node's TURN stream work.
    fn turn_out(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(op) = self.node.poll_turn() {
            any = true;
            match op {
                TurnOp::Open {
                    link,
                    id,
                    addr,
                    tls,
                } => {
                    if let Some(s) = self.turn.get_mut(&link) {
                        s.open(id, addr, tls);
                    }
                }
                TurnOp::Write { link, id, data } => {
                    if let Some(r) = self
                        .turn
                        .get_mut(&link)
                        .and_then(|s| s.write_bytes(id, &data))
                    {
                        self.node.handle_turn(now, link, r);
                    }
                }
            }
        }
        any
    }

    /// Moves everything between the node and the disk until nothing moves (or the turn's
    /// budget is spent).
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
        loop {
            let mut progressed = false;
            while Instant::now() < until
                && let Some((conn, op)) = self.node.poll_disk(now)
            {
                progressed = true;
                self.submit(now, conn, op);
            }
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
            while let Some(d) = self.exec.poll_done() {
                piped.push(d);
            }
            for (conn, id, res) in piped {
                progressed = true;
                self.node.handle_disk_done(now, conn, id, res);
            }
            progressed |= self.events(now);
            if !progressed {
                break;
            }
            any = true;
            if Instant::now() >= until {
                break;
            }
        }
        // Stopped by the budget: more may be waiting, so the loop must not sleep.
        any || Instant::now() >= until
    }

    /// Sends a disk request where it belongs: the stdin reader, stdout, or the executor.
    fn submit(&mut self, now: Instant, conn: usize, op: flux_transfer::DiskOp) {
        match &mut self.role {
            Role::Host {
                sources,
                stream,
                manifest,
            } => match stream.as_mut() {
                Some(p) if matches!(op, flux_transfer::DiskOp::Read { file, .. } if manifest.stream() == Some(file)) =>
                {
                    p.submit(conn, op);
                }
                _ => self.exec.submit_read(conn, sources, op),
            },
            Role::Join { dest, pipe, .. } => {
                if let Some(p) = pipe.as_mut() {
                    return p.submit(conn, op);
                }
                match dest.as_mut() {
                    Some(d) => self.exec.submit_write(conn, d, op),
                    None => self.node.handle_disk_done(
                        now,
                        conn,
                        op.id(),
                        Err(flux_transfer::DiskFailure::Io("no destination".into())),
                    ),
                }
            }
        }
    }

    /// Forwards the node's events; a receiver's manifest is answered here first (it needs the
    /// destination). Returns whether there were any.
    fn events(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(ev) = self.node.poll_event(now) {
            any = true;
            if let NetEvent::Transfer {
                conn,
                event: Event::ManifestReady,
                ..
            } = &ev
            {
                self.manifest_ready(now, *conn);
            }
            self.emit(ev);
        }
        any
    }

    /// Receiver: the manifest arrived on `conn`: browse, pipe or scan the destination, then
    /// accept (auto) or offer.
    fn manifest_ready(&mut self, now: Instant, conn: usize) {
        let Role::Join {
            dest_root,
            dest,
            pipe,
            offered,
        } = &mut self.role
        else {
            return;
        };
        let Some(r) = self.node.receiver(conn) else {
            return;
        };
        let Some(m) = r.manifest().cloned() else {
            return;
        };
        let text = r.text().map(Arc::from);
        let offer = |local| NetEvent::Offer {
            manifest: m.clone(),
            local,
            text: text.clone(),
        };
        if self.cfg.browse {
            // Nothing at the destination is looked at: the offer is only shown.
            r.browse_done();
            if let Some(tx) = &self.control.events {
                let _ = tx.send(offer(Arc::default()));
            }
            return;
        }
        if self.cfg.pipe {
            let single = m.len() == 1 && m.file_count() == 1;
            let sink = if single || text.is_some() {
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
                    r.reject(&e);
                    self.node.set_error(conn, NetError::Refused(e));
                    return;
                }
            }
            if self.cfg.auto_accept {
                r.accept(now, HashMap::new());
            } else if !*offered {
                *offered = true;
                if let Some(tx) = &self.control.events {
                    let _ = tx.send(offer(Arc::new(HashMap::new())));
                }
            }
            return;
        }
        let mut d = Destination::with_modes(dest_root.clone(), m.clone(), self.cfg.modes);
        d.set_durable(self.cfg.durable);
        let scanned = d.scan();
        *dest = Some(Box::new(d));
        match scanned {
            Ok(local) => {
                if self.cfg.auto_accept {
                    r.accept(now, local);
                } else if !*offered {
                    *offered = true;
                    if let Some(tx) = &self.control.events {
                        let _ = tx.send(offer(Arc::new(local)));
                    }
                }
            }
            Err(e) => {
                r.cancel();
                self.node.set_error(conn, NetError::Destination(e));
            }
        }
    }

    /// Sends what the node has to send, in GSO batches, and its TURN stream work.
    fn transmit(&mut self, now: Instant) -> Result<bool, TransferError> {
        let mut sent_any = self.turn_out(now);
        if let Some((buf, seg, dst)) = self.blocked.take() {
            if !self.send(&buf, seg, dst)? {
                self.blocked = Some((buf, seg, dst));
                return Ok(sent_any);
            }
            sent_any = true;
        }
        let mut buf = std::mem::take(&mut self.tx_buf);
        while let Some(t) = self.node.poll_transmit(now, &mut buf) {
            let size = t.size.min(buf.len());
            let sent = match self.send(&buf[..size], t.segment_size, t.destination) {
                Err(e) if t.best_effort => {
                    tracing::trace!(error = %e, "best-effort datagram not sent");
                    true
                }
                r => r?,
            };
            if sent {
                sent_any = true;
            } else {
                self.blocked = Some((buf[..size].to_vec(), t.segment_size, t.destination));
                break;
            }
        }
        self.tx_buf = buf;
        sent_any |= self.turn_out(now);
        Ok(sent_any)
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

    /// Sleeps until the socket is readable (or writable when a batch is blocked), a disk
    /// request completes, or the node's next deadline — unless the last turn did work, in
    /// which case it only checks for commands.
    fn wait(&mut self, busy: bool) -> Result<(), TransferError> {
        if busy {
            return Ok(());
        }
        let now = Instant::now();
        let deadline = self.node.poll_timeout();
        // Commands arrive through a channel the loop cannot sleep on: look at least this often
        // (more often while ICE waits for trickled candidates, and while TURN stream threads
        // may have bytes for us).
        let mut timeout = deadline.map_or(COMMAND_POLL, |d| d.saturating_duration_since(now));
        if self.control.commands.is_some() {
            timeout = timeout.min(COMMAND_POLL);
            if self.node.ice_waiting() {
                timeout = timeout.min(ICE_POLL);
            }
        }
        if self
            .turn
            .iter()
            .any(|(&link, s)| s.opened() && self.node.link_live(link))
        {
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
        let want_write = self.blocked.is_some();
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

/// Most time one turn of the loop spends moving data between the node and the disk before it
/// turns to the network again.
const DRIVE_BUDGET: Duration = Duration::from_millis(20);

/// Longest sleep before the loop looks at its command channel.
const COMMAND_POLL: Duration = Duration::from_millis(50);
/// The same while ICE is still looking for a pair (trickled candidates come as commands).
const ICE_POLL: Duration = Duration::from_millis(5);
/// Longest sleep while the work threads hash (a 4 MiB chunk takes about a millisecond).
const WORK_POLL: Duration = Duration::from_micros(200);
/// Longest sleep while TURN stream threads may have bytes for the loop.
const STREAM_POLL: Duration = Duration::from_millis(1);
