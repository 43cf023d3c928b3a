//! UDP socket layer for the Thruflux engine: socket buffers, GSO, GRO, ECN, packet info,
//! don't-fragment, and run-time capability probing with graceful fallback.
//!
//! # What it does
//!
//! - [`UdpSocket::bind`] / [`UdpSocket::from_std`] make a non-blocking UDP socket (IPv4 or
//!   IPv6), grow its buffers ([`SocketConfig`]), and probe what the kernel offers. The result is
//!   a [`Capabilities`] value; every missing feature is a `false` flag plus one `tracing::warn!`
//!   per process, never an error.
//! - [`UdpSocket::send`] sends one [`Transmit`]: a single datagram or a GSO batch of
//!   `segment_size`-byte segments (the last one may be shorter). Without GSO (absent, disabled,
//!   or turned off after the kernel refused a batch with `EIO`/`EINVAL`) the same batch goes out
//!   as separate datagrams through one `sendmmsg`.
//! - [`UdpSocket::recv`] / [`UdpSocket::recv_batch`] receive with `recvmsg` / `recvmmsg` and
//!   return [`RecvMeta`], whose `stride` is the GRO segment size. [`RecvMeta::segments`] walks a
//!   GRO batch; the last segment may be shorter and may even be a different protocol's datagram
//!   (a STUN check appended to a QUIC batch), so callers demultiplex per segment.
//! - [`SendHeader`] and [`RecvHeader`] are the reusable `msghdr` + `iovec` + control-buffer
//!   builders used by the syscalls above. An io_uring driver fills the same structures and hands
//!   their pointers to `IORING_OP_SENDMSG` / `IORING_OP_RECVMSG`, so the cmsg encode/decode code
//!   is shared.
//!
//! # What it does not do
//!
//! - No event loop, readiness polling or io_uring ring: the caller (flux-engine / flux-peer)
//!   decides when to call, and handles `WouldBlock` ([`UdpError::is_would_block`]).
//! - No protocol knowledge: it neither parses QUIC nor STUN, and never retransmits.
//! - No MTU discovery: it only sets the don't-fragment behaviour (`IP_PMTUDISC_PROBE`) that
//!   lets QUIC probe the path MTU itself.
//! - Linux only.
//!
//! # Limits
//!
//! A GSO batch must satisfy `segment_size × segments ≤ 65507` and `segments ≤ 64`
//! ([`max_gso_segments`]); larger batches are rejected with [`UdpError::GsoBatchTooLarge`]
//! before the syscall, because the kernel's `EMSGSIZE` would look like a failed MTU probe.

mod cmsg;
mod error;
mod socket;

use std::net::{IpAddr, SocketAddr};

pub use cmsg::{CMSG_BUF_LEN, RecvHeader, SendHeader};
pub use error::UdpError;
pub use socket::UdpSocket;

/// Explicit Congestion Notification codepoint carried in the low two bits of the IPv4 TOS /
/// IPv6 traffic class byte (RFC 3168 §5).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[repr(u8)]
pub enum EcnCodepoint {
    /// ECN-capable transport, codepoint ECT(0) (`0b10`).
    Ect0 = 0b10,
    /// ECN-capable transport, codepoint ECT(1) (`0b01`).
    Ect1 = 0b01,
    /// Congestion experienced (`0b11`).
    Ce = 0b11,
}

impl EcnCodepoint {
    /// Decodes the ECN bits of a TOS / traffic-class byte; `None` for Not-ECT (`0b00`).
    pub fn from_bits(tos: u8) -> Option<Self> {
        match tos & 0b11 {
            0b10 => Some(Self::Ect0),
            0b01 => Some(Self::Ect1),
            0b11 => Some(Self::Ce),
            _ => None,
        }
    }
}

/// One outgoing datagram or GSO batch.
#[derive(Clone, Copy, Debug)]
pub struct Transmit<'a> {
    /// Where to send.
    pub destination: SocketAddr,
    /// Payload. With `segment_size`, the concatenation of the segments.
    pub contents: &'a [u8],
    /// GSO segment size: `contents` is cut into datagrams of this many bytes, the last one
    /// possibly shorter. `None` sends `contents` as one datagram.
    pub segment_size: Option<usize>,
    /// ECN codepoint to mark every datagram with.
    pub ecn: Option<EcnCodepoint>,
    /// Source address to send from (needs a socket bound to a wildcard address).
    pub src_ip: Option<IpAddr>,
}

impl Transmit<'_> {
    /// Number of datagrams this transmit becomes on the wire.
    pub fn segments(&self) -> usize {
        match self.segment_size {
            Some(s) if s > 0 => self.contents.len().div_ceil(s).max(1),
            _ => 1,
        }
    }
}

/// Metadata of one received datagram or GRO batch.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RecvMeta {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Bytes written into the buffer (all segments of a GRO batch together).
    pub len: usize,
    /// GRO segment size: every segment is `stride` bytes except possibly the last. Equals
    /// `len` when the kernel did not coalesce.
    pub stride: usize,
    /// ECN codepoint, when the socket reports it and the datagram carried one.
    pub ecn: Option<EcnCodepoint>,
    /// The local address the datagram was sent to, when packet info is enabled.
    pub dst_ip: Option<IpAddr>,
}

impl RecvMeta {
    /// Iterates the datagrams of a GRO batch in `buf` (the buffer this meta was received into).
    ///
    /// The last segment may be shorter than `stride`, and may belong to another protocol on
    /// the same 5-tuple: demultiplex each segment on its own.
    pub fn segments<'b>(&self, buf: &'b [u8]) -> std::slice::Chunks<'b, u8> {
        let len = self.len.min(buf.len());
        buf[..len].chunks(self.stride.max(1))
    }
}

