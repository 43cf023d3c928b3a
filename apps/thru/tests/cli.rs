//! The real `thru` binary: generated completions and man page, version, exit codes, JSON
//! events, and pairing between two `thru` processes (LAN with `--peer`, and through a real
//! `thruserv`).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::{PATIENCE, Proc, Thruserv, thru_bin};
use serde_json::Value;

fn thru(args: &[&str]) -> Output {
    Command::new(thru_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Every long flag and subcommand name in the clap definition, recursively.
fn all_names() -> (Vec<String>, Vec<String>) {
    fn walk(cmd: &clap::Command, flags: &mut Vec<String>, subs: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if let Some(l) = a.get_long() {
                flags.push(format!("--{l}"));
            }
        }
        for s in cmd.get_subcommands() {
            subs.push(s.get_name().to_string());
            walk(s, flags, subs);
        }
    }
    let (mut flags, mut subs) = (Vec::new(), Vec::new());
    walk(&thru::cli::command(), &mut flags, &mut subs);
    flags.sort();
    flags.dedup();
    subs.sort();
    subs.dedup();
    (flags, subs)
}

#[test]
fn completions_name_every_subcommand_and_flag() {
    let (flags, subs) = all_names();
    for want in [
        "--server",
        "--stun-server",
        "--turn-server",
        "--quic-conn-window-bytes",
        "--quic-stream-window-bytes",
        "--quic-max-incoming-streams",
        "--chunk-size",
        "--parallel-files",
        "--max-receivers",
        "--out",
        "--benchmark",
        "--version",
        "--verbose",
        "--io-driver",
        "--cores",
        "--yes",
        "--force",
        "--keep-modes",
        "--json",
        "--peer",
    ] {
        assert!(flags.iter().any(|f| f == want), "{want} is not defined");
    }
    for sub in ["host", "join", "completions", "man"] {
        assert!(subs.iter().any(|s| s == sub), "{sub}");
    }
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = thru(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for f in &flags {
            // fish writes long flags as `-l name`.
            let found = text.contains(f.as_str())
                || text.contains(&format!("-l {}", f.trim_start_matches("--")));
            assert!(found, "{shell} completion lacks {f}");
        }
        for s in &subs {
            assert!(text.contains(s.as_str()), "{shell} completion lacks {s}");
        }
    }
}

#[test]
fn man_page_documents_every_subcommand_flag_and_exit_code() {
    let out = thru(&["man"]);
    assert!(out.status.success());
    // roff escapes '-' as '\-'.
    let text = String::from_utf8(out.stdout).unwrap().replace("\\-", "-");
    assert!(text.starts_with(".ie") || text.contains(".TH"), "not roff");
    let (flags, subs) = all_names();
    for f in &flags {
        assert!(text.contains(f.as_str()), "man page lacks {f}");
    }
    for s in &subs {
        assert!(
            text.contains(&format!("thru-{s}")),
            "man page lacks thru-{s}"
        );
    }
    assert!(
        text.contains("THRU_CODE"),
        "environment variables are listed"
    );
    assert!(text.contains("conflict"), "exit codes are listed");
}

#[test]
fn version_and_help() {
    // -V as in clap and ripgrep; -v is --verbose (issue 15).
    for flag in ["-V", "--version"] {
        let out = thru(&[flag]);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("thru {}", env!("CARGO_PKG_VERSION"))
        );
    }
    let out = thru(&["-v", "config"]);
    assert!(out.status.success(), "-v is verbose, not the version");
    let out = thru(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Exit codes:"), "{text}");
    assert!(text.contains("Examples:"), "{text}");
    // Options grouped under headings, and the habits' aliases.
    let join = String::from_utf8(thru(&["receive", "--help"]).stdout).unwrap();
    for heading in ["Basics:", "Network:", "Tuning:", "Output:", "Examples:"] {
        assert!(join.contains(heading), "{heading} missing: {join}");
    }
    assert!(
        text.contains("[alias: send]") && text.contains("[alias: receive]"),
        "{text}"
    );
}

/// `thru man DIR` writes one page per subcommand, and every page `thru.1` refers to exists.
#[test]
fn man_writes_every_page_it_refers_to() {
    let dir = tempfile::tempdir().unwrap();
    let out = thru(&["man", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let main = std::fs::read_to_string(dir.path().join("thru.1")).unwrap();
    let mut refs = 0;
    for word in main.split(|c: char| !(c.is_ascii_alphanumeric() || c == '\\' || c == '-')) {
        if let Some(sub) = word.strip_prefix("thru\\-").filter(|s| !s.is_empty()) {
            refs += 1;
            assert!(
                dir.path().join(format!("thru-{sub}.1")).exists(),
                "thru.1 refers to thru-{sub}(1), which was not written"
            );
        }
    }
    assert!(refs >= 4, "thru.1 names its subcommands' pages: {main}");
    for sub in ["host", "join", "config", "man", "completions"] {
        let page = std::fs::read_to_string(dir.path().join(format!("thru-{sub}.1"))).unwrap();
        assert!(page.contains(".TH"), "thru-{sub}.1 is a man page");
    }
}

#[test]
fn usage_errors_exit_2_and_say_what_is_wrong() {
    let cases: &[(&[&str], &str)] = &[
        (&["join", "K7QF2M-XD4P"], "14 characters"),
        (&["join", "K7QU2M-XD4P-RT9A"], "'U'"),
        (&["join"], "THRU_CODE"),
        (&["host"], "PATH"),
        (&["host", "/definitely/not/here"], "/definitely/not/here"),
        (&["host", ".", "--chunk-size", "1KiB"], "256KiB"),
        (&["join", "--no-mdns", "K7QF2M-XD4P-RT9A"], "--peer"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let out = thru(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn unreachable_peer_is_a_pairing_failure_exit_3_with_a_json_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(thru_bin())
        .args([
            "join",
            "--json",
            "--yes",
            "--peer",
            &format!("127.0.0.1:{port}"),
        ])
        .env("THRU_CODE", "K7QF2M-XD4P-RT9A")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit_code"], 3);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the host"),
        "{last}"
    );
}

/// Both processes report the other's fingerprint, the joiner receives, and both exit 0 with a
/// summary.
fn assert_paired_then_transferred(host: &mut Proc, joiner: &mut Proc) {
    let jp = joiner.event("peer");
    let hp = host.event("peer");
    assert_eq!(jp["fingerprint"], hp["local_fingerprint"]);
    assert_eq!(hp["fingerprint"], jp["local_fingerprint"]);
    assert_eq!(hp["peer"], "joiner 1");
    for p in [&mut *joiner, &mut *host] {
        let sum = p.event("summary");
        assert_eq!(sum["route"], "lan_direct", "{sum}");
        assert_eq!(p.wait(), 0);
    }
}

#[test]
fn two_processes_pair_on_the_lan_with_peer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--no-mdns",
            "--max-receivers",
            "1",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let code = host.event("code");
    let hint = code["peer_hint"].as_str().unwrap();
    let port = hint.rsplit_once(':').unwrap().1;
    let mut joiner = Proc::spawn(
        &[
            "join",
            "--json",
            "--yes",
            "--out",
            out.path().to_str().unwrap(),
            "--peer",
            &format!("127.0.0.1:{port}"),
        ],
        &[("THRU_CODE", code["code"].as_str().unwrap())],
    );
    assert_paired_then_transferred(&mut host, &mut joiner);
    assert_eq!(std::fs::read(out.path().join("f")).unwrap(), b"x");
}

#[test]
fn two_processes_pair_through_thruserv() {
    let server = Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g"), b"through the server").unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--max-receivers",
            "1",
            dir.path().to_str().unwrap(),
        ],
        &[("THRU_SERVER_URL", server.url().as_str())],
    );
    let code = host.event("code");
    assert_eq!(code["mode"], "server");
    let mut joiner = Proc::spawn(
        &[
            "join",
            "--json",
            "--yes",
            "--out",
            out.path().to_str().unwrap(),
            "--server",
            &server.url(),
            code["code"].as_str().unwrap(),
        ],
        &[],
    );
    assert_paired_then_transferred(&mut host, &mut joiner);
    let name = dir.path().file_name().unwrap();
    assert_eq!(
        std::fs::read(out.path().join(name).join("g")).unwrap(),
        b"through the server"
    );
}

#[test]
fn wrong_code_ends_both_processes_with_exit_3() {
    let server = Thruserv::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--server",
            &server.url(),
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    let code = host.event("code");
    let code = code["code"].as_str().unwrap();
    let wrong = format!("{}-0000-0000", &code[..6]);
    let started = Instant::now();
    let mut joiner = Proc::spawn(
        &["join", "--json", "--yes", "--server", &server.url(), &wrong],
        &[],
    );
    let jerr = joiner.event("error");
    assert!(
        jerr["message"]
            .as_str()
            .unwrap()
            .contains("join code is wrong"),
        "{jerr}"
    );
    assert_eq!(joiner.wait(), 3);
    let herr = host.event("error");
    assert!(
        herr["message"].as_str().unwrap().contains("burned"),
        "{herr}"
    );
    assert_eq!(host.wait(), 3);
    // A hang guard: a wrong code fails within about a second; PATIENCE is 15 s.
    assert!(started.elapsed() < PATIENCE);
}

#[test]
fn human_mode_prints_the_code_on_stdout_without_banner_when_piped() {
    let dir = tempfile::tempdir().unwrap();
    let host = Proc::spawn(&["host", "--no-mdns", dir.path().to_str().unwrap()], &[]);
    let first = host.line();
    assert!(first.starts_with("Join code: "), "{first:?}");
    let code = first.trim_start_matches("Join code: ");
    assert!(code.parse::<thru::code::JoinCode>().is_ok(), "{code}");
}

/// Text a hostile server sends as an error: retitles the terminal, erases the line, and
/// fakes a success line.
const EVIL: &str = "\u{1b}]0;owned title\u{7}\u{1b}[2K\r\nDone: 3 files received, all verified";

/// A fake signaling server on a thread: greets, then answers the first request with a fatal
/// error carrying [`EVIL`]. Returns its URL.
fn evil_server() -> String {
    use tokio_tungstenite::tungstenite::{Message, accept};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((tcp, _)) = listener.accept() else {
            return;
        };
        let Ok(mut ws) = accept(tcp) else { return };
        let welcome = serde_json::json!({
            "type": "welcome", "protocol": 1, "server": EVIL, "max_message_bytes": 65536,
        });
        let _ = ws.send(Message::text(welcome.to_string()));
        let _ = ws.read();
        let err = serde_json::json!({
            "type": "error", "code": "session_full", "message": EVIL, "fatal": true,
        });
        let _ = ws.send(Message::text(err.to_string()));
        let _ = ws.close(None);
        while ws.read().is_ok() {}
    });
    url
}

