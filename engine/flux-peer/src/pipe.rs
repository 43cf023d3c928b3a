//! A receiver's destination that is a pipe (`thru join --out -`): the chunks of a one-file
//! share are verified (and decompressed) like any others, then written in file order to a
//! writer — stdout — on a thread of its own, so a slow reader of the pipe never stalls the
//! network loop.
//!
//! Order: the receiver asks the sender for its chunks in order, on one lane
//! ([`flux_wire::FEATURE_IN_ORDER`]). A chunk that arrives early anyway (a refetched chunk, a
//! sender that ignores the request) waits in memory, up to [`MAX_EARLY`] chunks; past that
//! the transfer fails rather than grow without bound.
//!
//! Back-pressure: a chunk's write completes when the writer thread has written it, so the
//! machine stops reading the network while the pipe is full (its pending-write bound).
//! Early chunks complete at once: they must not hold that bound while the chunk they wait for
//! is still on the network.
//!
//! What it does not do: resume (a pipe keeps nothing), or more than one file.
//!
//! [`PipeSource`] is the sender's side of a pipe (`thru host -`): the share is one stream
//! ([`flux_wire::EntryKind::Stream`]) whose chunks are read from stdin, in order, on a thread
//! of its own (a read of a pipe blocks), hashed and compressed there too. A short read is the
//! stream's end; the sender machine learns the size from it. Stdin is read once, so one
//! receiver gets it: another receiver's reads fail with a message saying a stream cannot be
//! sent again.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use flux_transfer::{DiskFailure, DiskOp, DiskResult, OpId};

use crate::exec::Done;

/// Chunks held in memory while an earlier one is missing.
pub const MAX_EARLY: usize = 64;

/// The request a write completes (`(tag, id)`), if any.
type Ticket = Option<(usize, OpId)>;

/// Writes the one file of a share to a writer, in order.
pub struct PipeSink {
    /// To the writer thread: bytes to write (with the op to complete), or a flush.
    tx: Option<Sender<(Ticket, Bytes)>>,
    rx: Receiver<(Ticket, Result<(), String>)>,
    thread: Option<JoinHandle<()>>,
    /// The next chunk index to write.
    next: u32,
    /// Chunks that came before their turn.
    early: BTreeMap<u32, Bytes>,
    /// Ops whose bytes are with the writer.
    out: usize,
    done: VecDeque<Done>,
    /// The writer failed: every later write fails with this.
    broken: Option<String>,
}

impl std::fmt::Debug for PipeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeSink")
            .field("next", &self.next)
            .field("early", &self.early.len())
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

