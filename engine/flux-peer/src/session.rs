//! A transfer machine running over one QUIC connection (any [`QuicConnection`]).
//!
//! The session maps the machine's [`Stream`]s to QUIC streams (the receiver, as QUIC client,
//! opens the control stream; the sender opens one unidirectional stream per lane), moves bytes
//! between the machine's outbox and QUIC under flow control, and feeds received bytes to the
//! machine, pausing data lanes while the machine's disk lags behind. It does no socket or disk
//! I/O itself: the caller moves datagrams and performs the machine's disk requests.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use bytes::Bytes;
use flux_quic::conn::{Closed, ConnEvent, Dir, QuicConnection, ReadEnd, StreamId, WriteError};
use flux_transfer::{Machine, Stream};

/// A hook that may alter bytes the receiver reads: `(stream, offset in stream, bytes)`.
pub type Tamper = Box<dyn FnMut(Stream, u64, &mut [u8]) + Send>;

/// Which end of the QUIC connection this session is.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Side {
    /// The QUIC client: the receiver, which opens the control stream.
    Client,
    /// The QUIC server: the sender.
    Server,
}

/// Bytes a session reads from QUIC per call before yielding, so one busy stream cannot starve
/// the rest of the loop.
const READ_BUDGET: usize = 8 << 20;

/// Bytes taken from QUIC per read call: the machine's appetite (`wants_data`) is checked
/// between calls, so it is overfed by at most this much.
const READ_PIECE: usize = 1 << 20;

/// The least QUIC send window (bytes written and not yet acknowledged) a session keeps: enough
/// for slow start's first round trips on any path.
const SEND_WINDOW_FLOOR: u64 = 2 << 20;

/// A machine bound to a connection.
pub struct Session<M> {
    /// The transfer machine.
    pub machine: M,
    side: Side,
    control: Option<StreamId>,
    out_lanes: HashMap<u16, StreamId>,
    in_lanes: HashMap<StreamId, u16>,
    readable: BTreeSet<StreamId>,
    closed: Option<Closed>,
    /// Optional hook to alter received bytes before the machine sees them (tests inject
    /// corruption with it).
    pub tamper: Option<Tamper>,
    received: HashMap<Stream, u64>,
    /// The send window set on the connection now, and its ceiling (the configured window).
    send_window: u64,
    send_window_max: u64,
    /// Scratch for stream reads.
    pieces: Vec<Bytes>,
}

