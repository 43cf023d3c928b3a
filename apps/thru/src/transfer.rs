//! The hand-over to the data engine (`flux_peer::net`) once pairing is done.
//!
//! - A joiner calls [`run_transfer`]: one engine worker connects to the host's authenticated
//!   addresses (pinning the host's certificate and presenting its own), shows the offer and
//!   asks, refuses name clashes unless `--force`, and reports progress and the summary.
//! - A host starts one [`HostEngine`] for the whole session: one worker owns the advertised
//!   UDP socket and serves every joiner on its own QUIC connection; [`HostEngine::admit`] lets
//!   a joiner's certificate in once its pairing succeeded, and nobody else gets in.
//!
//! The engine runs on its own thread; this module only reads its events and sends commands
//! through channels. What it does not do: NAT traversal (the route is always direct for now).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use flux_peer::net::{self, Command, Control, Driver, NetConfig, NetEvent, NetReport};
use flux_quic::{AllowList, Fingerprint, Identity, TransportParams};
use flux_transfer::{Event, LocalFile, Manifest};
use flux_wire::EntryKind;

use crate::cli::Exit;
use crate::pairing::Paired;
use crate::ui::{self, Offer, OfferedFile, Route, Summary, TransferProgress, Ui};

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

/// What this side does.
#[derive(Clone, Debug)]
pub enum Job {
    /// Host: offer these files and directories.
    Send {
        /// As given on the command line (checked to exist).
        paths: Vec<PathBuf>,
    },
    /// Joiner: receive into `out`.
    Receive {
        /// Destination directory.
        out: PathBuf,
        /// Accept without asking (`--yes`).
        yes: bool,
        /// Allow overwriting (`--force`).
        force: bool,
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
    /// `--cores`, `None` = one per core.
    pub cores: Option<u16>,
    /// `--benchmark`.
    pub benchmark: bool,
    /// `--stun-server` list.
    pub stun_servers: Vec<String>,
    /// `--turn-server` list.
    pub turn_servers: Vec<String>,
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
}

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The receiver declined.
    #[error("the receiver declined the files")]
    Refused,
    /// A target exists and `--force` was not given.
    #[error("{path} already exists; pass --force to overwrite it")]
    Conflict {
        /// The file.
        path: PathBuf,
    },
    /// Anything else, with context (`transfer failed: control stream timeout`).
    #[error("transfer failed: {0}")]
    Failed(String),
}

impl TransferError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Refused => Exit::Refused,
            Self::Conflict { .. } => Exit::Conflict,
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
    if !t.turn_servers.is_empty() {
        tracing::warn!(
            "--turn-server: NAT traversal is not wired into thru yet; connecting directly"
        );
    }
    let mut cfg = NetConfig {
        driver: t.io_driver.driver(),
        transport: t.transport.clone(),
        ..NetConfig::default()
    };
    if let Some(p) = t.parallel_files {
        cfg.sender.parallel_files = u16::from(p);
    }
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
struct Files {
    manifest: Arc<Manifest>,
    done: HashMap<u32, u64>,
    progress: TransferProgress,
}

impl Files {
    fn new(manifest: Arc<Manifest>, progress: TransferProgress) -> Self {
        Self {
            manifest,
            done: HashMap::new(),
            progress,
        }
    }

    fn add(&mut self, file: u32, bytes: u64) {
        if !self.done.contains_key(&file) {
            let (name, size) = self
                .manifest
                .entry(file)
                .map_or((String::new(), 0), |e| (e.path.clone(), e.size));
            self.progress.file_started(u64::from(file), &name, size);
        }
        let d = self.done.entry(file).or_insert(0);
        *d += bytes;
        self.progress.file_progress(u64::from(file), *d);
    }

    fn complete(&mut self, file: u32) {
        let is_file = self
            .manifest
            .entry(file)
            .is_some_and(|e| e.kind == EntryKind::File);
        if !is_file {
            return;
        }
        self.add(file, 0);
        self.progress.file_done(u64::from(file));
    }
}

