//! The web relay's pages in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over WebDriver by `tools/flux-webdriver` (shared with
//! flux-bench's `relay-browser` row): an end-to-end encrypted download of a 200 MiB file and
//! of a tree as a zip, an upload to `thru join --web`, a tampered chunk, and proof that no
//! plaintext passes the relay in the clear.
//!
//! Skipped (with a line on stderr) when chromium or chromedriver is not installed;
//! ci/install.sh installs both.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Proc, Thruserv};
use flux_webdriver::{Browser, wait_download};
use rand::{RngCore as _, SeedableRng as _};
use serde_json::{Value, json};

/// Generous: a 200 MiB download decrypted in the page on a loaded 2-core machine.
const BROWSER_PATIENCE: Duration = Duration::from_secs(300);

fn installed() -> bool {
    match flux_webdriver::missing() {
        Some(why) => {
            eprintln!("skipped: {why} (ci/install.sh installs them)");
            false
        }
        None => true,
    }
}

/// The WebDriver client (`tools/flux-webdriver`), failing the test on any error.
struct Driver(Browser);

impl Driver {
    fn start(downloads: &Path) -> Self {
        Self(Browser::start(downloads).unwrap())
    }

    fn cmd(&self, what: &str, body: &Value) -> Value {
        self.0.cmd(what, body).unwrap()
    }

    fn go(&self, url: &str) {
        self.0.go(url).unwrap();
    }

    fn find(&self, css: &str) -> String {
        self.0.find(css).unwrap()
    }

    fn click(&self, css: &str) {
        self.0.click(css).unwrap();
    }

    /// Waits until the page's `body[data-state]` is one of `states`; returns it.
    fn wait_state(&self, states: &[&str]) -> String {
        self.0.wait_state(states, BROWSER_PATIENCE).unwrap()
    }

    fn text(&self, id: &str) -> String {
        self.0.text(id).unwrap()
    }
}

/// Waits for Chromium to finish writing `name` into `dir` (no `.crdownload` left).
fn downloaded(dir: &Path, name: &str) -> PathBuf {
    wait_download(dir, name, BROWSER_PATIENCE).unwrap()
}

// --- a recording (and optionally tampering) proxy in front of thruserv ---------------------

/// Forwards 127.0.0.1:port to `upstream`, recording every byte both ways. With `tamper`,
/// flips one byte deep in the response to any request whose first line contains it.
struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr, tamper: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (log, tamper) = (log.clone(), tamper.clone());
                std::thread::spawn(move || {
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up_log = log.clone();
                    let first_line = Arc::new(Mutex::new(String::new()));
                    let fl = first_line.clone();
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(c2);
                        let mut w = s2;
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) > 0 {
                            *fl.lock().unwrap() = line.clone();
                            up_log.lock().unwrap().extend(line.as_bytes());
                            let _ = w.write_all(line.as_bytes());
                        }
                        copy(&mut r, &mut w, &up_log, None);
                    });
                    let mut r = server;
                    let mut w = client;
                    let flip = tamper
                        .as_deref()
                        .map(|t| (t.to_string(), first_line.clone()));
                    copy(&mut r, &mut w, &log, flip);
                });
            }
        });
        Self { addr, seen }
    }
}

fn copy(
    r: &mut impl std::io::Read,
    w: &mut TcpStream,
    log: &Mutex<Vec<u8>>,
    flip: Option<(String, Arc<Mutex<String>>)>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Flip a byte ~300 KiB into a matching response (past the headers, inside chunk 4).
        if let Some((needle, line)) = &flip {
            let at = 300_000usize;
            if total <= at && at < total + n && line.lock().unwrap().contains(needle.as_str()) {
                buf[at - total] ^= 0x40;
            }
        }
        total += n;
        log.lock().unwrap().extend(&buf[..n]);
        if w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Write);
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

fn web_host(server: &Thruserv, paths: &[&Path]) -> (Proc, String) {
    let url = server.url();
    let mut args = vec!["host", "--json", "--web", "--server", &url];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let host = Proc::spawn(&args, &[]);
    let link = host.event("web_link");
    assert_eq!(link["mode"], "e2e", "{link}");
    (host, link["url"].as_str().unwrap().to_string())
}

/// The link with its origin replaced by the proxy's.
fn via(proxy: &Proxy, link: &str) -> String {
    let path = link.splitn(4, '/').nth(3).unwrap();
    format!("http://{}/{path}", proxy.addr)
}

