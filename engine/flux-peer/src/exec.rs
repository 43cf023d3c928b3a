//! The transfer machines' disk requests, performed through `flux-engine`'s [`DiskIo`].
//!
//! Chunk reads (sender) and chunk writes (receiver) go through io_uring with `O_DIRECT` where
//! the filesystem allows it, so they overlap with the network work of the same thread; the
//! rare operations (opening, finalizing, the sidecar records, directory times) stay on the
//! blocking paths of [`SourceFiles`] and [`Destination`], whose safety rules they keep: a
//! partial file is opened by [`Destination::open_partial`] (no symbolic link followed) and
//! only its descriptor is handed to io_uring.
//!
//! Whether chunk I/O goes through the page cache is the [`DiskMode`]; `auto` measures (see
//! there) and [`DiskExec::choice`] says what it picked and why.
//!
//! With the blocking backend ([`BackendKind::Std`], the portable driver) every request is
//! performed at submission by `SourceFiles`/`Destination` with buffered `std::fs` I/O.
//!
//! What it does not do: decide what to read or write (the machines do), or wait: the driver
//! loop waits on the ring ([`DiskExec::ring`]) together with its socket and timers.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::OwnedFd;
use std::path::Path;

use bytes::Bytes;
use flux_engine::{
    AlignedBuf, BackendKind, DiskIo, DmaFile, EngineError, FileOp, IoMode, Recycler, Ring,
};
use flux_transfer::{ChunkData, DiskFailure, DiskOp, DiskResult, OpId};

use crate::disk::{Destination, SourceFiles};
use crate::work::{Job, JobDone, PendingWrite, Pool, gather_chunk, hash_chunk};

/// Files kept open for io_uring between requests.
const MAX_OPEN: usize = 64;

/// Free buffers kept for reuse (the machines bound how many are in flight).
const MAX_FREE_BUFS: usize = 64;

/// Bytes read from each end of a file to learn whether the page cache holds it.
const CACHE_PROBE: usize = 256 << 10;

/// How chunk reads and writes use the page cache (`thru --disk`). Only the io_uring driver
/// can bypass it; the epoll driver is always buffered.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum DiskMode {
    /// Chosen by measurement. A sender reads a file buffered when the kernel holds it already
    /// (a non-blocking read of its first and last bytes completes without the disk), else with
    /// `O_DIRECT`. A receiver writes buffered when the transfer fits, with room to spare, in
    /// what the page cache may still hold dirty right now (`/proc/meminfo`, `vm.dirty_*`):
    /// then it is done when the last write returns. Past that the kernel throttles buffered
    /// writers to the disk's pace anyway, and `O_DIRECT` gets there without the page-cache
    /// copy.
    #[default]
    Auto,
    /// `O_DIRECT` wherever the filesystem allows it.
    Direct,
    /// Through the page cache.
    Buffered,
}

impl DiskMode {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Direct => "direct",
            Self::Buffered => "buffered",
        }
    }
}

impl std::str::FromStr for DiskMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "direct" => Ok(Self::Direct),
            "buffered" => Ok(Self::Buffered),
            other => Err(format!(
                "unknown disk mode {other:?} (expected auto, direct or buffered)"
            )),
        }
    }
}

/// What a [`DiskExec`] chose for its files, and why.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct DiskChoice {
    /// Receiver: whether chunk writes use `O_DIRECT`, and why; `None` before the first write.
    pub writes: Option<(bool, String)>,
    /// Sender under [`DiskMode::Auto`]: files read buffered because the page cache held them.
    pub reads_cached: u64,
    /// Sender under [`DiskMode::Auto`]: files read with `O_DIRECT` because it did not.
    pub reads_uncached: u64,
}

impl DiskChoice {
    /// One line for a summary, if anything was chosen.
    pub fn describe(&self) -> Option<String> {
        if let Some((_, why)) = &self.writes {
            return Some(why.clone());
        }
        match (self.reads_cached, self.reads_uncached) {
            (0, 0) => None,
            (c, 0) => Some(format!(
                "buffered reads: the page cache held all {c} files read"
            )),
            (0, u) => Some(format!(
                "O_DIRECT reads: the page cache held none of the {u} files read"
            )),
            (c, u) => Some(format!(
                "buffered reads for the {c} files the page cache held, O_DIRECT for the other {u}"
            )),
        }
    }
}

