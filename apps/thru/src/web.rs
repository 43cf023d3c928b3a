//! `--web`: share with someone who has only a browser or curl, through a thruserv that runs
//! `--web-relay`.
//!
//! `thru host PATH… --web` opens a relay link and serves each download the relay asks for
//! from disk, on demand, over its own data WebSocket, so nothing is ever spooled: the relay
//! holds a few frames per stream. By default every chunk is sealed with AES-256-GCM under a
//! key that only the link's fragment carries (see [`e2e`]); the browser page decrypts and
//! verifies each chunk before writing it. `--plain` sends bytes as they are, for curl.
//!
//! `thru join --web` opens a single-use upload link and receives one upload through it with
//! the receiver's rules: path safety, the prompt, no overwrite without consent, and
//! verification (GCM tags end to end, or the announced size in plain mode).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use flux_signal::client::{ClientConfig, RelayStream, connect_relay};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Relay paths (the server's `flux_signal::server` constants, repeated to keep the client
/// free of the server feature).
const HOST_PATH: &str = "/v1/relay/host";
const RECV_PATH: &str = "/v1/relay/recv";
const PUSH_PATH: &str = "/v1/relay/push/";
const PULL_PATH: &str = "/v1/relay/pull/";

/// Plain-mode frame size on a data WebSocket.
const PLAIN_FRAME: usize = 64 * 1024;

/// End-to-end encryption shared with the page (`relay.js`): AES-256-GCM per 64 KiB chunk.
///
/// - Key: 32 random bytes, base64url without padding, in the link's fragment.
/// - Nonce of chunk `c` of file `f`: `f` as u32 big-endian, then `c` as u64 big-endian. The
///   manifest is file `0xFFFF_FFFF`, chunk 0.
/// - Associated data: one byte, 1 on a file's last chunk and 0 before it, so that a stream
///   cut at a chunk boundary does not verify as complete.
/// - A file of `n` bytes is `max(1, ceil(n / CHUNK))` chunks, each followed by its 16-byte
///   tag; an empty file is one empty chunk.
pub mod e2e {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

    /// Plaintext bytes per chunk.
    pub const CHUNK: usize = 64 * 1024;
    /// GCM tag bytes after each chunk.
    pub const TAG: usize = 16;
    /// The file index of the manifest.
    pub const MANIFEST: u32 = u32::MAX;

    /// A link's key.
    pub struct Key(LessSafeKey);

    /// A chunk did not verify: wrong key, or altered on the way.
    #[derive(Debug, thiserror::Error)]
    #[error("chunk {chunk} of file {file} failed verification (tampered with, or the wrong key)")]
    pub struct Tampered {
        /// File index.
        pub file: u32,
        /// Chunk index.
        pub chunk: u64,
    }

    impl Key {
        /// A key from its 32 bytes.
        pub fn new(bytes: &[u8; 32]) -> Self {
            // Invariant: AES-256 takes exactly 32 bytes.
            #[allow(clippy::unwrap_used)]
            Self(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, bytes).unwrap(),
            ))
        }

        /// Encrypts `data` in place and appends the tag.
        pub fn seal(&self, file: u32, chunk: u64, last: bool, data: &mut Vec<u8>) {
            // Invariant: sealing only fails for inputs above GCM's 64 GiB limit.
            #[allow(clippy::unwrap_used)]
            self.0
                .seal_in_place_append_tag(nonce(file, chunk), Aad::from([u8::from(last)]), data)
                .unwrap();
        }

        /// Verifies and decrypts a sealed chunk in place, leaving the plaintext.
        pub fn open(
            &self,
            file: u32,
            chunk: u64,
            last: bool,
            data: &mut Vec<u8>,
        ) -> Result<(), Tampered> {
            let n = self
                .0
                .open_in_place(nonce(file, chunk), Aad::from([u8::from(last)]), data)
                .map_err(|_| Tampered { file, chunk })?
                .len();
            data.truncate(n);
            Ok(())
        }
    }

    fn nonce(file: u32, chunk: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&file.to_be_bytes());
        n[4..].copy_from_slice(&chunk.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Chunks in a file of `size` bytes.
    pub fn chunks(size: u64) -> u64 {
        size.div_ceil(CHUNK as u64).max(1)
    }

    /// Bytes on the wire for a file of `size` bytes.
    pub fn sealed_size(size: u64) -> u64 {
        size + chunks(size) * TAG as u64
    }
}

