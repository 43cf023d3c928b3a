//! Write-then-read-back of awkward file sizes through both backends, on tmpfs and on a real
//! filesystem (O_DIRECT must be used there).
//!
//! tmpfs refused O_DIRECT before Linux 6.6 and accepts it since (the dev VM runs 6.18), so the
//! tmpfs cases expect whatever a raw `open(O_DIRECT)` gets; the refused-at-open fallback is
//! exercised on procfs, which still answers `EINVAL`.
//!
//! The real-filesystem directory is `FLUX_TEST_DIRECT_IO_DIR` if set (then O_DIRECT is
//! required), else the first of /var/tmp and the cargo target tmpdir that is ext4/xfs/btrfs.

use std::path::{Path, PathBuf};

use flux_engine::{BackendKind, BufPool, DiskIo, DmaFile, FileOp, IoMode, OpenMode};

const SIZES: [usize; 7] = [0, 1, 511, 4096, 4097, (1 << 20) + 3, 64 << 20];
const CHUNK: usize = 1 << 20;
const DEPTH: usize = 16;

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8)
        .collect()
}

/// A directory on tmpfs, if the machine has one.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let d = tempfile::tempdir_in("/dev/shm").ok()?;
    (fs_magic(d.path()) == Some(TMPFS_MAGIC)).then_some(d)
}

/// A directory on a filesystem that supports O_DIRECT; `None` (skip) when none is found.
fn direct_dir() -> Option<tempfile::TempDir> {
    if let Some(dir) = std::env::var_os("FLUX_TEST_DIRECT_IO_DIR") {
        return Some(tempfile::tempdir_in(dir).expect("FLUX_TEST_DIRECT_IO_DIR usable"));
    }
    let candidates = [
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ];
    for c in candidates {
        if matches!(fs_magic(&c), Some(EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC))
            && let Ok(d) = tempfile::tempdir_in(&c)
        {
            return Some(d);
        }
    }
    eprintln!(
        "SKIP real-filesystem O_DIRECT cases: no ext4/xfs/btrfs dir; set FLUX_TEST_DIRECT_IO_DIR"
    );
    None
}

/// The mode a raw `open(O_DIRECT)` in `dir` gets from the kernel.
fn kernel_mode(dir: &Path) -> IoMode {
    let p = dir.join("probe");
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: NUL-terminated path; the fd is closed right away.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_RDWR | libc::O_DIRECT,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: closing the fd we just opened.
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_file(&p);
        IoMode::Direct
    } else {
        IoMode::Buffered
    }
}

fn fs_magic(p: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: all-zero statfs is valid; `c` is NUL-terminated; statfs writes into `st`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683E;

fn backend(kind: BackendKind) -> Option<DiskIo> {
    match DiskIo::new(kind) {
        Ok(io) => Some(io),
        Err(e) => {
            eprintln!("SKIP {kind:?}: {e}");
            None
        }
    }
}

/// Writes `size` bytes in CHUNK pieces, DEPTH in flight, then reads them back the same way.
fn round_trip(io: &mut DiskIo, dir: &Path, size: usize, expect: IoMode) {
    let path = dir.join(format!("f-{size}-{:?}", io.kind()));
    let file = DmaFile::create(&path).expect("create");
    assert_eq!(file.mode(), expect, "{}", path.display());
    let pool = BufPool::new(DEPTH, CHUNK, file.alignment().max()).expect("pool");
    if let Some(ring) = io.ring() {
        ring.register_pool(&pool);
    }
    file.allocate(0, size as u64).expect("fallocate");

    let mut pending: Vec<FileOp> = Vec::new();
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        let mut buf = match pool.get() {
            Some(b) => b,
            None => {
                let op = pending.remove(0);
                let (res, b) = io.wait(op).expect("ring");
                res.expect("write");
                b
            }
        };
        buf.clear();
        buf.extend_from_slice(&pattern(off, n));
        pending.push(io.write_at(&file, buf, off as u64).expect("submit write"));
        off += n;
    }
    for op in pending.drain(..) {
        let (res, _) = io.wait(op).expect("ring");
        res.expect("write");
    }
    if size == 0 {
        // Nothing was written: fallocate(0) left it empty.
        file.set_len(0).expect("truncate");
    }
    file.sync_all().expect("fsync");
    assert_eq!(file.len().expect("len"), size as u64, "size after write");
    drop(file);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), size as u64);

    let file = DmaFile::open(&path, OpenMode::Read, true).expect("open");
    assert_eq!(file.mode(), expect);
    let mut got = Vec::with_capacity(size);
    let mut offsets = (0..size.max(1)).step_by(CHUNK);
    let mut pending: std::collections::VecDeque<FileOp> = Default::default();
    loop {
        while pending.len() < DEPTH {
            let Some(o) = offsets.next() else { break };
            let buf = pool.get().expect("free buffer");
            pending.push_back(
                io.read_at(&file, buf, o as u64, CHUNK)
                    .expect("submit read"),
            );
        }
        let Some(op) = pending.pop_front() else { break };
        let (res, buf) = io.wait(op).expect("ring");
        let n = res.expect("read");
        assert_eq!(n, buf.len());
        got.extend_from_slice(&buf);
    }
    assert_eq!(got.len(), size, "bytes read back");
    assert!(got == pattern(0, size), "content mismatch for size {size}");
    std::fs::remove_file(&path).expect("rm");
}

