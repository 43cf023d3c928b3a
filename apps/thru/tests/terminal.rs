//! `thru host` and `thru join` on real terminals: each runs in a tmux pane (a private tmux
//! server), the test types into the panes and reads their screens. Without tmux it prints
//! SKIP.
//!
//! What it checks (issue 15): the code asked with hidden input, the prompt showing the
//! destination and the clashing file, the rename choice, the host's live bar per receiver
//! with its route, the summaries, the waiting line, a decline (exit 4 on both sides), Ctrl-C
//! on both sides, and no colour codes in a log file. Issue 14: the `--select` picker and `p`
//! to pause and resume a transfer.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::thru_bin;

/// Generous: a hang guard, many times what any step takes.
const WAIT: Duration = Duration::from_secs(60);

/// A private tmux server; killed on drop.
struct Tmux {
    socket: String,
    started: bool,
}

impl Tmux {
    fn new() -> Option<Self> {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Self {
            socket: format!("thru-test-{}", std::process::id()),
            started: false,
        })
    }

    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "tmux {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `cmd` (a shell command line) in a new window `name`; the pane stays after it
    /// ends and shows `EXIT=<code>`.
    fn window(&mut self, name: &str, cmd: &str) {
        // A trap (not an ignore, which the command would inherit) keeps the shell alive
        // through Ctrl-C, so the pane can show how the command ended.
        let line = format!("trap 'true' INT; {cmd}; echo EXIT=$?; sleep 600");
        if self.started {
            self.tmux(&["new-window", "-d", "-n", name, "sh", "-c", &line]);
        } else {
            self.tmux(&[
                "new-session",
                "-d",
                "-s",
                "t",
                "-n",
                name,
                "-x",
                "220",
                "-y",
                "60",
                "sh",
                "-c",
                &line,
            ]);
            self.started = true;
        }
    }

    fn screen(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-t", &format!("t:{name}")])
    }

    /// The screen once it contains `what`.
    fn wait_for(&self, name: &str, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.screen(name);
            if s.contains(what) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no {what:?} on screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let target = format!("t:{name}");
        let mut args = vec!["send-keys", "-t", &target];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// The pid of the command the pane's shell runs.
    fn child_pid(&self, name: &str) -> String {
        let sh = self.tmux(&["display", "-p", "-t", &format!("t:{name}"), "#{pane_pid}"]);
        let sh = sh.trim();
        let kids = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
        kids.split_whitespace()
            .next()
            .expect("the pane runs a command")
            .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if self.started {
            let _ = Command::new("tmux")
                .args(["-L", &self.socket, "kill-server"])
                .output();
        }
    }
}

