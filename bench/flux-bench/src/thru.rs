//! Rows of real `thru` processes behind a real `thruserv` on loopback:
//! - `thru`: `thru host` to `thru join` directly (QUIC), the rate the joiner's `--benchmark`
//!   reports;
//! - `relay-curl` and `relay-browser`: `thru host FILE --web` through `thruserv --web-relay`,
//!   downloaded by curl (plain mode) or by headless Chromium through the end-to-end encrypted
//!   page (via `flux-webdriver`). The clock runs from curl's start (or the click on the page's
//!   Download button) to curl's exit (or Chromium's renaming of the finished download).
//!
//! The runner checks the bytes. CPU is read from `/proc` around the measured span: the `thru`
//! host, the relay (`thruserv`, all its threads), and the client (curl as a waited child;
//! Chromium as every process under its chromedriver).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::RunResult;

/// Generous: a GiB decrypted in a page on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(600);

/// The `thru` and `thruserv` binaries the rows run.
pub struct Bins {
    pub thru: PathBuf,
    pub thruserv: PathBuf,
}

impl Bins {
    /// `thru` / `thruserv` as given, else next to this executable.
    pub fn find(thru: Option<&Path>, thruserv: Option<&Path>) -> Result<Self> {
        let here = std::env::current_exe()?;
        let dir = here.parent().unwrap_or(Path::new("."));
        let b = Self {
            thru: thru.map_or_else(|| dir.join("thru"), Path::to_path_buf),
            thruserv: thruserv.map_or_else(|| dir.join("thruserv"), Path::to_path_buf),
        };
        for p in [&b.thru, &b.thruserv] {
            if !p.exists() {
                bail!(
                    "{} not found: build it (cargo build --release -p thru -p thruserv) or pass \
                     --thru / --thruserv",
                    p.display()
                );
            }
        }
        Ok(b)
    }
}

/// Why a relay row cannot run here (curl or the browser missing), or `None`.
pub fn missing(browser: bool) -> Option<String> {
    if browser {
        return flux_webdriver::missing();
    }
    let curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    (!curl.is_ok_and(|s| s.success())).then(|| "curl not installed".to_string())
}

/// A child process killed on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `thruserv --web-relay` on an OS-chosen loopback port; it pairs loopback candidates too.
fn start_relay(bin: &Path, log: &Path) -> Result<(Kill, SocketAddr)> {
    let mut child = Command::new(bin)
        .args(["--bind", "127.0.0.1", "--port", "0", "--web-relay"])
        .arg("--allow-loopback-candidates")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log)?)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let child = Kill(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("thruserv did not start: {line:?} (log: {})", log.display()))?;
    Ok((child, addr))
}

/// A `thru` process with its JSON events on a channel (read on a thread, so that progress
/// events never fill the pipe); killed on drop.
struct ThruProc {
    child: Kill,
    events: mpsc::Receiver<Value>,
    log: PathBuf,
}

impl ThruProc {
    fn spawn(bin: &Path, args: &[&OsStr], log: PathBuf) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx
                    .send(serde_json::from_str(&line).unwrap_or(Value::Null))
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            child: Kill(child),
            events,
            log,
        })
    }

    /// The next event named `name`, skipping others.
    fn event(&self, name: &str, within: Duration) -> Result<Value> {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name => return Ok(v),
                Ok(v) if v["event"] == "error" => {
                    bail!("thru: {} (log: {})", v["message"], self.log.display())
                }
                Ok(_) => {}
                Err(_) => bail!(
                    "thru printed no {name} event within {within:?} (log: {})",
                    self.log.display()
                ),
            }
        }
    }
}