#[test]
fn a_server_error_message_reaches_the_terminal_escaped() {
    for json in [false, true] {
        let url = evil_server();
        let mut args = vec![
            "join",
            "K7QF2M-XD4P-RT9A",
            "--yes",
            "--server",
            url.as_str(),
        ];
        if json {
            args.push("--json");
        }
        let out = thru(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{stderr}{stdout}");
        let shown = if json { &stdout } else { &stderr };
        for text in [&stderr, &stdout] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\r'),
                "raw control characters reached the terminal: {text:?}"
            );
            assert!(
                !text.lines().any(|l| l.starts_with("Done:")),
                "a line was faked: {text:?}"
            );
        }
        assert!(
            shown.contains("owned title") && shown.contains("u{1b}]0;"),
            "the message is shown, escaped: {shown:?}"
        );
    }
}

const TURN_PASSWORD: &str = "S3cretTurnPw";

#[test]
fn help_does_not_print_secret_env_values() {
    for sub in ["host", "join"] {
        let out = Command::new(thru_bin())
            .args([sub, "--help"])
            .env(
                "THRU_TURN_SERVERS",
                format!("turn:user:{TURN_PASSWORD}@relay.example:3478"),
            )
            .env("THRU_CODE", "K7QF2M-XD4P-RT9A")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("THRU_TURN_SERVERS"), "{text}");
        assert!(
            !text.contains(TURN_PASSWORD),
            "{sub} --help shows the TURN password"
        );
        assert!(!text.contains("XD4P"), "{sub} --help shows the join code");
    }
}