impl PipeSink {
    /// A sink writing to `w` (stdout) on its own thread.
    pub fn new(mut w: Box<dyn Write + Send>) -> std::io::Result<Self> {
        // Bounded: a full pipe holds the sink's writes back, and through them the machine.
        let (tx, jobs) = crossbeam_channel::bounded::<(Ticket, Bytes)>(8);
        let (done_tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("flux-pipe".into())
            .spawn(move || {
                for (op, bytes) in jobs.iter() {
                    let res = if bytes.is_empty() {
                        w.flush()
                    } else {
                        w.write_all(&bytes)
                    }
                    .map_err(|e| e.to_string());
                    let failed = res.is_err();
                    if done_tx.send((op, res)).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            next: 0,
            early: BTreeMap::new(),
            out: 0,
            done: VecDeque::new(),
            broken: None,
        })
    }

    /// Requests still with the writer thread: the caller must come back soon to collect them
    /// (their completion does not wake the loop).
    pub fn working(&self) -> usize {
        self.out
    }

    /// Performs one of the receiver's requests for connection `tag`.
    pub fn submit(&mut self, tag: usize, op: DiskOp) {
        match op {
            DiskOp::WriteChunk {
                id,
                index,
                hash,
                data,
                compressed,
                ..
            } => {
                let plain = compressed.map_or(data.len(), |n| n as usize);
                let mut buf = vec![0u8; plain];
                if let Err(e) = crate::work::gather_chunk(&data, compressed, &hash, &mut buf) {
                    return self.done.push_back((tag, id, Err(e)));
                }
                self.chunk(tag, id, index, Bytes::from(buf));
            }
            // The file is whole once every chunk is written: a flush marks that point.
            DiskOp::Finalize { id, .. } => self.send(tag, id, Bytes::new()),
            other => {
                let id = other.id();
                self.done.push_back((tag, id, Ok(DiskResult::Done)));
            }
        }
    }

    fn chunk(&mut self, tag: usize, id: OpId, index: u32, bytes: Bytes) {
        if index < self.next || self.early.contains_key(&index) {
            // Already written or held (a refetched duplicate): nothing more to do.
            return self.done.push_back((tag, id, Ok(DiskResult::Done)));
        }
        if index > self.next {
            if self.early.len() >= MAX_EARLY {
                return self.done.push_back((
                    tag,
                    id,
                    Err(DiskFailure::Io(format!(
                        "stdout: chunk {index} arrived while chunk {} is still missing, and \
                         {MAX_EARLY} chunks already wait for it (the host's thru may be too old \
                         to send in order; receive into a directory instead)",
                        self.next
                    ))),
                ));
            }
            self.early.insert(index, bytes);
            return self.done.push_back((tag, id, Ok(DiskResult::Done)));
        }
        self.next += 1;
        self.send(tag, id, bytes);
        while let Some(b) = self.early.remove(&self.next) {
            self.next += 1;
            // Its op completed when it was held; this write completes nothing.
            self.send_quiet(b);
        }
    }

    fn send(&mut self, tag: usize, id: OpId, bytes: Bytes) {
        if let Some(e) = &self.broken {
            return self
                .done
                .push_back((tag, id, Err(DiskFailure::Io(e.clone()))));
        }
        match self.tx.as_ref().map(|tx| tx.send((Some((tag, id)), bytes))) {
            Some(Ok(())) => self.out += 1,
            _ => self.done.push_back((tag, id, Err(gone()))),
        }
    }

    fn send_quiet(&mut self, bytes: Bytes) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((None, bytes));
        }
    }

    /// Collects what the writer finished.
    pub fn reap(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok((op, res)) => {
                    if let Err(e) = &res {
                        self.broken = Some(format!("stdout: {e}"));
                    }
                    if let Some((tag, id)) = op {
                        self.out -= 1;
                        let res = res
                            .map(|()| DiskResult::Done)
                            .map_err(|e| DiskFailure::Io(format!("stdout: {e}")));
                        self.done.push_back((tag, id, res));
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The writer stopped (a failed write): what is still out fails.
                    if self.out > 0 {
                        self.broken
                            .get_or_insert_with(|| "stdout: writer gone".into());
                    }
                    break;
                }
            }
        }
    }

    /// The next finished request: `(tag, id, outcome)`.
    pub fn poll_done(&mut self) -> Option<Done> {
        self.done.pop_front()
    }
}

