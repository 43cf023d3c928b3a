//! Shared helpers for the `thru` integration tests: a real `thruserv` child process, the
//! real `thru` binary, identities and deadlines.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use flux_signal::client::ClientConfig;
use serde_json::Value;
use thru::pake::LocalInfo;

/// Upper bound for anything a test waits on; never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// The `thru` binary of this package.
pub fn thru_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_thru"))
}

/// The `thruserv` binary, built from `apps/thruserv` in the same target directory.
///
/// Cargo builds binaries of other packages only for their own tests, so when it is not there
/// yet (`cargo test -p thru` alone) it is built once with the cargo that runs the tests.
/// Workspace runs (`cargo nextest run --workspace`) have it already.
pub fn thruserv_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Test executables live in <target>/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("thruserv");
        if !bin.exists() {
            let target_dir = profile_dir.parent().unwrap();
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "thruserv", "--target-dir"])
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build -p thruserv");
            assert!(status.success(), "building thruserv failed");
        }
        assert!(bin.exists(), "thruserv not found at {}", bin.display());
        bin
    })
    .clone()
}

/// A running `thruserv` on 127.0.0.1 with an OS-chosen port; killed on drop.
pub struct Thruserv {
    child: Child,
    pub addr: SocketAddr,
}

impl Thruserv {
    /// Starts one with loopback candidates allowed, per-IP rate limits off, plus `args`.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(thruserv_bin());
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--allow-loopback-candidates",
        ])
        // Tests connect many times from one address: lift the per-IP budgets (thruserv's own
        // tests cover them).
        .args([
            "--ws-connects-per-min",
            "0",
            "--session-creates-per-min",
            "0",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("THRU_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().expect("spawn thruserv");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("thruserv did not report its address: {line:?}")
            });
        Self { child, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The process id (for memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Thruserv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client settings for tests.
pub fn client() -> ClientConfig {
    ClientConfig::default().timeout(PATIENCE)
}

/// A fresh real QUIC identity and loopback addresses with `port`.
pub fn local(port: u16) -> LocalInfo {
    let id = flux_quic::Identity::generate().unwrap();
    LocalInfo {
        fingerprint: id.fingerprint(),
        addrs: vec![
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 2], port)),
        ],
        quic: None,
    }
}

/// `fut` within [`PATIENCE`], or the test fails naming `what`.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

/// A running `thru` process whose stdout lines (JSON events) are read on a thread.
/// A `thru` child with its stdout lines in a channel; killed on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `thru` with `args` and extra environment, reading its stdout lines.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_with_stdin(args, env, None)
    }

    /// [`Proc::spawn`], with `stdin` written to the process's stdin (then closed) on a thread;
    /// `None`: no stdin.
    pub fn spawn_with_stdin(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Self {
        let mut child = Command::new(thru_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if let (Some(data), Some(mut input)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                use std::io::Write as _;
                let _ = input.write_all(&data);
            });
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines: rx }
    }

    /// The next stdout line.
    pub fn line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no output within {PATIENCE:?}"))
    }

    /// The next JSON event named `event`, skipping others.
    pub fn event(&self, event: &str) -> Value {
        loop {
            let v: Value = serde_json::from_str(&self.line()).unwrap();
            if v["event"] == event {
                return v;
            }
        }
    }

    /// Waits for the exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A LAN `--json` host of `paths` (`--no-mdns`) serving `receivers`, with `extra` flags; checks
/// the events before the code (schema version, what is offered) and returns the host, the
/// loopback `--peer` address and the code.
pub fn lan_host_with(paths: &[&Path], receivers: u32, extra: &[&str]) -> (Proc, String, String) {
    let n = receivers.to_string();
    let mut args = vec!["host", "--json", "--no-mdns", "--max-receivers", &n];
    args.extend_from_slice(extra);
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

/// [`lan_host_with`] without extra flags.
pub fn lan_host(paths: &[&Path], receivers: u32) -> (Proc, String, String) {
    lan_host_with(paths, receivers, &[])
}

/// A `--json` joiner of the LAN host at `peer` with `code`, receiving into `out`.
pub fn lan_join(peer: &str, code: &str, out: &Path, extra: &[&str]) -> Proc {
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
