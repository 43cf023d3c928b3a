//! Shared helpers for the thruserv integration tests: a real `thruserv` child process,
//! client shortcuts, a raw WebSocket speaker for malformed input, and plain HTTP probes.
#![allow(dead_code, clippy::unwrap_used)]

pub mod fleet;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flux_signal::client::{ClientConfig, ClientError, SignalClient};
use flux_signal::proto::{ErrorCode, PeerId, ServerMsg};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Generous upper bound for anything a test waits on; never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running `thruserv` on 127.0.0.1 with an OS-chosen port; killed on drop.
pub struct Thruserv {
    child: Child,
    pub addr: SocketAddr,
}

impl Thruserv {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, &[])
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thruserv"));
        cmd.args(["--bind", "127.0.0.1"]).args(args);
        if !args.contains(&"--port") && !env.iter().any(|(k, _)| *k == "THRUSERV_PORT") {
            cmd.args(["--port", "0"]);
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if std::env::var_os("THRUSERV_TEST_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().expect("spawn thruserv");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read thruserv stdout");
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn client(&self) -> SignalClient {
        self.client_from("127.0.0.1").await
    }

    pub async fn client_from(&self, ip: &str) -> SignalClient {
        SignalClient::connect(&self.url(), &config_from(ip))
            .await
            .expect("connect")
    }

    pub async fn try_client_from(&self, ip: &str) -> Result<SignalClient, ClientError> {
        SignalClient::connect(&self.url(), &config_from(ip)).await
    }

    /// `/healthz` answers 200 `ok`.
    pub async fn assert_healthy(&self) {
        let (status, body) = http_get(self.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"), "healthz");
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.addr, "/metrics").await;
        assert_eq!(status, 200);
        body
    }

    /// Value of one metric line (name with labels, exactly as rendered).
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {series} missing in:\n{text}"))
    }

    /// Polls a metric until `pred` holds (state changes on the server are asynchronous).
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(u64) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.metric(series).await;
            if pred(v) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {series} stuck at {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A well-behaved host (from `host_ip`) and joiner (from `joiner_ip`) pair and relay
    /// one message each way.
    pub async fn assert_pairs(&self, host_ip: &str, joiner_ip: &str) {
        let mut host = self.client_from(host_ip).await;
        let created = host.create_session().await.expect("create");
        let mut joiner = self.client_from(joiner_ip).await;
        let joined = joiner.join_session(created.session).await.expect("join");
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::PeerJoined { peer: joined.peer }
        );
        host.relay(joined.peer, json!({"t": "reply", "pake": "b64=="}))
            .await
            .unwrap();
        assert_eq!(
            recv(&mut joiner).await,
            ServerMsg::Relay {
                from: PeerId::HOST,
                payload: json!({"t": "reply", "pake": "b64=="})
            }
        );
        joiner
            .relay(PeerId::HOST, json!({"t": "hello", "pake": "b64=="}))
            .await
            .unwrap();
        assert_eq!(
            recv(&mut host).await,
            ServerMsg::Relay {
                from: joined.peer,
                payload: json!({"t": "hello", "pake": "b64=="})
            }
        );
        joiner.close().await;
        host.close().await;
    }
}

impl Drop for Thruserv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host accepts `peer` (relays it `{"t":"accepted"}`, as `thru` does after a valid
/// confirmation); from then on payloads of any shape pass between them.
pub async fn pair(host: &mut SignalClient, joiner: &mut SignalClient, peer: PeerId) {
    host.relay(peer, json!({"t": "accepted"})).await.unwrap();
    assert_eq!(
        recv(joiner).await,
        ServerMsg::Relay {
            from: PeerId::HOST,
            payload: json!({"t": "accepted"})
        }
    );
}

pub fn config_from(ip: &str) -> ClientConfig {
    ClientConfig::default()
        .local_ip(ip.parse::<IpAddr>().expect("ip"))
        .timeout(PATIENCE)
}

/// Next message, within [`PATIENCE`].
pub async fn recv(c: &mut SignalClient) -> ServerMsg {
    timeout(PATIENCE, c.recv())
        .await
        .expect("no message in time")
        .expect("recv")
}

/// Next outcome of `recv`, message or error, within [`PATIENCE`].
pub async fn recv_result(c: &mut SignalClient) -> Result<ServerMsg, ClientError> {
    timeout(PATIENCE, c.recv())
        .await
        .expect("no message in time")
}

/// Expects a non-fatal error with `code`.
pub async fn expect_error(c: &mut SignalClient, code: ErrorCode) {
    match recv(c).await {
        ServerMsg::Error {
            code: got,
            fatal: false,
            ..
        } => assert_eq!(got, code),
        other => panic!("expected non-fatal {code}, got {other:?}"),
    }
}

/// Expects a fatal error with `code`, then the close frame carrying the same code.
pub async fn expect_fatal(c: &mut SignalClient, code: ErrorCode) {
    loop {
        match recv_result(c).await {
            Ok(ServerMsg::Error {
                code: got,
                fatal: true,
                ..
            }) => assert_eq!(got, code),
            // Messages already in flight (relays from the flood) may come first.
            Ok(ServerMsg::Error { fatal: false, .. } | ServerMsg::Relay { .. }) => continue,
            Ok(other) => panic!("expected fatal {code}, got {other:?}"),
            Err(ClientError::Closed { reason, .. }) => {
                assert_eq!(reason, code);
                return;
            }
            Err(e) => panic!("expected close with {code}, got {e}"),
        }
    }
}

/// Expects `session_closed{reason}` followed by the close.
pub async fn expect_session_closed(c: &mut SignalClient, reason: ErrorCode) {
    loop {
        match recv_result(c).await {
            Ok(ServerMsg::SessionClosed { reason: got }) => assert_eq!(got, reason),
            // Notices and refusals already in flight may come first.
            Ok(ServerMsg::PeerLeft { .. } | ServerMsg::Error { fatal: false, .. }) => continue,
            Ok(other) => panic!("expected session_closed {reason}, got {other:?}"),
            Err(ClientError::Closed { reason: got, .. }) => {
                assert_eq!(got, reason);
                return;
            }
            Err(e) => panic!("expected close with {reason}, got {e}"),
        }
    }
}

/// One plain HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let resp = timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await.expect("connect for HTTP");
        s.write_all(req.as_bytes()).await.expect("write HTTP");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read HTTP");
        buf
    })
    .await
    .expect("HTTP answer in time");
    parse_http(&resp)
}

