//! `msghdr` builders and control-message (cmsg) encode/decode, shared by the plain syscalls and
//! by io_uring `SENDMSG` / `RECVMSG`.
//!
//! Both headers point into themselves (`msg_name`, `msg_iov` and `msg_control` are addresses of
//! their own fields) once prepared, so a prepared header must not move until the operation that
//! uses it has completed. On the stack that is a local that lives across one syscall; for
//! io_uring, keep the header boxed (or in a slab slot) until the CQE arrives.

use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ptr;

use crate::{EcnCodepoint, RecvMeta, Transmit};

/// Size of the control buffer in [`SendHeader`] and [`RecvHeader`]: room for `UDP_GRO`/
/// `UDP_SEGMENT`, a TOS/traffic-class byte from both families and an IPv6 packet-info record
/// (each `CMSG_SPACE` is 24 or 40 bytes on 64-bit Linux).
pub const CMSG_BUF_LEN: usize = 128;

/// A reusable outgoing `msghdr`: destination, one `iovec` and the control messages (GSO segment
/// size, ECN, source address) of one [`Transmit`].
///
/// Use [`UdpSocket::prepare_send`](crate::UdpSocket::prepare_send) to fill it with the socket's
/// family and GSO state, then pass [`SendHeader::as_ptr`] to `sendmsg(2)` or to an io_uring
/// `SendMsg` entry. The header must not move, and the transmit's `contents` must stay alive and
/// unchanged, until that operation has completed.
pub struct SendHeader {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    ctrl: CmsgBuf,
}

/// A reusable incoming `msghdr`: peer address storage, one `iovec` and a control buffer.
///
/// [`RecvHeader::prepare`] points it at a receive buffer; after `recvmsg(2)` or an io_uring
/// `RecvMsg` completes with `n` bytes, [`RecvHeader::meta`] decodes the peer address, GRO
/// stride, ECN and destination address. The header must not move, and the buffer must stay
/// alive, until the operation has completed.
pub struct RecvHeader {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    ctrl: CmsgBuf,
}

impl SendHeader {
    /// An empty header.
    pub fn new() -> Self {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which all-zero
        // bytes is a valid (empty) value; raw pointers may be null.
        unsafe { mem::zeroed() }
    }

    /// Fills the header for `t` and returns the `msghdr` pointer for `sendmsg`.
    ///
    /// `socket_v6` is the socket's family; `gso_segment` adds a `UDP_SEGMENT` cmsg. Returns
    /// `None` when `t.destination` cannot be expressed in the socket's family (IPv6 on an IPv4
    /// socket). Validation of GSO limits is the caller's job
    /// ([`UdpSocket::prepare_send`](crate::UdpSocket::prepare_send) does it).
    pub fn prepare(
        &mut self,
        t: &Transmit<'_>,
        socket_v6: bool,
        gso_segment: Option<u16>,
    ) -> Option<*const libc::msghdr> {
        let namelen = encode_addr(&mut self.name, t.destination, socket_v6)?;
        self.iov = libc::iovec {
            iov_base: t.contents.as_ptr() as *mut libc::c_void,
            iov_len: t.contents.len(),
        };
        self.hdr.msg_name = (&raw mut self.name).cast();
        self.hdr.msg_namelen = namelen;
        self.hdr.msg_iov = &raw mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_flags = 0;

        // Which family's cmsgs apply follows the destination as the kernel will route it: an
        // IPv4 (or v4-mapped) destination goes through the IPv4 path even on a dual-stack socket.
        let v4_dest = match t.destination {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        let mut enc = Encoder::new(&mut self.ctrl);
        if let Some(seg) = gso_segment {
            enc.push(libc::SOL_UDP, libc::UDP_SEGMENT, seg);
        }
        if let Some(ecn) = t.ecn {
            let tos = ecn as libc::c_int;
            if v4_dest {
                enc.push(libc::IPPROTO_IP, libc::IP_TOS, tos);
            } else {
                enc.push(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos);
            }
        }
        match t.src_ip {
            Some(IpAddr::V4(ip)) if v4_dest => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                enc.push(libc::IPPROTO_IP, libc::IP_PKTINFO, info);
            }
            Some(ip) => {
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                enc.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
            }
            None => {}
        }
        let used = enc.finish();
        if used == 0 {
            self.hdr.msg_control = ptr::null_mut();
            self.hdr.msg_controllen = 0;
        } else {
            self.hdr.msg_control = self.ctrl.0.as_mut_ptr().cast();
            self.hdr.msg_controllen = used as _;
        }
        Some(&raw const self.hdr)
    }

    /// The prepared `msghdr` (valid only after [`SendHeader::prepare`]).
    pub fn as_ptr(&self) -> *const libc::msghdr {
        &raw const self.hdr
    }

    /// A copy of the prepared `msghdr`, for building `mmsghdr` arrays. The copy points into
    /// `self`, so `self` must not move while the copy is used.
    pub(crate) fn raw(&self) -> libc::msghdr {
        self.hdr
    }
}