/// A finished request: `(tag, id, outcome)`; the tag is the caller's (which session).
pub type Done = (usize, OpId, Result<DiskResult, DiskFailure>);

/// What the executor did, for reports.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct DiskStats {
    /// Chunk reads or writes performed with `O_DIRECT`.
    pub direct_ops: u64,
    /// Chunk reads or writes performed buffered (blocking backend, refused `O_DIRECT`,
    /// unaligned offsets).
    pub buffered_ops: u64,
    /// Chunks hashed or verified on the work threads rather than inline.
    pub pool_jobs: u64,
}

/// Performs disk requests for the machines of one driver thread.
pub struct DiskExec {
    io: DiskIo,
    mode: DiskMode,
    /// Receiver: the write strategy, decided at the first write.
    write_direct: Option<bool>,
    /// Receiver, durable and buffered: start write-back of each chunk once written.
    writeback: bool,
    choice: DiskChoice,
    /// For page-cache probes.
    scratch: Vec<u8>,
    files: HashMap<u32, DmaFile>,
    pending: Vec<Pending>,
    done: VecDeque<Done>,
    free: Vec<AlignedBuf>,
    /// Where read buffers come back once QUIC is done with the `Bytes` made of them.
    recycler: Recycler,
    /// Threads that hash and verify chunks (None: on this thread, inline).
    pool: Option<Pool>,
    /// Requests out on the pool, to fail should its threads be gone.
    working: Vec<(usize, OpId)>,
    stats: DiskStats,
}

struct Pending {
    tag: usize,
    id: OpId,
    what: What,
    op: FileOp,
}

enum What {
    Read {
        compress: Option<i32>,
    },
    Write {
        file: u32,
        index: u32,
        offset: u64,
        hash: [u8; 32],
    },
}

