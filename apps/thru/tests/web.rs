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

// --- limits, floods and memory ---------------------------------------------------------------

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

/// A relay owner speaking the protocol directly: offers one plain file of `size` bytes and
/// answers every download with frames of zeros (as fast as the relay takes them). Returns
/// the link id, or the refusal.
async fn raw_host(url: &str, size: u64) -> Result<String, flux_signal::client::ClientError> {
    let cfg = common::client();
    let mut ws = flux_signal::client::connect_relay(url, "/v1/relay/host", &cfg).await?;
    let offer = serde_json::json!({"t": "offer", "mode": "plain", "files": [{"name": "z.bin", "size": size}]});
    ws.send(Message::text(offer.to_string())).await?;
    let id = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                break v["id"].as_str().unwrap().to_string();
            }
            Some(Ok(_)) => {}
            other => panic!("no ready: {other:?}"),
        }
    };
    let url = url.to_string();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            let (Some(req), Some(start), Some(end)) =
                (v["req"].as_str(), v["start"].as_u64(), v["end"].as_u64())
            else {
                continue;
            };
            let (url, req, cfg) = (url.clone(), req.to_string(), cfg.clone());
            tokio::spawn(async move {
                let path = format!("/v1/relay/push/{req}");
                let Ok(mut push) = flux_signal::client::connect_relay(&url, &path, &cfg).await
                else {
                    return;
                };
                let mut left = end - start;
                while left > 0 {
                    let n = left.min(64 * 1024);
                    if push
                        .send(Message::Binary(vec![0u8; n as usize].into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    left -= n;
                }
                let _ = push.send(Message::text("end")).await;
            });
        }
    });
    Ok(id)
}

