//! CPU work the machines ask for — hashing (and compressing) a chunk read for sending,
//! gathering (or decompressing) and verifying a received chunk — executed on a small pool of threads so the loop thread keeps moving
//! datagrams meanwhile (the sans-IO machines only name the work: `flux_transfer::DiskOp`).
//!
//! Jobs carry owned data (`Bytes`, [`SendBuf`]) and come back through a channel the loop
//! drains without blocking. A job that panics comes back as a failure of that request, which
//! ends its transfer with an error; a pool whose threads are gone fails every job still out.
//! Nothing waits on a lock on the data path.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use flux_engine::SendBuf;
use flux_transfer::digest::chunk_hash;
use flux_transfer::{ChunkData, DiskFailure, OpId};
use flux_wire::Hash;

/// A request, tagged with the session (`tag`) and the machine's request id.
pub(crate) enum Job {
    /// Hash a chunk read for sending, and compress it at level `compress` if given.
    Hash {
        tag: usize,
        id: OpId,
        data: Bytes,
        compress: Option<i32>,
    },
    /// Gather a received chunk into `buf` (decompressing it to `compressed` bytes when it is a
    /// zstd frame) and check it against `hash`.
    Verify {
        tag: usize,
        id: OpId,
        write: PendingWrite,
        data: ChunkData,
        compressed: Option<u32>,
        buf: SendBuf,
    },
    /// Panics on the worker (tests: a panicking job must come back as a failure).
    #[cfg(test)]
    Explode { tag: usize, id: OpId },
}

/// Where a verified chunk goes once it comes back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingWrite {
    pub file: u32,
    pub index: u32,
    pub offset: u64,
    pub hash: Hash,
}

/// A finished job.
pub(crate) enum JobDone {
    Hashed {
        tag: usize,
        id: OpId,
        res: Result<Hashed, DiskFailure>,
    },
    Verified {
        tag: usize,
        id: OpId,
        write: PendingWrite,
        /// The gathered buffer when the bytes match their hash.
        res: Result<SendBuf, DiskFailure>,
    },
}

/// A chunk read for sending, hashed and perhaps compressed.
pub(crate) type Hashed = (Bytes, Hash, Option<Bytes>);

/// Hashes `data` and, with a level, compresses it ([`crate::compress::compress`]).
pub(crate) fn hash_chunk(data: Bytes, compress: Option<i32>) -> Hashed {
    let hash = chunk_hash(&data);
    let frame = compress.and_then(|level| crate::compress::compress(&data, level));
    (data, hash, frame)
}

/// Puts a received chunk into `buf` — its pieces gathered, or its zstd frame decompressed to
/// exactly `compressed` bytes — and checks the plain bytes against `hash`.
pub(crate) fn gather_chunk(
    data: &ChunkData,
    compressed: Option<u32>,
    hash: &Hash,
    buf: &mut [u8],
) -> Result<usize, DiskFailure> {
    let len = match compressed {
        Some(n) => {
            let n = n as usize;
            let dst = buf
                .get_mut(..n)
                .ok_or_else(|| DiskFailure::Io("chunk buffer too small".into()))?;
            crate::compress::decompress_exact(&data.to_contiguous(), dst)?;
            n
        }
        None => {
            data.copy_to(buf);
            data.len()
        }
    };
    if chunk_hash(&buf[..len]) == *hash {
        Ok(len)
    } else {
        Err(DiskFailure::Corrupt)
    }
}

