//! Whole transfers between two peers over an emulated link, on a virtual clock.
//!
//! The sender and receiver are the real machines on real quinn-proto connections writing real
//! files; only the network and the clock are simulated. Each direction of the link has a delay,
//! a rate (with a bounded queue: packets beyond it are tail-dropped, as a router would), random
//! loss, random reordering (a packet held back by an extra delay) and an MTU. Everything random
//! comes from one seed, so a failing run is reproduced by its seed. Virtual time jumps straight
//! to the next event, so a transfer that would take a minute of real time runs in far less.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flux_quic::quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, ServerConfig,
};
use flux_quic::{Identity, TransportParams};
use flux_transfer::{
    Event, Manifest, Receiver, ReceiverConfig, Sender, SenderConfig, TransferError,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::disk::{Destination, SourceFiles};
use crate::session::{Session, Side};

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
        }
    }
}

/// When a run stops.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// When both sides are done (or failed).
    Complete,
    /// Abruptly, as if both processes were killed, once the receiver has verified this many
    /// chunks.
    AfterVerified(usize),
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
    let mut sim = match Sim::new(manifest, sources, dest, cfg, tamper) {
        Ok(s) => s,
        Err(e) => {
            return Outcome {
                sender_error: Some(TransferError::Io(e)),
                ..Outcome::default()
            };
        }
    };
    sim.run(stop);
    sim.out
}

const SENDER_ADDR: &str = "10.0.0.1:4433";
const RECEIVER_ADDR: &str = "10.0.0.2:50000";

struct Packet {
    to_sender: bool,
    data: Vec<u8>,
}

struct Sim {
    base: Instant,
    now: Instant,
    rng: SmallRng,
    cfg: SimConfig,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    packets: HashMap<u64, Packet>,
    seq: u64,
    /// When each direction's bottleneck is next free: [to sender, to receiver].
    free_at: [Instant; 2],
    server: Endpoint,
    client: Endpoint,
    sender: Option<(ConnectionHandle, Session<Sender>)>,
    receiver: (ConnectionHandle, Session<Receiver>),
    manifest: Arc<Manifest>,
    sources: SourceFiles,
    dest_root: PathBuf,
    dest: Option<Destination>,
    out: Outcome,
    buf: Vec<u8>,
}

impl Sim {
    fn new(
        manifest: Arc<Manifest>,
        sources: Vec<Option<PathBuf>>,
        dest: PathBuf,
        cfg: SimConfig,
        tamper: Option<Tamper>,
    ) -> Result<Self, String> {
        // The one clock reading of a run: virtual time counts from here.
        let base = Instant::now();
        let id = Identity::generate().map_err(|e| e.to_string())?;
        let server_cfg: ServerConfig =
            flux_quic::server_config(&id, &cfg.transport).map_err(|e| e.to_string())?;
        let client_cfg = flux_quic::client_config(id.fingerprint(), &cfg.transport)
            .map_err(|e| e.to_string())?;
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&cfg.seed.to_le_bytes());
        let ep_cfg = Arc::new(EndpointConfig::default());
        let server = Endpoint::new(ep_cfg.clone(), Some(Arc::new(server_cfg)), true, Some(seed));
        seed[8] = 1;
        let mut client = Endpoint::new(ep_cfg, None, true, Some(seed));
        let (ch, conn) = client
            .connect(base, client_cfg, addr(SENDER_ADDR), flux_quic::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let mut rs = Session::new(
            conn,
            Receiver::new(cfg.receiver.clone()),
            Side::Client,
            cfg.transport.send_window,
        );
        rs.tamper = tamper;
        Ok(Self {
            base,
            now: base,
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            queue: BinaryHeap::new(),
            packets: HashMap::new(),
            seq: 0,
            free_at: [base; 2],
            server,
            client,
            sender: None,
            receiver: (ch, rs),
            manifest,
            sources: SourceFiles::new(sources),
            dest_root: dest,
            dest: None,
            out: Outcome::default(),
            buf: Vec::with_capacity(64 << 10),
        })
    }

