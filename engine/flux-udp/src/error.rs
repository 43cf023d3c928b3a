//! Error type of the UDP layer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// An error from the UDP layer. Missing kernel features are not errors (see
/// [`Capabilities`](crate::Capabilities)); these are failed operations and API misuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UdpError {
    /// A system call failed.
    #[error("{op} on fd {fd} failed: {source}")]
    Io {
        /// The operation, e.g. `"sendmsg"`, `"setsockopt(SO_RCVBUF)"`.
        op: &'static str,
        /// The socket's file descriptor (-1 before the socket exists).
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A GSO batch exceeds `segment_size × segments ≤ 65507` or the segment cap.
    #[error(
        "GSO batch too large: {segments} segments of {segment_size} bytes ({len} bytes); \
         at most {max_segments} segments fit"
    )]
    GsoBatchTooLarge {
        /// Requested segment size.
        segment_size: usize,
        /// Segments the payload would be cut into.
        segments: usize,
        /// Payload length.
        len: usize,
        /// Largest allowed segment count for this segment size.
        max_segments: usize,
    },
    /// `segment_size` was `Some(0)`.
    #[error("GSO segment size must be non-zero")]
    ZeroSegmentSize,
    /// The destination's address family cannot be reached from this socket (an IPv6
    /// destination on an IPv4 socket).
    #[error("cannot send to {destination} from an IPv4 socket (fd {fd})")]
    AddressFamily {
        /// The socket.
        fd: RawFd,
        /// The unreachable destination.
        destination: SocketAddr,
    },
}

impl UdpError {
    /// `true` when the socket would block (send buffer full, nothing to receive): retry after
    /// readiness.
    pub fn is_would_block(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
    }

    /// The OS error number, for `Io` errors.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn last_os(op: &'static str, fd: RawFd) -> Self {
        Self::Io {
            op,
            fd,
            source: io::Error::last_os_error(),
        }
    }
}
