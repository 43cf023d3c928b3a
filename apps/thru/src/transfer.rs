//! The hand-over to the data engine (`flux_peer::net`) once pairing is done.
//!
//! - A joiner calls [`run_transfer`]: one engine worker connects to the host's authenticated
//!   addresses (pinning the host's certificate and presenting its own), shows the offer and
//!   asks (name clashes included, per `--on-conflict`), and reports progress and the summary.
//! - A host starts one [`HostEngine`] for the whole session: one worker owns the advertised
//!   UDP socket and serves every joiner on its own QUIC connection; [`HostEngine::admit`] lets
//!   a joiner's certificate in once its pairing succeeded, and nobody else gets in.
//!
//! Through a signaling server both sides run ICE on the engine's socket: credentials come
//! from the pairing key ([`Paired::ice_credentials`]), candidates are trickled through the
//! server ([`Trickle`]), the host nominates (controlling) and the joiner connects QUIC over the
//! selected pair; the route (host, hole-punched or relayed, UDP/TCP/TLS) is reported as soon
//! as it is known and in the summary. On a LAN (no server) the joiner dials the host's
//! authenticated addresses directly.
//!
//! The engine runs on its own thread; this module only reads its events and sends commands
//! through channels. What it does not do: pairing, DNS beyond resolving the STUN/TURN names
//! once ([`resolve_ice_servers`]).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use flux_peer::disk::{ModePolicy, Resolutions};
use flux_peer::exec::DiskMode;
use flux_peer::ice::IceSetup;
use flux_peer::net::{self, Command, Control, Driver, NetConfig, NetError, NetEvent, NetReport};
use flux_peer::stack::QuicStack;
use flux_quic::{AllowList, Fingerprint, Identity, TransportParams};
use flux_transfer::{Event, LocalFile, Manifest};
use flux_wire::EntryKind;
use rand::RngCore;

use crate::cli::{Exit, OnConflict};
use crate::pairing::Paired;
use crate::rendezvous::Trickle;
use crate::ui::{
    self, Offer, OfferedFile, OfferedLink, Route, RoutePath, Summary, TransferProgress, Ui,
};

/// Which I/O driver the engine uses.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring (fails if unavailable).
    Uring,
    /// The portable epoll driver.
    Epoll,
}

/// Which QUIC stack to run (`--quic`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum QuicChoice {
    /// A host runs the default stack; a joiner takes the host's.
    #[default]
    Auto,
    /// quinn-proto.
    Quinn,
    /// s2n-quic.
    S2n,
}

impl QuicChoice {
    /// The stack `auto` means on a host.
    pub const DEFAULT: QuicStack = QuicStack::AUTO;

    /// The stack asked for; `None` for `auto`.
    pub fn stack(self) -> Option<QuicStack> {
        match self {
            Self::Auto => None,
            Self::Quinn => Some(QuicStack::Quinn),
            Self::S2n => Some(QuicStack::S2n),
        }
    }

    /// The stack a host runs.
    pub fn host(self) -> QuicStack {
        self.stack().unwrap_or(Self::DEFAULT)
    }
}

/// How files use the page cache (`--disk`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum DiskChoice {
    /// Measured per transfer: buffered where the page cache holds the data (reads) or can
    /// take it (writes), `O_DIRECT` otherwise; `-v` and `--benchmark` say what was picked and why.
    #[default]
    Auto,
    /// `O_DIRECT` wherever the filesystem allows it (io_uring driver).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// What this side does.
#[derive(Clone, Debug)]
pub enum Job {
    /// Host: offer these files and directories, or a text.
    Send {
        /// As given on the command line (checked to exist).
        paths: Vec<PathBuf>,
        /// `--text`: a short text sent instead of files (checked against the limit).
        text: Option<String>,
        /// `thru host -`: stdin is sent as one stream under this name (checked).
        stream: Option<String>,
    },
    /// Joiner: receive into `out`.
    Receive {
        /// Destination directory.
        out: PathBuf,
        /// Accept without asking (`--yes`).
        yes: bool,
        /// What to do with files that exist here with other content (`--on-conflict`).
        on_conflict: OnConflict,
        /// Keep the sender's permission bits (`--keep-modes`).
        keep_modes: bool,
        /// Claim files already held so the sender skips them (off with `--no-skip-identical`).
        skip_identical: bool,
        /// Only print the offer and leave (`--list`).
        browse: bool,
        /// What to receive (`--include`, `--exclude`).
        choice: crate::choose::Choice,
        /// Choose in the interactive picker (`--select`).
        select: bool,
        /// Sync files and directories before reporting done (`--durable`).
        durable: bool,
    },
}

/// Engine tuning from the flags.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// QUIC windows and stream limit.
    pub transport: TransportParams,
    /// `--chunk-size` (host), `None` = automatic.
    pub chunk_size: Option<u64>,
    /// `--parallel-files` (host), `None` = automatic.
    pub parallel_files: Option<u8>,
    /// `--io-driver`.
    pub io_driver: IoDriver,
    /// `--quic`: a host runs this stack; a joiner runs the one pairing agreed on.
    pub quic: QuicChoice,
    /// `--disk`.
    pub disk: DiskChoice,
    /// `--cores`, `None` = one per core.
    pub cores: Option<u16>,
    /// `--benchmark`.
    pub benchmark: bool,
    /// `--compress` (host).
    pub compress: flux_transfer::Compress,
    /// STUN and TURN servers for ICE (with a signaling server); `None` on a LAN.
    pub ice: Option<IceServers>,
}

/// STUN and TURN servers, resolved, and the TLS settings for `turns:` servers.
#[derive(Clone, Debug, Default)]
pub struct IceServers {
    /// STUN servers (IPv4: the engine's socket is IPv4).
    pub stun: Vec<SocketAddr>,
    /// TURN servers.
    pub turn: Vec<flux_ice::TurnServer>,
    /// Per TURN server, the name its TLS certificate must carry.
    pub turn_names: Vec<String>,
    /// TLS settings for `turns:` servers.
    pub turn_tls: Option<Arc<rustls::ClientConfig>>,
    /// Accept loopback candidates (a signaling server on loopback: single-machine use).
    pub allow_loopback: bool,
}

/// How long resolving one STUN/TURN name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Parses `--stun-server` and `--turn-server` and resolves their names. A malformed entry or
/// an unreadable `--turn-cert` is an error naming it; a name that does not resolve is skipped
/// with a warning (the defaults are public servers, unreachable on isolated networks).
pub async fn resolve_ice_servers(
    stun: &[String],
    turn: &[String],
    turn_cert: Option<&Path>,
    allow_loopback: bool,
) -> Result<IceServers, String> {
    let mut out = IceServers {
        allow_loopback,
        ..IceServers::default()
    };
    // Parse everything first (a typo is an error before any waiting), then resolve the
    // names concurrently.
    let mut stuns = Vec::new();
    for entry in stun.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (host, port) = parse_stun(entry)
            .ok_or_else(|| format!("--stun-server {entry:?}: expected stun:HOST[:PORT]"))?;
        stuns.push((entry.to_string(), tokio::spawn(resolve(host, port))));
    }
    let mut turns = Vec::new();
    for entry in turn.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let url: flux_ice::TurnUrl = entry.parse().map_err(|e| {
            // The password stays out of the message.
            format!(
                "--turn-server: {e} (form: turn:USER:PASS@HOST[:PORT][?transport=tcp] or \
                 turns:USER:PASS@HOST:443)"
            )
        })?;
        let lookup = tokio::spawn(resolve(url.host.clone(), url.port));
        turns.push((url, lookup));
    }
    for (entry, lookup) in stuns {
        match lookup.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(addr) => out.stun.push(addr),
            Err(e) => tracing::warn!("STUN server {entry}: {e}; skipping it"),
        }
    }
    for (url, lookup) in turns {
        match lookup.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(addr) => {
                out.turn.push(url.server(addr.ip()));
                out.turn_names.push(url.host.clone());
            }
            Err(e) => tracing::warn!("TURN server {}:{}: {e}; skipping it", url.host, url.port),
        }
    }
    let pinned = match turn_cert {
        Some(p) => Some(read_cert(p)?),
        None => None,
    };
    if out
        .turn
        .iter()
        .any(|t| t.transport == flux_ice::TurnTransport::Tls)
    {
        out.turn_tls = Some(flux_peer::ice::turn_tls_config(pinned)?);
    }
    Ok(out)
}

