//! Real `redis-server` and `haproxy` processes for the fleet tests (std only, so the `thru`
//! tests include this file too). Both come from the Debian packages that `ci/install.sh`
//! installs; without them a test says so on stderr and skips.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for a helper process to come up; never a performance assertion.
const START_PATIENCE: Duration = Duration::from_secs(15);

/// `name` on `PATH`, or `None` (with a note on stderr that the test is skipped).
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: {name} is not installed (ci/install.sh installs it)");
    }
    found
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + START_PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A throwaway `redis-server` on a loopback port, no persistence; killed on drop.
pub struct Redis {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
}

impl Redis {
    /// Starts one, or `None` when redis-server is not installed.
    pub fn start() -> Option<Self> {
        let bin = tool("redis-server")?;
        let mut redis = Self {
            child: None,
            bin,
            port: free_port(),
        };
        redis.restart();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: nothing is saved anyway).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        wait_for_port(self.port, &mut child, "redis-server");
        self.child = Some(child);
        // Listening is not yet loaded: wait for a PONG.
        let deadline = Instant::now() + START_PATIENCE;
        while self.try_cmd(&["PING"]).as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server does not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One command; the reply's first line (`+OK`, `:1`, `$5`, `-ERR …`, `*2`).
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args).expect("redis command")
    }

    /// All the bulk strings of a flat array reply (`KEYS`, `ZRANGE`).
    pub fn list(&self, args: &[&str]) -> Vec<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(START_PATIENCE)).unwrap();
        s.write_all(&encode(args)).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let n: usize = line.trim().strip_prefix('*').unwrap().parse().unwrap();
        (0..n)
            .map(|_| {
                let mut head = String::new();
                r.read_line(&mut head).unwrap();
                let len: usize = head.trim().strip_prefix('$').unwrap().parse().unwrap();
                let mut buf = vec![0; len + 2];
                r.read_exact(&mut buf).unwrap();
                String::from_utf8_lossy(&buf[..len]).into_owned()
            })
            .collect()
    }

    fn try_cmd(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(START_PATIENCE)).ok()?;
        s.write_all(&encode(args)).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy in front of `backends`: round-robin, WebSocket upgrades passed through, health
/// checks on `/healthz`. Killed on drop.
pub struct Haproxy {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts one, or `None` when haproxy is not installed.
    pub fn start(backends: &[SocketAddr]) -> Option<Self> {
        let bin = tool("haproxy")?;
        let port = free_port();
        let dir = TempDir::new("haproxy");
        let mut cfg = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout tunnel 1h\n\
             frontend signal\n  bind 127.0.0.1:{port}\n  option forwardfor\n  default_backend thruserv\n\
             backend thruserv\n  balance roundrobin\n  option httpchk GET /healthz\n"
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server s{i} {b} check inter 500ms fall 2 rise 1\n"
            ));
        }
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new(bin)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("THRUSERV_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn haproxy");
        wait_for_port(port, &mut child, "haproxy");
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of a metric series on `addr`'s `/metrics` (plain blocking HTTP).
pub fn metric(addr: SocketAddr, series: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(START_PATIENCE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {series} missing"))
}

/// Sends `signal` (`TERM`, `KILL`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}
