//! Issue 14, sections 1-3, through real `thru` processes, on the LAN (`--peer`, no mDNS) and
//! through a real `thruserv`: `--text`, zstd compression (`--compress`), and pipes
//! (`thru host -`, `thru join --out -`).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Proc, Thruserv, thru_bin};
use serde_json::Value;

/// A `--json` host through `server` (or on the LAN when `None`) with `args`, and what a
/// joiner needs: `--peer ADDR` on the LAN, `--server URL` otherwise, and the code.
fn host(server: Option<&Thruserv>, args: &[&str], stdin: Option<&[u8]>) -> (Proc, Vec<String>) {
    let (h, j, _) = host_offering(server, args, stdin);
    (h, j)
}

/// [`host`], with the host's `offering` event.
fn host_offering(
    server: Option<&Thruserv>,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (Proc, Vec<String>, Value) {
    let mut all: Vec<String> = vec!["host".into(), "--json".into()];
    match server {
        Some(s) => all.extend(["--server".into(), s.url()]),
        None => all.push("--no-mdns".into()),
    }
    all.extend(args.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let host = Proc::spawn_with_stdin(&refs, &[], stdin);
    let offering = host.event("offering");
    let code = host.event("code");
    let mut join = match server {
        Some(s) => vec!["--server".to_string(), s.url()],
        None => {
            let port = code["peer_hint"]
                .as_str()
                .unwrap()
                .rsplit_once(':')
                .unwrap()
                .1
                .to_string();
            vec!["--peer".to_string(), format!("127.0.0.1:{port}")]
        }
    };
    join.push(code["code"].as_str().unwrap().to_string());
    (host, join, offering)
}

/// A `thru join` with `args` (`--json` or not) whose whole stdout is returned with the exit
/// code.
fn join_output(args: &[String]) -> (i32, Vec<u8>, String) {
    let out = Command::new(thru_bin())
        .arg("join")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event<'a>(evs: &'a [Value], name: &str) -> &'a Value {
    evs.iter()
        .find(|e| e["event"] == name)
        .unwrap_or_else(|| panic!("no {name} event in {evs:?}"))
}

const MESSAGE: &str = "Meet at the café at 6.\n\tBring the \u{1b}[31mred\u{1b}[0m folder.\n";

#[test]
fn text_arrives_on_stdout_on_the_lan_and_through_thruserv() {
    let server = Thruserv::start(&[]);
    for srv in [None, Some(&server)] {
        // Human mode, --yes: stdout is exactly the text (a pipe gets it unescaped).
        let (mut h, mut j, offering) = host_offering(srv, &["--text", MESSAGE], None);
        assert_eq!(offering["text_bytes"], MESSAGE.len());
        j.push("--yes".into());
        let (code, stdout, stderr) = join_output(&j);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(String::from_utf8(stdout).unwrap(), MESSAGE);
        assert_eq!(h.wait(), 0);

        // --json: a `text` event, and `--text -` reads the host's stdin.
        let (mut h, mut j) = host(srv, &["--text", "-"], Some(MESSAGE.as_bytes()));
        j.extend(["--yes".into(), "--json".into()]);
        let (code, stdout, stderr) = join_output(&j);
        assert_eq!(code, 0, "{stderr}");
        let evs = events(&stdout);
        let t = event(&evs, "text");
        assert_eq!(t["text"], MESSAGE);
        assert_eq!(t["bytes"], MESSAGE.len());
        assert_eq!(h.wait(), 0);
    }
}

#[test]
fn text_needs_an_answer_and_a_refusal_reaches_the_host() {
    let (mut h, j) = host(None, &["--text", "secret"], None);
    // No terminal and no --yes: a usage error found before pairing.
    let (code, stdout, _) = join_output(&j);
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    // The code is not used up: a joiner with --yes still gets it.
    let mut j = j;
    j.push("--yes".into());
    let (code, stdout, stderr) = join_output(&j);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, b"secret");
    assert_eq!(h.wait(), 0);
}

#[test]
fn text_over_64_kib_is_a_usage_error() {
    let big = "x".repeat(64 * 1024 + 1);
    for (args, stdin) in [
        (vec!["host", "--text", big.as_str()], None),
        (vec!["host", "--text", "-"], Some(big.as_bytes())),
    ] {
        let mut child = Command::new(thru_bin())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            let _ = input.write_all(s);
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("64 KiB"), "{err}");
    }
    // Exactly 64 KiB is fine (it is offered: the code appears).
    let ok = "y".repeat(64 * 1024);
    let (h, _) = host(None, &["--text", &ok], None);
    drop(h);
}

fn compressible(path: &Path, bytes: usize) {
    let mut s = String::with_capacity(bytes + 100);
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            "2026-12-07T12:{:02}:{:02}Z INFO request id={i} path=/api/v1/items/{} status=200 ms={}\n",
            i / 60 % 60,
            i % 60,
            i % 977,
            i % 31
        ));
        i += 1;
    }
    s.truncate(bytes);
    fs::write(path, s).unwrap();
}

fn random(path: &Path, bytes: usize) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    fs::write(path, data).unwrap();
}