impl Default for SendHeader {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvHeader {
    /// An empty header.
    pub fn new() -> Self {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which all-zero
        // bytes is a valid (empty) value; raw pointers may be null.
        unsafe { mem::zeroed() }
    }

    /// Points the header at `buf` and returns the `msghdr` pointer for `recvmsg`.
    pub fn prepare(&mut self, buf: &mut [u8]) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        self.hdr.msg_name = (&raw mut self.name).cast();
        self.hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        self.hdr.msg_iov = &raw mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.ctrl.0.as_mut_ptr().cast();
        self.hdr.msg_controllen = CMSG_BUF_LEN as _;
        self.hdr.msg_flags = 0;
        &raw mut self.hdr
    }

    /// Decodes the metadata after a receive of `len` bytes completed into this header.
    ///
    /// Returns `None` if the kernel reported no usable peer address (never for UDP sockets).
    pub fn meta(&self, len: usize) -> Option<RecvMeta> {
        let addr = decode_addr(&self.name, self.hdr.msg_namelen)?;
        let mut meta = RecvMeta {
            addr,
            len,
            stride: len,
            ecn: None,
            dst_ip: None,
        };
        if self.hdr.msg_control.is_null() || self.hdr.msg_controllen == 0 {
            return Some(meta);
        }
        // SAFETY: `hdr` was prepared by `prepare` with msg_control pointing at `self.ctrl`
        // (CMSG_BUF_LEN bytes, 8-aligned) and the kernel set msg_controllen to the bytes it
        // wrote, never more than the buffer; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
        // [msg_control, msg_control + msg_controllen) and return null at the end.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&self.hdr) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and was returned by CMSG_FIRSTHDR/NXTHDR, so it points
            // to a complete cmsghdr inside the control buffer.
            let c = unsafe { &*cmsg };
            match (c.cmsg_level, c.cmsg_type) {
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    if let Some(v) = read_data::<libc::c_int>(c)
                        && v > 0
                    {
                        meta.stride = v as usize;
                    }
                }
                (libc::IPPROTO_IP, libc::IP_TOS) => {
                    if let Some(v) = read_data::<u8>(c) {
                        meta.ecn = EcnCodepoint::from_bits(v);
                    }
                }
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                    if let Some(v) = read_data::<libc::c_int>(c) {
                        meta.ecn = EcnCodepoint::from_bits(v as u8);
                    }
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    if let Some(v) = read_data::<libc::in_pktinfo>(c) {
                        meta.dst_ip =
                            Some(IpAddr::V4(Ipv4Addr::from(v.ipi_addr.s_addr.to_ne_bytes())));
                    }
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    if let Some(v) = read_data::<libc::in6_pktinfo>(c) {
                        meta.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(v.ipi6_addr.s6_addr)));
                    }
                }
                _ => {}
            }
            // SAFETY: as above; `cmsg` is a valid header within the kernel-reported length.
            cmsg = unsafe { libc::CMSG_NXTHDR(&self.hdr, cmsg) };
        }
        Some(meta)
    }

    /// `MSG_*` flags the kernel reported (`MSG_TRUNC`, `MSG_CTRUNC`).
    pub fn flags(&self) -> libc::c_int {
        self.hdr.msg_flags
    }

    /// A copy of the prepared `msghdr`, for building `mmsghdr` arrays.
    pub(crate) fn raw(&self) -> libc::msghdr {
        self.hdr
    }

    /// Stores the `msghdr` the kernel updated inside an `mmsghdr` back into this header.
    pub(crate) fn set_raw(&mut self, hdr: libc::msghdr) {
        self.hdr = hdr;
    }
}

impl Default for RecvHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// Control-message buffer, aligned for `cmsghdr` (whose `cmsg_len` is a `size_t`).
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

/// Appends control messages to a [`CmsgBuf`].
struct Encoder<'a> {
    buf: &'a mut CmsgBuf,
    used: usize,
}

impl<'a> Encoder<'a> {
    fn new(buf: &'a mut CmsgBuf) -> Self {
        buf.0.fill(0);
        Self { buf, used: 0 }
    }

    fn push<T: Copy>(&mut self, level: libc::c_int, ty: libc::c_int, value: T) {
        let size = mem::size_of::<T>() as libc::c_uint;
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on the length.
        let (space, len) = unsafe { (libc::CMSG_SPACE(size), libc::CMSG_LEN(size)) };
        let space = space as usize;
        // Invariant: callers push at most UDP_SEGMENT + one TOS + one pktinfo record, whose
        // spaces add up to at most 24 + 24 + 40 = 88 < CMSG_BUF_LEN bytes.
        assert!(self.used + space <= CMSG_BUF_LEN, "cmsg buffer overflow");
        // SAFETY: `used` is a multiple of CMSG_SPACE granularity (8) inside an 8-aligned buffer,
        // so `base` is aligned for cmsghdr; `used + space <= CMSG_BUF_LEN` (checked above) keeps
        // the header and its data (CMSG_DATA(base)..+size, within `space`) inside the buffer.
        // The data pointer may be unaligned for T, hence write_unaligned.
        unsafe {
            let base = self
                .buf
                .0
                .as_mut_ptr()
                .add(self.used)
                .cast::<libc::cmsghdr>();
            (*base).cmsg_len = len as _;
            (*base).cmsg_level = level;
            (*base).cmsg_type = ty;
            ptr::write_unaligned(libc::CMSG_DATA(base).cast::<T>(), value);
        }
        self.used += space;
    }

