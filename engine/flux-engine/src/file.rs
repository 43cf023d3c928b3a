//! O_DIRECT files with a buffered fallback, and the disk I/O backends (io_uring or blocking
//! `pread`/`pwrite`) behind one interface.
//!
//! # The unaligned tail
//!
//! O_DIRECT needs offset, length and memory aligned (512 B here, `STATX_DIOALIGN`). Reads need
//! no special path: a read of an aligned length at an aligned offset simply comes back short at
//! end of file. For writes we chose *pad, then truncate*: a write whose length is not a
//! multiple of the alignment is padded with zeros up to the next multiple and written with
//! O_DIRECT like any other block; when it completes the file is `ftruncate`d to
//! `offset + len`. The alternative, a second buffered fd for the tail, mixes page-cache and
//! direct I/O on the same block (the kernel must write back and invalidate around every direct
//! write to stay coherent) and needs a second open file per transfer; padding keeps one fd and
//! one I/O path, for the price of one `ftruncate` per file. The contract that makes it correct:
//! a write with an unaligned length must be the last piece of the file (nothing is ever
//! written beyond `offset + len`), which is true of a transfer's final chunk.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use io_uring::{opcode, types};

use crate::{AlignedBuf, EngineError, Op, Ring, RingConfig};

/// Whether a file's I/O bypasses the page cache.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IoMode {
    /// `O_DIRECT`: offsets, lengths and memory must be aligned (handled by this crate).
    Direct,
    /// Page-cache I/O: the filesystem refused `O_DIRECT` (tmpfs) or it was not asked for.
    Buffered,
}

/// Alignment O_DIRECT requires for a file.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DioAlign {
    /// Alignment of buffer addresses.
    pub mem: usize,
    /// Alignment of file offsets and lengths.
    pub offset: usize,
}

impl DioAlign {
    /// The larger of the two: align buffers to this and everything fits.
    pub fn max(&self) -> usize {
        self.mem.max(self.offset)
    }
}

/// How to open a [`DmaFile`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum OpenMode {
    /// Existing file, read only.
    Read,
    /// Create (or open) for reading and writing, keeping contents.
    Write,
    /// Create for reading and writing, truncating existing contents.
    CreateTruncate,
}

/// A file opened for direct I/O when the filesystem allows it. Reads and writes go through a
/// [`DiskIo`]; the descriptor is shared with in-flight operations, so dropping the `DmaFile`
/// never closes it under them.
#[derive(Debug)]
pub struct DmaFile {
    fd: Rc<OwnedFd>,
    path: PathBuf,
    mode: IoMode,
    align: DioAlign,
}