/// Sends `file` with `compress` and returns both sides' summaries.
fn send(server: Option<&Thruserv>, file: &Path, compress: &str) -> (Value, Value) {
    let (mut h, j) = host(
        server,
        &["--compress", compress, file.to_str().unwrap()],
        None,
    );
    let out = tempfile::tempdir().unwrap();
    let mut args = j;
    args.extend([
        "--yes".into(),
        "--json".into(),
        "--out".into(),
        out.path().to_str().unwrap().into(),
    ]);
    let (code, stdout, stderr) = join_output(&args);
    assert_eq!(code, 0, "{stderr}");
    let name = file.file_name().unwrap();
    assert_eq!(
        fs::read(out.path().join(name)).unwrap(),
        fs::read(file).unwrap()
    );
    let joiner = event(&events(&stdout), "summary").clone();
    let host_summary = h.event("summary");
    assert_eq!(h.wait(), 0);
    (host_summary, joiner)
}

#[test]
fn compression_pays_on_text_and_stays_off_for_random_data_lan_and_thruserv() {
    let server = Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("app.log");
    compressible(&text, 12 << 20);
    let noise = dir.path().join("noise.bin");
    random(&noise, 6 << 20);
    for srv in [None, Some(&server)] {
        let (h, j) = send(srv, &text, "auto");
        for s in [&h, &j] {
            let (bytes, wire) = (
                s["sent_bytes"].as_u64().unwrap(),
                s["wire_bytes"].as_u64().unwrap(),
            );
            assert_eq!(bytes, 12 << 20, "{s}");
            assert!(wire * 3 < bytes, "auto should compress a log: {s}");
        }
        let (h, j) = send(srv, &text, "off");
        for s in [&h, &j] {
            assert_eq!(s["wire_bytes"], s["sent_bytes"], "{s}");
        }
        let (h, j) = send(srv, &noise, "auto");
        for s in [&h, &j] {
            assert_eq!(
                s["wire_bytes"], s["sent_bytes"],
                "random data is never compressed: {s}"
            );
        }
        let (h, _) = send(srv, &noise, "on");
        // `on` tries every chunk, and still sends none that would not shrink.
        assert_eq!(h["wire_bytes"], h["sent_bytes"], "{h}");
    }
}

#[test]
fn a_file_received_compressed_is_then_skipped_as_identical() {
    // Chunk hashes are over plain bytes: what arrived compressed is recognised as identical
    // by a host that sends plain, and nothing is sent again.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("same.log");
    compressible(&text, 4 << 20);
    let out = tempfile::tempdir().unwrap();
    let mut summaries = Vec::new();
    for compress in ["on", "off"] {
        let (mut h, j) = host(
            None,
            &["--compress", compress, text.to_str().unwrap()],
            None,
        );
        let mut args = j;
        args.extend([
            "--yes".into(),
            "--json".into(),
            "--out".into(),
            out.path().to_str().unwrap().into(),
        ]);
        let (code, stdout, stderr) = join_output(&args);
        assert_eq!(code, 0, "{stderr}");
        summaries.push(event(&events(&stdout), "summary").clone());
        assert_eq!(h.wait(), 0);
    }
    assert!(
        summaries[0]["wire_bytes"].as_u64().unwrap() < (1 << 20),
        "{}",
        summaries[0]
    );
    assert_eq!(summaries[1]["up_to_date"], 1, "{}", summaries[1]);
    assert_eq!(summaries[1]["sent_bytes"], 0, "{}", summaries[1]);
    assert_eq!(
        fs::read(out.path().join("same.log")).unwrap(),
        fs::read(&text).unwrap()
    );
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn out_dash_writes_a_single_file_to_stdout_lan_and_thruserv() {
    let server = Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    // Several chunks, compressible in part: order and decompression both matter.
    let mut data = Vec::new();
    compressible(&file, 6 << 20);
    data.extend(fs::read(&file).unwrap());
    random(&dir.path().join("tail"), 5 << 20);
    data.extend(fs::read(dir.path().join("tail")).unwrap());
    fs::write(&file, &data).unwrap();
    for srv in [None, Some(&server)] {
        let (mut h, mut j) = host(
            srv,
            &["--chunk-size", "256KiB", file.to_str().unwrap()],
            None,
        );
        j.extend(["--yes".into(), "--out".into(), "-".into()]);
        let (code, stdout, stderr) = join_output(&j);
        assert_eq!(code, 0, "{stderr}");
        // `thru join --out - | sha256sum`: the same digest as the file's.
        assert_eq!(sha256(&stdout), sha256(&data));
        assert_eq!(h.wait(), 0);
    }
}

#[test]
fn out_dash_refuses_a_multi_file_offer_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), b"one").unwrap();
    fs::write(dir.path().join("b"), b"two").unwrap();
    let (mut h, mut j) = host(None, &[dir.path().to_str().unwrap()], None);
    j.extend(["--yes".into(), "--out".into(), "-".into()]);
    let (code, stdout, stderr) = join_output(&j);
    assert_eq!(code, 4, "{stderr}");
    assert!(stdout.is_empty(), "{}", String::from_utf8_lossy(&stdout));
    assert!(stderr.contains("--out - writes a single file"), "{stderr}");
    assert_eq!(h.wait(), 4);
    // --json and --out - both want stdout: a usage error before pairing.
    let out = Command::new(thru_bin())
        .args([
            "join",
            "--json",
            "--yes",
            "--out",
            "-",
            "--peer",
            "127.0.0.1:9",
        ])
        .env("THRU_CODE", "K7QF2M-XD4P-RT9A")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Bytes that are neither all text nor all noise, of a length that is no multiple of the
