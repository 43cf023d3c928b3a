//! ICE for the peer core: one `flux_ice::Agent` per peer (`Link`, owned by
//! [`crate::node::Node`], no I/O), and the TCP/TLS streams to TURN servers the agents ask for
//! ([`TurnStreams`], owned by the driver).
//!
//! The node hands every non-QUIC datagram to the links, sends each connection's QUIC packets
//! through its link (directly, in TURN ChannelData, or on a TURN stream) and gives QUIC one
//! constant peer address per link (`Link::quic_addr`, the first selected remote) so a
//! renomination never looks like a migration to quinn.
//!
//! TURN streams run on two small threads each (connect, then a blocking reader); the driver
//! writes to them directly. They are the slow path for networks that block UDP; the driver
//! polls their channel at least every millisecond while one is open.
//!
//! What it does not do: signaling (candidates and credentials come in through
//! [`crate::net::Command`] and go out as [`crate::net::NetEvent`]s), DNS, or choosing TURN
//! servers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as Rx, Sender as Tx};
use flux_ice::{
    Agent, AppDatagram, Candidate, CandidateKind, Config, Credentials, Event, Selected, StreamId,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// What the worker needs to run ICE with one peer.
#[derive(Clone, Debug)]
pub struct IceSetup {
    /// Role, our credentials, STUN and TURN servers, time-outs.
    pub config: Config,
    /// The socket's addresses on each interface (host candidates), with the socket's port.
    pub hosts: Vec<SocketAddr>,
    /// The peer's credentials.
    pub remote_credentials: Credentials,
    /// Remote candidates known up front (for example the peer's authenticated addresses).
    pub remote_candidates: Vec<Candidate>,
    /// TLS settings for `turns:` servers (see [`turn_tls_config`]); `None` refuses TLS.
    pub turn_tls: Option<Arc<rustls::ClientConfig>>,
    /// Per entry of `config.turn_servers`: the name to verify its certificate against (a DNS
    /// name or the IP literal).
    pub turn_names: Vec<String>,
}

/// A host candidate for `addr` as the peer would announce it (RFC 8445 §5.1.2.1: type
/// preference 126; `index` lowers the local preference of later addresses).
pub fn host_candidate(addr: SocketAddr, index: usize) -> Candidate {
    let local_pref = 65535u32.saturating_sub(u32::try_from(index).unwrap_or(u32::MAX));
    Candidate {
        kind: CandidateKind::Host,
        addr,
        priority: (126 << 24) | (local_pref << 8) | 255,
        foundation: format!("h{index}"),
        component: 1,
        related: None,
    }
}

/// TLS client settings for TURN over TLS: the Web PKI roots, or exactly the certificate
/// `pinned` (DER) when given — for a self-hosted coturn with a self-signed certificate.
pub fn turn_tls_config(pinned: Option<Vec<u8>>) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS for TURN: {e}"))?;
    let config = match pinned {
        Some(der) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedTurnCert {
                der,
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate (byte for byte); signatures are still verified.
#[derive(Debug)]
struct PinnedTurnCert {
    der: Vec<u8>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinnedTurnCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What a link reports to the node after [`Link::pump`].
#[derive(Debug)]
pub(crate) enum LinkNote {
    /// Trickle this candidate to the peer.
    Candidate(String),
    /// A pair was selected (or the selection changed).
    Selected(Selected),
    /// ICE gave up.
    Failed(String),
    /// A relayed QUIC datagram that arrived on a TURN stream.
    App(AppDatagram),
    /// The agent wants a TCP (or TLS) stream to a TURN server: the driver opens it.
    OpenStream {
        /// The agent's number for the stream.
        id: StreamId,
        /// The TURN server.
        addr: SocketAddr,
        /// Wrapped in TLS (`turns:`).
        tls: bool,
    },
    /// Bytes for a TURN stream.
    StreamWrite(StreamId, Vec<u8>),
}

/// ICE with one peer: the agent and what the node keeps about it. No I/O: datagrams leave
/// through the `send` callback of [`Link::pump`], TURN stream work as [`LinkNote`]s the driver
/// carries out with a [`TurnStreams`].
pub(crate) struct Link {
    /// The caller's number for this peer.
    pub id: u64,
    pub agent: Agent,
    /// The address QUIC knows the peer by: the first selected remote, constant afterwards.
    pub quic_addr: Option<SocketAddr>,
    /// When the link was created and when a pair was first selected.
    pub started: Instant,
    pub selected_after: Option<Duration>,
    /// ICE failed; nothing more is driven.
    pub failed: bool,
    /// The peer's connection ended; the agent is no longer driven.
    pub closed: bool,
    /// Scratch for TURN framing.
    pub wrapped: Vec<u8>,
}

impl Link {
    /// A link from `setup` (its TLS settings are the driver's: [`TurnStreams::new`]).
    pub fn new(id: u64, setup: IceSetup, now: Instant) -> Self {
        let IceSetup {
            config,
            hosts,
            remote_credentials,
            remote_candidates,
            ..
        } = setup;
        let mut agent = Agent::new(config, now);
        for h in hosts {
            agent.add_host(h, now);
        }
        agent.set_remote_credentials(&remote_credentials, now);
        for c in &remote_candidates {
            agent.add_remote_candidate(c, now);
        }
        Self {
            id,
            agent,
            quic_addr: None,
            started: now,
            selected_after: None,
            failed: false,
            closed: false,
            wrapped: Vec::with_capacity(2048),
        }
    }

    /// Whether the node should still drive this link.
    pub fn live(&self) -> bool {
        !self.failed && !self.closed
    }

    /// A remote candidate line from signaling.
    pub fn remote_candidate(&mut self, line: &str, now: Instant) {
        match line.parse::<Candidate>() {
            Ok(c) => {
                self.agent.add_remote_candidate(&c, now);
            }
            Err(e) => tracing::info!(link = self.id, error = %e, "remote candidate not understood"),
        }
    }

    /// What the driver's TURN stream reported.
    pub fn handle_turn(&mut self, now: Instant, report: TurnReport) {
        apply(&mut self.agent, now, report);
    }

    /// Runs timers and collects what the node must act on. UDP output goes through `send`
    /// (best effort, like any datagram).
    pub fn pump(
        &mut self,
        now: Instant,
        send: &mut dyn FnMut(&[u8], SocketAddr),
        notes: &mut Vec<LinkNote>,
    ) {
        if !self.live() {
            return;
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        self.flush(send, notes);
        while let Some(ev) = self.agent.poll_event() {
            match ev {
                Event::LocalCandidate(c) => notes.push(LinkNote::Candidate(c.to_string())),
                Event::ConnectTurnStream { stream, addr, tls } => {
                    notes.push(LinkNote::OpenStream {
                        id: stream,
                        addr,
                        tls,
                    });
                }
                Event::Selected(s) => {
                    self.quic_addr.get_or_insert(s.remote);
                    self.selected_after
                        .get_or_insert_with(|| now.saturating_duration_since(self.started));
                    notes.push(LinkNote::Selected(s));
                }
                Event::Failed(r) => {
                    self.failed = true;
                    notes.push(LinkNote::Failed(r.to_string()));
                }
                _ => {}
            }
        }
        while let Some(d) = self.agent.poll_app() {
            notes.push(LinkNote::App(d));
        }
        self.flush(send, notes);
    }

    /// Sends what the agent queued: datagrams through `send`, stream bytes as notes.
    fn flush(&mut self, send: &mut dyn FnMut(&[u8], SocketAddr), notes: &mut Vec<LinkNote>) {
        while let Some(t) = self.agent.poll_transmit() {
            match t.stream {
                None => send(&t.data, t.to),
                Some(id) => notes.push(LinkNote::StreamWrite(id, t.data)),
            }
        }
    }
}

/// What a TURN stream's threads report.
#[derive(Debug)]
pub enum TurnReport {
    /// Connected (and TLS-wrapped), from this local address.
    Connected(StreamId, SocketAddr),
    /// Bytes read.
    Data(StreamId, Vec<u8>),
    /// The stream failed or closed.
    Failed(StreamId, String),
}

/// The TCP/TLS streams to TURN servers that one agent asked for ([`Event::ConnectTurnStream`]):
/// each is connected (and TLS-wrapped) on its own thread, which then reads it; bytes and
/// failures come back through a channel the driver drains with [`TurnStreams::poll_reports`].
pub struct TurnStreams {
    streams: Vec<Option<StreamWriter>>,
    tx: Tx<StreamMsg>,
    rx: Rx<StreamMsg>,
    tls: Option<Arc<rustls::ClientConfig>>,
    names: Vec<String>,
    opened: bool,
}

impl TurnStreams {
    /// `tls` for `turns:` servers (see [`turn_tls_config`]; `None` refuses TLS); `names[i]`
    /// is the name TURN server `i`'s certificate must carry (its IP when missing).
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, names: Vec<String>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            streams: Vec::new(),
            tx,
            rx,
            tls,
            names,
            opened: false,
        }
    }

    /// Whether a stream was ever opened (its threads may have bytes: poll often).
    pub fn opened(&self) -> bool {
        self.opened
    }

    /// Starts connecting stream `id` to `addr` (wrapped in TLS when `tls`).
    pub fn open(&mut self, id: StreamId, addr: SocketAddr, tls: bool) {
        self.opened = true;
        let tx = self.tx.clone();
        let tls = match (tls, &self.tls) {
            (false, _) => None,
            (true, Some(cfg)) => {
                let name = self
                    .names
                    .get(id.0)
                    .cloned()
                    .unwrap_or_else(|| addr.ip().to_string());
                Some((cfg.clone(), name))
            }
            (true, None) => {
                let _ = tx.send(StreamMsg::Failed(id, "no TLS settings for turns:".into()));
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("flux-turn-stream".into())
            .spawn(move || {
                if let Err(e) = stream_thread(id, addr, tls, &tx) {
                    let _ = tx.send(StreamMsg::Failed(id, e));
                }
            });
        if let Err(e) = spawned {
            let _ = self.tx.send(StreamMsg::Failed(
                id,
                format!("spawning the stream thread: {e}"),
            ));
        }
    }

    /// What the stream threads reported since the last call (connected, bytes read,
    /// failures), in order.
    pub fn poll_reports(&mut self, out: &mut Vec<TurnReport>) {
        while let Ok(msg) = self.rx.try_recv() {
            out.push(match msg {
                StreamMsg::Connected(id, local, w) => {
                    if self.streams.len() <= id.0 {
                        self.streams.resize_with(id.0 + 1, || None);
                    }
                    self.streams[id.0] = Some(w);
                    TurnReport::Connected(id, local)
                }
                StreamMsg::Data(id, data) => TurnReport::Data(id, data),
                StreamMsg::Failed(id, e) => {
                    if let Some(s) = self.streams.get_mut(id.0) {
                        *s = None;
                    }
                    TurnReport::Failed(id, e)
                }
            });
        }
    }

    /// Appends bytes to stream `id`; a failed write closes the stream and is reported.
    pub fn write_bytes(&mut self, id: StreamId, data: &[u8]) -> Option<TurnReport> {
        let Some(Some(w)) = self.streams.get_mut(id.0) else {
            return None;
        };
        match w.write(data) {
            Ok(()) => None,
            Err(e) => {
                self.streams[id.0] = None;
                Some(TurnReport::Failed(id, e))
            }
        }
    }

    /// Hands what the stream threads report to `agent` (for a driver that runs an agent
    /// itself, like `ice-probe`). Returns whether there was anything.
    pub fn poll(&mut self, agent: &mut Agent, now: Instant) -> bool {
        let mut reports = Vec::new();
        self.poll_reports(&mut reports);
        let any = !reports.is_empty();
        for r in reports {
            apply(agent, now, r);
        }
        any
    }

    /// Appends bytes to stream `id`; a failed write fails the stream in `agent`.
    pub fn write(&mut self, agent: &mut Agent, id: StreamId, data: &[u8]) {
        if let Some(r) = self.write_bytes(id, data) {
            apply(agent, Instant::now(), r);
        }
    }

    /// Sends what `agent` queued: datagrams through `send`, stream bytes to their stream.
    pub fn flush(&mut self, agent: &mut Agent, send: &mut dyn FnMut(&[u8], SocketAddr)) {
        while let Some(t) = agent.poll_transmit() {
            match t.stream {
                None => send(&t.data, t.to),
                Some(id) => self.write(agent, id, &t.data),
            }
        }
    }
}

fn apply(agent: &mut Agent, now: Instant, r: TurnReport) {
    match r {
        TurnReport::Connected(id, local) => agent.turn_stream_connected(id, local, now),
        TurnReport::Data(id, data) => agent.handle_stream_data(now, id, &data),
        TurnReport::Failed(id, e) => {
            tracing::warn!(error = %e, "TURN stream failed");
            agent.turn_stream_failed(id, now);
        }
    }
}

enum StreamMsg {
    Connected(StreamId, SocketAddr, StreamWriter),
    Data(StreamId, Vec<u8>),
    Failed(StreamId, String),
}

enum StreamWriter {
    Tcp(TcpStream),
    Tls(Arc<Mutex<TlsState>>),
}

struct TlsState {
    conn: rustls::ClientConnection,
    sock: TcpStream,
}

impl Drop for StreamWriter {
    /// Shuts the socket down so the stream's reader thread sees the end and exits.
    fn drop(&mut self) {
        match self {
            Self::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Self::Tls(state) => {
                if let Ok(st) = state.lock() {
                    let _ = st.sock.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

impl StreamWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Self::Tcp(s) => s.write_all(data).map_err(|e| format!("TCP write: {e}")),
            Self::Tls(state) => {
                let mut st = state.lock().map_err(|_| "TLS state poisoned".to_string())?;
                let TlsState { conn, sock } = &mut *st;
                conn.writer()
                    .write_all(data)
                    .map_err(|e| format!("TLS write: {e}"))?;
                while conn.wants_write() {
                    conn.write_tls(sock)
                        .map_err(|e| format!("TLS write: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// How long connecting a TURN stream may take.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn stream_thread(
    id: StreamId,
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    tx: &Tx<StreamMsg>,
) -> Result<(), String> {
    let sock = TcpStream::connect_timeout(&addr, STREAM_CONNECT_TIMEOUT)
        .map_err(|e| format!("connect to TURN {addr}: {e}"))?;
    let _ = sock.set_nodelay(true);
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let mut reader = sock.try_clone().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    let Some((cfg, name)) = tls else {
        tx.send(StreamMsg::Connected(id, local, StreamWriter::Tcp(sock)))
            .map_err(|_| "worker gone".to_string())?;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("TCP read: {e}"))?;
            if n == 0 {
                return Err("TURN server closed the stream".into());
            }
            tx.send(StreamMsg::Data(id, buf[..n].to_vec()))
                .map_err(|_| "worker gone".to_string())?;
        }
    };
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("TURN name {name:?}: {e}"))?;
    let conn = rustls::ClientConnection::new(cfg, server_name).map_err(|e| e.to_string())?;
    let state = Arc::new(Mutex::new(TlsState { conn, sock }));
    {
        let mut st = lock_tls(&state)?;
        let TlsState { conn, sock } = &mut *st;
        while conn.wants_write() {
            conn.write_tls(sock)
                .map_err(|e| format!("TLS write: {e}"))?;
        }
    }
    let mut connected = false;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("TLS read: {e}"))?;
        if n == 0 {
            return Err("TURN server closed the stream".into());
        }
        let mut plain = Vec::new();
        let handshaking;
        {
            let mut st = lock_tls(&state)?;
            let TlsState { conn, sock } = &mut *st;
            // read_tls takes at most what its buffer has room for: feed the whole read in
            // turns, taking the plaintext out in between, or the rest would be lost.
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)
                    .map_err(|e| format!("TLS read: {e}"))?;
                conn.process_new_packets()
                    .map_err(|e| format!("TLS with TURN {addr}: {e}"))?;
                let _ = conn.reader().read_to_end(&mut plain);
            }
            while conn.wants_write() {
                conn.write_tls(sock)
                    .map_err(|e| format!("TLS write: {e}"))?;
            }
            handshaking = conn.is_handshaking();
        }
        if !connected && !handshaking {
            connected = true;
            tx.send(StreamMsg::Connected(
                id,
                local,
                StreamWriter::Tls(state.clone()),
            ))
            .map_err(|_| "worker gone".to_string())?;
        }
        if !plain.is_empty() {
            tx.send(StreamMsg::Data(id, plain))
                .map_err(|_| "worker gone".to_string())?;
        }
    }
}

fn lock_tls(s: &Mutex<TlsState>) -> Result<std::sync::MutexGuard<'_, TlsState>, String> {
    s.lock().map_err(|_| "TLS state poisoned".to_string())
}