/// `stun:HOST[:PORT]` (or without the scheme) → host and port (3478 by default).
fn parse_stun(s: &str) -> Option<(String, u16)> {
    let s = s.strip_prefix("stun:").unwrap_or(s);
    if s.is_empty() || s.contains('@') || s.contains('/') || s.starts_with("stuns:") {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 3478,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_string(), 3478)),
    }
}

async fn resolve(host: String, port: u16) -> Result<SocketAddr, String> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((&*host, port)))
        .await
        .map_err(|_| format!("resolving {host} timed out"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    found
        .into_iter()
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{host} has no IPv4 address"))
}

/// A certificate file, PEM or DER.
fn read_cert(p: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(p).map_err(|e| format!("--turn-cert {}: {e}", p.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        rustls::pki_types::CertificateDer::from_pem_slice(&bytes)
            .map(|c| c.as_ref().to_vec())
            .map_err(|e| format!("--turn-cert {}: not a PEM certificate: {e}", p.display()))
    } else if bytes.first() == Some(&0x30) {
        Ok(bytes)
    } else {
        Err(format!(
            "--turn-cert {}: neither a PEM nor a DER certificate",
            p.display()
        ))
    }
}

/// ICE settings towards a paired peer.
fn ice_setup(paired: &Paired, servers: &IceServers, role: flux_ice::Role) -> IceSetup {
    let (ours, theirs) = paired.ice_credentials();
    let mut config = flux_ice::Config::new(role, ours, rand::rngs::OsRng.next_u64());
    config.stun_servers = servers.stun.clone();
    config.turn_servers = servers.turn.clone();
    config.allow_loopback = servers.allow_loopback;
    IceSetup {
        config,
        // The engine's socket is bound to 0.0.0.0: IPv4 only.
        hosts: paired
            .local_addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .copied()
            .collect(),
        remote_credentials: theirs,
        // The peer's interface addresses were authenticated in pairing: check them at once.
        remote_candidates: paired
            .peer_addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .enumerate()
            .map(|(i, a)| flux_peer::ice::host_candidate(*a, i))
            .collect(),
        turn_tls: servers.turn_tls.clone(),
        turn_names: servers.turn_names.clone(),
    }
}

/// Stops a joiner's transfer from another thread (Ctrl-C): the engine tells the host at once,
/// as a refusal while the prompt is up and as a cancellation after, instead of the host
/// finding out from QUIC's idle timeout half a minute later.
#[derive(Clone, Debug, Default)]
pub struct Stopper {
    inner: Arc<Mutex<StopperInner>>,
}

#[derive(Debug, Default)]
struct StopperInner {
    commands: Option<crossbeam_channel::Sender<Command>>,
    at_prompt: bool,
}

impl Stopper {
    /// Stops the transfer, if one is running.
    pub fn stop(&self) {
        let Ok(g) = self.inner.lock() else { return };
        if let Some(tx) = &g.commands {
            if g.at_prompt {
                let _ = tx.send(Command::Reject("the receiver stopped (Ctrl-C)".into()));
            }
            let _ = tx.send(Command::CancelWith("the receiver stopped (Ctrl-C)".into()));
        }
    }

    fn engine(&self, commands: &crossbeam_channel::Sender<Command>) {
        if let Ok(mut g) = self.inner.lock() {
            g.commands = Some(commands.clone());
        }
    }

    fn prompt(&self, up: bool) {
        if let Ok(mut g) = self.inner.lock() {
            g.at_prompt = up;
        }
    }
}

/// Everything but the peer; shared by all of a host's transfers.
#[derive(Debug)]
pub struct TransferJob {
    /// Send or receive.
    pub job: Job,
    /// The QUIC identity whose fingerprint was bound in pairing.
    pub identity: Arc<Identity>,
    /// The bound UDP socket whose port was advertised in pairing.
    pub socket: Arc<UdpSocket>,
    /// Tuning.
    pub tuning: Tuning,
    /// Joiner: how Ctrl-C reaches the engine.
    pub stopper: Stopper,
}

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The receiver declined.
    #[error("the receiver declined the files")]
    Refused,
    /// Host: the receiver declined, with its reason.
    #[error("the receiver declined: {0}")]
    Declined(String),
    /// A target exists, `--on-conflict ask`, and nobody to ask.
    #[error(
        "{path} already exists here; choose with --on-conflict skip|rename|overwrite (or --force)"
    )]
    Conflict {
        /// The file.
        path: PathBuf,
    },
    /// The destination has too little free space for the offer (and no `--yes`).
    #[error(transparent)]
    NoSpace(#[from] crate::space::Short),
    /// `--yes` was needed and not given (exit 2).
    #[error("no terminal to ask on; pass --yes")]
    NotATerminal,
    /// `--out -` and an offer of more than one file: refused before anything was written.
    #[error("{0}")]
    NotSingleFile(String),
    /// `--include`/`--exclude`/`--select` left nothing to receive.
    #[error(
        "nothing in the offer was chosen (--include, --exclude, --select); thru join --list shows it"
    )]
    NothingChosen,
    /// Anything else, with context (`transfer failed: control stream timeout`).
    #[error("transfer failed: {0}")]
    Failed(String),
}

impl TransferError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Refused | Self::Declined(_) | Self::NoSpace(_) | Self::NotSingleFile(_) => {
                Exit::Refused
            }
            Self::Conflict { .. } => Exit::Conflict,
            Self::NotATerminal | Self::NothingChosen => Exit::Usage,
            Self::Failed(_) => Exit::TransferFailed,
        }
    }
}

impl IoDriver {
    fn driver(self) -> Driver {
        match self {
            Self::Auto => Driver::auto(),
            Self::Uring => Driver::Uring,
            Self::Epoll => Driver::Epoll,
        }
    }
}

fn net_config(job: &TransferJob) -> NetConfig {
    let t = &job.tuning;
    if t.cores.is_some_and(|c| c > 1) {
        tracing::warn!(
            "--cores: the engine runs one data worker per process for now; using 1 \
             (sharding a transfer across cores is not implemented yet)"
        );
    }
    let mut cfg = NetConfig {
        driver: t.io_driver.driver(),
        disk: match t.disk {
            DiskChoice::Auto => DiskMode::Auto,
            DiskChoice::Direct => DiskMode::Direct,
            DiskChoice::Buffered => DiskMode::Buffered,
        },
        transport: t.transport.clone(),
        quic: t.quic.host(),
        ..NetConfig::default()
    };
    if let Some(p) = t.parallel_files {
        cfg.sender.parallel_files = u16::from(p);
    }
    cfg.sender.compress = t.compress;
    cfg
}

fn engine_socket(job: &TransferJob) -> Result<flux_udp::UdpSocket, TransferError> {
    // The engine gets its own descriptor of the advertised socket; the original stays idle.
    let std = job
        .socket
        .try_clone()
        .map_err(|e| TransferError::Failed(format!("UDP socket: {e}")))?;
    flux_udp::UdpSocket::from_std(std, &flux_udp::SocketConfig::default())
        .map_err(|e| TransferError::Failed(format!("UDP socket: {e}")))
}

