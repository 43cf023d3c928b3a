//! The transfer machines' disk requests, performed through `flux-engine`'s [`DiskIo`].
//!
//! Chunk reads (sender) and chunk writes (receiver) go through io_uring with `O_DIRECT` where
//! the filesystem allows it, so they overlap with the network work of the same thread; the
//! rare operations (opening, finalizing, the sidecar records, directory times) stay on the
//! blocking paths of [`SourceFiles`] and [`Destination`], whose safety rules they keep: a
//! partial file is opened by [`Destination::open_partial`] (no symbolic link followed) and
//! only its descriptor is handed to io_uring.
//!
//! With the blocking backend ([`BackendKind::Std`], the portable driver) every request is
//! performed at submission by `SourceFiles`/`Destination` with buffered `std::fs` I/O.
//!
//! What it does not do: decide what to read or write (the machines do), or wait: the driver
//! loop waits on the ring ([`DiskExec::ring`]) together with its socket and timers.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::Path;

use bytes::Bytes;
use flux_engine::{
    AlignedBuf, BackendKind, DiskIo, DmaFile, EngineError, FileOp, IoMode, Recycler, Ring,
};
use flux_transfer::digest::chunk_hash;
use flux_transfer::{ChunkData, DiskFailure, DiskOp, DiskResult, OpId};

use crate::disk::{Destination, SourceFiles};
use crate::work::{Job, JobDone, PendingWrite, Pool};

/// Files kept open for io_uring between requests.
const MAX_OPEN: usize = 64;

/// Free buffers kept for reuse (the machines bound how many are in flight).
const MAX_FREE_BUFS: usize = 64;

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
    direct: bool,
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
    Read,
    Write {
        file: u32,
        index: u32,
        hash: [u8; 32],
    },
}

impl std::fmt::Debug for DiskExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskExec")
            .field("backend", &self.io.kind())
            .field("direct", &self.direct)
            .field("in_flight", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl DiskExec {
    /// An executor on `io`; `direct` asks for `O_DIRECT` on the files it opens.
    pub fn new(io: DiskIo, direct: bool) -> Self {
        Self {
            io,
            direct,
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
        } = op
        else {
            let (id, res) = src.execute(op);
            self.done.push_back((tag, id, res));
            return;
        };
        match self.read_uring(tag, src, id, file, offset, len as usize) {
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
    fn read_uring(
        &mut self,
        tag: usize,
        src: &SourceFiles,
        id: OpId,
        file: u32,
        offset: u64,
        len: usize,
    ) -> Result<bool, DiskFailure> {
        if self.io.kind() == BackendKind::Std {
            return Ok(false);
        }
        if !self.files.contains_key(&file) {
            let path = src
                .path(file)
                .ok_or_else(|| DiskFailure::Io(format!("no source for entry {file}")))?;
            let f = DmaFile::open(path, flux_engine::OpenMode::Read, self.direct)
                .map_err(engine_err)?;
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
            what: What::Read,
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
        } = &op
        {
            match self.write_uring(tag, dst, *id, *file, *index, *offset, *hash, data) {
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

    /// Queues an io_uring chunk write; `Ok(false)` when it must be done on the blocking path.
    #[allow(clippy::too_many_arguments)]
    fn write_uring(
        &mut self,
        tag: usize,
        dst: &mut Destination,
        id: OpId,
        file: u32,
        index: u32,
        offset: u64,
        hash: [u8; 32],
        data: &ChunkData,
    ) -> Result<bool, DiskFailure> {
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
        // The one copy on the receiving side: QUIC's pieces into the aligned buffer the write
        // goes from. The hash runs over that buffer and nothing is written unless it matches.
        let mut buf = take_buf(&mut self.free, f, data.len())?;
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
        data.copy_to(buf.full_mut());
        buf.set_len(data.len());
        if chunk_hash(&buf) != hash {
            self.free.push(buf);
            return Err(DiskFailure::Corrupt);
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
            let name = dst.entry_path(file).unwrap_or("?").to_owned();
            let f = DmaFile::from_fd(fd, Path::new(&name), self.direct).map_err(engine_err)?;
            self.remember(file, f);
        }
        Ok(())
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
                    let out = res.map(|(data, hash)| DiskResult::Read { data, hash });
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
                (What::Read, Ok(n)) => {
                    buf.set_len(n);
                    let data = match buf.freeze(&self.recycler) {
                        Ok(b) => b,
                        Err(b) => Bytes::copy_from_slice(&b),
                    };
                    self.hash_read(p.tag, p.id, data);
                    continue;
                }
                (What::Write { file, index, hash }, Ok(_)) => match dst.as_deref_mut() {
                    Some(d) => d.record(file, index, &hash).map(|()| DiskResult::Done),
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

    /// Hashes a chunk read for sending: on the work threads, or here.
    fn hash_read(&mut self, tag: usize, id: OpId, data: Bytes) {
        if let Some(pool) = self.pool.as_mut() {
            match pool.submit(Job::Hash { tag, id, data }) {
                Ok(()) => self.working.push((tag, id)),
                Err(_) => self.done.push_back((tag, id, Err(pool_gone()))),
            }
            return;
        }
        let hash = chunk_hash(&data);
        self.done
            .push_back((tag, id, Ok(DiskResult::Read { data, hash })));
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
    DiskFailure::Io(e.to_string())
}
