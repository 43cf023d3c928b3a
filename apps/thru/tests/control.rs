//! Issue 14, sections 4 and 5, through real `thru` processes (LAN with `--peer`, and through
//! a real `thruserv`): `--list` (prints the offer, keeps the host serving), `--include` /
//! `--exclude` (the host sends only the chosen files; a later run adds only new ones), and
//! how each side learns that the other went away: `kill -9` (QUIC keep-alive and idle
//! timeout), Ctrl-C (a reason, at once), and through thruserv the server's word that the host
//! left. Delays are printed (`--nocapture`), never asserted tightly: the bounds here are hang
//! guards.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, Thruserv, lan_host, lan_join};
use serde_json::Value;

/// A small tree: two text files (one nested), a log, and a link.
fn tree(root: &Path) -> std::path::PathBuf {
    let top = root.join("share");
    fs::create_dir_all(top.join("sub")).unwrap();
    fs::write(top.join("a.txt"), b"alpha\n").unwrap();
    fs::write(top.join("sub/c.txt"), vec![b'c'; 70_000]).unwrap();
    fs::write(top.join("b.log"), vec![b'l'; 123_456]).unwrap();
    std::os::unix::fs::symlink("a.txt", top.join("to-a")).unwrap();
    top
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().to_string();
    let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// Relative paths of the regular files under `dir`, sorted (partial files included).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// `thru join --list`, then `--include '*.txt'`, then `--include '*.txt' --include '*.log'`:
/// the listing shows everything and takes no slot; the second run gets exactly the text files
/// and says one file and the link were left out; the third moves only the log.
fn list_then_pick(join: impl Fn(&Path, &[&str]) -> Proc, host: &mut Proc) {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("in");

    let mut lister = join(&dest, &["--list"]);
    let listing = lister.event("listing");
    assert_eq!(lister.wait(), 0, "--list exits 0");
    assert_eq!(listing["files"], 3, "{listing}");
    assert_eq!(listing["bytes"], 6 + 70_000 + 123_456, "{listing}");
    assert_eq!(listing["links"][0]["name"], "share/to-a", "{listing}");
    assert!(!dest.exists(), "--list wrote nothing");
    let st = host.event("receiver");
    assert_eq!(st["state"], "waiting", "{st}");
    assert_eq!(host.event("receiver")["state"], "prompt");
    assert_eq!(host.event("receiver")["state"], "listed");

    let mut first = join(&dest, &["--yes", "--include", "*.txt"]);
    let sum = first.event("summary");
    assert_eq!(first.wait(), 0);
    assert_eq!(files_under(&dest), ["share/a.txt", "share/sub/c.txt"]);
    assert_eq!(sum["files"], 2, "{sum}");
    assert_eq!(sum["left_out"], 1, "{sum}");
    assert_eq!(sum["sent_bytes"], 70_006, "{sum}");

    let mut second = join(
        &dest,
        &["--yes", "--include", "*.txt", "--include", "*.log"],
    );
    let sum = second.event("summary");
    assert_eq!(second.wait(), 0);
    assert_eq!(
        files_under(&dest),
        ["share/a.txt", "share/b.log", "share/sub/c.txt"]
    );
    assert_eq!(sum["up_to_date"], 2, "{sum}");
    assert_eq!(sum["sent_bytes"], 123_456, "only the new file moved: {sum}");
    assert_eq!(fs::read(dest.join("share/b.log")).unwrap().len(), 123_456);
    // Two receivers served: the listing did not count.
    let hs = host.event("host_summary");
    assert_eq!(hs["receivers_done"], 2, "{hs}");
    assert_eq!(host.wait(), 0);
}

#[test]
fn lan_list_then_include_then_more() {
    let src = tempfile::tempdir().unwrap();
    let share = tree(src.path());
    let (mut host, peer, code) = lan_host(&[&share], 2);
    list_then_pick(|out, extra| lan_join(&peer, &code, out, extra), &mut host);
}

#[test]
fn server_list_then_include_then_more() {
    let server = Thruserv::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let share = tree(src.path());
    let url = server.url();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--server",
            &url,
            "--max-receivers",
            "2",
            share.to_str().unwrap(),
        ],
        &[],
    );
    let code = host.event("code")["code"].as_str().unwrap().to_string();
    list_then_pick(
        |out, extra| {
            let mut args = vec![
                "join",
                "--json",
                "--server",
                &url,
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            Proc::spawn(&args, &[("THRU_CODE", &code)])
        },
        &mut host,
    );
}