/// One file offered on the web.
#[derive(Clone, Debug)]
pub struct WebFile {
    /// Relative path with `/` separators, as the receiver sees it.
    pub name: String,
    /// Where it is here.
    pub path: PathBuf,
    /// Its size when offered.
    pub size: u64,
}

/// Lists the regular files under `paths` (directories recursively, in name order);
/// symbolic links and special files are left out.
pub fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<WebFile>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<WebFile>) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot read {}", dir.display()))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let ty = e.file_type()?;
            if ty.is_dir() {
                walk(&e.path(), &name, out)?;
            } else if ty.is_file() {
                let size = e.metadata()?.len();
                out.push(WebFile {
                    name,
                    path: e.path(),
                    size,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        let base = p
            .canonicalize()
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "files".into());
        if meta.is_dir() {
            walk(p, &base, &mut out)?;
        } else {
            out.push(WebFile {
                name: base,
                path: p.clone(),
                size: meta.len(),
            });
        }
    }
    Ok(out)
}

/// The relay's `http(s)://HOST[:PORT]` for a `--server` URL.
pub fn http_base(server: &str) -> String {
    let (scheme, rest) = server.split_once("://").unwrap_or(("http", server));
    let https = matches!(scheme.to_ascii_lowercase().as_str(), "wss" | "https");
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{}://{authority}", if https { "https" } else { "http" })
}

/// Percent-encodes a relative path for a URL, keeping `/`.
pub fn url_path(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A QR code of `text` for a terminal (two rows per line).
pub fn qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build(),
    )
}

#[derive(Serialize)]
struct OfferFile<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum FromRelay {
    Ready {
        id: String,
    },
    Get {
        req: String,
        file: usize,
        start: u64,
        end: u64,
    },
    Tar {
        req: String,
    },
    Put {
        req: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        size: Option<u64>,
    },
    #[serde(other)]
    Other,
}

/// What `thru host --web` prints and serves.
pub struct HostLink {
    /// The link to give out (with the key in its fragment in end-to-end mode).
    pub url: String,
    /// curl commands (plain mode).
    pub curl: Vec<String>,
}

/// A relay owner's control connection.
pub struct Control {
    ws: tokio_tungstenite::WebSocketStream<RelayStream>,
}

/// Opens a download relay for `files`: returns the link and the control connection that
/// [`serve`] then runs.
pub async fn open_host(
    server: &str,
    config: &ClientConfig,
    files: &[WebFile],
    key: Option<&[u8; 32]>,
) -> anyhow::Result<(HostLink, Control)> {
    let mut ws = connect_relay(server, HOST_PATH, config)
        .await
        .context("cannot reach the relay (is thruserv running with --web-relay?)")?;
    let offer = match key {
        Some(k) => {
            #[derive(Serialize)]
            struct M<'a> {
                v: u32,
                files: Vec<OfferFile<'a>>,
            }
            let manifest = M {
                v: 1,
                files: files
                    .iter()
                    .map(|f| OfferFile {
                        name: &f.name,
                        size: f.size,
                    })
                    .collect(),
            };
            let mut blob = serde_json::to_vec(&manifest)?;
            e2e::Key::new(k).seal(e2e::MANIFEST, 0, true, &mut blob);
            let sizes: Vec<_> = files
                .iter()
                .map(|f| OfferFile {
                    name: "",
                    size: e2e::sealed_size(f.size),
                })
                .collect();
            serde_json::json!({
                "t": "offer", "mode": "e2e", "files": sizes,
                "blob": base64::engine::general_purpose::STANDARD.encode(&blob),
            })
        }
        None => {
            let list: Vec<_> = files
                .iter()
                .map(|f| OfferFile {
                    name: &f.name,
                    size: f.size,
                })
                .collect();
            serde_json::json!({ "t": "offer", "mode": "plain", "files": list })
        }
    };
    ws.send(Message::text(offer.to_string())).await?;
    let id = wait_ready(&mut ws).await?;
    let base = http_base(server);
    let link = match key {
        Some(k) => HostLink {
            url: format!("{base}/w/{id}#{}", b64url(k)),
            curl: Vec::new(),
        },
        None => {
            let mut curl: Vec<String> = files
                .iter()
                .map(|f| format!("curl -fLOJ {base}/w/{id}/{}", url_path(&f.name)))
                .collect();
            if files.len() > 1 || files.iter().any(|f| f.name.contains('/')) {
                curl.push(format!("curl -fL {base}/w/{id}.tar | tar x"));
            }
            HostLink {
                url: format!("{base}/w/{id}"),
                curl,
            }
        }
    };
    Ok((link, Control { ws }))
}

