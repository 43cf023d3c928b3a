//! A minimal single-socket driver over flux-udp (feature `udp`): what the engine's loop does
//! for an [`Endpoint`], reduced to a poll loop for tests and benchmarks.
//!
//! It moves datagrams between one [`flux_udp::UdpSocket`] (GSO and GRO when the kernel has
//! them) and one endpoint. It reads no clock: every call takes the caller's `now`.

use std::time::{Duration, Instant};

use flux_udp::{EcnCodepoint, GRO_BUF_LEN, UdpError, UdpSocket};

use crate::{Ecn, Endpoint, Transmit};

/// Moves datagrams between a socket and an endpoint.
#[derive(Debug)]
pub struct UdpPump {
    sock: UdpSocket,
    buf: Vec<u8>,
    /// A transmit the kernel refused with `EWOULDBLOCK`, sent first next time.
    blocked: Option<Transmit>,
}

fn ecn_in(e: Option<EcnCodepoint>) -> Option<Ecn> {
    e.map(|e| match e {
        EcnCodepoint::Ect0 => Ecn::Ect0,
        EcnCodepoint::Ect1 => Ecn::Ect1,
        EcnCodepoint::Ce => Ecn::Ce,
    })
}

fn ecn_out(e: Option<Ecn>) -> Option<EcnCodepoint> {
    e.map(|e| match e {
        Ecn::Ect0 => EcnCodepoint::Ect0,
        Ecn::Ect1 => EcnCodepoint::Ect1,
        Ecn::Ce => EcnCodepoint::Ce,
    })
}

impl UdpPump {
    /// A pump over `sock`.
    pub fn new(sock: UdpSocket) -> Self {
        Self {
            sock,
            buf: vec![0; GRO_BUF_LEN],
            blocked: None,
        }
    }

    /// The socket.
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Hands every datagram waiting on the socket to `ep`; returns how many batches.
    pub fn recv(&mut self, ep: &mut Endpoint, now: Instant) -> Result<usize, UdpError> {
        let mut n = 0;
        loop {
            match self.sock.recv(&mut self.buf) {
                Ok(meta) => {
                    let len = meta.len.min(self.buf.len());
                    ep.handle(
                        now,
                        meta.addr,
                        ecn_in(meta.ecn),
                        &mut self.buf[..len],
                        Some(meta.stride),
                    );
                    n += 1;
                }
                Err(e) if e.is_would_block() => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends everything `ep` has to send; returns `false` when the socket's buffer is full
    /// (wait for it to drain: [`Self::wait`] with `write`).
    pub fn send(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, UdpError> {
        loop {
            let Some(t) = self.blocked.take().or_else(|| ep.poll_transmit(now)) else {
                return Ok(true);
            };
            let out = flux_udp::Transmit {
                destination: t.destination,
                contents: &t.contents,
                segment_size: t.segment_size,
                ecn: ecn_out(t.ecn),
                src_ip: None,
            };
            match self.sock.send(&out) {
                Ok(_) => ep.recycle(t.contents),
                Err(e) if e.is_would_block() => {
                    self.blocked = Some(t);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the socket is readable (or writable, with `write`), `ep`'s next timer, or
    /// `max`, whichever comes first. A due timer runs in the next [`Self::send`] (every
    /// transmit round starts with s2n's timers) or [`Endpoint::handle_timeout`].
    pub fn wait(
        &self,
        ep: &Endpoint,
        now: Instant,
        write: bool,
        max: Duration,
    ) -> Result<(), UdpError> {
        let until_timer = ep
            .poll_timeout()
            .map_or(max, |t| t.saturating_duration_since(now).min(max));
        if until_timer.is_zero() {
            return Ok(());
        }
        self.sock.wait(write, Some(until_timer)).map(|_| ())
    }
}