fn signal(pid: &str, sig: &str) {
    let _ = Command::new("kill").args([sig, pid]).status();
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn host_and_join_on_terminals() {
    let Some(mut tmux) = Tmux::new() else {
        println!("SKIP: no tmux");
        return;
    };
    let thru = thru_bin();
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let out = out.path().canonicalize().unwrap();
    std::fs::write(src.path().join("report.txt"), b"new version").unwrap();
    // Large enough that the transfer can be caught in flight (the joiner is paused there).
    let big = src.path().join("big.bin");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    std::fs::write(out.join("report.txt"), b"my copy").unwrap();

    tmux.window(
        "host",
        &format!(
            "{} host --no-mdns --max-receivers 3 {} {}",
            q(&thru),
            q(&src.path().join("report.txt")),
            q(&big)
        ),
    );
    let screen = tmux.wait_for("host", "--peer ");
    assert!(screen.contains("Offering 2 files, 256.00 MiB"), "{screen}");
    let code = screen
        .split("thru join ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let port = screen
        .split("--peer ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let peer = format!("127.0.0.1:{port}");
    tmux.wait_for(
        "host",
        "Waiting for receivers (0 of 3 done) — Ctrl-C to stop",
    );

    // The joiner asks for the code without echoing it.
    tmux.window(
        "join",
        &format!("{} join --peer {peer} --out {}", q(&thru), q(&out)),
    );
    tmux.wait_for("join", "Join code (input hidden):");
    tmux.keys("join", &[&code, "Enter"]);
    // The prompt: destination, the clash, the choice.
    let screen = tmux.wait_for("join", "[s]kip, or decide for [e]ach?");
    assert!(!screen.contains(&code), "the code was echoed:\n{screen}");
    assert!(
        screen.contains(&format!("to {}:", out.display())),
        "destination:\n{screen}"
    );
    assert!(
        screen.contains("1 file exists here with other content (--on-conflict):\n  report.txt"),
        "{screen}"
    );
    tmux.keys("join", &["r", "Enter"]);
    let question = format!("Receive these files into {}? [y/N]", out.display());
    tmux.wait_for("join", &question);
    let joiner = tmux.child_pid("join");
    tmux.keys("join", &["y", "Enter"]);
    // Step the joiner until the host shows its bar for it, then hold it there.
    let deadline = Instant::now() + WAIT;
    let live = loop {
        signal(&joiner, "-STOP");
        let s = tmux.screen("host");
        if s.lines().any(|l| l.contains("to joiner 1 [")) {
            break s;
        }
        assert!(Instant::now() < deadline, "no live bar on the host:\n{s}");
        signal(&joiner, "-CONT");
        std::thread::sleep(Duration::from_millis(5));
    };
    signal(&joiner, "-CONT");
    let bar = live.lines().find(|l| l.contains("to joiner 1 [")).unwrap();
    assert!(
        bar.contains("direct (LAN)"),
        "the route is next to the bar: {bar:?}"
    );

    let screen = tmux.wait_for("join", "EXIT=");
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("Received 2 files from host"), "{screen}");
    assert!(screen.contains("Saving report.txt as"), "{screen}");
    // The user's file stays where it was; the offered one takes a free name beside it.
    assert_eq!(std::fs::read(out.join("report.txt")).unwrap(), b"my copy");
    assert_eq!(
        std::fs::read(out.join("report (1).txt")).unwrap(),
        b"new version"
    );

    let screen = tmux.wait_for("host", "Waiting for receivers (1 of 3 done)");
    assert!(
        screen.contains("Sent 2 files to joiner 1: 256.00 MiB sent"),
        "{screen}"
    );
    assert!(
        !screen.lines().any(|l| l.contains("to joiner 1 [")),
        "a stale bar stayed:\n{screen}"
    );

    // Ctrl-C at the code prompt: the joiner stops at once, creates nothing, and leaves the
    // terminal echoing again.
    let never = out.join("never");
    let check_echo =
        "x=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\?echo' | sed 's/^/TTY=/'; (exit $x)";
    tmux.window(
        "join2",
        &format!(
            "{} join --peer {peer} --out {}; {check_echo}",
            q(&thru),
            q(&never)
        ),
    );
    tmux.wait_for("join2", "Join code (input hidden):");
    tmux.keys("join2", &["C-c"]);
    let screen = tmux.wait_for("join2", "EXIT=");
    assert!(screen.contains("EXIT=130"), "{screen}");
    assert!(screen.contains("TTY=echo"), "echo left off:\n{screen}");
    assert!(!never.exists());

    // Ctrl-C at the offer prompt: the host hears of it at once, as a refusal (not half a
    // minute later from QUIC's idle timeout, which would read "timed out").
    let stopped = out.join("stopped");
    tmux.window(
        "join4",
        &format!(
            "{} join {code} --peer {peer} --out {}",
            q(&thru),
            q(&stopped)
        ),
    );
    tmux.wait_for("join4", "? [y/N]");
    tmux.keys("join4", &["C-c"]);
    let screen = tmux.wait_for("join4", "EXIT=");
    assert!(screen.contains("EXIT=130"), "{screen}");
    assert!(!stopped.exists(), "the --out join created was left behind");
    tmux.wait_for("host", "joiner 2 declined: the receiver stopped (Ctrl-C)");

    // A receiver that answers no: it exits 4, so does the host (its last receiver declined),
    // and the --out this joiner created is gone again.
    let declined = out.join("new-dir");
    tmux.window(
        "join3",
        &format!(
            "{} join {code} --peer {peer} --out {}",
            q(&thru),
            q(&declined)
        ),
    );
    tmux.wait_for("join3", "? [y/N]");
    tmux.keys("join3", &["n", "Enter"]);
    let screen = tmux.wait_for("join3", "EXIT=");
    assert!(screen.contains("EXIT=4"), "{screen}");
    assert!(!declined.exists(), "the --out join created was left behind");
    let screen = tmux.wait_for("host", "EXIT=");
    assert!(
        screen.contains("joiner 3 declined: the user answered no"),
        "{screen}"
    );
    assert!(
        screen.contains("All done: 1 receiver served, 2 failed or declined"),
        "{screen}"
    );
    assert!(screen.contains("EXIT=4"), "{screen}");
}

/// With stderr in a file, the logs there carry no colour codes, while the terminal still
/// gets the code.
#[test]
fn logs_in_a_file_have_no_colour_codes() {
    let Some(mut tmux) = Tmux::new() else {
        println!("SKIP: no tmux");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.txt");
    std::fs::write(&f, b"x").unwrap();
    let log = dir.path().join("host.log");
    tmux.window(
        "host",
        &format!(
            "RUST_LOG=debug {} host --no-mdns {} 2>{}",
            q(&thru_bin()),
            q(&f),
            q(&log)
        ),
    );
    tmux.wait_for("host", "Join code: ");
    // Wait for the logs to be written, then stop the host.
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("DEBUG")
    {
        assert!(Instant::now() < deadline, "no debug log");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ctrl-C stops the waiting host at once.
    tmux.keys("host", &["C-c"]);
    let screen = tmux.wait_for("host", "EXIT=");
    assert!(screen.contains("EXIT=130"), "{screen}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in the log file: {text:?}"
    );
}

/// Issue 14 on a terminal: `--select` opens a picker (checkboxes, type to search) and only the
/// ticked file arrives; during a transfer `p` pauses it (the host hears of it, nothing more
/// arrives, the connection outlives the idle timeout) and `p` again resumes it.
#[test]
fn select_in_a_picker_and_pause_with_p() {
    select_and_pause(None);
}

/// [`select_in_a_picker_and_pause_with_p`] through a real `thruserv`.
#[test]
fn select_in_a_picker_and_pause_with_p_through_thruserv() {
    let server = common::Thruserv::start(&[]);
    select_and_pause(Some(&server));
}

fn select_and_pause(server: Option<&common::Thruserv>) {
    let Some(mut tmux) = Tmux::new() else {
        println!("SKIP: no tmux");
        return;
    };
    let thru = thru_bin();
    let src = tempfile::tempdir().unwrap();
    let share = src.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("a.txt"), b"alpha").unwrap();
    std::fs::write(share.join("b.log"), b"the log").unwrap();
    std::fs::write(share.join("notes.md"), b"notes").unwrap();
    // Sparse and large: the transfer is still running when `p` is pressed, and after the
    // resume (sent plain: zeros would compress to nothing and finish at once).
    std::fs::File::create(share.join("big.bin"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    // How the joiner reaches the host: `--peer` on the LAN, `--server` through thruserv.
    let (mut host, reach, code) = match server {
        None => {
            let (host, peer, code) = common::lan_host_with(&[&share], 2, &["--compress", "off"]);
            (host, format!("--peer {peer}"), code)
        }
        Some(srv) => {
            let url = srv.url();
            let host = common::Proc::spawn(
                &[
                    "host",
                    "--json",
                    "--server",
                    &url,
                    "--max-receivers",
                    "2",
                    "--compress",
                    "off",
                    share.to_str().unwrap(),
                ],
                &[],
            );
            let code = host.event("code")["code"].as_str().unwrap().to_string();
            (host, format!("--server {url}"), code)
        }
    };

    // The picker: clear every tick (←), search for the log, tick it, confirm.
    let out = tempfile::tempdir().unwrap();
    let out = out.path().canonicalize().unwrap();
    tmux.window(
        "pick",
        &format!(
            "THRU_CODE={code} {} join {reach} --out {} --select",
            q(&thru),
            q(&out)
        ),
    );
    let screen = tmux.wait_for("pick", "Choose what to receive:");
    assert!(screen.contains("share/big.bin"), "{screen}");
    tmux.keys("pick", &["Left"]);
    tmux.keys("pick", &["b.log"]);
    tmux.wait_for("pick", "> [ ] share/b.log");
    tmux.keys("pick", &["Space"]);
    tmux.wait_for("pick", "[x] share/b.log");
    tmux.keys("pick", &["Enter"]);
    let screen = tmux.wait_for("pick", "[y/N]");
    assert!(screen.contains("3 files left out"), "{screen}");
    tmux.keys("pick", &["y", "Enter"]);
    let screen = tmux.wait_for("pick", "EXIT=");
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("3 files left out"), "{screen}");
    assert_eq!(std::fs::read(out.join("share/b.log")).unwrap(), b"the log");
    let got: Vec<_> = std::fs::read_dir(out.join("share")).unwrap().collect();
    assert_eq!(got.len(), 1, "only the ticked file: {got:?}");

    // Pause and resume with `p`.
    let out2 = tempfile::tempdir_in("/var/tmp").unwrap();
    let part = out2.path().join("share/.big.bin.thrupart");
    tmux.window(
        "pause",
        &format!(
            "THRU_CODE={code} {} join {reach} --out {} --yes --include share/big.bin",
            q(&thru),
            q(out2.path())
        ),
    );
    loop {
        let st = host.event("receiver");
        if st["peer"] == "joiner 2" && st["state"] == "receiving" {
            break;
        }
    }
    // As a person would: `p` once the joiner says it listens for it.
    tmux.wait_for("pause", "Press p to pause and resume");
    tmux.keys("pause", &["p"]);
    let ev = host.event("pause");
    assert_eq!(ev["paused"], true, "{ev}");
    tmux.wait_for(
        "pause",
        "Paused: the connection stays up; press p to resume",
    );
    // Longer than the idle timeout: the connection stays up, and nothing more arrives.
    std::thread::sleep(Duration::from_secs(1));
    let held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    let still = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert_eq!(held, still, "data kept arriving while paused");
    let screen = tmux.screen("pause");
    assert!(
        !screen.contains("EXIT="),
        "the joiner ended while paused:\n{screen}"
    );
    tmux.keys("pause", &["p"]);
    let ev = host.event("pause");
    assert_eq!(ev["paused"], false, "{ev}");
    let before = host.event("progress")["overall_done"].as_u64().unwrap();
    let after = loop {
        let done = host.event("progress")["overall_done"].as_u64().unwrap();
        if done > before {
            break done;
        }
    };
    assert!(after > before);
    // Enough: stop it (the partial file stays for a resume).
    tmux.keys("pause", &["C-c"]);
    let screen = tmux.wait_for("pause", "EXIT=");
    assert!(screen.contains("EXIT=130"), "{screen}");
    let _ = host.wait();
}