async fn wait_ready(
    ws: &mut tokio_tungstenite::WebSocketStream<RelayStream>,
) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                Ok(FromRelay::Ready { id }) => return Ok(id),
                _ => anyhow::bail!("unexpected answer from the relay: {}", t.as_str()),
            },
            Some(Ok(Message::Close(f))) => anyhow::bail!(
                "the relay refused: {}",
                f.map_or_else(|| "closed".into(), |f| f.reason.to_string())
            ),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("relay connection"),
            None => anyhow::bail!("the relay closed the connection"),
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Serves downloads until the relay ends the link (expiry) or the connection drops.
/// Returns why it ended.
pub async fn serve(
    mut control: Control,
    server: String,
    config: ClientConfig,
    files: Vec<WebFile>,
    key: Option<[u8; 32]>,
) -> anyhow::Result<String> {
    let files = std::sync::Arc::new(files);
    let mut ping = tokio::time::interval(std::time::Duration::from_secs(20));
    loop {
        let msg = tokio::select! {
            m = control.ws.next() => m,
            _ = ping.tick() => {
                control.ws.send(Message::Ping(Default::default())).await?;
                continue;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                return Ok(f.map_or_else(|| "closed".into(), |f| f.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("relay connection"),
            None => return Ok("connection closed".into()),
        };
        let Ok(req) = serde_json::from_str::<FromRelay>(text.as_str()) else {
            continue;
        };
        let (token, job) = match req {
            FromRelay::Get {
                req,
                file,
                start,
                end,
            } if file < files.len() => (req, Job::Range { file, start, end }),
            FromRelay::Tar { req } if key.is_none() => (req, Job::Tar),
            _ => continue,
        };
        let (files, server, config) = (files.clone(), server.clone(), config.clone());
        tokio::spawn(async move {
            if let Err(e) = push(&server, &config, &token, &files, job, key).await {
                tracing::debug!("download ended: {e:#}");
            }
        });
    }
}

enum Job {
    Range { file: usize, start: u64, end: u64 },
    Tar,
}

/// Opens the data WebSocket for one request and streams it from a blocking reader thread
/// through a small channel: the relay's backpressure reaches the disk reads.
async fn push(
    server: &str,
    config: &ClientConfig,
    token: &str,
    files: &std::sync::Arc<Vec<WebFile>>,
    job: Job,
    key: Option<[u8; 32]>,
) -> anyhow::Result<()> {
    let mut ws = connect_relay(server, &format!("{PUSH_PATH}{token}"), config).await?;
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Vec<u8>>>(4);
    let files = files.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let send = |b: Vec<u8>| tx.blocking_send(Ok(b)).is_ok();
        let result = match job {
            Job::Range { file, start, end } => match key {
                Some(k) => read_sealed(
                    &files[file],
                    file as u32,
                    start,
                    end,
                    &e2e::Key::new(&k),
                    send,
                ),
                None => read_plain(&files[file].path, start, end, send),
            },
            Job::Tar => write_tar(&files, send),
        };
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    while let Some(chunk) = rx.recv().await {
        ws.send(Message::Binary(chunk?.into())).await?;
    }
    reader.await?;
    ws.send(Message::text("end")).await?;
    let _ = ws.close(None).await;
    Ok(())
}

fn read_plain(
    path: &Path,
    start: u64,
    end: u64,
    mut send: impl FnMut(Vec<u8>) -> bool,
) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    f.seek(SeekFrom::Start(start))?;
    let mut left = end.saturating_sub(start);
    while left > 0 {
        let mut buf = vec![0u8; PLAIN_FRAME.min(left as usize)];
        f.read_exact(&mut buf)
            .with_context(|| format!("{} changed while offered", path.display()))?;
        left -= buf.len() as u64;
        if !send(buf) {
            break;
        }
    }
    Ok(())
}

/// Streams sealed chunks covering the sealed byte range `[start, end)`; ranges start on a
/// chunk boundary (the page asks for whole files or resumes at a chunk).
fn read_sealed(
    file: &WebFile,
    index: u32,
    start: u64,
    end: u64,
    key: &e2e::Key,
    mut send: impl FnMut(Vec<u8>) -> bool,
) -> anyhow::Result<()> {
    let sealed = (e2e::CHUNK + e2e::TAG) as u64;
    anyhow::ensure!(
        start.is_multiple_of(sealed),
        "sealed range must start on a chunk"
    );
    let mut f = File::open(&file.path).with_context(|| format!("open {}", file.path.display()))?;
    let chunks = e2e::chunks(file.size);
    let mut c = start / sealed;
    f.seek(SeekFrom::Start(c * e2e::CHUNK as u64))?;
    while c < chunks && c * sealed < end {
        let len = (file.size - c * e2e::CHUNK as u64).min(e2e::CHUNK as u64) as usize;
        let mut buf = Vec::with_capacity(len + e2e::TAG);
        buf.resize(len, 0);
        f.read_exact(&mut buf)
            .with_context(|| format!("{} changed while offered", file.path.display()))?;
        key.seal(index, c, c + 1 == chunks, &mut buf);
        if !send(buf) {
            break;
        }
        c += 1;
    }
    Ok(())
}

/// A tar (POSIX ustar, with pax records for long names and large files) of every file.
fn write_tar(files: &[WebFile], mut send: impl FnMut(Vec<u8>) -> bool) -> anyhow::Result<()> {
    for file in files {
        let mut head = tar_header(&file.name, file.size);
        if !send(std::mem::take(&mut head)) {
            return Ok(());
        }
        let mut sent = 0u64;
        read_plain(&file.path, 0, file.size, |b| {
            sent += b.len() as u64;
            send(b)
        })?;
        let pad = (512 - (file.size % 512) as usize) % 512;
        if pad > 0 && !send(vec![0u8; pad]) {
            return Ok(());
        }
    }
    send(vec![0u8; 1024]);
    Ok(())
}

/// The header block(s) of one regular file in a tar stream.
pub fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let long = name.len() > 100 || !name.is_ascii();
    let big = size >= 0o777_7777_7777;
    if long || big {
        let mut records = String::new();
        if long {
            records.push_str(&pax_record("path", name));
        }
        if big {
            records.push_str(&pax_record("size", &size.to_string()));
        }
        out.extend(ustar_block("pax_header", records.len() as u64, b'x'));
        out.extend(records.as_bytes());
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    let short: String = if long {
        name.chars()
            .filter(char::is_ascii)
            .rev()
            .take(99)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        name.to_string()
    };
    out.extend(ustar_block(&short, if big { 0 } else { size }, b'0'));
    out
}

/// `"LEN key=value\n"`, where LEN counts the whole record, its own digits included.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

fn ustar_block(name: &str, size: u64, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put =
        |h: &mut [u8; 512], at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = kind;
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

// --- receiving: `thru join --web` ---------------------------------------------------------

/// Opens a single-use upload link. Returns the link (with the key in its fragment unless
/// `key` is `None`), the curl command in plain mode, and the control connection.
pub async fn open_receiver(
    server: &str,
    config: &ClientConfig,
    key: Option<&[u8; 32]>,
) -> anyhow::Result<(HostLink, Control)> {
    let mut ws = connect_relay(server, RECV_PATH, config)
        .await
        .context("cannot reach the relay (is thruserv running with --web-relay?)")?;
    let mode = if key.is_some() { "e2e" } else { "plain" };
    ws.send(Message::text(
        serde_json::json!({ "t": "receive", "mode": mode }).to_string(),
    ))
    .await?;
    let id = wait_ready(&mut ws).await?;
    let base = http_base(server);
    let link = match key {
        Some(k) => HostLink {
            url: format!("{base}/u/{id}#{}", b64url(k)),
            curl: Vec::new(),
        },
        None => HostLink {
            url: format!("{base}/u/{id}/"),
            curl: vec![format!("curl -fT FILE {base}/u/{id}/")],
        },
    };
    Ok((link, Control { ws }))
}

/// Why an upload was refused; the uploader is told the same words.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    /// A name that would escape the destination or is not portable.
    #[error("unsafe name {name:?}: {source}")]
    UnsafeName {
        /// As sent.
        name: String,
        /// The receiver's typed reason.
        #[source]
        source: flux_transfer::path::PathError,
    },
    /// More bytes than the upload announced.
    #[error("{name:?} is larger than the {announced} bytes announced")]
    Oversize {
        /// The file.
        name: String,
        /// What was announced.
        announced: u64,
    },
    /// Fewer bytes than announced, or the upload stopped.
    #[error("{name:?} stopped after {got} of {announced} bytes")]
    Short {
        /// The file.
        name: String,
        /// Bytes received.
        got: u64,
        /// What was announced.
        announced: u64,
    },
    /// A sealed chunk did not verify.
    #[error(transparent)]
    Tampered(#[from] e2e::Tampered),
    /// The receiver said no (the prompt, or a clash with no consent).
    #[error("declined: {0}")]
    Declined(String),
    /// The stream did not follow the format.
    #[error("malformed upload: {0}")]
    Malformed(String),
}

/// One file an uploader announced.
#[derive(Clone, Debug, Deserialize)]
pub struct Announced {
    /// Relative path.
    pub name: String,
    /// Bytes.
    pub size: u64,
}

/// What the receiver decides for an upload.
pub trait Decide {
    /// The whole offer: `Ok(())` accepts, `Err(reason)` declines.
    fn offer(&mut self, files: &[Announced]) -> Result<(), String>;
    /// `path` exists: `Some(p)` writes to `p` (the same path to overwrite, another to keep
    /// both), `None` declines the upload.
    fn clash(&mut self, path: &Path) -> Option<PathBuf>;
}

/// Waits for the one upload of the link, receives it under `out` and tells the uploader the
/// verdict. Returns what was written.
pub async fn receive_one(
    mut control: Control,
    server: &str,
    config: &ClientConfig,
    key: Option<[u8; 32]>,
    out: &Path,
    decide: &mut dyn Decide,
) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let mut ping = tokio::time::interval(std::time::Duration::from_secs(20));
    let (req, name, size) = loop {
        let msg = tokio::select! {
            m = control.ws.next() => m,
            _ = ping.tick() => {
                control.ws.send(Message::Ping(Default::default())).await?;
                continue;
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                if let Ok(FromRelay::Put { req, name, size }) = serde_json::from_str(t.as_str()) {
                    break (req, name, size);
                }
            }
            Some(Ok(Message::Close(f))) => anyhow::bail!(
                "the relay ended the link: {}",
                f.map_or_else(|| "closed".into(), |f| f.reason.to_string())
            ),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("relay connection"),
            None => anyhow::bail!("the relay closed the connection"),
        }
    };
    let mut ws = connect_relay(server, &format!("{PULL_PATH}{req}"), config).await?;
    let result = receive_stream(
        &mut ws,
        key.as_ref().map(e2e::Key::new),
        name,
        size,
        out,
        decide,
    )
    .await;
    let verdict = match &result {
        Ok(files) => format!(
            "ok: {} file(s), {} bytes received and verified",
            files.len(),
            files.iter().map(|f| f.1).sum::<u64>()
        ),
        Err(e) => format!("refused: {e:#}"),
    };
    let _ = ws.send(Message::text(verdict)).await;
    let _ = ws.close(None).await;
    result
}

async fn next_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<RelayStream>,
) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(Some(b.into())),
            Some(Ok(Message::Text(t))) if t.as_str() == "end" => return Ok(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) | None => anyhow::bail!("the upload stopped before its end"),
            Some(Err(e)) => return Err(e).context("relay connection"),
        }
    }
}