/// `--benchmark` figures of one transfer.
#[derive(Debug, Default)]
struct Bench {
    start: Option<Instant>,
    connected: Option<Duration>,
    first_byte: Option<Duration>,
    seconds: Vec<u64>,
    bytes: u64,
}

impl Bench {
    fn chunk(&mut self, at: Instant, len: u64) {
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

    fn report(&self, ui: &Ui, peer: &str, rep: Option<&net::ConnReport>, secs: f64) {
        let avg = self.bytes as f64 * 8.0 / secs.max(1e-9) / 1e9;
        let peak = self.seconds.iter().copied().max().unwrap_or(0) as f64 * 8.0 / 1e9;
        let cpu = cpu_seconds();
        let (rtt, loss) = rep.map_or((None, None), |r| {
            let loss =
                (r.packets_sent > 0).then(|| r.packets_lost as f64 * 100.0 / r.packets_sent as f64);
            (Some(r.rtt.as_secs_f64() * 1e3), loss)
        });
        ui.emit(&ui::Event::Benchmark {
            peer: peer.to_string(),
            bytes: self.bytes,
            avg_gbit_s: avg,
            peak_1s_gbit_s: peak,
            connect_ms: self.connected.map(|d| d.as_secs_f64() * 1e3),
            first_byte_ms: self.first_byte.map(|d| d.as_secs_f64() * 1e3),
            rtt_ms: rtt,
            loss_pct: loss,
            cpu_s: cpu,
        });
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

/// Receives from a paired host. Blocking; call it off the async runtime.
pub fn run_transfer(paired: Paired, job: &TransferJob, ui: &Ui) -> Result<Summary, TransferError> {
    let Job::Receive { out, yes, force } = &job.job else {
        return Err(TransferError::Failed(
            "run_transfer receives; a host serves through HostEngine".into(),
        ));
    };
    std::fs::create_dir_all(out)
        .map_err(|e| failed(&format!("cannot create {}", out.display()), e))?;
    let mut cfg = net_config(job);
    cfg.auto_accept = false;
    cfg.receiver.overwrite = *force;
    cfg.client_identity = Some(job.identity.clone());
    cfg.connect_timeout = Duration::from_secs(5);
    let mut last_err = None;
    // Most promising address first; a few at most, so a wrong one costs seconds, not minutes.
    for addr in paired.peer_addrs.iter().take(4) {
        match receive_from(*addr, &paired, job, &cfg, out, *yes, ui)? {
            Ok(summary) => return Ok(summary),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| TransferError::Failed("the host advertised no address".into())))
}

/// One attempt: `Ok(Err(_))` means the host could not be reached there (try the next
/// address); `Err(_)` is final.
#[allow(clippy::too_many_arguments)]
fn receive_from(
    addr: SocketAddr,
    paired: &Paired,
    job: &TransferJob,
    cfg: &NetConfig,
    out: &std::path::Path,
    yes: bool,
    ui: &Ui,
) -> Result<Result<Summary, TransferError>, TransferError> {
    let socket = engine_socket(job)?;
    let (control, events, commands) = Control::channels();
    let fp = paired.peer_fingerprint;
    let (cfg2, out2) = (cfg.clone(), out.to_owned());
    let worker: JoinHandle<Result<NetReport, flux_transfer::TransferError>> =
        std::thread::spawn(move || net::join(socket, addr, fp, out2, &cfg2, control));
    let mut bench = Bench {
        start: Some(Instant::now()),
        ..Bench::default()
    };
    let mut connected = false;
    let mut files: Option<Files> = None;
    let mut verdict: Option<TransferError> = None;
    let mut ended: Option<(Option<String>, net::ConnReport)> = None;
    for ev in events.iter() {
        match ev {
            NetEvent::Connected { at, .. } => {
                connected = true;
                bench.connected = bench.start.map(|s| at.saturating_duration_since(s));
            }
            NetEvent::Offer { manifest, local } => {
                match decide(&manifest, &local, yes, cfg.receiver.overwrite, ui) {
                    Ok(()) => {
                        let _ = commands.send(Command::Accept);
                        let progress = ui.transfer(
                            &paired.peer_label,
                            manifest.file_count() as u64,
                            manifest.total_bytes(),
                        );
                        files = Some(Files::new(manifest, progress));
                        bench.start = Some(Instant::now());
                    }
                    Err(e) => {
                        let reason = match &e {
                            TransferError::Conflict { path } => {
                                format!("{} already exists at the receiver", path.display())
                            }
                            _ => "the receiver declined".into(),
                        };
                        let _ = commands.send(Command::Reject(reason));
                        verdict = Some(e);
                    }
                }
            }
            NetEvent::Transfer { event, at, .. } => match (event, files.as_mut()) {
                (Event::ChunkVerified { file, len, .. }, Some(f)) => {
                    f.add(file, u64::from(len));
                    bench.chunk(at, u64::from(len));
                }
                (Event::FileComplete { file } | Event::FileSkipped { file }, Some(f)) => {
                    f.complete(file);
                }
                _ => {}
            },
            NetEvent::Ended { error, stats, .. } => ended = Some((error, stats)),
        }
    }
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
        if !connected {
            return Ok(Err(failed(&format!("cannot reach the host at {addr}"), e)));
        }
        return Err(TransferError::Failed(e));
    }
    let Some(f) = files else {
        return Err(TransferError::Failed(
            "the host ended before offering anything".into(),
        ));
    };
    let summary = f.progress.finish(Route::LanDirect);
    if job.tuning.benchmark {
        bench.report(
            ui,
            &paired.peer_label,
            ended.as_ref().map(|(_, s)| s),
            summary.seconds,
        );
    }
    Ok(Ok(summary))
}

/// Shows the offer and asks; refuses name clashes unless overwriting is allowed.
fn decide(
    manifest: &Manifest,
    local: &HashMap<u32, LocalFile>,
    yes: bool,
    overwrite: bool,
    ui: &Ui,
) -> Result<(), TransferError> {
    if !overwrite {
        let mut clashes: Vec<u32> = local
            .iter()
            .filter(|(_, l)| matches!(l, LocalFile::Conflict))
            .map(|(i, _)| *i)
            .collect();
        clashes.sort_unstable();
        if let Some(e) = clashes.first().and_then(|i| manifest.entry(*i)) {
            return Err(TransferError::Conflict {
                path: PathBuf::from(ui::safe_name(&e.path)),
            });
        }
    }
    let offer = Offer {
        files: manifest
            .entries()
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| OfferedFile {
                name: e.path.clone(),
                size: e.size,
            })
            .collect(),
    };
    match ui.confirm_offer(&offer, yes) {
        Ok(true) => Ok(()),
        Ok(false) => Err(TransferError::Refused),
        Err(e) => {
            tracing::warn!(error = %e, "no answer to the offer");
            Err(TransferError::Refused)
        }
    }
}

/// What the host side learns as its engine serves joiners.
#[derive(Debug)]
pub enum HostNote {
    /// A joiner's QUIC connection was established (its certificate is this fingerprint).
    Connected {
        /// The joiner's certificate fingerprint.
        fingerprint: Fingerprint,
    },
    /// A joiner's transfer ended.
    Ended {
        /// The joiner's label.
        peer: String,
        /// The outcome.
        result: Result<Summary, String>,
    },
}

/// The host's engine: one worker serving every admitted joiner on the advertised socket.
pub struct HostEngine {
    allowed: Arc<AllowList>,
    labels: Arc<std::sync::Mutex<HashMap<Fingerprint, String>>>,
    commands: crossbeam_channel::Sender<Command>,
    worker: Option<JoinHandle<Result<NetReport, flux_transfer::TransferError>>>,
    events: Option<JoinHandle<()>>,
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
        let Job::Send { paths } = &job.job else {
            return Err(TransferError::Failed(
                "HostEngine sends; use run_transfer to receive".into(),
            ));
        };
        let chunk = job
            .tuning
            .chunk_size
            .map(|c| u32::try_from(c).unwrap_or(u32::MAX));
        let share =
            flux_peer::scan::scan(paths, chunk).map_err(|e| failed("snapshot sender failed", e))?;
        let manifest = Arc::new(share.manifest);
        let allowed = Arc::new(AllowList::new());
        let mut cfg = net_config(job);
        cfg.allowed_joiners = Some(allowed.clone());
        cfg.max_receivers = max_receivers.max(1);
        cfg.serve = None;
        let socket = engine_socket(job)?;
        let (control, events, commands) = Control::channels();
        let identity = job.identity.clone();
        let m = manifest.clone();
        let worker = std::thread::spawn(move || {
            net::host(socket, &identity, m, share.sources, &cfg, control)
        });
        let labels: Arc<std::sync::Mutex<HashMap<Fingerprint, String>>> = Arc::default();
        let (labels2, ui2, bench) = (labels.clone(), ui.clone(), job.tuning.benchmark);
        let events = std::thread::spawn(move || {
            host_events(&events, &manifest, &labels2, &ui2, bench, &notes);
        });
        Ok(Self {
            allowed,
            labels,
            commands,
            worker: Some(worker),
            events: Some(events),
        })
    }