#[test]
fn turn_servers_come_from_a_file_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("turn.txt");
    // A malformed entry (no host): the error must come from the file, and not show it.
    std::fs::write(&file, format!("# our relay\nturn:user:{TURN_PASSWORD}@\n")).unwrap();
    let path = file.to_str().unwrap();
    let out = thru(&[
        "join",
        "K7QF2M-XD4P-RT9A",
        "--yes",
        "--server",
        "ws://127.0.0.1:9",
        "--turn-server-file",
        path,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--turn-server:"), "{stderr}");
    assert!(!stderr.contains(TURN_PASSWORD), "{stderr}");

    let missing = dir.path().join("nope.txt");
    let out = thru(&[
        "join",
        "K7QF2M-XD4P-RT9A",
        "--yes",
        "--server",
        "ws://127.0.0.1:9",
        "--turn-server-file",
        missing.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--turn-server-file") && stderr.contains("cannot read it"),
        "{stderr}"
    );
}

/// The flag table of the top-level README against clap: every flag it names exists on the
/// side it says, every flag of `thru host` and `thru join` is in it, and its defaults are
/// clap's (issue 15: the docs had drifted).
#[test]
fn readme_flag_table_matches_clap() {
    use clap::ArgAction;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let table = readme
        .split("\n## Flags\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a ## Flags section");
    let mut cmd = thru::cli::command();
    cmd.build();
    let sub = |name: &str| cmd.find_subcommand(name).unwrap().clone();
    let (host, join) = (sub("host"), sub("join"));
    let flags_of = |c: &clap::Command| -> Vec<String> {
        let mut v = Vec::new();
        for a in c.get_arguments() {
            if let Some(longs) = a.get_long_and_visible_aliases() {
                v.extend(longs.iter().map(|l| format!("--{l}")));
            }
            if let Some(s) = a.get_short() {
                v.push(format!("-{s}"));
            }
        }
        v
    };
    let mut documented = Vec::new();
    let mut rows = 0;
    for line in table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| flag"))
    {
        let cells: Vec<String> = line
            .replace("\\|", "/")
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        let (names, side, default) = (&cells[1], &cells[2], &cells[3]);
        rows += 1;
        let flags: Vec<String> = names
            .split('`')
            .skip(1)
            .step_by(2)
            .filter_map(|seg| seg.split_whitespace().next())
            .filter(|f| f.starts_with('-'))
            .map(str::to_string)
            .collect();
        let sides: Vec<&clap::Command> = match side.as_str() {
            "host" => vec![&host],
            "join" => vec![&join],
            "both" => vec![&host, &join],
            _ => vec![&cmd],
        };
        for f in &flags {
            for c in &sides {
                assert!(
                    flags_of(c).contains(f),
                    "README names {f} for {side:?}, but `thru {}` has no such flag",
                    c.get_name()
                );
            }
            documented.push(f.clone());
        }
        // Defaults: a row about one option states clap's default.
        let longs: Vec<&String> = flags.iter().filter(|f| f.starts_with("--")).collect();
        if let ([long], Some(c)) = (longs.as_slice(), sides.first()) {
            let arg = c
                .get_arguments()
                .find(|a| a.get_long() == Some(&long[2..]))
                .unwrap();
            if matches!(
                arg.get_action(),
                ArgAction::SetTrue | ArgAction::Count | ArgAction::Version | ArgAction::Help
            ) {
                continue;
            }
            let clap_default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            match clap_default.as_slice() {
                [] => assert!(
                    default.parse::<f64>().is_err(),
                    "README gives {long} the default {default:?}; clap has none"
                ),
                [one] if !one.contains(',') => assert!(
                    default.to_lowercase().contains(&one.to_lowercase()),
                    "README gives {long} the default {default:?}; clap's is {one:?}"
                ),
                _ => {}
            }
        }
    }
    assert!(rows > 20, "the table was not found: {table}");
    for c in [&host, &join] {
        for f in flags_of(c) {
            if f == "--help" || f == "-h" {
                continue;
            }
            assert!(
                documented.contains(&f),
                "`thru {} {f}` is missing from the README flag table",
                c.get_name()
            );
        }
    }
}
