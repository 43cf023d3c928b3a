//! The hand-over to the data engine: everything a transfer needs once pairing is done.
//!
//! [`run_transfer`] is the single entry point `main.rs` calls, once per paired peer (a host
//! calls it for every joiner, possibly at the same time from several threads). **It is a
//! stub:** the engine that moves the bytes is not wired in yet, and it returns
//! [`TransferError::NotWired`] after checking what it can. Nothing here pretends to transfer.
//!
//! What the engine gets: the [`Paired`] peer (pinned fingerprint, authenticated addresses),
//! the local QUIC identity whose fingerprint the peer pinned, the UDP socket whose port was
//! advertised during pairing, the job (paths to send, or where to receive and whether to
//! overwrite), the tuning flags, and the [`Ui`] for the prompt and progress.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;

use clap::ValueEnum;
use flux_quic::{Identity, TransportParams};

use crate::cli::Exit;
use crate::pairing::Paired;
use crate::ui::{Summary, Ui};

/// Which I/O driver the engine uses.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring (fails if unavailable).
    Uring,
    /// The portable epoll driver.
    Epoll,
}

/// What this side does.
#[derive(Clone, Debug)]
pub enum Job {
    /// Host: offer these files and directories.
    Send {
        /// As given on the command line (checked to exist).
        paths: Vec<PathBuf>,
    },
    /// Joiner: receive into `out`.
    Receive {
        /// Destination directory.
        out: PathBuf,
        /// Accept without asking (`--yes`).
        yes: bool,
        /// Allow overwriting (`--force`).
        force: bool,
    },
}

/// Engine tuning from the flags.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// QUIC windows and stream limit.
    pub transport: TransportParams,
    /// `--chunk-size` (host), `None` = automatic.
    pub chunk_size: Option<u64>,
    /// `--parallel-files` (host), `None` = automatic.
    pub parallel_files: Option<u8>,
    /// `--io-driver`.
    pub io_driver: IoDriver,
    /// `--cores`, `None` = one per core.
    pub cores: Option<u16>,
    /// `--benchmark`.
    pub benchmark: bool,
    /// `--stun-server` list.
    pub stun_servers: Vec<String>,
    /// `--turn-server` list.
    pub turn_servers: Vec<String>,
}

/// Everything but the peer; shared by all of a host's transfers.
#[derive(Debug)]
pub struct TransferJob {
    /// Send or receive.
    pub job: Job,
    /// The QUIC identity whose fingerprint was bound in pairing.
    pub identity: Arc<Identity>,
    /// The bound UDP socket whose port was advertised in pairing.
    pub socket: Arc<UdpSocket>,
    /// Tuning.
    pub tuning: Tuning,
}

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The data engine is not wired in yet.
    #[error(
        "transfer failed: the data engine is not wired in yet (pairing with {peer} succeeded \
         and its certificate is pinned, but this build of thru cannot move files)"
    )]
    NotWired {
        /// The paired peer.
        peer: String,
    },
    /// The receiver declined.
    #[error("the receiver declined the files")]
    Refused,
    /// A target exists and `--force` was not given.
    #[error("{path} already exists; pass --force to overwrite it")]
    Conflict {
        /// The file.
        path: PathBuf,
    },
    /// Anything else, with context (`transfer failed: control stream timeout`).
    #[error("transfer failed: {0}")]
    Failed(String),
}

impl TransferError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Refused => Exit::Refused,
            Self::Conflict { .. } => Exit::Conflict,
            Self::NotWired { .. } | Self::Failed(_) => Exit::TransferFailed,
        }
    }
}

/// Runs one transfer with a paired peer. Blocking; call it off the async runtime.
///
/// Not implemented yet: returns [`TransferError::NotWired`].
pub fn run_transfer(paired: Paired, job: &TransferJob, ui: &Ui) -> Result<Summary, TransferError> {
    let _ = (job, ui);
    Err(TransferError::NotWired {
        peer: paired.peer_label,
    })
}