pub fn parse_http(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// TCP from a chosen loopback address.
pub async fn tcp_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.expect("tcp connect")
}

/// True when the server closes `s` (EOF or reset) within `limit`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let res = timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    res.is_ok()
}

/// How a raw connection ended.
#[derive(Debug, PartialEq)]
pub enum RawEnd {
    /// A close frame: code and reason.
    Close(u16, String),
    /// EOF or reset without a close frame.
    Dropped,
}

/// A hand-written WebSocket client that can send anything.
pub struct RawWs {
    pub stream: TcpStream,
    /// The server's response head to the upgrade.
    pub head: String,
    buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, "127.0.0.1", "")
            .await
            .expect("upgrade")
    }

    /// Upgrades with extra header lines (each ending in CRLF); `Err(head)` when the answer
    /// is not 101.
    pub async fn connect_with(
        addr: SocketAddr,
        from: &str,
        extra_headers: &str,
    ) -> Result<Self, String> {
        let mut stream = tcp_from(from, addr).await;
        let req = format!(
            "GET /v1/signal HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = timeout(PATIENCE, async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return buf.len(),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("upgrade answer in time");
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        let buf = buf[head_end..].to_vec();
        let mut ws = Self { stream, head, buf };
        match ws.read_frame().await {
            Some((1, text)) if text.starts_with(b"{\"type\":\"welcome\"") => Ok(ws),
            other => Err(format!("expected welcome, got {other:?}")),
        }
    }

    /// Sends one frame, masked as RFC 6455 §5.3 requires of clients (unless `masked` is
    /// false, to test that violation). Write errors are ignored: the server may already
    /// have closed.
    pub async fn send_frame_raw(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(if fin { 0x80 } else { 0 } | opcode);
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x11, 0x22, 0x33, 0x44];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        let _ = self.stream.write_all(&frame).await;
    }

    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_frame_raw(fin, opcode, payload, true).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 1, text.as_bytes()).await;
    }

    /// Next frame from the server as (opcode, payload); `None` on EOF, reset or timeout.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        timeout(PATIENCE, async {
            loop {
                if let Some((frame, used)) = parse_frame(&self.buf) {
                    self.buf.drain(..used);
                    return Some(frame);
                }
                let mut chunk = [0u8; 8192];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Reads until the close frame (collecting text frames) or the end of the stream.
    pub async fn read_until_close(&mut self) -> (RawEnd, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            match self.read_frame().await {
                Some((8, payload)) => {
                    let code = payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    let reason =
                        String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string();
                    return (RawEnd::Close(code, reason), texts);
                }
                Some((1, payload)) => texts.push(String::from_utf8_lossy(&payload).to_string()),
                Some(_) => continue,
                None => return (RawEnd::Dropped, texts),
            }
        }
    }

    /// Expects `error{code, fatal:true}` and a close frame with `close_code` and the code
    /// as reason.
    pub async fn expect_fatal(&mut self, code: &str, close_code: u16) {
        let (end, texts) = self.read_until_close().await;
        assert_eq!(
            end,
            RawEnd::Close(close_code, code.to_string()),
            "texts before close: {texts:?}"
        );
        let last: serde_json::Value =
            serde_json::from_str(texts.last().expect("an error message")).unwrap();
        assert_eq!(last["type"], "error");
        assert_eq!(last["code"], code);
        assert_eq!(last["fatal"], true);
    }

    /// Next text frame as JSON.
    pub async fn next_json(&mut self) -> serde_json::Value {
        loop {
            match self.read_frame().await {
                Some((1, payload)) => {
                    return serde_json::from_slice(&payload).expect("JSON from server");
                }
                Some((8, payload)) => panic!("closed: {:?}", String::from_utf8_lossy(&payload)),
                Some(_) => continue,
                None => panic!("connection ended"),
            }
        }
    }
}

/// One complete server frame from the front of `buf`: ((opcode, payload), bytes used).
fn parse_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let payload = buf.get(at..at + len)?;
    let payload = match mask {
        Some(m) => payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ m[i % 4])
            .collect(),
        None => payload.to_vec(),
    };
    Some(((b0 & 0x0f, payload), at + len))
}
