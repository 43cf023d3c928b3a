//! 1 GiB file throughput: O_DIRECT through io_uring (registered 1 MiB buffers, many in flight)
//! against buffered `std::fs`, plus O_DIRECT through the blocking backend.
//!
//! Run: `cargo bench -p flux-engine --bench file_io` (release). The file lives in
//! `FLUX_BENCH_DIR` (default /var/tmp) and is removed afterwards. Before every read the file is
//! dropped from the page cache (`posix_fadvise(DONTNEED)`), so reads come from the device.
//! Writes create a new file and include the final `fsync`. CPU is user+system time of this
//! process divided by wall time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flux_engine::{BackendKind, BufPool, DiskIo, DmaFile, FileOp, OpenMode};

const SIZE: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

fn main() {
    let dir = std::env::var_os("FLUX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let path = dir.join(format!("flux-engine-bench-{}", std::process::id()));
    println!(
        "file {} ({} MiB), {} KiB requests",
        path.display(),
        SIZE >> 20,
        CHUNK >> 10
    );
    for rep in 0..2 {
        println!("round {}", rep + 1);
        report("io_uring O_DIRECT write, 32 in flight", || {
            uring_write(&path, 32)
        });
        report("io_uring O_DIRECT read, 16 in flight", || {
            uring_read(&path, 16)
        });
        report("std::fs buffered write", || std_write(&path));
        report("std::fs buffered read (cold)", || std_read(&path));
        report("blocking backend O_DIRECT read (pread)", || {
            std_backend_read(&path)
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn report(name: &str, f: impl FnOnce()) {
    let (cpu0, t0) = (cpu_time(), Instant::now());
    f();
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    println!(
        "  {name:42} {:5.2} GB/s  CPU {:3.0}%",
        SIZE as f64 / wall.as_secs_f64() / 1e9,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    );
}

fn uring_write(path: &Path, depth: usize) {
    let _ = std::fs::remove_file(path);
    let mut io = DiskIo::new(BackendKind::Uring).expect("io_uring");
    let file = DmaFile::create(path).expect("create");
    let pool = BufPool::new(depth, CHUNK, file.alignment().max()).expect("pool");
    let registered = io.ring().expect("ring").register_pool(&pool);
    let mut pending: VecDeque<FileOp> = VecDeque::new();
    let mut off = 0;
    while off < SIZE {
        let mut buf = match pool.get() {
            Some(b) => b,
            None => complete(&mut io, &mut pending),
        };
        buf.set_len(CHUNK);
        buf[..8].copy_from_slice(&(off as u64).to_le_bytes());
        pending.push_back(io.write_at(&file, buf, off as u64).expect("write"));
        off += CHUNK;
    }
    while !pending.is_empty() {
        complete(&mut io, &mut pending);
    }
    file.sync_all().expect("fsync");
    eprintln!(
        "    (mode {:?}, registered buffers {registered})",
        file.mode()
    );
}

fn uring_read(path: &Path, depth: usize) {
    drop_cache(path);
    let mut io = DiskIo::new(BackendKind::Uring).expect("io_uring");
    let file = DmaFile::open(path, OpenMode::Read, true).expect("open");
    let pool = BufPool::new(depth, CHUNK, file.alignment().max()).expect("pool");
    io.ring().expect("ring").register_pool(&pool);
    let mut pending: VecDeque<FileOp> = VecDeque::new();
    let mut off = 0;
    while off < SIZE {
        let buf = match pool.get() {
            Some(b) => b,
            None => complete(&mut io, &mut pending),
        };
        pending.push_back(io.read_at(&file, buf, off as u64, CHUNK).expect("read"));
        off += CHUNK;
    }
    while !pending.is_empty() {
        complete(&mut io, &mut pending);
    }
}

/// Completes the oldest op and returns its buffer.
fn complete(io: &mut DiskIo, pending: &mut VecDeque<FileOp>) -> flux_engine::AlignedBuf {
    let op = pending.pop_front().expect("pending op");
    let (res, buf) = io.wait(op).expect("ring");
    assert_eq!(res.expect("io"), CHUNK);
    buf
}

fn std_write(path: &Path) {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::File::create(path).expect("create");
    let buf = vec![0x5au8; CHUNK];
    for _ in 0..SIZE / CHUNK {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("fsync");
}

fn std_read(path: &Path) {
    drop_cache(path);
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, SIZE);
}

fn std_backend_read(path: &Path) {
    drop_cache(path);
    let mut io = DiskIo::new(BackendKind::Std).expect("std");
    let file = DmaFile::open(path, OpenMode::Read, true).expect("open");
    let mut buf = file.alloc_buf(CHUNK).expect("buf");
    let mut off = 0;
    while off < SIZE {
        let op = io.read_at(&file, buf, off as u64, CHUNK).expect("read");
        let (res, b) = io.wait(op).expect("wait");
        assert_eq!(res.expect("read"), CHUNK);
        buf = b;
        off += CHUNK;
    }
}

/// Evicts the file's pages so the next read comes from the device.
fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).expect("open");
    // SAFETY: plain syscalls on a valid fd.
    unsafe {
        libc::fdatasync(f.as_raw_fd());
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn cpu_time() -> Duration {
    // SAFETY: all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