impl Drop for PipeSink {
    fn drop(&mut self) {
        // Closing the channel ends the writer once it has written what it holds.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A read request for the stream: `(tag, id, len, zstd level)`.
type ReadJob = (usize, OpId, u32, Option<i32>);

/// Reads a share's one stream from a reader (stdin) for one receiver, in order.
pub struct PipeSource {
    tx: Option<Sender<ReadJob>>,
    rx: Receiver<Done>,
    /// The stream offset the next read must ask for.
    next: u64,
    /// The connection whose reads the stream serves (the first that asked).
    owner: Option<usize>,
    /// Reads with the reader thread.
    out: usize,
    done: VecDeque<Done>,
}

impl std::fmt::Debug for PipeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeSource")
            .field("next", &self.next)
            .field("owner", &self.owner)
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

impl PipeSource {
    /// A source reading `r` (stdin) on its own thread. The thread is not joined when the
    /// source is dropped: it may be blocked in a read of a pipe whose writer is still busy,
    /// and ends with the process.
    pub fn new(mut r: Box<dyn std::io::Read + Send>) -> std::io::Result<Self> {
        let (tx, jobs) = crossbeam_channel::unbounded::<ReadJob>();
        let (done_tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("flux-stdin".into())
            .spawn(move || {
                let mut ended = false;
                let mut broken: Option<String> = None;
                for (tag, id, len, compress) in jobs.iter() {
                    let res = match &broken {
                        Some(e) => Err(DiskFailure::Io(e.clone())),
                        None => {
                            let mut buf = vec![0u8; len as usize];
                            let mut got = 0;
                            while !ended && got < buf.len() {
                                match r.read(&mut buf[got..]) {
                                    Ok(0) => ended = true,
                                    Ok(n) => got += n,
                                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                    Err(e) => {
                                        broken = Some(format!("reading stdin: {e}"));
                                        break;
                                    }
                                }
                            }
                            match &broken {
                                Some(e) => Err(DiskFailure::Io(e.clone())),
                                None => {
                                    buf.truncate(got);
                                    let (data, hash, compressed) =
                                        crate::work::hash_chunk(Bytes::from(buf), compress);
                                    Ok(DiskResult::Read {
                                        data,
                                        hash,
                                        compressed,
                                    })
                                }
                            }
                        }
                    };
                    if done_tx.send((tag, id, res)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            next: 0,
            owner: None,
            out: 0,
            done: VecDeque::new(),
        })
    }

    /// Reads still with the reader thread: the caller must come back soon to collect them
    /// (their completion does not wake the loop).
    pub fn working(&self) -> usize {
        self.out
    }

    /// Performs a read of the stream for connection `tag`.
    pub fn submit(&mut self, tag: usize, op: DiskOp) {
        let DiskOp::Read {
            id,
            offset,
            len,
            compress,
            ..
        } = op
        else {
            let id = op.id();
            return self.done.push_back((
                tag,
                id,
                Err(DiskFailure::Io("a stream cannot be written".into())),
            ));
        };
        if *self.owner.get_or_insert(tag) != tag {
            return self.done.push_back((
                tag,
                id,
                Err(DiskFailure::Io(
                    "this share is a stream (stdin), and it was already sent, or partly sent, to \
                     another receiver; a stream is read once and cannot be resumed: pipe it into \
                     `thru host -` again"
                        .into(),
                )),
            ));
        }
        if offset != self.next {
            return self.done.push_back((
                tag,
                id,
                Err(DiskFailure::Io(format!(
                    "stream read at {offset} where {} was next: a stream is read in order",
                    self.next
                ))),
            ));
        }
        self.next += u64::from(len);
        match self.tx.as_ref().map(|tx| tx.send((tag, id, len, compress))) {
            Some(Ok(())) => self.out += 1,
            _ => self.done.push_back((
                tag,
                id,
                Err(DiskFailure::Io("stdin: the reader thread is gone".into())),
            )),
        }
    }

    /// Collects what the reader finished.
    pub fn reap(&mut self) {
        while let Ok(d) = self.rx.try_recv() {
            self.out -= 1;
            self.done.push_back(d);
        }
    }

    /// The next finished request: `(tag, id, outcome)`.
    pub fn poll_done(&mut self) -> Option<Done> {
        self.done.pop_front()
    }
}

fn gone() -> DiskFailure {
    DiskFailure::Io("stdout: the writer thread is gone".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use flux_transfer::ChunkData;
    use flux_transfer::digest::chunk_hash;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn write(index: u32, data: &[u8]) -> DiskOp {
        DiskOp::WriteChunk {
            id: OpId(u64::from(index)),
            file: 0,
            index,
            offset: 0,
            hash: chunk_hash(data),
            data: ChunkData::from(data.to_vec()),
            compressed: None,
        }
    }

    #[test]
    fn chunks_out_of_order_come_out_in_order_and_a_bad_one_is_refused() {
        let out = Shared::default();
        let mut s = PipeSink::new(Box::new(out.clone())).unwrap();
        s.submit(0, write(1, b"world"));
        s.submit(0, write(0, b"hello "));
        let mut bad = write(2, b"!");
        if let DiskOp::WriteChunk { hash, .. } = &mut bad {
            *hash = chunk_hash(b"?");
        }
        s.submit(0, bad);
        s.submit(
            0,
            DiskOp::Finalize {
                id: OpId(9),
                file: 0,
                replace: false,
                size: None,
            },
        );
        let mut results = Vec::new();
        for _ in 0..1000 {
            s.reap();
            while let Some((_, id, r)) = s.poll_done() {
                results.push((id, r.is_ok()));
            }
            if results.len() == 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(results.contains(&(OpId(2), false)), "{results:?}");
        assert!(results.contains(&(OpId(9), true)), "{results:?}");
        drop(s);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello world");
    }
}
