//! The I/O provider that hands s2n-quic's endpoint to our loop instead of to a runtime.
//!
//! s2n-quic builds its endpoint, then gives it *by value* to the I/O provider's `start`
//! (`s2n-quic/src/server/providers.rs` and `client/providers.rs`: `io.start(endpoint)`).
//! Its own tokio provider spawns a task there that runs `s2n_quic_core::io::event_loop`. Ours
//! spawns nothing: it parks the endpoint in a slot, boxed behind [`Driven`], and the
//! [`crate::Endpoint`] that created it takes it out and calls the same four synchronous
//! methods the event loop calls (`s2n_quic_core::endpoint::Endpoint::{receive, transmit,
//! poll_wakeups, timeout}`), with our datagrams, our clock and our waker.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use s2n_quic_core::endpoint::{CloseError, Endpoint as S2nEndpoint};
use s2n_quic_core::inet::{ExplicitCongestionNotification, SocketAddress, datagram};
use s2n_quic_core::io::{rx, tx};
use s2n_quic_core::path::{Handle as _, LocalAddress, RemoteAddress, Tuple, mtu};
use s2n_quic_core::time::{Clock as _, NoopClock, Timestamp};

use crate::Ecn;

/// What [`crate::Endpoint`] needs from s2n's endpoint, without its (unnameable) generic type.
pub(crate) trait Driven: Send {
    fn receive(&mut self, rx: &mut RxDatagram<'_>, now: Timestamp);
    fn transmit(&mut self, tx: &mut TxQueue, now: Timestamp);
    fn poll_wakeups(
        &mut self,
        cx: &mut Context<'_>,
        now: Timestamp,
    ) -> Poll<Result<usize, CloseError>>;
    fn timeout(&self) -> Option<Timestamp>;
}

impl<E: S2nEndpoint<PathHandle = Tuple>> Driven for E {
    fn receive(&mut self, rx: &mut RxDatagram<'_>, now: Timestamp) {
        S2nEndpoint::receive(self, rx, &now);
    }

    fn transmit(&mut self, tx: &mut TxQueue, now: Timestamp) {
        S2nEndpoint::transmit(self, tx, &now);
    }

    fn poll_wakeups(
        &mut self,
        cx: &mut Context<'_>,
        now: Timestamp,
    ) -> Poll<Result<usize, CloseError>> {
        S2nEndpoint::poll_wakeups(self, cx, &now)
    }

    fn timeout(&self) -> Option<Timestamp> {
        S2nEndpoint::timeout(self)
    }
}

/// Where `start` leaves the endpoint for its owner to collect.
pub(crate) type Slot = Arc<Mutex<Option<Box<dyn Driven>>>>;

/// The s2n-quic I/O provider: parks the endpoint in `slot` and reports `local` as its address.
pub(crate) struct EngineIo {
    pub slot: Slot,
    pub local: SocketAddr,
    pub mtu: mtu::Config,
}

impl s2n_quic::provider::io::Provider for EngineIo {
    type PathHandle = Tuple;
    type Error = std::io::Error;

    fn start<E: S2nEndpoint<PathHandle = Self::PathHandle>>(
        self,
        mut endpoint: E,
    ) -> Result<SocketAddress, Self::Error> {
        // The tokio provider sets this after probing its socket; our caller knows the path.
        endpoint.set_mtu_config(self.mtu);
        let mut slot = self
            .slot
            .lock()
            .map_err(|_| std::io::Error::other("endpoint slot poisoned"))?;
        *slot = Some(Box::new(endpoint));
        Ok(self.local.into())
    }
}

/// Our clock, as s2n timestamps: microseconds since `epoch`, built without s2n's `unsafe`
/// constructor (`Timestamp::from_duration` is reserved for "time sources"): its no-op clock's
/// 1 µs plus an offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Self { epoch }
    }

    fn origin() -> Timestamp {
        NoopClock.get_time()
    }

    pub fn stamp(&self, now: Instant) -> Timestamp {
        let since = now.saturating_duration_since(self.epoch);
        Self::origin()
            .checked_add(since)
            .unwrap_or_else(Self::origin)
    }

    pub fn instant(&self, t: Timestamp) -> Instant {
        self.epoch + t.saturating_duration_since(Self::origin())
    }
}

