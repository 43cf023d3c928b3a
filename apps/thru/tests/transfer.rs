//! Whole transfers between real `thru` processes on this machine (LAN mode with `--peer`, and
//! through a real `thruserv`): trees, several joiners at once, resume after `kill -9`, and
//! refusing to overwrite.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Proc, Thruserv, lan_host, lan_join};

/// Waits for the exit code, with room for gigabyte transfers on a loaded machine.
fn wait_long(p: &mut Proc, limit: Duration) -> i32 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(std::time::Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts `b` holds the tree `a`: kinds, bytes, file modes and mtimes.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut stack = vec![PathBuf::new()];
    let mut seen = 0;
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let ma = fs::symlink_metadata(&pa).unwrap();
        let mb = fs::symlink_metadata(&pb).unwrap_or_else(|e| panic!("{}: {e}", pb.display()));
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        seen += 1;
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
            assert_eq!(na, nb, "{}", rel.display());
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        } else {
            assert_eq!(ma.len(), mb.len(), "{}", rel.display());
            assert_eq!(
                fs::read(&pa).unwrap(),
                fs::read(&pb).unwrap(),
                "{}",
                rel.display()
            );
            assert_eq!(
                ma.permissions().mode() & 0o777,
                mb.permissions().mode() & 0o777
            );
            assert_eq!(
                ma.modified().unwrap(),
                mb.modified().unwrap(),
                "{}",
                rel.display()
            );
        }
    }
    assert!(seen > 1);
}

/// 10,000 small files (a third empty), nested empty directories, odd modes and old mtimes.
fn make_tree(root: &Path) -> PathBuf {
    let top = root.join("tree");
    for d in 0..100 {
        let dir = top.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let p = dir.join(format!("f{f:03}.txt"));
            let body = if f % 3 == 0 {
                Vec::new()
            } else {
                format!("{d}/{f} ").repeat(f + 1).into_bytes()
            };
            fs::write(&p, body).unwrap();
            if f % 7 == 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    fs::create_dir_all(top.join("empty/deeper/still-empty")).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    fs::File::options()
        .write(true)
        .open(top.join("d000/f001.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    top
}

#[test]
fn tree_of_10000_files_and_a_mix_arrive_identical() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tree = make_tree(src.path());
    let single = src.path().join("single.bin");
    fs::write(
        &single,
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let (mut host, peer, code) = lan_host(&[&tree, &single], 1);
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    let sum = joiner.event("summary");
    assert_eq!(sum["route"], "lan_direct");
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(120)), 0);
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 0);
    assert_same_tree(&tree, &out.path().join("tree"));
    assert_eq!(
        fs::read(&single).unwrap(),
        fs::read(out.path().join("single.bin")).unwrap()
    );
}

#[test]
fn three_joiners_receive_at_once_through_thruserv() {
    let server = Thruserv::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("shared.bin");
    fs::write(
        &f,
        (0..20_000_000u32)
            .map(|i| (i * 7 % 253) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let host = Proc::spawn(
        &[
            "host",
            "--json",
            "--server",
            &server.url(),
            "--max-receivers",
            "3",
            f.to_str().unwrap(),
        ],
        &[],
    );
    let code = host.event("code")["code"].as_str().unwrap().to_string();
    let outs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut joiners: Vec<Proc> = outs
        .iter()
        .map(|o| {
            Proc::spawn(
                &[
                    "join",
                    "--json",
                    "--yes",
                    "--server",
                    &server.url(),
                    "--out",
                    o.path().to_str().unwrap(),
                    &code,
                ],
                &[],
            )
        })
        .collect();
    for j in &mut joiners {
        assert_eq!(wait_long(j, Duration::from_secs(90)), 0);
    }
    let mut host = host;
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 0);
    let want = fs::read(&f).unwrap();
    for o in &outs {
        assert_eq!(fs::read(o.path().join("shared.bin")).unwrap(), want);
    }
}

#[test]
fn existing_file_is_not_overwritten_without_force() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("report.txt");
    fs::write(&f, b"new version").unwrap();
    fs::write(out.path().join("report.txt"), b"precious local copy").unwrap();
    let (mut host, peer, code) = lan_host(&[&f], 2);
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    let err = joiner.event("error");
    assert!(
        err["message"].as_str().unwrap().contains("already exists"),
        "{err}"
    );
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(30)), 5);
    assert_eq!(
        fs::read(out.path().join("report.txt")).unwrap(),
        b"precious local copy"
    );
    // With --force the same host replaces it.
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes", "--force"]);
    // The offer names what it replaces and where it lands (issue 13, item 5).
    let offer = joiner.event("offer");
    assert_eq!(
        offer["replaces"],
        serde_json::json!(["report.txt"]),
        "{offer}"
    );
    assert_eq!(
        offer["destination"].as_str(),
        out.path().to_str(),
        "{offer}"
    );
    assert_eq!(offer["files"], 1, "{offer}");
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(30)), 0);
    assert_eq!(
        fs::read(out.path().join("report.txt")).unwrap(),
        b"new version"
    );
    let _ = wait_long(&mut host, Duration::from_secs(30));
}