/// Engine failures in the reference's words.
fn failed(context: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Failed(format!("{context}: {e}"))
}

/// Per-file progress, started lazily so a tree of 10,000 files shows only the files in flight.
///
/// The receiver learns that a file is done from the engine (`FileComplete`, `FileSkipped`);
/// the sender is told nothing per file, so it counts a file done once all its bytes were sent
/// or found held, and the rest (empty files) when the transfer succeeds.
struct Files {
    manifest: Arc<Manifest>,
    /// Files started, and whether each is done.
    started: HashMap<u32, bool>,
    progress: TransferProgress,
    sender: bool,
    /// The entries the receiver chose (`None`: all).
    chosen: Option<std::collections::BTreeSet<u32>>,
}

impl Files {
    fn new(manifest: Arc<Manifest>, progress: TransferProgress, sender: bool) -> Self {
        Self {
            manifest,
            started: HashMap::new(),
            progress,
            sender,
            chosen: None,
        }
    }

    fn start(&mut self, file: u32) -> bool {
        let Some(e) = self.manifest.entry(file) else {
            return false;
        };
        if !e.kind.has_data() {
            return false;
        }
        let progress = &self.progress;
        let done = *self.started.entry(file).or_insert_with(|| {
            progress.file_started(u64::from(file), &e.path, e.size);
            false
        });
        !done
    }

    /// `len` bytes of `file` crossed the network, as `wire` bytes of payload.
    fn sent(&mut self, file: u32, len: u64, wire: u64) {
        self.progress.wire(wire);
        if self.start(file) {
            let stream = self.manifest.stream() == Some(file);
            if stream {
                // A stream's size is learned as it goes: its total grows with what arrives.
                self.progress.grow(u64::from(file), len);
            }
            self.progress.sent(u64::from(file), len);
            if !stream {
                self.sender_check(file, false);
            }
        }
    }

    /// Sender: the receiver already holds `bytes` of `file` (a checked resume claim).
    fn held(&mut self, file: u32, bytes: u64) {
        if self.start(file) {
            self.progress.held(u64::from(file), bytes);
            let whole = self
                .progress
                .file_bytes(u64::from(file))
                .is_some_and(|(done, total)| done == total);
            self.sender_check(file, whole);
        }
    }

    /// Sender: `file` is done once every byte is accounted for.
    fn sender_check(&mut self, file: u32, up_to_date: bool) {
        if !self.sender {
            return;
        }
        if let Some((done, total)) = self.progress.file_bytes(u64::from(file))
            && done >= total
            && total > 0
        {
            self.complete(file, up_to_date);
        }
    }

    /// `file` is complete; `up_to_date` when the receiver had it identical already.
    fn complete(&mut self, file: u32, up_to_date: bool) {
        if self.start(file) {
            self.started.insert(file, true);
            self.progress.file_done(u64::from(file), up_to_date);
        }
    }

    /// Sender, after success: every file arrived, the empty ones included.
    fn complete_all(&mut self) {
        let files: Vec<u32> = (0..self.manifest.entries().len())
            .filter_map(|i| u32::try_from(i).ok())
            .filter(|i| self.chosen.as_ref().is_none_or(|c| c.contains(i)))
            .collect();
        for file in files {
            self.complete(file, false);
        }
    }
}

/// `--benchmark` figures of one transfer.
#[derive(Debug, Default)]
struct Bench {
    /// The QUIC stack the transfer ran on.
    quic: QuicStack,
    start: Option<Instant>,
    connected: Option<Duration>,
    first_byte: Option<Duration>,
    seconds: Vec<u64>,
    bytes: u64,
    wire: u64,
}

impl Bench {
    fn chunk(&mut self, at: Instant, len: u64, wire: u64) {
        self.wire += wire;
        let Some(start) = self.start else { return };
        let t = at.saturating_duration_since(start);
        self.first_byte.get_or_insert(t);
        let s = t.as_secs() as usize;
        if self.seconds.len() <= s {
            self.seconds.resize(s + 1, 0);
        }
        self.seconds[s] += len;
        self.bytes += len;
    }

    fn report(
        &self,
        ui: &Ui,
        peer: &str,
        side: ui::Side,
        rep: Option<&net::ConnReport>,
        secs: f64,
        disk: Option<String>,
    ) {
        let path = rep.and_then(path_of);
        let avg = self.bytes as f64 * 8.0 / secs.max(1e-9) / 1e9;
        // A transfer shorter than a second has no full one-second window: its average is its
        // peak, and the peak is never reported below the average.
        let peak = (self.seconds.iter().copied().max().unwrap_or(0) as f64 * 8.0 / 1e9).max(avg);
        let cpu = cpu_seconds();
        let (rtt, loss) = rep.map_or((None, None), |r| {
            let loss =
                (r.packets_sent > 0).then(|| r.packets_lost as f64 * 100.0 / r.packets_sent as f64);
            (Some(r.rtt.as_secs_f64() * 1e3), loss)
        });
        ui.emit(&ui::Event::Benchmark {
            peer: peer.to_string(),
            side,
            bytes: self.bytes,
            wire_bytes: self.wire,
            avg_gbit_s: avg,
            peak_1s_gbit_s: peak,
            connect_ms: self.connected.map(|d| d.as_secs_f64() * 1e3),
            first_byte_ms: self.first_byte.map(|d| d.as_secs_f64() * 1e3),
            rtt_ms: rtt,
            loss_pct: loss,
            cpu_s: cpu,
            quic: self.quic.name(),
            path,
            disk,
        });
    }
}

/// The ICE pair a connection ran on, for reports.
fn path_of(r: &net::ConnReport) -> Option<RoutePath> {
    Some(RoutePath::new(&r.route?, r.ice_connect.unwrap_or_default()))
}

/// The route of a finished connection: from ICE when it chose, else a LAN dial.
fn route_of(r: Option<&net::ConnReport>) -> (Route, Option<RoutePath>) {
    match r.and_then(|r| r.route.map(|s| (s, r))) {
        Some((s, r)) => (Route::of(s.kind), path_of(r)),
        None => (Route::LanDirect, None),
    }
}

/// User + system CPU seconds of this process (`/proc/self/stat`).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Receives from a paired host: through ICE when pairing went through a signaling server
/// (`trickle` carries the candidates), else by dialing its LAN addresses. Blocking; call it
/// off the async runtime.
pub fn run_transfer(
    paired: Paired,
    trickle: Option<Trickle>,
    job: &TransferJob,
    ui: &Ui,
) -> Result<Option<Summary>, TransferError> {
    let Job::Receive {
        out,
        yes,
        on_conflict,
        keep_modes,
        skip_identical,
        browse,
        choice,
        select,
        durable,
    } = &job.job
    else {
        return Err(TransferError::Failed(
            "run_transfer receives; a host serves through HostEngine".into(),
        ));
    };
    let pipe = is_stdout(out);
    if !pipe && !*browse {
        std::fs::create_dir_all(out)
            .map_err(|e| failed(&format!("cannot create {}", out.display()), e))?;
    }
    let mut cfg = net_config(job);
    cfg.quic = paired.quic;
    cfg.auto_accept = false;
    cfg.pipe = pipe;
    // Chosen up front, the engine replaces files itself (atomically, file by file); chosen in
    // the prompt, the answers go with the acceptance (`Resolutions`): nothing here is moved.
    cfg.receiver.overwrite = *on_conflict == OnConflict::Overwrite;
    cfg.modes = if *keep_modes {
        ModePolicy::Keep
    } else {
        ModePolicy::Safe
    };
    cfg.receiver.skip_identical = *skip_identical;
    cfg.durable = *durable;
    cfg.client_identity = Some(job.identity.clone());
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.browse = *browse;
    let mut rx = Receiving {
        out: out.clone(),
        yes: *yes,
        policy: *on_conflict,
        browse: *browse,
        choice: choice.clone(),
        select: *select,
        chosen: None,
        resolved: Resolutions::default(),
    };
    receive(paired, trickle, job, &cfg, &mut rx, ui)
}