pub(crate) fn to_s2n_ecn(ecn: Option<Ecn>) -> ExplicitCongestionNotification {
    match ecn {
        None => ExplicitCongestionNotification::NotEct,
        Some(Ecn::Ect0) => ExplicitCongestionNotification::Ect0,
        Some(Ecn::Ect1) => ExplicitCongestionNotification::Ect1,
        Some(Ecn::Ce) => ExplicitCongestionNotification::Ce,
    }
}

fn from_s2n_ecn(ecn: ExplicitCongestionNotification) -> Option<Ecn> {
    match ecn {
        ExplicitCongestionNotification::NotEct => None,
        ExplicitCongestionNotification::Ect0 => Some(Ecn::Ect0),
        ExplicitCongestionNotification::Ect1 => Some(Ecn::Ect1),
        ExplicitCongestionNotification::Ce => Some(Ecn::Ce),
    }
}

pub(crate) fn tuple(local: SocketAddr, remote: SocketAddr) -> Tuple {
    Tuple {
        remote_address: RemoteAddress::from(SocketAddress::from(remote)),
        local_address: LocalAddress::from(SocketAddress::from(local)),
    }
}

/// One received datagram or GRO batch, borrowed from the caller's buffer: s2n decrypts in
/// place, so nothing is copied. Each `stride`-byte segment is one datagram.
pub(crate) struct RxDatagram<'a> {
    pub header: datagram::Header<Tuple>,
    pub payload: &'a mut [u8],
    pub stride: usize,
    pub done: bool,
}

impl rx::Queue for RxDatagram<'_> {
    type Handle = Tuple;

    fn for_each<F: FnMut(datagram::Header<Tuple>, &mut [u8])>(&mut self, mut on_packet: F) {
        if self.done {
            return;
        }
        self.done = true;
        let header = self.header;
        for seg in self.payload.chunks_mut(self.stride.max(1)) {
            on_packet(header, seg);
        }
    }

    fn is_empty(&self) -> bool {
        self.done || self.payload.is_empty()
    }
}

/// One outgoing datagram or GSO batch.
#[derive(Debug)]
pub struct Transmit {
    /// Where to send.
    pub destination: SocketAddr,
    /// Payload: one datagram, or `segment_size`-byte segments back to back (the last one may
    /// be shorter).
    pub contents: Vec<u8>,
    /// GSO segment size, `None` for a single datagram.
    pub segment_size: Option<usize>,
    /// ECN codepoint for every segment.
    pub ecn: Option<Ecn>,
}

/// The batch being filled: segments of `size` bytes to one peer with one ECN mark.
struct Open {
    handle: Tuple,
    ecn: ExplicitCongestionNotification,
    size: usize,
    count: usize,
    buf: Vec<u8>,
}

/// s2n's transmit queue, batching segments for GSO the way s2n-quic-platform's socket queue
/// does (`s2n-quic-platform/src/socket/io/tx.rs`, `try_gso`), in safe code: a packet joins the
/// open batch when s2n says it may (`Message::can_gso`), has the same path and ECN mark, and
/// the batch is under its segment and 64 KiB limits; a shorter packet closes the batch.
pub(crate) struct TxQueue {
    pub out: VecDeque<Transmit>,
    open: Option<Open>,
    /// Largest UDP payload s2n may write (its max MTU less IP and UDP headers).
    max_payload: usize,
    max_segments: usize,
    /// Packets s2n may still push in this round.
    capacity: usize,
    spare: Vec<Vec<u8>>,
}

/// Largest UDP payload of one datagram or GSO batch (65535 − 20 − 8).
const MAX_UDP_PAYLOAD: usize = 65_507;

impl TxQueue {
    pub fn new(max_payload: usize, max_segments: usize) -> Self {
        Self {
            out: VecDeque::new(),
            open: None,
            max_payload,
            max_segments: max_segments.max(1),
            capacity: 0,
            spare: Vec::new(),
        }
    }