/// An identical file at the receiver is skipped by default (nothing crosses the network, the
/// file is not touched: the sender learns the receiver holds it); with `--no-skip-identical`
/// every byte is sent again, and the existing file counts as a conflict that needs `--force`.
#[test]
fn identical_file_is_sent_again_with_no_skip_identical() {
    use std::os::unix::fs::MetadataExt;
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let f = src.path().join("same.bin");
    fs::write(&f, &data).unwrap();
    let held = out.path().join("same.bin");
    fs::write(&held, &data).unwrap();
    let ino = || fs::metadata(&held).unwrap().ino();
    let before = ino();
    let (mut host, peer, code) = lan_host(&[&f], 3);

    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes", "--benchmark"]);
    let bench = joiner.event("benchmark");
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(60)), 0);
    assert_eq!(bench["bytes"], 0, "skipped by default: {bench}");
    assert_eq!(ino(), before, "a skipped file is not touched");

    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes", "--no-skip-identical"]);
    let err = joiner.event("error");
    assert!(
        err["message"].as_str().unwrap().contains("already exists"),
        "{err}"
    );
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(60)), 5);

    let mut joiner = lan_join(
        &peer,
        &code,
        out.path(),
        &["--yes", "--force", "--no-skip-identical", "--benchmark"],
    );
    let bench = joiner.event("benchmark");
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(60)), 0);
    assert_eq!(
        bench["bytes"],
        data.len() as u64,
        "every byte sent: {bench}"
    );
    assert_ne!(ino(), before, "the file was received again and replaced");
    assert_eq!(fs::read(&held).unwrap(), data);
    let _ = wait_long(&mut host, Duration::from_secs(30));
}

/// `--durable`: the tree arrives whole and the summary says how long syncing took; without it
/// the summary has no such figure.
#[test]
fn durable_receive_syncs_and_says_how_long() {
    let src = tempfile::tempdir().unwrap();
    let tree = make_tree(src.path());
    let (mut host, peer, code) = lan_host(&[&tree], 2);
    for durable in [true, false] {
        let out = tempfile::tempdir().unwrap();
        let mut extra = vec!["--yes"];
        if durable {
            extra.push("--durable");
        }
        let mut joiner = lan_join(&peer, &code, out.path(), &extra);
        let summary = joiner.event("summary");
        assert_eq!(wait_long(&mut joiner, Duration::from_secs(60)), 0);
        assert_same_tree(&tree, &out.path().join(tree.file_name().unwrap()));
        match summary["synced_seconds"].as_f64() {
            Some(s) => assert!(durable && s > 0.0, "{summary}"),
            None => assert!(!durable, "no sync time with --durable: {summary}"),
        }
    }
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 0);
}

/// An offer larger than the free space at `--out` is refused before anything is written, with
/// a message naming both numbers. The file is sparse: it claims more than the disk holds
/// without taking any of it.
#[test]
fn offer_larger_than_free_space_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let free = thru::space::free_bytes(out.path()).unwrap();
    let f = src.path().join("huge.bin");
    let size = free + (1 << 30);
    fs::File::create(&f).unwrap().set_len(size).unwrap();
    let (mut host, peer, code) = lan_host(&[&f], 1);
    // Even with --yes; and the directories join created for it are removed again.
    let dest = out.path().join("new/sub");
    let mut joiner = lan_join(&peer, &code, &dest, &["--yes"]);
    let err = joiner.event("error");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("are free") && msg.contains(&size.to_string()),
        "{err}"
    );
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(60)), 4);
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written, and the --out join created is gone"
    );
    // The sender learns of the refusal and exits 4 too.
    let declined = host.event("declined");
    assert_eq!(declined["peer"], "joiner 1", "{declined}");
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 4);
}

/// Bytes the partial file's resume sidecar vouches for (64-byte header, 40-byte records).
fn held_bytes(dir: &Path, name: &str, chunk: u64) -> u64 {
    let state = dir.join(format!(".{name}.thrupart.state"));
    let len = fs::metadata(&state).map_or(0, |m| m.len());
    len.saturating_sub(64) / 40 * chunk
}

const GIB: u64 = 1 << 30;
/// The automatic chunk size for a 1 GiB file.
const CHUNK: u64 = 4 << 20;

fn gib_file(dir: &Path) -> PathBuf {
    use std::io::Write;
    let f = dir.join("big.bin");
    let mut w = std::io::BufWriter::new(fs::File::create(&f).unwrap());
    let mut x = blake3::Hasher::new().finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..(GIB >> 20) {
        x.fill(&mut buf);
        w.write_all(&buf).unwrap();
    }
    f
}

/// Waits until the joiner reports at least half of the file done.
fn until_half(joiner: &Proc) {
    loop {
        let v = joiner.event("progress");
        if v["overall_done"].as_u64().unwrap() >= GIB / 2 {
            return;
        }
    }
}

