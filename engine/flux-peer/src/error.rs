//! Why a connection's transfer (or a whole worker) ended badly, as a type: callers match on
//! it instead of parsing text. The `Display` forms are the messages users see.

use std::net::SocketAddr;
use std::time::Duration;

use flux_transfer::{DiskFailure, TransferError};
use flux_wire::ErrorCode;

/// Why a transfer ended without success.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The transfer machine failed: here, or as the peer reported it
    /// ([`TransferError::Peer`], [`TransferError::Declined`]).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Nothing was heard from the peer for the QUIC idle timeout (keep-alives go out every
    /// second): it was killed, suspended, or the path went down.
    #[error(
        "connection lost: the peer went away (nothing heard from it for {:.0} s)",
        idle.as_secs_f64()
    )]
    PeerGone {
        /// The idle timeout.
        idle: Duration,
    },
    /// The QUIC connection closed under a running transfer, for this reason.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The QUIC handshake did not finish within the connect timeout.
    #[error("could not connect to {0} (timed out)")]
    ConnectTimeout(SocketAddr),
    /// The QUIC handshake failed (the peer's certificate is not the paired one, the peer
    /// refused this side's).
    #[error("could not connect to {peer}: {reason}")]
    ConnectFailed {
        /// Where to.
        peer: SocketAddr,
        /// The stack's words.
        reason: String,
    },
    /// ICE found no working pair.
    #[error("failed to establish ICE connection: {0}")]
    Ice(String),
    /// Cancelled here.
    #[error("cancelled")]
    Cancelled,
    /// The destination could not be looked at.
    #[error(transparent)]
    Destination(#[from] DiskFailure),
    /// This receiver refused the offer itself (`--out -` and a share of more than one file).
    #[error("{0}")]
    Refused(String),
}

impl NetError {
    /// The peer's own words when it stopped the transfer on purpose (`the host stopped
    /// (Ctrl-C)`), as opposed to failing or going away.
    pub fn peer_stopped(&self) -> Option<&str> {
        match self {
            Self::Transfer(TransferError::Peer {
                code: ErrorCode::Cancelled,
                message,
            }) => Some(message),
            _ => None,
        }
    }

    /// The receiver's reason, when this is its refusal of the offer (seen by the sender).
    pub fn declined(&self) -> Option<&str> {
        match self {
            Self::Transfer(TransferError::Declined(r)) => Some(r),
            _ => None,
        }
    }
}
