//! flux-quic's connection seam ([`QuicConnection`]) over an s2n-quic connection.
//!
//! s2n hands out stream *handles* and wakes wakers; the seam wants stream *ids* and events.
//! [`S2nConn`] keeps the handles by id and gives each receive stream a waker that queues its id,
//! so `Readable(id)` events are exact, as quinn-proto's are. Streams the peer opens are taken
//! from s2n as soon as they arrive and announced with `StreamOpened`.
//!
//! What does not map: transmits and timers. s2n runs them per *endpoint*
//! ([`crate::Endpoint::poll_transmit`], [`crate::Endpoint::poll_timeout`]), so this type's
//! `poll_transmit` returns `None`, `poll_timeout` `None` and `handle_timeout` does nothing; the
//! node must drive the endpoint. Windows are fixed per endpoint in s2n ([`crate::Config`]), so
//! `set_send_window` and `set_receive_window` do nothing; `close` sends the code, not the
//! reason.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_quic::conn::{
    Closed, ConnEvent, Dir, PathStats, QuicConnection, ReadEnd, StreamId, WriteError,
};

use crate::{Connection, Fingerprint, events};

/// Ids of receive streams whose wakers fired.
type Ready = Arc<Mutex<VecDeque<StreamId>>>;

/// A receive stream's waker: queues the stream's id and wakes the endpoint's loop.
struct StreamWake {
    id: StreamId,
    ready: Ready,
    endpoint: Waker,
}

impl Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Ok(mut q) = self.ready.lock() {
            q.push_back(self.id);
        }
        self.endpoint.wake_by_ref();
    }
}

struct Recv {
    stream: s2n_quic::stream::ReceiveStream,
    waker: Waker,
}

/// Streams the peer opened, taken from s2n, waiting for `accept_stream`.
enum Incoming {
    Uni(s2n_quic::stream::ReceiveStream),
    Bi(s2n_quic::stream::BidirectionalStream),
}

/// An s2n connection behind flux-quic's [`QuicConnection`].
pub struct S2nConn {
    conn: s2n_quic::Connection,
    waker: Waker,
    ready: Ready,
    send: HashMap<StreamId, s2n_quic::stream::SendStream>,
    /// Each send stream's buffer size, as s2n reported it while the stream was empty.
    send_caps: HashMap<StreamId, u64>,
    /// Most bytes written and not yet acknowledged across the connection's streams
    /// ([`QuicConnection::set_send_window`]); s2n itself bounds each stream only.
    send_window: Option<u64>,
    recv: HashMap<StreamId, Recv>,
    incoming_uni: VecDeque<Incoming>,
    incoming_bi: VecDeque<Incoming>,
    /// The connection's end was reported (once).
    lost: bool,
}

impl std::fmt::Debug for S2nConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S2nConn")
            .field("id", &self.conn.id())
            .field("send", &self.send.len())
            .field("recv", &self.recv.len())
            .finish_non_exhaustive()
    }
}

impl From<Connection> for S2nConn {
    fn from(c: Connection) -> Self {
        Self {
            conn: c.inner,
            waker: c.waker,
            ready: Ready::default(),
            send: HashMap::new(),
            send_caps: HashMap::new(),
            send_window: None,
            recv: HashMap::new(),
            incoming_uni: VecDeque::new(),
            incoming_bi: VecDeque::new(),
            lost: false,
        }
    }
}

impl S2nConn {
    /// Keeps a send stream, learning its buffer size (all of it is free while it is empty).
    fn add_send(&mut self, mut stream: s2n_quic::stream::SendStream) -> StreamId {
        let id = stream.id();
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(Ok(room)) = stream.poll_send_ready(&mut cx) {
            self.send_caps.insert(id, room as u64);
        }
        self.send.insert(id, stream);
        id
    }

    /// Bytes the send streams hold (written, not yet acknowledged).
    fn buffered(&mut self) -> u64 {
        let mut cx = Context::from_waker(&self.waker);
        let mut total = 0;
        for (id, s) in &mut self.send {
            let Some(&cap) = self.send_caps.get(id) else {
                continue;
            };
            total += match s.poll_send_ready(&mut cx) {
                Poll::Ready(Ok(room)) => cap.saturating_sub(room as u64),
                Poll::Pending => cap,
                Poll::Ready(Err(_)) => 0,
            };
        }
        total
    }