impl std::fmt::Debug for DiskExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskExec")
            .field("backend", &self.io.kind())
            .field("mode", &self.mode)
            .field("in_flight", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl DiskExec {
    /// An executor on `io` whose files use the page cache as `mode` says.
    pub fn new(io: DiskIo, mode: DiskMode) -> Self {
        Self {
            io,
            mode,
            write_direct: None,
            writeback: false,
            choice: DiskChoice::default(),
            scratch: Vec::new(),
            files: HashMap::new(),
            pending: Vec::new(),
            done: VecDeque::new(),
            free: Vec::new(),
            recycler: Recycler::new(MAX_FREE_BUFS),
            pool: None,
            working: Vec::new(),
            stats: DiskStats::default(),
        }
    }

    /// Hashes and verifies chunks on `threads` threads of their own (0: inline, on the
    /// caller's thread). Only the io_uring backend uses them; the blocking one works inline.
    pub fn set_work_threads(&mut self, threads: usize) -> std::io::Result<()> {
        self.pool = match threads {
            0 => None,
            n => Some(Pool::new(n)?),
        };
        Ok(())
    }

    /// Receiver: with `durable`, buffered chunk writes start their write-back as soon as they
    /// complete, so the final `fsync` has little left to wait for.
    pub fn set_durable(&mut self, durable: bool) {
        self.writeback = durable;
    }

    /// What the executor chose for its files, and why.
    pub fn choice(&self) -> &DiskChoice {
        &self.choice
    }

    /// Jobs out on the work threads: the caller must come back soon to collect them (their
    /// completion does not wake the ring).
    pub fn working(&self) -> usize {
        self.working.len()
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.io.kind()
    }

    /// The io_uring ring, with the io_uring backend: the driver waits on it.
    pub fn ring(&mut self) -> Option<&mut Ring> {
        self.io.ring()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Counts of direct and buffered chunk operations so far.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Submits a sender's request, reading from `src`.
    pub fn submit_read(&mut self, tag: usize, src: &mut SourceFiles, op: DiskOp) {
        let DiskOp::Read {
            id,
            file,
            offset,
            len,
            compress,
        } = op
        else {
            let (id, res) = src.execute(op);
            self.done.push_back((tag, id, res));
            return;
        };
        match self.read_uring(tag, src, id, file, offset, len as usize, compress) {
            Ok(true) => {}
            Ok(false) => {
                // Blocking backend, or an offset the device alignment does not allow:
                // `SourceFiles` reads it (buffered, with its own open-file cache).
                self.stats.buffered_ops += 1;
                let (id, res) = src.execute(op);
                self.done.push_back((tag, id, res));
            }
            Err(e) => self.done.push_back((tag, id, Err(e))),
        }
    }

    /// Queues an io_uring read; `Ok(false)` when it must be done on the blocking path.
    #[allow(clippy::too_many_arguments)]
    fn read_uring(
        &mut self,
        tag: usize,
        src: &SourceFiles,
        id: OpId,
        file: u32,
        offset: u64,
        len: usize,
        compress: Option<i32>,
    ) -> Result<bool, DiskFailure> {
        if self.io.kind() == BackendKind::Std {
            return Ok(false);
        }
        if !self.files.contains_key(&file) {
            let path = src
                .path(file)
                .ok_or_else(|| DiskFailure::Io(format!("no source for entry {file}")))?;
            let f = self.open_source(path)?;
            self.remember(file, f);
        }
        let Some(f) = self.files.get(&file) else {
            return Err(DiskFailure::Io(format!("entry {file}: not open")));
        };
        if !aligned(f, offset) {
            return Ok(false);
        }
        let buf = match self.recycler.take(round_up(f, len), f.alignment().max()) {
            Some(b) => b,
            None => take_buf(&mut self.free, f, len)?,
        };
        count(&mut self.stats, f.mode());
        let op = self.io.read_at(f, buf, offset, len).map_err(engine_err)?;
        self.pending.push(Pending {
            tag,
            id,
            what: What::Read { compress },
            op,
        });
        Ok(true)
    }

    /// Submits a receiver's request, writing under `dst`.
    pub fn submit_write(&mut self, tag: usize, dst: &mut Destination, op: DiskOp) {
        if let DiskOp::WriteChunk { id, file, .. } = &op
            && dst.is_skipped(*file)
        {
            // Left out by the user: received, never written.
            return self.done.push_back((tag, *id, Ok(DiskResult::Done)));
        }
        if let DiskOp::WriteChunk {
            id,
            file,
            index,
            offset,
            hash,
            data,
            compressed,
        } = &op
        {
            let at = (*id, *file, *index, *offset, *hash);
            match self.write_uring(tag, dst, at, data, *compressed) {
                Ok(true) => return,
                Ok(false) => self.stats.buffered_ops += 1,
                Err(e) => return self.done.push_back((tag, *id, Err(e))),
            }
        }
        if let DiskOp::Finalize { file, .. } = &op {
            // Every write of the file has completed (the machine finalizes only then); close
            // our descriptor before the file is renamed.
            self.files.remove(file);
        }
        // The blocking backend, unaligned chunks, and the rare operations: `Destination`.
        let (id, res) = dst.execute(op);
        self.done.push_back((tag, id, res));
    }

    /// Queues an io_uring chunk write (`at`: request, file, chunk, offset, hash); `Ok(false)`
    /// when it must be done on the blocking path.
    fn write_uring(
        &mut self,
        tag: usize,
        dst: &mut Destination,
        at: (OpId, u32, u32, u64, [u8; 32]),
        data: &ChunkData,
        compressed: Option<u32>,
    ) -> Result<bool, DiskFailure> {
        let (id, file, index, offset, hash) = at;
        if self.io.kind() == BackendKind::Std {
            return Ok(false);
        }
        self.open_for_write(dst, file)?;
        let Some(f) = self.files.get(&file) else {
            return Err(DiskFailure::Io(format!("entry {file}: not open")));
        };
        if !aligned(f, offset) {
            return Ok(false);
        }
        // The one copy on the receiving side: QUIC's pieces (or their decompressed frame) into
        // the aligned buffer the write goes from. The hash runs over that buffer and nothing is
        // written unless it matches.
        let plain = compressed.map_or(data.len(), |n| n as usize);
        let mut buf = take_buf(&mut self.free, f, plain)?;
        let write = PendingWrite {
            file,
            index,
            offset,
            hash,
        };
        if let Some(pool) = self.pool.as_mut() {
            match buf.into_send() {
                Ok(sb) => {
                    let job = Job::Verify {
                        tag,
                        id,
                        write,
                        data: data.clone(),
                        compressed,
                        buf: sb,
                    };
                    match pool.submit(job) {
                        Ok(()) => {
                            self.working.push((tag, id));
                            return Ok(true);
                        }
                        Err(job) => match *job {
                            Job::Verify { buf: b, .. } => buf = b.into_inner(),
                            _ => return Err(pool_gone()),
                        },
                    }
                }
                Err(b) => buf = b,
            }
        }
        match gather_chunk(data, compressed, &hash, buf.full_mut()) {
            Ok(n) => buf.set_len(n),
            Err(e) => {
                self.free.push(buf);
                return Err(e);
            }
        }
        self.write_verified(tag, id, write, buf)?;
        Ok(true)
    }

    /// Opens entry `file`'s partial file for io_uring writes unless it is open.
    fn open_for_write(&mut self, dst: &mut Destination, file: u32) -> Result<(), DiskFailure> {
        if !self.files.contains_key(&file) {
            let pf = dst.open_partial(file)?;
            let fd: OwnedFd = pf
                .try_clone()
                .map_err(|e| DiskFailure::Io(format!("entry {file}: dup: {e}")))?
                .into();
            let name = dst.final_path(file).unwrap_or_default();
            let direct = self.write_direct(dst);
            let f = DmaFile::from_fd(fd, &name, direct).map_err(engine_err)?;
            self.remember(file, f);
        }
        Ok(())
    }

    /// Opens a source file for reading, buffered or direct as the mode says.
    fn open_source(&mut self, path: &Path) -> Result<DmaFile, DiskFailure> {
        let direct = match self.mode {
            DiskMode::Direct => true,
            DiskMode::Buffered => false,
            DiskMode::Auto => {
                let f = File::open(path)
                    .map_err(|e| DiskFailure::Io(format!("open {}: {e}", path.display())))?;
                let cached = page_cached(&f, &mut self.scratch);
                if cached {
                    self.choice.reads_cached += 1;
                } else {
                    self.choice.reads_uncached += 1;
                }
                return DmaFile::from_fd(f.into(), path, !cached).map_err(engine_err);
            }
        };
        DmaFile::open(path, flux_engine::OpenMode::Read, direct).map_err(engine_err)
    }

    /// Receiver: whether chunk writes use `O_DIRECT`, decided once, at the first write.
    fn write_direct(&mut self, dst: &Destination) -> bool {
        if let Some(d) = self.write_direct {
            return d;
        }
        let (direct, why) = match self.mode {
            DiskMode::Direct => (true, "O_DIRECT writes (--disk direct)".to_owned()),
            DiskMode::Buffered => (false, "buffered writes (--disk buffered)".to_owned()),
            DiskMode::Auto => choose_writes(dst.bytes_to_write(), dirty_room()),
        };
        self.write_direct = Some(direct);
        self.choice.writes = Some((direct, why));
        direct
    }

    /// Queues the io_uring write of a chunk whose bytes matched their hash.
    fn write_verified(
        &mut self,
        tag: usize,
        id: OpId,
        w: PendingWrite,
        buf: AlignedBuf,
    ) -> Result<(), DiskFailure> {
        let Some(f) = self.files.get(&w.file) else {
            return Err(DiskFailure::Io(format!("entry {}: not open", w.file)));
        };
        count(&mut self.stats, f.mode());
        let op = self.io.write_at(f, buf, w.offset).map_err(engine_err)?;
        self.pending.push(Pending {
            tag,
            id,
            what: What::Write {
                file: w.file,
                index: w.index,
                offset: w.offset,
                hash: w.hash,
            },
            op,
        });
        Ok(())
    }

    /// Collects what the work threads finished: hashed reads become results, verified chunks
    /// are queued for writing.
    fn collect_work(&mut self, mut dst: Option<&mut Destination>) {
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        let mut finished = Vec::new();
        loop {
            match pool.try_done() {
                Ok(Some(d)) => finished.push(d),
                Ok(None) => break,
                Err(()) => {
                    // No worker is left: every request still out fails.
                    for (tag, id) in self.working.drain(..) {
                        self.done.push_back((tag, id, Err(pool_gone())));
                    }
                    break;
                }
            }
        }
        for d in finished {
            match d {
                JobDone::Hashed { tag, id, res } => {
                    self.stats.pool_jobs += 1;
                    self.working.retain(|w| *w != (tag, id));
                    let out = res.map(|(data, hash, compressed)| DiskResult::Read {
                        data,
                        hash,
                        compressed,
                    });
                    self.done.push_back((tag, id, out));
                }
                JobDone::Verified {
                    tag,
                    id,
                    write,
                    res,
                } => {
                    self.stats.pool_jobs += 1;
                    self.working.retain(|w| *w != (tag, id));
                    let queued = res.and_then(|buf| {
                        if let Some(dst) = dst.as_deref_mut() {
                            // Its descriptor may have left the cache meanwhile.
                            self.open_for_write(dst, write.file)?;
                        }
                        self.write_verified(tag, id, write, buf.into_inner())
                    });
                    if let Err(e) = queued {
                        self.done.push_back((tag, id, Err(e)));
                    }
                }
            }
        }
    }

    fn remember(&mut self, file: u32, f: DmaFile) {
        if self.files.len() >= MAX_OPEN {
            // Files with requests in flight stay alive through their ops' own references.
            self.files.clear();
        }
        self.files.insert(file, f);
    }

    /// Moves completed io_uring requests to the done queue; a completed chunk write gets its
    /// sidecar record in `dst` first. Call after the ring was polled.
    pub fn reap(&mut self, mut dst: Option<&mut Destination>) {
        self.collect_work(dst.as_deref_mut());
        let mut i = 0;
        while i < self.pending.len() {
            if !self.pending[i].op.is_complete() {
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            let (res, buf) = match self.io.try_complete(p.op) {
                Ok(r) => r,
                Err(_) => {
                    // is_complete() said it was; an op cannot become incomplete again.
                    self.done.push_back((
                        p.tag,
                        p.id,
                        Err(DiskFailure::Io("io_uring op lost".into())),
                    ));
                    continue;
                }
            };
            let mut buf = buf;
            let out = match (p.what, res) {
                // `n` is already capped at the length asked for. The buffer itself becomes the
                // `Bytes` QUIC sends from (no copy) and comes back through the recycler.
                (What::Read { compress }, Ok(n)) => {
                    buf.set_len(n);
                    let data = match buf.freeze(&self.recycler) {
                        Ok(b) => b,
                        Err(b) => Bytes::copy_from_slice(&b),
                    };
                    self.hash_read(p.tag, p.id, data, compress);
                    continue;
                }
                (
                    What::Write {
                        file,
                        index,
                        offset,
                        hash,
                    },
                    Ok(n),
                ) => match dst.as_deref_mut() {
                    Some(d) => {
                        if self.writeback
                            && let Some(f) = self.files.get(&file)
                        {
                            // A hint: a failure only means the final fsync does the work.
                            let _ = f.start_writeback(offset, n as u64);
                        }
                        d.record(file, index, &hash).map(|()| DiskResult::Done)
                    }
                    None => Err(DiskFailure::Io(
                        "write completed without a destination".into(),
                    )),
                },
                (_, Err(e)) => Err(engine_err(e)),
            };
            if self.free.len() < MAX_FREE_BUFS {
                self.free.push(buf);
            }
            self.done.push_back((p.tag, p.id, out));
        }
    }

    /// Hashes (and, when asked, compresses) a chunk read for sending: on the work threads,
    /// or here.
    fn hash_read(&mut self, tag: usize, id: OpId, data: Bytes, compress: Option<i32>) {
        if let Some(pool) = self.pool.as_mut() {
            let job = Job::Hash {
                tag,
                id,
                data,
                compress,
            };
            match pool.submit(job) {
                Ok(()) => self.working.push((tag, id)),
                Err(_) => self.done.push_back((tag, id, Err(pool_gone()))),
            }
            return;
        }
        let (data, hash, compressed) = hash_chunk(data, compress);
        let read = DiskResult::Read {
            data,
            hash,
            compressed,
        };
        self.done.push_back((tag, id, Ok(read)));
    }

    /// The next finished request.
    pub fn poll_done(&mut self) -> Option<Done> {
        self.done.pop_front()
    }
}

/// `len` rounded up to the file's direct-I/O alignment.
fn round_up(f: &DmaFile, len: usize) -> usize {
    let align = f.alignment().max();
    len.div_ceil(align) * align
}

fn take_buf(
    free: &mut Vec<AlignedBuf>,
    f: &DmaFile,
    len: usize,
) -> Result<AlignedBuf, DiskFailure> {
    let align = f.alignment().max();
    let need = len.div_ceil(align) * align;
    if let Some(i) = free
        .iter()
        .position(|b| b.capacity() >= need && (b.as_ptr() as usize).is_multiple_of(align))
    {
        return Ok(free.swap_remove(i));
    }
    f.alloc_buf(need.max(align)).map_err(engine_err)
}

/// Whether `offset` suits the file's direct-I/O alignment (always, when buffered).
fn aligned(f: &DmaFile, offset: u64) -> bool {
    f.mode() != IoMode::Direct || offset.is_multiple_of(f.alignment().offset as u64)
}

fn count(stats: &mut DiskStats, mode: IoMode) {
    match mode {
        IoMode::Direct => stats.direct_ops += 1,
        IoMode::Buffered => stats.buffered_ops += 1,
    }
}

fn pool_gone() -> DiskFailure {
    DiskFailure::Io("the hashing threads are gone".into())
}

fn engine_err(e: EngineError) -> DiskFailure {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        && let EngineError::Io {
            path: Some(path), ..
        } = &e
    {
        return DiskFailure::NoSpace(path.display().to_string());
    }
    DiskFailure::Io(e.to_string())
}

/// Whether the kernel holds the first and last bytes of `f` in its page cache: a buffered
/// read of them with `RWF_NOWAIT` completes in full without waiting for the disk.
fn page_cached(f: &File, scratch: &mut Vec<u8>) -> bool {
    let Ok(size) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let want = usize::try_from(size).unwrap_or(usize::MAX).min(CACHE_PROBE);
    if want == 0 {
        return true;
    }
    scratch.resize(want, 0);
    let last = size - want as u64;
    let ends: &[u64] = if last == 0 { &[0] } else { &[0, last] };
    ends.iter().all(|&off| {
        let mut bufs = [IoSliceMut::new(&mut scratch[..want])];
        matches!(
            rustix::io::preadv2(f, &mut bufs, off, rustix::io::ReadWriteFlags::NOWAIT),
            Ok(n) if n == want
        )
    })
}

/// What the page cache may still take dirty before the kernel throttles writers: its dirty
/// limit (`vm.dirty_bytes`, else `vm.dirty_ratio` percent of the available memory) less what
/// is dirty or under write-back now. `None` when the figures cannot be read.
fn dirty_room() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    let sysctl = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/sys/vm/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let limit = match sysctl("dirty_bytes") {
        Some(b) if b > 0 => b,
        _ => kib("MemAvailable")? / 100 * sysctl("dirty_ratio")?,
    };
    Some(limit.saturating_sub(kib("Dirty")? + kib("Writeback")?))
}

/// The write strategy for `bytes` to write with `room` left in the page cache's dirty limit.
fn choose_writes(bytes: u64, room: Option<u64>) -> (bool, String) {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    match room {
        // Half: other writers on the machine, and the kernel's own margin below the limit.
        Some(room) if bytes <= room / 2 => (
            false,
            format!(
                "buffered writes: the {:.2} GiB to write fit in the {:.2} GiB the page cache \
                 may still hold dirty (--disk auto)",
                gib(bytes),
                gib(room)
            ),
        ),
        Some(room) => (
            true,
            format!(
                "O_DIRECT writes: the {:.2} GiB to write exceed half the {:.2} GiB the page \
                 cache may still hold dirty (--disk auto)",
                gib(bytes),
                gib(room)
            ),
        ),
        None => (
            true,
            "O_DIRECT writes: the page cache's dirty limits could not be read (--disk auto)"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_go_buffered_only_when_they_fit_with_room_to_spare() {
        let (direct, why) = choose_writes(1 << 30, Some(4 << 30));
        assert!(!direct, "{why}");
        assert!(
            why.contains("1.00 GiB") && why.contains("4.00 GiB"),
            "{why}"
        );
        assert!(choose_writes(3 << 30, Some(4 << 30)).0);
        assert!(choose_writes(1, None).0);
    }

    #[test]
    fn this_machine_reports_a_dirty_room() {
        // /proc is there on Linux; the figure is whatever the machine has now.
        assert!(dirty_room().is_some());
    }

    #[test]
    fn a_file_just_written_is_cached_and_a_dropped_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        let mut scratch = Vec::new();
        assert!(page_cached(&f, &mut scratch));
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        if rustix::fs::fstatfs(&f).unwrap().f_type as i64 == TMPFS_MAGIC {
            // tmpfs pages are the file itself: they cannot be dropped.
            eprintln!("SKIP: the temp dir is on tmpfs");
            return;
        }
        // Dropping the pages needs them clean: sync, then advise the kernel to drop them.
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!page_cached(&f, &mut scratch));
    }
}