impl DmaFile {
    /// Opens `path`, trying `O_DIRECT` first when `direct` is set; a filesystem that refuses it
    /// (tmpfs: `EINVAL` at open) gets buffered I/O with a one-time warning. See
    /// [`DmaFile::mode`].
    pub fn open(path: &Path, how: OpenMode, direct: bool) -> Result<Self, EngineError> {
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            EngineError::io(
                "open",
                Some(path.to_owned()),
                None,
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        let base = libc::O_CLOEXEC
            | match how {
                OpenMode::Read => libc::O_RDONLY,
                OpenMode::Write => libc::O_RDWR | libc::O_CREAT,
                OpenMode::CreateTruncate => libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            };
        let mut mode = IoMode::Buffered;
        let mut fd = None;
        if direct {
            match open_raw(&cpath, base | libc::O_DIRECT) {
                Ok(f) => {
                    fd = Some(f);
                    mode = IoMode::Direct;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn_once!(
                        path = %path.display(),
                        "filesystem refuses O_DIRECT (tmpfs?); using buffered I/O"
                    );
                }
                Err(e) => return Err(EngineError::io("open", Some(path.to_owned()), None, e)),
            }
        }
        let fd = match fd {
            Some(f) => f,
            None => open_raw(&cpath, base)
                .map_err(|e| EngineError::io("open", Some(path.to_owned()), None, e))?,
        };
        let align = dio_align(&fd);
        Ok(Self {
            fd: Rc::new(fd),
            path: path.to_owned(),
            mode,
            align,
        })
    }

    /// Wraps an already opened descriptor (for callers that open files under their own safety
    /// rules, e.g. `O_NOFOLLOW` checks), switching it to `O_DIRECT` with `fcntl` when `direct`
    /// is set and the filesystem allows it; otherwise it stays buffered. `path` is used in
    /// error messages only.
    pub fn from_fd(fd: OwnedFd, path: &Path, direct: bool) -> Result<Self, EngineError> {
        let raw = fd.as_raw_fd();
        let mut mode = IoMode::Buffered;
        if direct {
            // SAFETY: plain fcntl on a descriptor we own.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
            if flags < 0 {
                let e = io::Error::last_os_error();
                return Err(EngineError::io(
                    "fcntl",
                    Some(path.to_owned()),
                    Some(raw),
                    e,
                ));
            }
            // SAFETY: as above; only the status flags change.
            if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_DIRECT) } == 0 {
                mode = IoMode::Direct;
            } else {
                warn_once!(
                    path = %path.display(),
                    "filesystem refuses O_DIRECT; using buffered I/O"
                );
            }
        }
        let align = dio_align(&fd);
        Ok(Self {
            fd: Rc::new(fd),
            path: path.to_owned(),
            mode,
            align,
        })
    }

    /// Creates (truncating) `path` for writing with O_DIRECT where possible.
    pub fn create(path: &Path) -> Result<Self, EngineError> {
        Self::open(path, OpenMode::CreateTruncate, true)
    }

    /// Opens an existing `path` for reading with O_DIRECT where possible.
    pub fn open_read(path: &Path) -> Result<Self, EngineError> {
        Self::open(path, OpenMode::Read, true)
    }

    /// An empty buffer of at least `capacity` bytes, aligned for this file.
    pub fn alloc_buf(&self, capacity: usize) -> Result<AlignedBuf, EngineError> {
        AlignedBuf::new(capacity, self.align.max())
    }

    /// Current file size.
    pub fn len(&self) -> Result<u64, EngineError> {
        // SAFETY: all-zero is a valid `stat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and a live, writable stat struct.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return Err(self.last_err("fstat"));
        }
        Ok(st.st_size as u64)
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool, EngineError> {
        Ok(self.len()? == 0)
    }

    /// Sets the file size (`ftruncate`).
    pub fn set_len(&self, size: u64) -> Result<(), EngineError> {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(self.last_err("ftruncate"));
        }
        Ok(())
    }

    /// Reserves blocks for `[offset, offset + len)` (`fallocate`, mode 0: the file grows).
    /// Returns `false` (without error) when the filesystem does not support it.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<bool, EngineError> {
        if len == 0 {
            return Ok(true);
        }
        // SAFETY: plain syscall on a valid fd.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            warn_once!(path = %self.path.display(), "fallocate unsupported; not preallocating");
            return Ok(false);
        }
        Err(EngineError::io(
            "fallocate",
            Some(self.path.clone()),
            Some(self.fd.as_raw_fd()),
            e,
        ))
    }

    /// Flushes data and metadata (`fsync`).
    pub fn sync_all(&self) -> Result<(), EngineError> {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(self.last_err("fsync"));
        }
        Ok(())
    }

    /// Flushes data (`fdatasync`).
    pub fn sync_data(&self) -> Result<(), EngineError> {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::fdatasync(self.fd.as_raw_fd()) } != 0 {
            return Err(self.last_err("fdatasync"));
        }
        Ok(())
    }

    /// Starts write-back of the dirty pages of `len` bytes at `offset` without waiting for it
    /// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`), so that a later `fsync` finds little
    /// left to do. Nothing to do for O_DIRECT files.
    pub fn start_writeback(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if self.mode == IoMode::Direct {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: plain syscall on a valid fd; it reads no memory of ours.
        let rc = unsafe {
            libc::sync_file_range(self.fd.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            return Err(self.last_err("sync_file_range"));
        }
        Ok(())
    }

    /// Whether O_DIRECT is in use.
    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// The alignment O_DIRECT needs for this file (`STATX_DIOALIGN`, else 4096).
    pub fn alignment(&self) -> DioAlign {
        self.align
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn last_err(&self, op: &'static str) -> EngineError {
        EngineError::io(
            op,
            Some(self.path.clone()),
            Some(self.fd.as_raw_fd()),
            io::Error::last_os_error(),
        )
    }

    /// Checks alignment and computes the length to submit (rounded up in direct mode).
    fn plan(
        &self,
        op: &'static str,
        buf: &AlignedBuf,
        offset: u64,
        len: usize,
    ) -> Result<usize, EngineError> {
        if self.mode == IoMode::Buffered {
            if len > buf.capacity() {
                return Err(EngineError::BufferTooSmall {
                    op,
                    need: len,
                    capacity: buf.capacity(),
                });
            }
            return Ok(len);
        }
        let a = self.align;
        if !offset.is_multiple_of(a.offset as u64) || !(buf.as_ptr() as usize).is_multiple_of(a.mem)
        {
            return Err(EngineError::Misaligned {
                op,
                path: self.path.clone(),
                offset,
                align: a.max(),
            });
        }
        let io_len = len.div_ceil(a.offset) * a.offset;
        if io_len > buf.capacity() {
            return Err(EngineError::BufferTooSmall {
                op,
                need: io_len,
                capacity: buf.capacity(),
            });
        }
        Ok(io_len)
    }
}

impl AsRawFd for DmaFile {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Which disk I/O backend a [`DiskIo`] uses.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BackendKind {
    /// Operations are submitted to an io_uring and complete asynchronously.
    Uring,
    /// Blocking `pread`/`pwrite` at submission (the portable driver); completions are ready
    /// at once.
    Std,
}

/// A buffer handed back with the outcome of the operation that used it.
pub type BufResult<T> = (Result<T, EngineError>, AlignedBuf);

/// Disk I/O through one backend. Both backends share the interface: submit a read or write
/// with an owned buffer, get a [`FileOp`], complete it to get the buffer back.
pub struct DiskIo {
    backend: Backend,
}

// One DiskIo per worker thread, never moved on a hot path: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Uring(Ring),
    Std,
}

/// An operation submitted through [`DiskIo`]. Dropping it before completion is safe: the
/// buffer and descriptor stay owned by the ring until the kernel is done with them.
#[must_use = "complete the op to get its result and buffer back"]
pub struct FileOp {
    state: FileOpState,
    kind: Kind,
    /// Bytes the caller asked for (the submitted length may be rounded up).
    want: usize,
    path: PathBuf,
    offset: u64,
    /// Padded tail write: truncate the file to this size once it completed.
    truncate_to: Option<u64>,
}

enum FileOpState {
    Uring(Op<IoData>),
    Ready(io::Result<usize>, AlignedBuf, Rc<OwnedFd>),
}

/// What an io_uring file op owns while in flight.
struct IoData {
    buf: AlignedBuf,
    fd: Rc<OwnedFd>,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    Read,
    Write,
}

impl DiskIo {
    /// A backend of the given kind; `Uring` fails if io_uring is unavailable.
    pub fn new(kind: BackendKind) -> Result<Self, EngineError> {
        let backend = match kind {
            BackendKind::Uring => Backend::Uring(Ring::new(&RingConfig::default())?),
            BackendKind::Std => Backend::Std,
        };
        Ok(Self { backend })
    }

    /// io_uring when available, else the blocking backend (with a one-time warning).
    /// `FLUX_ENGINE_BACKEND=std` forces the blocking backend.
    pub fn auto() -> Self {
        if std::env::var("FLUX_ENGINE_BACKEND").is_ok_and(|v| v == "std") {
            return Self {
                backend: Backend::Std,
            };
        }
        match Ring::new(&RingConfig::default()) {
            Ok(r) => Self {
                backend: Backend::Uring(r),
            },
            Err(e) => {
                warn_once!(error = %e, "io_uring unavailable; using blocking file I/O");
                Self {
                    backend: Backend::Std,
                }
            }
        }
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Uring(_) => BackendKind::Uring,
            Backend::Std => BackendKind::Std,
        }
    }

    /// The ring, for the io_uring backend (to register a pool, push timers, or drive it).
    pub fn ring(&mut self) -> Option<&mut Ring> {
        match &mut self.backend {
            Backend::Uring(r) => Some(r),
            Backend::Std => None,
        }
    }

    /// Reads up to `len` bytes at `offset` into `buf` (from its start). In direct mode the
    /// offset must be aligned and the buffer must hold `len` rounded up to the alignment.
    /// On completion `buf.len()` is the number of bytes read (short at end of file).
    pub fn read_at(
        &mut self,
        file: &DmaFile,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
    ) -> Result<FileOp, EngineError> {
        let io_len = file.plan("read_at", &buf, offset, len)?;
        self.submit(file, buf, offset, len, io_len, Kind::Read, None)
    }

    /// Writes `buf[..]` (its `len()` bytes) at `offset`. In direct mode the offset must be
    /// aligned; an unaligned length is padded with zeros and the file truncated to
    /// `offset + len` on completion, so it must be the file's last piece (module docs).
    pub fn write_at(
        &mut self,
        file: &DmaFile,
        mut buf: AlignedBuf,
        offset: u64,
    ) -> Result<FileOp, EngineError> {
        let len = buf.len();
        let io_len = file.plan("write_at", &buf, offset, len)?;
        let truncate_to = (io_len != len).then_some(offset + len as u64);
        if io_len != len {
            buf.full_mut()[len..io_len].fill(0);
        }
        self.submit(file, buf, offset, len, io_len, Kind::Write, truncate_to)
    }

    /// Submits queued operations and waits for at least `want` completions or `timeout`
    /// (no-op for the blocking backend, whose operations complete at submission).
    pub fn poll(
        &mut self,
        want: usize,
        timeout: Option<std::time::Duration>,
    ) -> Result<usize, EngineError> {
        match &mut self.backend {
            Backend::Uring(r) => r.submit_and_wait(want, timeout),
            Backend::Std => Ok(0),
        }
    }

    /// Takes the outcome if `op` has completed, else hands it back.
    // Handing the op back by value is the point (tokio-uring style); boxing it would cost an
    // allocation per poll.
    #[allow(clippy::result_large_err)]
    pub fn try_complete(&mut self, op: FileOp) -> Result<BufResult<usize>, FileOp> {
        let FileOp {
            state,
            kind,
            want,
            path,
            offset,
            truncate_to,
        } = op;
        let (res, mut buf, fd) = match state {
            FileOpState::Ready(res, buf, fd) => (res, buf, fd),
            FileOpState::Uring(o) => match o.try_complete() {
                Ok(c) => (c.result.map(|n| n as usize), c.data.buf, c.data.fd),
                Err(o) => {
                    return Err(FileOp {
                        state: FileOpState::Uring(o),
                        kind,
                        want,
                        path,
                        offset,
                        truncate_to,
                    });
                }
            },
        };
        let op_name = match kind {
            Kind::Read => "read_at",
            Kind::Write => "write_at",
        };
        let res = res
            .map_err(|e| EngineError::io(op_name, Some(path.clone()), Some(fd.as_raw_fd()), e))
            .and_then(|n| {
                let n = n.min(want);
                match kind {
                    Kind::Read => buf.set_len(n),
                    Kind::Write => {
                        if let Some(end) = truncate_to
                            && offset + n as u64 >= end
                        {
                            truncate_tail(&fd, &path, end)?;
                        }
                    }
                }
                Ok(n)
            });
        Ok((res, buf))
    }

    /// Blocks until `op` completes. The outer error means the ring itself failed; the op's
    /// buffer then stays owned by the ring until its CQE arrives (or is leaked at ring drop).
    pub fn wait(&mut self, mut op: FileOp) -> Result<BufResult<usize>, EngineError> {
        loop {
            match self.try_complete(op) {
                Ok(r) => return Ok(r),
                Err(o) => op = o,
            }
            self.poll(1, None)?;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        file: &DmaFile,
        buf: AlignedBuf,
        offset: u64,
        want: usize,
        io_len: usize,
        kind: Kind,
        truncate_to: Option<u64>,
    ) -> Result<FileOp, EngineError> {
        let state = match &mut self.backend {
            Backend::Std => {
                let mut buf = buf;
                let fd = file.fd.as_raw_fd();
                // SAFETY: `buf` owns `capacity >= io_len` initialised bytes (plan() checked);
                // pread writes / pwrite reads at most `io_len` of them; the fd is open.
                let n = unsafe {
                    match kind {
                        Kind::Read => {
                            libc::pread(fd, buf.as_mut_ptr().cast(), io_len, offset as libc::off_t)
                        }
                        Kind::Write => {
                            libc::pwrite(fd, buf.as_ptr().cast(), io_len, offset as libc::off_t)
                        }
                    }
                };
                let res = if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                };
                FileOpState::Ready(res, buf, file.fd.clone())
            }
            Backend::Uring(ring) => {
                let ring_id = ring.id();
                let data = IoData {
                    buf,
                    fd: file.fd.clone(),
                };
                let build = move |d: &mut IoData| {
                    let fd = types::Fd(d.fd.as_raw_fd());
                    let len = io_len as u32;
                    match (kind, d.buf.fixed_index(ring_id)) {
                        (Kind::Read, Some(i)) => {
                            opcode::ReadFixed::new(fd, d.buf.as_mut_ptr(), len, i)
                                .offset(offset)
                                .build()
                        }
                        (Kind::Read, None) => opcode::Read::new(fd, d.buf.as_mut_ptr(), len)
                            .offset(offset)
                            .build(),
                        (Kind::Write, Some(i)) => {
                            opcode::WriteFixed::new(fd, d.buf.as_ptr(), len, i)
                                .offset(offset)
                                .build()
                        }
                        (Kind::Write, None) => opcode::Write::new(fd, d.buf.as_ptr(), len)
                            .offset(offset)
                            .build(),
                    }
                };
                // SAFETY: the SQE points into `d.buf` (heap memory owned by the op, at least
                // `io_len` bytes, checked by plan()) and uses `d.fd`, which the op keeps open.
                // A fixed index is used only when the buffer's pool is registered with this
                // very ring.
                FileOpState::Uring(unsafe { ring.push(data, build)? })
            }
        };
        Ok(FileOp {
            state,
            kind,
            want,
            path: file.path.clone(),
            offset,
            truncate_to,
        })
    }
}

impl FileOp {
    /// Whether the result is available ([`DiskIo::try_complete`] will succeed).
    pub fn is_complete(&self) -> bool {
        match &self.state {
            FileOpState::Uring(o) => o.is_complete(),
            FileOpState::Ready(..) => true,
        }
    }
}

fn truncate_tail(fd: &OwnedFd, path: &Path, end: u64) -> Result<(), EngineError> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), end as libc::off_t) } != 0 {
        return Err(EngineError::io(
            "ftruncate",
            Some(path.to_owned()),
            Some(fd.as_raw_fd()),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn open_raw(path: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; mode is used only with O_CREAT.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// O_DIRECT alignment from `statx(STATX_DIOALIGN)` (Linux 6.1+), else 4096 for both.
fn dio_align(fd: &OwnedFd) -> DioAlign {
    // SAFETY: all-zero is a valid `statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty NUL-terminated path with AT_EMPTY_PATH, writable statx.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let fallback = DioAlign {
        mem: FALLBACK_ALIGN,
        offset: FALLBACK_ALIGN,
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return fallback;
    }
    DioAlign {
        mem: (stx.stx_dio_mem_align as usize).max(1),
        offset: stx.stx_dio_offset_align as usize,
    }
}

/// Alignment assumed when the kernel does not report one: 4096 covers every common device
/// (platform pitfall 4: 512 B is enough on the dev VM, 4 KiB elsewhere).
const FALLBACK_ALIGN: usize = 4096;
