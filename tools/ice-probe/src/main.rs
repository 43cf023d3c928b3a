//! NAT-lab probe: drives `flux-ice` on a real UDP socket, exchanges candidates with the other
//! probe through files in a shared directory, and once a pair is selected moves a block of
//! application datagrams over it (through TURN when relayed), verifies every byte and prints
//! one JSON line.
//!
//! This is test tooling, not the product: it uses std sockets, threads and the clock, and a
//! tiny NACK-repair protocol instead of QUIC. The real signaling path is `thruserv`.
//!
//! Exchange: each probe appends `creds <ufrag:pwd>` and `cand <candidate>` lines to
//! `<dir>/<name>.txt` and reads `<dir>/<peer>.txt`. Data (first byte keeps it in the QUIC
//! range of the demultiplexer): `0xC0 seq:u32 payload` data, `0xC2 count:u32` sender done,
//! `0xC1 seq:u32...` receiver's missing list, `0xC3` receiver complete.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flux_ice::{
    Agent, Candidate, Config, Credentials, Event, Packet, Received, Role, Selected, SendVia,
    TurnServer, TurnTransport,
};
use flux_peer::ice::TurnStreams;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "NAT-lab ICE probe")]
struct Args {
    /// `controlling` (sends the data) or `controlled` (receives and verifies it).
    #[arg(long)]
    role: String,
    /// Local IP to bind the UDP socket to.
    #[arg(long)]
    bind: std::net::IpAddr,
    /// Shared directory for the candidate exchange.
    #[arg(long)]
    dir: PathBuf,
    /// Our name (file `<dir>/<name>.txt`).
    #[arg(long)]
    name: String,
    /// Peer's name.
    #[arg(long)]
    peer: String,
    /// STUN server (repeatable).
    #[arg(long)]
    stun: Vec<SocketAddr>,
    /// TURN server as `udp:ADDR`, `tcp:ADDR` or `tls:ADDR` (repeatable).
    #[arg(long)]
    turn: Vec<String>,
    /// TURN user.
    #[arg(long, default_value = "flux")]
    turn_user: String,
    /// TURN password.
    #[arg(long, default_value = "fluxpass")]
    turn_pass: String,
    /// DER certificate the TLS TURN server must present (pinned).
    #[arg(long)]
    turn_cert: Option<PathBuf>,
    /// Bytes of application data to move.
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    bytes: u64,
    /// Send pacing, Mbit/s.
    #[arg(long, default_value_t = 200)]
    rate_mbit: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// ICE gives up when no pair succeeds within this many seconds.
    #[arg(long, default_value_t = 20)]
    connect_timeout: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "ok": false, "error": format!("{e:#}") })
            );
            ExitCode::FAILURE
        }
    }
}

const PAYLOAD: usize = 1150;
const DATA: u8 = 0xC0;
const NACK: u8 = 0xC1;
const DONE: u8 = 0xC2;
const COMPLETE: u8 = 0xC3;

