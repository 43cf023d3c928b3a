//! ICE links of the worker: one `flux_ice::Agent` per peer, driven on the worker's own UDP
//! socket, and the TCP/TLS streams to TURN servers the agents ask for.
//!
//! The worker ([`crate::net`]) hands every non-QUIC datagram to the links, sends each
//! connection's QUIC packets through its link (directly, in TURN ChannelData, or on a TURN
//! stream) and gives QUIC one constant peer address per link (`Link::quic_addr`, the first
//! selected remote) so a renomination never looks like a migration to quinn.
//!
//! TURN streams run on two small threads each (connect, then a blocking reader); the worker
//! writes to them directly. They are the slow path for networks that block UDP; the worker
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

/// What a link reports to the worker after [`Link::pump`].
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
}

/// ICE with one peer.
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
    streams: TurnStreams,
    uses_streams: bool,
    /// Scratch for TURN framing.
    pub wrapped: Vec<u8>,
}

impl Link {
    pub fn new(id: u64, setup: IceSetup, now: Instant) -> Self {
        let IceSetup {
            config,
            hosts,
            remote_credentials,
            remote_candidates,
            turn_tls,
            turn_names,
        } = setup;
        let uses_streams = config
            .turn_servers
            .iter()
            .any(|t| t.transport != flux_ice::TurnTransport::Udp);
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
            streams: TurnStreams::new(turn_tls, turn_names),
            uses_streams,
            wrapped: Vec::with_capacity(2048),
        }
    }

    /// Whether the worker should still drive this link.
    pub fn live(&self) -> bool {
        !self.failed && !self.closed
    }

    /// Whether TURN streams are in use (the worker then polls their channel often).
    pub fn has_streams(&self) -> bool {
        self.live() && self.uses_streams
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

    /// Runs timers, TURN stream input and output, and collects what the worker must act on.
    /// UDP output goes through `send` (best effort, like any datagram).
    pub fn pump(
        &mut self,
        now: Instant,
        send: &mut dyn FnMut(&[u8], SocketAddr),
        notes: &mut Vec<LinkNote>,
    ) {
        if !self.live() {
            return;
        }
        self.streams.poll(&mut self.agent, now);
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        self.flush(send);
        while let Some(ev) = self.agent.poll_event() {
            match ev {
                Event::LocalCandidate(c) => notes.push(LinkNote::Candidate(c.to_string())),
                Event::ConnectTurnStream { stream, addr, tls } => {
                    self.streams.open(stream, addr, tls);
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
        self.flush(send);
    }

    /// Sends what the agent queued.
    pub fn flush(&mut self, send: &mut dyn FnMut(&[u8], SocketAddr)) {
        self.streams.flush(&mut self.agent, send);
    }

    /// Appends bytes to TURN stream `id`; a failed write fails the stream.
    pub fn write_stream(&mut self, id: StreamId, data: &[u8]) {
        self.streams.write(&mut self.agent, id, data);
    }
}

/// The TCP/TLS streams to TURN servers that one agent asked for ([`Event::ConnectTurnStream`]):
/// each is connected (and TLS-wrapped) on its own thread, which then reads it; bytes and
/// failures come back through a channel the driver drains with [`TurnStreams::poll`].
pub struct TurnStreams {
    streams: Vec<Option<StreamWriter>>,
    tx: Tx<StreamMsg>,
    rx: Rx<StreamMsg>,
    tls: Option<Arc<rustls::ClientConfig>>,
    names: Vec<String>,
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
        }
    }

    /// Starts connecting stream `id` to `addr` (wrapped in TLS when `tls`).
    pub fn open(&mut self, id: StreamId, addr: SocketAddr, tls: bool) {
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

    /// Hands what the stream threads report (connected, bytes read, failures) to `agent`.
    /// Returns whether there was anything.
    pub fn poll(&mut self, agent: &mut Agent, now: Instant) -> bool {
        let mut any = false;
        while let Ok(msg) = self.rx.try_recv() {
            any = true;
            match msg {
                StreamMsg::Connected(id, local, w) => {
                    if self.streams.len() <= id.0 {
                        self.streams.resize_with(id.0 + 1, || None);
                    }
                    self.streams[id.0] = Some(w);
                    agent.turn_stream_connected(id, local, now);
                }
                StreamMsg::Data(id, data) => agent.handle_stream_data(now, id, &data),
                StreamMsg::Failed(id, e) => {
                    tracing::warn!(error = %e, "TURN stream failed");
                    if let Some(s) = self.streams.get_mut(id.0) {
                        *s = None;
                    }
                    agent.turn_stream_failed(id, now);
                }
            }
        }
        any
    }

    /// Appends bytes to stream `id`; a failed write fails the stream in `agent`.
    pub fn write(&mut self, agent: &mut Agent, id: StreamId, data: &[u8]) {
        let Some(Some(w)) = self.streams.get_mut(id.0) else {
            return;
        };
        if let Err(e) = w.write(data) {
            tracing::warn!(error = %e, "TURN stream write failed");
            self.streams[id.0] = None;
            agent.turn_stream_failed(id, Instant::now());
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
