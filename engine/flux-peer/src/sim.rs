//! Whole transfers between two peers over an emulated link, on a virtual clock.
//!
//! The simulator is a third driver of [`Node`], next to the io_uring and epoll drivers of
//! [`crate::net`]: two real nodes (a host and a joiner) with their real QUIC connections, transfer
//! machines, end policy (linger, cancel) and, optionally, ICE, writing real files; only the
//! network and the clock are simulated. Each direction of the link has a delay, a rate (with a
//! bounded queue: packets beyond it are tail-dropped, as a router would), random loss, random
//! reordering (a packet held back by an extra delay) and an MTU. Everything random comes from
//! one seed, so a failing run is reproduced by its seed. Virtual time jumps straight to the
//! next event, so a transfer that would take a minute of real time runs in far less.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flux_quic::conn::QuicEndpoint;
use flux_quic::quinn::QuinnEndpoint;
use flux_quic::{Identity, TransportParams};
use flux_transfer::{Event, Manifest, ReceiverConfig, SenderConfig, TransferError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::disk::{Destination, SourceFiles};
use crate::ice::IceSetup;
use crate::net::{Command, NetConfig, NetError, NetEvent};
use crate::node::Node;

/// One direction of the emulated link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bottleneck rate in bits per second (0: unlimited).
    pub rate_bps: u64,
    /// Most queueing delay before packets are dropped.
    pub queue: Duration,
    /// Probability a packet is lost.
    pub loss: f64,
    /// Probability a packet is held back by up to `reorder_delay`.
    pub reorder: f64,
    /// Extra delay for reordered packets.
    pub reorder_delay: Duration,
    /// Largest datagram that passes.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(10),
            rate_bps: 1_000_000_000,
            queue: Duration::from_millis(50),
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            mtu: 1500,
        }
    }
}

/// A simulated transfer's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// The link, applied in both directions.
    pub link: LinkConfig,
    /// Virtual time after which the run is abandoned.
    pub time_limit: Duration,
    /// Sender settings.
    pub sender: SenderConfig,
    /// Receiver settings.
    pub receiver: ReceiverConfig,
    /// QUIC settings of both sides.
    pub transport: TransportParams,
    /// Reach the host through ICE (host candidates, trickled both ways over the emulated
    /// link) instead of connecting QUIC to its address directly.
    pub ice: bool,
}

impl SimConfig {
    /// Defaults with `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            seed,
            link: LinkConfig::default(),
            time_limit: Duration::from_secs(600),
            sender: SenderConfig::default(),
            receiver: ReceiverConfig::default(),
            transport: TransportParams::default(),
            ice: false,
        }
    }
}

/// When a run stops.
#[derive(Clone, Debug)]
pub enum Stop {
    /// When both sides are done (or failed).
    Complete,
    /// Abruptly, as if both processes were killed, once the receiver has verified this many
    /// chunks.
    AfterVerified(usize),
    /// Once the receiver has verified `after` chunks, one side is cancelled as by Ctrl-C
    /// ([`Command::CancelWith`] with `reason`, or [`Command::Cancel`] without); the run goes on
    /// until both sides have ended.
    Cancel {
        /// Chunks verified first.
        after: usize,
        /// Cancel the host (else the joiner).
        host: bool,
        /// What the cancelled side tells its peer.
        reason: Option<String>,
    },
}

/// What happened in a run.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The sender's failure, if any.
    pub sender_error: Option<TransferError>,
    /// The receiver's failure, if any.
    pub receiver_error: Option<TransferError>,
    /// Whether both sides reported success.
    pub done: bool,
    /// Whether the run was cut by [`Stop::AfterVerified`].
    pub interrupted: bool,
    /// Chunks the sender put on the wire, in order (`(file, chunk)`).
    pub sent: Vec<(u32, u32)>,
    /// Chunk payload bytes the sender put on the wire (below the file bytes when compressed).
    pub wire_bytes: u64,
    /// Chunks the receiver verified and wrote, in order.
    pub verified: Vec<(u32, u32)>,
    /// Chunks that failed verification.
    pub corrupt: usize,
    /// Files skipped as already present.
    pub skipped: usize,
    /// Virtual time the run took.
    pub elapsed: Duration,
    /// Datagrams offered to the link, and those it dropped.
    pub datagrams: (u64, u64),
    /// Virtual time from the start to the end of each side's connection: `(host, joiner)`.
    /// A sender that completed lingers until the receiver closes, so the host ends after the
    /// joiner.
    pub ended: (Option<Duration>, Option<Duration>),
    /// The ICE pair the joiner's connection ran on, with [`SimConfig::ice`].
    pub route: Option<flux_ice::Selected>,
}