/// Reads a stored (method 0) zip: (name, bytes) per entry, from its central directory.
fn unzip(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let u16_at = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
    let end = data.len() - 22;
    assert_eq!(u32_at(end), 0x0605_4b50, "no end of central directory");
    let (count, mut at) = (u16_at(end + 10), u32_at(end + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(u32_at(at), 0x0201_4b50);
        let (size, name_len, local) = (u32_at(at + 24), u16_at(at + 28), u32_at(at + 42));
        let name = String::from_utf8(data[at + 46..at + 46 + name_len].to_vec()).unwrap();
        assert_eq!(u32_at(local), 0x0403_4b50);
        let start = local + 30 + u16_at(local + 26) + u16_at(local + 28);
        out.push((name, data[start..start + size].to_vec()));
        at += 46 + name_len + u16_at(at + 30) + u16_at(at + 32);
    }
    out
}

#[test]
fn browser_downloads_a_200_mib_file_and_a_tree_as_zip_end_to_end() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    random_file(&big, 200 << 20, 7);
    let tree = dir.path().join("tree");
    for (rel, len) in [
        ("a.txt", 5usize),
        ("sub/b.bin", 150_000),
        ("sub/c/empty", 0),
    ] {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        random_file(&p, len, len as u64);
    }
    let server = Thruserv::start(&["--web-relay"]);
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let browser = Driver::start(&downloads);

    let (_host, link) = web_host(&server, &[&big]);
    browser.go(&link);
    browser.wait_state(&["ready", "error"]);
    assert!(
        browser.text("status").starts_with("1 file, "),
        "{}",
        browser.text("status")
    );
    browser.click("button[data-index='0']");
    assert_eq!(
        browser.wait_state(&["done", "error"]),
        "done",
        "{}",
        browser.text("error")
    );
    let got = downloaded(&downloads, "big.bin");
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(&big).unwrap(),
        "200 MiB download differs"
    );

    let (_host2, link2) = web_host(&server, &[&tree]);
    browser.go(&link2);
    browser.wait_state(&["ready", "error"]);
    browser.click("#zip");
    assert_eq!(
        browser.wait_state(&["done", "error"]),
        "done",
        "{}",
        browser.text("error")
    );
    let zip = std::fs::read(downloaded(&downloads, "tree.zip")).unwrap();
    let entries = unzip(&zip);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["tree/a.txt", "tree/sub/b.bin", "tree/sub/c/empty"]);
    for (name, bytes) in &entries {
        let rel = name.strip_prefix("tree/").unwrap();
        assert!(
            std::fs::read(tree.join(rel)).unwrap() == *bytes,
            "{name} differs"
        );
    }
}

#[test]
fn no_plaintext_crosses_the_relay_and_a_tampered_chunk_stops_the_download() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A file full of a marker, under a name that is a marker too.
    let marker = "THRUFLUX-PLAINTEXT-MARKER";
    let name = "secret-name-MARKER2.txt";
    let src = dir.path().join(name);
    std::fs::write(&src, marker.repeat(40_000)).unwrap();
    let server = Thruserv::start(&["--web-relay"]);
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let browser = Driver::start(&downloads);

    // Everything between the browser and the relay is recorded.
    let (_host, link) = web_host(&server, &[&src]);
    let id = link
        .rsplit('/')
        .next()
        .unwrap()
        .split('#')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(server.addr, None);
    browser.go(&via(&proxy, &link));
    browser.wait_state(&["ready", "error"]);
    browser.click("button[data-index='0']");
    assert_eq!(
        browser.wait_state(&["done", "error"]),
        "done",
        "{}",
        browser.text("error")
    );
    let got = downloaded(&downloads, name);
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&src).unwrap());
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(seen.len() > 1_000_000, "the proxy saw the download");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(&seen, marker.as_bytes()),
        "plaintext crossed the relay"
    );
    assert!(
        !contains(&seen, b"MARKER2"),
        "the file name crossed the relay"
    );
    // …and the key never did: it lives in the fragment.
    let key = link.split('#').nth(1).unwrap();
    assert!(
        !contains(&seen, key.as_bytes()),
        "the key crossed the relay"
    );

    // The same link through a proxy that flips one byte of the file's ciphertext.
    let evil = Proxy::start(server.addr, Some(format!("/w/{id}/0 ")));
    std::fs::remove_file(&got).unwrap();
    browser.go(&via(&evil, &link));
    browser.wait_state(&["ready", "error"]);
    browser.click("button[data-index='0']");
    assert_eq!(browser.wait_state(&["done", "error"]), "error");
    let error = browser.text("error");
    assert!(error.contains("failed verification"), "{error}");
    std::thread::sleep(Duration::from_millis(500));
    // Nothing unverified under the final name.
    assert!(
        !downloads.join(name).exists(),
        "a tampered download was saved as complete"
    );
}

#[test]
fn browser_uploads_to_thru_join_through_the_reverse_link() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("upload.bin");
    random_file(&src, 3 << 20, 11);
    let out = dir.path().join("in");
    let server = Thruserv::start(&["--web-relay"]);
    let url = server.url();
    let mut join = Proc::spawn(
        &[
            "join",
            "--json",
            "--web",
            "--yes",
            "--out",
            out.to_str().unwrap(),
            "--server",
            &url,
        ],
        &[],
    );
    let link = join.event("web_link");
    assert_eq!(link["mode"], "e2e", "{link}");
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let browser = Driver::start(&downloads);
    browser.go(link["url"].as_str().unwrap());
    browser.wait_state(&["ready", "error"]);
    let input = browser.find("#pick");
    browser.cmd(
        &format!("element/{input}/value"),
        &json!({ "text": src.to_str().unwrap() }),
    );
    browser.click("#send");
    assert_eq!(
        browser.wait_state(&["done", "error"]),
        "done",
        "{}",
        browser.text("error")
    );
    assert_eq!(join.wait(), 0);
    assert_eq!(
        std::fs::read(out.join("upload.bin")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    // Used once: the link is gone.
    let page = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(link["url"].as_str().unwrap().split('#').next().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&page.stdout), "404");
}