    fn add_recv(&mut self, stream: s2n_quic::stream::ReceiveStream) -> StreamId {
        let id = stream.id();
        let waker = Waker::from(Arc::new(StreamWake {
            id,
            ready: self.ready.clone(),
            endpoint: self.waker.clone(),
        }));
        // A stream may hold data already: let the session read it once.
        if let Ok(mut q) = self.ready.lock() {
            q.push_back(id);
        }
        self.recv.insert(id, Recv { stream, waker });
        id
    }

    fn context_stats(&self) -> events::Stats {
        self.conn
            .query_event_context(|c: &events::Context| c.stats.clone())
            .unwrap_or_default()
    }

    fn closed(&self) -> Option<Closed> {
        let err = self
            .conn
            .query_event_context(|c: &events::Context| c.closed)
            .ok()
            .flatten()?;
        Some(match err {
            s2n_quic::connection::Error::IdleTimerExpired { .. } => Closed::TimedOut,
            e => Closed::Other(e.to_string()),
        })
    }

    /// Takes streams the peer opened off s2n's queues.
    fn take_incoming(&mut self) -> Option<Dir> {
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(Ok(Some(s))) = self.conn.poll_accept_receive_stream(&mut cx) {
            self.incoming_uni.push_back(Incoming::Uni(s));
            return Some(Dir::Uni);
        }
        if let Poll::Ready(Ok(Some(s))) = self.conn.poll_accept_bidirectional_stream(&mut cx) {
            self.incoming_bi.push_back(Incoming::Bi(s));
            return Some(Dir::Bi);
        }
        None
    }
}

impl S2nConn {
    /// The peer's address.
    pub(crate) fn remote(&self) -> Option<std::net::SocketAddr> {
        self.conn.remote_addr().ok()
    }

    /// Abandons the sending side of stream `id` with an application `code` (the seam has no
    /// such call yet; the peer reads [`ReadEnd::Reset`]).
    pub fn reset(&mut self, id: StreamId, code: u32) {
        if let Some(mut s) = self.send.remove(&id) {
            let _ = s.reset(code.into());
        }
    }
}

impl QuicConnection for S2nConn {
    fn poll_event(&mut self) -> Option<ConnEvent> {
        if let Some(dir) = self.take_incoming() {
            return Some(ConnEvent::StreamOpened(dir));
        }
        loop {
            let id = self.ready.lock().ok().and_then(|mut q| q.pop_front());
            match id {
                Some(id) if self.recv.contains_key(&id) => return Some(ConnEvent::Readable(id)),
                Some(_) => continue,
                None => break,
            }
        }
        if !self.lost
            && let Some(c) = self.closed()
        {
            self.lost = true;
            return Some(ConnEvent::Lost(c));
        }
        None
    }

    fn open_stream(&mut self, dir: Dir) -> Option<StreamId> {
        let mut cx = Context::from_waker(&self.waker);
        match dir {
            Dir::Uni => match self.conn.poll_open_send_stream(&mut cx) {
                Poll::Ready(Ok(s)) => Some(self.add_send(s)),
                _ => None,
            },
            Dir::Bi => match self.conn.poll_open_bidirectional_stream(&mut cx) {
                Poll::Ready(Ok(s)) => {
                    let (rx, tx) = s.split();
                    let id = self.add_send(tx);
                    self.add_recv(rx);
                    Some(id)
                }
                _ => None,
            },
        }
    }

    fn accept_stream(&mut self, dir: Dir) -> Option<StreamId> {
        let queue = match dir {
            Dir::Uni => &mut self.incoming_uni,
            Dir::Bi => &mut self.incoming_bi,
        };
        match queue.pop_front()? {
            Incoming::Uni(rx) => Some(self.add_recv(rx)),
            Incoming::Bi(s) => {
                let (rx, tx) = s.split();
                self.add_send(tx);
                Some(self.add_recv(rx))
            }
        }
    }