async fn receive_stream(
    ws: &mut tokio_tungstenite::WebSocketStream<RelayStream>,
    key: Option<e2e::Key>,
    name: Option<String>,
    size: Option<u64>,
    out: &Path,
    decide: &mut dyn Decide,
) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let files: Vec<Announced> = match &key {
        Some(k) => {
            let mut blob = next_frame(ws)
                .await?
                .ok_or_else(|| UploadRefused::Malformed("no manifest".into()))?;
            k.open(e2e::MANIFEST, 0, true, &mut blob)?;
            #[derive(Deserialize)]
            struct M {
                files: Vec<Announced>,
            }
            serde_json::from_slice::<M>(&blob)
                .map_err(|e| UploadRefused::Malformed(e.to_string()))?
                .files
        }
        None => vec![Announced {
            name: name.ok_or_else(|| UploadRefused::Malformed("no name".into()))?,
            size: size.ok_or_else(|| {
                UploadRefused::Malformed(
                    "no Content-Length: upload a file with curl -T FILE".into(),
                )
            })?,
        }],
    };
    if files.is_empty() {
        return Err(UploadRefused::Malformed("no files".into()).into());
    }
    for f in &files {
        flux_transfer::path::validate(&f.name).map_err(|source| UploadRefused::UnsafeName {
            name: f.name.clone(),
            source,
        })?;
    }
    decide.offer(&files).map_err(UploadRefused::Declined)?;
    let mut targets = Vec::new();
    for f in &files {
        let path = out.join(&f.name);
        let target = if std::fs::symlink_metadata(&path).is_ok() {
            decide
                .clash(&path)
                .ok_or_else(|| UploadRefused::Declined(format!("{} exists here", f.name)))?
        } else {
            path
        };
        targets.push(target);
    }
    let mut done = Vec::new();
    let mut pending: Option<Vec<u8>> = None;
    for (i, (f, target)) in files.iter().zip(&targets).enumerate() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let part = target.with_file_name(format!(
            ".{}.thru-part",
            target.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut file = std::fs::File::create(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        let written = receive_file(ws, key.as_ref(), i as u32, f, &mut file, &mut pending).await;
        match written {
            Ok(()) => {
                use std::io::Write as _;
                file.flush()?;
                drop(file);
                // Verified in full: only now does it take its name.
                std::fs::rename(&part, target)
                    .with_context(|| format!("cannot rename to {}", target.display()))?;
                done.push((target.clone(), f.size));
            }
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        }
    }
    if pending.is_some() || next_frame(ws).await?.is_some() {
        return Err(UploadRefused::Malformed("data after the last file".into()).into());
    }
    Ok(done)
}

/// Receives one file's bytes (verified chunk by chunk when sealed) into `out`.
async fn receive_file(
    ws: &mut tokio_tungstenite::WebSocketStream<RelayStream>,
    key: Option<&e2e::Key>,
    index: u32,
    f: &Announced,
    out: &mut std::fs::File,
    pending: &mut Option<Vec<u8>>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut got = 0u64;
    match key {
        Some(k) => {
            let n = e2e::chunks(f.size);
            for c in 0..n {
                let mut chunk = next_frame(ws).await?.ok_or(UploadRefused::Short {
                    name: f.name.clone(),
                    got,
                    announced: f.size,
                })?;
                k.open(index, c, c + 1 == n, &mut chunk)?;
                got += chunk.len() as u64;
                if got > f.size {
                    return Err(UploadRefused::Oversize {
                        name: f.name.clone(),
                        announced: f.size,
                    }
                    .into());
                }
                out.write_all(&chunk)?;
            }
        }
        None => {
            while got < f.size {
                let Some(data) = (match pending.take() {
                    Some(p) => Some(p),
                    None => next_frame(ws).await?,
                }) else {
                    break;
                };
                got += data.len() as u64;
                if got > f.size {
                    return Err(UploadRefused::Oversize {
                        name: f.name.clone(),
                        announced: f.size,
                    }
                    .into());
                }
                out.write_all(&data)?;
            }
        }
    }
    if got != f.size {
        return Err(UploadRefused::Short {
            name: f.name.clone(),
            got,
            announced: f.size,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_chunks_round_trip_and_detect_tampering() {
        let key = e2e::Key::new(&[7u8; 32]);
        let mut data = b"hello".to_vec();
        key.seal(0, 3, true, &mut data);
        assert_eq!(data.len(), 5 + e2e::TAG);
        let mut copy = data.clone();
        key.open(0, 3, true, &mut copy).unwrap();
        assert_eq!(copy, b"hello");
        // Another position, the wrong last flag, or a flipped bit all fail.
        assert!(key.open(0, 4, true, &mut data.clone()).is_err());
        assert!(key.open(0, 3, false, &mut data.clone()).is_err());
        data[0] ^= 1;
        assert!(key.open(0, 3, true, &mut data).is_err());
        assert_eq!(e2e::sealed_size(0), 16);
        assert_eq!(e2e::sealed_size(65536), 65536 + 16);
        assert_eq!(e2e::sealed_size(65537), 65537 + 32);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record("path", "a"), "9 path=a\n");
        let r = pax_record("path", &"x".repeat(95));
        assert_eq!(r.len().to_string(), r.split(' ').next().unwrap());
    }

    #[test]
    fn urls() {
        assert_eq!(
            http_base("wss://relay.example.org/v1/signal"),
            "https://relay.example.org"
        );
        assert_eq!(http_base("ws://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(url_path("a b/é.txt"), "a%20b/%C3%A9.txt");
    }
}
