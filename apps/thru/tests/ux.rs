//! Issue 15 through real `thru` processes on loopback (LAN mode with `--peer`): what the
//! sender reports, the checks made before any network step, `--on-conflict`, and exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Proc, thru_bin};
use serde_json::Value;

/// A LAN `--json` host of `paths` serving `receivers`; returns it, its `--peer` and code.
fn lan_host(paths: &[&Path], receivers: u32) -> (Proc, String, String) {
    let n = receivers.to_string();
    let mut args = vec!["host", "--json", "--no-mdns", "--max-receivers", &n];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let host = Proc::spawn(&args, &[]);
    let start = host.event("start");
    assert_eq!(start["schema"], thru::ui::JSON_SCHEMA, "{start}");
    // What is offered comes before the code.
    let offering = host.event("offering");
    assert!(offering["files"].as_u64().unwrap() >= 1, "{offering}");
    let code = host.event("code");
    let port = code["peer_hint"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1;
    (
        host,
        format!("127.0.0.1:{port}"),
        code["code"].as_str().unwrap().to_string(),
    )
}

fn lan_join(peer: &str, code: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "join",
        "--json",
        "--out",
        out.to_str().unwrap(),
        "--peer",
        peer,
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args, &[("THRU_CODE", code)])
}

/// Runs `thru` to completion with stdin from /dev/null.
fn thru(args: &[&str]) -> Output {
    Command::new(thru_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The sender reports acceptance, each file, and a summary that tells up-to-date files apart
/// from bytes sent; the timer starts at acceptance; one summary per receiver and one overall.
#[test]
fn sender_reports_what_actually_moved() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(src.path().join("new.bin"), &data).unwrap();
    fs::write(src.path().join("same.txt"), b"held already").unwrap();
    fs::write(out.path().join("same.txt"), b"held already").unwrap();
    let (mut host, peer, code) = lan_host(
        &[&src.path().join("new.bin"), &src.path().join("same.txt")],
        1,
    );
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes"]);

    // The joiner: schema first, a complete offer, progress with rate, ETA and time.
    let first: Value = serde_json::from_str(&joiner.line()).unwrap();
    assert_eq!(first["event"], "start", "the first event: {first}");
    assert_eq!(first["schema"], thru::ui::JSON_SCHEMA);
    let offer = joiner.event("offer");
    let entries = offer["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["path"] == "new.bin"
            && e["size"] == data.len() as u64
            && e["kind"] == "file"),
        "{offer}"
    );
    let progress = joiner.event("progress");
    for key in [
        "sent_bytes",
        "rate_bytes_per_s",
        "eta_s",
        "elapsed_s",
        "ts_ms",
        "overall_total",
    ] {
        assert!(progress.get(key).is_some(), "{key} missing: {progress}");
    }
    let sum = joiner.event("summary");
    assert_eq!(sum["side"], "receiving", "{sum}");
    assert_eq!(sum["files"], 2, "{sum}");
    assert_eq!(sum["up_to_date"], 1, "{sum}");
    assert_eq!(joiner.wait(), 0);

    // The host: what it offers, the acceptance, each file, the truth about what moved.
    let accepted = host.event("accepted");
    assert_eq!(accepted["peer"], "joiner 1", "{accepted}");
    let mut done = Vec::new();
    let sum = loop {
        let v: Value = serde_json::from_str(&host.line()).unwrap();
        match v["event"].as_str().unwrap() {
            "file_done" => done.push(v),
            "summary" => break v,
            _ => {}
        }
    };
    assert_eq!(done.len(), 2, "a file_done per file: {done:?}");
    assert!(
        done.iter()
            .any(|d| d["file"] == "same.txt" && d["up_to_date"] == true),
        "{done:?}"
    );
    assert_eq!(sum["side"], "sending", "{sum}");
    assert_eq!(sum["files"], 2, "{sum}");
    assert_eq!(sum["up_to_date"], 1, "{sum}");
    assert_eq!(
        sum["sent_bytes"],
        data.len() as u64,
        "only new.bin moved: {sum}"
    );
    assert_eq!(sum["resumed_bytes"], 0, "{sum}");
    let overall = host.event("host_summary");
    assert_eq!(overall["receivers_done"], 1, "{overall}");
    assert_eq!(overall["sent_bytes"], data.len() as u64, "{overall}");
    // The default is one receiver: the host is done.
    assert_eq!(host.wait(), 0);
}

/// `--on-conflict skip|rename|overwrite` against one host serving three joiners in turn.
#[test]
fn conflicts_are_skipped_renamed_or_overwritten() {
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("report.txt");
    fs::write(&f, b"new version").unwrap();
    let (mut host, peer, code) = lan_host(&[&f], 3);
    let run = |policy: &str| {
        let out = tempfile::tempdir().unwrap();
        fs::write(out.path().join("report.txt"), b"my copy").unwrap();
        let mut j = lan_join(
            &peer,
            &code,
            out.path(),
            &["--yes", "--on-conflict", policy],
        );
        assert_eq!(j.wait(), 0, "--on-conflict {policy}");
        out
    };
    let out = run("skip");
    assert_eq!(fs::read(out.path().join("report.txt")).unwrap(), b"my copy");
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        1,
        "nothing left behind"
    );
    let out = run("rename");
    assert_eq!(
        fs::read(out.path().join("report.txt")).unwrap(),
        b"new version"
    );
    assert_eq!(
        fs::read(out.path().join("report (1).txt")).unwrap(),
        b"my copy"
    );
    let out = run("overwrite");
    assert_eq!(
        fs::read(out.path().join("report.txt")).unwrap(),
        b"new version"
    );
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        1,
        "no backup left"
    );
    assert_eq!(host.wait(), 0);
}

/// Problems found before any network step exit 2 and name what is wrong. The `--peer` given
/// would fail pairing (exit 3): getting 2 shows nothing was tried on the network.
#[test]
fn local_problems_are_found_before_pairing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let under_file = file.join("sub");
    let unreachable = ["--peer", "127.0.0.1:1", "--pair-timeout", "2s"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--out", dir.path().to_str().unwrap()],
            "no terminal to ask on; pass --yes",
        ),
        (
            vec!["--json", "--out", dir.path().to_str().unwrap()],
            "pass --yes",
        ),
        (vec!["--yes", "--out", file.to_str().unwrap()], "is a file"),
        (
            vec!["--yes", "--out", under_file.to_str().unwrap()],
            "Not a directory",
        ),
    ];
    for (extra, says) in cases {
        let mut args = vec!["join", "K7QF2M-XD4P-RT9A"];
        args.extend(&extra);
        args.extend(&unreachable);
        let o = thru(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {text}");
        assert!(text.contains(says), "{extra:?}: {text}");
    }
    // A --out join would create is not left behind when pairing fails.
    let new = dir.path().join("x/y");
    let o = thru(&[
        "join",
        "K7QF2M-XD4P-RT9A",
        "--yes",
        "--out",
        new.to_str().unwrap(),
        "--peer",
        "127.0.0.1:1",
        "--pair-timeout",
        "2s",
    ]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        !dir.path().join("x").exists(),
        "the created --out was removed"
    );
}
