//! The web relay end to end: a real `thruserv --web-relay`, a real `thru host --web` and
//! `thru join --web`, and real curl (and, in `browser.rs`, a real headless Chromium).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, Proc, Thruserv};
use rand::{RngCore as _, SeedableRng as _};

/// Writes `len` pseudo-random bytes (a fixed seed: reproducible, incompressible).
fn random_file(path: &Path, len: usize, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

fn hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A `thru host --web --json` of `paths` through `server`; returns the process and its
/// `web_link` event.
fn web_host(server: &Thruserv, paths: &[&Path], extra: &[&str]) -> (Proc, serde_json::Value) {
    let url = server.url();
    let mut args = vec!["host", "--json", "--web", "--server", &url];
    args.extend_from_slice(extra);
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let host = Proc::spawn(&args, &[]);
    let link = host.event("web_link");
    (host, link)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output()
        .unwrap()
}

fn status_of(url: &str) -> String {
    let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plain_download_is_interrupted_and_resumed_with_curl() {
    if !have("curl") {
        eprintln!("skipped: no curl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    random_file(&src, 200 << 20, 1);
    let server = Thruserv::start(&["--web-relay"]);
    let (_host, link) = web_host(&server, &[&src], &["--plain"]);
    assert_eq!(link["mode"], "plain", "{link}");
    let cmd = link["curl"][0].as_str().unwrap();
    let url = cmd.rsplit(' ').next().unwrap().to_string();
    assert!(cmd.starts_with("curl -fLOJ http://"), "{cmd}");
    assert!(url.ends_with("/big.bin"), "{url}");

    // First attempt: slowed down, killed once part of the file is here.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut first = Command::new("curl")
        .args(["-sS", "-fLOJ", "--limit-rate", "20M", &url])
        .current_dir(&out)
        .spawn()
        .unwrap();
    let got = out.join("big.bin");
    let deadline = Instant::now() + PATIENCE;
    while std::fs::metadata(&got).map_or(0, |m| m.len()) < 16 << 20 {
        assert!(
            Instant::now() < deadline,
            "the first download did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let partial = std::fs::metadata(&got).unwrap().len();
    assert!(partial < 200 << 20, "the first attempt was not interrupted");

    // Resume where it stopped: curl sends Range, the relay answers 206 from that offset.
    let resumed = Command::new("curl")
        .args([
            "-sS",
            "-fL",
            "-C",
            "-",
            "-o",
            "big.bin",
            "-w",
            "%{http_code}",
            &url,
        ])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{resumed:?}");
    assert_eq!(String::from_utf8_lossy(&resumed.stdout), "206");
    assert_eq!(hash(&got), hash(&src), "resumed file differs");

    // The relay counted it.
    let metrics = curl(&[&format!("http://{}/metrics", server.addr)]);
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.contains("thruserv_relays_active 1"), "{text}");
    let bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("thruserv_relay_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes >= 200 << 20, "{bytes}");
}

#[test]
fn folder_arrives_as_a_tar_stream() {
    if !have("curl") || !have("tar") {
        eprintln!("skipped: no curl or tar");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("tree");
    let long = "l".repeat(120);
    for (rel, len) in [
        ("a.txt", 10usize),
        ("sub/b.bin", 70_000),
        ("sub/deeper/empty", 0),
        ("sub/été ü.txt", 513),
        (&format!("sub/{long}.dat") as &str, 1000),
    ] {
        let p = top.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        random_file(&p, len, len as u64);
    }
    let server = Thruserv::start(&["--web-relay"]);
    let (_host, link) = web_host(&server, &[&top], &["--plain"]);
    let cmds: Vec<&str> = link["curl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let tar_cmd = cmds.iter().find(|c| c.contains(".tar")).unwrap();
    assert!(tar_cmd.ends_with("| tar x"), "{tar_cmd}");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // The printed pipeline, run as printed.
    let st = Command::new("sh")
        .arg("-c")
        .arg(tar_cmd.replacen("curl ", "curl -sS ", 1))
        .current_dir(&out)
        .status()
        .unwrap();
    assert!(st.success());
    for rel in [
        "a.txt".to_string(),
        "sub/b.bin".into(),
        "sub/deeper/empty".into(),
        "sub/été ü.txt".into(),
        format!("sub/{long}.dat"),
    ] {
        let a = top.join(&rel);
        let b = out.join("tree").join(&rel);
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap_or_default(),
            "{rel}"
        );
    }
}

#[test]
fn unknown_links_and_a_relay_that_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f.txt");
    std::fs::write(&src, b"hello").unwrap();
    // Off by default: the routes do not exist and `--web` says what is missing.
    let off = Thruserv::start(&[]);
    assert_eq!(
        status_of(&format!("http://{}/w/abcdefabcdef", off.addr)),
        "404"
    );
    let url = off.url();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--web",
            "--server",
            &url,
            src.to_str().unwrap(),
        ],
        &[],
    );
    let err = host.event("error");
    assert!(
        err["message"].as_str().unwrap().contains("--web-relay"),
        "{err}"
    );
    assert_eq!(host.wait(), 1);

    // On: an unknown id and a live one's unknown file are told apart from nothing else.
    let on = Thruserv::start(&["--web-relay"]);
    let (mut live, link) = web_host(&on, &[&src], &["--plain"]);
    let base = link["url"].as_str().unwrap().to_string();
    let unknown = format!("http://{}/w/zzzzzzzzzzzz", on.addr);
    let body_unknown = curl(&[&unknown]).stdout;
    assert_eq!(status_of(&unknown), "404");
    assert_eq!(status_of(&format!("{base}/nope.txt")), "404");
    let got = curl(&["-f", &format!("{base}/f.txt")]);
    assert_eq!(got.stdout, b"hello");
    // Once the host is gone its link is the same 404 as one that never existed.
    live.child.kill().unwrap();
    live.child.wait().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while status_of(&format!("{base}/f.txt")) != "404" {
        assert!(Instant::now() < deadline, "link outlived its host");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(curl(&[&base]).stdout, body_unknown);
}