/// Run-time probed features of one socket. A `false` flag means the feature is absent or was
/// turned off; the socket still works without it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Capabilities {
    /// UDP generic segmentation offload (`UDP_SEGMENT`) is usable for sending. May turn
    /// `false` later, after the kernel refused a GSO batch ([`UdpSocket::gso_enabled`]).
    pub gso: bool,
    /// UDP generic receive offload (`UDP_GRO`) is enabled on the socket.
    pub gro: bool,
    /// ECN bits are reported on receive (`IP_RECVTOS` / `IPV6_RECVTCLASS`).
    pub ecn: bool,
    /// Destination address is reported on receive (`IP_PKTINFO` / `IPV6_RECVPKTINFO`).
    pub pktinfo: bool,
    /// Datagrams are sent with don't-fragment set (`IP_MTU_DISCOVER`).
    pub dont_fragment: bool,
    /// Effective receive buffer in bytes, as read back from the kernel (which doubles the
    /// requested value for bookkeeping overhead).
    pub recv_buffer: usize,
    /// Effective send buffer in bytes, as read back from the kernel.
    pub send_buffer: usize,
    /// Whether the `*BUFFORCE` options were accepted (needs `CAP_NET_ADMIN`), so the buffer
    /// sizes were not capped at `net.core.{r,w}mem_max`.
    pub buffers_forced: bool,
}

impl Capabilities {
    /// Largest number of segments one GSO batch may carry for `segment_size`: 1 without GSO.
    pub fn max_gso_segments(&self, segment_size: usize) -> usize {
        if self.gso {
            max_gso_segments(segment_size)
        } else {
            1
        }
    }
}

/// Options for [`UdpSocket::bind`] / [`UdpSocket::from_std`].
#[derive(Clone, Debug)]
pub struct SocketConfig {
    /// Requested receive buffer in bytes (before the kernel doubles it).
    pub recv_buffer: usize,
    /// Requested send buffer in bytes.
    pub send_buffer: usize,
    /// Use GSO when the kernel supports it.
    pub gso: bool,
    /// Enable GRO when the kernel supports it. A GRO socket must be read with buffers of at
    /// least [`GRO_BUF_LEN`] bytes, or batches are truncated.
    pub gro: bool,
    /// Ask for ECN reporting on receive.
    pub ecn: bool,
    /// Ask for destination-address reporting on receive.
    pub pktinfo: bool,
    /// Set don't-fragment (`IP_PMTUDISC_PROBE`, falling back to `IP_PMTUDISC_DO`).
    pub dont_fragment: bool,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            recv_buffer: DEFAULT_SOCKET_BUFFER,
            send_buffer: DEFAULT_SOCKET_BUFFER,
            gso: true,
            gro: true,
            ecn: true,
            pktinfo: true,
            dont_fragment: true,
        }
    }
}

/// Largest number of segments one GSO batch may carry for `segment_size`, honouring both the
/// kernel's segment cap and the 64 KiB datagram limit (`segment_size × segments ≤ 65507`).
pub fn max_gso_segments(segment_size: usize) -> usize {
    if segment_size == 0 {
        return 1;
    }
    (MAX_UDP_PAYLOAD / segment_size).clamp(1, MAX_GSO_SEGMENTS)
}

/// Largest UDP payload of one (super-)datagram: 65535 − 20 (IPv4 header) − 8 (UDP header).
/// A GSO batch is one datagram to the stack until segmentation, so it is bound by this too
/// (platform pitfall 1: larger batches fail with `EMSGSIZE`).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Segment cap per GSO batch. `UDP_MAX_SEGMENTS` is 64 in kernels before 6.9 and 128 after;
/// 64 works everywhere and 64 × 1452 already reaches the byte limit.
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Receive buffer size that holds any GRO batch (64 KiB).
pub const GRO_BUF_LEN: usize = 65_536;

/// Default requested socket buffer: 32 MiB (the kernel doubles it for bookkeeping). The 208 KiB
/// default loses thousands of packets per 2 GiB transfer on loopback (platform pitfall 2), and
/// 8 MiB still overflowed at 1% loss while the receiver was busy; without `CAP_NET_ADMIN` the
/// kernel caps it at `rmem_max` (4 MiB on the dev VM).
pub const DEFAULT_SOCKET_BUFFER: usize = 32 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_segment_limits() {
        assert_eq!(max_gso_segments(1452), 45);
        assert!(max_gso_segments(1452) * 1452 <= MAX_UDP_PAYLOAD);
        assert_eq!(max_gso_segments(100), 64);
        assert_eq!(max_gso_segments(65_507), 1);
        assert_eq!(max_gso_segments(0), 1);
        assert_eq!(max_gso_segments(100_000), 1);
    }

    #[test]
    fn ecn_bits() {
        assert_eq!(EcnCodepoint::from_bits(0b10), Some(EcnCodepoint::Ect0));
        assert_eq!(EcnCodepoint::from_bits(0xfd), Some(EcnCodepoint::Ect1));
        assert_eq!(EcnCodepoint::from_bits(0b11), Some(EcnCodepoint::Ce));
        assert_eq!(EcnCodepoint::from_bits(0b100), None);
    }

    #[test]
    fn segments_iterator_short_last() {
        let buf: Vec<u8> = (0..25u8).collect();
        let meta = RecvMeta {
            addr: "127.0.0.1:1".parse().expect("addr"),
            len: 25,
            stride: 10,
            ecn: None,
            dst_ip: None,
        };
        let segs: Vec<&[u8]> = meta.segments(&buf).collect();
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[2], &[20, 21, 22, 23, 24]);
    }
}
