//! Real transfers through the engine's worker loop: two threads, two UDP sockets on loopback,
//! real QUIC, real files, through each driver.
//!
//! The large tests move a 1 GiB file (plus an unaligned tail) memory-to-disk (source on
//! tmpfs) and disk-to-disk (ext4 to ext4), and into a filesystem that refuses `O_DIRECT`
//! (ramfs, mounted by the test as root), and check the received bytes are identical and which
//! I/O mode each side really used.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::thread;

use flux_peer::exec::DiskMode;
use flux_peer::net::{self, Command, Control, Driver, NetConfig, NetEvent, NetReport};
use flux_peer::scan::scan;
use flux_peer::stack::QuicStack;
use flux_quic::Identity;
use flux_transfer::Event;
use flux_udp::{SocketConfig, UdpSocket};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

fn socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0".parse().unwrap(), &SocketConfig::default()).unwrap()
}

/// Runs one transfer of `paths` into `dest` and returns both sides' reports.
fn transfer(paths: &[PathBuf], dest: &Path, cfg: &NetConfig) -> (NetReport, NetReport) {
    let share = scan(paths, None).unwrap();
    let id = Identity::generate().unwrap();
    let fp = id.fingerprint();
    let host_sock = socket();
    let addr = host_sock.local_addr().unwrap();
    let hcfg = cfg.clone();
    let manifest = Arc::new(share.manifest);
    let sources = share.sources;
    let host = thread::spawn(move || {
        net::host(host_sock, &id, manifest, sources, &hcfg, Control::none()).unwrap()
    });
    let joined = net::join(socket(), addr, fp, dest.to_owned(), cfg, Control::none()).unwrap();
    let hosted = host.join().unwrap();
    (hosted, joined)
}

fn cfg(driver: Driver) -> NetConfig {
    NetConfig {
        driver,
        ..NetConfig::default()
    }
}