fn run(args: Args) -> anyhow::Result<()> {
    let role = match args.role.as_str() {
        "controlling" => Role::Controlling,
        "controlled" => Role::Controlled,
        r => bail!("unknown role {r}"),
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout);
    let sock = UdpSocket::bind((args.bind, 0)).context("bind UDP")?;
    let sock2 = socket2::SockRef::from(&sock);
    let _ = sock2.set_recv_buffer_size(4 << 20);
    let _ = sock2.set_send_buffer_size(4 << 20);
    let local = sock.local_addr()?;

    let mut seed = [0u8; 26];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    let creds = Credentials::from_random(seed[..18].try_into()?);
    let tie = u64::from_le_bytes(seed[18..26].try_into()?);
    let mut config = Config::new(role, creds.clone(), tie);
    config.stun_servers = args.stun.clone();
    config.connect_timeout = Duration::from_secs(args.connect_timeout);
    for t in &args.turn {
        let (kind, addr) = t.split_once(':').context("--turn wants KIND:ADDR")?;
        let transport = match kind {
            "udp" => TurnTransport::Udp,
            "tcp" => TurnTransport::Tcp,
            "tls" => TurnTransport::Tls,
            k => bail!("unknown TURN transport {k}"),
        };
        config.turn_servers.push(TurnServer {
            addr: addr.parse().context("TURN address")?,
            transport,
            username: args.turn_user.clone(),
            password: args.turn_pass.clone(),
        });
    }
    let turn_tls = match &args.turn_cert {
        Some(p) => Some(
            flux_peer::ice::turn_tls_config(Some(std::fs::read(p).context("read --turn-cert")?))
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };

    let mut out = Exchange::new(&args)?;
    out.send(&format!("creds {creds}"))?;
    let mut agent = Agent::new(config, start);
    agent.add_host(local, start);

    // TURN over TCP/TLS: the engine's stream handling (a thread per stream; pinned TLS).
    let mut streams = TurnStreams::new(turn_tls, Vec::new());
    let mut selected: Option<Selected> = None;
    let mut connect_ms = None;
    let mut xfer = Transfer::new(role, args.bytes, args.rate_mbit);
    let mut buf = vec![0u8; 65536];
    let mut wrapped = Vec::with_capacity(2048);
    let mut channel_sends = 0u64;
    sock.set_nonblocking(true)?;

    loop {
        let now = Instant::now();
        if now > deadline {
            bail!(
                "timeout: selected={selected:?} received={} stats={:?}",
                xfer.received.len(),
                agent.stats()
            );
        }
        // Received datagrams, a bounded batch per turn.
        let mut got = 0;
        for _ in 0..256 {
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(v) => v,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break;
                }
                // ICMP errors from unreachable candidates surface here; ignore them.
                Err(_) => continue,
            };
            got += 1;
            let now = Instant::now();
            let seg = &buf[..n];
            let app = match agent.classify(from, seg) {
                Packet::Quic => Some((from, seg)),
                Packet::Other => None,
                _ => match agent.handle_datagram(now, from, local, seg) {
                    Received::App { peer, data } => Some((peer, data)),
                    _ => None,
                },
            };
            if let Some((_, data)) = app {
                let data = data.to_vec();
                xfer.on_datagram(&data);
            }
        }
        if got == 0 && !xfer.sending() {
            std::thread::sleep(Duration::from_micros(500));
        }
        streams.poll(&mut agent, Instant::now());
        while let Some(d) = agent.poll_app() {
            xfer.on_datagram(&d.data);
        }
        let now = Instant::now();
        if agent.poll_timeout().is_some_and(|t| now >= t) {
            agent.handle_timeout(now);
        }
        streams.flush(&mut agent, &mut |d, to| send_udp(&sock, d, to));
        while let Some(e) = agent.poll_event() {
            match e {
                Event::LocalCandidate(c) => out.send(&format!("cand {c}"))?,
                Event::ConnectTurnStream { stream, addr, tls } => {
                    streams.open(stream, addr, tls);
                }
                Event::Selected(s) => {
                    eprintln!("selected {s:?}");
                    connect_ms.get_or_insert(start.elapsed().as_millis());
                    selected = Some(s);
                }
                Event::Failed(r) => bail!("failed to establish ICE connection: {r}"),
                _ => {}
            }
        }
        for line in out.poll_peer()? {
            let now = Instant::now();
            if let Some(c) = line.strip_prefix("creds ") {
                agent.set_remote_credentials(&c.parse()?, now);
            } else if let Some(c) = line.strip_prefix("cand ") {
                match c.parse::<Candidate>() {
                    Ok(c) => {
                        agent.add_remote_candidate(&c, now);
                    }
                    Err(e) => eprintln!("bad candidate {c}: {e}"),
                }
            }
        }
        streams.flush(&mut agent, &mut |d, to| send_udp(&sock, d, to));

        // Application data.
        if selected.is_some() {
            let now = Instant::now();
            let channel = agent.relay_channel();
            for pkt in xfer.poll_send(now) {
                // The engine's zero-copy path: it writes the 4-byte header into headroom; the
                // probe copies, but exercises the channel number the agent reports.
                if let (Some(rc), Ok(len)) = (channel, u16::try_from(pkt.len())) {
                    wrapped.clear();
                    wrapped.extend_from_slice(&flux_ice::channel_header(rc.channel, len));
                    wrapped.extend_from_slice(&pkt);
                    send_udp(&sock, &wrapped, rc.to);
                    channel_sends += 1;
                    continue;
                }
                match agent.wrap(now, &pkt, &mut wrapped) {
                    Ok(SendVia::Direct { to, .. }) => send_udp(&sock, &pkt, to),
                    Ok(SendVia::TurnUdp { to, .. }) => send_udp(&sock, &wrapped, to),
                    Ok(SendVia::TurnStream(id)) => streams.write(&mut agent, id, &wrapped),
                    Err(_) => {}
                }
            }
        }
        if let Some(result) = xfer.finished(Instant::now()) {
            let sel = selected.context("finished without a selected pair")?;
            let (bytes, secs) = result;
            println!(
                "{}",
                serde_json::json!({
                    "ok": true,
                    "role": args.role,
                    "route": sel.kind.as_str(),
                    "local": sel.local_kind.as_str(),
                    "remote": sel.remote_kind.as_str(),
                    "transport": sel.transport.as_str(),
                    "connect_ms": connect_ms,
                    "bytes": bytes,
                    "transfer_s": secs,
                    "mbit_s": (bytes as f64 * 8.0 / secs.max(1e-6) / 1e6 * 10.0).round() / 10.0,
                    "repairs": xfer.repairs,
                    "channel_sends": channel_sends,
                    "stats": format!("{:?}", agent.stats()),
                })
            );
            return Ok(());
        }
    }
}