fn receive(
    paired: Paired,
    trickle: Option<Trickle>,
    job: &TransferJob,
    cfg: &NetConfig,
    rx: &mut Receiving,
    ui: &Ui,
) -> Result<Option<Summary>, TransferError> {
    if let (Some(trickle), Some(servers)) = (trickle, &job.tuning.ice) {
        let setup = ice_setup(&paired, servers, flux_ice::Role::Controlled);
        let start = Start::Ice(Box::new(setup), trickle);
        return receive_from(start, &paired, job, cfg, rx, ui)?;
    }
    let mut last_err = None;
    // Most promising address first; a few at most, so a wrong one costs seconds, not minutes.
    for addr in paired.peer_addrs.iter().take(4) {
        match receive_from(Start::Dial(*addr), &paired, job, cfg, rx, ui)? {
            Ok(summary) => return Ok(summary),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| TransferError::Failed("the host advertised no address".into())))
}

/// The receiver's choices, kept across connection attempts.
struct Receiving {
    out: PathBuf,
    yes: bool,
    policy: OnConflict,
    /// `--list`: show the offer, receive nothing.
    browse: bool,
    choice: crate::choose::Choice,
    select: bool,
    /// The entries chosen (`None`: all).
    chosen: Option<std::collections::BTreeSet<u32>>,
    /// The answers for clashing files, sent with the acceptance.
    resolved: Resolutions,
}

/// `name (k).ext` beside `path`: `report.pdf` → `report (1).pdf`, `notes` → `notes (1)`.
pub fn numbered(path: &Path, k: u32) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) if !stem.is_empty() => format!("{stem} ({k}).{}", ext.to_string_lossy()),
        _ => format!(
            "{} ({k})",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
    };
    path.with_file_name(name)
}

/// The first `candidate(k)`, k = 1, 2, …, where nothing exists.
fn free_name(path: &Path, candidate: impl Fn(u32) -> PathBuf) -> PathBuf {
    (1..)
        .map(candidate)
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| path.to_path_buf())
}

/// How the joiner reaches the host.
enum Start {
    /// Dial this address.
    Dial(SocketAddr),
    /// ICE, with candidates through the signaling server.
    Ice(Box<IceSetup>, Trickle),
}