/// `thru host --json --web [--plain] FILE`; its `web_link` event.
fn start_host(
    bin: &Path,
    relay: SocketAddr,
    file: &Path,
    plain: bool,
    log: PathBuf,
) -> Result<(ThruProc, Value)> {
    let server = format!("ws://{relay}");
    let mut args: Vec<&OsStr> = ["host", "--json", "--web", "--server", &server]
        .map(OsStr::new)
        .to_vec();
    if plain {
        args.push(OsStr::new("--plain"));
    }
    args.push(file.as_os_str());
    let host = ThruProc::spawn(bin, &args, log)?;
    let link = host.event("web_link", Duration::from_secs(30))?;
    Ok((host, link))
}

/// `thru host` to `thru join --benchmark` through a fresh thruserv: the joiner's rate and
/// both sides' CPU as they report them.
pub fn run_direct(bins: &Bins, src: &Path, dest: &Path, logs: &Path) -> Result<RunResult> {
    let (_relay, addr) = start_relay(&bins.thruserv, &logs.join("thru-thruserv.log"))?;
    let server = format!("ws://{addr}");
    let base = ["--json", "--benchmark", "--server", &server].map(OsStr::new);
    let mut args = vec![OsStr::new("host")];
    args.extend(base);
    args.extend(["--max-receivers", "1"].map(OsStr::new));
    args.push(src.as_os_str());
    let host = ThruProc::spawn(&bins.thru, &args, logs.join("thru-host.log"))?;
    let code = host.event("code", Duration::from_secs(30))?;
    let code = code["code"]
        .as_str()
        .ok_or_else(|| anyhow!("code event without a code: {code}"))?;
    let mut args = vec![OsStr::new("join")];
    args.extend(base);
    args.extend(["--yes", "--out"].map(OsStr::new));
    args.extend([dest.as_os_str(), OsStr::new(code)]);
    let joiner = ThruProc::spawn(&bins.thru, &args, logs.join("thru-join.log"))?;
    let jb = joiner.event("benchmark", PATIENCE)?;
    let hb = host.event("benchmark", Duration::from_secs(30))?;
    let f = |v: &Value| v.as_f64();
    let gib = std::fs::metadata(src)?.len() as f64 / (1u64 << 30) as f64;
    let mut r =
        RunResult::rate_only(f(&jb["avg_gbit_s"]).ok_or_else(|| anyhow!("no avg_gbit_s: {jb}"))?);
    r.host_cpu_s_per_gib = f(&hb["cpu_s"]).map(|c| c / gib);
    r.join_cpu_s_per_gib = f(&jb["cpu_s"]).map(|c| c / gib);
    r.connect_ms = f(&jb["connect_ms"]);
    r.first_byte_after_accept_ms = f(&jb["first_byte_ms"]);
    r.loss_pct = f(&hb["loss_pct"]);
    r.rtt_ms = f(&hb["rtt_ms"]);
    // The joiner exits once the file is verified and in place; the runner checks it.
    let mut j = joiner.child;
    let st = j.0.wait()?;
    if !st.success() {
        bail!("thru join exited with {st} (log: {})", joiner.log.display());
    }
    Ok(r)
}

/// CPU seconds from `/proc/PID/stat`: the process's own (all threads) and its waited
/// children's (fields 14-17).
fn cpu_s(pid: &str) -> f64 {
    stat_fields(pid).map_or(0.0, |f| f.cpu)
}

struct Stat {
    ppid: u32,
    cpu: f64,
}

fn stat_fields(pid: &str) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        // utime, stime, cutime, cstime; USER_HZ is 100 on Linux.
        cpu: (n(11) + n(12) + n(13) + n(14)) / 100.0,
    })
}

/// CPU seconds of `root` and every live process under it (Chromium's browser, renderer,
/// GPU and utility processes under chromedriver).
fn tree_cpu_s(root: u32) -> f64 {
    let procs: Vec<(u32, Stat)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, stat_fields(&pid.to_string())?))
        })
        .collect();
    let mut tree = vec![root];
    let mut total = 0.0;
    while let Some(p) = tree.pop() {
        for (pid, s) in &procs {
            if *pid == p {
                total += s.cpu;
            }
            if s.ppid == p {
                tree.push(*pid);
            }
        }
    }
    total
}

