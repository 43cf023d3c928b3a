//! Whole transfers through the simulated network: real machines, real QUIC, real files.
//!
//! Every test prints its seed; rerun one with `FLUX_SIM_SEED=<seed>`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flux_peer::scan::scan;
use flux_peer::sim::{self, Outcome, SimConfig, Stop};
use flux_transfer::{Stream, TransferError};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

fn seed() -> u64 {
    let s = std::env::var("FLUX_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("FLUX_SIM_SEED={s}");
    s
}

fn write_file(p: &Path, len: usize, rng: &mut SmallRng) {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// Asserts `b` holds the same tree as `a`: names, kinds, bytes, modes and file mtimes.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap_or_else(|e| panic!("{}: {e}", pb.display())),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        if ma.is_dir() {
            let mut na: Vec<_> = fs::read_dir(&pa)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            let mut nb: Vec<_> = fs::read_dir(&pb)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            na.sort();
            nb.sort();
            assert_eq!(na, nb, "entries of {}", rel.display());
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        } else if ma.is_file() {
            assert_eq!(
                fs::read(&pa).unwrap(),
                fs::read(&pb).unwrap(),
                "bytes of {}",
                rel.display()
            );
            assert_eq!(
                ma.permissions().mode() & 0o777,
                mb.permissions().mode() & 0o777,
                "mode of {}",
                rel.display()
            );
            assert_eq!(
                ma.modified().unwrap(),
                mb.modified().unwrap(),
                "mtime of {}",
                rel.display()
            );
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    dest: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dest");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dest).unwrap();
    Fixture {
        _tmp: tmp,
        src,
        dest,
    }
}

fn transfer(
    fx: &Fixture,
    root: &str,
    cfg: SimConfig,
    stop: Stop,
    tamper: Option<sim::Tamper>,
) -> Outcome {
    transfer_in(fx, root, None, cfg, stop, tamper)
}

/// [`transfer`] with a chunk size (`None`: picked from the largest file).
fn transfer_in(
    fx: &Fixture,
    root: &str,
    chunk: Option<u32>,
    cfg: SimConfig,
    stop: Stop,
    tamper: Option<sim::Tamper>,
) -> Outcome {
    let share = scan(&[fx.src.join(root)], chunk).unwrap();
    sim::run(
        Arc::new(share.manifest),
        share.sources,
        fx.dest.clone(),
        cfg,
        stop,
        tamper,
    )
}

fn assert_done(o: &Outcome, seed: u64) {
    assert!(
        o.done,
        "seed {seed}: sender {:?} receiver {:?}",
        o.sender_error, o.receiver_error
    );
}

#[test]
fn ten_thousand_file_tree_arrives_identical() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = fx.src.join("tree");
    for i in 0..10_000 {
        let p = root.join(format!("d{}/s{}/f{i}", i % 37, i % 5));
        // A third of the files are empty; the rest small.
        let len = if i % 3 == 0 {
            0
        } else {
            rng.gen_range(1..2048)
        };
        write_file(&p, len, &mut rng);
        if i % 7 == 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    for i in 0..20 {
        fs::create_dir_all(root.join(format!("empty/{i}/deeper/still"))).unwrap();
    }
    let deep: PathBuf = (0..60).map(|i| format!("l{i}")).collect();
    write_file(&root.join(&deep).join("bottom"), 10, &mut rng);
    let mut cfg = SimConfig::with_seed(seed);
    cfg.link.delay = Duration::from_millis(2);
    let o = transfer(&fx, "tree", cfg, Stop::Complete, None);
    assert_done(&o, seed);
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn loss_and_reordering_still_complete() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = fx.src.join("data");
    write_file(&root.join("big.bin"), 24 << 20, &mut rng);
    for i in 0..50 {
        write_file(
            &root.join(format!("small/{i}")),
            rng.gen_range(0..300_000),
            &mut rng,
        );
    }
    let mut cfg = SimConfig::with_seed(seed);
    cfg.link.loss = 0.02;
    cfg.link.reorder = 0.05;
    cfg.link.reorder_delay = Duration::from_millis(8);
    cfg.link.delay = Duration::from_millis(15);
    cfg.link.rate_bps = 200_000_000;
    let o = transfer(&fx, "data", cfg, Stop::Complete, None);
    assert_done(&o, seed);
    assert!(o.datagrams.1 > 0, "seed {seed}: the link dropped nothing");
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn interrupted_transfers_resume_and_send_each_verified_chunk_once() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = fx.src.join("share");
    write_file(&root.join("a.bin"), 20 << 20, &mut rng);
    write_file(&root.join("b.bin"), 7 << 20, &mut rng);
    for i in 0..30 {
        write_file(
            &root.join(format!("c/{i}")),
            rng.gen_range(0..600_000),
            &mut rng,
        );
    }
    let share = scan(std::slice::from_ref(&root), Some(256 << 10)).unwrap();
    let total: usize = (0..share.manifest.len() as u32)
        .map(|i| share.manifest.chunk_count(i) as usize)
        .sum();
    let manifest = Arc::new(share.manifest);
    let mut verified_before: HashSet<(u32, u32)> = HashSet::new();
    let mut cfg = SimConfig::with_seed(seed);
    cfg.sender.parallel_files = 4;
    // Cut three times at random points, then let it finish.
    for round in 0..4 {
        let stop = if round < 3 {
            let remaining = total - verified_before.len();
            Stop::AfterVerified(rng.gen_range(1..remaining.max(2) / 2 + 1))
        } else {
            Stop::Complete
        };
        cfg.seed = seed.wrapping_add(round);
        let o = sim::run(
            manifest.clone(),
            share.sources.clone(),
            fx.dest.clone(),
            cfg.clone(),
            stop,
            None,
        );
        assert!(
            o.sender_error.is_none() && o.receiver_error.is_none(),
            "seed {seed} round {round}: {o:?}"
        );
        let again: Vec<_> = o
            .sent
            .iter()
            .filter(|c| verified_before.contains(c))
            .collect();
        assert!(
            again.is_empty(),
            "seed {seed} round {round}: resent verified chunks {again:?}"
        );
        verified_before.extend(o.verified.iter().copied());
        if round == 3 {
            assert_done(&o, seed);
        }
    }
    assert_eq!(
        verified_before.len(),
        total,
        "seed {seed}: every chunk verified exactly once overall"
    );
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn identical_files_are_skipped_and_changed_ones_refused_without_overwrite() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = fx.src.join("s");
    write_file(&root.join("same"), 3 << 20, &mut rng);
    let first = transfer(&fx, "s", SimConfig::with_seed(seed), Stop::Complete, None);
    assert_done(&first, seed);
    let before = fs::metadata(fx.dest.join("s/same"))
        .unwrap()
        .modified()
        .unwrap();
    let second = transfer(&fx, "s", SimConfig::with_seed(seed), Stop::Complete, None);
    assert_done(&second, seed);
    assert_eq!(second.skipped, 1);
    assert!(second.sent.is_empty(), "seed {seed}: identical file resent");
    assert_eq!(
        before,
        fs::metadata(fx.dest.join("s/same"))
            .unwrap()
            .modified()
            .unwrap()
    );

    // Same size, different content: refused, and the existing file is untouched.
    let theirs = fs::read(fx.dest.join("s/same")).unwrap();
    write_file(&root.join("same"), 3 << 20, &mut rng);
    let third = transfer(&fx, "s", SimConfig::with_seed(seed), Stop::Complete, None);
    assert!(
        matches!(third.receiver_error, Some(TransferError::Exists(ref p)) if p == "s/same"),
        "{third:?}"
    );
    assert_eq!(fs::read(fx.dest.join("s/same")).unwrap(), theirs);

    // With overwrite allowed it is replaced.
    let mut cfg = SimConfig::with_seed(seed);
    cfg.receiver.overwrite = true;
    let fourth = transfer(&fx, "s", cfg, Stop::Complete, None);
    assert_done(&fourth, seed);
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn existing_file_of_another_size_is_never_overwritten() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    write_file(&fx.src.join("s/x"), 100_000, &mut rng);
    fs::create_dir_all(fx.dest.join("s")).unwrap();
    fs::write(fx.dest.join("s/x"), b"precious").unwrap();
    let o = transfer(&fx, "s", SimConfig::with_seed(seed), Stop::Complete, None);
    assert!(
        matches!(o.receiver_error, Some(TransferError::Exists(_))),
        "{o:?}"
    );
    assert!(
        matches!(o.sender_error, Some(TransferError::Peer { .. })),
        "{o:?}"
    );
    assert_eq!(fs::read(fx.dest.join("s/x")).unwrap(), b"precious");
}

#[test]
fn corrupted_chunk_is_detected_and_fetched_again() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    write_file(&fx.src.join("c/file"), 5 << 20, &mut rng);
    let mut flipped = false;
    // Flip one byte well inside the first chunk payload on lane 0, once.
    let tamper: sim::Tamper = Box::new(move |s, off, bytes| {
        let target = 100_000u64;
        if !flipped && s == Stream::Lane(0) && off <= target && target < off + bytes.len() as u64 {
            bytes[(target - off) as usize] ^= 0x40;
            flipped = true;
        }
    });
    let o = transfer(
        &fx,
        "c",
        SimConfig::with_seed(seed),
        Stop::Complete,
        Some(tamper),
    );
    assert_done(&o, seed);
    assert_eq!(o.corrupt, 1, "seed {seed}: corruption not detected");
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn tampered_and_stale_sidecars_restart_the_file_safely() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = fx.src.join("t");
    write_file(&root.join("f"), 8 << 20, &mut rng);
    let share = scan(std::slice::from_ref(&root), Some(256 << 10)).unwrap();
    let m = Arc::new(share.manifest);
    let o = sim::run(
        m.clone(),
        share.sources.clone(),
        fx.dest.clone(),
        SimConfig::with_seed(seed),
        Stop::AfterVerified(10),
        None,
    );
    assert!(o.interrupted);
    let part = fx.dest.join("t/.f.thrupart");
    let state = fx.dest.join("t/.f.thrupart.state");
    assert!(part.exists() && state.exists());
    // Corrupt the partial data under a recorded chunk: that chunk must be sent again.
    let mut data = fs::read(&part).unwrap();
    let first = o.verified[0].1 as usize * (256 << 10);
    data[first + 5] ^= 1;
    fs::write(&part, data).unwrap();
    let o2 = sim::run(
        m.clone(),
        share.sources.clone(),
        fx.dest.clone(),
        SimConfig::with_seed(seed + 1),
        Stop::Complete,
        None,
    );
    assert_done(&o2, seed);
    assert!(
        o2.sent.contains(&o.verified[0]),
        "damaged chunk was not resent"
    );
    assert_eq!(
        o2.sent.len(),
        32 - 9,
        "only the damaged and the missing chunks move"
    );
    assert_same_tree(&fx.src, &fx.dest);

    // A sidecar whose record bytes were edited is refused as a whole: the file restarts.
    fs::remove_dir_all(&fx.dest).unwrap();
    fs::create_dir_all(&fx.dest).unwrap();
    let o = sim::run(
        m.clone(),
        share.sources.clone(),
        fx.dest.clone(),
        SimConfig::with_seed(seed),
        Stop::AfterVerified(10),
        None,
    );
    assert!(o.interrupted);
    let mut sc = fs::read(&state).unwrap();
    let last = sc.len() - 10;
    sc[last] ^= 0xff;
    fs::write(&state, sc).unwrap();
    let o3 = sim::run(
        m.clone(),
        share.sources.clone(),
        fx.dest.clone(),
        SimConfig::with_seed(seed + 2),
        Stop::Complete,
        None,
    );
    assert_done(&o3, seed);
    assert_eq!(o3.sent.len(), 32, "a tampered sidecar must not be trusted");
    assert_same_tree(&fx.src, &fx.dest);

    // The source changed since the partial was written (new mtime): the sidecar is stale.
    fs::remove_dir_all(&fx.dest).unwrap();
    fs::create_dir_all(&fx.dest).unwrap();
    let o = sim::run(
        m.clone(),
        share.sources.clone(),
        fx.dest.clone(),
        SimConfig::with_seed(seed),
        Stop::AfterVerified(10),
        None,
    );
    assert!(o.interrupted);
    write_file(&root.join("f"), 8 << 20, &mut rng);
    fs::File::options()
        .write(true)
        .open(root.join("f"))
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let share2 = scan(std::slice::from_ref(&root), Some(256 << 10)).unwrap();
    let o4 = sim::run(
        Arc::new(share2.manifest),
        share2.sources,
        fx.dest.clone(),
        SimConfig::with_seed(seed + 3),
        Stop::Complete,
        None,
    );
    assert_done(&o4, seed);
    assert_eq!(o4.sent.len(), 32);
    assert_same_tree(&fx.src, &fx.dest);
}