pub use crate::session::Tamper;

/// Runs one transfer of `manifest` (read from `sources`) into the existing directory `dest`.
/// The receiver accepts automatically, after scanning `dest` for what it already holds.
pub fn run(
    manifest: Arc<Manifest>,
    sources: Vec<Option<PathBuf>>,
    dest: PathBuf,
    cfg: SimConfig,
    stop: Stop,
    tamper: Option<Tamper>,
) -> Outcome {
    let Ok(id) = Identity::generate() else {
        return failed("no identity".into());
    };
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&cfg.seed.to_le_bytes());
    let server = match QuinnEndpoint::server(&id, &cfg.transport, None, Some(seed)) {
        Ok(e) => e,
        Err(e) => return failed(e.to_string()),
    };
    seed[8] = 1;
    let client = match QuinnEndpoint::client(id.fingerprint(), None, &cfg.transport, Some(seed)) {
        Ok(e) => e,
        Err(e) => return failed(e.to_string()),
    };
    run_on(server, client, manifest, sources, dest, cfg, stop, tamper)
}

/// [`run`] over any QUIC stack: `host` is a server endpoint at [`HOST_ADDR`], `join` a client
/// endpoint at [`JOIN_ADDR`] that pins the host.
#[allow(clippy::too_many_arguments)]
pub fn run_on<E: QuicEndpoint>(
    host: E,
    join: E,
    manifest: Arc<Manifest>,
    sources: Vec<Option<PathBuf>>,
    dest: PathBuf,
    cfg: SimConfig,
    stop: Stop,
    tamper: Option<Tamper>,
) -> Outcome {
    let mut sim = match Sim::new(host, join, manifest, sources, dest, cfg, tamper) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    sim.run(stop);
    sim.out
}

/// A run that could not start.
fn failed(e: String) -> Outcome {
    Outcome {
        sender_error: Some(TransferError::Io(e)),
        ..Outcome::default()
    }
}

/// The host's address on the emulated link.
pub const HOST_ADDR: &str = "10.0.0.1:4433";
/// The joiner's address on the emulated link.
pub const JOIN_ADDR: &str = "10.0.0.2:50000";
const SENDER_ADDR: &str = HOST_ADDR;
const RECEIVER_ADDR: &str = JOIN_ADDR;
/// Segments per GSO batch the emulated sockets take.
const SIM_GSO_SEGMENTS: usize = 10;

struct Packet {
    to_sender: bool,
    data: Vec<u8>,
}

struct Sim<E> {
    base: Instant,
    now: Instant,
    rng: SmallRng,
    cfg: SimConfig,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    packets: HashMap<u64, Packet>,
    seq: u64,
    /// When each direction's bottleneck is next free: [to sender, to receiver].
    free_at: [Instant; 2],
    host: Node<E>,
    join: Node<E>,
    sources: SourceFiles,
    dest_root: PathBuf,
    dest: Option<Destination>,
    out: Outcome,
    buf: Vec<u8>,
    host_ended: Option<Instant>,
    join_ended: Option<Instant>,
}