/// One attempt: `Ok(Err(_))` means the host could not be reached there (try the next
/// address); `Err(_)` is final.
#[allow(clippy::too_many_arguments)]
fn receive_from(
    start: Start,
    paired: &Paired,
    job: &TransferJob,
    cfg: &NetConfig,
    rx: &mut Receiving,
    ui: &Ui,
) -> Result<Result<Option<Summary>, TransferError>, TransferError> {
    let out = rx.out.clone();
    let socket = engine_socket(job)?;
    let (control, events, commands) = Control::channels();
    job.stopper.engine(&commands);
    let fp = paired.peer_fingerprint;
    let (cfg2, out2) = (cfg.clone(), out.clone());
    type Worker = JoinHandle<Result<NetReport, flux_transfer::TransferError>>;
    let (target, worker, mut trickle): (String, Worker, Option<Trickle>) = match start {
        Start::Dial(addr) => (
            format!("the host at {addr}"),
            std::thread::spawn(move || net::join(socket, addr, fp, out2, &cfg2, control)),
            None,
        ),
        Start::Ice(setup, t) => (
            "the host".into(),
            std::thread::spawn(move || net::join_ice(socket, *setup, fp, out2, &cfg2, control)),
            Some(t),
        ),
    };
    let mut bench = Bench {
        quic: cfg.quic,
        start: Some(Instant::now()),
        ..Bench::default()
    };
    let mut connected = false;
    let mut files: Option<Files> = None;
    // `thru host --text`: the text, once accepted; printed when the transfer succeeded.
    let mut shown_text: Option<Arc<str>> = None;
    let mut verdict: Option<TransferError> = None;
    let mut ended: Option<(Option<NetError>, net::ConnReport)> = None;
    let mut ice_failed: Option<String> = None;
    let mut listed = false;
    // On a terminal, during the transfer: `p` pauses and resumes.
    let mut keys: Option<Keys> = None;
    let mut paused = false;
    // Through thruserv: the server said the host left (since when).
    let mut host_gone = false;
    let mut gone_at: Option<Instant> = None;
    // Without ICE the joiner dials the host's LAN address.
    let mut shown_route = Route::LanDirect;
    loop {
        // The host's trickled candidates, into the engine.
        if let Some(t) = trickle.as_mut() {
            while let Ok(candidate) = t.from_peer.try_recv() {
                let _ = commands.send(Command::RemoteCandidate { link: 0, candidate });
            }
            if t.host_gone.load(std::sync::atomic::Ordering::Relaxed) && ended.is_none() {
                // The host's own last words (a Ctrl-C) may be on their way: a moment for
                // them, then stop rather than wait for QUIC to time out.
                let at = *gone_at.get_or_insert_with(Instant::now);
                if at.elapsed() > HOST_GONE_GRACE && !host_gone {
                    host_gone = true;
                    let _ = commands.send(Command::Cancel);
                }
            }
        }
        if let Some(k) = &keys {
            while let Ok(key) = k.pressed.try_recv() {
                if key.eq_ignore_ascii_case(&b'p') {
                    paused = !paused;
                    let _ = commands.send(Command::Pause(paused));
                }
            }
        }
        let ev = match events.recv_timeout(TRICKLE_POLL) {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        match ev {
            NetEvent::LocalCandidate { candidate, .. } => {
                if let Some(t) = &trickle {
                    let _ = t.to_peer.send(candidate);
                }
            }
            NetEvent::Route { route, after, .. } => {
                let r = Route::of(route.kind);
                ui.route(&paired.peer_label, &RoutePath::new(&route, after), r);
                shown_route = r;
                if let Some(f) = &files {
                    f.progress.set_route(r);
                }
            }
            NetEvent::IceFailed { error, .. } => ice_failed = Some(error),
            NetEvent::Connected { at, .. } => {
                connected = true;
                bench.connected = bench.start.map(|s| at.saturating_duration_since(s));
            }
            NetEvent::Offer {
                text: Some(text), ..
            } => {
                job.stopper.prompt(true);
                let decision = ui.confirm_text(text.len() as u64, rx.yes);
                job.stopper.prompt(false);
                match decision {
                    Ok(true) => {
                        let _ = commands.send(Command::Accept);
                        shown_text = Some(text);
                        bench.start = Some(Instant::now());
                    }
                    Ok(false) => {
                        let _ = commands.send(Command::Reject("the user answered no".into()));
                        verdict = Some(TransferError::Refused);
                    }
                    Err(e) => {
                        let _ =
                            commands.send(Command::Reject("the receiver could not accept".into()));
                        verdict = Some(match e {
                            ui::PromptError::NotATerminal => TransferError::NotATerminal,
                            _ => TransferError::Refused,
                        });
                    }
                }
            }
            NetEvent::Offer {
                manifest,
                mut local,
                text: None,
            } => {
                if rx.browse {
                    ui.listing(&manifest, &crate::choose::tree(&manifest));
                    listed = true;
                    continue;
                }
                job.stopper.prompt(true);
                let chosen = choose(&manifest, rx);
                job.stopper.prompt(false);
                let chosen = match chosen {
                    Ok(c) => c,
                    Err(e) => {
                        // Nothing is received, and the host keeps the slot for another try.
                        let _ = commands.send(Command::Leave);
                        verdict = Some(e);
                        continue;
                    }
                };
                if let Some(c) = &chosen {
                    let kept: HashMap<u32, LocalFile> = local
                        .iter()
                        .filter(|(i, _)| c.contains(i))
                        .map(|(i, l)| (*i, l.clone()))
                        .collect();
                    local = Arc::new(kept);
                }
                rx.chosen = chosen;
                if !cfg.receiver.skip_identical {
                    // As the receiver will count them at accept: held files are conflicts.
                    let unskipped: HashMap<u32, LocalFile> = local
                        .iter()
                        .filter_map(|(i, l)| l.clone().unskipped().map(|l| (*i, l)))
                        .collect();
                    local = Arc::new(unskipped);
                }
                job.stopper.prompt(true);
                let decision = decide(&manifest, &local, rx, ui);
                job.stopper.prompt(false);
                match decision {
                    Ok(()) => {
                        let (n, bytes) = match &rx.chosen {
                            Some(c) => {
                                let _ = commands.send(Command::AcceptChosen {
                                    resolved: rx.resolved.clone(),
                                    chosen: c.clone(),
                                });
                                crate::choose::counts(&manifest, c)
                            }
                            None => {
                                let _ = commands.send(Command::AcceptResolved(rx.resolved.clone()));
                                (manifest.file_count() as u64, manifest.total_bytes())
                            }
                        };
                        let progress =
                            ui.transfer(&paired.peer_label, ui::Side::Receiving, n, bytes);
                        progress.set_route(shown_route);
                        progress.set_left_out(manifest.file_count() as u64 - n);
                        let mut f = Files::new(manifest, progress, false);
                        f.chosen.clone_from(&rx.chosen);
                        files = Some(f);
                        if ui.mode() != ui::Mode::Json {
                            keys = Keys::start();
                            if keys.is_some() {
                                ui.say("Press p to pause and resume");
                            }
                        }
                        bench.start = Some(Instant::now());
                    }
                    Err(e) => {
                        let reason = match &e {
                            TransferError::Conflict { path } => {
                                format!("{} already exists at the receiver", path.display())
                            }
                            TransferError::NoSpace(_) => {
                                "not enough free space at the receiver".into()
                            }
                            TransferError::Refused => "the user answered no".into(),
                            _ => "the receiver could not accept".into(),
                        };
                        let _ = commands.send(Command::Reject(reason));
                        verdict = Some(e);
                    }
                }
            }
            NetEvent::Transfer { event, at, .. } => match (event, files.as_mut()) {
                (
                    Event::ChunkVerified {
                        file, len, wire, ..
                    },
                    Some(f),
                ) => {
                    f.sent(file, u64::from(len), u64::from(wire));
                    bench.chunk(at, u64::from(len), u64::from(wire));
                }
                (Event::FileComplete { file }, Some(f)) => f.complete(file, false),
                (Event::FileSkipped { file }, Some(f)) => f.complete(file, true),
                (Event::Paused(p), Some(f)) => f.progress.paused(p),
                (Event::Paused(p), None) => ui.pause(&paired.peer_label, p, true),
                _ => {}
            },
            NetEvent::Ended { error, stats, .. } => ended = Some((error, *stats)),
        }
    }
    // The terminal back as it was, before any final message.
    drop(keys);
    let report = worker
        .join()
        .map_err(|_| TransferError::Failed("the engine thread panicked".into()))?
        .map_err(|e| failed("transfer failed", e))?;
    if let Some(v) = verdict {
        return Err(v);
    }
    let error = ended
        .as_ref()
        .and_then(|(e, _)| e.clone())
        .or(report.error.clone());
    if let Some(e) = error {
        if let NetError::Refused(r) = &e {
            // This side refused a share of several files for `--out -`.
            return Err(TransferError::NotSingleFile(r.clone()));
        }
        if let Some(ice) = ice_failed {
            // ICE's own words: `failed to establish ICE connection: …`.
            return Err(TransferError::Failed(ice));
        }
        if !connected {
            return Ok(Err(failed(&format!("cannot reach {target}"), e)));
        }
        let kept = files.as_ref().map(|f| f.progress.done_bytes());
        // A stream (`thru host -`) is read once: nothing to resume.
        let stream = files
            .as_ref()
            .is_some_and(|f| f.manifest.stream().is_some());
        if host_gone {
            return Err(TransferError::Failed(format!(
                "the host is no longer online (it left the signaling server); {}",
                joiner_resume(kept, stream)
            )));
        }
        if let Some(f) = &files {
            f.progress.abandon();
        }
        return Err(TransferError::Failed(explain_end(&e, true, kept, stream)));
    }
    if listed {
        return Ok(Ok(None));
    }
    if let Some(text) = shown_text {
        ui.show_text(&paired.peer_label, &text);
        let (route, path) = route_of(ended.as_ref().map(|(_, s)| s));
        let bytes = text.len() as u64;
        return Ok(Ok(Some(Summary {
            peer: paired.peer_label.clone(),
            side: ui::Side::Receiving,
            files: 0,
            up_to_date: 0,
            bytes,
            sent_bytes: bytes,
            wire_bytes: bytes,
            resumed_bytes: 0,
            seconds: bench.start.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            route,
            path,
            synced_seconds: None,
            left_out: 0,
        })));
    }
    let Some(f) = files else {
        return Err(TransferError::Failed(
            "the host ended before offering anything".into(),
        ));
    };
    let (route, path) = route_of(ended.as_ref().map(|(_, s)| s));
    let synced = report.sync_time.map(|d| d.as_secs_f64());
    let summary = f.progress.finish(route, path, synced);
    if job.tuning.benchmark {
        bench.report(
            ui,
            &paired.peer_label,
            ui::Side::Receiving,
            ended.as_ref().map(|(_, s)| s),
            summary.seconds,
            report.disk_choice.describe(),
        );
    }
    Ok(Ok(Some(summary)))
}

/// Whether `--out` names stdout (`-`).
pub fn is_stdout(out: &Path) -> bool {
    out.as_os_str() == "-"
}

/// What to receive of `manifest`: `--include`/`--exclude`, then the `--select` picker.
/// `None`: everything. An empty choice is an error (nothing would be received).
fn choose(
    manifest: &Manifest,
    rx: &Receiving,
) -> Result<Option<std::collections::BTreeSet<u32>>, TransferError> {
    if rx.choice.is_all() && !rx.select {
        return Ok(None);
    }
    let mut chosen = rx.choice.chosen(manifest);
    if rx.select {
        use std::io::IsTerminal as _;
        if !std::io::stdin().is_terminal() {
            return Err(TransferError::NotATerminal);
        }
        chosen = match crate::choose::pick(manifest, &chosen) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(TransferError::Refused),
            Err(e) => return Err(TransferError::Failed(e)),
        };
    }
    let (files, _) = crate::choose::counts(manifest, &chosen);
    if files == 0 && chosen.len() < manifest.len() {
        return Err(TransferError::NothingChosen);
    }
    Ok((chosen.len() < manifest.len()).then_some(chosen))
}

/// Single keys from the terminal while a transfer runs (`p`: pause/resume): the terminal is
/// put in non-canonical mode without echo (Ctrl-C still works) and put back on drop.
struct Keys {
    pressed: crossbeam_channel::Receiver<u8>,
    saved: rustix::termios::Termios,
}