#[test]
fn symlink_planted_in_destination_is_not_followed() {
    let seed = seed();
    let fx = fixture();
    let mut rng = SmallRng::seed_from_u64(seed);
    write_file(&fx.src.join("p/inner/file"), 1000, &mut rng);
    let outside = fx.dest.parent().unwrap().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::create_dir_all(fx.dest.join("p")).unwrap();
    symlink(&outside, fx.dest.join("p/inner")).unwrap();
    let o = transfer(&fx, "p", SimConfig::with_seed(seed), Stop::Complete, None);
    let err = o.receiver_error.expect("must fail").to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the destination"
    );
}

/// A small tree of a few files, chunked small so a transfer has many chunks.
fn small_tree(fx: &Fixture, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..4 {
        write_file(
            &fx.src.join(format!("t/f{i}")),
            600_000 + i * 7_777,
            &mut rng,
        );
    }
}

/// Like [`transfer`], in the smallest chunks so a small tree makes many.
fn transfer_small(fx: &Fixture, cfg: SimConfig, stop: Stop) -> Outcome {
    let chunk = Some(flux_transfer::manifest::MIN_CHUNK_SIZE);
    transfer_in(fx, "t", chunk, cfg, stop, None)
}

#[test]
fn the_sender_lingers_until_the_receiver_has_closed() {
    let seed = seed();
    let fx = fixture();
    small_tree(&fx, seed);
    let o = transfer_small(&fx, SimConfig::with_seed(seed), Stop::Complete);
    assert_done(&o, seed);
    assert_same_tree(&fx.src.join("t"), &fx.dest.join("t"));
    let (Some(host), Some(joiner)) = o.ended else {
        panic!("seed {seed}: a side never ended: {:?}", o.ended);
    };
    // The receiver closes once everything is in place; the sender, done earlier, waits for
    // that close (one link delay away) instead of closing first, and well before its linger
    // runs out.
    assert!(
        host > joiner,
        "seed {seed}: host ended at {host:?}, joiner at {joiner:?}"
    );
    assert!(
        host - joiner < flux_peer::node::SENDER_LINGER,
        "seed {seed}: host lingered {:?}",
        host - joiner
    );
}