fn send_udp(sock: &UdpSocket, data: &[u8], to: SocketAddr) {
    // why: a full socket buffer or an unreachable candidate must not stop the probe; ICE and
    // the repair loop retransmit.
    let _ = sock.send_to(data, to);
}

/// Candidate exchange through two files.
struct Exchange {
    mine: std::fs::File,
    peer_path: PathBuf,
    peer_done: usize,
    last_poll: Option<Instant>,
}

impl Exchange {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let mine = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(args.dir.join(format!("{}.txt", args.name)))
            .context("open exchange file")?;
        Ok(Self {
            mine,
            peer_path: args.dir.join(format!("{}.txt", args.peer)),
            peer_done: 0,
            last_poll: None,
        })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.mine, "{line}")?;
        self.mine.flush()?;
        Ok(())
    }

    fn poll_peer(&mut self) -> anyhow::Result<Vec<String>> {
        let now = Instant::now();
        if self
            .last_poll
            .is_some_and(|t| now < t + Duration::from_millis(10))
        {
            return Ok(Vec::new());
        }
        self.last_poll = Some(now);
        let Ok(text) = std::fs::read_to_string(&self.peer_path) else {
            return Ok(Vec::new());
        };
        // Only complete lines; the writer may be mid-line.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let new: Vec<String> = text[..complete]
            .lines()
            .skip(self.peer_done)
            .map(str::to_owned)
            .collect();
        self.peer_done += new.len();
        Ok(new)
    }
}

/// The data phase: the controlling side sends, the controlled side verifies.
struct Transfer {
    role: Role,
    bytes: u64,
    count: u32,
    next_seq: u32,
    resend: Vec<u32>,
    received: BTreeSet<u32>,
    repairs: u64,
    interval: Duration,
    next_send: Option<Instant>,
    started: Option<Instant>,
    done_at: Option<Instant>,
    last_done_sent: Option<Instant>,
    last_done_seen: Option<Instant>,
    complete: bool,
    complete_sent: Option<Instant>,
    replies: Vec<Vec<u8>>,
}

impl Transfer {
    fn new(role: Role, bytes: u64, rate_mbit: u64) -> Self {
        let count = u32::try_from(bytes.div_ceil(PAYLOAD as u64)).unwrap_or(u32::MAX);
        let per_packet = (PAYLOAD as f64 + 40.0) * 8.0 / (rate_mbit.max(1) as f64 * 1e6);
        Self {
            role,
            bytes,
            count,
            next_seq: 0,
            resend: Vec::new(),
            received: BTreeSet::new(),
            repairs: 0,
            interval: Duration::from_secs_f64(per_packet),
            next_send: None,
            started: None,
            done_at: None,
            last_done_sent: None,
            last_done_seen: None,
            complete: false,
            complete_sent: None,
            replies: Vec::new(),
        }
    }