impl Keys {
    /// `None` when stdin is not a terminal.
    fn start() -> Option<Self> {
        use rustix::termios::{
            LocalModes, OptionalActions, SpecialCodeIndex, tcgetattr, tcsetattr,
        };
        use std::io::{IsTerminal as _, Read as _};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.local_modes &= !(LocalModes::ICANON | LocalModes::ECHO);
        raw.special_codes[SpecialCodeIndex::VMIN] = 1;
        raw.special_codes[SpecialCodeIndex::VTIME] = 0;
        tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        let (tx, pressed) = crossbeam_channel::unbounded();
        // Blocks in read until a key comes; left behind when the transfer ends (the process
        // ends soon after).
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while matches!(std::io::stdin().read(&mut b), Ok(1)) {
                if tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
        Some(Self { pressed, saved })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// How long a joiner waits, once the server said its host left, for the host's own reason
/// before it stops the transfer.
const HOST_GONE_GRACE: Duration = Duration::from_millis(300);

/// Longest wait for engine events before looking at the trickled candidates again.
const TRICKLE_POLL: Duration = Duration::from_millis(5);

/// Shows the offer and asks, name clashes included (`--on-conflict`); refuses an offer larger
/// than the free space at `out` unless `yes` (then it warns). On acceptance, clashing files
/// the user chose to skip, rename or overwrite (in the prompt) are moved aside.
fn decide(
    manifest: &Manifest,
    local: &HashMap<u32, LocalFile>,
    rx: &mut Receiving,
    ui: &Ui,
) -> Result<(), TransferError> {
    let (out, yes) = (rx.out.as_path(), rx.yes);
    let wanted = |i: usize| rx.chosen.as_ref().is_none_or(|c| c.contains(&(i as u32)));
    let unwanted: u64 = (0..manifest.len())
        .filter(|&i| !wanted(i))
        .filter_map(|i| manifest.entry(i as u32))
        .map(|e| e.size)
        .sum();
    let needed = crate::space::still_needed(manifest, local).saturating_sub(unwanted);
    match crate::space::free_bytes(out) {
        // A pipe has no free space to check.
        _ if is_stdout(out) => {}
        Ok(free) => {
            // A shortfall refuses even with --yes: the writes would fail part-way, after
            // the code is used and the bytes are sent.
            if let Some(warning) = crate::space::decide(needed, free, out, false)? {
                tracing::warn!(%warning, "accepting with --yes regardless");
                ui.say(&format!("thru: warning: {warning}"));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the free space at the destination"),
    }
    let all = manifest.entries();
    let entries: Vec<&flux_wire::Entry> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| wanted(*i))
        .map(|(_, e)| e)
        .collect();
    let left_out = (0..all.len())
        .filter(|&i| !wanted(i) && all[i].kind.has_data())
        .count();
    let mut replaces: Vec<(u32, String)> = local
        .iter()
        .filter(|(_, l)| matches!(l, LocalFile::Conflict))
        .filter_map(|(i, _)| Some((*i, all.get(*i as usize)?.path.clone())))
        .collect();
    replaces.sort_unstable();
    let clashes = &replaces;
    let offer = Offer {
        stream: entries.iter().any(|e| e.kind == EntryKind::Stream),
        files: entries
            .iter()
            .filter(|e| e.kind.has_data())
            .map(|e| OfferedFile {
                name: e.path.clone(),
                size: e.size,
                mode: e.mode,
            })
            .collect(),
        links: entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| OfferedLink {
                name: e.path.clone(),
                target: e.link_target.clone(),
            })
            .collect(),
        dirs: entries.iter().filter(|e| e.kind == EntryKind::Dir).count(),
        destination: if is_stdout(out) {
            "stdout".into()
        } else {
            std::fs::canonicalize(out)
                .unwrap_or_else(|_| out.to_path_buf())
                .display()
                .to_string()
        },
        replaces: replaces.iter().map(|(_, p)| p.clone()).collect(),
        same_size_here: local
            .values()
            .filter(|l| matches!(l, LocalFile::Existing(_)))
            .count(),
        entries: entries
            .iter()
            .map(|e| ui::OfferEntry {
                path: e.path.clone(),
                size: e.size,
                kind: match e.kind {
                    EntryKind::File => "file",
                    EntryKind::Dir => "dir",
                    EntryKind::Symlink => "symlink",
                    EntryKind::Stream => "stream",
                },
            })
            .collect(),
        left_out,
    };
    let answer = match ui.confirm_offer(&offer, yes, false, rx.policy) {
        Ok(Some(a)) => a,
        Ok(None) => return Err(TransferError::Refused),
        Err(ui::PromptError::Conflict(path)) => {
            return Err(TransferError::Conflict {
                path: PathBuf::from(path),
            });
        }
        Err(ui::PromptError::NotATerminal) => return Err(TransferError::NotATerminal),
        Err(e) => {
            tracing::warn!(error = %e, "no answer to the offer");
            return Err(TransferError::Refused);
        }
    };
    // The engine replaces files itself when told up front (`--force`); otherwise each clash
    // gets the user's answer, applied by the engine as the file arrives: left out, saved
    // under a free `name (k).ext`, or put in place of what is here. What is here is never
    // moved, so an interrupted transfer leaves it as it was.
    rx.resolved = Resolutions::default();
    if rx.policy != OnConflict::Overwrite {
        for ((i, name), how) in clashes.iter().zip(answer) {
            match how {
                ui::Resolve::Skip => {
                    rx.resolved.skip.insert(*i);
                }
                ui::Resolve::Overwrite => {
                    rx.resolved.replace.insert(*i);
                }
                ui::Resolve::Rename => {
                    let path = name.split('/').fold(out.to_path_buf(), |p, c| p.join(c));
                    let new = free_name(&path, |k| numbered(&path, k));
                    let new_name = new.file_name().unwrap_or_default().to_string_lossy();
                    ui.say(&format!(
                        "Saving {} as {}",
                        ui::safe_text(name),
                        new.display()
                    ));
                    rx.resolved.rename.insert(*i, new_name.into_owned());
                }
            }
        }
    }
    Ok(())
}

/// The share of `thru host -`: one stream entry named `name`, read from stdin by the engine.
/// Its size is unknown, so the chunk size is the one given or that of a 4 GiB file (512 KiB).
fn stream_manifest(name: &str, chunk: Option<u32>) -> Result<Manifest, TransferError> {
    let now = flux_peer::disk::to_timestamp(std::time::SystemTime::now());
    let entry = flux_wire::Entry {
        path: name.to_owned(),
        kind: EntryKind::Stream,
        size: 0,
        mtime: now,
        mode: 0o644,
        link_target: String::new(),
    };
    let chunk = chunk.unwrap_or(flux_transfer::manifest::auto_chunk_size(4 << 30));
    Manifest::new(vec![entry], chunk).map_err(|e| failed("stream share", e))
}

/// How a joiner whose transfer broke off goes on: what it keeps and `thru join` again, or,
/// for a stream (`thru host -`, read once), that the sender has to run it again.
fn joiner_resume(kept: Option<u64>, stream: bool) -> String {
    if stream {
        return "this was a stream (`thru host -`), which cannot be resumed: the sender has to \
                run it again"
            .into();
    }
    let kept = kept.map_or(String::new(), |b| {
        format!("{} kept here; ", indicatif::HumanBytes(b))
    });
    format!("{kept}run `thru join` again with the host's new code to resume")
}

/// A lost connection or a stop by the peer, said from this side: who went away, what is
/// kept, and how to resume. `peer_is_host` on the joiner; `kept` is what the joiner holds.
fn explain_end(e: &NetError, peer_is_host: bool, kept: Option<u64>, stream: bool) -> String {
    let who = if peer_is_host {
        "the host"
    } else {
        "the receiver"
    };
    let resume = if peer_is_host {
        joiner_resume(kept, stream)
    } else {
        "it can run `thru join …` again to resume".to_string()
    };
    if let Some(reason) = e.peer_stopped() {
        // The peer's own words (`the receiver stopped (Ctrl-C); 12.0 MiB kept`).
        return format!("{}; {resume}", ui::safe_text(reason));
    }
    if let NetError::PeerGone { idle } = e {
        let idle = idle.as_secs_f64();
        return format!("{who} went away (nothing heard from it for {idle:.0} s); {resume}");
    }
    if stream {
        // Any other end of a stream: still say it cannot be resumed.
        return format!("{e}; {resume}");
    }
    e.to_string()
}

/// The receiver's reason when engine error `e` is its refusal of the offer.
fn declined(e: &NetError) -> Option<TransferError> {
    Some(TransferError::Declined(ui::safe_text(e.declined()?)))
}

/// What the host side learns as its engine serves joiners.
#[derive(Debug)]
pub enum HostNote {
    /// A joiner's QUIC connection was established (its certificate is this fingerprint).
    Connected {
        /// The joiner's certificate fingerprint.
        fingerprint: Fingerprint,
    },
    /// A joiner only looked at the offer (`thru join --list`) and left: its receiver slot is
    /// free again.
    Browsed {
        /// The joiner's label.
        peer: String,
    },
    /// A joiner's transfer ended.
    Ended {
        /// The joiner's label.
        peer: String,
        /// The outcome.
        result: Box<Result<Summary, TransferError>>,
    },
}

/// The host's engine: one worker serving every admitted joiner on the advertised socket.
pub struct HostEngine {
    allowed: Arc<AllowList>,
    labels: Arc<std::sync::Mutex<HashMap<Fingerprint, String>>>,
    /// ICE links: the joiner's label and its candidate channel, by link number.
    links: Arc<Mutex<HashMap<u64, HostLink>>>,
    next_link: std::sync::atomic::AtomicU64,
    /// A link already holds the socket's TURN allocations over UDP.
    udp_turn_taken: std::sync::atomic::AtomicBool,
    ice: Option<IceServers>,
    commands: crossbeam_channel::Sender<Command>,
    worker: Option<JoinHandle<Result<NetReport, flux_transfer::TransferError>>>,
    events: Option<JoinHandle<()>>,
    /// Files and bytes offered.
    offered: (u64, u64),
}

impl std::fmt::Debug for HostEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEngine").finish_non_exhaustive()
    }
}

impl HostEngine {
    /// Scans the shared paths and starts serving; `notes` receives each joiner's outcome.
    pub fn start(
        job: &TransferJob,
        max_receivers: usize,
        ui: &Ui,
        notes: tokio::sync::mpsc::UnboundedSender<HostNote>,
    ) -> Result<Self, TransferError> {
        let Job::Send {
            paths,
            text,
            stream,
        } = &job.job
        else {
            return Err(TransferError::Failed(
                "HostEngine sends; use run_transfer to receive".into(),
            ));
        };
        let chunk = job
            .tuning
            .chunk_size
            .map(|c| u32::try_from(c).unwrap_or(u32::MAX));
        let share = match (text, stream) {
            // A text travels before an empty manifest: the rest of the exchange (accept,
            // complete, close) is that of an empty share.
            (Some(_), _) => flux_peer::scan::Share {
                manifest: Manifest::new(Vec::new(), flux_transfer::manifest::auto_chunk_size(0))
                    .map_err(|e| failed("empty share", e))?,
                sources: Vec::new(),
            },
            (None, Some(name)) => flux_peer::scan::Share {
                manifest: stream_manifest(name, chunk)?,
                sources: vec![None],
            },
            (None, None) => flux_peer::scan::scan(paths, chunk)
                .map_err(|e| failed("snapshot sender failed", e))?,
        };
        let manifest = Arc::new(share.manifest);
        let offered = (manifest.file_count() as u64, manifest.total_bytes());
        let allowed = Arc::new(AllowList::new());
        let mut cfg = net_config(job);
        cfg.sender.text = text.as_deref().map(Arc::from);
        let text_len = text.as_ref().map(|t| t.len() as u64);
        cfg.allowed_joiners = Some(allowed.clone());
        cfg.max_receivers = max_receivers.max(1);
        cfg.serve = None;
        let socket = engine_socket(job)?;
        let (control, events, commands) = Control::channels();
        let identity = job.identity.clone();
        let m = manifest.clone();
        let quic = cfg.quic;
        let worker = std::thread::spawn(move || {
            net::host(socket, &identity, m, share.sources, &cfg, control)
        });
        let labels: Arc<std::sync::Mutex<HashMap<Fingerprint, String>>> = Arc::default();
        let links: Arc<Mutex<HashMap<u64, HostLink>>> = Arc::default();
        let (labels2, ui2, bench) = (labels.clone(), ui.clone(), job.tuning.benchmark);
        let (links2, commands2) = (links.clone(), commands.clone());
        let events = std::thread::spawn(move || {
            let ctx = HostCtx {
                manifest: &manifest,
                text: text_len,
                labels: &labels2,
                links: &links2,
                commands: &commands2,
                ui: &ui2,
                bench,
                quic,
                notes: &notes,
            };
            host_events(&events, &ctx);
        });
        Ok(Self {
            allowed,
            labels,
            links,
            next_link: std::sync::atomic::AtomicU64::new(1),
            udp_turn_taken: std::sync::atomic::AtomicBool::new(false),
            ice: job.tuning.ice.clone(),
            commands,
            worker: Some(worker),
            events: Some(events),
            offered,
        })
    }