impl<E: QuicEndpoint> Sim<E> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        server: E,
        client: E,
        manifest: Arc<Manifest>,
        sources: Vec<Option<PathBuf>>,
        dest: PathBuf,
        cfg: SimConfig,
        tamper: Option<Tamper>,
    ) -> Result<Self, String> {
        // The one clock reading of a run: virtual time counts from here.
        let base = Instant::now();
        let net = NetConfig {
            transport: cfg.transport.clone(),
            sender: cfg.sender.clone(),
            receiver: cfg.receiver.clone(),
            auto_accept: true,
            serve: Some(1),
            ..NetConfig::default()
        };
        let mut host = Node::host(&net, server, manifest, addr(SENDER_ADDR), SIM_GSO_SEGMENTS);
        let mut join = Node::join(&net, client, addr(RECEIVER_ADDR), SIM_GSO_SEGMENTS);
        if let Some(t) = tamper {
            join.set_tamper(t);
        }
        if cfg.ice {
            let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x1ce);
            let mut cred = || {
                let mut b = [0u8; 18];
                rng.fill(&mut b);
                flux_ice::Credentials::from_random(&b)
            };
            let (hc, jc) = (cred(), cred());
            let setup = |role, ours: &flux_ice::Credentials, theirs: &flux_ice::Credentials, at| {
                let tie = u64::from(role == flux_ice::Role::Controlling) + 7;
                IceSetup {
                    config: flux_ice::Config::new(role, ours.clone(), tie),
                    hosts: vec![addr(at)],
                    remote_credentials: theirs.clone(),
                    remote_candidates: Vec::new(),
                    turn_tls: None,
                    turn_names: Vec::new(),
                }
            };
            host.handle_command(
                base,
                Command::AddPeer {
                    link: 0,
                    ice: Box::new(setup(flux_ice::Role::Controlled, &hc, &jc, SENDER_ADDR)),
                },
            );
            join.connect_over_ice(
                base,
                setup(flux_ice::Role::Controlling, &jc, &hc, RECEIVER_ADDR),
            );
        } else {
            join.connect(base, addr(SENDER_ADDR))
                .map_err(|e| e.to_string())?;
        }
        Ok(Self {
            base,
            now: base,
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            queue: BinaryHeap::new(),
            packets: HashMap::new(),
            seq: 0,
            free_at: [base; 2],
            host,
            join,
            sources: SourceFiles::new(sources),
            dest_root: dest,
            dest: None,
            out: Outcome::default(),
            buf: Vec::with_capacity(64 << 10),
            host_ended: None,
            join_ended: None,
        })
    }

    fn run(&mut self, stop: Stop) {
        let mut cancelled = false;
        loop {
            self.deliver();
            self.host.handle_timeout(self.now);
            self.join.handle_timeout(self.now);
            self.step(false);
            self.step(true);
            self.flush(false);
            self.flush(true);
            match &stop {
                Stop::AfterVerified(n) if self.out.verified.len() >= *n => {
                    self.out.interrupted = true;
                    break;
                }
                Stop::Cancel {
                    after,
                    host,
                    reason,
                } if !cancelled && self.out.verified.len() >= *after => {
                    cancelled = true;
                    let cmd = match reason {
                        Some(r) => Command::CancelWith(r.clone()),
                        None => Command::Cancel,
                    };
                    let node = if *host {
                        &mut self.host
                    } else {
                        &mut self.join
                    };
                    node.handle_command(self.now, cmd);
                    continue;
                }
                _ => {}
            }
            // Run until both sides have ended, so each side's view of a failure is observed.
            if self.join.is_done() && (self.host.is_done() || !self.host.has_connections()) {
                // The last round of transmits reported the ends: take those events.
                self.step(false);
                self.step(true);
                break;
            }
            let Some(next) = self.next_event() else {
                self.out
                    .receiver_error
                    .get_or_insert(TransferError::Timeout("simulation stalled"));
                break;
            };
            self.now = self.now.max(next);
            if self.now - self.base > self.cfg.time_limit {
                self.out
                    .receiver_error
                    .get_or_insert(TransferError::Timeout("simulation time limit"));
                break;
            }
        }
        let joined = self.join.report();
        self.out.done = self.out.sender_error.is_none()
            && self.out.receiver_error.is_none()
            && !self.out.interrupted
            && joined.succeeded == 1;
        self.out.route = joined.conns.first().and_then(|c| c.route);
        self.out.elapsed = self.now - self.base;
        self.out.ended = (
            self.host_ended.map(|t| t - self.base),
            self.join_ended.map(|t| t - self.base),
        );
    }

    fn next_event(&mut self) -> Option<Instant> {
        [
            self.queue.peek().map(|Reverse((t, _))| *t),
            self.host.poll_timeout(),
            self.join.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn deliver(&mut self) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > self.now {
                break;
            }
            self.queue.pop();
            let Some(p) = self.packets.remove(&seq) else {
                continue;
            };
            let len = p.data.len();
            let data = BytesMut::from(&p.data[..]);
            if p.to_sender {
                self.host
                    .handle_datagram(self.now, addr(RECEIVER_ADDR), None, None, len, data);
            } else {
                self.join
                    .handle_datagram(self.now, addr(SENDER_ADDR), None, None, len, data);
            }
        }
    }

    /// Performs one node's disk requests at once (virtual time: the disk takes none) and
    /// takes its events, until nothing moves.
    fn step(&mut self, host: bool) {
        let now = self.now;
        loop {
            let mut progressed = false;
            let node = if host { &mut self.host } else { &mut self.join };
            while let Some((conn, op)) = node.poll_disk(now) {
                progressed = true;
                let (id, res) = if host {
                    self.sources.execute(op)
                } else {
                    match self.dest.as_mut() {
                        Some(d) => d.execute(op),
                        None => (
                            op.id(),
                            Err(flux_transfer::DiskFailure::Io("no destination".into())),
                        ),
                    }
                };
                node.handle_disk_done(now, conn, id, res);
            }
            loop {
                let node = if host { &mut self.host } else { &mut self.join };
                let Some(ev) = node.poll_event(now) else {
                    break;
                };
                progressed = true;
                let mut trickle = None;
                match ev {
                    NetEvent::Transfer { conn, event, .. } => {
                        self.record(host, conn, event);
                    }
                    NetEvent::LocalCandidate { candidate, .. } => trickle = Some(candidate),
                    NetEvent::Ended { error, .. } => {
                        let (slot, at) = if host {
                            (&mut self.out.sender_error, &mut self.host_ended)
                        } else {
                            (&mut self.out.receiver_error, &mut self.join_ended)
                        };
                        at.get_or_insert(now);
                        if let Some(e) = error {
                            slot.get_or_insert(match e {
                                NetError::Transfer(t) => t,
                                other => TransferError::Io(other.to_string()),
                            });
                        }
                    }
                    _ => {}
                }
                if let Some(candidate) = trickle {
                    // Signaling, instantly: the candidate reaches the other node.
                    let other = if host { &mut self.join } else { &mut self.host };
                    other.handle_command(now, Command::RemoteCandidate { link: 0, candidate });
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn record(&mut self, host: bool, conn: usize, event: Event) {
        let now = self.now;
        match event {
            Event::ManifestReady if !host => {
                let Some(m) = self.join.receiver(conn).and_then(|r| r.manifest().cloned()) else {
                    return;
                };
                let dest = Destination::new(self.dest_root.clone(), m);
                match dest.scan() {
                    Ok(local) => self.join.accept(now, &local, None),
                    Err(e) => {
                        self.out.receiver_error = Some(TransferError::Io(e.to_string()));
                        if let Some(r) = self.join.receiver(conn) {
                            r.cancel();
                        }
                    }
                }
                self.dest = Some(dest);
            }
            Event::ChunkSent {
                file, index, wire, ..
            } => {
                self.out.sent.push((file, index));
                self.out.wire_bytes += u64::from(wire);
            }
            Event::ChunkVerified { file, index, .. } => self.out.verified.push((file, index)),
            Event::ChunkCorrupt { .. } => self.out.corrupt += 1,
            Event::FileSkipped { .. } => self.out.skipped += 1,
            Event::Failed(e) => {
                let slot = if host {
                    &mut self.out.sender_error
                } else {
                    &mut self.out.receiver_error
                };
                slot.get_or_insert(e);
            }
            _ => {}
        }
    }

    /// Puts what a node sends on the link, GSO batches split into datagrams.
    fn flush(&mut self, host: bool) {
        let now = self.now;
        loop {
            let mut any = false;
            loop {
                let node = if host { &mut self.host } else { &mut self.join };
                let Some(t) = node.poll_transmit(now, &mut self.buf) else {
                    break;
                };
                any = true;
                let data = std::mem::take(&mut self.buf);
                let size = t.size.min(data.len());
                match t.segment_size {
                    Some(seg) if seg > 0 => {
                        for p in data[..size].chunks(seg) {
                            self.send(!host, p.to_vec());
                        }
                    }
                    _ => self.send(!host, data[..size].to_vec()),
                }
                self.buf = data;
            }
            // A node hands out a few batches per connection per call round: ask until it has
            // nothing at this instant.
            if !any {
                break;
            }
        }
    }

    /// Puts a datagram on the link toward the sender (`to_sender`) or the receiver.
    fn send(&mut self, to_sender: bool, data: Vec<u8>) {
        let link = &self.cfg.link;
        self.out.datagrams.0 += 1;
        let dir = usize::from(!to_sender);
        if data.len() > link.mtu || self.rng.gen_bool(link.loss.clamp(0.0, 1.0)) {
            self.out.datagrams.1 += 1;
            return;
        }
        let start = self.free_at[dir].max(self.now);
        let tx = Duration::from_nanos(
            (data.len() as u64 * 8)
                .saturating_mul(1_000_000_000)
                .checked_div(link.rate_bps)
                .unwrap_or(0),
        );
        if start - self.now > link.queue {
            self.out.datagrams.1 += 1;
            return;
        }
        self.free_at[dir] = start + tx;
        let mut at = start + tx + link.delay;
        if self.rng.gen_bool(link.reorder.clamp(0.0, 1.0)) {
            at += link.reorder_delay.mul_f64(self.rng.gen_range(0.1..1.0));
        }
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.packets.insert(self.seq, Packet { to_sender, data });
    }
}

fn addr(s: &str) -> SocketAddr {
    // Constant addresses above; parsing cannot fail.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}