impl<M: std::fmt::Debug> std::fmt::Debug for Session<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("side", &self.side)
            .field("machine", &self.machine)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<M: Machine> Session<M> {
    /// A session for `machine` on one side of a connection. It keeps no reference to the
    /// connection: every call that moves bytes is given it (a stack may make the connection
    /// usable only once its handshake is over). The client opens the control stream as soon as
    /// the connection lets it.
    ///
    /// `send_window` is the configured QUIC send window, used as the ceiling of the adaptive one.
    pub fn new(machine: M, side: Side, send_window: u64) -> Self {
        Self {
            machine,
            side,
            control: None,
            out_lanes: HashMap::new(),
            in_lanes: HashMap::new(),
            readable: BTreeSet::new(),
            closed: None,
            tamper: None,
            received: HashMap::new(),
            send_window,
            send_window_max: send_window.max(SEND_WINDOW_FLOOR),
            pieces: Vec::new(),
        }
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// Moves everything that can move: connection events into the machine, machine output into
    /// QUIC. Call after feeding the connection a datagram or a timeout, and after completing the
    /// machine's disk requests.
    pub fn drive(&mut self, now: Instant, conn: &mut impl QuicConnection) {
        while let Some(ev) = conn.poll_event() {
            match ev {
                ConnEvent::StreamOpened(dir) => {
                    while let Some(id) = conn.accept_stream(dir) {
                        match dir {
                            Dir::Bi if self.control.is_none() && self.side == Side::Server => {
                                self.control = Some(id);
                            }
                            Dir::Uni if self.side == Side::Client => {
                                let n = u16::try_from(self.in_lanes.len()).unwrap_or(u16::MAX);
                                self.in_lanes.insert(id, n);
                            }
                            _ => {
                                // A stream this protocol has no use for: refuse it.
                                conn.refuse_stream(id);
                                continue;
                            }
                        }
                        self.readable.insert(id);
                    }
                }
                ConnEvent::Readable(id) => {
                    self.readable.insert(id);
                }
                ConnEvent::Lost(reason) => {
                    if !self.machine.is_over() {
                        tracing::debug!(%reason, "connection lost");
                    }
                    self.closed = Some(reason);
                }
            }
        }
        if self.side == Side::Client && self.control.is_none() {
            // Streams can be opened only once the peer's limits arrive with the handshake.
            self.control = conn.open_stream(Dir::Bi);
        }
        if self.machine.is_over() && self.machine.outbox().ready().is_empty() {
            return;
        }
        self.read(now, conn);
        self.write(conn);
    }

    fn read(&mut self, now: Instant, conn: &mut impl QuicConnection) {
        let mut budget = READ_BUDGET;
        let ids: Vec<StreamId> = self.readable.iter().copied().collect();
        for id in ids {
            let stream = if Some(id) == self.control {
                Stream::Control
            } else if let Some(&n) = self.in_lanes.get(&id) {
                if !self.machine.wants_data() {
                    continue;
                }
                Stream::Lane(n)
            } else {
                self.readable.remove(&id);
                continue;
            };
            let mut ended = false;
            let mut blocked = false;
            let mut pieces = std::mem::take(&mut self.pieces);
            loop {
                if budget == 0 || (stream != Stream::Control && !self.machine.wants_data()) {
                    break;
                }
                pieces.clear();
                let end = conn.read(id, budget.min(READ_PIECE), &mut pieces);
                for bytes in pieces.drain(..) {
                    budget = budget.saturating_sub(bytes.len());
                    let at = self.received.entry(stream).or_insert(0);
                    let off = *at;
                    *at += bytes.len() as u64;
                    match self.tamper.as_mut() {
                        Some(t) => {
                            let mut b = bytes.to_vec();
                            t(stream, off, &mut b);
                            self.machine.handle_stream_data(now, stream, &b);
                        }
                        // Owned: the receiver keeps chunk data as these very pieces.
                        None => self.machine.handle_stream_bytes(now, stream, bytes),
                    }
                }
                match end {
                    ReadEnd::More => {}
                    ReadEnd::Blocked => {
                        blocked = true;
                        break;
                    }
                    ReadEnd::Finished | ReadEnd::Reset => {
                        ended = true;
                        break;
                    }
                }
            }
            self.pieces = pieces;
            if ended {
                self.readable.remove(&id);
                self.machine.handle_stream_end(now, stream);
            } else if blocked {
                self.readable.remove(&id);
            }
        }
    }

    fn write(&mut self, conn: &mut impl QuicConnection) {
        self.size_send_window(conn);
        // Streams that cannot take more now (flow control, or not yet openable).
        let mut stuck: Vec<Stream> = Vec::new();
        // Oldest bytes first across streams: chunks leave in the order they were read, each at
        // the path's full rate, instead of every lane's chunk finishing late together.
        while let Some(stream) = self.machine.outbox().oldest(&stuck) {
            let Some(id) = self.stream_id(stream, conn) else {
                stuck.push(stream);
                continue;
            };
            let Some(front) = self.machine.outbox().front(stream).cloned() else {
                stuck.push(stream);
                continue;
            };
            // Handed over as `Bytes` (a reference, not a copy): QUIC keeps them until
            // acknowledged, and the sender's read buffers return to their recycler then.
            let len = front.len();
            match conn.write(id, front) {
                Ok(n) => {
                    self.machine.outbox().advance(stream, n);
                    if n < len {
                        stuck.push(stream);
                    }
                }
                Err(WriteError::Blocked) => stuck.push(stream),
                Err(WriteError::Gone) => {
                    // Stopped or closed: the peer is gone from this stream.
                    let n = self.machine.outbox().queued(stream);
                    self.machine.outbox().advance(stream, n);
                }
            }
        }
        for stream in self.machine.outbox().ready() {
            if let Some(id) = self.stream_id(stream, conn)
                && self.machine.outbox().take_fin(stream)
            {
                conn.finish(id);
            }
        }
    }

    /// The QUIC stream for `stream`, opening a lane's on first use; `None` while it cannot be
    /// opened yet (no control stream before the handshake, or the peer's stream limit reached).
    fn stream_id(&mut self, stream: Stream, conn: &mut impl QuicConnection) -> Option<StreamId> {
        match stream {
            Stream::Control => self.control,
            Stream::Lane(n) => match self.out_lanes.get(&n) {
                Some(id) => Some(*id),
                None => {
                    let id = conn.open_stream(Dir::Uni)?;
                    self.out_lanes.insert(n, id);
                    Some(id)
                }
            },
        }
    }

    /// Keeps the bytes QUIC holds unsent to about one congestion window beyond what is in
    /// flight (within the configured ceiling), so queueing happens in the outbox, in read order,
    /// rather than inside QUIC where streams are served round-robin.
    fn size_send_window(&mut self, conn: &mut impl QuicConnection) {
        let cwnd = conn.congestion_window();
        // What the path carries now: the sender's zstd level follows it.
        let rtt = conn.rtt().as_nanos().max(1);
        let rate = u128::from(cwnd) * 1_000_000_000 / rtt;
        self.machine
            .set_path_rate(u64::try_from(rate).unwrap_or(u64::MAX));
        let window = (2 * cwnd).clamp(SEND_WINDOW_FLOOR, self.send_window_max);
        if window != self.send_window {
            self.send_window = window;
            conn.set_send_window(window);
        }
    }
}