/// The threads and their channels.
pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<JobDone>,
    out: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (jtx, jrx) = crossbeam_channel::unbounded::<Job>();
        let (dtx, drx) = crossbeam_channel::unbounded::<JobDone>();
        let mut handles = Vec::new();
        for n in 0..threads.max(1) {
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("flux-work-{n}"))
                    .spawn(move || {
                        for job in jrx.iter() {
                            if dtx.send(run(job)).is_err() {
                                return;
                            }
                        }
                    })?,
            );
        }
        Ok(Self {
            jobs: Some(jtx),
            done: drx,
            out: 0,
            threads: handles,
        })
    }

    /// Jobs handed out and not yet collected.
    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        self.out
    }

    /// Hands a job to the workers; `Err` gives it back if they are gone.
    pub fn submit(&mut self, job: Job) -> Result<(), Box<Job>> {
        match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => {
                    self.out += 1;
                    Ok(())
                }
                Err(e) => Err(Box::new(e.0)),
            },
            None => Err(Box::new(job)),
        }
    }

    /// A finished job, if one is waiting; `Err` when jobs are out but no worker is left to
    /// finish them (the caller fails those requests).
    pub fn try_done(&mut self) -> Result<Option<JobDone>, ()> {
        match self.done.try_recv() {
            Ok(d) => {
                self.out -= 1;
                Ok(Some(d))
            }
            Err(TryRecvError::Empty) if self.threads.iter().all(|t| t.is_finished()) => {
                if self.out > 0 { Err(()) } else { Ok(None) }
            }
            Err(_) => Ok(None),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends the workers' loops.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(job: Job) -> JobDone {
    match job {
        #[cfg(test)]
        Job::Explode { tag, id } => {
            let res = catch_unwind(|| -> Hashed { panic!("test job") }).map_err(|_| panicked());
            JobDone::Hashed { tag, id, res }
        }
        Job::Hash {
            tag,
            id,
            data,
            compress,
        } => {
            let res = catch_unwind(AssertUnwindSafe(|| hash_chunk(data, compress)))
                .map_err(|_| panicked());
            JobDone::Hashed { tag, id, res }
        }
        Job::Verify {
            tag,
            id,
            write,
            data,
            compressed,
            mut buf,
        } => {
            let res = catch_unwind(AssertUnwindSafe(move || {
                let n = gather_chunk(&data, compressed, &write.hash, buf.full_mut())?;
                buf.set_len(n);
                Ok(buf)
            }))
            .unwrap_or_else(|_| Err(panicked()));
            JobDone::Verified {
                tag,
                id,
                write,
                res,
            }
        }
    }
}

fn panicked() -> DiskFailure {
    DiskFailure::Io("a hashing thread panicked".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(pool: &mut Pool) -> JobDone {
        for _ in 0..10_000 {
            if let Some(d) = pool.try_done().unwrap() {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no result in 10 s");
    }

    #[test]
    fn a_panicking_job_fails_its_request_and_the_pool_goes_on() {
        let mut pool = Pool::new(1).unwrap();
        assert!(
            pool.submit(Job::Explode {
                tag: 1,
                id: OpId(7)
            })
            .is_ok()
        );
        match wait(&mut pool) {
            JobDone::Hashed { tag, id, res } => {
                assert_eq!((tag, id), (1, OpId(7)));
                assert_eq!(res.unwrap_err(), panicked());
            }
            JobDone::Verified { .. } => panic!("wrong kind"),
        }
        let data = Bytes::from_static(b"chunk");
        assert!(
            pool.submit(Job::Hash {
                tag: 2,
                id: OpId(8),
                data,
                compress: None,
            })
            .is_ok()
        );
        match wait(&mut pool) {
            JobDone::Hashed {
                res: Ok((d, h, _)), ..
            } => assert_eq!(h, chunk_hash(&d)),
            _ => panic!("the pool stopped working after a panic"),
        }
        assert_eq!(pool.outstanding(), 0);
    }

    #[test]
    fn a_chunk_that_does_not_match_comes_back_corrupt() {
        let mut pool = Pool::new(1).unwrap();
        let buf = flux_engine::AlignedBuf::new(4096, 4096)
            .unwrap()
            .into_send()
            .unwrap();
        let write = PendingWrite {
            file: 0,
            index: 0,
            offset: 0,
            hash: chunk_hash(b"expected"),
        };
        let data = ChunkData::from(Bytes::from_static(b"received"));
        assert!(
            pool.submit(Job::Verify {
                tag: 0,
                id: OpId(1),
                write,
                data,
                compressed: None,
                buf
            })
            .is_ok()
        );
        match wait(&mut pool) {
            JobDone::Verified { res, .. } => assert_eq!(res.unwrap_err(), DiskFailure::Corrupt),
            JobDone::Hashed { .. } => panic!("wrong kind"),
        }
    }
}