    /// Files and payload bytes offered.
    pub fn offered(&self) -> (u64, u64) {
        self.offered
    }

    /// Lets a paired joiner in; with a signaling server (`trickle`), starts ICE with it.
    pub fn admit(&self, paired: &Paired, trickle: Option<Trickle>) {
        if let Ok(mut l) = self.labels.lock() {
            l.insert(paired.peer_fingerprint, paired.peer_label.clone());
        }
        self.allowed.allow(paired.peer_fingerprint);
        let (Some(trickle), Some(servers)) = (trickle, &self.ice) else {
            return;
        };
        let link = self
            .next_link
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The host nominates: it knows the pair before the joiner's first QUIC packet.
        let mut ice = Box::new(ice_setup(paired, servers, flux_ice::Role::Controlling));
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        // One socket holds one TURN allocation per server over UDP (a second from the same
        // 5-tuple is refused, and the two clients would read each other's replies; a finished
        // link's allocation lives on at the server until it expires): the first joiner's
        // link gets it, later ones reach the same servers over TCP, which gives each its own
        // 5-tuple and allocation.
        let udp_turn = !self
            .udp_turn_taken
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        if !udp_turn {
            for t in &mut ice.config.turn_servers {
                if t.transport == flux_ice::TurnTransport::Udp {
                    t.transport = flux_ice::TurnTransport::Tcp;
                }
            }
        }
        links.insert(
            link,
            HostLink {
                label: paired.peer_label.clone(),
                trickle,
            },
        );
        drop(links);
        let _ = self.commands.send(Command::AddPeer { link, ice });
    }

    /// Stops every transfer at once, telling each receiver `reason` (`the host stopped
    /// (Ctrl-C)`); they keep what they received.
    pub fn cancel_with(&self, reason: &str) {
        let _ = self.commands.send(Command::CancelWith(reason.to_string()));
    }

    /// Stops serving and waits for the engine.
    pub fn stop(mut self) -> Result<(), TransferError> {
        let _ = self.commands.send(Command::Cancel);
        if let Some(w) = self.worker.take() {
            w.join()
                .map_err(|_| TransferError::Failed("the engine thread panicked".into()))?
                .map_err(|e| failed("transfer failed", e))?;
        }
        if let Some(e) = self.events.take() {
            let _ = e.join();
        }
        Ok(())
    }
}

impl Drop for HostEngine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel);
    }
}

/// One joiner's ICE link on the host.
#[derive(Debug)]
struct HostLink {
    label: String,
    trickle: Trickle,
}

/// What the host's event thread works with.
struct HostCtx<'a> {
    manifest: &'a Arc<Manifest>,
    /// `--text`: its length (nothing to show per file; one line at the end).
    text: Option<u64>,
    labels: &'a Mutex<HashMap<Fingerprint, String>>,
    links: &'a Mutex<HashMap<u64, HostLink>>,
    commands: &'a crossbeam_channel::Sender<Command>,
    ui: &'a Ui,
    bench: bool,
    /// The stack the host runs.
    quic: QuicStack,
    notes: &'a tokio::sync::mpsc::UnboundedSender<HostNote>,
}