    fn run(&mut self, stop: Stop) {
        loop {
            self.deliver();
            self.timers();
            self.step_receiver();
            self.step_sender();
            self.connection_lost();
            let r_over = self.receiver.1.machine.is_over();
            let s_over = self.sender.as_ref().is_some_and(|s| s.1.machine.is_over());
            if let Stop::AfterVerified(n) = stop
                && self.out.verified.len() >= n
            {
                self.out.interrupted = true;
                break;
            }
            // Run until both sides have ended, so each side's view of a failure is observed.
            if r_over && (s_over || self.sender.is_none()) {
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
        self.out.done = self.out.sender_error.is_none()
            && self.out.receiver_error.is_none()
            && !self.out.interrupted
            && self.receiver.1.machine.is_over();
        self.out.elapsed = self.now - self.base;
    }

    /// A connection that closed under a transfer still going ends that side at once with the
    /// reason, as the engine does ("connection lost: …"), instead of leaving its machine to
    /// time out.
    fn connection_lost(&mut self) {
        let r = &mut self.receiver.1;
        if !r.machine.is_over()
            && let Some(reason) = r.close_reason().map(ToString::to_string)
        {
            r.machine.cancel();
            self.out
                .receiver_error
                .get_or_insert(TransferError::Io(format!("connection lost: {reason}")));
        }
        if let Some((_, s)) = self.sender.as_mut()
            && !s.machine.is_over()
            && let Some(reason) = s.close_reason().map(ToString::to_string)
        {
            s.machine.cancel();
            self.out
                .sender_error
                .get_or_insert(TransferError::Io(format!("connection lost: {reason}")));
        }
    }

    fn next_event(&mut self) -> Option<Instant> {
        let mut next = self.queue.peek().map(|Reverse((t, _))| *t);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.receiver.1.conn.poll_timeout());
        consider(self.receiver.1.machine.poll_timeout());
        if let Some((_, s)) = self.sender.as_mut() {
            consider(s.conn.poll_timeout());
            consider(s.machine.poll_timeout());
        }
        next
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
            let data = BytesMut::from(&p.data[..]);
            if p.to_sender {
                let ev = self.server.handle(
                    self.now,
                    addr(RECEIVER_ADDR),
                    None,
                    None,
                    data,
                    &mut self.buf,
                );
                match ev {
                    Some(DatagramEvent::NewConnection(inc)) => {
                        if self.sender.is_some() {
                            let _ = self.server.refuse(inc, &mut self.buf);
                            continue;
                        }
                        if let Ok((ch, conn)) =
                            self.server.accept(inc, self.now, &mut self.buf, None)
                        {
                            let m = Sender::new(self.manifest.clone(), self.cfg.sender.clone());
                            self.sender = Some((
                                ch,
                                Session::new(conn, m, Side::Server, self.cfg.transport.send_window),
                            ));
                        }
                    }
                    Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                        if let Some((sch, s)) = self.sender.as_mut()
                            && *sch == ch
                        {
                            s.conn.handle_event(ev);
                        }
                    }
                    Some(DatagramEvent::Response(t)) => {
                        let d = self.buf[..t.size].to_vec();
                        self.send(false, d);
                    }
                    None => {}
                }
            } else {
                let ev = self.client.handle(
                    self.now,
                    addr(SENDER_ADDR),
                    None,
                    None,
                    data,
                    &mut self.buf,
                );
                match ev {
                    Some(DatagramEvent::ConnectionEvent(ch, ev)) if ch == self.receiver.0 => {
                        self.receiver.1.conn.handle_event(ev);
                    }
                    Some(DatagramEvent::Response(t)) => {
                        let d = self.buf[..t.size].to_vec();
                        self.send(true, d);
                    }
                    _ => {}
                }
            }
        }
    }

    fn timers(&mut self) {
        let now = self.now;
        let r = &mut self.receiver.1;
        if r.conn.poll_timeout().is_some_and(|t| t <= now) {
            r.conn.handle_timeout(now);
        }
        r.machine.handle_timeout(now);
        if let Some((_, s)) = self.sender.as_mut() {
            if s.conn.poll_timeout().is_some_and(|t| t <= now) {
                s.conn.handle_timeout(now);
            }
            s.machine.handle_timeout(now);
        }
    }

    fn step_receiver(&mut self) {
        let now = self.now;
        loop {
            self.receiver.1.drive(now);
            let mut progressed = false;
            while let Some(op) = self.receiver.1.machine.poll_disk() {
                progressed = true;
                let Some(dest) = self.dest.as_mut() else {
                    break;
                };
                let (id, res) = dest.execute(op);
                self.receiver.1.machine.handle_disk_done(now, id, res);
            }
            while let Some(ev) = self.receiver.1.machine.poll_event() {
                progressed = true;
                match ev {
                    Event::ManifestReady => {
                        let Some(m) = self.receiver.1.machine.manifest().cloned() else {
                            continue;
                        };
                        let dest = Destination::new(self.dest_root.clone(), m);
                        match dest.scan() {
                            Ok(local) => self.receiver.1.machine.accept(now, local),
                            Err(e) => {
                                self.out.receiver_error = Some(TransferError::Io(e.to_string()));
                                self.receiver.1.machine.cancel();
                            }
                        }
                        self.dest = Some(dest);
                    }
                    Event::ChunkVerified { file, index, .. } => {
                        self.out.verified.push((file, index))
                    }
                    Event::ChunkCorrupt { .. } => self.out.corrupt += 1,
                    Event::FileSkipped { .. } => self.out.skipped += 1,
                    Event::Failed(e) => {
                        self.out.receiver_error.get_or_insert(e);
                    }
                    _ => {}
                }
            }
            if !progressed {
                break;
            }
        }
        let (ch, s) = (self.receiver.0, &mut self.receiver.1);
        for d in flush(&mut s.conn, ch, &mut self.client, now, &mut self.buf) {
            self.send(true, d);
        }
    }

    fn step_sender(&mut self) {
        let now = self.now;
        let Some((ch, s)) = self.sender.as_mut() else {
            return;
        };
        loop {
            s.drive(now);
            let mut progressed = false;
            while let Some(op) = s.machine.poll_disk() {
                progressed = true;
                let (id, res) = self.sources.execute(op);
                s.machine.handle_disk_done(now, id, res);
            }
            while let Some(ev) = s.machine.poll_event() {
                progressed = true;
                match ev {
                    Event::ChunkSent {
                        file, index, wire, ..
                    } => {
                        self.out.sent.push((file, index));
                        self.out.wire_bytes += u64::from(wire);
                    }
                    Event::Failed(e) => {
                        self.out.sender_error.get_or_insert(e);
                    }
                    _ => {}
                }
            }
            if !progressed {
                break;
            }
        }
        for d in flush(&mut s.conn, *ch, &mut self.server, now, &mut self.buf) {
            self.send(false, d);
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

/// Routes a connection's endpoint events and collects its datagrams (GSO batches split).
fn flush(
    conn: &mut Connection,
    ch: ConnectionHandle,
    endpoint: &mut Endpoint,
    now: Instant,
    buf: &mut Vec<u8>,
) -> Vec<Vec<u8>> {
    while let Some(ev) = conn.poll_endpoint_events() {
        if let Some(ce) = endpoint.handle_event(ch, ev) {
            conn.handle_event(ce);
        }
    }
    let mut out = Vec::new();
    while let Some(t) = conn.poll_transmit(now, 10, buf) {
        split(&buf[..t.size], t.segment_size, &mut out);
        buf.clear();
    }
    out
}

fn split(buf: &[u8], segment: Option<usize>, out: &mut Vec<Vec<u8>>) {
    match segment {
        Some(seg) if seg > 0 => out.extend(buf.chunks(seg).map(<[u8]>::to_vec)),
        _ => out.push(buf.to_vec()),
    }
}

fn addr(s: &str) -> SocketAddr {
    // Constant addresses above; parsing cannot fail.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}