#[test]
fn an_invalid_glob_is_a_usage_error_naming_it() {
    let src = tempfile::tempdir().unwrap();
    let share = tree(src.path());
    let (_host, peer, code) = lan_host(&[&share], 1);
    let out = tempfile::tempdir().unwrap();
    for (flag, pat) in [("--include", "a["), ("--exclude", "{x")] {
        let mut j = lan_join(&peer, &code, out.path(), &["--yes", flag, pat]);
        let e = j.event("error");
        assert_eq!(j.wait(), 2, "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(&format!("{flag} {pat:?}")), "{msg}");
    }
}

/// A file that takes a few seconds to send over loopback; sparse, so it costs no disk here.
fn big(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("big.bin");
    fs::File::create(&f).unwrap().set_len(4 << 30).unwrap();
    f
}

/// Waits for `p`'s `error` event and its exit; returns the event and how long since `from`.
fn error_after(p: &mut Proc, from: Instant) -> (Value, Duration) {
    let e = p.event("error");
    let took = from.elapsed();
    let code = p.wait();
    assert_eq!(code, e["exit_code"].as_i64().unwrap() as i32, "{e}");
    (e, took)
}

/// The host is killed (SIGKILL) mid-transfer: the joiner says the host went away, what it
/// keeps and how to resume, after about the idle timeout (3 s, and at most a keep-alive
/// more), without any word from the host.
#[test]
fn lan_joiner_notices_a_killed_host() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let (host, peer, code) = lan_host(&[&f], 1);
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    joiner.event("progress");
    // Frozen first, so that the transfer cannot finish before the kill lands.
    signal(&host, "-STOP");
    let t = Instant::now();
    signal(&host, "-KILL");
    let (e, took) = error_after(&mut joiner, t);
    println!("joiner noticed the killed host after {took:?}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("the host went away"), "{msg}");
    assert!(
        msg.contains("kept here") && msg.contains("thru join"),
        "{msg}"
    );
    assert_eq!(e["exit_code"], 1);
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(
        out.path().join(".big.bin.thrupart").exists(),
        "partial data kept"
    );
    drop(host);
}

/// The joiner is killed (SIGKILL) mid-transfer: the host shows the receiver gone, with the
/// reason, after about the idle timeout, and exits 1.
#[test]
fn lan_host_notices_a_killed_joiner() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let (mut host, peer, code) = lan_host(&[&f], 1);
    let joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    loop {
        let st = host.event("receiver");
        if st["state"] == "receiving" {
            break;
        }
    }
    signal(&joiner, "-STOP");
    let t = Instant::now();
    signal(&joiner, "-KILL");
    let gone = loop {
        let st = host.event("receiver");
        if st["state"] == "gone" {
            break st;
        }
    };
    let took = t.elapsed();
    println!("host noticed the killed joiner after {took:?}");
    let why = gone["reason"].as_str().unwrap();
    assert!(why.contains("the receiver went away"), "{why}");
    assert!(why.contains("thru join"), "{why}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    let (e, _) = error_after(&mut host, t);
    assert_eq!(e["exit_code"], 1, "{e}");
    drop(joiner);
}

/// Ctrl-C on the joiner mid-transfer: the host hears the reason at once, with what the joiner
/// keeps; the joiner exits 130 and keeps its partial data.
#[test]
fn lan_ctrl_c_on_the_joiner_tells_the_host() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let (mut host, peer, code) = lan_host(&[&f], 1);
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    joiner.event("progress");
    let t = Instant::now();
    signal(&joiner, "-INT");
    let gone = loop {
        let st = host.event("receiver");
        if st["state"] == "gone" {
            break st;
        }
    };
    println!("host heard of the joiner's Ctrl-C after {:?}", t.elapsed());
    let why = gone["reason"].as_str().unwrap();
    assert!(why.contains("the receiver stopped (Ctrl-C)"), "{why}");
    assert!(
        why.contains("MiB kept") && why.contains("thru join"),
        "{why}"
    );
    assert_eq!(joiner.wait(), 130);
    assert_eq!(host.wait(), 1);
    assert!(
        out.path().join(".big.bin.thrupart").exists(),
        "partial data kept"
    );
}