    /// Lets a paired joiner in.
    pub fn admit(&self, paired: &Paired) {
        if let Ok(mut l) = self.labels.lock() {
            l.insert(paired.peer_fingerprint, paired.peer_label.clone());
        }
        self.allowed.allow(paired.peer_fingerprint);
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

fn host_events(
    events: &crossbeam_channel::Receiver<NetEvent>,
    manifest: &Arc<Manifest>,
    labels: &std::sync::Mutex<HashMap<Fingerprint, String>>,
    ui: &Ui,
    bench: bool,
    notes: &tokio::sync::mpsc::UnboundedSender<HostNote>,
) {
    struct Peer {
        label: String,
        files: Files,
        bench: Bench,
    }
    let mut peers: HashMap<usize, Peer> = HashMap::new();
    for ev in events.iter() {
        match ev {
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
                let progress =
                    ui.transfer(&label, manifest.file_count() as u64, manifest.total_bytes());
                peers.insert(
                    conn,
                    Peer {
                        label,
                        files: Files::new(manifest.clone(), progress),
                        bench: Bench {
                            start: Some(at),
                            ..Bench::default()
                        },
                    },
                );
            }
            NetEvent::Transfer { conn, event, at } => {
                let Some(p) = peers.get_mut(&conn) else {
                    continue;
                };
                match event {
                    Event::ChunkSent { file, len, .. } => {
                        p.files.add(file, u64::from(len));
                        p.bench.chunk(at, u64::from(len));
                    }
                    Event::ResumeChecked { file, bytes, .. } => p.files.add(file, bytes),
                    Event::FileComplete { file } | Event::FileSkipped { file } => {
                        p.files.complete(file);
                    }
                    _ => {}
                }
            }
            NetEvent::Ended { conn, error, stats } => {
                let Some(p) = peers.remove(&conn) else {
                    continue;
                };
                let result = match error {
                    None => {
                        let s = p.files.progress.finish(Route::LanDirect);
                        if bench {
                            p.bench.report(ui, &p.label, Some(&stats), s.seconds);
                        }
                        Ok(s)
                    }
                    Some(e) => Err(e),
                };
                let _ = notes.send(HostNote::Ended {
                    peer: p.label,
                    result,
                });
            }
            NetEvent::Offer { .. } => {}
        }
    }
}
