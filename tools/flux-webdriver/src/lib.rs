//! A minimal WebDriver client for headless Chromium (Debian's `chromium` and
//! `chromium-driver`): what the web relay's browser tests (`apps/thru/tests/browser.rs`) and
//! flux-bench's `relay-browser` row need to open a relay page, click, read its state and wait
//! for a download. Plain HTTP/1.1 with JSON bodies to a `chromedriver` child on loopback; no
//! async runtime, no WebDriver crate.
//!
//! Chromium and chromedriver leave scratch directories (`org.chromium.Chromium.*`) under
//! `TMPDIR` when the browser is stopped, so every [`Browser`] points `TMPDIR` (and its profile)
//! at a temporary directory of its own, removed when it is dropped.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Why no browser can run here, or `None` when Chromium and chromedriver are installed.
pub fn missing() -> Option<String> {
    let absent: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "{} missing (Debian: apt-get install chromium chromium-driver)",
            absent.join(" and ")
        )
    })
}

/// A headless Chromium behind its own chromedriver; both stopped, and their scratch files
/// removed, on drop.
pub struct Browser {
    child: Child,
    addr: SocketAddr,
    session: String,
    /// The profile and `TMPDIR` of chromedriver and Chromium.
    _scratch: tempfile::TempDir,
}

/// One WebDriver request; the response's JSON body (`Null` when it has none).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut s =
        TcpStream::connect(addr).with_context(|| format!("connect to chromedriver at {addr}"))?;
    // Navigation answers once the page has loaded; nothing here takes minutes.
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver may keep the connection open: read the head, then Content-Length bytes.
    let mut r = BufReader::new(s);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().context("chromedriver's Content-Length")?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that saves downloads into `downloads`
    /// without asking.
    pub fn start(downloads: &Path) -> Result<Self> {
        if let Some(why) = missing() {
            bail!("{why}");
        }
        let downloads = downloads
            .to_str()
            .ok_or_else(|| anyhow!("download directory {downloads:?} is not UTF-8"))?;
        let scratch = tempfile::Builder::new()
            .prefix("flux-webdriver")
            .tempdir()?;
        let (profile, tmp) = (scratch.path().join("profile"), scratch.path().join("tmp"));
        std::fs::create_dir(&tmp)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // Chromium inherits it from chromedriver.
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn chromedriver")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut b = Self {
            child,
            addr,
            session: String::new(),
            _scratch: scratch,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            ensure!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         format!("--user-data-dir={}", profile.display())],
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                    "safebrowsing.enabled": false,
                },
            },
        }}});
        let resp = http(addr, "POST", "/session", Some(&caps))?;
        b.session = resp["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no WebDriver session: {resp}"))?
            .to_string();
        // Headless Chromium saves downloads only when told to through DevTools.
        b.cmd(
            "goog/cdp/execute",
            &json!({"cmd": "Browser.setDownloadBehavior",
                    "params": {"behavior": "allow", "downloadPath": downloads}}),
        )?;
        Ok(b)
    }

    /// chromedriver's process id; Chromium's processes are its descendants.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `POST /session/{id}/{what}` with `body`; the response's `value`, or its WebDriver error.
    pub fn cmd(&self, what: &str, body: &Value) -> Result<Value> {
        let v = http(
            self.addr,
            "POST",
            &format!("/session/{}/{what}", self.session),
            Some(body),
        )?;
        let value = v["value"].clone();
        if let Some(e) = value.get("error") {
            bail!("WebDriver {what}: {e}: {}", value["message"]);
        }
        Ok(value)
    }

    /// Navigates to `url` (returns once the page has loaded).
    pub fn go(&self, url: &str) -> Result<()> {
        self.cmd("url", &json!({ "url": url })).map(drop)
    }

    /// Runs `script` in the page; what it returns.
    pub fn eval(&self, script: &str) -> Result<Value> {
        self.cmd("execute/sync", &json!({ "script": script, "args": [] }))
    }

    /// The WebDriver id of the first element matching `css`.
    pub fn find(&self, css: &str) -> Result<String> {
        let v = self.cmd("element", &json!({"using": "css selector", "value": css}))?;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no element {css}: {v}"))
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) -> Result<()> {
        let id = self.find(css)?;
        self.cmd(&format!("element/{id}/click"), &json!({}))
            .map(drop)
    }

    /// The text of the element with id `id`.
    pub fn text(&self, id: &str) -> Result<String> {
        Ok(self
            .eval(&format!(
                "return document.getElementById('{id}').textContent"
            ))?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Waits until the relay page's `body[data-state]` is one of `states`; returns it. After
    /// `patience`, an error with the page's `#status` and `#error` text.
    pub fn wait_state(&self, states: &[&str], patience: Duration) -> Result<String> {
        let deadline = Instant::now() + patience;
        loop {
            let s = self.eval("return document.body.dataset.state || ''")?;
            let s = s.as_str().unwrap_or("").to_string();
            if states.contains(&s.as_str()) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let status = self.eval(
                    "return document.getElementById('status').textContent + ' / ' \
                     + document.getElementById('error').textContent",
                )?;
                bail!(
                    "page state {s:?} after {patience:?}, waited for {states:?}; status: {status}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session stops Chromium; then chromedriver goes, then the scratch dir.
        if !self.session.is_empty() {
            let _ = http(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until Chromium has finished writing `name` into `dir` (the file is there and no
/// `.crdownload` is left); its path. Polls every 10 ms, so that a benchmark can time it.
pub fn wait_download(dir: &Path, name: &str, patience: Duration) -> Result<PathBuf> {
    let path = dir.join(name);
    let deadline = Instant::now() + patience;
    loop {
        let partial = std::fs::read_dir(dir)
            .with_context(|| dir.display().to_string())?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
        if !partial && path.exists() {
            return Ok(path);
        }
        ensure!(
            Instant::now() < deadline,
            "{name} was not downloaded into {} within {patience:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