/// chunk size: the last chunk of the stream is short.
fn stream_bytes(dir: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    compressible(&dir.join("text"), 3 << 20);
    data.extend(fs::read(dir.join("text")).unwrap());
    random(&dir.join("noise"), (5 << 20) + 12_345);
    data.extend(fs::read(dir.join("noise")).unwrap());
    data
}

#[test]
fn stdin_streams_into_join_out_dash_and_into_a_directory_lan_and_thruserv() {
    let server = Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let data = stream_bytes(dir.path());
    for srv in [None, Some(&server)] {
        // `cat big | thru host -` into `thru join --out - | sha256sum`: stdin is a pipe the
        // host reads as it goes (its size is never given).
        let (mut h, mut j, offering) =
            host_offering(srv, &["--chunk-size", "256KiB", "-"], Some(&data));
        assert_eq!(
            offering["bytes"], 0,
            "a stream's size is unknown: {offering}"
        );
        j.extend(["--yes".into(), "--out".into(), "-".into()]);
        let (code, stdout, stderr) = join_output(&j);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(sha256(&stdout), sha256(&data));
        assert_eq!(h.wait(), 0);

        // Into a directory, under --name.
        let out = tempfile::tempdir().unwrap();
        let (mut h, mut j) = host(
            srv,
            &["--chunk-size", "256KiB", "--name", "dump.bin", "-"],
            Some(&data),
        );
        j.extend([
            "--json".into(),
            "--yes".into(),
            "--out".into(),
            out.path().to_str().unwrap().into(),
        ]);
        let (code, stdout, stderr) = join_output(&j);
        assert_eq!(code, 0, "{stderr}");
        let got = fs::read(out.path().join("dump.bin")).unwrap();
        assert!(
            got == data,
            "received {} bytes, sent {}",
            got.len(),
            data.len()
        );
        let evs = events(&stdout);
        assert_eq!(event(&evs, "summary")["bytes"], data.len() as u64);
        assert_eq!(h.wait(), 0);
    }
}

#[test]
fn an_empty_stdin_arrives_as_an_empty_file() {
    let out = tempfile::tempdir().unwrap();
    let (mut h, mut j) = host(None, &["-"], Some(b""));
    j.extend([
        "--yes".into(),
        "--out".into(),
        out.path().to_str().unwrap().into(),
    ]);
    let (code, _, stderr) = join_output(&j);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(fs::read(out.path().join("stdin")).unwrap(), b"");
    assert_eq!(h.wait(), 0);
}

#[test]
fn stdin_misuse_is_a_usage_error_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    for (args, says) in [
        (vec!["-", f], "must be the only path"),
        (vec!["--name", "x", f], "--name names the stream"),
        (vec!["--name", "../x", "-"], "--name"),
        (vec!["--name", "a/b", "-"], "not a path"),
        (vec!["--max-receivers", "2", "-"], "one receiver"),
    ] {
        let out = Command::new(thru_bin())
            .args(["host", "--no-mdns"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn an_interrupted_stream_says_it_cannot_be_resumed() {
    // The host's stdin stays open after 3 MiB (the writer is still "busy"), then the host is
    // killed: the joiner, mid-stream, must say the stream cannot be resumed rather than
    // suggest `thru join` again.
    let mut host = Command::new(thru_bin())
        .args(["host", "--json", "--no-mdns", "--chunk-size", "256KiB", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = host.stdin.take().unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(host.stdout.take().unwrap()));
    let mut code = None;
    for l in lines.map_while(Result::ok) {
        let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
        if v["event"] == "code" {
            code = Some(v);
            break;
        }
    }
    let code = code.unwrap();
    let port = code["peer_hint"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1;
    let out = tempfile::tempdir().unwrap();
    let joiner = Command::new(thru_bin())
        .args(["join", "--yes", "--peer", &format!("127.0.0.1:{port}")])
        .arg(code["code"].as_str().unwrap())
        .arg("--out")
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    input.write_all(&vec![7u8; 3 << 20]).unwrap();
    // Until the joiner holds some of it (bounded by PATIENCE, never a speed check).
    let part = out.path().join(".stdin.thrupart");
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while fs::metadata(&part).map_or(0, |m| m.len()) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing arrived");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    host.kill().unwrap();
    let _ = host.wait();
    let res = joiner.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_ne!(res.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cannot be resumed"), "{stderr}");
    assert!(
        !out.path().join("stdin").exists(),
        "an unfinished stream was put in place"
    );
}