fn run_all(kind: BackendKind) {
    let Some(mut io) = backend(kind) else { return };
    if let Some(d) = tmpfs_dir() {
        let expect = kernel_mode(d.path());
        eprintln!("tmpfs O_DIRECT: {expect:?}");
        for size in SIZES {
            round_trip(&mut io, d.path(), size, expect);
        }
    } else {
        eprintln!("SKIP tmpfs cases: /dev/shm is not tmpfs");
    }
    if let Some(d) = direct_dir() {
        for size in SIZES {
            round_trip(&mut io, d.path(), size, IoMode::Direct);
        }
    }
}

#[test]
fn awkward_sizes_uring() {
    run_all(BackendKind::Uring);
}

#[test]
fn awkward_sizes_std() {
    run_all(BackendKind::Std);
}

#[test]
fn misaligned_direct_offset_is_rejected_before_submit() {
    let Some(d) = direct_dir() else { return };
    let Some(mut io) = backend(BackendKind::Uring) else {
        return;
    };
    let file = DmaFile::create(&d.path().join("m")).expect("create");
    assert_eq!(file.mode(), IoMode::Direct);
    let mut buf = file.alloc_buf(4096).expect("buf");
    buf.extend_from_slice(&[1; 100]);
    let r = io.write_at(&file, buf, 3);
    assert!(matches!(
        r,
        Err(flux_engine::EngineError::Misaligned { offset: 3, .. })
    ));
}

#[test]
fn many_reads_in_flight() {
    let Some(mut io) = backend(BackendKind::Uring) else {
        return;
    };
    let d = direct_dir().or_else(tmpfs_dir).expect("some dir");
    let path = d.path().join("many");
    let n = 128;
    let blk = 4096;
    std::fs::write(&path, pattern(0, n * blk)).expect("write");
    let file = DmaFile::open_read(&path).expect("open");
    let ops: Vec<FileOp> = (0..n)
        .rev()
        .map(|i| {
            let buf = file.alloc_buf(blk).expect("buf");
            io.read_at(&file, buf, (i * blk) as u64, blk)
                .expect("submit")
        })
        .collect();
    assert!(
        io.ring().expect("ring").in_flight() >= n / 2,
        "ops are in flight together"
    );
    for (j, op) in ops.into_iter().enumerate() {
        let i = n - 1 - j;
        let (res, buf) = io.wait(op).expect("ring");
        assert_eq!(res.expect("read"), blk);
        assert!(buf[..] == pattern(i * blk, blk)[..], "block {i}");
    }
    assert_eq!(io.ring().expect("ring").in_flight(), 0);
}

#[test]
fn dropping_file_and_ops_in_flight_keeps_fd_and_buffers() {
    let Some(mut io) = backend(BackendKind::Uring) else {
        return;
    };
    let d = direct_dir().or_else(tmpfs_dir).expect("some dir");
    let path = d.path().join("dropped");
    let pool = BufPool::new(8, 1 << 20, 4096).expect("pool");
    {
        let file = DmaFile::create(&path).expect("create");
        for i in 0..8 {
            let mut buf = pool.get().expect("buf");
            buf.extend_from_slice(&pattern(i << 20, 1 << 20));
            // Drop each op handle immediately, then the file: the ring keeps both alive.
            drop(io.write_at(&file, buf, (i << 20) as u64).expect("submit"));
        }
        assert_eq!(pool.available(), 0, "buffers owned by in-flight ops");
    }
    io.ring().expect("ring").submit().expect("submit");
    while io.ring().expect("ring").in_flight() > 0 {
        io.poll(1, None).expect("poll");
    }
    assert_eq!(pool.available(), 8, "buffers back after their CQEs");
    let data = std::fs::read(&path).expect("read");
    assert!(
        data == pattern(0, 8 << 20),
        "writes landed although file and ops were dropped"
    );
}

#[test]
fn unaligned_tail_write_is_padded_then_truncated() {
    let Some(d) = direct_dir() else { return };
    for kind in [BackendKind::Uring, BackendKind::Std] {
        let Some(mut io) = backend(kind) else {
            continue;
        };
        let path = d.path().join(format!("tail-{kind:?}"));
        let file = DmaFile::create(&path).expect("create");
        let mut buf = file.alloc_buf(8192).expect("buf");
        buf.extend_from_slice(&pattern(0, 4096));
        let op = io_write(&mut io, &file, buf, 0);
        let (r, _) = io.wait(op).expect("ring");
        assert_eq!(r.expect("write"), 4096);
        let mut buf = file.alloc_buf(8192).expect("buf");
        buf.extend_from_slice(&pattern(4096, 100));
        let op = io_write(&mut io, &file, buf, 4096);
        let (r, _) = io.wait(op).expect("ring");
        assert_eq!(r.expect("write"), 100);
        assert_eq!(file.len().expect("len"), 4196);
        assert!(std::fs::read(&path).expect("read") == pattern(0, 4196));
    }
}

fn io_write(io: &mut DiskIo, f: &DmaFile, b: flux_engine::AlignedBuf, off: u64) -> FileOp {
    io.write_at(f, b, off).expect("submit")
}

#[test]
fn o_direct_refused_at_open_falls_back_to_buffered() {
    // procfs has no direct I/O: open(O_DIRECT) fails with EINVAL.
    let path = Path::new("/proc/self/status");
    for kind in [BackendKind::Uring, BackendKind::Std] {
        let Some(mut io) = backend(kind) else {
            continue;
        };
        let file = DmaFile::open(path, OpenMode::Read, true).expect("open");
        assert_eq!(file.mode(), IoMode::Buffered);
        let buf = file.alloc_buf(4096).expect("buf");
        // Unaligned offsets and lengths are fine in buffered mode.
        let op = io.read_at(&file, buf, 0, 6).expect("submit");
        let (r, buf) = io.wait(op).expect("ring");
        assert_eq!(r.expect("read"), 6);
        assert_eq!(&buf[..], b"Name:\t");
    }
}