impl HostCtx<'_> {
    /// The joiner's label for ICE link `link`.
    fn label(&self, link: u64) -> String {
        self.links
            .lock()
            .ok()
            .and_then(|m| m.get(&link).map(|l| l.label.clone()))
            .unwrap_or_else(|| format!("joiner (link {link})"))
    }

    /// Drops link `link` and with it the joiner's trickle.
    fn forget(&self, link: u64) {
        if let Ok(mut m) = self.links.lock() {
            m.remove(&link);
        }
    }
}

fn host_events(events: &crossbeam_channel::Receiver<NetEvent>, ctx: &HostCtx<'_>) {
    struct Peer {
        label: String,
        /// Started at acceptance: nothing is shown while the receiver is at its prompt.
        files: Option<Files>,
        bench: Bench,
        /// The entries the receiver chose, when it chose a subset.
        selected: Option<std::collections::BTreeSet<u32>>,
        /// It only looked (`thru join --list`).
        browsed: bool,
    }
    let HostCtx {
        manifest,
        text,
        labels,
        ui,
        bench,
        notes,
        ..
    } = *ctx;
    let mut peers: HashMap<usize, Peer> = HashMap::new();
    // The route ICE chose, by joiner label, to show next to its bar.
    let mut routes: HashMap<String, Route> = HashMap::new();
    loop {
        // Joiners' trickled candidates, into the engine.
        if let Ok(mut links) = ctx.links.lock() {
            for (&link, l) in links.iter_mut() {
                while let Ok(candidate) = l.trickle.from_peer.try_recv() {
                    let _ = ctx
                        .commands
                        .send(Command::RemoteCandidate { link, candidate });
                }
            }
        }
        let ev = match events.recv_timeout(TRICKLE_POLL) {
            Ok(ev) => ev,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        match ev {
            NetEvent::LocalCandidate { link, candidate } => {
                if let Some(l) = ctx.links.lock().ok().as_ref().and_then(|m| m.get(&link)) {
                    let _ = l.trickle.to_peer.send(candidate);
                }
            }
            NetEvent::Route { link, route, after } => {
                let label = ctx.label(link);
                let r = Route::of(route.kind);
                ui.route(&label, &RoutePath::new(&route, after), r);
                for p in peers.values().filter(|p| p.label == label) {
                    if let Some(f) = &p.files {
                        f.progress.set_route(r);
                    }
                }
                routes.insert(label, r);
            }
            NetEvent::IceFailed { link, error } => {
                // The joiner's transfer never starts; the pairing time-out in the host loop
                // gives it up. Say why now, and let its trickle go.
                tracing::warn!(
                    peer = ctx.label(link),
                    "{}",
                    crate::ui::safe_text(&error.to_string())
                );
                ctx.forget(link);
            }
            NetEvent::Connected {
                conn,
                fingerprint,
                at,
                ..
            } => {
                if let Some(fp) = fingerprint {
                    let _ = notes.send(HostNote::Connected { fingerprint: fp });
                }
                let label = fingerprint
                    .and_then(|fp| labels.lock().ok().and_then(|l| l.get(&fp).cloned()))
                    .unwrap_or_else(|| format!("joiner (connection {conn})"));
                ui.receiver(&label, ui::ReceiverState::Prompt, None);
                peers.insert(
                    conn,
                    Peer {
                        label,
                        files: None,
                        bench: Bench {
                            quic: ctx.quic,
                            start: Some(at),
                            ..Bench::default()
                        },
                        selected: None,
                        browsed: false,
                    },
                );
            }
            NetEvent::Transfer { conn, event, at } => {
                let Some(p) = peers.get_mut(&conn) else {
                    continue;
                };
                match (event, p.files.as_mut()) {
                    (Event::Selected(chosen), _) => p.selected = Some(chosen),
                    (Event::Browsed, _) => p.browsed = true,
                    (Event::Paused(paused), _) => {
                        ui.pause(&p.label, paused, false);
                        let state = if paused {
                            ui::ReceiverState::Paused
                        } else {
                            ui::ReceiverState::Receiving
                        };
                        ui.receiver(&p.label, state, None);
                    }
                    (Event::Accepted, _) => {
                        let (files, bytes) = match &p.selected {
                            Some(c) => crate::choose::counts(manifest, c),
                            None => (manifest.file_count() as u64, manifest.total_bytes()),
                        };
                        let left_out = manifest.file_count() as u64 - files;
                        ui.emit(&ui::Event::Accepted {
                            peer: p.label.clone(),
                            files: files as usize,
                            bytes,
                        });
                        ui.receiver(&p.label, ui::ReceiverState::Receiving, None);
                        let progress = ui.transfer(&p.label, ui::Side::Sending, files, bytes);
                        progress
                            .set_route(routes.get(&p.label).copied().unwrap_or(Route::LanDirect));
                        progress.set_left_out(left_out);
                        let mut f = Files::new(manifest.clone(), progress, true);
                        f.chosen = p.selected.take();
                        p.files = Some(f);
                    }
                    (
                        Event::ChunkSent {
                            file, len, wire, ..
                        },
                        Some(f),
                    ) => {
                        f.sent(file, u64::from(len), u64::from(wire));
                        p.bench.chunk(at, u64::from(len), u64::from(wire));
                    }
                    (Event::ResumeChecked { file, bytes, .. }, Some(f)) => f.held(file, bytes),
                    _ => {}
                }
            }
            NetEvent::Ended { conn, error, stats } => {
                if let Some(link) = stats.link {
                    // Its trickle is no longer needed: the joiner's signaling can close.
                    ctx.forget(link);
                }
                let Some(p) = peers.remove(&conn) else {
                    continue;
                };
                if p.browsed && error.is_none() {
                    ui.receiver(&p.label, ui::ReceiverState::Listed, None);
                    let _ = notes.send(HostNote::Browsed { peer: p.label });
                    continue;
                }
                let result = match (error, p.files) {
                    (None, Some(f)) if text.is_some() => {
                        f.progress.abandon();
                        let (route, _) = route_of(Some(&stats));
                        let secs = p.bench.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
                        Ok(ui.text_sent(&p.label, text.unwrap_or(0), secs, route))
                    }
                    (None, Some(mut f)) => {
                        f.complete_all();
                        let (route, path) = route_of(Some(&stats));
                        let s = f.progress.finish(route, path, None);
                        if bench {
                            let side = ui::Side::Sending;
                            p.bench
                                .report(ui, &p.label, side, Some(&stats), s.seconds, None);
                        }
                        Ok(s)
                    }
                    (None, None) => Err(TransferError::Failed(
                        "the receiver left before accepting".into(),
                    )),
                    (Some(e), f) => {
                        if let Some(f) = f {
                            // Clear its bars; the failure is reported by the caller.
                            f.progress.abandon();
                        }
                        Err(declined(&e).unwrap_or_else(|| {
                            TransferError::Failed(explain_end(&e, false, None, false))
                        }))
                    }
                };
                match &result {
                    Ok(_) => ui.receiver(&p.label, ui::ReceiverState::Done, None),
                    Err(TransferError::Declined(_)) => {}
                    Err(e) => {
                        let why = e.to_string();
                        let why = why.strip_prefix("transfer failed: ").unwrap_or(&why);
                        ui.receiver(&p.label, ui::ReceiverState::Gone, Some(why));
                    }
                }
                let _ = notes.send(HostNote::Ended {
                    peer: p.label,
                    result: Box::new(result),
                });
            }
            NetEvent::Offer { .. } => {}
        }
    }
}