/// Peak resident memory (`VmHWM`) of `pid`, MiB.
fn hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One download of `src` into `dest` through a fresh relay and host: curl, or Chromium.
pub fn run(bins: &Bins, browser: bool, src: &Path, dest: &Path, logs: &Path) -> Result<RunResult> {
    let (relay, addr) = start_relay(&bins.thruserv, &logs.join("relay-thruserv.log"))?;
    let (host, link) = start_host(&bins.thru, addr, src, !browser, logs.join("relay-host.log"))?;
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("source name {src:?} is not UTF-8"))?;
    let (relay_pid, host_pid) = (relay.0.id(), host.child.0.id());
    let before = (cpu_s(&relay_pid.to_string()), cpu_s(&host_pid.to_string()));
    let (wall, client_cpu, ttfb_ms) = if browser {
        download_in_browser(&link, dest, name)?
    } else {
        download_with_curl(&link, &dest.join(name))?
    };
    let bytes = std::fs::metadata(src)?.len() as f64;
    let gib = bytes / (1u64 << 30) as f64;
    let mut r = RunResult::rate_only(bytes * 8.0 / wall / 1e9);
    r.host_cpu_s_per_gib = Some((cpu_s(&host_pid.to_string()) - before.1) / gib);
    r.join_cpu_s_per_gib = Some(client_cpu / gib);
    r.relay_cpu_s_per_gib = Some((cpu_s(&relay_pid.to_string()) - before.0) / gib);
    r.host_max_rss_mib = hwm_mib(host_pid);
    r.relay_max_rss_mib = hwm_mib(relay_pid);
    r.first_chunk_ms = ttfb_ms;
    Ok(r)
}

/// `curl -fL -o OUT URL` of the plain link's file: (wall seconds, curl's CPU seconds, time to
/// first byte in ms).
fn download_with_curl(link: &Value, out: &Path) -> Result<(f64, f64, Option<f64>)> {
    // The host prints `curl -fLOJ URL`; the URL is its last word.
    let cmd = link["curl"][0]
        .as_str()
        .ok_or_else(|| anyhow!("plain web_link without a curl command: {link}"))?;
    let url = cmd.rsplit(' ').next().unwrap_or_default();
    // curl is a child of this process: its CPU lands in our cutime/cstime once waited.
    let kids = cpu_s("self");
    let t = Instant::now();
    let o = Command::new("curl")
        .args(["-sS", "-fL", "-w", "%{time_starttransfer}", "-o"])
        .arg(out)
        .arg(url)
        .output()
        .context("run curl")?;
    let wall = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let ttfb = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse::<f64>()
        .ok();
    Ok((wall, cpu_s("self") - kids, ttfb.map(|s| s * 1e3)))
}

/// The end-to-end page in headless Chromium: open the link, wait for the file list, click
/// Download and wait for the finished file. (wall seconds, the browser's CPU seconds, -).
fn download_in_browser(link: &Value, dest: &Path, name: &str) -> Result<(f64, f64, Option<f64>)> {
    let url = link["url"]
        .as_str()
        .ok_or_else(|| anyhow!("web_link without a url: {link}"))?;
    let b = flux_webdriver::Browser::start(dest)?;
    b.go(url)?;
    if b.wait_state(&["ready", "error"], PATIENCE)? != "ready" {
        bail!("the page failed: {}", b.text("error")?);
    }
    let cpu = tree_cpu_s(b.pid());
    let t = Instant::now();
    b.click("button[data-index='0']")?;
    flux_webdriver::wait_download(dest, name, PATIENCE)?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = tree_cpu_s(b.pid()) - cpu;
    if b.wait_state(&["done", "error"], PATIENCE)? != "done" {
        bail!("the page failed: {}", b.text("error")?);
    }
    Ok((wall, cpu, None))
}
