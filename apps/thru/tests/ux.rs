//! Issue 15 through real `thru` processes on loopback (LAN mode with `--peer`): what the
//! sender reports, the checks made before any network step, `--on-conflict`, and exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::process::{Command, Output, Stdio};

use common::{Proc, lan_host, lan_host_with, lan_join, thru_bin};
use serde_json::Value;

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
    let (mut host, peer, code) = lan_host_with(
        &[&src.path().join("new.bin"), &src.path().join("same.txt")],
        1,
        &["--benchmark"],
    );
    let mut joiner = lan_join(&peer, &code, out.path(), &["--yes", "--benchmark"]);

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
    // No rate before there is a second of data to average it over.
    if progress["elapsed_s"].as_f64().unwrap() < 1.0 {
        assert!(progress["rate_bytes_per_s"].is_null(), "{progress}");
        assert!(progress["eta_s"].is_null(), "{progress}");
    }
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
    let bench = joiner.event("benchmark");
    assert_eq!(bench["side"], "receiving", "{bench}");
    assert!(
        bench["peak_1s_gbit_s"].as_f64() >= bench["avg_gbit_s"].as_f64(),
        "average above the peak: {bench}"
    );
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
    let bench = host.event("benchmark");
    assert_eq!(bench["side"], "sending", "{bench}");
    assert_eq!(bench["bytes"], data.len() as u64, "{bench}");
    assert!(
        bench["peak_1s_gbit_s"].as_f64() >= bench["avg_gbit_s"].as_f64(),
        "average above the peak: {bench}"
    );
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
    // The user's file stays; the offered one is saved under a free name beside it.
    assert_eq!(fs::read(out.path().join("report.txt")).unwrap(), b"my copy");
    assert_eq!(
        fs::read(out.path().join("report (1).txt")).unwrap(),
        b"new version"
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

/// A TCP port on loopback with nothing listening.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const CODE: &str = "K7QF2M-XD4P-RT9A";

/// Each error is said once, with a hint where there is a likely cause; a server URL without
/// its scheme is a usage error; mDNS finding nothing says what to try.
#[test]
fn errors_are_said_once_with_a_hint() {
    let url = format!("ws://127.0.0.1:{}", closed_port());
    let o = thru(&["join", CODE, "--yes", "--server", &url]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(
        err.matches("cannot connect to").count(),
        1,
        "said twice: {err}"
    );
    assert!(
        err.contains(&format!(
            "hint: is thruserv running at {url}? is the URL right?"
        )),
        "{err}"
    );
    let o = thru(&["join", CODE, "--yes", "--json", "--server", &url]);
    let (out, err) = text(&o);
    // Under --json, stderr carries logs only (none at the default level here).
    assert_eq!(err, "", "{err}");
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error", "{last}");
    assert!(
        last["hint"]
            .as_str()
            .unwrap()
            .contains("is thruserv running"),
        "{last}"
    );

    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["join", CODE, "--yes", "--server", "127.0.0.1:9"],
        vec![
            "host",
            dir.path().to_str().unwrap(),
            "--server",
            "127.0.0.1:9",
        ],
    ] {
        let o = thru(&args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("scheme") && err.contains("ws://127.0.0.1:9"),
            "{err}"
        );
    }

    // mDNS on loopback only (no multicast leaves the machine) finds nothing.
    let o = thru(&[
        "join",
        CODE,
        "--yes",
        "--mdns-interface",
        "lo",
        "--pair-timeout",
        "1s",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("did the host use --server?") && err.contains("--peer"),
        "{err}"
    );
}

/// A server that rate limits says when to retry.
#[test]
fn rate_limited_says_when_to_retry() {
    use std::io::{BufRead, BufReader};
    let mut server = Command::new(common::thruserv_bin())
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--ws-connects-per-min",
            "1",
            "--ws-connects-burst",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.split_whitespace().nth(2).unwrap().to_string();
    let url = format!("ws://{addr}");
    let mut said = None;
    let mut seen = Vec::new();
    // The first connect spends the budget; a later one is refused.
    for _ in 0..3 {
        let o = thru(&["join", CODE, "--yes", "--server", &url]);
        let (_, err) = text(&o);
        if err.contains("retry in") {
            said = Some((o.status.code(), err));
            break;
        }
        seen.push(err);
    }
    let _ = server.kill();
    let _ = server.wait();
    let (code, err) = said.unwrap_or_else(|| panic!("never rate limited: {seen:?}"));
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("hint: the server is rate limiting this address; retry in 60 s"),
        "{err}"
    );
}

/// Logs carry no colour codes when stderr is not a terminal; `-q` leaves only errors.
#[test]
fn logs_are_plain_and_quiet_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), b"x").unwrap();
    let f = dir.path().join("f");
    // A host with debug logs, stopped once it has logged; stderr is a pipe.
    let mut host = Command::new(thru_bin())
        .args(["host", "--no-mdns", "--port", "0", f.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, BufReader};
        let mut first = String::new();
        BufReader::new(host.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
    }
    let _ = host.kill();
    let out = host.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG"), "debug logs expected: {err}");
    assert!(!err.contains('\u{1b}'), "ANSI codes in a log file: {err:?}");

    // -q: the host prints its code (stdout) and nothing on stderr.
    let mut host = Command::new(thru_bin())
        .args([
            "-q",
            "host",
            "--no-mdns",
            dir.path().join("f").to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::{BufRead, BufReader};
        BufReader::new(host.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
    }
    assert!(first.starts_with("Join code: "), "{first}");
    let _ = host.kill();
    let out = host.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "-q printed on stderr"
    );
}

/// The config file: `thru config` shows each value and its origin, TURN passwords hidden;
/// and `thru join` uses flag > environment > file > default (the URL it fails to reach says
/// which one won).
#[test]
fn config_file_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let (p_file, p_env, p_flag) = (closed_port(), closed_port(), closed_port());
    fs::write(
        &cfg,
        format!(
            "server = \"ws://127.0.0.1:{p_file}\"\nturn_servers = [\"turn:me:Pw0rd@127.0.0.1:3478\"]\non_conflict = \"rename\"\n"
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(thru_bin())
            .args(args)
            .env("THRU_CONFIG", cfg_s)
            .env_remove("THRU_SERVER_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let (out, _) = text(&run(&["config"], &[]));
    assert!(out.contains(&format!("config file: {cfg_s}")), "{out}");
    assert!(
        out.contains(&format!(
            "server        = ws://127.0.0.1:{p_file}  (file {cfg_s})"
        )),
        "{out}"
    );
    assert!(out.contains("on_conflict   = rename  (file"), "{out}");
    assert!(out.contains("out           = .  (default)"), "{out}");
    assert!(
        out.contains("turn:me:***@127.0.0.1:3478") && !out.contains("Pw0rd"),
        "{out}"
    );
    let env_url = format!("ws://127.0.0.1:{p_env}");
    let (out, _) = text(&run(&["config"], &[("THRU_SERVER_URL", &env_url)]));
    assert!(
        out.contains(&format!("= {env_url}  (env THRU_SERVER_URL)")),
        "{out}"
    );

    let reached = |o: Output| {
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(3), "{err}");
        err
    };
    let err = reached(run(&["join", CODE, "--yes"], &[]));
    assert!(err.contains(&format!("127.0.0.1:{p_file}")), "file: {err}");
    let err = reached(run(
        &["join", CODE, "--yes"],
        &[("THRU_SERVER_URL", &env_url)],
    ));
    assert!(
        err.contains(&format!("127.0.0.1:{p_env}")),
        "env over file: {err}"
    );
    let flag_url = format!("ws://127.0.0.1:{p_flag}");
    let err = reached(run(
        &["join", CODE, "--yes", "--server", &flag_url],
        &[("THRU_SERVER_URL", &env_url)],
    ));
    assert!(
        err.contains(&format!("127.0.0.1:{p_flag}")),
        "flag over env: {err}"
    );

    // A typo in the file is an error naming it, not ignored.
    fs::write(&cfg, "sever = \"ws://x\"\n").unwrap();
    let o = run(&["config"], &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(cfg_s) && err.contains("sever"), "{err}");
}

/// With a server in the config file, `thru host FILE` and `thru join CODE` need no flags.
#[test]
fn a_configured_server_needs_no_flags() {
    let server = common::Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let out = dir.path().join("in");
    fs::write(
        &cfg,
        format!(
            "server = \"{}\"\nout = \"{}\"\n",
            server.url(),
            out.display()
        ),
    )
    .unwrap();
    let f = dir.path().join("f.txt");
    fs::write(&f, b"through the configured server").unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let env = [("THRU_CONFIG", cfg_s)];
    let mut host = Proc::spawn(&["host", "--json", f.to_str().unwrap()], &env);
    let code = host.event("code");
    assert_eq!(code["mode"], "server", "{code}");
    let code = code["code"].as_str().unwrap().to_string();
    let mut joiner = Proc::spawn(&["join", "--json", "--yes", &code], &env);
    assert_eq!(joiner.wait(), 0);
    assert_eq!(host.wait(), 0);
    assert_eq!(
        fs::read(out.join("f.txt")).unwrap(),
        b"through the configured server"
    );
}

/// `thru host --words` prints the word form; a joiner typing three letters a word gets the
/// files.
#[test]
fn word_codes_work_with_three_letters_a_word() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = src.path().join("spoken.txt");
    fs::write(&f, b"read aloud").unwrap();
    let (mut host, peer, code) = lan_host_with(&[&f], 1, &["--words"]);
    let parts: Vec<&str> = code.split('-').collect();
    assert_eq!(parts.len(), 6, "routing part and five words: {code}");
    let typed: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 0 {
                p.to_string()
            } else {
                p[..3].to_string()
            }
        })
        .collect();
    let mut joiner = lan_join(&peer, &typed.join(" "), out.path(), &["--yes"]);
    assert_eq!(joiner.wait(), 0);
    assert_eq!(host.wait(), 0);
    assert_eq!(
        fs::read(out.path().join("spoken.txt")).unwrap(),
        b"read aloud"
    );
}