    /// Allows `packets` more packets in the next `transmit` round.
    pub fn set_capacity(&mut self, packets: usize) {
        self.capacity = packets;
    }

    /// Returns a sent batch's buffer for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 16 {
            buf.clear();
            self.spare.push(buf);
        }
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_UDP_PAYLOAD))
    }

    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            let segment_size = (o.count > 1).then_some(o.size);
            self.out.push_back(Transmit {
                destination: o.handle.remote_address().into(),
                contents: o.buf,
                segment_size,
                ecn: from_s2n_ecn(o.ecn),
            });
        }
    }

    /// Appends `message` to the open batch, if it may join it.
    fn try_join<M: tx::Message<Handle = Tuple>>(
        &mut self,
        message: &mut M,
    ) -> Option<Result<tx::Outcome, tx::Error>> {
        let max_segments = self.max_segments;
        let o = self.open.as_mut()?;
        let joins = message.can_gso(o.size, o.count)
            && message.path_handle().strict_eq(&o.handle)
            && message.ecn() == o.ecn;
        if !joins {
            self.close();
            return None;
        }
        let start = o.buf.len();
        o.buf.resize(start + o.size, 0);
        let written = message.write_payload(tx::PayloadBuffer::new(&mut o.buf[start..]), o.count);
        let n = match written {
            Ok(n) if n > 0 => n.min(o.size),
            Ok(_) => {
                o.buf.truncate(start);
                return Some(Err(tx::Error::EmptyPayload));
            }
            Err(e) => {
                o.buf.truncate(start);
                return Some(Err(e));
            }
        };
        o.buf.truncate(start + n);
        o.count += 1;
        let full =
            n != o.size || o.count >= max_segments || o.size * (o.count + 1) > MAX_UDP_PAYLOAD;
        if full {
            self.close();
        }
        Some(Ok(tx::Outcome { len: n, index: 0 }))
    }
}

impl tx::Queue for TxQueue {
    type Handle = Tuple;
    const SUPPORTS_ECN: bool = true;

    fn push<M: tx::Message<Handle = Self::Handle>>(
        &mut self,
        mut message: M,
    ) -> Result<tx::Outcome, tx::Error> {
        if self.capacity == 0 {
            return Err(tx::Error::AtCapacity);
        }
        if let Some(done) = self.try_join(&mut message) {
            if done.is_ok() {
                self.capacity -= 1;
            }
            return done;
        }
        let handle = *message.path_handle();
        let ecn = message.ecn();
        let can_gso = message.can_gso(self.max_payload, 0);
        let mut buf = self.buffer();
        buf.resize(self.max_payload, 0);
        let n = match message.write_payload(tx::PayloadBuffer::new(&mut buf), 0) {
            Ok(n) if n > 0 => n.min(self.max_payload),
            Ok(_) => {
                self.recycle(buf);
                return Err(tx::Error::EmptyPayload);
            }
            Err(e) => {
                self.recycle(buf);
                return Err(e);
            }
        };
        buf.truncate(n);
        self.capacity -= 1;
        self.open = Some(Open {
            handle,
            ecn,
            size: n,
            count: 1,
            buf,
        });
        if !(can_gso && self.max_segments > 1) {
            self.close();
        }
        Ok(tx::Outcome { len: n, index: 0 })
    }

    fn flush(&mut self) {
        self.close();
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

/// s2n's MTU configuration from IP MTUs (s2n counts the IP and UDP headers).
pub(crate) fn mtu_config(initial: u16, max: u16) -> Result<mtu::Config, mtu::MtuError> {
    let max = max.max(mtu::MINIMUM_MAX_DATAGRAM_SIZE + 48);
    let initial = initial.clamp(mtu::MINIMUM_MAX_DATAGRAM_SIZE + 48, max);
    mtu::Config::builder()
        .with_max_mtu(max)?
        .with_initial_mtu(initial)?
        .build()
}
