//! The per-core, protocol-agnostic runtime pieces of the Thruflux engine: an io_uring ring
//! wrapper that owns the resources of in-flight operations, aligned buffers and a registrable
//! pool, and O_DIRECT files with a buffered fallback behind an io_uring or a blocking backend.
//!
//! # What it does
//!
//! - [`Ring`]: one io_uring per thread, set up with `SINGLE_ISSUER | DEFER_TASKRUN` (plain
//!   setup with a one-time warning when refused). [`Ring::push`] takes ownership of whatever
//!   the SQE points into and returns an [`Op`]; the resources are released only after the CQE
//!   (even if the `Op` or the ring is dropped first). [`Ring::submit_and_wait`] submits and
//!   reaps with an optional timeout; [`Ring::timeout`] is a timer op.
//! - [`AlignedBuf`] / [`BufPool`]: zeroed, aligned heap buffers; a pool of fixed-size buffers
//!   from one allocation that [`Ring::register_pool`] can register as fixed buffers, falling
//!   back (warn once) when `RLIMIT_MEMLOCK` forbids it.
//! - [`DmaFile`]: opened with `O_DIRECT`, falling back to buffered I/O where the filesystem
//!   refuses it (tmpfs); [`DmaFile::mode`] says which. Alignment comes from
//!   `statx(STATX_DIOALIGN)` (else 4096). The unaligned tail of a file is written padded, then
//!   the file is truncated (see [`file`](crate::DmaFile) module docs for why).
//! - [`DiskIo`]: `read_at`/`write_at` with owned buffers through io_uring
//!   ([`BackendKind::Uring`]) or blocking `pread`/`pwrite` ([`BackendKind::Std`], for the
//!   portable driver), with the same submit → [`FileOp`] → complete interface.
//!
//! # What it does not do
//!
//! - No protocol, no sockets: UDP lives in `flux-udp`, QUIC and the transfer logic elsewhere.
//!   (io_uring `SENDMSG`/`RECVMSG` can be pushed with [`Ring::push`] using `flux-udp`'s
//!   `SendHeader`/`RecvHeader`.)
//! - No async executor, wakers or cross-thread use: one thread owns a ring and drives it in its
//!   own loop (push, [`Ring::submit_and_wait`], complete). Types are `!Send`.
//! - No multishot operations (one CQE per op), no SQPOLL or IOPOLL (platform facts §6: SQPOLL
//!   burns a vCPU, IOPOLL is unsupported on virtio-blk).
//! - No readahead or caching policy: the caller decides sizes and queue depth.
//!
//! # Environment
//!
//! `FLUX_ENGINE_NO_URING=1` makes [`Ring::new`] fail as if io_uring were missing;
//! `FLUX_ENGINE_BACKEND=std` makes [`DiskIo::auto`] pick the blocking backend.

/// Logs a warning at most once per call site and process.
macro_rules! warn_once {
    ($($arg:tt)*) => {{
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!($($arg)*);
        }
    }};
}

mod buf;
mod error;
mod file;
mod ring;

pub use buf::{AlignedBuf, BufPool, Recycler};
pub use error::EngineError;
pub use file::{BackendKind, BufResult, DioAlign, DiskIo, DmaFile, FileOp, IoMode, OpenMode};
pub use ring::{Completion, Op, Ring, RingConfig, RingSetup, Timer};
