//! The socket: creation, option probing, send and receive.

use std::io::{self, IoSliceMut};
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cmsg::{RecvHeader, SendHeader};
use crate::{
    Capabilities, MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD, RecvMeta, SocketConfig, Transmit, UdpError,
};

/// Logs a warning at most once per call site and process.
macro_rules! warn_once {
    ($($arg:tt)*) => {{
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!($($arg)*);
        }
    }};
}

/// A non-blocking UDP socket with probed capabilities. See the crate docs.
///
/// The socket is `Sync`: the only state that changes after creation is the GSO flag, an atomic.
#[derive(Debug)]
pub struct UdpSocket {
    socket: Socket,
    v6: bool,
    caps: Capabilities,
    gso: AtomicBool,
}

impl UdpSocket {
    /// Creates a socket bound to `addr` and configures it per `cfg`.
    pub fn bind(addr: SocketAddr, cfg: &SocketConfig) -> Result<Self, UdpError> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(|source| UdpError::Io {
                op: "socket",
                fd: -1,
                source,
            })?;
        socket.bind(&addr.into()).map_err(|source| UdpError::Io {
            op: "bind",
            fd: socket.as_raw_fd(),
            source,
        })?;
        Self::configure(socket, cfg)
    }

    /// Takes over an already bound socket (e.g. the one ICE chose) and configures it per `cfg`.
    pub fn from_std(socket: std::net::UdpSocket, cfg: &SocketConfig) -> Result<Self, UdpError> {
        Self::configure(Socket::from(socket), cfg)
    }

    fn configure(socket: Socket, cfg: &SocketConfig) -> Result<Self, UdpError> {
        let fd = socket.as_raw_fd();
        socket
            .set_nonblocking(true)
            .map_err(|source| UdpError::Io {
                op: "set_nonblocking",
                fd,
                source,
            })?;
        let local = socket.local_addr().map_err(|source| UdpError::Io {
            op: "getsockname",
            fd,
            source,
        })?;
        let v6 = local.is_ipv6();
        // A v6 socket that is not v6-only also carries IPv4 traffic (v4-mapped), which is
        // governed by the IPv4 options.
        let dual = v6 && !socket.only_v6().unwrap_or(true);

        let (recv_buffer, rforced) = set_buffer(
            fd,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            "SO_RCVBUF",
            cfg.recv_buffer,
        )?;
        let (send_buffer, sforced) = set_buffer(
            fd,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            "SO_SNDBUF",
            cfg.send_buffer,
        )?;
        if recv_buffer < cfg.recv_buffer || send_buffer < cfg.send_buffer {
            warn_once!(
                requested_recv = cfg.recv_buffer,
                recv_buffer,
                requested_send = cfg.send_buffer,
                send_buffer,
                "UDP socket buffers capped below the requested size (no CAP_NET_ADMIN; raise \
                 net.core.rmem_max/wmem_max); expect loss at high rates"
            );
        }

        // GSO: a successful getsockopt(UDP_SEGMENT) means the kernel knows the option.
        let gso = cfg.gso && {
            let ok = get_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok();
            if !ok {
                warn_once!("UDP GSO (UDP_SEGMENT) unavailable; sending one datagram per packet");
            }
            ok
        };
        let gro = cfg.gro && {
            let ok = set_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
            if !ok {
                warn_once!("UDP GRO (UDP_GRO) unavailable; receiving one datagram per call");
            }
            ok
        };
        let ecn = cfg.ecn && {
            let ok = if v6 {
                let ok6 = set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1).is_ok();
                let ok4 = !dual || set_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).is_ok();
                ok6 && ok4
            } else {
                set_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).is_ok()
            };
            if !ok {
                warn_once!("ECN reporting (IP_RECVTOS/IPV6_RECVTCLASS) unavailable");
            }
            ok
        };
        let pktinfo = cfg.pktinfo && {
            let ok = if v6 {
                let ok6 = set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1).is_ok();
                let ok4 = !dual || set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1).is_ok();
                ok6 && ok4
            } else {
                set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1).is_ok()
            };
            if !ok {
                warn_once!("packet info (IP_PKTINFO/IPV6_RECVPKTINFO) unavailable");
            }
            ok
        };
        let dont_fragment = cfg.dont_fragment && {
            // PROBE sets DF but ignores the kernel's path-MTU cache: QUIC probes the MTU itself
            // (RFC 9000 §14.3) and must not be clamped by ICMP it never saw. DO is the fallback.
            let set = |level, opt, probe, do_| {
                set_int(fd, level, opt, probe).is_ok() || set_int(fd, level, opt, do_).is_ok()
            };
            let ok = if v6 {
                let ok6 = set(
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU_DISCOVER,
                    libc::IPV6_PMTUDISC_PROBE,
                    libc::IPV6_PMTUDISC_DO,
                );
                let ok4 = !dual
                    || set(
                        libc::IPPROTO_IP,
                        libc::IP_MTU_DISCOVER,
                        libc::IP_PMTUDISC_PROBE,
                        libc::IP_PMTUDISC_DO,
                    );
                ok6 && ok4
            } else {
                set(
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_PROBE,
                    libc::IP_PMTUDISC_DO,
                )
            };
            if !ok {
                warn_once!("don't-fragment (IP_MTU_DISCOVER) unavailable; datagrams may fragment");
            }
            ok
        };

        let caps = Capabilities {
            gso,
            gro,
            ecn,
            pktinfo,
            dont_fragment,
            recv_buffer,
            send_buffer,
            buffers_forced: rforced && sforced,
        };
        tracing::debug!(fd, ?local, ?caps, "UDP socket configured");
        Ok(Self {
            socket,
            v6,
            caps,
            gso: AtomicBool::new(gso),
        })
    }

    /// Sends one transmit. Returns the number of datagrams handed to the kernel.
    ///
    /// A GSO batch goes out in one `sendmsg` when GSO is on; otherwise (or after the kernel
    /// refused GSO with `EIO`/`EINVAL`, which turns GSO off for this socket) its segments go
    /// out as separate datagrams through `sendmmsg`. In that fallback a full send buffer can
    /// leave a batch partly sent: the return value then is less than
    /// [`Transmit::segments`], and the rest is dropped like any lost datagram.
    pub fn send(&self, t: &Transmit<'_>) -> Result<usize, UdpError> {
        let segments = self.check(t)?;
        let mut hdr = SendHeader::new();
        if segments > 1 && self.gso_enabled() {
            let seg = t.segment_size.map(|s| s as u16);
            let p = self.prepare(&mut hdr, t, seg)?;
            match self.sendmsg(p) {
                Ok(()) => return Ok(segments),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                    // quinn-udp does the same: some NICs/drivers (and old kernels with
                    // checksum offload off) refuse GSO at send time only.
                    self.gso.store(false, Ordering::Relaxed);
                    warn_once!(
                        error = %e,
                        "kernel refused a GSO batch; GSO disabled, sending single datagrams"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if segments == 1 {
            let p = self.prepare(&mut hdr, t, None)?;
            return self.sendmsg(p).map(|()| 1);
        }
        self.send_split(&mut hdr, t, segments)
    }

    /// Receives one datagram or GRO batch into `buf` (use [`GRO_BUF_LEN`](crate::GRO_BUF_LEN)
    /// bytes on a GRO socket).
    pub fn recv(&self, buf: &mut [u8]) -> Result<RecvMeta, UdpError> {
        let mut hdr = RecvHeader::new();
        let p = hdr.prepare(buf);
        let fd = self.as_raw_fd();
        // SAFETY: `p` points at `hdr`, a local that stays in place for the call; it references
        // `buf` (exclusively borrowed, `buf.len()` bytes) and hdr's own name/control storage
        // with their true sizes, so the kernel writes only within them.
        let n = unsafe { libc::recvmsg(fd, p, 0) };
        if n < 0 {
            return Err(UdpError::last_os("recvmsg", fd));
        }
        hdr.meta(n as usize).ok_or(UdpError::Io {
            op: "recvmsg",
            fd,
            source: io::Error::new(io::ErrorKind::InvalidData, "no peer address"),
        })
    }

    /// Receives up to `min(bufs.len(), meta.len(), 32)` datagrams or GRO batches with one
    /// `recvmmsg`. Returns how many entries of `meta` were filled.
    pub fn recv_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Result<usize, UdpError> {
        let n = bufs.len().min(meta.len()).min(RECV_BATCH);
        if n == 0 {
            return Ok(0);
        }
        let fd = self.as_raw_fd();
        let mut hdrs: [RecvHeader; RECV_BATCH] = std::array::from_fn(|_| RecvHeader::new());
        // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value.
        let mut mm: [libc::mmsghdr; RECV_BATCH] = unsafe { mem::zeroed() };
        for i in 0..n {
            hdrs[i].prepare(&mut bufs[i]);
            mm[i].msg_hdr = hdrs[i].raw();
        }
        // SAFETY: `mm[..n]` hold msghdrs pointing into `hdrs[i]` (unmoved locals) and into
        // `bufs[i]` (exclusively borrowed), each with its true length; a null timeout blocks
        // never on a non-blocking socket.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                mm.as_mut_ptr(),
                n as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(UdpError::last_os("recvmmsg", fd));
        }
        let got = got as usize;
        for i in 0..got {
            hdrs[i].set_raw(mm[i].msg_hdr);
            meta[i] = hdrs[i].meta(mm[i].msg_len as usize).ok_or(UdpError::Io {
                op: "recvmmsg",
                fd,
                source: io::Error::new(io::ErrorKind::InvalidData, "no peer address"),
            })?;
        }
        Ok(got)
    }

    /// Validates `t` against this socket's GSO state and limits and fills `hdr` for it, for a
    /// caller that performs the send itself (io_uring `SendMsg`). Returns the `msghdr` pointer;
    /// `hdr` must stay in place and `t.contents` alive until the operation completes. A GSO
    /// batch is only prepared as such while [`UdpSocket::gso_enabled`]; otherwise split it
    /// and prepare each datagram on its own. After a failed GSO send, call
    /// [`UdpSocket::handle_send_error`].
    pub fn prepare_send(
        &self,
        hdr: &mut SendHeader,
        t: &Transmit<'_>,
    ) -> Result<*const libc::msghdr, UdpError> {
        let segments = self.check(t)?;
        let seg = if segments > 1 {
            t.segment_size.map(|s| s as u16)
        } else {
            None
        };
        self.prepare(hdr, t, seg)
    }

    /// Digests the error of a send the caller performed (io_uring): turns GSO off (warning
    /// once) on `EIO`/`EINVAL` for a GSO batch. Returns `true` when the batch should be
    /// retried as single datagrams.
    pub fn handle_send_error(&self, errno: i32, was_gso: bool) -> bool {
        if was_gso && (errno == libc::EIO || errno == libc::EINVAL) {
            self.gso.store(false, Ordering::Relaxed);
            warn_once!(
                errno,
                "kernel refused a GSO batch; GSO disabled on this socket"
            );
            return true;
        }
        false
    }

    /// Waits with `poll(2)` until the socket is readable (or also writable, when
    /// `want_write`), or `timeout` passes (`None`: no limit). Returns `(readable, writable)`;
    /// both `false` on timeout or an interrupting signal. The portable driver's only wait.
    pub fn wait(
        &self,
        want_write: bool,
        timeout: Option<std::time::Duration>,
    ) -> Result<(bool, bool), UdpError> {
        let fd = self.as_raw_fd();
        let mut events = libc::POLLIN;
        if want_write {
            events |= libc::POLLOUT;
        }
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // Round up so a sub-millisecond deadline does not become a busy loop.
        let ms = timeout.map_or(-1, |t| {
            i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        // SAFETY: one valid pollfd on the stack, count 1.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let err = UdpError::last_os("poll", fd);
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok((false, false));
            }
            return Err(err);
        }
        // Errors and hangups count as readable: the next recv reports them.
        let readable = pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok((readable, pfd.revents & libc::POLLOUT != 0))
    }

    /// The plain standard-library socket, keeping the options set so far (for handing the
    /// socket to another UDP stack, e.g. a reference benchmark).
    pub fn into_std(self) -> std::net::UdpSocket {
        self.socket.into()
    }

    /// Turns GSO off for this socket (tests and benches use it to exercise the fallback).
    pub fn disable_gso(&self) {
        self.gso.store(false, Ordering::Relaxed);
    }

    /// Probed capabilities, with `gso` reflecting the current state.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            gso: self.gso_enabled(),
            ..self.caps
        }
    }

    /// Whether GSO batches are currently sent as such.
    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Whether this is an IPv6 socket.
    pub fn is_ipv6(&self) -> bool {
        self.v6
    }

    /// The bound local address.
    pub fn local_addr(&self) -> Result<SocketAddr, UdpError> {
        self.socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| UdpError::last_os("getsockname", self.as_raw_fd()))
    }

    fn check(&self, t: &Transmit<'_>) -> Result<usize, UdpError> {
        let Some(seg) = t.segment_size else {
            return Ok(1);
        };
        if seg == 0 {
            return Err(UdpError::ZeroSegmentSize);
        }
        let segments = t.segments();
        let max_segments = crate::max_gso_segments(seg);
        if segments > 1
            && (segments > MAX_GSO_SEGMENTS
                || seg.saturating_mul(segments) > MAX_UDP_PAYLOAD
                || seg > usize::from(u16::MAX))
        {
            return Err(UdpError::GsoBatchTooLarge {
                segment_size: seg,
                segments,
                len: t.contents.len(),
                max_segments,
            });
        }
        Ok(segments)
    }

    fn prepare(
        &self,
        hdr: &mut SendHeader,
        t: &Transmit<'_>,
        seg: Option<u16>,
    ) -> Result<*const libc::msghdr, UdpError> {
        hdr.prepare(t, self.v6, seg).ok_or(UdpError::AddressFamily {
            fd: self.as_raw_fd(),
            destination: t.destination,
        })
    }

    fn sendmsg(&self, p: *const libc::msghdr) -> Result<(), UdpError> {
        let fd = self.as_raw_fd();
        // SAFETY: `p` comes from `prepare` on a header the caller keeps in place for this call;
        // it points at the transmit's contents (borrowed for the call) and at the header's own
        // name and control storage with their true lengths. The kernel only reads them.
        let n = unsafe { libc::sendmsg(fd, p, 0) };
        if n < 0 {
            return Err(UdpError::last_os("sendmsg", fd));
        }
        Ok(())
    }

    fn send_split(
        &self,
        hdr: &mut SendHeader,
        t: &Transmit<'_>,
        segments: usize,
    ) -> Result<usize, UdpError> {
        let fd = self.as_raw_fd();
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        self.prepare(hdr, t, None)?;
        let base = hdr.raw();
        // SAFETY: iovec and mmsghdr are plain C structs; all-zero is valid.
        let mut iovs: [libc::iovec; MAX_GSO_SEGMENTS] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut mm: [libc::mmsghdr; MAX_GSO_SEGMENTS] = unsafe { mem::zeroed() };
        // `check` bounded `segments` by MAX_GSO_SEGMENTS, so the zip covers every chunk.
        for (i, chunk) in t.contents.chunks(seg).enumerate().take(segments) {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            };
            mm[i].msg_hdr = base;
            mm[i].msg_hdr.msg_iov = &raw mut iovs[i];
        }
        let mut sent = 0;
        while sent < segments {
            // SAFETY: mm[sent..segments] are initialised above; each msghdr points at the
            // shared destination and control data inside `hdr` (unmoved for this call) and at
            // its own iovec in `iovs` covering part of `t.contents`. The kernel only reads.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    mm.as_mut_ptr().add(sent),
                    (segments - sent) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let err = UdpError::last_os("sendmmsg", fd);
                return if sent > 0 { Ok(sent) } else { Err(err) };
            }
            if n == 0 {
                break;
            }
            sent += n as usize;
        }
        Ok(sent)
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Sets a buffer size, preferring the `*FORCE` option; returns (effective size, forced).
fn set_buffer(
    fd: RawFd,
    force: libc::c_int,
    plain: libc::c_int,
    op: &'static str,
    size: usize,
) -> Result<(usize, bool), UdpError> {
    let want = size.min(i32::MAX as usize) as libc::c_int;
    let forced = set_int(fd, libc::SOL_SOCKET, force, want).is_ok();
    if !forced {
        // Not permitted (no CAP_NET_ADMIN): the plain option silently caps at {r,w}mem_max.
        set_int(fd, libc::SOL_SOCKET, plain, want).map_err(|source| UdpError::Io {
            op,
            fd,
            source,
        })?;
    }
    let got =
        get_int(fd, libc::SOL_SOCKET, plain).map_err(|source| UdpError::Io { op, fd, source })?;
    Ok((got.max(0) as usize, forced))
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int with its exact size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const val).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a live c_int and its size; the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&raw mut val).cast(), &mut len) };
    if rc == 0 {
        Ok(val)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Batch size of [`UdpSocket::recv_batch`]; quinn-udp uses 32 too (`BATCH_SIZE`).
const RECV_BATCH: usize = 32;