    fn refuse_stream(&mut self, id: StreamId) {
        if let Some(mut r) = self.recv.remove(&id) {
            let _ = r.stream.stop_sending(1u32.into());
        }
    }

    fn read(&mut self, id: StreamId, max: usize, out: &mut Vec<Bytes>) -> ReadEnd {
        let Some(r) = self.recv.get_mut(&id) else {
            // Read to its end (or refused) before: its end was reported then.
            return ReadEnd::Blocked;
        };
        let mut cx = Context::from_waker(&r.waker);
        let mut left = max;
        let end = loop {
            if left == 0 {
                break ReadEnd::More;
            }
            match r.stream.poll_receive(&mut cx) {
                Poll::Pending => break ReadEnd::Blocked,
                Poll::Ready(Ok(Some(b))) => {
                    left = left.saturating_sub(b.len());
                    out.push(b);
                }
                Poll::Ready(Ok(None)) => break ReadEnd::Finished,
                Poll::Ready(Err(_)) => break ReadEnd::Reset,
            }
        };
        if matches!(end, ReadEnd::Finished | ReadEnd::Reset) {
            self.recv.remove(&id);
        }
        end
    }

    fn write(&mut self, id: StreamId, data: Bytes) -> Result<usize, WriteError> {
        // The connection's window: the session keeps what QUIC holds to about a congestion
        // window beyond what is in flight, so queueing happens in its outbox, in read order.
        let allowed = match self.send_window {
            Some(w) => {
                let left = w.saturating_sub(self.buffered());
                if left == 0 {
                    return Err(WriteError::Blocked);
                }
                usize::try_from(left).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        let data = data.slice(..data.len().min(allowed));
        let s = self.send.get_mut(&id).ok_or(WriteError::Gone)?;
        let mut cx = Context::from_waker(&self.waker);
        match s.poll_send_ready(&mut cx) {
            Poll::Pending => Err(WriteError::Blocked),
            Poll::Ready(Err(_)) => Err(WriteError::Gone),
            Poll::Ready(Ok(room)) => {
                let n = room.min(data.len());
                if n == 0 {
                    return Err(WriteError::Blocked);
                }
                s.send_data(data.slice(..n)).map_err(|_| WriteError::Gone)?;
                Ok(n)
            }
        }
    }

    fn finish(&mut self, id: StreamId) {
        if let Some(s) = self.send.get_mut(&id) {
            let _ = s.finish();
        }
        // A finishing stream reports no free room: it no longer counts against the window
        // (what it still holds is at most one stream's tail).
        self.send_caps.remove(&id);
    }

    fn set_send_window(&mut self, bytes: u64) {
        // s2n bounds each stream's buffer (`Config::send_buffer`); the connection's bound is
        // kept here, over the sum of the streams' buffers.
        self.send_window = Some(bytes);
    }

    fn set_receive_window(&mut self, _bytes: u64) {
        // Fixed per endpoint in s2n: `Config::conn_window` / `stream_window`.
    }

    fn rtt(&self) -> Duration {
        self.context_stats().rtt
    }

    fn congestion_window(&self) -> u64 {
        self.context_stats().cwnd
    }

    fn stats(&self) -> PathStats {
        let s = self.context_stats();
        PathStats {
            rtt: s.rtt,
            cwnd: s.cwnd,
            sent_packets: s.sent_packets,
            lost_packets: s.lost_packets,
            mtu: s.mtu,
            congestion_events: s.congestion_events,
            udp_tx_bytes: s.sent_bytes,
            udp_rx_bytes: s.received_bytes,
        }
    }

    fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.conn
            .query_event_context(|c: &events::Context| c.peer)
            .ok()
            .flatten()
    }

    fn is_handshaking(&self) -> bool {
        // s2n hands out a connection only once its handshake is complete.
        false
    }

    fn is_closed(&self) -> bool {
        self.closed().is_some()
    }

    fn close(&mut self, _now: Instant, code: u32, _reason: Bytes) {
        self.conn.close(code.into());
    }
}