/// Cancels one side (as by Ctrl-C, with `reason`) after ten verified chunks of the small
/// tree; asserts the other side was told why and both sides ended.
fn cancel_mid_transfer(host: bool, reason: &str) -> (Fixture, Outcome, u64) {
    let seed = seed();
    let fx = fixture();
    small_tree(&fx, seed);
    let stop = Stop::Cancel {
        after: 10,
        host,
        reason: Some(reason.into()),
    };
    let o = transfer_small(&fx, SimConfig::with_seed(seed), stop);
    assert!(!o.done, "seed {seed}: {o:?}");
    let told = if host {
        &o.receiver_error
    } else {
        &o.sender_error
    };
    let err = told.as_ref().map(ToString::to_string);
    assert!(
        err.as_deref().is_some_and(|e| e.contains(reason)),
        "seed {seed}: the peer's error {err:?}"
    );
    let (Some(_), Some(_)) = o.ended else {
        panic!("seed {seed}: a side never ended: {:?}", o.ended);
    };
    (fx, o, seed)
}

#[test]
fn a_host_cancelled_mid_transfer_tells_the_receiver_and_a_resume_finishes() {
    let (fx, o, seed) = cancel_mid_transfer(true, "the host stopped (Ctrl-C)");
    assert!(
        o.verified.len() >= 10,
        "seed {seed}: {} verified",
        o.verified.len()
    );
    let kept: HashSet<(u32, u32)> = o.verified.iter().copied().collect();
    let again = transfer_small(&fx, SimConfig::with_seed(seed), Stop::Complete);
    assert_done(&again, seed);
    assert_same_tree(&fx.src.join("t"), &fx.dest.join("t"));
    let resent = again.sent.iter().filter(|c| kept.contains(c)).count();
    assert_eq!(
        resent, 0,
        "seed {seed}: {resent} verified chunks were sent again"
    );
}

#[test]
fn a_receiver_cancelled_mid_transfer_tells_the_sender() {
    cancel_mid_transfer(false, "the receiver stopped (Ctrl-C)");
}

#[test]
fn ice_finds_the_path_over_a_lossy_link_and_quic_runs_on_it() {
    let seed = seed();
    let fx = fixture();
    small_tree(&fx, seed);
    let mut cfg = SimConfig::with_seed(seed);
    cfg.ice = true;
    cfg.link.loss = 0.02;
    let o = transfer_small(&fx, cfg, Stop::Complete);
    assert_done(&o, seed);
    assert_same_tree(&fx.src.join("t"), &fx.dest.join("t"));
    let route = o.route.expect("the connection ran over an ICE pair");
    assert_eq!(
        route.remote.to_string(),
        "10.0.0.1:4433",
        "seed {seed}: {route:?}"
    );
    assert_eq!(route.kind.as_str(), "host", "seed {seed}: {route:?}");
}
