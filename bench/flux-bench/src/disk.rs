//! The disk's own figures under `--dir`, printed with every matrix so a transfer's rate can be
//! read against what the filesystem does alone: sequential writes with `O_DIRECT` and buffered
//! (each including its `fsync`), and sequential `O_DIRECT` reads, in 4 MiB requests, one at a
//! time. Where `O_DIRECT` is refused (some filesystems) that figure is absent.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

/// What the disk did alone, in GB/s (10^9 bytes per second).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DiskFigures {
    /// Bytes per probe.
    pub bytes: u64,
    /// `O_DIRECT` writes, then `fsync`.
    pub direct_write_gb_s: Option<f64>,
    /// Buffered writes, then `fsync`.
    pub buffered_write_gb_s: Option<f64>,
    /// Buffered writes until the last `write` returns (the page cache's rate, what a receiver
    /// that does not sync sees).
    pub buffered_write_nosync_gb_s: Option<f64>,
    /// `O_DIRECT` reads of the file just written.
    pub direct_read_gb_s: Option<f64>,
}

const REQ: usize = 4 << 20;

/// Measures `bytes` (a multiple of 4 MiB) in a scratch file under `dir`, removed afterwards.
pub fn probe(dir: &Path, bytes: u64) -> Result<DiskFigures> {
    let path = dir.join("disk-probe.bin");
    let res = run(&path, bytes);
    let _ = std::fs::remove_file(&path);
    res
}

fn run(path: &Path, bytes: u64) -> Result<DiskFigures> {
    let mut fig = DiskFigures {
        bytes,
        ..DiskFigures::default()
    };
    let mut buf = flux_engine::AlignedBuf::new(REQ, 4096).context("aligned buffer")?;
    buf.set_len(REQ);
    let mut xof = blake3::Hasher::new().update(b"disk probe").finalize_xof();
    xof.fill(&mut buf);
    let rate = |t: Instant| bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    let direct = rustix::fs::OFlags::DIRECT.bits() as i32;

    // Buffered first: it also leaves a file for the reads.
    let _ = std::fs::remove_file(path);
    let f = File::create(path).with_context(|| path.display().to_string())?;
    let t = Instant::now();
    write_all(&f, &buf, bytes)?;
    fig.buffered_write_nosync_gb_s = Some(rate(t));
    f.sync_all()?;
    fig.buffered_write_gb_s = Some(rate(t));
    drop(f);

    if let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(direct)
        .open(path)
    {
        let t = Instant::now();
        let mut off = 0;
        while off < bytes {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        fig.direct_read_gb_s = Some(rate(t));
    }

    let _ = std::fs::remove_file(path);
    if let Ok(f) = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(direct)
        .open(path)
    {
        let t = Instant::now();
        write_all(&f, &buf, bytes)?;
        f.sync_all()?;
        fig.direct_write_gb_s = Some(rate(t));
    }
    Ok(fig)
}

fn write_all(f: &File, buf: &[u8], bytes: u64) -> Result<()> {
    let mut off = 0;
    while off < bytes {
        f.write_all_at(buf, off)?;
        off += buf.len() as u64;
    }
    Ok(())
}
