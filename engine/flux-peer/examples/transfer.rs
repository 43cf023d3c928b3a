//! Moves real files through the simulated network (real QUIC, real disk, virtual link).
//!
//! `cargo run --release -p flux-peer --example transfer -- SRC... DEST [--loss P] [--delay-ms N] [--rate-mbit N]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_peer::scan::scan;
use flux_peer::sim::{self, SimConfig, Stop};

fn main() -> ExitCode {
    let mut paths = Vec::new();
    let mut cfg = SimConfig::with_seed(1);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Option<f64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("error: {name} needs a number");
            }
            v
        };
        match a.as_str() {
            "--loss" => match num("--loss") {
                Some(v) => cfg.link.loss = v,
                None => return ExitCode::from(2),
            },
            "--delay-ms" => match num("--delay-ms") {
                Some(v) => cfg.link.delay = Duration::from_secs_f64(v / 1e3),
                None => return ExitCode::from(2),
            },
            "--rate-mbit" => match num("--rate-mbit") {
                Some(v) => cfg.link.rate_bps = (v * 1e6) as u64,
                None => return ExitCode::from(2),
            },
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let Some(dest) = paths.pop().filter(|_| !paths.is_empty()) else {
        eprintln!("usage: transfer SRC... DEST [--loss P] [--delay-ms N] [--rate-mbit N]");
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::create_dir_all(&dest) {
        eprintln!("error: {}: {e}", dest.display());
        return ExitCode::from(2);
    }
    let share = match scan(&paths, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (files, bytes) = (share.manifest.file_count(), share.manifest.total_bytes());
    let started = Instant::now();
    let o = sim::run(
        Arc::new(share.manifest),
        share.sources,
        dest.clone(),
        cfg,
        Stop::Complete,
        None,
    );
    let wall = started.elapsed();
    if !o.done {
        eprintln!(
            "transfer failed: sender {:?}, receiver {:?}",
            o.sender_error, o.receiver_error
        );
        return ExitCode::from(1);
    }
    println!(
        "{files} files, {bytes} bytes -> {}: {} chunks sent, {} skipped files, {:.2?} virtual ({:.2} Mbit/s on the emulated link), {:.2?} wall, {}/{} datagrams dropped",
        dest.display(),
        o.sent.len(),
        o.skipped,
        o.elapsed,
        bytes as f64 * 8.0 / o.elapsed.as_secs_f64().max(1e-9) / 1e6,
        wall,
        o.datagrams.1,
        o.datagrams.0
    );
    ExitCode::SUCCESS
}