    fn payload_len(&self, seq: u32) -> usize {
        let off = u64::from(seq) * PAYLOAD as u64;
        (self.bytes - off).min(PAYLOAD as u64) as usize
    }

    fn packet(&self, seq: u32) -> Vec<u8> {
        let len = self.payload_len(seq);
        let mut p = Vec::with_capacity(5 + len);
        p.push(DATA);
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend((0..len).map(|i| pattern(seq, i)));
        p
    }

    /// Whether the sender is mid-transfer (no idle sleeps then).
    fn sending(&self) -> bool {
        self.role == Role::Controlling && self.started.is_some() && !self.complete
    }

    /// Datagrams to send now.
    fn poll_send(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = std::mem::take(&mut self.replies);
        if self.role == Role::Controlled || self.complete {
            return out;
        }
        let start = *self.started.get_or_insert(now);
        let next = self.next_send.get_or_insert(start);
        let mut budget = 0;
        while *next <= now && budget < 64 {
            *next += self.interval;
            budget += 1;
        }
        // why: do not let a stall build a burst larger than one batch.
        if *next + Duration::from_millis(5) < now {
            *next = now;
        }
        for _ in 0..budget {
            if let Some(seq) = self.resend.pop() {
                self.repairs += 1;
                out.push(self.packet(seq));
            } else if self.next_seq < self.count {
                out.push(self.packet(self.next_seq));
                self.next_seq += 1;
            } else {
                break;
            }
        }
        if self.next_seq == self.count
            && self.resend.is_empty()
            && self
                .last_done_sent
                .is_none_or(|t| now >= t + Duration::from_millis(50))
        {
            self.last_done_sent = Some(now);
            let mut d = vec![DONE];
            d.extend_from_slice(&self.count.to_be_bytes());
            out.push(d);
        }
        out
    }

    fn on_datagram(&mut self, d: &[u8]) {
        let now = Instant::now();
        match d.first() {
            Some(&DATA) if d.len() >= 5 && self.role == Role::Controlled => {
                let seq = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
                self.started.get_or_insert(now);
                let payload = &d[5..];
                let ok = u64::from(seq) * (PAYLOAD as u64) < self.bytes
                    && payload.len() == self.payload_len(seq)
                    && payload
                        .iter()
                        .enumerate()
                        .all(|(i, b)| *b == pattern(seq, i));
                if ok {
                    self.received.insert(seq);
                } else {
                    eprintln!("corrupt datagram seq {seq}");
                }
            }
            Some(&DONE) if self.role == Role::Controlled => {
                self.last_done_seen = Some(now);
                let missing: Vec<u32> = (0..self.count)
                    .filter(|s| !self.received.contains(s))
                    .take(256)
                    .collect();
                if missing.is_empty() {
                    if !self.complete {
                        self.complete = true;
                        self.done_at = Some(now);
                    }
                    self.complete_sent = Some(now);
                    self.replies.push(vec![COMPLETE]);
                } else {
                    let mut m = vec![NACK];
                    for s in missing {
                        m.extend_from_slice(&s.to_be_bytes());
                    }
                    self.replies.push(m);
                }
            }
            Some(&NACK) if self.role == Role::Controlling => {
                for c in d[1..].chunks_exact(4) {
                    let s = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                    if s < self.count && !self.resend.contains(&s) {
                        self.resend.push(s);
                    }
                }
                // why: a NACK answers one DONE; wait for the repairs before the next one.
                self.last_done_sent = Some(now);
            }
            Some(&COMPLETE) if self.role == Role::Controlling && !self.complete => {
                self.complete = true;
                self.done_at = Some(now);
            }
            _ => {}
        }
    }

    /// `(bytes, seconds)` once this side is done.
    fn finished(&self, now: Instant) -> Option<(u64, f64)> {
        let done = self.done_at?;
        let secs = done.duration_since(self.started?).as_secs_f64();
        match self.role {
            Role::Controlling => Some((self.bytes, secs)),
            // Linger so the sender sees COMPLETE even if one is lost.
            Role::Controlled => self
                .last_done_seen
                .is_some_and(|t| now >= t + Duration::from_millis(600))
                .then_some((self.bytes, secs)),
        }
    }
}

fn pattern(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(2_654_435_761)
        .wrapping_add(i as u32 * 40_503)
        >> 13) as u8
}