/// Resumes into `out` from a fresh host and checks only the missing part moved.
fn resume_and_check(f: &Path, out: &Path) {
    let held = held_bytes(out, "big.bin", CHUNK);
    assert!(held > 0 && held < GIB, "held {held}");
    let (mut host, peer, code) = lan_host(&[f], 1);
    let mut joiner = lan_join(&peer, &code, out, &["--yes", "--benchmark"]);
    let bench = joiner.event("benchmark");
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(180)), 0);
    let moved = bench["bytes"].as_u64().unwrap();
    assert!(
        moved <= GIB - held + 16 * CHUNK,
        "second run moved {moved} bytes, {} were missing",
        GIB - held
    );
    let a = blake3::hash(&fs::read(f).unwrap());
    let b = blake3::hash(&fs::read(out.join("big.bin")).unwrap());
    assert_eq!(a, b, "received bytes differ");
    // The sender reports what moved, not the whole file (issue 15).
    let sum = host.event("summary");
    let (sent, resumed) = (
        sum["sent_bytes"].as_u64().unwrap(),
        sum["resumed_bytes"].as_u64().unwrap(),
    );
    assert_eq!(sent + resumed, GIB, "{sum}");
    assert!(resumed > 0 && sent <= GIB - held + 16 * CHUNK, "{sum}");
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 0);
}

#[test]
fn gib_resume_after_the_host_is_killed() {
    let src = tempfile::tempdir_in("/var/tmp").unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = gib_file(src.path());
    let (mut host, peer, code) = lan_host(&[&f], 1);
    let mut first = lan_join(&peer, &code, out.path(), &["--yes"]);
    until_half(&first);
    host.child.kill().unwrap(); // SIGKILL
    let _ = host.child.wait();
    // The joiner notices on its own (idle timeout) and fails with the resume hint's exit code.
    assert_eq!(wait_long(&mut first, Duration::from_secs(90)), 1);
    // A new host on the same paths: only the missing part moves.
    resume_and_check(&f, out.path());
}

#[test]
fn gib_resume_after_the_joiner_is_killed() {
    let src = tempfile::tempdir_in("/var/tmp").unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = gib_file(src.path());
    let (mut host, peer, code) = lan_host(&[&f], 2);
    let mut first = lan_join(&peer, &code, out.path(), &["--yes"]);
    until_half(&first);
    first.child.kill().unwrap(); // SIGKILL
    let _ = first.child.wait();
    let held = held_bytes(out.path(), "big.bin", CHUNK);
    assert!(held > 0 && held < GIB, "held {held}");
    // The same host, the same code: only the missing part moves.
    let mut second = lan_join(&peer, &code, out.path(), &["--yes", "--benchmark"]);
    let bench = second.event("benchmark");
    assert_eq!(wait_long(&mut second, Duration::from_secs(180)), 0);
    let moved = bench["bytes"].as_u64().unwrap();
    // At most the chunks whose write had not been recorded when the joiner died move twice.
    assert!(
        moved <= GIB - held + 16 * CHUNK,
        "second run moved {moved} bytes, {} were missing",
        GIB - held
    );
    let a = blake3::hash(&fs::read(&f).unwrap());
    let b = blake3::hash(&fs::read(out.path().join("big.bin")).unwrap());
    assert_eq!(a, b, "received bytes differ");
    let _ = host.child.kill();
}

#[test]
fn wrong_code_writes_nothing() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("secret.txt");
    fs::write(&f, b"not for you").unwrap();
    let (mut host, peer, code) = lan_host(&[&f], 1);
    // Same routing part, different secret.
    let mut wrong: Vec<char> = code.chars().collect();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == '2' { '3' } else { '2' };
    let wrong: String = wrong.into_iter().collect();
    let mut joiner = lan_join(&peer, &wrong, out.path(), &["--yes"]);
    assert_eq!(wait_long(&mut joiner, Duration::from_secs(20)), 3);
    assert_eq!(wait_long(&mut host, Duration::from_secs(20)), 3);
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "something was written"
    );
}

#[test]
fn host_does_not_wait_forever_for_a_joiner_that_never_connects() {
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("x");
    fs::write(&f, b"x").unwrap();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--no-mdns",
            "--max-receivers",
            "1",
            "--pair-timeout",
            "2s",
            f.to_str().unwrap(),
        ],
        &[],
    );
    let code = host.event("code");
    let peer: std::net::SocketAddr = code["peer_hint"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .map(|(_, port)| format!("127.0.0.1:{port}"))
        .unwrap()
        .parse()
        .unwrap();
    let code: thru::code::JoinCode = code["code"].as_str().unwrap().parse().unwrap();
    // Pair through the library and then never start QUIC.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut opts = thru::rendezvous::JoinOptions::new(common::local(9));
    opts.allow_loopback = true;
    let paired = rt
        .block_on(thru::rendezvous::join_lan(
            &code,
            thru::rendezvous::LanTarget::Peer(peer),
            opts,
        ))
        .unwrap();
    assert_eq!(paired.peer_label, "host");
    // The host gives up on it after the pairing timeout and ends with a failure.
    let err = host.event("error");
    assert!(
        err["message"].as_str().unwrap().contains("never connected"),
        "{err}"
    );
    assert_eq!(wait_long(&mut host, Duration::from_secs(30)), 1);
}