    fn finish(self) -> usize {
        self.used
    }
}

/// Reads a cmsg's payload as `T` if it is large enough.
fn read_data<T: Copy>(c: &libc::cmsghdr) -> Option<T> {
    // SAFETY: CMSG_LEN is pure arithmetic.
    let need = unsafe { libc::CMSG_LEN(mem::size_of::<T>() as libc::c_uint) } as usize;
    // cmsg_len is size_t on glibc but u32 on musl: keep the cast for portability.
    #[allow(clippy::unnecessary_cast)]
    let have = c.cmsg_len as usize;
    if have < need {
        return None;
    }
    // SAFETY: the kernel wrote a cmsg of `cmsg_len >= CMSG_LEN(size_of::<T>())` bytes, so
    // `size_of::<T>()` bytes of data follow CMSG_DATA; T is a plain C type valid for any bits.
    // The data may be unaligned for T, hence read_unaligned.
    Some(unsafe { ptr::read_unaligned(libc::CMSG_DATA(c).cast::<T>()) })
}

/// Writes `addr` as a sockaddr for a socket of the given family; returns its length.
pub(crate) fn encode_addr(
    storage: &mut libc::sockaddr_storage,
    addr: SocketAddr,
    socket_v6: bool,
) -> Option<libc::socklen_t> {
    let v4 = match addr {
        SocketAddr::V4(a) if !socket_v6 => Some(a),
        SocketAddr::V6(a) if !socket_v6 => {
            Some(SocketAddrV4::new(a.ip().to_ipv4_mapped()?, a.port()))
        }
        _ => None,
    };
    if let Some(a) = v4 {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
        unsafe { ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin) };
        return Some(mem::size_of::<libc::sockaddr_in>() as libc::socklen_t);
    }
    let a = match addr {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
    };
    let sin6 = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: a.flowinfo().to_be(),
        sin6_addr: libc::in6_addr {
            s6_addr: a.ip().octets(),
        },
        sin6_scope_id: a.scope_id(),
    };
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
    unsafe { ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin6) };
    Some(mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
}

/// Reads a sockaddr the kernel wrote.
pub(crate) fn decode_addr(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family AF_INET with enough length: the storage holds a sockaddr_in;
            // sockaddr_storage is aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family AF_INET6 with enough length: the storage holds a sockaddr_in6;
            // sockaddr_storage is aligned for it.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_round_trip() {
        // SAFETY: all-zero sockaddr_storage is valid.
        let mut s: libc::sockaddr_storage = unsafe { mem::zeroed() };
        for (addr, v6) in [
            ("127.0.0.1:4433", false),
            ("[::1]:4433", true),
            ("[fe80::1%2]:9", true),
        ] {
            let a: SocketAddr = addr.parse().expect("addr");
            let len = encode_addr(&mut s, a, v6).expect("encodable");
            assert_eq!(decode_addr(&s, len), Some(a));
        }
        // v4 destination on a v6 socket becomes v4-mapped.
        let a: SocketAddr = "10.0.0.1:5".parse().expect("addr");
        let len = encode_addr(&mut s, a, true).expect("mapped");
        assert_eq!(
            decode_addr(&s, len),
            Some("[::ffff:10.0.0.1]:5".parse().expect("addr"))
        );
        // v6 destination on a v4 socket is refused unless v4-mapped.
        assert!(encode_addr(&mut s, "[::1]:1".parse().expect("addr"), false).is_none());
        let len = encode_addr(&mut s, "[::ffff:10.0.0.1]:5".parse().expect("a"), false)
            .expect("unmapped");
        assert_eq!(decode_addr(&s, len), Some(a));
    }

    #[test]
    fn send_cmsgs_encoded() {
        let mut h = SendHeader::new();
        let data = [0u8; 3000];
        let t = Transmit {
            destination: "127.0.0.1:1".parse().expect("addr"),
            contents: &data,
            segment_size: Some(1000),
            ecn: Some(EcnCodepoint::Ect0),
            src_ip: Some("127.0.0.1".parse().expect("ip")),
        };
        let p = h.prepare(&t, false, Some(1000)).expect("prepared");
        // SAFETY: `p` points at `h.hdr`, alive and unmoved.
        let hdr = unsafe { &*p };
        assert_eq!(hdr.msg_controllen, 24 + 24 + 32);
        // SAFETY: the header was just prepared; control data is within msg_controllen.
        let first = unsafe { &*libc::CMSG_FIRSTHDR(hdr) };
        assert_eq!(
            (first.cmsg_level, first.cmsg_type),
            (libc::SOL_UDP, libc::UDP_SEGMENT)
        );
        assert_eq!(read_data::<u16>(first), Some(1000));
    }
}