fn refused_status(e: &flux_signal::client::ClientError) -> u16 {
    match e {
        flux_signal::client::ClientError::Refused { status, .. } => *status,
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

fn metric(server: &Thruserv, name: &str) -> u64 {
    let out = curl(&[&format!("http://{}/metrics", server.addr)]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn relay_floods_are_refused_by_their_limits_while_other_links_keep_working() {
    if !have("curl") {
        eprintln!("skipped: no curl");
        return;
    }
    let rt = runtime();
    // Per IP: the third link from one address is refused; the first two still serve.
    let server = Thruserv::start(&["--web-relay", "--relay-max-per-ip", "2"]);
    let url = server.url();
    let (a, b, c) = rt.block_on(async {
        (
            raw_host(&url, 1000).await,
            raw_host(&url, 1000).await,
            raw_host(&url, 1000).await,
        )
    });
    assert_eq!(refused_status(&c.unwrap_err()), 503);
    let got = curl(&[
        "-f",
        &format!("http://{}/w/{}/z.bin", server.addr, a.unwrap()),
    ]);
    assert_eq!(got.stdout.len(), 1000, "{got:?}");
    let got = curl(&[
        "-f",
        &format!("http://{}/w/{}/z.bin", server.addr, b.unwrap()),
    ]);
    assert_eq!(got.stdout.len(), 1000);
    assert_eq!(metric(&server, "thruserv_relays_refused_total"), 1);
    drop(server);

    // In total.
    let server = Thruserv::start(&["--web-relay", "--relay-max", "2", "--relay-max-per-ip", "0"]);
    let url = server.url();
    rt.block_on(async {
        raw_host(&url, 10).await.unwrap();
        raw_host(&url, 10).await.unwrap();
        assert_eq!(refused_status(&raw_host(&url, 10).await.unwrap_err()), 503);
    });
    drop(server);

    // Bytes per link: a download past the budget is cut (curl sees it incomplete), the
    // next one is refused with 403.
    let server = Thruserv::start(&["--web-relay", "--relay-max-bytes", "1MiB"]);
    let url = server.url();
    let id = rt.block_on(raw_host(&url, 3 << 20)).unwrap();
    let file = format!("http://{}/w/{id}/z.bin", server.addr);
    let got = curl(&["-f", &file]);
    assert!(
        !got.status.success() && got.stdout.len() < 3 << 20,
        "{:?}",
        got.status
    );
    assert_eq!(status_of(&file), "403");

    // Streams per link: a second download while one is in flight gets 429.
    let server = Thruserv::start(&["--web-relay", "--relay-max-streams", "1"]);
    let url = server.url();
    let id = rt.block_on(raw_host(&url, 64 << 20)).unwrap();
    let file = format!("http://{}/w/{id}/z.bin", server.addr);
    let mut slow = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "--limit-rate",
            "200K",
            &file,
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while metric(&server, "thruserv_relay_streams_active") < 1 {
        assert!(
            Instant::now() < deadline,
            "the first download did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_of(&file), "429");
    slow.kill().unwrap();
    slow.wait().unwrap();

    // Rate per link: 2 MiB at 1 MiB/s cannot take less than about a second (a lower bound,
    // so a slow machine cannot fail it).
    let server = Thruserv::start(&["--web-relay", "--relay-rate", "1MiB"]);
    let url = server.url();
    let id = rt.block_on(raw_host(&url, 2 << 20)).unwrap();
    let started = Instant::now();
    let got = curl(&["-f", &format!("http://{}/w/{id}/z.bin", server.addr)]);
    assert_eq!(got.stdout.len(), 2 << 20);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn slow_clients_are_cut_by_timeouts_and_links_expire() {
    let rt = runtime();
    let server = Thruserv::start(&[
        "--web-relay",
        "--relay-idle-timeout",
        "1s",
        "--handshake-timeout",
        "1s",
        "--relay-lifetime",
        "3s",
    ]);
    let url = server.url();
    // A request head that never ends is closed by the handshake deadline.
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    use std::io::{Read as _, Write as _};
    s.write_all(b"GET /w/abc HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = Vec::new();
    assert!(
        s.read_to_end(&mut buf).is_ok(),
        "a stalled request head was not cut"
    );
    // An upload that announces 1000 bytes, sends 10 and stalls is cut by the idle timeout.
    let dir = tempfile::tempdir().unwrap();
    let mut join = Proc::spawn(
        &[
            "join",
            "--json",
            "--web",
            "--plain",
            "--yes",
            "--out",
            dir.path().to_str().unwrap(),
            "--server",
            &url,
        ],
        &[],
    );
    let link = join.event("web_link");
    let upload = link["url"].as_str().unwrap().to_string();
    let path = upload.splitn(4, '/').nth(3).unwrap().to_string();
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        s,
        "PUT /{path}f.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
    )
    .unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    // The receiver saw the upload stop and kept nothing.
    assert_eq!(join.wait(), 1);
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    assert!(metric(&server, "thruserv_relay_streams_cut_total") >= 1);
    // A link ends at its lifetime, busy or not: its owner hears it and the link is 404.
    let id = rt.block_on(raw_host(&url, 10)).unwrap();
    let live = format!("http://{}/w/{id}/z.bin", server.addr);
    assert_eq!(status_of(&live), "200");
    let deadline = Instant::now() + PATIENCE;
    while status_of(&live) != "404" {
        assert!(
            Instant::now() < deadline,
            "the link outlived --relay-lifetime"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn fifty_concurrent_relays_stay_under_the_memory_bound() {
    let rt = runtime();
    // Streams count as handshakes until the handshake deadline: lift the per-IP cap so the
    // test's 50 readers from one address fit.
    let server = Thruserv::start(&[
        "--web-relay",
        "--relay-max-per-ip",
        "0",
        "--max-pending-per-ip",
        "0",
    ]);
    let url = server.url();
    let before = rss_bytes(server.pid());
    // 50 links, each with a download in flight whose reader never reads: every pipe fills
    // to its bound and the senders block.
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..50 {
            ids.push(raw_host(&url, 1 << 30).await.unwrap());
        }
        ids
    });
    let mut readers = Vec::new();
    for id in &ids {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        write!(s, "GET /w/{id}/z.bin HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        readers.push(s);
    }
    // Wait until the relay stops taking bytes (every pipe full), then measure.
    let mut last = u64::MAX;
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = metric(&server, "thruserv_relay_bytes_total");
        if now == last && metric(&server, "thruserv_relay_streams_active") == 50 {
            break;
        }
        assert!(Instant::now() < deadline, "the pipes never filled");
        last = now;
    }
    let rss = rss_bytes(server.pid());
    let grown = rss.saturating_sub(before);
    eprintln!(
        "50 stalled relays: thruserv RSS {} MiB (+{} MiB), {} MiB taken in",
        rss >> 20,
        grown >> 20,
        last >> 20
    );
    // The documented bound: under 2 MiB per stream.
    assert!(grown < 50 * (2 << 20), "relay memory grew by {grown} bytes");
    // The rest of the 50 GiB offered stayed on the senders' side.
    assert!(last < 1 << 30, "{last}");
    drop(readers);
}
