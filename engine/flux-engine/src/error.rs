//! Error type of the engine, modelled on glommio's `EnhancedIoError`: the OS error plus the
//! operation, path and file descriptor it happened on.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// An engine error. Missing kernel features (O_DIRECT on tmpfs, `SINGLE_ISSUER`, registered
/// buffers) are not errors: they degrade with a one-time warning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A system call or io_uring operation failed.
    #[error("{op} failed (path {path:?}, fd {fd:?}): {source}")]
    Io {
        /// The operation, e.g. `"open"`, `"read_at"`, `"io_uring_enter"`.
        op: &'static str,
        /// The file involved, when there is one.
        path: Option<PathBuf>,
        /// The file descriptor involved, when there is one.
        fd: Option<RawFd>,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An O_DIRECT request whose offset or memory is not aligned as the file requires.
    /// Checked before submission: the kernel would report `EINVAL` in the completion.
    #[error("{op} on {path:?}: offset {offset} or buffer not aligned to {align} (O_DIRECT)")]
    Misaligned {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Requested file offset.
        offset: u64,
        /// Required alignment in bytes.
        align: usize,
    },
    /// The buffer cannot hold the request (after rounding up to the O_DIRECT alignment).
    #[error("{op}: needs {need} bytes of buffer, capacity is {capacity}")]
    BufferTooSmall {
        /// The operation.
        op: &'static str,
        /// Bytes needed.
        need: usize,
        /// The buffer's capacity.
        capacity: usize,
    },
    /// io_uring cannot be used (not compiled into the kernel, forbidden by seccomp, or
    /// disabled with `FLUX_ENGINE_NO_URING=1`).
    #[error("io_uring unavailable: {reason}")]
    UringUnavailable {
        /// Why.
        reason: String,
    },
    /// The submission queue stayed full even after submitting.
    #[error("io_uring submission queue full")]
    SubmissionQueueFull,
}

impl EngineError {
    pub(crate) fn io(
        op: &'static str,
        path: Option<PathBuf>,
        fd: Option<RawFd>,
        source: io::Error,
    ) -> Self {
        Self::Io {
            op,
            path,
            fd,
            source,
        }
    }

    /// The OS error number, for `Io` errors.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