/// Writes `len` pseudo-random bytes; every 4 KiB block differs, so a misplaced block shows.
fn write_random(p: &Path, len: u64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut f = File::create(p).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

fn digest(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(p).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

fn assert_same_file(a: &Path, b: &Path) {
    let (ma, mb) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    assert_eq!(ma.len(), mb.len(), "{} size", b.display());
    assert_eq!(digest(a), digest(b), "{} bytes differ", b.display());
    assert_eq!(
        ma.modified().unwrap(),
        mb.modified().unwrap(),
        "{} mtime",
        b.display()
    );
}

fn assert_ok(r: &NetReport, side: &str) {
    eprintln!("{side}: {r:?}");
    assert!(r.error.is_none(), "{side} failed: {:?}", r.error);
    assert_eq!((r.succeeded, r.failed), (1, 0), "{side}: {r:?}");
}

/// A small tree with empty files, unaligned sizes and a chunk-size multiple.
fn small_tree(root: &Path) -> PathBuf {
    let top = root.join("tree");
    fs::create_dir_all(top.join("sub/empty-dir")).unwrap();
    let sizes = [0u64, 1, 511, 4096, 262_144, 262_145, 3_000_001];
    for (i, s) in sizes.iter().enumerate() {
        write_random(&top.join(format!("f{i}")), *s, i as u64);
        write_random(&top.join(format!("sub/g{i}")), *s, 100 + i as u64);
    }
    top
}

fn small_tree_through(driver: Driver) {
    small_tree_over(driver, QuicStack::Quinn);
}

fn small_tree_over(driver: Driver, quic: QuicStack) {
    let src = tempfile::tempdir_in(scratch()).unwrap();
    let dst = tempfile::tempdir_in(scratch()).unwrap();
    let top = small_tree(src.path());
    let c = NetConfig {
        quic,
        ..cfg(driver)
    };
    let (h, j) = transfer(std::slice::from_ref(&top), dst.path(), &c);
    assert_ok(&h, "host");
    assert_ok(&j, "joiner");
    for e in walk(&top) {
        let rel = e.strip_prefix(src.path()).unwrap();
        let got = dst.path().join(rel);
        if e.is_dir() {
            assert!(got.is_dir(), "{} missing", got.display());
        } else {
            assert_same_file(&e, &got);
        }
    }
    assert_eq!(h.driver, Some(driver));
}

#[test]
fn small_tree_uring() {
    small_tree_through(Driver::Uring);
}

#[test]
fn small_tree_epoll() {
    small_tree_through(Driver::Epoll);
}

#[test]
fn small_tree_s2n_uring() {
    small_tree_over(Driver::Uring, QuicStack::S2n);
}

#[test]
fn small_tree_s2n_epoll() {
    small_tree_over(Driver::Epoll, QuicStack::S2n);
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_owned()];
    if p.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// A directory on a real disk filesystem for O_DIRECT: `FLUX_TEST_DIRECT_IO_DIR`, else
/// `/var/tmp`.
fn scratch() -> PathBuf {
    std::env::var_os("FLUX_TEST_DIRECT_IO_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

fn is_fs(p: &Path, kinds: &[&str]) -> bool {
    let out = Process::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    kinds.iter().any(|k| t == *k)
}

const GIB_PLUS_TAIL: u64 = (1 << 30) + 12_345;

/// 1 GiB from `src_dir` into `dst_dir` through `driver`; returns both reports.
fn one_gib(driver: Driver, src_dir: &Path, dst_dir: &Path) -> (NetReport, NetReport) {
    one_gib_with(&cfg(driver), src_dir, dst_dir, false)
}

/// As [`one_gib`] with `c`; with `cold`, the source's pages are dropped from the page cache
/// before the transfer.
fn one_gib_with(
    c: &NetConfig,
    src_dir: &Path,
    dst_dir: &Path,
    cold: bool,
) -> (NetReport, NetReport) {
    let src = tempfile::tempdir_in(src_dir).unwrap();
    let dst = tempfile::tempdir_in(dst_dir).unwrap();
    let file = src.path().join("big.bin");
    write_random(&file, GIB_PLUS_TAIL, 7);
    if cold {
        let f = File::open(&file).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
    let (h, j) = transfer(std::slice::from_ref(&file), dst.path(), c);
    assert_ok(&h, "host");
    assert_ok(&j, "joiner");
    assert_same_file(&file, &dst.path().join("big.bin"));
    (h, j)
}

fn require_disk() -> Option<PathBuf> {
    let d = scratch();
    if is_fs(&d, &["ext2/ext3", "ext4", "xfs", "btrfs"]) {
        Some(d)
    } else {
        println!(
            "SKIP: {} is not ext4/xfs/btrfs (set FLUX_TEST_DIRECT_IO_DIR)",
            d.display()
        );
        None
    }
}

#[test]
fn gib_disk_to_disk_uring_uses_o_direct() {
    let Some(d) = require_disk() else { return };
    let c = NetConfig {
        disk: DiskMode::Direct,
        ..cfg(Driver::Uring)
    };
    let (h, j) = one_gib_with(&c, &d, &d, false);
    // Every chunk read and write went through O_DIRECT.
    assert!(h.disk.direct_ops >= 256, "host: {:?}", h.disk);
    assert_eq!(h.disk.buffered_ops, 0, "host: {:?}", h.disk);
    assert!(j.disk.direct_ops >= 256, "joiner: {:?}", j.disk);
    assert_eq!(j.disk.buffered_ops, 0, "joiner: {:?}", j.disk);
}

/// `--disk auto`: a source the page cache holds is read buffered, one it does not hold with
/// O_DIRECT; the receiver's writes follow what it chose, and say why.
#[test]
fn gib_disk_to_disk_uring_auto_measures_both_sides() {
    let Some(d) = require_disk() else { return };
    for cold in [false, true] {
        let (h, j) = one_gib_with(&cfg(Driver::Uring), &d, &d, cold);
        let reads = &h.disk_choice;
        if cold {
            assert_eq!(
                (reads.reads_cached, reads.reads_uncached),
                (0, 1),
                "{reads:?}"
            );
            assert!(
                h.disk.direct_ops > 0,
                "cold source read buffered: {:?}",
                h.disk
            );
        } else {
            assert_eq!(
                (reads.reads_cached, reads.reads_uncached),
                (1, 0),
                "{reads:?}"
            );
            assert_eq!(
                h.disk.direct_ops, 0,
                "cached source read direct: {:?}",
                h.disk
            );
        }
        let (direct, why) = j.disk_choice.writes.clone().expect("the joiner chose");
        assert!(why.ends_with("(--disk auto)"), "{why}");
        if direct {
            assert!(j.disk.direct_ops > 0, "{why}: {:?}", j.disk);
        } else {
            assert_eq!(j.disk.direct_ops, 0, "{why}: {:?}", j.disk);
        }
    }
}

#[test]
fn gib_memory_to_disk_uring() {
    let Some(d) = require_disk() else { return };
    let shm = Path::new("/dev/shm");
    if !is_fs(shm, &["tmpfs"]) {
        println!("SKIP: /dev/shm is not tmpfs");
        return;
    }
    let c = NetConfig {
        disk: DiskMode::Direct,
        ..cfg(Driver::Uring)
    };
    let (_h, j) = one_gib_with(&c, shm, &d, false);
    assert!(
        j.disk.direct_ops > 0 && j.disk.buffered_ops == 0,
        "{:?}",
        j.disk
    );
}

/// Hashing and verifying on work threads (`NetConfig::work_threads`) moves the same bytes, and
/// the threads did the work on both sides.
#[test]
fn work_threads_hash_and_verify_off_the_loop() {
    let shm = Path::new("/dev/shm");
    if !is_fs(shm, &["tmpfs"]) {
        println!("SKIP: /dev/shm is not tmpfs");
        return;
    }
    let src = tempfile::tempdir_in(shm).unwrap();
    let dst = tempfile::tempdir_in(shm).unwrap();
    let file = src.path().join("f.bin");
    write_random(&file, (96 << 20) + 12_345, 11);
    let c = NetConfig {
        work_threads: 2,
        ..cfg(Driver::Uring)
    };
    let (h, j) = transfer(std::slice::from_ref(&file), dst.path(), &c);
    assert_ok(&h, "host");
    assert_ok(&j, "joiner");
    assert_same_file(&file, &dst.path().join("f.bin"));
    assert!(h.disk.pool_jobs > 0, "host hashed inline: {:?}", h.disk);
    assert!(j.disk.pool_jobs > 0, "joiner verified inline: {:?}", j.disk);
}

#[test]
fn gib_disk_to_disk_epoll() {
    let Some(d) = require_disk() else { return };
    let (h, j) = one_gib(Driver::Epoll, &d, &d);
    // The portable driver does buffered std::fs I/O only.
    assert_eq!(h.disk.direct_ops + j.disk.direct_ops, 0);
    assert!(j.disk.buffered_ops > 0);
}

#[test]
fn gib_memory_to_disk_epoll() {
    let Some(d) = require_disk() else { return };
    let (_h, j) = one_gib(Driver::Epoll, Path::new("/dev/shm"), &d);
    assert!(j.disk.buffered_ops > 0);
}

/// A ramfs mount (refuses O_DIRECT at open and in fcntl), unmounted on drop.
struct Ramfs(tempfile::TempDir);

impl Ramfs {
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Process::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIP: cannot mount ramfs (not root?)");
            return None;
        }
        Some(Self(dir))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn gib_uring_falls_back_where_o_direct_is_refused() {
    let Some(d) = require_disk() else { return };
    let Some(ram) = Ramfs::mount() else { return };
    // Disk source (O_DIRECT reads) into ramfs (buffered writes after the refusal).
    let c = NetConfig {
        disk: DiskMode::Direct,
        ..cfg(Driver::Uring)
    };
    let (h, j) = one_gib_with(&c, &d, ram.0.path(), false);
    assert!(h.disk.direct_ops > 0, "host: {:?}", h.disk);
    assert_eq!(j.disk.direct_ops, 0, "joiner: {:?}", j.disk);
    assert!(j.disk.buffered_ops > 0, "joiner: {:?}", j.disk);
}

#[test]
fn receiver_decides_and_reject_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let top = small_tree(src.path());
    let share = scan(std::slice::from_ref(&top), None).unwrap();
    let id = Identity::generate().unwrap();
    let fp = id.fingerprint();
    let hs = socket();
    let addr = hs.local_addr().unwrap();
    let c = cfg(Driver::Uring);
    let hc = c.clone();
    let host = thread::spawn(move || {
        net::host(
            hs,
            &id,
            Arc::new(share.manifest),
            share.sources,
            &hc,
            Control::none(),
        )
        .unwrap()
    });
    let jc = NetConfig {
        auto_accept: false,
        ..c
    };
    let (control, events, commands) = Control::channels();
    let dest = dst.path().to_owned();
    let join = thread::spawn(move || net::join(socket(), addr, fp, dest, &jc, control).unwrap());
    let mut offered = 0;
    for ev in events.iter() {
        if let NetEvent::Offer { ref manifest, .. } = ev {
            offered = manifest.entries().len();
            commands.send(Command::Reject("not today".into())).unwrap();
        }
        if let NetEvent::Transfer {
            event: Event::ChunkVerified { .. },
            ..
        } = ev
        {
            panic!("a chunk was written after a rejection");
        }
    }
    let j = join.join().unwrap();
    let h = host.join().unwrap();
    assert!(offered > 10, "offer had {offered} entries");
    assert_eq!(
        h.error.as_ref().and_then(|e| e.declined()),
        Some("not today"),
        "{:?}",
        h.error
    );
    assert!(j.error.is_some());
    assert_eq!(
        fs::read_dir(dst.path()).unwrap().count(),
        0,
        "something was written"
    );
}

#[test]
fn wrong_fingerprint_is_refused() {
    wrong_fingerprint_over(QuicStack::Quinn);
}

#[test]
fn wrong_fingerprint_is_refused_over_s2n() {
    wrong_fingerprint_over(QuicStack::S2n);
}

fn wrong_fingerprint_over(quic: QuicStack) {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let f = src.path().join("a");
    write_random(&f, 1000, 1);
    let share = scan(std::slice::from_ref(&f), None).unwrap();
    let id = Identity::generate().unwrap();
    let other = Identity::generate().unwrap().fingerprint();
    let hs = socket();
    let addr = hs.local_addr().unwrap();
    let c = NetConfig {
        serve: None,
        quic,
        ..cfg(Driver::Epoll)
    };
    let (hcontrol, _hev, hcmd) = Control::channels();
    let hc = c.clone();
    let host = thread::spawn(move || {
        net::host(
            hs,
            &id,
            Arc::new(share.manifest),
            share.sources,
            &hc,
            hcontrol,
        )
        .unwrap()
    });
    let j = net::join(
        socket(),
        addr,
        other,
        dst.path().to_owned(),
        &c,
        Control::none(),
    )
    .unwrap();
    hcmd.send(Command::Cancel).unwrap();
    let _ = host.join().unwrap();
    // At once, naming the certificate (not the connect timeout: s2n reports a refused
    // certificate through `connect_failure`).
    let err = j.error.expect("joiner must fail").to_string();
    assert!(err.contains("certificate"), "unexpected error: {err}");
    assert_eq!(fs::read_dir(dst.path()).unwrap().count(), 0);
}

#[test]
fn host_admits_only_paired_joiners() {
    admits_only_paired_over(QuicStack::Quinn);
}

#[test]
fn host_admits_only_paired_joiners_over_s2n() {
    admits_only_paired_over(QuicStack::S2n);
}

fn admits_only_paired_over(quic: QuicStack) {
    let cfg = |driver| NetConfig {
        quic,
        ..cfg(driver)
    };
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("a");
    write_random(&f, 300_000, 2);
    let share = scan(std::slice::from_ref(&f), None).unwrap();
    let id = Identity::generate().unwrap();
    let fp = id.fingerprint();
    let paired = Arc::new(Identity::generate().unwrap());
    let stranger = Arc::new(Identity::generate().unwrap());
    let allowed = Arc::new(flux_quic::AllowList::new());
    allowed.allow(paired.fingerprint());
    let hs = socket();
    let addr = hs.local_addr().unwrap();
    let hc = NetConfig {
        allowed_joiners: Some(allowed),
        serve: Some(1),
        ..cfg(Driver::Uring)
    };
    let host = thread::spawn(move || {
        net::host(
            hs,
            &id,
            Arc::new(share.manifest),
            share.sources,
            &hc,
            Control::none(),
        )
        .unwrap()
    });
    // A joiner that pins the host but did not pair is refused and gets nothing.
    let d1 = tempfile::tempdir().unwrap();
    let jc = NetConfig {
        client_identity: Some(stranger),
        ..cfg(Driver::Uring)
    };
    let j = net::join(
        socket(),
        addr,
        fp,
        d1.path().to_owned(),
        &jc,
        Control::none(),
    )
    .unwrap();
    assert!(j.error.is_some(), "a stranger was let in: {j:?}");
    assert_eq!(fs::read_dir(d1.path()).unwrap().count(), 0);
    // No identity at all: refused too.
    let j = net::join(
        socket(),
        addr,
        fp,
        d1.path().to_owned(),
        &cfg(Driver::Uring),
        Control::none(),
    )
    .unwrap();
    assert!(
        j.error.is_some(),
        "a joiner without a certificate was let in"
    );
    // The paired joiner gets the file.
    let d2 = tempfile::tempdir().unwrap();
    let jc = NetConfig {
        client_identity: Some(paired),
        ..cfg(Driver::Uring)
    };
    let j = net::join(
        socket(),
        addr,
        fp,
        d2.path().to_owned(),
        &jc,
        Control::none(),
    )
    .unwrap();
    assert_ok(&j, "paired joiner");
    assert_same_file(&f, &d2.path().join("a"));
    let h = host.join().unwrap();
    assert_eq!(h.succeeded, 1, "{h:?}");
}

/// ICE settings for one side of a loopback pair; both sides know both credentials, as paired
/// peers do.
fn ice_setup(
    role: flux_ice::Role,
    ours: &flux_ice::Credentials,
    theirs: &flux_ice::Credentials,
    host: std::net::SocketAddr,
) -> flux_peer::ice::IceSetup {
    let mut config = flux_ice::Config::new(
        role,
        ours.clone(),
        u64::from(ours.ufrag.len() as u32)
            ^ 0x5eed_u64
            ^ (role == flux_ice::Role::Controlling) as u64,
    );
    config.allow_loopback = true;
    flux_peer::ice::IceSetup {
        config,
        hosts: vec![host],
        remote_credentials: theirs.clone(),
        remote_candidates: Vec::new(),
        turn_tls: None,
        turn_names: Vec::new(),
    }
}

/// Forwards one side's trickled candidates to the other side's worker until the events end;
/// returns the routes this side reported.
fn trickle(
    events: crossbeam_channel::Receiver<NetEvent>,
    to: crossbeam_channel::Sender<Command>,
    link: u64,
) -> thread::JoinHandle<Vec<flux_ice::Selected>> {
    thread::spawn(move || {
        let mut routes = Vec::new();
        for ev in events {
            match ev {
                NetEvent::LocalCandidate { candidate, .. } => {
                    let _ = to.send(Command::RemoteCandidate { link, candidate });
                }
                NetEvent::Route { route, .. } => routes.push(route),
                NetEvent::Transfer { .. } => {}
                other => eprintln!("link {link}: {other:?}"),
            }
        }
        routes
    })
}

#[test]
fn ice_on_the_engine_socket_selects_a_pair_and_transfers() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let top = small_tree(src.path());
    let r = ice_transfer(
        std::slice::from_ref(&top),
        dst.path(),
        Driver::Uring,
        |_| {},
    );
    assert_ok(&r.joiner, "joiner");
    assert_ok(&r.host, "host");
    for e in walk(&top) {
        let got = dst.path().join(e.strip_prefix(src.path()).unwrap());
        if e.is_file() {
            assert_same_file(&e, &got);
        }
    }
    let (hr, jr) = (
        r.host_routes.last().expect("the host reported no route"),
        r.joiner_routes
            .last()
            .expect("the joiner reported no route"),
    );
    let (ha, ja) = (r.host_addr, r.joiner_addr);
    assert_eq!(jr.kind, flux_ice::RouteKind::Host);
    // Both directions on one pair.
    assert_eq!((jr.local, jr.remote), (ja, ha));
    assert_eq!((hr.local, hr.remote), (ha, ja));
    let route = r.joiner.conns[0]
        .route
        .expect("the joiner's connection reports its pair");
    assert_eq!(route.remote, ha);
    assert!(r.joiner.conns[0].ice_connect.is_some());
    assert_eq!(r.host.conns[0].route.map(|r| r.remote), Some(ja));
}

/// What a test may do before an ICE transfer starts.
struct IcePrep<'a> {
    /// The joiner's command channel (trickled lines reach the joiner through it).
    joiner_commands: &'a crossbeam_channel::Sender<Command>,
    host_creds: &'a flux_ice::Credentials,
    join_creds: &'a flux_ice::Credentials,
    joiner_addr: std::net::SocketAddr,
}

/// What an ICE transfer reported.
struct IceRun {
    host: NetReport,
    joiner: NetReport,
    host_routes: Vec<flux_ice::Selected>,
    joiner_routes: Vec<flux_ice::Selected>,
    host_addr: std::net::SocketAddr,
    joiner_addr: std::net::SocketAddr,
    /// How long the joiner's worker ran.
    join_time: std::time::Duration,
}

/// Shares `paths` from a host worker to a joiner worker over ICE on loopback, trickling
/// candidates between their channels; `prepare` runs before either worker starts. The host
/// learns of the peer as after pairing and controls (nominates): it then knows the pair
/// before the joiner's first QUIC packet.
fn ice_transfer(
    paths: &[PathBuf],
    dest: &Path,
    driver: Driver,
    prepare: impl FnOnce(&IcePrep<'_>),
) -> IceRun {
    let share = scan(paths, None).unwrap();
    let id = Identity::generate().unwrap();
    let fp = id.fingerprint();
    let host_creds = flux_ice::Credentials::from_random(&[1; 18]);
    let join_creds = flux_ice::Credentials::from_random(&[2; 18]);
    let (hs, js) = (socket(), socket());
    let (ha, ja) = (hs.local_addr().unwrap(), js.local_addr().unwrap());
    let (hctl, hev, hcmd) = Control::channels();
    let (jctl, jev, jcmd) = Control::channels();
    prepare(&IcePrep {
        joiner_commands: &jcmd,
        host_creds: &host_creds,
        join_creds: &join_creds,
        joiner_addr: ja,
    });
    hcmd.send(Command::AddPeer {
        link: 7,
        ice: Box::new(ice_setup(
            flux_ice::Role::Controlling,
            &host_creds,
            &join_creds,
            ha,
        )),
    })
    .unwrap();
    let host_fwd = trickle(hev, jcmd.clone(), 0);
    let join_fwd = trickle(jev, hcmd.clone(), 7);
    let hc = cfg(driver);
    let host = thread::spawn(move || {
        net::host(hs, &id, Arc::new(share.manifest), share.sources, &hc, hctl).unwrap()
    });
    let started = std::time::Instant::now();
    let ice = ice_setup(flux_ice::Role::Controlled, &join_creds, &host_creds, ja);
    let joiner = net::join_ice(js, ice, fp, dest.to_owned(), &cfg(driver), jctl).unwrap();
    let join_time = started.elapsed();
    drop((hcmd, jcmd));
    IceRun {
        host: host.join().unwrap(),
        joiner,
        host_routes: host_fwd.join().unwrap(),
        joiner_routes: join_fwd.join().unwrap(),
        host_addr: ha,
        joiner_addr: ja,
        join_time,
    }
}

#[test]
fn ice_failure_is_reported_with_its_cause() {
    let dst = tempfile::tempdir().unwrap();
    let js = socket();
    let ja = js.local_addr().unwrap();
    let mut ice = ice_setup(
        flux_ice::Role::Controlling,
        &flux_ice::Credentials::from_random(&[3; 18]),
        &flux_ice::Credentials::from_random(&[4; 18]),
        ja,
    );
    ice.config.connect_timeout = std::time::Duration::from_millis(600);
    // Nobody answers at this candidate.
    let dead = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), &SocketConfig::default()).unwrap();
    ice.remote_candidates = vec![flux_peer::ice::host_candidate(
        dead.local_addr().unwrap(),
        0,
    )];
    let fp = Identity::generate().unwrap().fingerprint();
    let (jctl, jev, _jcmd) = Control::channels();
    let j = net::join_ice(
        js,
        ice,
        fp,
        dst.path().to_owned(),
        &cfg(Driver::Epoll),
        jctl,
    )
    .unwrap();
    let err = j.error.expect("ICE failure must fail the join");
    assert!(matches!(err, flux_peer::net::NetError::Ice(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("failed to establish ICE connection: "),
        "{err}"
    );
    assert!(
        jev.try_iter()
            .any(|e| matches!(e, NetEvent::IceFailed { link: 0, .. })),
        "no IceFailed event"
    );
    assert_eq!(fs::read_dir(dst.path()).unwrap().count(), 0);
}

/// A STUN binding request with a made-up MESSAGE-INTEGRITY (RFC 8489 §14.5): it names the
/// right user but nobody with the password made it.
fn forged_check(user: &str, n: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    let u = user.as_bytes();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(u.len() as u16).to_be_bytes());
    attrs.extend_from_slice(u);
    attrs.resize(attrs.len().next_multiple_of(4), 0);
    // PRIORITY and ICE-CONTROLLING, as a real check carries.
    attrs.extend_from_slice(&0x0024u16.to_be_bytes());
    attrs.extend_from_slice(&4u16.to_be_bytes());
    attrs.extend_from_slice(&0x6E00_01FFu32.to_be_bytes());
    attrs.extend_from_slice(&0x802Au16.to_be_bytes());
    attrs.extend_from_slice(&8u16.to_be_bytes());
    attrs.extend_from_slice(&[3; 8]);
    attrs.extend_from_slice(&0x0008u16.to_be_bytes());
    attrs.extend_from_slice(&20u16.to_be_bytes());
    attrs.extend_from_slice(&[0xA5; 20]);
    let mut m = Vec::new();
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    // Length counts the FINGERPRINT attribute (8 bytes) appended below.
    m.extend_from_slice(&(attrs.len() as u16 + 8).to_be_bytes());
    m.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    m.extend_from_slice(&[7; 8]);
    m.extend_from_slice(&n.to_be_bytes());
    m.extend_from_slice(&attrs);
    // A valid FINGERPRINT (CRC-32 ^ 0x5354554e), so the message parses and is refused for
    // its integrity, not for its form.
    let crc = crc32(&m) ^ 0x5354_554e;
    m.extend_from_slice(&0x8028u16.to_be_bytes());
    m.extend_from_slice(&4u16.to_be_bytes());
    m.extend_from_slice(&crc.to_be_bytes());
    m
}

/// CRC-32 (IEEE, reflected), as STUN's FINGERPRINT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Bad input on the engine's socket and through the trickle: 10,000 candidates (link-local,
/// multicast, garbage, and thousands of unreachable addresses) and 2,000 checks with a forged
/// MESSAGE-INTEGRITY. The transfer completes, the candidates past the cap are ignored, the
/// forged checks refused, and checks stay paced (no storm towards the listed addresses).
#[test]
fn ice_shrugs_off_a_candidate_flood_and_forged_checks() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let f = src.path().join("a");
    write_random(&f, 2_000_000, 9);
    let r = ice_transfer(std::slice::from_ref(&f), dst.path(), Driver::Epoll, |p| {
        // The hostile trickle reaches the joiner before anything else.
        for i in 0..10_000u32 {
            let (a, b) = ((i / 250 % 250) as u8, (i % 250) as u8 + 1);
            let line = match i % 4 {
                0 => format!("candidate:f 1 udp 2130706431 169.254.{a}.{b} 9 typ host"),
                1 => format!("candidate:f 1 udp 2130706431 224.0.{a}.{b} 9 typ host"),
                2 => format!("candidate:{i} garbage"),
                _ => format!(
                    "candidate:f 1 udp 2130706431 192.0.2.{b} {} typ host",
                    1024 + i
                ),
            };
            p.joiner_commands
                .send(Command::RemoteCandidate {
                    link: 0,
                    candidate: line,
                })
                .unwrap();
        }
        // All forged checks wait in the joiner's socket buffer, so every one meets the agent
        // however fast the transfer is.
        let user = format!("{}:{}", p.join_creds.ufrag, p.host_creds.ufrag);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..2000 {
            s.send_to(&forged_check(&user, n), p.joiner_addr).unwrap();
        }
    });
    let (j, elapsed) = (&r.joiner, r.join_time);
    assert_ok(j, "joiner");
    assert_ok(&r.host, "host");
    assert_same_file(&f, &dst.path().join("a"));
    let stats = j.conns[0].ice_stats.expect("ICE counters");
    // 5,000 link-local and multicast lines, and the 2,500 reachable-looking ones beyond the
    // cap of 100 (the 2,500 garbage lines do not parse and never reach the agent).
    assert!(
        stats.remote_candidates_ignored >= 7_300,
        "candidates not ignored: {stats:?}"
    );
    assert!(stats.remote_candidates <= 101, "cap not applied: {stats:?}");
    assert!(
        stats.stun_refused >= 2_000,
        "forged checks not refused: {stats:?}"
    );
    // Ta = 50 ms paces new checks; each may be retransmitted (RFC 8445 §14.3). Anything near
    // the candidate count would be a storm.
    let budget = 8 * (elapsed.as_millis() as u64 / 50 + 5);
    assert!(
        stats.checks_sent <= budget,
        "{} checks in {elapsed:?} (budget {budget}): not paced",
        stats.checks_sent
    );
    println!("flood: {stats:?} in {elapsed:?}");
}