/// Ctrl-C on the host mid-transfer: the joiner prints the host's reason at once.
#[test]
fn lan_ctrl_c_on_the_host_tells_the_joiner() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let (mut host, peer, code) = lan_host(&[&f], 1);
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);
    joiner.event("progress");
    let t = Instant::now();
    signal(&host, "-INT");
    let (e, took) = error_after(&mut joiner, t);
    println!("joiner heard of the host's Ctrl-C after {took:?}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("the host stopped (Ctrl-C)"), "{msg}");
    assert!(msg.contains("kept here"), "{msg}");
    assert_eq!(host.wait(), 130);
}

/// A `--json` host of `f` through the server at `url`, and a `--json --yes` joiner of it
/// receiving into `out`.
fn server_pair(url: &str, f: &Path, out: &Path) -> (Proc, Proc) {
    let host = Proc::spawn(
        &["host", "--json", "--server", url, f.to_str().unwrap()],
        &[],
    );
    let code = host.event("code")["code"].as_str().unwrap().to_string();
    let joiner = Proc::spawn(
        &[
            "join",
            "--json",
            "--yes",
            "--server",
            url,
            "--out",
            out.to_str().unwrap(),
        ],
        &[("THRU_CODE", &code)],
    );
    (host, joiner)
}

/// Through thruserv, Ctrl-C on either side mid-transfer: the other side hears the reason at
/// once, over the same QUIC connection, as on the LAN.
#[test]
fn server_ctrl_c_on_either_side_tells_the_other() {
    let server = Thruserv::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let f = big(src.path());
    let url = server.url();
    for stopper in ["joiner", "host"] {
        let out = tempfile::tempdir_in("/var/tmp").unwrap();
        let (mut host, mut joiner) = server_pair(&url, &f, out.path());
        joiner.event("progress");
        if stopper == "joiner" {
            signal(&joiner, "-INT");
            let gone = loop {
                let st = host.event("receiver");
                if st["state"] == "gone" {
                    break st;
                }
            };
            let why = gone["reason"].as_str().unwrap();
            assert!(why.contains("the receiver stopped (Ctrl-C)"), "{why}");
            assert!(why.contains("MiB kept"), "{why}");
            assert_eq!(joiner.wait(), 130);
            assert_eq!(host.wait(), 1);
            assert!(
                out.path().join(".big.bin.thrupart").exists(),
                "partial data kept"
            );
        } else {
            signal(&host, "-INT");
            let (e, _) = error_after(&mut joiner, Instant::now());
            let msg = e["message"].as_str().unwrap();
            assert!(msg.contains("the host stopped (Ctrl-C)"), "{msg}");
            assert!(msg.contains("kept here"), "{msg}");
            assert_eq!(host.wait(), 130);
        }
    }
}

/// Through thruserv, the host is killed mid-transfer: the server tells the joiner at once
/// that the host is gone, well before QUIC would time out.
#[test]
fn server_joiner_learns_at_once_that_the_host_is_gone() {
    let server = Thruserv::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let url = server.url();
    let (host, mut joiner) = server_pair(&url, &f, out.path());
    joiner.event("accepted");
    signal(&host, "-STOP");
    let t = Instant::now();
    signal(&host, "-KILL");
    let (e, took) = error_after(&mut joiner, t);
    println!("joiner learned the host was gone after {took:?}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("the host is no longer online"), "{msg}");
    assert!(msg.contains("thru join"), "{msg}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    drop(host);
}

/// Through thruserv, the joiner is killed mid-transfer: the host notices within seconds.
#[test]
fn server_host_notices_a_killed_joiner() {
    let server = Thruserv::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = big(src.path());
    let url = server.url();
    let (mut host, joiner) = server_pair(&url, &f, out.path());
    loop {
        if host.event("receiver")["state"] == "receiving" {
            break;
        }
    }
    signal(&joiner, "-STOP");
    let t = Instant::now();
    signal(&joiner, "-KILL");
    let gone = loop {
        let st = host.event("receiver");
        if st["state"] == "gone" {
            break st;
        }
    };
    let took = t.elapsed();
    println!("host (via thruserv) noticed the killed joiner after {took:?}");
    let why = gone["reason"].as_str().unwrap();
    assert!(why.contains("the receiver went away"), "{why}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert_eq!(host.wait(), 1);
    drop(joiner);
}
